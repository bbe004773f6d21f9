"""Loading a Stable Diffusion 1.x/2.x model: only the parts the attacks need, once.

Where the model's files are found (a diffusers folder, a single .safetensors
file, or a Hugging Face id in the local cache) is ``fixative.engine.model_files``'s
job, which needs no torch; this module loads what it finds.

The text encoder is used once, to embed the prompt, and then dropped: it would
otherwise hold ~0.5 GB for nothing. ``fixative check`` generates images, so it
asks for ``generation=True``, which keeps the text encoder (behind
``LoadedModel.embed``), the VAE decoder and the scheduler's config.
"""

from __future__ import annotations

import gc
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from fixative.engine.errors import ModelError, UnsupportedDevice
from fixative.engine.model_files import resolve_model_folder
from fixative.engine.options import EngineOptions

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass
class LoadedModel:
    """The frozen surrogate model the attacks differentiate through."""

    vae: torch.nn.Module
    unet: torch.nn.Module
    text_embedding: torch.Tensor  # (1, tokens, dim), the prompt's CLIP embedding, in the UNet's dtype
    alphas_cumprod: torch.Tensor  # (T,), fp32, on the device
    scaling_factor: float  # latents = scaling_factor * (E(x) - shift_factor)
    prediction_type: str  # "epsilon" (SD 1.x, SD 2 base) or "v_prediction" (SD 2.x 768)
    resolution: int  # training side in pixels: 512 for SD 1.5, 768 for SD 2.x
    size_multiple: int  # model-input sides must be multiples of this (64 for SD)
    device: torch.device
    dtype: torch.dtype  # the UNet's dtype; the VAE's is vae.dtype (see pick_dtypes)
    source: str
    # Only with load_model(..., generation=True); the VAE then keeps its decoder too.
    embed: Callable[[str], torch.Tensor] | None = None  # prompt -> (1, tokens, dim), fp32, on the CPU
    scheduler_config: dict | None = None
    shift_factor: float = 0.0  # SD's VAEs have none; 16-channel ones (SD3, Flux.1) do

    @property
    def num_train_timesteps(self) -> int:
        return self.alphas_cumprod.shape[0]


@dataclass
class LoadedVAE:
    """A VAE on its own, frozen: an ensemble member for a family whose denoiser fixative does not run (Flux.1, SD3).

    Only its encoder is kept; the attacks reach such a model through the
    latent it encodes (``fixative.engine.ensemble``).
    """

    vae: torch.nn.Module
    scaling_factor: float  # latents = scaling_factor * (E(x) - shift_factor), as the model's trainers compute them
    shift_factor: float
    resolution: int  # the config's sample_size: the side its model is trained at
    size_multiple: int  # the encoder's downsampling
    device: torch.device
    source: str


def pick_device(name: str) -> torch.device:
    """``auto`` prefers cuda, then Apple's mps, then the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UnsupportedDevice(f"device '{name}' was asked for, but torch sees no CUDA GPU (is the CUDA build of torch installed?)")
    if name.startswith("cuda:") and int(name[5:]) >= torch.cuda.device_count():
        raise UnsupportedDevice(f"device '{name}' was asked for, but torch sees {torch.cuda.device_count()} CUDA GPU(s), "
                                f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UnsupportedDevice("device 'mps' was asked for, but this machine has no Apple GPU available to torch")
    return torch.device(name)


CPUINFO = Path("/proc/cpuinfo")


def _cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: the CPUs on which oneDNN runs bf16 convolutions fast."""
    try:
        flags = CPUINFO.read_text()
    except OSError:  # not Linux: be conservative
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def pick_dtypes(name: str, device: torch.device) -> tuple[torch.dtype, torch.dtype]:
    """(VAE dtype, UNet dtype) for the ``dtype`` option.

    fp16 VAE encoders overflow into NaNs (SDXL's famously does), so an fp16
    run keeps the VAE in fp32; bf16 has fp32's range and is safe there.

    ``auto`` follows what was measured: bf16 wherever the hardware computes it
    natively, a GPU with bf16 or a CPU with AVX512-BF16 or AMX. On such a CPU
    the VAE's convolutions ran 2.1x faster than in fp32, and the UNet's
    forward 1.6x and its forward and backward 1.7x faster (bench/README.md,
    "Precision on the CPU"); bf16 also halves the UNet's 3.4 GB of weights.
    Elsewhere fp32. Protection was the same in bf16 (tiny model).
    """
    if name == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16, torch.bfloat16
        if device.type == "cpu" and _cpu_has_native_bf16():
            return torch.bfloat16, torch.bfloat16
        return torch.float32, torch.float32
    if name == "fp16" and device.type == "cpu":
        raise UnsupportedDevice("fp16 is not supported on the CPU; use bf16 or fp32")
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise UnsupportedDevice("this GPU does not support bf16; use fp16 or fp32")
    unet_dtype = DTYPES[name]
    return (torch.float32 if unet_dtype == torch.float16 else unet_dtype), unet_dtype


def _load_parts(folder: Path, vae_dtype: torch.dtype, unet_dtype: torch.dtype):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.utils import logging as diffusers_logging
    from transformers import CLIPTextModel, CLIPTokenizer
    from transformers.utils import logging as transformers_logging

    # Their per-file "Loading weights" bars would interleave with our own progress bar and logs.
    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    if not (folder / "unet").is_dir() or not (folder / "vae").is_dir():
        raise ModelError(f"{folder} is not a Stable Diffusion diffusers folder (it has no unet/ and vae/ subfolders)")
    try:
        return (
            AutoencoderKL.from_pretrained(folder, subfolder="vae", use_safetensors=True, torch_dtype=vae_dtype),
            UNet2DConditionModel.from_pretrained(folder, subfolder="unet", use_safetensors=True, torch_dtype=unet_dtype),
            CLIPTextModel.from_pretrained(folder, subfolder="text_encoder", use_safetensors=True),
            CLIPTokenizer.from_pretrained(folder, subfolder="tokenizer"),
            DDPMScheduler.from_pretrained(folder, subfolder="scheduler"),
        )
    except (OSError, ValueError, EnvironmentError) as error:
        raise ModelError(f"could not load the model in {folder}: {error}") from error


def _load_single_file(path: Path):
    from diffusers import StableDiffusionPipeline

    try:
        pipe = StableDiffusionPipeline.from_single_file(
            path, local_files_only=True, safety_checker=None, requires_safety_checker=False
        )
    except (OSError, ValueError) as error:
        raise ModelError(
            f"could not load the single-file checkpoint {path}: {error}. Single files need their model's config in "
            "the local Hugging Face cache; `fixative model pull stable-diffusion-v1-5/stable-diffusion-v1-5` provides it."
        ) from error
    return pipe.vae, pipe.unet, pipe.text_encoder, pipe.tokenizer, pipe.scheduler


def load_model(options: EngineOptions, generation: bool = False) -> LoadedModel:
    """Load the VAE, UNet and scheduler, embed ``options.prompt``, and drop the text encoder.

    ``generation`` keeps what sampling images needs (``fixative check``): the
    text encoder (on the CPU) behind ``embed``, the VAE decoder and the scheduler's config.
    """
    vae_dtype, dtype = pick_dtypes(options.dtype, pick_device(options.device))
    path = resolve_model_folder(options.model)
    if path.is_file():
        vae, unet, text_encoder, tokenizer, scheduler = _load_single_file(path)
    else:
        vae, unet, text_encoder, tokenizer, scheduler = _load_parts(path, vae_dtype, dtype)

    embed = _embedder(tokenizer, text_encoder)
    decoder = vae.decoder
    model = assemble_model(vae, unet, dict(scheduler.config), embed(options.prompt), options, source=str(path))
    if not generation:
        del text_encoder, tokenizer, embed, decoder
        gc.collect()
        return model
    # assemble_model moved the whole VAE, this decoder included, before it dropped it.
    model.vae.decoder = decoder
    model.embed = embed
    model.scheduler_config = dict(scheduler.config)
    return model


def _embedder(tokenizer, text_encoder) -> Callable[[str], torch.Tensor]:
    @torch.no_grad()
    def embed(prompt: str) -> torch.Tensor:
        ids = tokenizer(
            prompt, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids
        return text_encoder(ids)[0]

    return embed


def assemble_model(
    vae: torch.nn.Module,
    unet: torch.nn.Module,
    scheduler_config: dict,
    text_embedding: torch.Tensor,
    options: EngineOptions,
    *,
    source: str,
) -> LoadedModel:
    """Turn a VAE, a UNet, a scheduler config and a prompt embedding into the frozen model the attacks use.

    Everything that happens after the parts are read lives here (device and
    dtypes, freezing, low-VRAM checkpointing, the geometry read off the
    configs), so that bench/sd15.py, which builds SD-1.5's parts in memory,
    measures exactly what a loaded model costs.
    """
    from diffusers import DDPMScheduler

    device = pick_device(options.device)
    if device.type == "cuda" and device.index is not None:
        # One engine per GPU: what takes no device (empty_cache, the bf16 check,
        # a library's default) must mean this engine's GPU, not cuda:0.
        torch.cuda.set_device(device)
    vae_dtype, dtype = pick_dtypes(options.dtype, device)
    # Single-file checkpoints arrive in fp32; folders were loaded in the right dtype already.
    vae = vae.to(device=device, dtype=vae_dtype) if vae.dtype != vae_dtype else vae.to(device)
    unet = unet.to(device=device, dtype=dtype) if unet.dtype != dtype else unet.to(device)
    vae.decoder = None  # never used: attacks only encode (0.2 GB of fp32 weights)
    vae.eval().requires_grad_(False)
    unet.eval().requires_grad_(False)
    if options.low_vram:
        # Recompute activations in the backward pass instead of keeping them.
        # (Setting the attribute on vae.encoder directly fails in current diffusers.)
        vae.enable_gradient_checkpointing()
        unet.enable_gradient_checkpointing()
    # Training noise schedule: a single file's pipeline may carry a sampling
    # scheduler (PNDM), whose config holds the same betas; DDPM reads them the same way.
    scheduler = DDPMScheduler.from_config(scheduler_config)
    vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
    unet_scale = 2 ** (len(unet.config.block_out_channels) - 1)
    return LoadedModel(
        vae=vae,
        unet=unet,
        text_embedding=text_embedding.to(device=device, dtype=dtype),
        alphas_cumprod=scheduler.alphas_cumprod.to(device=device, dtype=torch.float32),
        scaling_factor=float(vae.config.scaling_factor),
        shift_factor=float(vae.config.shift_factor or 0.0),
        prediction_type=scheduler_config.get("prediction_type", "epsilon"),
        resolution=int(unet.config.sample_size) * vae_scale,
        size_multiple=vae_scale * unet_scale,
        device=device,
        dtype=dtype,
        source=source,
    )


def is_vae_folder(path: Path) -> bool:
    """A VAE alone: an AutoencoderKL ``config.json`` at the top, as in a diffusers model's ``vae/`` subfolder."""
    config = path / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text()).get("_class_name") == "AutoencoderKL"
    except (OSError, ValueError):
        return False


def load_vae(folder: Path, options: EngineOptions) -> LoadedVAE:
    """Load the encoder of the VAE in ``folder`` (see :func:`is_vae_folder`), frozen, on the options' device.

    Its ``scaling_factor`` and ``shift_factor`` come from its config: 4-channel
    SD VAEs have no shift, 16-channel ones do (SD3 1.5305 and 0.0609, Flux.1
    0.3611 and 0.1159).
    """
    from diffusers import AutoencoderKL

    device = pick_device(options.device)
    vae_dtype, _ = pick_dtypes(options.dtype, device)
    try:
        vae = AutoencoderKL.from_pretrained(folder, use_safetensors=True, torch_dtype=vae_dtype)
    except (OSError, ValueError, EnvironmentError) as error:
        raise ModelError(f"could not load the VAE in {folder}: {error}") from error
    vae.decoder = None  # the attacks only encode
    vae = vae.to(device).eval().requires_grad_(False)
    if options.low_vram:
        vae.enable_gradient_checkpointing()
    sample_size = vae.config.sample_size
    return LoadedVAE(
        vae=vae,
        scaling_factor=float(vae.config.scaling_factor),
        shift_factor=float(vae.config.shift_factor or 0.0),
        resolution=int(sample_size[0] if isinstance(sample_size, (list, tuple)) else sample_size),
        size_multiple=2 ** (len(vae.config.block_out_channels) - 1),
        device=device,
        source=str(folder),
    )

