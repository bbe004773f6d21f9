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

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, field_validator, model_validator

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
    models: tuple[str, ...] | None = Field(
        None,
        min_length=2,
        description="Several models to protect against at once (fixative.engine.ensemble), each as ``model`` is "
        "given, or a VAE folder alone; ``model`` is then the first of them. One model is given as ``model``.",
    )
    # sds, maximising: at full SD-1.5 scale on the CPU, 2.7x faster per image than
    # the reference AdvDM loop, report included, with a stronger protection after JPEG
    # on the tiny trained model (bench/README.md). advdm stays available as the paper's method.
    mode: Mode = "sds"
    strength: int = Field(8, ge=1, le=32, description="L-infinity budget in 0-255 levels, or a preset name.")
    budget: Literal["uniform", "perceptual"] = Field(
        "uniform",
        description="How the strength is spent: uniform moves every R, G and B value up to the strength; perceptual "
        "keeps the same bound but gives colour a quarter of brightness's share and flat areas a quarter of busy "
        "ones', where the eye sees change least (fixative.engine.budget; bench/README.md, \"Perceptual budget\").",
    )
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

    @model_validator(mode="before")
    @classmethod
    def _members(cls, data: object) -> object:
        """``models = [A]`` is ``model = A``; with several, ``model`` names the first, or is left out.

        So a one-member list protects, and fingerprints, exactly as ``model``
        does, and a dump of these options validates again unchanged.
        """
        if not isinstance(data, dict) or data.get("models") is None:
            return data
        members = list(data["models"])
        if not members:
            raise ValueError("models: give at least one model")
        if "model" in data and data["model"] != members[0]:
            raise ValueError(f"models: give either model or models, not both (model is {data['model']!r})")
        if len(set(members)) != len(members):
            raise ValueError(f"models: a model is listed twice ({members})")
        return {**data, "model": members[0], "models": None if len(members) == 1 else members}

    @property
    def members(self) -> tuple[str, ...]:
        """The models the perturbation is made against: ``models``, or ``model`` alone."""
        return self.models or (self.model,)

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
        ``models`` unset and the ``uniform`` budget are left out, so that a
        fingerprint does not depend on those options existing: folders
        protected before the settings gained them, whose images these values
        give byte for byte, are not protected again.
        """
        exclude = {"device"} | ({"models"} if self.models is None else set()) | (
            {"budget"} if self.budget == "uniform" else set())
        payload = self.model_dump(mode="json", exclude=exclude)
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]
