"""Does the protection work? Fine-tune the model on the images as a mimic would, and compare.

The protection gain (``fixative.engine.metrics``) is a proxy: a higher training loss on
one image. What an artist wants to know is whether a mimic who fine-tunes on
the published works gets their style. This module runs the mimic's recipe,
a LoRA on the UNet as diffusers' LoRA text-to-image and DreamBooth scripts
train it (Hu et al., "LoRA", ICLR 2022; rank 4, learning rate 1e-4, adapters
on the attention projections to_q/to_k/to_v/to_out.0, the scripts' resize /
random crop / random flip), once per training set: the clean originals, the
protected copies, and the protected copies as a platform serves them. Every
run starts from the same base weights with the same seed, so the same crops,
flips, timesteps, noise and data order: the training sets are the only
difference.

Each LoRA is then judged against the *originals*:

* **denoising loss** of the fine-tuned UNet on the originals it was trained
  on, and on held-out originals it never saw, over fixed (t, eps) draws. A
  LoRA that learned the style predicts the originals' noise better. The
  fraction of the clean LoRA's improvement over the base model that another
  LoRA achieves is ``learned``: 1.0 learned as much as the clean one, 0.0 no
  more than the base model knew.
* **sample distances** between images generated with fixed seeds and the
  originals, with statistics that need no network beyond the model's own:
  colour histograms (total variation distance) and the style distance
  (:func:`style_distance`: Gram matrices of the pixels and of the VAE
  encoder's features, Gatys et al., CVPR 2016).

and every figure is divided by the clean LoRA's (``ratio``): above 1, the
protected copies taught the style less well than the clean ones.
"""

from __future__ import annotations

import dataclasses
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from fixative.engine.diffusion import denoiser_residual, draw_timesteps_and_noise, encode
from fixative.engine.model import LoadedModel
from fixative.engine.pixels import to_model

# The mimic's recipe, within what the trainers use (diffusers' train_text_to_image_lora.py and
# train_dreambooth_lora.py, kohya-ss: rank 4-32, learning rate 1e-4 to 1e-3). Rank 8 at 5e-4 is the
# recipe under which a LoRA on the measuring model learns a held-out style (6.5-12.8% lower loss in
# 300 steps, bench/README.md); the scripts' rank 4 at 1e-4 learns far less there, so a check run with
# it would call a perturbation "protected" against a mimic that barely trained.
LORA_RANK = 8
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
LEARNING_RATE = 5e-4
BATCH_SIZE = 4
DEFAULT_PROMPT = "a painting in the style of sks"

# Judging.
LOSS_SAMPLES = 16  # (t, eps) draws per original, the same for every LoRA
SAMPLE_COUNT = 4  # images generated per LoRA, seeds SAMPLE_SEED + i
SAMPLE_STEPS = 20  # DDIM steps
GUIDANCE = 7.5  # classifier-free guidance, diffusers' pipeline default
SAMPLE_SEED = 1000
HISTOGRAM_BINS = 32
HOLD_OUT_FROM = 5  # with this many originals or more, one in five is held out of training
STEP_UNITS = 3  # a training step per image, in UNet forwards (see work_units)
DECODE_UNITS = 3

Progress = Callable[[float], None]  # called with units of work done since the last call


def _resize_short_side(x: torch.Tensor, side: int) -> torch.Tensor:
    """The scripts' ``transforms.Resize(resolution)``: short side to ``side``, bilinear, antialiased."""
    height, width = x.shape[-2:]
    scale = side / min(height, width)
    size = (max(side, round(height * scale)), max(side, round(width * scale)))
    return F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)


def _crop_at(x: torch.Tensor, side: int, fy: float, fx: float) -> tuple[int, int]:
    """Top-left corner of a ``side`` square at fractions (fy, fx) in [0, 1) of the free room.

    Drawing fractions rather than pixel offsets keeps the random draws the same
    for every training set, even where a served copy's size differs by a pixel.
    """
    return math.floor(fy * (x.shape[-2] - side + 1)), math.floor(fx * (x.shape[-1] - side + 1))


def _centre_crop(x: torch.Tensor, side: int) -> torch.Tensor:
    top, left = (x.shape[-2] - side) // 2, (x.shape[-1] - side) // 2
    return x[..., top : top + side, left : left + side]


def held_out_indices(count: int) -> list[int]:
    """Which originals are kept out of training: every fifth, once there are enough to spare them."""
    return list(range(HOLD_OUT_FROM - 1, count, HOLD_OUT_FROM)) if count >= HOLD_OUT_FROM else []


def work_units(originals: int, loras: int, steps: int) -> float:
    """How much work :func:`mimicry_check` is, in UNet forwards at batch 1 (for the progress bar and the estimate).

    Counted for SD 1.5 at 512 px (FLOPs from torch's FlopCounterMode): a
    training step is ``batch`` forwards and their backward, which for frozen
    weights costs about one forward more (plus the small LoRA gradients); the
    VAE encodes are cached (see :func:`_train`); a VAE decode is about three
    UNet forwards (2.5 against 0.8 TFLOP).
    """
    training = originals - len(held_out_indices(originals))
    judging = originals * LOSS_SAMPLES + SAMPLE_COUNT * (2 * SAMPLE_STEPS + DECODE_UNITS)
    return loras * steps * min(BATCH_SIZE, training) * STEP_UNITS + (loras + 1) * judging


@torch.no_grad()
def unit_cost(model: LoadedModel) -> tuple[float, float]:
    """(seconds, FLOPs) of one UNet forward at batch 1 at the model's resolution, measured here and now."""
    from torch.utils.flop_counter import FlopCounterMode

    side = model.resolution // (2 ** (len(model.vae.config.block_out_channels) - 1))
    z = torch.zeros(1, model.unet.config.in_channels, side, side, device=model.device, dtype=model.dtype)
    t = torch.tensor([500], device=model.device)
    with FlopCounterMode(display=False) as counter:  # also the warm-up
        model.unet(z, t, model.text_embedding)
    started = time.perf_counter()
    model.unet(z, t, model.text_embedding)
    if model.device.type == "cuda":
        torch.cuda.synchronize(model.device)
    return time.perf_counter() - started, float(counter.get_total_flops())


@contextmanager
def fine_tuned(
    model: LoadedModel, images: list[np.ndarray], steps: int, seed: int, progress: Progress | None = None, *,
    rank: int = LORA_RANK, learning_rate: float = LEARNING_RATE,
) -> Iterator[None]:
    """Train a LoRA on ``images`` into ``model.unet`` for the ``with`` block, then remove it.

    ``model.text_embedding`` is the prompt the LoRA is trained on (see :func:`with_prompt`). ``rank``
    and ``learning_rate``: the mimic's recipe, the scripts' defaults unless a bench tries a stronger mimic.
    """
    from peft import LoraConfig

    unet = model.unet
    # As the scripts do: gaussian init of A, zero B, so training starts from the base model exactly.
    unet.add_adapter(
        LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=LORA_TARGETS),
        adapter_name="mimic",
    )
    try:
        params = [p for p in unet.parameters() if p.requires_grad]
        for p in params:  # the scripts keep trainable weights in fp32 under mixed precision
            p.data = p.data.float()
        _train(model, params, images, steps, seed, progress, learning_rate)
        unet.eval()
        yield
    finally:
        unet.delete_adapters("mimic")
        unet.eval().requires_grad_(False)


def _train(
    model: LoadedModel, params: list[torch.Tensor], images: list[np.ndarray], steps: int, seed: int, progress: Progress | None,
    learning_rate: float,
) -> None:
    side = model.resolution
    resized = [_resize_short_side(to_model(rgb, model.device), side) for rgb in images]
    generator = torch.Generator().manual_seed(seed)  # CPU: the same draws on every device
    optimiser = torch.optim.AdamW(params, lr=learning_rate)
    batch = min(BATCH_SIZE, len(images))
    order: list[int] = []
    # The VAE is frozen, so a crop's posterior is the same every time it is drawn: encode each
    # (image, crop, flip) once. The scripts re-encode every step; the latents are the same.
    posteriors: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
    autocast = torch.autocast(model.device.type, dtype=model.dtype, enabled=model.dtype != torch.float32)
    model.unet.train()
    for _ in range(steps):
        picks = []
        for _ in range(batch):  # reshuffled every epoch, like a DataLoader with shuffle=True
            if not order:
                order = torch.randperm(len(images), generator=generator).tolist()
            picks.append(order.pop())
        means, stds = [], []
        for i, (fy, fx, flip) in zip(picks, torch.rand(batch, 3, generator=generator).tolist()):
            top, left = _crop_at(resized[i], side, fy, fx)
            key = (i, top, left, flip < 0.5)
            if key not in posteriors:
                crop = resized[i][..., top : top + side, left : left + side]
                with torch.no_grad():
                    posteriors[key] = encode(model, crop.flip(-1) if flip < 0.5 else crop)
            means.append(posteriors[key][0])
            stds.append(posteriors[key][1])
        mean, std = torch.cat(means), torch.cat(stds)
        z = mean + std * torch.randn(mean.shape, generator=generator).to(model.device)
        t = torch.randint(0, model.num_train_timesteps, (batch,), generator=generator).to(model.device)
        eps = torch.randn(z.shape, generator=generator).to(model.device)
        with autocast:
            loss = denoiser_residual(model, z, t, eps).square().mean()
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
        if progress:
            progress(batch * STEP_UNITS)


def with_prompt(model: LoadedModel, prompt: str) -> LoadedModel:
    """The same model, conditioned on ``prompt`` (needs ``load_model(..., generation=True)``)."""
    return dataclasses.replace(model, text_embedding=_embedding(model, prompt))


def _embedding(model: LoadedModel, prompt: str) -> torch.Tensor:
    return model.embed(prompt).to(device=model.device, dtype=model.dtype)


@dataclass
class Originals:
    """The originals as the judge sees them: centre-cropped at the model's resolution, their latents and style."""

    pixels: torch.Tensor  # (N, 3, side, side) in [-1, 1]
    latents: torch.Tensor  # (N, C, h, w), posterior means
    style: list[torch.Tensor]  # style_statistics of the set: the VAE is frozen, so once for every LoRA

    @classmethod
    def prepare(cls, model: LoadedModel, images: list[np.ndarray]) -> "Originals":
        side = model.resolution
        pixels = torch.cat([_centre_crop(_resize_short_side(to_model(rgb, model.device), side), side) for rgb in images])
        with torch.no_grad():
            latents = torch.cat([encode(model, x[None])[0] for x in pixels])
        return cls(pixels=pixels, latents=latents, style=style_statistics(model, pixels))


@torch.no_grad()
def denoising_losses(model: LoadedModel, latents: torch.Tensor, progress: Progress | None = None) -> list[float]:
    """Each latent's mean training loss over LOSS_SAMPLES fixed (t, eps) draws."""
    losses = []
    for i, z in enumerate(latents):
        generator = torch.Generator(model.device).manual_seed(SAMPLE_SEED + i)
        t, eps = draw_timesteps_and_noise(model, z[None], LOSS_SAMPLES, [generator])
        squares = [denoiser_residual(model, z[None], t[j : j + 4], eps[j : j + 4]).square() for j in range(0, LOSS_SAMPLES, 4)]
        losses.append(torch.cat(squares).mean().item())
        if progress:
            progress(LOSS_SAMPLES)
    return losses


@torch.no_grad()
def generate(model: LoadedModel, guidance: float, progress: Progress | None = None) -> torch.Tensor:
    """SAMPLE_COUNT images from fixed seeds with DDIM and classifier-free guidance, in [-1, 1].

    Guidance (Ho & Salimans 2022) is what every SD front end samples with, but
    it extrapolates from the unconditional prediction: a model never trained
    on the empty prompt, like the tiny one, needs ``guidance=1`` (none).
    """
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(model.scheduler_config)
    scheduler.set_timesteps(SAMPLE_STEPS)
    side = model.resolution // (2 ** (len(model.vae.config.block_out_channels) - 1))
    shape = (1, model.unet.config.in_channels, side, side)
    context = torch.cat([_embedding(model, ""), model.text_embedding])
    pixels = []
    for i in range(SAMPLE_COUNT):
        generator = torch.Generator().manual_seed(SAMPLE_SEED + i)
        z = (torch.randn(shape, generator=generator) * scheduler.init_noise_sigma).to(model.device)
        for t in scheduler.timesteps:
            both = scheduler.scale_model_input(torch.cat([z, z]), t).to(model.dtype)
            unconditional, conditional = model.unet(both, t, context).sample.float().chunk(2)
            z = scheduler.step(unconditional + guidance * (conditional - unconditional), t, z).prev_sample
            if progress:
                progress(2)
        decoded = model.vae.decode((z / model.scaling_factor).to(model.vae.dtype)).sample.float()
        pixels.append(decoded.clamp(-1, 1))
        if progress:
            progress(DECODE_UNITS)
    return torch.cat(pixels)


def colour_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Total variation distance between the pooled colour histograms of two image sets in [-1, 1], in [0, 1]."""

    def histogram(x: torch.Tensor) -> torch.Tensor:
        channels = x.transpose(0, 1).reshape(x.shape[1], -1).float().cpu()
        counts = torch.stack([torch.histc(c, bins=HISTOGRAM_BINS, min=-1, max=1) for c in channels])
        return counts / counts.sum(dim=1, keepdim=True)

    return float((histogram(a) - histogram(b)).abs().sum(dim=1).mean() / 2)


def gram(features: torch.Tensor) -> torch.Tensor:
    """The mean channel Gram matrix of a set of feature maps (N, C, h, w)."""
    features = features.flatten(2).float()
    return (features @ features.transpose(1, 2) / features.shape[-1]).mean(0)


@torch.no_grad()
def style_statistics(model: LoadedModel, images: torch.Tensor) -> list[torch.Tensor]:
    """The Gram matrices of a set of images in [-1, 1]: of the pixels, and of each encoder block's features.

    Gatys et al. (CVPR 2016, section 2.2) describe a style by the correlations
    between a trained network's feature channels, pooled over positions,
    which keep texture and palette and drop the layout. The pixels' own Gram
    matrix (3 x 3, uncentred) is the colour statistics: the channels' mean
    brightness and how they vary together. Averaged over the set, so a set of
    works is compared as a whole. Only as good as the encoder: a random one
    separates nothing (bench/README.md, "The measuring model").
    """
    features: list[torch.Tensor] = []
    hooks = [block.register_forward_hook(lambda module, args, output: features.append(output.float()))
             for block in model.vae.encoder.down_blocks]
    try:
        model.vae.encoder(images.to(device=model.device, dtype=model.vae.dtype))
    finally:
        for hook in hooks:
            hook.remove()
    return [gram(layer) for layer in [images.to(model.device).float(), *features]]


def style_distance(model: LoadedModel, a: torch.Tensor, b: torch.Tensor) -> float:
    """How far the style of image set ``a`` is from ``b``'s, in [0, 1] (see :func:`statistics_distance`)."""
    return statistics_distance(style_statistics(model, a), style_statistics(model, b))


def statistics_distance(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """The mean over the layers of ||G(a) - G(b)|| / (||G(a)|| + ||G(b)||): symmetric, 0 for the same statistics."""
    distances = [float((ga - gb).norm() / (ga.norm() + gb.norm())) for ga, gb in zip(a, b)]
    return sum(distances) / len(distances)


def judge(
    model: LoadedModel, originals: Originals, held_out: list[int], guidance: float, progress: Progress | None = None
) -> tuple[dict, torch.Tensor]:
    """The figures of ``model`` (with or without a LoRA) against the originals, and its samples."""
    losses = denoising_losses(model, originals.latents, progress)
    trained = [loss for i, loss in enumerate(losses) if i not in held_out]
    pixels = generate(model, guidance, progress)
    figures = {
        "loss_trained_originals": float(np.mean(trained)),
        "loss_held_out_originals": float(np.mean([losses[i] for i in held_out])) if held_out else None,
        "colour_distance": colour_distance(pixels, originals.pixels),
        "style_distance": statistics_distance(style_statistics(model, pixels), originals.style),
    }
    return figures, pixels


FIGURES = ("loss_trained_originals", "loss_held_out_originals", "colour_distance", "style_distance")


def compare(figures: dict, clean: dict, base: dict) -> dict:
    """``figures`` against the clean LoRA's: ratios, and the share of the clean LoRA's learning achieved."""
    ratios = {name: figures[name] / clean[name] if clean[name] else None for name in FIGURES if figures[name] is not None}
    learned = {}
    for name in ("loss_trained_originals", "loss_held_out_originals"):
        gained = None if base[name] is None else base[name] - clean[name]
        learned[name] = (base[name] - figures[name]) / gained if gained and gained > 0 else None
    return {"ratio": ratios, "learned": learned}


def mimicry_check(
    model: LoadedModel,
    originals: list[np.ndarray],
    training_sets: dict[str, list[np.ndarray]],
    steps: int,
    seed: int = 0,
    guidance: float = GUIDANCE,
    progress: Progress | None = None,
    held_out: list[int] | None = None,
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Train one LoRA per training set (``"clean"`` must be one) and judge each against the originals.

    Each training set holds one image per original, in the same order; the
    held-out originals' counterparts are left out of every training set.
    ``held_out``: which originals those are; by default every fifth
    (:func:`held_out_indices`), as an artist's folder has no other order.
    Returns (report, samples per LoRA, with ``"base"`` for the model without one).
    """
    held_out = held_out_indices(len(originals)) if held_out is None else held_out
    judged = Originals.prepare(model, originals)
    base, base_samples = judge(model, judged, held_out, guidance, progress)
    results, samples = {}, {"base": base_samples}
    for name, images in training_sets.items():
        if len(images) != len(originals):
            raise ValueError(f"training set {name!r} has {len(images)} images for {len(originals)} originals")
        training = [image for i, image in enumerate(images) if i not in held_out]
        with fine_tuned(model, training, steps, seed, progress):
            figures, samples[name] = judge(model, judged, held_out, guidance, progress)
        results[name] = figures
    for name, figures in results.items():
        figures.update(compare(figures, results["clean"], base))
    report = {
        "recipe": {
            "lora_rank": LORA_RANK,
            "lora_targets": LORA_TARGETS,
            "learning_rate": LEARNING_RATE,
            "batch_size": min(BATCH_SIZE, len(originals) - len(held_out)),
            "steps": steps,
            "seed": seed,
            "resolution": model.resolution,
            "sample_steps": SAMPLE_STEPS,
            "guidance": guidance,
        },
        "originals": len(originals),
        "held_out": held_out,
        "base": base,
        "loras": results,
    }
    return report, samples
