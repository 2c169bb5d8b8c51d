"""The ``lowrank`` console script.

``lowrank compress SRC -o OUT --ratio 0.5`` compresses a Hugging Face checkpoint
directory and saves the result; ``lowrank info OUT`` prints what was done;
``lowrank decompose FILE --method tucker --rank 8`` decomposes a tensor stored
in a ``.npy`` file or (with ``--key``) a ``.safetensors`` file and prints the
result's ranks, size and relative error.
"""

from __future__ import annotations

import argparse
import json
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

    com = commands.add_parser("compress", help="compress a Hugging Face checkpoint directory and save it")
    com.add_argument("source", type=Path, help="a Hugging Face checkpoint directory (config.json + weights)")
    com.add_argument("-o", "--output", type=Path, required=True, help="directory to write")
    policy = com.add_mutually_exclusive_group()
    policy.add_argument("--ratio", type=float, help="fraction of the targeted layers' parameters kept (default 0.5)")
    policy.add_argument("--rank", type=int, help="one fixed rank for every layer")
    policy.add_argument("--energy", type=float, help="fraction of each weight's squared singular values kept")
    com.add_argument(
        "--method", default="auto",
        help="'auto', one method (svd, tt, tucker2, cp, svd-channel, svd-spatial) or kind=method pairs "
        "separated by commas, e.g. linear=svd,conv=cp",
    )
    com.add_argument("--targets", nargs="+", metavar="GLOB", help="only layers whose names match these globs")
    com.add_argument("--exclude", nargs="+", default=[], metavar="GLOB", help="never layers matching these globs")
    com.add_argument(
        "--kinds", nargs="+", default=["linear", "conv"], choices=["linear", "conv", "pointwise", "embedding"],
        help="layer kinds to compress (default: linear conv)",
    )
    com.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    com.add_argument("--quiet", action="store_true", help="no progress bar and no report table")

    info = commands.add_parser("info", help="print the report stored with a compressed checkpoint")
    info.add_argument("directory", type=Path)
    info.add_argument("--json", action="store_true", help="print the stored plan and report as JSON")
    return parser


def _parse_method(text: str) -> str | dict[str, str]:
    """``"cp"`` -> ``"cp"``; ``"linear=svd,conv=cp"`` -> ``{"linear": "svd", "conv": "cp"}``."""
    if "=" not in text:
        return text
    pairs = [item.split("=", 1) for item in text.split(",")]
    return {kind.strip(): method.strip() for kind, method in pairs}


def _compress(args: argparse.Namespace) -> int:
    if args.output.exists() and not args.overwrite:
        raise FileExistsError(f"{args.output} already exists; pass --overwrite to replace it")
    model = lowrank.io.load_pretrained(args.source)
    report = lowrank.compress(
        model, args.ratio, rank=args.rank, energy=args.energy, method=_parse_method(args.method),
        include=args.targets, exclude=args.exclude, kinds=args.kinds, progress=not args.quiet,
    )
    lowrank.save(model, args.output, report=report, overwrite=args.overwrite)
    if not args.quiet:
        print(report)
    print(f"saved to {args.output}")
    return 0


def _info(args: argparse.Namespace) -> int:
    plan = lowrank.io.read_plan(args.directory)
    if args.json:
        print(json.dumps(plan, indent=1))
        return 0
    print(f"{args.directory}: written by lowrank {plan.get('version')}, model {plan.get('model_class')}, "
          f"{len(plan['modules'])} factorized modules")
    if plan.get("report") is not None:
        print(lowrank.CompressionReport.from_dict(plan["report"]))
    else:
        for name, entry in plan["modules"].items():
            print(f"{name}: {entry['class']} {entry['config']}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``lowrank`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "compress":
            return _compress(args)
        if args.command == "info":
            return _info(args)
        x = _load_tensor(args.file, args.key)
        options = {"rank": _parse_rank(args.rank)}
        if args.tol is not None:
            options["tol"] = args.tol
        factorization = lowrank.decompose(x, args.method, **options)
    except (OSError, KeyError, ValueError, TypeError, RuntimeError) as error:
        print(f"lowrank: error: {error}", file=sys.stderr)
        return 2
    print(factorization)
    print(f"dense parameters: {x.numel()}  factor parameters: {factorization.num_params} "
          f"({factorization.num_params / x.numel():.1%})  relative error: {factorization.relative_error(x):.4g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
