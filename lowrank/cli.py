"""The ``lowrank`` console script.

``lowrank compress SRC -o OUT --ratio 0.5`` compresses a Hugging Face checkpoint
directory and saves the result; ``lowrank info OUT`` prints what was done (or,
for an adapter directory, its adapters); ``lowrank adapters merge BASE ADAPTER
-o OUT`` folds an adapter (lowrank's or PEFT's LoRA) into its base model and
saves the merged checkpoint; ``lowrank decompose FILE --method tucker --rank 8``
decomposes a tensor stored in a ``.npy`` file or (with ``--key``) a
``.safetensors`` file and prints the result's ranks, size and relative error.
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
from lowrank.calibrate.data import TEXT_BATCH_SIZE, TEXT_MAX_LENGTH
from lowrank.data_aware import ALLOCATIONS
from lowrank.nn import METHODS
from lowrank.nn.dense import KINDS
from lowrank.rank.policies import ACCEPTED_FORMS

# The compress options that only calibration uses: CalibrationConfig's fields (None when not given), and flags.
CALIBRATION_OPTIONS = {
    "allocation": "--allocation", "whiten": "--no-whiten/--asvd", "refit": "--refit/--no-refit",
    "shrinkage": "--shrinkage", "ridge": "--ridge", "sequential": "--no-sequential", "n_probes": "--probes",
    "batch_size": "--batch-size", "max_length": "--max-length", "device": "--device",
}


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


def _parse_rank(text: str) -> int | list[int]:
    """``"8"`` -> 8, ``"4,5,6"`` -> [4, 5, 6]."""
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
    policy.add_argument(
        "--rank", type=_parse_policy,
        help=f"one fixed rank for every layer (an int), or a rank policy: {ACCEPTED_FORMS}",
    )
    policy.add_argument("--energy", type=float, help="fraction of each weight's squared singular values kept")
    names = ", ".join(dict.fromkeys(name for methods in METHODS.values() for name in methods))
    com.add_argument(
        "--method", default="auto",
        help=f"'auto', one method ({names}) or kind=method pairs separated by commas, e.g. linear=svd,conv=cp",
    )
    com.add_argument("--targets", nargs="+", metavar="GLOB", help="only layers whose names match these globs")
    com.add_argument("--exclude", nargs="+", default=[], metavar="GLOB", help="never layers matching these globs")
    com.add_argument(
        "--kinds", nargs="+", default=list(lowrank.Targets().kinds), choices=KINDS,
        help=f"layer kinds to compress (default: {' '.join(lowrank.Targets().kinds)})",
    )
    com.add_argument(
        "--calibration", type=Path, metavar="FILE.txt",
        help="calibration text, one sample per line, tokenised with SRC's tokenizer: compress the linear layers "
        "data-aware (whitened, budget allocated across layers, calibrated in sequence)",
    )
    com.add_argument(  # "sensitivity" needs a loss function, which a command line cannot give
        "--allocation", choices=[name for name in ALLOCATIONS if name != "sensitivity"],
        help="how --ratio is spent across layers with --calibration (default energy)",
    )
    com.add_argument("--no-whiten", dest="whiten", action="store_const", const=False,
                     help="with --calibration: truncate the weights themselves, not the whitened weights")
    com.add_argument("--asvd", dest="whiten", action="store_const", const="asvd",
                     help="with --calibration: scale input channels by their mean activation (ASVD), not whiten")
    com.add_argument("--refit", dest="refit", action="store_const", const=True,
                     help="with --calibration: refit the second factors to the dense outputs (closer on the "
                          "calibration text, further on other text)")
    com.add_argument("--no-refit", dest="refit", action="store_const", const=False,
                     help="with --calibration: do not refit the second factors (the default)")
    com.add_argument("--shrinkage", type=float, metavar="S",
                     help="with --calibration: whiten by the input Gram matrices pulled towards their diagonal by S "
                          "in [0, 1] (default 0)")
    com.add_argument("--ridge", type=float, metavar="R",
                     help="with --calibration: pull each refitted second factor towards the unrefitted one by R "
                          "(relative ridge, default 0: the full refit)")
    com.add_argument("--no-sequential", dest="sequential", action="store_const", const=False,
                     help="with --calibration: calibrate every layer on the dense model's inputs")
    com.add_argument("--probes", dest="n_probes", type=int, metavar="N",
                     help="with --calibration: output probes per batch of the fisher allocation (default 1)")
    com.add_argument("--batch-size", type=int, metavar="N",
                     help=f"with --calibration: lines per batch (default {TEXT_BATCH_SIZE})")
    com.add_argument("--max-length", type=int, metavar="N",
                     help=f"with --calibration: longest tokenised line, in tokens (default {TEXT_MAX_LENGTH})")
    com.add_argument("--device", metavar="DEVICE",
                     help="with --calibration: where each block runs its turn (e.g. cuda; default: where the model is)")
    heal = lowrank.HealConfig()
    com.add_argument("--heal-steps", type=int, default=heal.steps, metavar="N",
                     help="with --calibration: N steps of distillation towards the dense model after compressing")
    com.add_argument("--heal-seconds", type=float, metavar="S", help="with --calibration: at most S seconds of healing")
    com.add_argument("--heal-lr", type=float, default=heal.lr, metavar="LR",
                     help=f"with --calibration: the learning rate of healing (default {heal.lr:g})")
    com.add_argument("--heal-holdout", type=float, default=heal.holdout, metavar="SHARE",
                     help="with --calibration: hold out this share of the calibration batches and stop healing when "
                          f"their loss stops improving, keeping the best factors (default {heal.holdout:g}; 0: none)")
    com.add_argument(
        "--stream", action=argparse.BooleanOptionalAction, default=None,
        help="read, compress and write one block at a time (peak memory about one block; allocation energy or "
        "uniform, no healing); default: when SRC is sharded (model.safetensors.index.json)")
    com.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    com.add_argument("--quiet", action="store_true", help="no progress bar and no report table")

    info = commands.add_parser(
        "info", help="print the report stored with a compressed checkpoint, or the adapters of an adapter directory")
    info.add_argument("directory", type=Path)
    info.add_argument("--json", action="store_true", help="print the stored plan and report (or adapters) as JSON")
    info.add_argument("--plot", type=Path, metavar="FILE",
                      help="also draw the report to FILE (.png, .svg, .pdf): ranks, kept parameters and errors per "
                           "layer, spectra with their cut (needs matplotlib)")

    ada = commands.add_parser("adapters", help="work with adapters saved by lowrank.adapters.save or PEFT")
    ada_commands = ada.add_subparsers(dest="adapters_command", required=True)
    merge = ada_commands.add_parser(
        "merge", help="fold an adapter into its base model and save the merged checkpoint, of the base's kind")
    merge.add_argument("base", type=Path,
                       help="a Hugging Face checkpoint directory (config.json + weights) or a lowrank.save checkpoint")
    merge.add_argument("adapter", type=Path, help="an adapter directory (lowrank.adapters.save or PEFT's LoRA)")
    merge.add_argument("-o", "--output", type=Path, required=True,
                       help="directory to write: a Hugging Face checkpoint (save_pretrained) for a Hugging Face base, "
                       "a lowrank checkpoint for a lowrank one")
    merge.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    return parser


def _parse_method(text: str) -> str | dict[str, str]:
    """``"cp"`` -> ``"cp"``; ``"linear=svd,conv=cp"`` -> ``{"linear": "svd", "conv": "cp"}``."""
    if "=" not in text:
        return text
    pairs = [item.split("=", 1) for item in text.split(",")]
    return {kind.strip(): method.strip() for kind, method in pairs}


def _parse_policy(text: str) -> int | lowrank.rank.RankPolicy:
    """``"32"`` -> 32; anything else a rank policy (:func:`lowrank.rank.policy_from_string`)."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return lowrank.rank.policy_from_string(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def _calibration_texts(path: Path) -> list[str]:
    """The non-empty lines of a calibration text file."""
    if not path.is_file():
        raise FileNotFoundError(f"calibration file {path} not found")
    texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not texts:
        raise ValueError(f"calibration file {path} has no non-empty line")
    return texts


def _configs(args: argparse.Namespace) -> tuple[lowrank.Targets, lowrank.CalibrationConfig | None, lowrank.HealConfig]:
    """The configs of ``lowrank compress``, checked before the model is loaded."""
    targets = lowrank.Targets(include=args.targets, exclude=args.exclude, kinds=args.kinds)
    heal = lowrank.HealConfig(steps=args.heal_steps, seconds=args.heal_seconds, lr=args.heal_lr,
                              holdout=args.heal_holdout)
    options = {name: getattr(args, name) for name in CALIBRATION_OPTIONS if getattr(args, name) is not None}
    if args.calibration is None:
        if options:
            flags = ", ".join(CALIBRATION_OPTIONS[name] for name in options)
            raise ValueError(f"{flags} need --calibration FILE.txt")
        return targets, None, heal
    from transformers import AutoTokenizer

    texts, tokenizer = _calibration_texts(args.calibration), AutoTokenizer.from_pretrained(args.source)
    return targets, lowrank.CalibrationConfig(texts, tokenizer=tokenizer, **options), heal


def _compress(args: argparse.Namespace) -> int:
    if args.output.exists() and not args.overwrite:
        raise FileExistsError(f"{args.output} already exists; pass --overwrite to replace it")
    with lowrank.distributed.process_group_from_environment():  # under torchrun: the batches shared, rank 0 writes
        return _compress_in_group(args)


def _compress_in_group(args: argparse.Namespace) -> int:
    writer = lowrank.distributed.world()[0] == 0
    stream = args.stream if args.stream is not None else (args.source / lowrank.sharded.INDEX_NAME).is_file()
    targets, calibration, heal = _configs(args)
    if stream:
        if heal.enabled:
            raise ValueError("--heal-steps and --heal-seconds train the whole model: not with --stream")
        report = lowrank.streaming.compress_checkpoint(
            args.source, args.output, args.ratio, rank=args.rank, energy=args.energy, method=_parse_method(args.method),
            targets=targets, calibration=calibration, overwrite=args.overwrite, progress=not args.quiet,
        )
        if writer:
            if not args.quiet:
                print(report)
            print(f"saved to {args.output} (streamed one block at a time)")
        return 0
    model = lowrank.io.load_pretrained(args.source)
    report = lowrank.compress(
        model, args.ratio, rank=args.rank, energy=args.energy, method=_parse_method(args.method), targets=targets,
        calibration=calibration, heal=heal, progress=not args.quiet,
    )
    if writer:
        lowrank.save(model, args.output, report=report, overwrite=args.overwrite)
        if not args.quiet:
            print(report)
        print(f"saved to {args.output}")
    lowrank.distributed.barrier()
    return 0


def _info(args: argparse.Namespace) -> int:
    if _is_adapter_directory(args.directory):
        return _adapter_info(args)
    plan = lowrank.io.read_plan(args.directory)
    if args.json:
        print(json.dumps(plan, indent=1))
        return 0
    adapted = plan.get("adapters") or {}
    print(f"{args.directory}: written by lowrank {plan.get('version')}, model {plan.get('model_class')}, "
          f"{len(plan['modules'])} factorized modules" + (f", {len(adapted)} adapters" if adapted else ""))
    if plan.get("report") is not None:
        report = lowrank.CompressionReport.from_dict(plan["report"])
        print(report)
        if args.plot is not None:
            report.plot(args.plot)
            print(f"drew the report to {args.plot}")
    elif args.plot is not None:
        raise ValueError(f"{args.directory} holds no compression report to plot")
    else:
        for name, entry in plan["modules"].items():
            print(f"{name}: {entry['class']} {entry['config']}")
    for name, entry in adapted.items():
        print(f"{name}: {entry['class']} {entry['config']}")
    return 0


def _is_adapter_directory(directory: Path) -> bool:
    """Whether ``directory`` holds an adapter (either format) rather than a lowrank checkpoint."""
    try:
        lowrank.adapters.io.adapter_format(directory)
    except FileNotFoundError:
        return False
    return True


def _adapter_info(args: argparse.Namespace) -> int:
    """``lowrank info`` on an adapter directory: one row per adapted module."""
    summary = lowrank.adapters.io.summary(args.directory)
    if args.json:
        print(json.dumps(summary, indent=1))
        return 0
    rows = summary["adapters"]
    total = sum(row["parameters"] for row in rows)
    kind = "lowrank" if summary["format"] == "lowrank" else "PEFT LoRA"
    print(f"{args.directory}: {kind} adapter, {len(rows)} adapted modules, {total:,} trainable parameters")
    table = [("module", "adapter", "rank", "alpha", "trainable")] + [
        (row["module"], row["adapter"], str(row["rank"]), f"{row['alpha']:g}", f"{row['parameters']:,}")
        for row in rows]
    widths = [max(len(line[i]) for line in table) for i in range(5)]
    for line in table:
        print("  ".join(cell.ljust(width) if i < 2 else cell.rjust(width)
                        for i, (cell, width) in enumerate(zip(line, widths))).rstrip())
    return 0


def _adapters_merge(args: argparse.Namespace) -> int:
    """``lowrank adapters merge BASE ADAPTER -o OUT``."""
    if args.output.exists() and not args.overwrite:
        raise FileExistsError(f"{args.output} already exists; pass --overwrite to replace it")
    if not args.base.is_dir():
        raise FileNotFoundError(f"{args.base} is not a checkpoint directory")
    lowrank_base = (args.base / lowrank.io.PLAN_NAME).is_file()
    model = lowrank.load(args.base) if lowrank_base else lowrank.io.load_pretrained(args.base)
    names = lowrank.adapters.load(model, args.adapter)
    lowrank.adapters.merge_and_unload(model, safe=True)
    if lowrank_base:
        lowrank.save(model, args.output, overwrite=args.overwrite)
    else:
        with lowrank.io.staged_directory(args.output, args.overwrite) as staging:
            model.save_pretrained(staging, safe_serialization=True)
            lowrank.io.copy_tokenizer_files(args.base, staging)
    print(f"merged {len(names)} adapted layers of {args.adapter} into {args.base}; saved to {args.output}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``lowrank`` command; returns the exit status."""
    args = build_parser().parse_args(argv)
    try:
        if args.command == "compress":
            return _compress(args)
        if args.command == "info":
            return _info(args)
        if args.command == "adapters":
            return _adapters_merge(args)
        x = _load_tensor(args.file, args.key)
        options = {} if args.rank is None else {"rank": _parse_rank(args.rank)}
        if args.tol is not None:
            options["tol"] = args.tol
        factorization = lowrank.decompose(x, args.method, **options)
    except (OSError, KeyError, ValueError, TypeError, RuntimeError, ImportError) as error:
        print(f"lowrank: error: {error}", file=sys.stderr)
        return 2
    print(factorization)
    print(f"dense parameters: {x.numel()}  factor parameters: {factorization.num_params} "
          f"({factorization.num_params / x.numel():.1%})  relative error: {factorization.relative_error(x):.4g}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
