"""fixative.engine.model.load_model through its real loading path: folders, HF cache ids, refusals, devices, dtypes."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from fixative.engine.errors import ModelError, UnsupportedDevice
from fixative.engine.model import LoadedModel, assemble_model, load_model
from fixative.engine.model_files import resolve_model_folder
from fixative.engine.options import EngineOptions

FAKE_REVISION = "0123456789abcdef0123456789abcdef01234567"

# Paths whose opening the audit hook records: "refused" must mean never opened, not opened and then rejected.
_WATCHED: set[str] = set()
_OPENED: list[str] = []


def _record_opens(event: str, args: tuple) -> None:
    if event == "open" and _WATCHED and args and isinstance(args[0], (str, bytes, Path)):
        if str(Path(args[0] if not isinstance(args[0], bytes) else args[0].decode()).absolute()) in _WATCHED:
            _OPENED.append(str(args[0]))


sys.addaudithook(_record_opens)  # audit hooks cannot be removed; it does nothing unless _WATCHED is set


@pytest.fixture
def watch_opens():
    """``watch_opens(path)`` starts recording every open() of path; returns the list of recorded opens."""

    def watch(path: Path) -> list[str]:
        _WATCHED.add(str(path.absolute()))
        return _OPENED

    yield watch
    _WATCHED.clear()
    _OPENED.clear()

# A pickle that runs code when loaded with the unrestricted unpickler (it would call os.system("true")).
EVIL_PICKLE = b"\x80\x04cposix\nsystem\nX\x04\x00\x00\x00true\x85R."


def options(model: Path | str, **overrides) -> EngineOptions:
    return EngineOptions(model=str(model), device="cpu", **overrides)


@pytest.fixture(scope="module")
def fp32_model(tiny_model: Path) -> LoadedModel:
    return load_model(options(tiny_model, dtype="fp32"))


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty Hugging Face cache in tmp_path, with the hub told to stay offline."""
    home = tmp_path / "hf-home"
    cache = home / "hub"
    cache.mkdir(parents=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads these once at import; patch the resolved constant too.
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_diffusers_folder_loads_with_geometry_from_its_config(fp32_model: LoadedModel, tiny_model: Path) -> None:
    model = fp32_model
    # tiny: UNet sample_size 16 latents, VAE with 4 blocks (8x) -> 128 px; UNet 2 blocks (2x) -> multiple 16.
    assert model.resolution == 128
    assert model.size_multiple == 16
    assert model.device == torch.device("cpu")
    assert model.dtype == torch.float32
    assert next(model.vae.parameters()).dtype == torch.float32
    assert next(model.unet.parameters()).dtype == torch.float32
    assert model.prediction_type == "epsilon"
    assert model.num_train_timesteps == 1000
    assert model.alphas_cumprod.dtype == torch.float32
    # Read from the VAE's config, not diffusers' SD default: the tiny model sets its own (engine.tiny).
    configured = json.loads((tiny_model / "vae" / "config.json").read_text())["scaling_factor"]
    assert model.scaling_factor == pytest.approx(configured) and configured != pytest.approx(0.18215)
    # The prompt was embedded (CLIP-shaped: 77 tokens x hidden size 32), and weights are frozen.
    assert tuple(model.text_embedding.shape) == (1, 77, 32)
    assert not any(p.requires_grad for p in model.unet.parameters())
    assert not any(p.requires_grad for p in model.vae.parameters())
    assert Path(model.source) == tiny_model


def test_prompt_changes_the_text_embedding(fp32_model: LoadedModel, tiny_model: Path) -> None:
    other = load_model(options(tiny_model, dtype="fp32", prompt="a photograph of a cat"))
    assert not torch.equal(other.text_embedding, fp32_model.text_embedding)


@pytest.mark.parametrize("suffix", [".ckpt", ".bin", ".pt", ".pth", ".CKPT"])
def test_pickle_checkpoints_are_refused_before_anything_is_read(tmp_path: Path, suffix: str, watch_opens) -> None:
    checkpoint = tmp_path / f"model{suffix}"
    checkpoint.write_bytes(EVIL_PICKLE)
    opened = watch_opens(checkpoint)
    with pytest.raises(ModelError, match="pickle"):
        load_model(options(checkpoint))
    assert opened == []


@pytest.mark.parametrize("name", ["model.pth.tar", "model", "model.safetensors.bak"])
def test_other_single_files_are_not_handed_to_a_pickle_loader(tmp_path: Path, name: str, watch_opens) -> None:
    """Only .safetensors single files are safe. Anything else that is a file (a pickle renamed
    .pth.tar, no suffix at all, a backup copy) must be refused without being opened: diffusers'
    from_single_file falls back to torch.load for every non-.safetensors file."""
    checkpoint = tmp_path / name
    checkpoint.write_bytes(EVIL_PICKLE)
    opened = watch_opens(checkpoint)
    with pytest.raises(ModelError, match="safetensors"):
        load_model(options(checkpoint))
    assert opened == [], "the file was opened by a loader"


def test_pickle_refused_even_when_missing(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="pickle"):
        resolve_model_folder(str(tmp_path / "nowhere.ckpt"))


def test_missing_local_path_says_so(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelError, match="does not exist"):
        load_model(options(missing))
    with pytest.raises(ModelError, match="does not exist"):
        load_model(options(tmp_path / "no-such-model.safetensors"))


def test_a_folder_that_is_not_stable_diffusion_is_refused(tmp_path: Path, tiny_model: Path) -> None:
    folder = tmp_path / "not-sd"
    folder.mkdir()
    shutil.copytree(tiny_model / "vae", folder / "vae")
    (folder / "README.md").write_text("just a VAE")
    with pytest.raises(ModelError, match="unet"):
        load_model(options(folder))


def test_hugging_face_id_resolves_from_the_local_cache(hf_cache: Path, tiny_model: Path) -> None:
    repo = hf_cache / "models--tiny-org--tiny-sd"
    snapshot = repo / "snapshots" / FAKE_REVISION
    shutil.copytree(tiny_model, snapshot, ignore=shutil.ignore_patterns("trained"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(FAKE_REVISION)

    assert resolve_model_folder("tiny-org/tiny-sd") == snapshot
    model = load_model(options("tiny-org/tiny-sd"))
    assert model.resolution == 128 and model.size_multiple == 16
    assert Path(model.source) == snapshot


def test_hugging_face_id_not_in_cache_says_how_to_pull(hf_cache: Path) -> None:
    with pytest.raises(ModelError) as caught:
        load_model(options("some-org/not-downloaded"))
    message = str(caught.value)
    assert "fixative model pull some-org/not-downloaded" in message
    # `fixative run` reads this too, and has no --model flag: the flag is named with its command.
    assert "`[engine] model`" in message and message.count("--model") == message.count("fixative protect --model") == 1


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_when_unavailable_is_unsupported(tiny_model: Path) -> None:
    with pytest.raises(UnsupportedDevice, match="cuda"):
        load_model(EngineOptions(model=str(tiny_model), device="cuda"))


def test_fp16_on_cpu_is_unsupported(tiny_model: Path) -> None:
    with pytest.raises(UnsupportedDevice, match="fp16"):
        load_model(options(tiny_model, dtype="fp16"))


def test_bf16_on_cpu_loads_unet_and_vae_in_bf16(tiny_model: Path) -> None:
    model = load_model(options(tiny_model, dtype="bf16"))
    assert model.dtype == torch.bfloat16
    assert next(model.unet.parameters()).dtype == torch.bfloat16
    assert model.vae.dtype == torch.bfloat16
    assert model.text_embedding.dtype == torch.bfloat16
    # The schedule stays fp32 (bf16 cannot tell 1 - a_t apart near t = 0).
    assert model.alphas_cumprod.dtype == torch.float32


# Flags lines as /proc/cpuinfo prints them (shortened): an AMD Zen 4 with AVX512-BF16, a Sapphire
# Rapids with AMX, and an Ice Lake with AVX-512 but no bf16 instructions.
ZEN4_FLAGS = "flags\t\t: fpu sse sse2 avx2 avx512f avx512bw avx512_bf16 avx512_vnni vaes\n"
SAPPHIRE_RAPIDS_FLAGS = "flags\t\t: fpu sse sse2 avx2 avx512f avx512bw amx_bf16 amx_tile amx_int8\n"
ICE_LAKE_FLAGS = "flags\t\t: fpu sse sse2 avx2 avx512f avx512bw avx512_vnni avx512_vbmi2\n"


@pytest.mark.parametrize(
    ("cpuinfo", "dtype"),
    [
        (ZEN4_FLAGS, torch.bfloat16),
        (SAPPHIRE_RAPIDS_FLAGS, torch.bfloat16),
        (ICE_LAKE_FLAGS, torch.float32),
        (None, torch.float32),  # no /proc/cpuinfo (not Linux): stay in fp32
    ],
)
@pytest.mark.parametrize("mode", ["sds", "advdm"])  # the UNet's forward alone, and with its backward
def test_auto_dtype_on_cpu_is_bf16_where_the_cpu_computes_it_natively(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cpuinfo: str | None, dtype: torch.dtype, mode: str
) -> None:
    import fixative.engine.model

    fake = tmp_path / "cpuinfo"
    if cpuinfo is not None:
        fake.write_text("processor\t: 0\n" + cpuinfo)
    monkeypatch.setattr(fixative.engine.model, "CPUINFO", fake)
    model = load_model(options(tiny_model, mode=mode))  # dtype defaults to auto
    assert EngineOptions().dtype == "auto"
    # Measured on such a CPU: the VAE 2x faster in bf16, the UNet's forward 1.6x
    # and its forward and backward 1.7x (bench/README.md, "Precision on the CPU").
    assert (model.vae.dtype, model.dtype) == (dtype, dtype)


def test_assemble_model_is_the_loader_s_last_step(tiny_model: Path, fp32_model: LoadedModel) -> None:
    """Parts built elsewhere (bench/sd15.py builds SD-1.5's in memory) become the same model the loader gives."""
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel

    vae = AutoencoderKL.from_pretrained(tiny_model, subfolder="vae")
    unet = UNet2DConditionModel.from_pretrained(tiny_model, subfolder="unet")
    config = dict(DDPMScheduler.from_pretrained(tiny_model, subfolder="scheduler").config)
    model = assemble_model(
        vae, unet, config, fp32_model.text_embedding, options(tiny_model, dtype="bf16", low_vram=True), source="parts"
    )
    assert (model.vae.dtype, model.dtype, model.text_embedding.dtype) == (torch.bfloat16,) * 3
    assert (model.resolution, model.size_multiple, model.source) == (128, 16, "parts")
    assert torch.equal(model.alphas_cumprod, fp32_model.alphas_cumprod)
    assert model.vae.decoder is None
    assert model.unet.is_gradient_checkpointing and model.vae.encoder.gradient_checkpointing
    assert not any(p.requires_grad for p in model.unet.parameters())
