"""python -m dlkernels {bench,train} ...: the command line."""
from __future__ import annotations

import sys

USAGE = """usage: python -m dlkernels <command> [options]

commands:
  bench   benchmark and accuracy report of every op on every backend against PyTorch
  train   train a reference model on the custom kernels (scikit-learn's digits)

python -m dlkernels <command> --help for the command's options."""


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "bench":
        from .bench import main as run
    elif cmd == "train":
        from .training import main as run
    else:
        print(f"unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    return int(run(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
