"""The ``fixative`` command line: one argparse parser, one function per command.

Commands import their heavy parts lazily, so ``fixative status`` and
``fixative watch`` never import torch.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fixative",
        description="Protect artwork from Stable Diffusion style mimicry.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from daemon import protect_command

    protect_command.add_parser(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
