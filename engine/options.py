"""What the engine can be asked to do. Pure pydantic: importing this never imports torch.

The daemon nests :class:`EngineOptions` as its ``[engine]`` settings table, and
``fixative protect`` builds one from its flags, so both entry points validate
the same way.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator

# Named budgets in 0-255 levels (L-infinity). A budget of s levels bounds PSNR from
# below by 20*log10(255/s): 36 dB at 4, 30 dB at 8, 24 dB at 16; sign-PGD moves most
# pixels close to the bound. The report gives the measured value for each image.
STRENGTH_PRESETS = {"subtle": 4, "balanced": 8, "strong": 16}

DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"

Mode = Literal["advdm", "mist", "sds", "encoder"]
# "cuda:1": one GPU of several, for one engine per GPU (the daemon's [engine] devices).
Device = Annotated[str, StringConstraints(pattern=r"^(auto|cpu|mps|cuda(:[0-9]+)?)$")]
DType = Literal["auto", "fp32", "fp16", "bf16"]
OutputFormat = Literal["png", "jpeg", "webp"]


class EngineOptions(BaseModel):
    """Everything that decides how an image is protected."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(
        DEFAULT_MODEL,
        description="A local diffusers folder, a single-file .safetensors checkpoint, "
        "or a Hugging Face id already in the local cache.",
    )
    # sds, maximising: at full SD-1.5 scale on the CPU, 2.7x faster per image than
    # the reference AdvDM loop, report included, with a stronger protection after JPEG
    # on the tiny trained model (bench/README.md). advdm stays available as the paper's method.
    mode: Mode = "sds"
    strength: int = Field(8, ge=1, le=32, description="L-infinity budget in 0-255 levels, or a preset name.")
    step_size: float = Field(1.0, gt=0, le=32, description="PGD step in 0-255 levels.")
    steps: int = Field(100, ge=1, le=10_000)
    robust: bool = Field(
        True,
        description="Optimise through the publishing pipeline (JPEG, platform downscale, a little noise or blur; "
        "fixative.engine.transforms), so the protection survives being posted. False optimises the lossless "
        "file only: stronger on the PNG, mostly gone after a JPEG.",
    )
    coarse_to_fine: bool = Field(
        True,
        description="With robust on: run the first half of the steps at half the working side (a quarter of the "
        "work per step), then refine at the working size. PGD takes 0.6x the time at full SD-1.5 scale on a CPU, "
        "for the same protection within noise on the tiny measuring model (bench/README.md, \"Coarse to fine\").",
    )
    samples_per_step: int = Field(
        1, ge=1, le=64, description="(t, eps) pairs averaged per PGD step, for one VAE encode (advdm, mist, sds)."
    )
    seed: int = 0
    prompt: str = "a painting"
    device: Device = "auto"
    dtype: DType = Field(
        "auto",
        description="Model precision; auto picks what measured fastest on this hardware (see "
        "fixative.engine.model.pick_dtypes). The perturbation itself is always fp32.",
    )
    low_vram: bool = Field(
        False,
        description="Fit a 6 GB GPU: gradient checkpointing, and a split backward so encoder and UNet "
        "activations never coexist. Slower (about one more encoder pass per step).",
    )
    target: Path | None = Field(None, description="Target image for mist/encoder; None uses the built-in texture.")
    texture_weight: float = Field(1.0, ge=0, description="mist: weight of the textural term against the semantic one.")
    sds_direction: Literal["minimize", "maximize"] = "maximize"
    format: OutputFormat = "png"
    quality: int = Field(95, ge=1, le=100, description="JPEG/WebP quality; ignored for PNG.")

    @field_validator("strength", mode="before")
    @classmethod
    def _preset(cls, value: object) -> object:
        if not isinstance(value, str):
            return value
        name = value.strip().lower()
        if name in STRENGTH_PRESETS:
            return STRENGTH_PRESETS[name]
        if not name.lstrip("+-").isdigit():  # a misspelt preset: say which names there are
            raise ValueError(f"must be a number of levels or one of {', '.join(STRENGTH_PRESETS)} (got {value!r})")
        return value

    def fingerprint(self) -> str:
        """A short hash of every option that changes the output image.

        The device is left out on purpose: moving from cuda to cpu should not
        re-protect a folder that is already done. The job store keys jobs on
        (content sha256, fingerprint), so changed settings make new jobs.
        """
        payload = self.model_dump(mode="json", exclude={"device"})
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
