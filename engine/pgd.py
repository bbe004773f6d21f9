"""Projected gradient descent with sign steps in an L-infinity ball: the loop every mode shares.

The perturbation ``delta`` lives at the working size, in [-1, 1] image units,
and always in fp32 (a bf16 delta could not even represent a 1/255 step near
the ends of the range). Its components and their bounds are a
:class:`~fixative.engine.budget.Budget`'s: R, G, B within [-eps, eps], or luma
and chroma within a per-pixel box shaped the way the eye sees. Each step moves
every component by ``alpha`` (scaled by its bound) along the sign of an
accumulated gradient and projects back into the box; the image range is
enforced where the image is formed.

The accumulated gradient is MI-FGSM's momentum (Dong et al., "Boosting
Adversarial Attacks with Momentum", CVPR 2018, Algorithm 1): each step's
gradient, divided by its mean magnitude, is added to the decayed sum of the
earlier ones. With EOT (``robust``) every step sees one random draw of the
publishing pipeline and one random (t, noise) pair, so a single step's sign is
noisy; the sum averages the draws. On the tiny model, 25 steps with momentum
left more protection after Pillow's JPEG q75 than 100 fixed sign steps did;
step-size schedules and Auto-PGD did not (bench/README.md, "Step schedule").

Coarse to fine (with ``robust``): the first COARSE_SHARE of the steps run at
half the working side (``Geometry.halved``), where a step cost 0.20x a
full-size one at SD-1.5 scale (the encoder's and the UNet's work fall with the
pixel count); the perturbation is then carried up to the working size and
refined there, the momentum starting afresh. fixative.engine.protect runs the two
stages; bench/README.md ("Coarse to fine") has the measurements.

A batch (``fixative.engine.protect.protect_batch``) is N images of one working size,
one per row, each with its own generator, publishing transform and geometry.
Everything that mixes numbers across pixels is done per row: the random draws,
the EOT transform, the script's view of the perturbation, the momentum's
normalisation, and the objective is a sum of the rows' own objectives, so each
row's gradient, and its result, is what it would be alone.

A greyscale row (the budget's ``grey``) gets one perturbation for its three channels: its
random start and every step's gradient are made colourless (``Budget.share_grey``:
averaged over R, G and B, or with chroma zeroed in luma and chroma), so
each sign step, and the projection, moves the three alike and the protected
image stays grey. The averaged gradient is the gradient with respect to a
single grey perturbation shared by the channels (up to a factor of 3, which
the sign step ignores).
"""

from __future__ import annotations

import time
from typing import Callable, Protocol

import torch

from fixative.engine.budget import Budget
from fixative.engine.geometry import Geometry
from fixative.engine.options import EngineOptions

Progress = Callable[[int, int, float], None]
Transform = Callable[[torch.Tensor, torch.Generator], torch.Tensor]  # one image (1, 3, h, w) at a time
PROGRESS_INTERVAL_SECONDS = 0.5
MOMENTUM = 0.9  # Dong et al.'s decay factor mu; 0 gives plain sign steps
COARSE_SHARE = 0.5  # of the steps, run at half the working side (coarse to fine; bench/README.md)


class Attack(Protocol):
    maximize: bool

    def __call__(self, x: torch.Tensor, generators: list[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]: ...


def perturbed(
    x_work: torch.Tensor,
    delta: torch.Tensor,
    geometries: list[Geometry],
    transforms: list[Transform] | None = None,
    generators: list[torch.Generator] | None = None,
) -> torch.Tensor:
    """The padded model inputs for a batch's perturbations: what a fine-tuning script would feed the model.

    Row by row: each image's own geometry (the rows share a working size, not
    necessarily a full one) and, with ``transforms``
    (``fixative.engine.transforms.PublishingTransform``), its own random draw of the
    publishing pipeline (EOT), which may be a different JPEG quality or
    downscale for every row.
    """
    rows = range(len(geometries))
    image = (x_work + torch.cat([geometries[i].seen(delta[i : i + 1]) for i in rows])).clamp(-1, 1)
    if transforms is not None:
        image = torch.cat([transforms[i](image[i : i + 1], generators[i]) for i in rows])
    return geometries[0].pad(image)


def coarse_steps(options: EngineOptions) -> int:
    """How many of the steps run at half the working side: COARSE_SHARE of them, never the last one.

    Only with ``robust`` on. Without it the steps optimise the lossless file's
    own pixels, whose fine detail only full-size steps find: on the tiny model,
    25 coarse steps of 100 cut the PNG's gain - 1 from 0.28 to 0.10
    (bench/README.md, "Coarse to fine").
    """
    if not (options.coarse_to_fine and options.robust):
        return 0
    return min(int(COARSE_SHARE * options.steps), options.steps - 1)


def random_start(budget: Budget, generators: list[torch.Generator]) -> torch.Tensor:
    """Uniform in the budget's box, as Madry et al. and Mist start in the ball; row i drawn from ``generators[i]``."""
    like = budget.bound
    rows = [torch.rand((1, *like.shape[1:]), generator=generator, device=like.device) for generator in generators]
    return (torch.cat(rows) * 2 - 1) * like


def sign_step(
    delta: torch.Tensor, accumulated: torch.Tensor, gradient: torch.Tensor, direction: float, alpha: float, budget: Budget
) -> tuple[torch.Tensor, torch.Tensor]:
    """One MI-FGSM step for a batch (N, 3, h, w): (new delta, new accumulated gradient).

    ``direction`` is +1 to ascend, -1 to descend.
    """
    # Normalised so that every step's draw weighs alike, however steep its landscape;
    # per image, or one steep image in a batch would drown its neighbours' steps.
    scale = gradient.abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
    accumulated = MOMENTUM * accumulated + gradient / scale
    return budget.step(delta, direction * accumulated.sign(), alpha), accumulated


def run_pgd(
    attack: Attack,
    x_work: torch.Tensor,
    geometries: list[Geometry],
    budget: Budget,
    alpha: float,
    steps: int,
    generators: list[torch.Generator],
    progress: Progress | None = None,
    transforms: list[Transform] | None = None,
    start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Return the perturbations (fp32, working size, a row per image, in ``budget``'s components) after ``steps`` PGD steps.

    ``x_work`` holds the batch's images, a row each, and ``geometries``,
    ``generators``, ``transforms`` and ``budget``'s bounds one per row.
    ``start`` (in the budget's components) defaults to a random start; it is
    projected into the budget. ``progress`` gets the mean of the rows' losses.
    ``budget.rgb`` of the result is the RGB change.
    """
    delta = budget.share_grey(random_start(budget, generators) if start is None else budget.project(start))
    direction = 1.0 if attack.maximize else -1.0
    accumulated = torch.zeros_like(delta)
    last_report = time.monotonic()
    for step in range(1, steps + 1):
        delta.requires_grad_(True)
        objective, loss = attack(perturbed(x_work, budget.rgb(delta), geometries, transforms, generators), generators)
        # A row's objective depends on that row alone, so the sum's gradient is each row's own.
        (gradient,) = torch.autograd.grad(objective.sum(), delta)
        gradient = budget.share_grey(gradient)
        with torch.no_grad():
            delta, accumulated = sign_step(delta, accumulated, gradient, direction, alpha, budget)
        # Reading the loss forces a device sync, so report at most twice a second.
        if progress is not None and (step == steps or time.monotonic() - last_report >= PROGRESS_INTERVAL_SECONDS):
            progress(step, steps, float(loss.mean()))
            last_report = time.monotonic()
    return delta.detach()
