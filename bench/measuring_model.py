"""Build the measuring model: a VAE and a UNet trained on real photographs, saved at bench/models/measuring/.

    python -m bench.measuring_model                      # the committed model: fixed seeds
    python -m bench.measuring_model --out /tmp/m --vae-steps 200 --unet-steps 100   # a quick try

The tests' tiny model has a random VAE and a UNet trained on synthetic
families only, and a LoRA barely moves it, so it cannot say whether a mimic
learns less from protected copies. This one is trained, small enough to build
on two CPU cores in about an hour and to commit (under 30 MB):

1. **The VAE** (diffusers' ``AutoencoderKL``: 8x downsampling, 4 latent
   channels, as SD's) learns to reconstruct random crops of the base
   photographs (:mod:`fixative.engine.photos`: several scales, flips, colour
   jitter, web JPEG) and of the synthetic families, with SD's objective less
   its perceptual and adversarial terms: L1 + MSE, and a KL weight of 1e-6.
   Its scaling factor is 1 / std of its latents, the rule that gave SD 1.x
   its 0.18215 (Rombach et al. 2022, section 4.3 and appendix G).
2. **The UNet** (``UNet2DConditionModel``, cross-attention on a small CLIP
   text encoder) learns noise prediction on those latents, each caption
   naming its source photograph or family, as SD learned on captioned
   pictures. The artist styles (:mod:`fixative.engine.styles`) are never
   shown to it.

The figures (the VAE's PSNR on held-out photographs, how nearly it commutes
with a flip and an 8-px shift, its response to fine against coarse
perturbations) go into ``recipe.json`` beside the weights; bench/README.md
("The measuring model") has them.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

from fixative.engine import mimicry
from fixative.engine.metrics import psnr
from fixative.engine.photos import BASE, HELD_OUT, photo, random_crops, tiles
from fixative.engine.pixels import to_rgb
from fixative.engine.synthetic import PRETRAINING_FAMILIES, family_images
from fixative.engine.tiny import save_model_folder

OUT = Path(__file__).parent / "models" / "measuring"
RESOLUTION = 128  # pixels; latents of 16x16
TEXT_DIM = 64
VAE_CROP = 64  # the VAE is convolutional: it trains on small crops and works at any size
KL_WEIGHT = 1e-6  # SD's autoencoder's
CAPTIONS = {**{name: f"a photo of {name.replace('_', ' ')}" for name in BASE},
            **{name: f"a picture of {name}" for name in PRETRAINING_FAMILIES}}


def measuring_vae(seed: int) -> AutoencoderKL:
    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,  # four blocks, three downsamplings: 8x, as SD's
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 64, 128, 128),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=RESOLUTION,
    )


def measuring_unet(seed: int) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=RESOLUTION // 8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(64, 128, 128),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=16,
        norm_num_groups=16,
    )


def training_pictures(count: int, size: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """Crops of the base photographs (two thirds) and synthetic family images (one third), with their sources.

    Each crop is 1-4x ``size`` before it is resized to ``size``: pictures at
    their own scale and up to 4x reduced, as web pictures are, never the
    whole photograph crushed into a thumbnail. The colour photographs get
    twice the crops of the greyscale ones, which are most of the photographs
    but not of what artists post.
    """
    photos = count * 2 // 3
    weights = {name: 2 if photo(name).std(axis=2).mean() > 1 else 1 for name in BASE}
    pictures, sources = [], []
    for i, name in enumerate(BASE):
        short = min(photo(name).shape[:2])
        per_name = math.ceil(photos * weights[name] / sum(weights.values()))
        scales = (min(1.0, size / short), min(1.0, 4 * size / short))
        pictures.append(random_crops((name,), per_name, size, seed=seed * 1000 + i, scales=scales))
        sources += [name] * per_name
    per_family = math.ceil((count - photos) / len(PRETRAINING_FAMILIES))
    for name in PRETRAINING_FAMILIES:
        pictures.append(family_images(name, per_family, size, seed))
        sources += [name] * per_family
    return torch.cat(pictures), sources


def train_vae(vae: AutoencoderKL, steps: int, batch: int, seed: int, log=print) -> None:
    pictures, _ = training_pictures(max(steps * batch // 4, 512), VAE_CROP, seed)
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=1e-3, total_steps=steps, pct_start=0.05)
    vae.train()
    started = time.monotonic()
    for step in range(steps):
        x = pictures[torch.randint(len(pictures), (batch,), generator=generator)]
        # Each picture's channels in a random order: a dozen photographs hold few hues, and a VAE
        # that saw only those washes out the rest (an orange cup came back grey).
        x = torch.stack([image[torch.randperm(3, generator=generator)] for image in x])
        posterior = vae.encode(x).latent_dist
        y = vae.decode(posterior.sample(generator)).sample
        loss = (y - x).abs().mean() + (y - x).square().mean() + KL_WEIGHT * posterior.kl().mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"vae step {step}/{steps}: loss {loss.item():.4f} ({time.monotonic() - started:.0f} s)")
    vae.eval().requires_grad_(False)


@torch.no_grad()
def set_latent_scale(vae: AutoencoderKL, pictures: torch.Tensor) -> float:
    latents = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in pictures.split(32)])
    vae.register_to_config(scaling_factor=float(1 / latents.std()))
    return vae.config.scaling_factor


@torch.no_grad()
def vae_figures(vae: AutoencoderKL, seed: int = 0) -> dict[str, float]:
    """Reconstruction PSNR on the held-out photographs, equivariance errors, and fine against coarse sensitivity."""
    figures: dict[str, float] = {}
    for name in HELD_OUT:
        x = tiles(name, RESOLUTION)
        y = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        figures[f"psnr_{name}"] = float(np.mean([psnr(to_rgb(a), to_rgb(b)) for a, b in zip(x, y)]))
    x = torch.cat([tiles(name, RESOLUTION) for name in HELD_OUT])
    z = vae.encode(x).latent_dist.mean
    # ||E(T x) - T E(x)|| / ||E(x)||: a trained encoder must nearly commute with a flip and a shift by one latent cell.
    figures["flip_error"] = float((vae.encode(x.flip(-1)).latent_dist.mean - z.flip(-1)).norm() / z.norm())
    shifted = vae.encode(x[..., 8:]).latent_dist.mean
    figures["shift8_error"] = float((shifted[..., :-1] - z[..., 1:-1]).norm() / z[..., 1:-1].norm())
    # Equal-energy perturbations (RMS 4/255 on [-1, 1]): pixel noise against the same noise 8x coarser.
    generator = torch.Generator().manual_seed(seed)
    rms = 8 / 255
    fine = torch.randn(x.shape, generator=generator)
    coarse = F.interpolate(torch.randn(x.shape[0], 3, x.shape[2] // 8, x.shape[3] // 8, generator=generator),
                           size=x.shape[2:], mode="bilinear", align_corners=False)
    for label, noise in (("fine", fine), ("coarse", coarse)):
        noise = noise * rms / noise.square().mean().sqrt()
        moved = vae.encode(x + noise).latent_dist.mean
        figures[f"latent_shift_{label}"] = float((moved - z).norm() / z.norm())
    return figures


@torch.no_grad()
def style_separation(model) -> dict[str, float]:
    """How well :func:`fixative.engine.mimicry.style_distance` tells the styles apart, on their held-out works.

    Every pair of single works: the mean distance within a style and across
    styles, and the share of (work, same-style work, other-style work)
    triples in which the same-style work is the closer (0.5: chance, 1: always).
    """
    from fixative.engine.mimicry import statistics_distance, style_statistics
    from fixative.engine.styles import STYLES, works

    pictures = [(style, style_statistics(model, work[None]))
                for style in STYLES for work in works(style, RESOLUTION, held_out=True)]
    n = len(pictures)
    distance = [[statistics_distance(pictures[i][1], pictures[j][1]) for j in range(n)] for i in range(n)]
    same = [(i, j) for i in range(n) for j in range(n) if i != j and pictures[i][0] == pictures[j][0]]
    other = [(i, j) for i in range(n) for j in range(n) if pictures[i][0] != pictures[j][0]]
    wins = [distance[i][j] < distance[i][k] for i, j in same for k in range(n) if pictures[k][0] != pictures[i][0]]
    return {"style_distance_same": float(np.mean([distance[i][j] for i, j in same])),
            "style_distance_other": float(np.mean([distance[i][j] for i, j in other])),
            "style_triplets_right": float(np.mean(wins))}


# The mimic of the build's figures: the recipe fixative check and the mimicry table train with.
MIMIC = {"rank": mimicry.LORA_RANK, "learning_rate": mimicry.LEARNING_RATE, "steps": 300}


def lora_figures(model, rank: int, learning_rate: float, steps: int, seed: int = 0) -> dict[str, float]:
    """For each style: how much a LoRA on its 10 training works lowers the denoising loss on its held-out works.

    ``lora_gain_STYLE``: 1 - held-out loss after / before (0.05: 5% lower),
    with the judge's fixed (t, eps) draws, and the LoRA's own prompt.
    """
    from fixative.engine.styles import STYLES, works

    model = mimicry.with_prompt(model, mimicry.DEFAULT_PROMPT)
    figures = {}
    for style in STYLES:
        training = [to_rgb(work) for work in works(style, RESOLUTION)]
        held_out = mimicry.Originals.prepare(model, [to_rgb(work) for work in works(style, RESOLUTION, held_out=True)])
        before = float(np.mean(mimicry.denoising_losses(model, held_out.latents)))
        with mimicry.fine_tuned(model, training, steps, seed, rank=rank, learning_rate=learning_rate):
            after = float(np.mean(mimicry.denoising_losses(model, held_out.latents)))
        figures[f"lora_gain_{style}"] = 1 - after / before
    return figures


SHEET_CAPTIONS = ("astronaut", "brick", "fields", "hatching")


@torch.no_grad()
def contact_sheet(model, path: Path) -> None:
    """The base model's samples for a few of its training captions, a row each: do they look like their sources?"""
    from PIL import Image

    rows = []
    for name in SHEET_CAPTIONS:
        pixels = mimicry.generate(mimicry.with_prompt(model, CAPTIONS[name]), mimicry.GUIDANCE)
        rows.append(np.concatenate([to_rgb(image) for image in pixels], axis=1))
    Image.fromarray(np.concatenate(rows, axis=0)).save(path)


def train_unet(unet: UNet2DConditionModel, vae: AutoencoderKL, embed, steps: int, batch: int, seed: int,
               log=print) -> None:
    pictures, sources = training_pictures(max(steps * batch // 6, 768), RESOLUTION, seed + 1)
    flipped = pictures.flip(-1)
    with torch.no_grad():
        posteriors = [vae.encode(chunk).latent_dist for chunk in torch.cat([pictures, flipped]).split(32)]
    scale = vae.config.scaling_factor
    mean = torch.cat([p.mean for p in posteriors]) * scale
    std = torch.cat([p.std for p in posteriors]) * scale
    contexts = {name: embed(caption) for name, caption in CAPTIONS.items()}
    context = torch.cat([contexts[name] for name in sources + sources])
    empty = embed("")
    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000)
    alphas = scheduler.alphas_cumprod
    generator = torch.Generator().manual_seed(seed)
    optimiser = torch.optim.AdamW(unet.parameters(), lr=1e-3, weight_decay=1e-2)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimiser, max_lr=1e-3, total_steps=steps, pct_start=0.05)
    unet.train()
    started = time.monotonic()
    for step in range(steps):
        pick = torch.randint(len(mean), (batch,), generator=generator)
        z = mean[pick] + std[pick] * torch.randn(mean[pick].shape, generator=generator)
        t = torch.randint(0, 1000, (batch,), generator=generator)
        eps = torch.randn(z.shape, generator=generator)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * z + (1 - a).sqrt() * eps
        # One caption in ten dropped, as SD was trained, so classifier-free guidance has an unconditional model.
        drop = torch.rand(batch, generator=generator) < 0.1
        c = torch.where(drop.view(-1, 1, 1), empty.expand(batch, -1, -1), context[pick])
        loss = F.mse_loss(unet(noisy, t, c).sample, eps)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimiser.step()
        schedule.step()
        if step % 100 == 0 or step == steps - 1:
            log(f"unet step {step}/{steps}: loss {loss.item():.4f} ({time.monotonic() - started:.0f} s)")
    unet.eval().requires_grad_(False)


def build(out: Path, vae_steps: int, unet_steps: int, seed: int, lora_steps: int = MIMIC["steps"],
          log=print) -> dict:
    """Train both parts and save the model at ``out`` (diffusers layout) with its recipe and figures."""
    from fixative.engine.model import load_model
    from fixative.engine.options import EngineOptions

    started = time.monotonic()
    vae = measuring_vae(seed)
    train_vae(vae, vae_steps, batch=16, seed=seed, log=log)
    scale = set_latent_scale(vae, training_pictures(256, RESOLUTION, seed + 2)[0])
    # Logged now, before the UNet's half hour, so a bad VAE is seen early; the recipe's are taken on the saved model.
    log(f"vae: scaling factor {scale:.4f}, {vae_figures(vae, seed)}")
    unet = measuring_unet(seed)
    # The text encoder keeps its random weights: captions need only be told apart, and it is not attacked.
    torch.manual_seed(seed)
    text_config = dict(hidden_size=TEXT_DIM, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4)
    save_model_folder(out, unet, vae, text_config)  # first with the untrained UNet: the tokenizer and text encoder
    # Captions are embedded by the engine's own loader, exactly as the attacks and the mimic's LoRA will embed prompts.
    embed = load_model(EngineOptions(model=str(out), device="cpu", dtype="fp32"), generation=True).embed
    train_unet(unet, vae, embed, unet_steps, batch=32, seed=seed, log=log)
    # Stored in fp16, half the size to commit; the figures are taken on the model as loaded back in fp32.
    for name, part in (("unet", unet), ("vae", vae)):
        part.to(torch.float16).save_pretrained(out / name, safe_serialization=True)
    model = load_model(EngineOptions(model=str(out), device="cpu", dtype="fp32"), generation=True)
    contact_sheet(model, out / "samples.png")
    figures = vae_figures(model.vae, seed)
    figures.update(style_separation(model))
    mimic = {**MIMIC, "steps": lora_steps}
    figures.update(lora_figures(model, **mimic))
    recipe = {
        "seed": seed, "resolution": RESOLUTION, "vae_steps": vae_steps, "unet_steps": unet_steps,
        "vae_crop": VAE_CROP, "kl_weight": KL_WEIGHT, "base_photos": list(BASE), "held_out_photos": list(HELD_OUT),
        "families": list(PRETRAINING_FAMILIES), "captions": CAPTIONS,
        "vae_parameters": sum(p.numel() for p in vae.parameters()),
        "unet_parameters": sum(p.numel() for p in unet.parameters()),
        "scaling_factor": scale, "mimic": mimic, "figures": figures,
        "build_seconds": round(time.monotonic() - started), "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }
    (out / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
    return recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--vae-steps", type=int, default=3000)
    parser.add_argument("--unet-steps", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lora-steps", type=int, default=MIMIC["steps"], help="the mimic's LoRA steps per style")
    args = parser.parse_args()
    recipe = build(args.out, args.vae_steps, args.unet_steps, args.seed, args.lora_steps,
                   log=lambda line: print(line, flush=True))
    print(json.dumps(recipe["figures"], indent=2))


if __name__ == "__main__":
    main()
