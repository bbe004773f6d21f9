"""The UNet's precision on this CPU: fp32 against bf16, forward alone and forward with backward.

    python -m bench.precision [--rounds 2] [--threads N] [--size 512]

SD-1.5's UNet (bench/sd15.py: the real architecture, random weights) on one
64x64 latent (a 512x512 image, ``--size``), batch 1, as the attack and the report run it:
- forward: under no_grad, what an ``sds`` step and the report's gain do;
- forward + backward: the input gradient of the loss, what ``advdm`` and
  ``mist`` do every step.
Both dtypes are built once and measured in alternating rounds in one process,
after a warm-up call of each. ``engine.model.pick_dtypes`` follows this table
(bench/README.md, "Precision on the CPU"): on a CPU with native bf16 the UNet
is bf16, in every mode.
"""

from __future__ import annotations

import argparse
import sys
import time

from bench.common import physical_cores


def timed(unet, context, dtype, backward: bool, side: int) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one pass on the latent of a ``side`` x ``side`` image."""
    import torch

    z = torch.randn(1, 4, side // 8, side // 8, dtype=dtype, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([500])
    started, cpu_started = time.perf_counter(), time.process_time()
    if backward:
        z.requires_grad_(True)
        (gradient,) = torch.autograd.grad(unet(z, t, context).sample.float().square().mean(), z)
    else:
        with torch.no_grad():
            unet(z, t, context)
    return time.perf_counter() - started, time.process_time() - cpu_started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: physical cores)")
    parser.add_argument("--size", type=int, default=512, help="the image's side in pixels, a multiple of 8")
    args = parser.parse_args(argv)

    import torch

    from bench import sd15

    torch.set_num_threads(args.threads or physical_cores())
    cpu = torch.device("cpu")
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    unets = {name: sd15.build_unet(cpu, dtype).eval().requires_grad_(False) for name, dtype in dtypes.items()}
    contexts = {name: sd15.text_embedding().to(dtype) for name, dtype in dtypes.items()}
    cases = [(name, backward) for backward in (False, True) for name in dtypes]
    for name, backward in cases:  # warm-up
        timed(unets[name], contexts[name], dtypes[name], backward, args.size)
    seconds: dict[tuple[str, bool], list[tuple[float, float]]] = {case: [] for case in cases}
    for round_ in range(args.rounds):
        for case in cases:
            seconds[case].append(timed(unets[case[0]], contexts[case[0]], dtypes[case[0]], case[1], args.size))
        print(f"round {round_ + 1}: " + ", ".join(
            f"{n} {'fwd+bwd' if b else 'fwd'} {seconds[(n, b)][-1][0]:.2f} s (CPU {seconds[(n, b)][-1][1]:.2f} s)" for n, b in cases
        ), flush=True)
    # On a shared machine the wall time is inflated by the other jobs; with one thread,
    # the process's CPU time still measures the work (no OpenMP threads spinning on each other).
    print(f"\nSD-1.5 UNet, {args.size // 8}x{args.size // 8} latent, batch 1, {torch.get_num_threads()} thread(s), torch {torch.__version__}, "
          f"fastest round of {args.rounds}\n")
    print("| pass | fp32 s | bf16 s | bf16 speed-up | fp32 CPU s | bf16 CPU s | bf16 speed-up by CPU time |")
    print("|---|---|---|---|---|---|---|")
    for backward in (False, True):
        (fp32, fp32_cpu), (bf16, bf16_cpu) = (min(seconds[(name, backward)]) for name in dtypes)
        print(f"| {'forward + backward' if backward else 'forward'} | {fp32:.2f} | {bf16:.2f} | {fp32 / bf16:.2f}x | "
              f"{fp32_cpu:.2f} | {bf16_cpu:.2f} | {fp32_cpu / bf16_cpu:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
