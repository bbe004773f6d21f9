"""A tiny Stable-Diffusion-shaped model, built from config with random weights.

No weights can be downloaded in CI, and ``fixative demo`` must run without
Stable Diffusion on disk, so both build this instead: a UNet with cross
attention, a VAE that downsamples 8x like SD's, a CLIP text encoder, a CLIP
tokenizer with a vocabulary written here, and a DDPM scheduler config. It is
saved with ``save_pretrained`` (safetensors) in the diffusers folder layout, so
it is loaded through exactly the same code as a real model.

An untrained UNet predicts roughly the same thing whatever its input, so every
perturbation scores a protection gain near 1.0 on it. :func:`train_tiny_model`
fixes that: it trains the UNet to denoise, on several families of synthetic
images (:mod:`fixative.engine.synthetic`), half of them JPEG-compressed as web images
are. A model trained on one narrow family would
rate every perturbation as huge and every codec as devastating (gains of
4-6, measured on one trained on a single family). It is still not Stable Diffusion:
bench/README.md says what it can and cannot show.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from fixative.engine.synthetic import family_images, pretraining_set

# UNet sample size 16 latents -> 128 px training resolution, small enough to
# train on two CPU cores in about a minute.
TINY_LATENT_SIZE = 16
TEXT_DIM = 32
PER_FAMILY = 64  # pre-training images per family: 384 in all, at 128 px
TRAINING_STEPS = 600  # the UNet's, for the tests and the bench alike: the model their figures are measured on


def recipe_key() -> str:
    """A name for the trained model that changes with its recipe: this module's and fixative.engine.synthetic's code, and the steps.

    The tests and the bench cache the trained model under it, so each reuses what the other trained.
    """
    recipe = Path(__file__).read_bytes() + Path(__file__).with_name("synthetic.py").read_bytes()
    return hashlib.sha256(recipe + str(TRAINING_STEPS).encode()).hexdigest()[:12]


def _byte_vocab() -> tuple[dict[str, int], list[str]]:
    """A byte-level BPE vocabulary with no merges: every byte is a token.

    CLIP's tokenizer maps bytes to printable unicode characters and marks the
    last character of a word with ``</w>``; both forms are needed.
    """
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    chars = [chr(b) for b in printable]
    shift = 0
    for b in range(256):
        if b not in printable:
            chars.append(chr(256 + shift))
            shift += 1
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    return {token: i for i, token in enumerate(tokens)}, ["#version: 0.2"]


def tiny_unet(seed: int = 0) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=TINY_LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=8,
        norm_num_groups=16,
    )


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    torch.manual_seed(seed)
    # Four blocks -> three downsamplings -> 8x, as in SD's VAE.
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(16, 16, 32, 32),
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=TINY_LATENT_SIZE * 8,
    )


def build_tiny_model(folder: Path, seed: int = 0) -> Path:
    """Write a random tiny SD-shaped model into ``folder`` (diffusers layout) and return it."""
    unet, vae = tiny_unet(seed), tiny_vae(seed)
    torch.manual_seed(seed)  # the text encoder's draws
    text_config = dict(hidden_size=TEXT_DIM, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    return save_model_folder(folder, unet, vae, text_config)


def save_model_folder(folder: Path, unet: UNet2DConditionModel, vae: AutoencoderKL, text_config: dict) -> Path:
    """Save an SD-shaped model in the diffusers folder layout that ``fixative.engine.model.load_model`` reads.

    The parts given, plus what every such model needs: the byte-level CLIP
    tokenizer, a CLIP text encoder of ``text_config`` with random weights from
    torch's global generator (seed it first), SD's DDPM scheduler and
    ``model_index.json``. The tiny model and the bench's full-scale SD-1.5
    (bench/sd15.py) are both written by this.
    """
    folder = Path(folder)
    vocab, merges = _byte_vocab()
    tokenizer_dir = folder / "tokenizer"
    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    (tokenizer_dir / "vocab.json").write_text(json.dumps(vocab))
    (tokenizer_dir / "merges.txt").write_text("\n".join(merges) + "\n")
    CLIPTokenizer.from_pretrained(tokenizer_dir, model_max_length=77).save_pretrained(tokenizer_dir)

    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            max_position_embeddings=77,
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=vocab["<|endoftext|>"],
            pad_token_id=vocab["<|endoftext|>"],
            **text_config,
        )
    )
    text_encoder.save_pretrained(folder / "text_encoder", safe_serialization=True)
    unet.save_pretrained(folder / "unet", safe_serialization=True)
    vae.save_pretrained(folder / "vae", safe_serialization=True)
    DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000).save_pretrained(
        folder / "scheduler"
    )
    (folder / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusionPipeline",
                "_diffusers_version": "0.30.0",
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "scheduler": ["diffusers", "DDPMScheduler"],
            },
            indent=2,
        )
    )
    return folder


def synthetic_paintings(count: int, size: int, seed: int = 0) -> torch.Tensor:
    """Test paintings: the "fields" family of :mod:`fixative.engine.synthetic` (smooth colour fields, hard-edged strokes)."""
    return family_images("fields", count, size, seed)


def train_tiny_model(folder: Path, steps: int, seed: int = 0) -> None:
    """Set the VAE's latent scale, then teach the UNet noise prediction, on the pre-training families; save in place."""
    images = pretraining_set(PER_FAMILY, TINY_LATENT_SIZE * 8, seed)
    calibrate_latent_scale(folder, images)
    train_tiny_unet(folder, images, steps, seed=seed)


def calibrate_latent_scale(folder: Path, images: torch.Tensor) -> None:
    """Set the VAE's scaling factor to 1 / std of its latents, the rule that gave SD 1.x its 0.18215.

    The tiny VAE keeps its random weights, on purpose. Its latents have a std
    near 0.2, so SD's 0.18215 left the UNet latents of std 0.04, drowned by
    the diffusion noise at all but the smallest t. And a random encoder is, like
    SD's detail-preserving one, about as sensitive to fine detail as to coarse;
    a briefly trained tiny VAE was not (it could only reconstruct the coarse
    image, 13 dB), and rated every perturbation as surviving JPEG.
    bench/README.md ("The measuring model") has the figures.
    """
    vae = AutoencoderKL.from_pretrained(folder / "vae")
    with torch.no_grad():
        latents = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in images.split(64)])
    vae.register_to_config(scaling_factor=float(1 / latents.std()))
    vae.save_pretrained(folder / "vae", safe_serialization=True)


def train_tiny_unet(folder: Path, images: torch.Tensor, steps: int, batch: int = 16, seed: int = 0) -> None:
    """Teach the tiny UNet noise prediction on ``images``' latents (posterior samples, as SD was trained)."""
    torch.manual_seed(seed)
    folder = Path(folder)
    vae = AutoencoderKL.from_pretrained(folder / "vae").eval()
    unet = UNet2DConditionModel.from_pretrained(folder / "unet").train()
    scheduler = DDPMScheduler.from_pretrained(folder / "scheduler")
    alphas = scheduler.alphas_cumprod
    with torch.no_grad():
        posteriors = [vae.encode(chunk).latent_dist for chunk in images.split(64)]
    mean = torch.cat([p.mean for p in posteriors]) * vae.config.scaling_factor
    std = torch.cat([p.std for p in posteriors]) * vae.config.scaling_factor
    # Condition on the engine's default prompt, as the attacks will.
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    text_encoder = CLIPTextModel.from_pretrained(folder / "text_encoder")
    ids = tokenizer("a painting", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        context = text_encoder(ids)[0]
    optimiser = torch.optim.AdamW(unet.parameters(), lr=2e-3)
    for _ in range(steps):
        pick = torch.randint(0, len(mean), (batch,))
        z = mean[pick] + std[pick] * torch.randn_like(mean[pick])
        t = torch.randint(0, scheduler.config.num_train_timesteps, (batch,))
        noise = torch.randn_like(z)
        a = alphas[t].view(-1, 1, 1, 1)
        z_t = a.sqrt() * z + (1 - a).sqrt() * noise
        loss = F.mse_loss(unet(z_t, t, context.expand(batch, -1, -1)).sample, noise)
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        optimiser.step()
    unet.eval().save_pretrained(folder / "unet", safe_serialization=True)
