"""The full Stable Diffusion 1.5 architecture, built from config with random weights.

Random weights cost exactly what the real ones cost: the same layers, the same
shapes, the same FLOPs and activations. So the benchmark needs no download.

The configs below are written out by hand from the public SD-1.5 configs
(``unet/config.json``, ``vae/config.json`` and ``scheduler/scheduler_config.json``
of stable-diffusion-v1-5): every key that changes the architecture is spelled
out, so a change in diffusers' defaults cannot silently shrink the model.

No text encoder is built: the engine uses CLIP once, to embed the prompt, and
then frees it, so in its place we draw a random (1, 77, 768) embedding.

Nothing is saved to or loaded from disk at this scale (3.4 GB of fp32 UNet
would only measure the disk). The modules are created on the ``meta`` device,
cast to the dtype the run needs, materialised on the target device and
initialised there with PyTorch's default initialisers; no fp32 copy of a bf16
model ever exists, so the peak memory of a run is the run's own.
"""

from __future__ import annotations

import torch

UNET_CONFIG = dict(
    sample_size=64,  # latents, 512 px / 8
    in_channels=4,
    out_channels=4,
    center_input_sample=False,
    flip_sin_to_cos=True,
    freq_shift=0,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    mid_block_type="UNetMidBlock2DCrossAttn",
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    only_cross_attention=False,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    downsample_padding=1,
    mid_block_scale_factor=1,
    act_fn="silu",
    norm_num_groups=32,
    norm_eps=1e-5,
    cross_attention_dim=768,
    attention_head_dim=8,
    use_linear_projection=False,
)

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.18215,
)

SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    prediction_type="epsilon",
)

TEXT_TOKENS, TEXT_DIM = 77, 768
# SD-1.5's CLIP ViT-L/14 text encoder, for save_model; its vocabulary is engine.tiny's bytes, not CLIP's 49408 tokens.
TEXT_CONFIG = dict(hidden_size=TEXT_DIM, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, hidden_act="quick_gelu")
EXPECTED_PARAMS = {"unet": 859.5e6, "vae": 83.7e6}


def _materialise(cls, config: dict, device: torch.device, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    with torch.device("meta"):
        module = cls(**config)
    module = module.to(dtype=dtype).to_empty(device=device)
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.manual_seed(seed)
    with torch.no_grad():
        for sub in module.modules():
            if hasattr(sub, "reset_parameters") and any(True for _ in sub.parameters(recurse=False)):
                sub.reset_parameters()  # PyTorch's defaults: kaiming-uniform convs/linears, unit norms
    torch.random.set_rng_state(generator_state)
    buffers = [name for name, _ in module.named_buffers()]
    if buffers:
        raise RuntimeError(f"{cls.__name__} has buffers {buffers} that meta-device building would leave uninitialised")
    return module.eval().requires_grad_(False)


def count_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def build_unet(device: torch.device, dtype: torch.dtype, seed: int = 0) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    return _materialise(UNet2DConditionModel, UNET_CONFIG, device, dtype, seed)


def build_vae(device: torch.device, dtype: torch.dtype, seed: int = 1) -> torch.nn.Module:
    from diffusers import AutoencoderKL

    return _materialise(AutoencoderKL, VAE_CONFIG, device, dtype, seed)


def build_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(**SCHEDULER_CONFIG)


def text_embedding(seed: int = 2) -> torch.Tensor:
    """A stand-in for CLIP's embedding of the prompt: (1, 77, 768), unit-variance like CLIP's last layer."""
    return torch.randn((1, TEXT_TOKENS, TEXT_DIM), generator=torch.Generator().manual_seed(seed))


def load_engine_model(options):
    """An ``engine.model.LoadedModel`` of SD-1.5's architecture, built in memory.

    The parts go through ``engine.model.assemble_model``, the same function
    ``load_model`` hands the parts it reads from disk, so whatever the engine
    does after loading (device and dtype, freezing, low-VRAM checkpointing) is
    measured too. The parts are built directly in the dtypes the engine picks,
    so no fp32 copy of a bf16 model ever exists. Returns ``(model, how)``.
    """
    from fixative.engine.model import assemble_model, pick_device, pick_dtypes

    device = pick_device(options.device)
    vae_dtype, dtype = pick_dtypes(options.dtype, device)
    model = assemble_model(
        build_vae(device, vae_dtype),
        build_unet(device, dtype),
        SCHEDULER_CONFIG,
        text_embedding(),
        options,
        source="<sd15-random-weights>",
    )
    return model, "fixative.engine.model.assemble_model with in-memory SD-1.5 parts"


def save_model(folder, device: torch.device, dtype: torch.dtype):
    """SD-1.5's architecture with random weights in ``dtype``, saved in the diffusers folder layout.

    For a bench that loads the model the way a user's daemon does, through
    ``engine.model.load_model`` (bench/batch_queue.py ``--scale full``). The
    text encoder is CLIP ViT-L's shape over engine.tiny's byte vocabulary.
    """
    from fixative.engine.tiny import save_model_folder

    unet, vae = build_unet(device, dtype), build_vae(device, dtype)
    torch.manual_seed(3)  # the text encoder's draws
    return save_model_folder(folder, unet, vae, TEXT_CONFIG)
