"""One perturbation against several models at once: the members of ``EngineOptions.models``.

A mimic may fine-tune SD 1.5, an SDXL fine-tune or Flux.1, and a perturbation
made on one of them alone may do little against another. An ensemble holds
every member on the device together (README.md, "Several models at once",
has the memory this costs) and, at each PGD step, follows the sum of the
members' gradients, each normalised to unit L2 norm per image.

Why normalise the gradients. Ensemble attacks sum the members' objectives
with chosen weights (Liu et al., "Delving into Transferable Adversarial
Examples and Black-box Attacks", ICLR 2017, the section on ensemble-based
approaches; Dong et al., "Boosting Adversarial Attacks with Momentum",
CVPR 2018, Section 3.2, which fuses the members' logits). Our members' objectives have no
common unit: a diffusion loss near 1, a latent distance whose size depends on
the VAE's scale, an SDS surrogate whose size depends on the UNet. Fixed
weights would let whichever is steepest decide the sign of every pixel's
step. Dividing each member's gradient by its own norm, at every step, gives
each the same say in the direction, which is all a sign step uses; it costs
one backward to the image per member, which each member's graph needs anyway.

A member is a full model (``fixative.engine.model.LoadedModel``), attacked
with the job's mode, or a VAE alone (``LoadedVAE``), attacked with the
encoder objective (``fixative.engine.attacks.encoder``) whatever the mode:
the latent pulled toward the target's, the part of a latent diffusion model
the literature finds vulnerable (Xue et al., arXiv 2404.13320).

All members see the same model input: the ensemble works at the largest of
their training sides, on sides that are a multiple of every member's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from fixative.engine.attacks import ATTACKS
from fixative.engine.attacks.encoder import EncoderAttack
from fixative.engine.diffusion import row_sums
from fixative.engine.model import LoadedModel, LoadedVAE, is_vae_folder, load_model, load_vae, resolve_model_folder
from fixative.engine.options import EngineOptions

Member = LoadedModel | LoadedVAE


@dataclass
class Ensemble:
    """The loaded members, keyed by their name or path as the settings give it, in the settings' order."""

    members: dict[str, Member]
    resolution: int  # the largest member's training side
    size_multiple: int  # a multiple of every member's
    device: torch.device

    @property
    def source(self) -> list[str]:
        return list(self.members)


def load_protector(options: EngineOptions) -> LoadedModel | Ensemble:
    """What ``options`` protects against: its one model, or an :class:`Ensemble` of its ``models``."""
    return load_ensemble(options) if options.models else load_model(options)


def load_ensemble(options: EngineOptions) -> Ensemble:
    """Load every member of ``options.members`` onto the options' device.

    Every member is found on disk before any is loaded, so that a missing
    one is named (fixative.engine.errors.ModelError) before minutes of loading.
    """
    folders = {name: resolve_model_folder(name) for name in options.members}
    members: dict[str, Member] = {}
    for name, folder in folders.items():
        if is_vae_folder(folder):
            members[name] = load_vae(folder, options)
        else:
            members[name] = load_model(options.model_copy(update={"model": name, "models": None}))
    first = next(iter(members.values()))
    return Ensemble(
        members=members,
        resolution=max(member.resolution for member in members.values()),
        size_multiple=math.lcm(*(member.size_multiple for member in members.values())),
        device=first.device,
    )


def member_attack(member: Member, options: EngineOptions, input_shape: tuple[int, ...]):
    """The job's mode for a full model; the encoder objective for a VAE alone."""
    if isinstance(member, LoadedVAE):
        return EncoderAttack(member, options, input_shape)
    return ATTACKS[options.mode](member, options, input_shape)


class EnsembleAttack:
    """The members' attacks as one (see the module docstring): ascends the sum of their unit-norm gradients."""

    maximize = True  # each member's own direction is folded into its gradient's sign

    def __init__(self, ensemble: Ensemble, options: EngineOptions, input_shape: tuple[int, ...]):
        self.attacks = [member_attack(member, options, input_shape) for member in ensemble.members.values()]

    def __call__(self, x: torch.Tensor, generators: list[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
        """(surrogate, loss) per row: the surrogate's gradient with respect to ``x`` is the normalised sum.

        ``loss``, for the progress callback only, is the mean of the members' own losses.
        """
        surrogate = torch.zeros(len(x), device=x.device)
        losses = []
        for attack in self.attacks:
            objective, loss = attack(x, generators)
            # Only this member's graph is walked and freed; the one that made x stays for run_pgd's backward.
            (gradient,) = torch.autograd.grad(objective.sum(), x)
            norm = gradient.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (x.dim() - 1))
            direction = 1.0 if attack.maximize else -1.0
            surrogate = surrogate + row_sums(x * (direction * gradient / norm))
            losses.append(loss)
        return surrogate, torch.stack(losses).mean(dim=0)
