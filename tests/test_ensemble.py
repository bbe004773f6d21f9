"""One perturbation against several models (fixative.engine.ensemble): real tiny models, loaded through the real loader.

The members are the tiny trained SD-shaped model and a second one built with
another seed (untrained: a member's weights need not be good for the ensemble's
mechanics), and a tiny 16-channel VAE with a shift factor saved as a VAE folder.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image

from conftest import painting
from fixative.daemon.doctor import FAIL, OK, _engine_checks
from fixative.daemon.settings import ConfigError, Settings, load_settings
from fixative.daemon.store import JobStore
from fixative.daemon.worker import Worker
from fixative.engine.diffusion import encode
from fixative.engine.ensemble import EnsembleAttack, load_ensemble, member_attack
from fixative.engine.errors import ModelError
from fixative.engine.model import LoadedVAE
from fixative.engine.options import EngineOptions
from fixative.engine.protect import protect_file
from fixative.engine.tiny import build_tiny_model, tiny_vae

FLUX_SCALE, FLUX_SHIFT = 0.3611, 0.1159


@pytest.fixture(scope="module")
def second_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("second") / "model", seed=1)


@pytest.fixture(scope="module")
def flux_like_vae(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny 16-channel VAE as Flux.1 ships its own: no quant convs, a scale and a shift, saved as a vae/ folder."""
    # Only the arguments: the config's _use_default_values would put the defaults back over Flux's scale and shift.
    arguments = {k: v for k, v in tiny_vae().config.items() if not k.startswith("_")}
    torch.manual_seed(3)
    flux = dict(latent_channels=16, scaling_factor=FLUX_SCALE, shift_factor=FLUX_SHIFT,
                use_quant_conv=False, use_post_quant_conv=False)
    vae = AutoencoderKL(**{**arguments, **flux})
    folder = tmp_path_factory.mktemp("flux") / "vae"
    vae.save_pretrained(folder, safe_serialization=True)
    return folder


def options(*members: Path | str, **changes) -> EngineOptions:
    return EngineOptions(models=[str(m) for m in members], device="cpu", dtype="fp32", steps=4, **changes)


def saved_painting(tmp_path: Path) -> tuple[Path, np.ndarray]:
    rgb = painting(256, 300)
    path = tmp_path / "art.png"
    Image.fromarray(rgb).save(path)
    return path, rgb


def test_two_members_give_a_report_each_and_the_budget_is_exact(tiny_model, second_model, tmp_path) -> None:
    path, rgb = saved_painting(tmp_path)
    before = path.read_bytes()
    chosen = options(tiny_model, second_model)
    ensemble = load_ensemble(chosen)
    result = protect_file(path, ensemble, chosen)

    assert path.read_bytes() == before  # the original is never touched
    saved = np.asarray(Image.open(io.BytesIO(result.data)).convert("RGB"))
    assert np.abs(saved.astype(int) - rgb).max() == chosen.strength == result.report["max_delta"]
    members = result.report["models"]
    assert list(members) == [str(tiny_model), str(second_model)]
    for figures in members.values():
        assert figures["protection_gain"] > 0 and figures["latent_shift"] > 0
        assert set(figures["survival"]) == {"jpeg85", "jpeg75", "half+jpeg75"}
    # Each member scored on its own weights: the two differ.
    assert members[str(tiny_model)]["loss_original"] != members[str(second_model)]["loss_original"]
    assert "protection_gain" not in result.report  # no figure of no model in particular
    json.dumps(result.report)


def test_the_step_follows_the_sum_of_unit_norm_gradients(tiny_model, flux_like_vae) -> None:
    """Each member's gradient, normalised, in its own direction: the VAE member descends toward the target."""
    chosen = options(tiny_model, flux_like_vae, mode="sds")
    ensemble = load_ensemble(chosen)
    shape = (1, 3, 128, 128)
    x = (torch.rand(shape, generator=torch.Generator().manual_seed(0)) * 2 - 1).requires_grad_(True)

    surrogate, _ = EnsembleAttack(ensemble, chosen, shape)(x, [torch.Generator().manual_seed(7)])
    (combined,) = torch.autograd.grad(surrogate.sum(), x)

    expected = torch.zeros_like(x)
    generators = [torch.Generator().manual_seed(7)]  # the same draws, in the same order
    for member in ensemble.members.values():
        attack = member_attack(member, chosen, shape)
        objective, _ = attack(x, generators)
        (gradient,) = torch.autograd.grad(objective.sum(), x)
        expected += (1 if attack.maximize else -1) * gradient / gradient.norm()
    assert [member_attack(m, chosen, shape).maximize for m in ensemble.members.values()] == [True, False]
    torch.testing.assert_close(combined, expected)


def test_a_vae_alone_is_a_member_with_its_scale_and_shift(tiny_model, flux_like_vae, tmp_path) -> None:
    chosen = options(tiny_model, flux_like_vae, mode="advdm")
    ensemble = load_ensemble(chosen)
    vae_member = ensemble.members[str(flux_like_vae)]
    assert isinstance(vae_member, LoadedVAE)
    assert (vae_member.scaling_factor, vae_member.shift_factor) == (FLUX_SCALE, FLUX_SHIFT)
    assert vae_member.vae.decoder is None

    x = torch.rand((1, 3, 128, 128), generator=torch.Generator().manual_seed(1)) * 2 - 1
    mean, _ = encode(vae_member, x)
    raw = AutoencoderKL.from_pretrained(flux_like_vae).encode(x).latent_dist.mean
    assert mean.shape[1] == 16
    torch.testing.assert_close(mean, (raw - FLUX_SHIFT) * FLUX_SCALE)  # as Flux's trainers compute latents

    path, rgb = saved_painting(tmp_path)
    report = protect_file(path, ensemble, chosen).report
    figures = report["models"][str(flux_like_vae)]
    assert "protection_gain" not in figures and figures["latent_shift"] > 0
    assert figures["survival_figure"] == "latent_shift"  # its objective is the encoder's, whatever the mode
    assert report["models"][str(tiny_model)]["survival_figure"] == "protection_gain"
    assert report["max_delta"] <= chosen.strength


def test_a_missing_member_is_named_before_anything_loads(tiny_model, tmp_path, monkeypatch) -> None:
    import fixative.engine.ensemble

    loaded = []
    real = fixative.engine.ensemble.load_model
    monkeypatch.setattr(fixative.engine.ensemble, "load_model", lambda o: loaded.append(o.model) or real(o))
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelError, match=f"model path {missing} does not exist"):
        load_ensemble(options(tiny_model, missing))
    assert loaded == []


def test_the_daemon_fails_the_job_naming_the_missing_member(tiny_model, tmp_path) -> None:
    (tmp_path / "inbox").mkdir()
    settings = Settings(inbox=tmp_path / "inbox", export_dir=tmp_path / "export", state_dir=tmp_path / "state",
                        engine={"model": str(tiny_model), "device": "cpu", "steps": 2})
    store = JobStore(settings.db_path)
    missing = tmp_path / "gone" / "sdxl"
    source = tmp_path / "inbox" / "art.png"
    Image.fromarray(painting(256, 300)).save(source)
    store.enqueue(source, settings.engine.model_copy(update={"models": (str(tiny_model), str(missing))}),
                  inbox=settings.inbox)

    worker = Worker(settings, store, threading.Event())
    job = store.claim(worker.owner, 60)
    worker.handle([job])
    job = store.get(job.id)
    assert job.state == "failed" and str(missing) in job.error
    assert not settings.export_dir.exists() or not any(settings.export_dir.iterdir())
    assert source.exists()


def test_the_members_are_part_of_the_fingerprint() -> None:
    one = EngineOptions(model="/m/a")
    # A single model keeps the fingerprint it had before `models` existed: its folders are not protected again.
    assert one.fingerprint() == "2023edb15643ab53"
    assert EngineOptions(models=["/m/a"]) == one
    both = EngineOptions(models=["/m/a", "/m/b"])
    assert len({one.fingerprint(), both.fingerprint(), EngineOptions(models=["/m/b", "/m/a"]).fingerprint(),
                EngineOptions(models=["/m/a", "/m/c"]).fingerprint()}) == 4
    assert both.members == ("/m/a", "/m/b") and both.model == "/m/a" and one.members == ("/m/a",)
    assert EngineOptions.model_validate(both.model_dump()) == both  # a job's stored options validate again


def test_models_in_the_config_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [n for n in os.environ if n.startswith("FIXATIVE_")]:
        monkeypatch.delenv(name)
    config = tmp_path / "config.toml"
    config.write_text('inbox = "/tmp/i"\nexport_dir = "/tmp/e"\n[engine]\nmodels = ["/m/sd15", "/m/flux-vae"]\n')
    assert load_settings(config).engine.members == ("/m/sd15", "/m/flux-vae")

    config.write_text('inbox = "/tmp/i"\nexport_dir = "/tmp/e"\n[engine]\nmodel = "/m/sd15"\n')
    engine = load_settings(config).engine
    assert (engine.model, engine.models, engine.fingerprint()) == ("/m/sd15", None, EngineOptions(model="/m/sd15").fingerprint())

    config.write_text('inbox = "/tmp/i"\nexport_dir = "/tmp/e"\n[engine]\nmodel = "/m/x"\nmodels = ["/m/a", "/m/b"]\n')
    with pytest.raises(ConfigError, match="engine.*models: give either model or models"):
        load_settings(config)


def test_doctor_checks_every_member(tiny_model, flux_like_vae, tmp_path) -> None:
    missing = tmp_path / "no-such-sdxl"
    settings = Settings(inbox=tmp_path / "inbox", state_dir=tmp_path / "state",
                        engine={"models": [str(tiny_model), str(flux_like_vae), str(missing)], "device": "cpu"})
    lines = [(level, line) for level, line in _engine_checks(settings) if line.startswith("model: ")]
    assert lines == [
        (OK, f"model: {tiny_model} on disk at {tiny_model}"),
        (OK, f"model: {flux_like_vae} on disk at {flux_like_vae}"),
        (FAIL, f"model: model path {missing} does not exist"),
    ]


def test_protect_takes_model_more_than_once(tiny_model, second_model, tmp_path) -> None:
    """The real command, in a subprocess: two --model flags make one ensemble, with a line per member."""
    path, rgb = saved_painting(tmp_path)
    config = tmp_path / "config.toml"
    config.write_text(f'[engine]\nmodel = "{tiny_model}"\ndevice = "cpu"\nsteps = 2\n')
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("FIXATIVE_", "HF_"))},
           "FIXATIVE_CONFIG": str(config), "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "fixative.daemon.cli", "protect", str(path), "--model", str(tiny_model),
               "--model", str(second_model)]
    shown = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert shown.returncode == 0, shown.stderr
    assert f"  {tiny_model}: protection gain" in shown.stdout and f"  {second_model}: protection gain" in shown.stdout
    report = json.loads(subprocess.run([*command, "--json"], capture_output=True, text=True, env=env, timeout=300).stdout)
    assert list(report["models"]) == [str(tiny_model), str(second_model)] and report["max_delta"] <= 8


def test_a_model_given_twice_is_a_usage_error(tiny_model, tmp_path) -> None:
    path, _ = saved_painting(tmp_path)
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("FIXATIVE_")}, "FIXATIVE_CONFIG": str(tmp_path / "none.toml")}
    (tmp_path / "none.toml").write_text("")
    done = subprocess.run([sys.executable, "-m", "fixative.daemon.cli", "protect", str(path), "--model", str(tiny_model),
                           "--model", str(tiny_model)], capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 2 and "models: a model is listed twice" in done.stderr, done.stderr
    assert not list(tmp_path.glob("*.protected*"))
