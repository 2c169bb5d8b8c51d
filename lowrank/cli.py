"""The ``lowrank`` console script.

``lowrank decompose FILE --method tucker --rank 8`` decomposes a tensor stored
in a ``.npy`` file or (with ``--key``) a ``.safetensors`` file and prints the
result's ranks, size and relative error.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

import lowrank


def _load_tensor(path: Path, key: str | None) -> torch.Tensor:
    """Read one tensor without unpickling: ``.npy`` or one key of a ``.safetensors`` file."""
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    if path.suffix == ".npy":
        return torch.from_numpy(np.load(path, allow_pickle=False))
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            keys = list(handle.keys())
            if key not in keys:
                shown = ", ".join(keys[:10]) + (" ..." if len(keys) > 10 else "")
                raise KeyError(f"--key {key!r} is not a tensor of {path}; it holds: {shown}")
            return handle.get_tensor(key)
    raise ValueError(f"{path}: expected a .npy or .safetensors file")


def _parse_rank(text: str | None) -> int | list[int] | None:
    """``"8"`` -> 8, ``"4,5,6"`` -> [4, 5, 6]."""
    if text is None:
        return None
    values = [int(v) for v in text.split(",")]
    return values[0] if len(values) == 1 else values


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``lowrank`` command."""
    parser = argparse.ArgumentParser(prog="lowrank", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"lowrank {lowrank.__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    dec = commands.add_parser("decompose", help="decompose a tensor stored in a .npy or .safetensors file")
    dec.add_argument("file", type=Path)
    dec.add_argument("--key", help="tensor name inside a .safetensors file")
    methods = sorted(m for m in lowrank.decompose.METHODS if m != "tt_matrix")
    dec.add_argument("--method", required=True, choices=methods)
    dec.add_argument("--rank", help="an int, or comma-separated ints (one per mode or bond)")
    dec.add_argument("--tol", type=float, help="relative error target in (0, 1)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``lowrank`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        x = _load_tensor(args.file, args.key)
        options = {"rank": _parse_rank(args.rank)}
        if args.tol is not None:
            options["tol"] = args.tol
        factorization = lowrank.decompose(x, args.method, **options)
    except (OSError, KeyError, ValueError, TypeError) as error:
        print(f"lowrank: error: {error}", file=sys.stderr)
        return 2
    print(factorization)
    print(f"dense parameters: {x.numel()}  factor parameters: {factorization.num_params} "
          f"({factorization.num_params / x.numel():.1%})  relative error: {factorization.relative_error(x):.4g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
