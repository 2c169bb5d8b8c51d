"""Forward speed of factorized convolutions, side by side with dense PyTorch and tensorly-torch in one process.

Each case builds a dense ``nn.Conv2d`` (3x3, padding 1, 32x32 maps), our
``Tucker2Conv`` at 4x fewer multiply-accumulates (ranks from
``Tucker2Conv.rank_for_budget`` with a quarter of the weight's parameters for
the factors, plus the bias: for a stride-1 "same" convolution the parameter and
FLOP ratios coincide) and tensorly-torch's
``FactorizedConv(factorization='tucker', implementation='factorized')`` with
Tucker ranks ``(r_out, r_in, 3, 3)``, which holds the same channel factors and
core as ours plus two 3x3 spatial factors. All are timed under
``torch.no_grad()``, alternating on every repeat so that they see the same
machine load; the table gives medians and speed ratios. A second table times
other ways of running the same Tucker-2 chain, to show why ``Tucker2Conv``
runs it the way it does.

Unless ``--system-malloc`` is given, glibc's malloc is told to keep freed
memory (see :func:`keep_freed_memory`), so that the timings measure the
convolutions rather than page faults.

Where the time goes: the dense 3x3 convolution runs close to the CPU's peak
multiply-accumulate rate, while the chain's two 1x1 convolutions do few MACs
but still read the whole input and write the whole output (as many bytes as
the dense convolution moves), and its narrow core convolution runs far below
peak. So the speed-up trails the FLOP reduction, the more so the fewer channels
the layer has: with 64 channels, 4x fewer MACs buy well under 2x.

    python benchmarks/layers.py            # print the tables
    python benchmarks/layers.py --record   # and append them to benchmarks/RESULTS.md
    python benchmarks/layers.py --quick    # fewer repeats, for a smoke run
"""

from __future__ import annotations

import argparse
import ctypes
from collections.abc import Callable

import tensorly as tl
import tltorch
import torch
import torch.nn.functional as F  # noqa: N812
from _timing import alternate, record
from torch import nn

from lowrank.nn.conv import Tucker2Conv
from lowrank.nn.dense import dense_flops

# (channels, batch): 32x32 maps, 3x3 kernels, padding 1.
CASES = [(64, 32), (256, 8)]
TARGET_SPEEDUP = 2.0


def relative_error(weight: torch.Tensor, approx: torch.Tensor) -> float:
    """``||weight - approx|| / ||weight||`` in float64."""
    weight, approx = weight.detach().double(), approx.detach().double()
    return float(torch.linalg.vector_norm(weight - approx) / torch.linalg.vector_norm(weight))


def three_convs(module: Tucker2Conv, memory_format: torch.memory_format) -> Callable[[torch.Tensor], torch.Tensor]:
    """The Tucker-2 chain as three ``F.conv2d`` calls, on inputs and weights in ``memory_format``."""
    first, core, last = (w.contiguous(memory_format=memory_format) for w in (module.first, module.core, module.last))

    def forward(x: torch.Tensor) -> torch.Tensor:
        h = F.conv2d(x.contiguous(memory_format=memory_format), first)
        h = F.conv2d(h, core, None, module.stride, module.padding, module.dilation)
        return F.conv2d(h, last, module.bias).contiguous()

    return forward


def gemm_first(module: Tucker2Conv) -> Callable[[torch.Tensor], torch.Tensor]:
    """The chain with the first 1x1 convolution as a batched GEMM that writes channels-last (as CPConv does)."""
    first = module.first.flatten(1)
    last = module.last.flatten(1)

    def forward(x: torch.Tensor) -> torch.Tensor:
        n, c, height, width = x.shape
        h = torch.bmm(x.flatten(2).transpose(1, 2), first.t().expand(n, -1, -1))
        h = h.view(n, height, width, -1).permute(0, 3, 1, 2)
        h = F.conv2d(h, module.core, None, module.stride, module.padding, module.dilation)
        return torch.baddbmm(module.bias[:, None], last.expand(n, -1, -1), h.flatten(2)).view(n, -1, *h.shape[2:])

    return forward


def gemm_nchw(module: Tucker2Conv) -> Callable[[torch.Tensor], torch.Tensor]:
    """The chain with both 1x1 convolutions as GEMMs and everything in the NCHW layout."""
    first, last = module.first.flatten(1), module.last.flatten(1)

    def forward(x: torch.Tensor) -> torch.Tensor:
        n, c, height, width = x.shape
        h = torch.matmul(first, x.reshape(n, c, -1)).view(n, -1, height, width)
        h = F.conv2d(h, module.core, None, module.stride, module.padding, module.dilation)
        out = torch.baddbmm(module.bias[:, None], last.expand(n, -1, -1), h.flatten(2))
        return out.view(n, -1, *h.shape[2:])

    return forward


VARIANTS = {
    "3x F.conv2d, NCHW": lambda m: three_convs(m, torch.contiguous_format),
    "3x F.conv2d, channels_last (input converted)": lambda m: three_convs(m, torch.channels_last),
    "GEMM first 1x1 (writes channels-last), GEMM last": gemm_first,
    "GEMM 1x1s, all NCHW": gemm_nchw,
}


def keep_freed_memory() -> bool:
    """Make glibc's malloc keep freed buffers instead of returning them to the system (Linux only).

    Otherwise every forward pass maps fresh pages for its multi-megabyte outputs,
    and in a virtual machine the page faults cost as much as the convolutions and
    vary wildly with the host's load. Returns whether it took effect.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    # M_MMAP_THRESHOLD = -3 (its 32 MiB maximum), M_TRIM_THRESHOLD = -1
    return bool(libc.mallopt(-3, 32 * 2**20)) and bool(libc.mallopt(-1, 2**30))


def run_case(channels: int, batch: int, repeats: int) -> tuple[str, str]:
    """One row of each table for ``channels -> channels`` at batch ``batch``."""
    torch.manual_seed(0)
    conv = nn.Conv2d(channels, channels, 3, padding=1)
    x = torch.randn(batch, channels, 32, 32)
    # The factors get a quarter of the weight's parameters; the bias is kept as it is.
    ranks = Tucker2Conv.rank_for_budget(conv, conv.weight.numel() // 4 + conv.bias.numel())
    ours = Tucker2Conv.from_dense(conv, ranks)
    theirs = tltorch.FactorizedConv.from_conv(
        conv, rank=(*ranks, 3, 3), implementation="factorized", factorization="tucker"
    )
    shape = tuple(x.shape)
    dense_params = conv.weight.numel() + conv.bias.numel()
    their_params = sum(p.numel() for p in theirs.parameters())
    ours_error = relative_error(conv.weight, ours.weight)
    their_error = relative_error(conv.weight, theirs.weight.to_tensor())
    with torch.no_grad():
        # All the chains compute the same function (up to float32 rounding): check before timing them.
        reference = ours(x)
        variants = {name: make(ours) for name, make in VARIANTS.items()}
        for name, forward in variants.items():
            error = relative_error(reference, forward(x))
            if error > 1e-5:
                raise AssertionError(f"{name} differs from Tucker2Conv by {error:.2e}")
    fns = {"dense": lambda: conv(x), "ours": lambda: ours(x), "tltorch": lambda: theirs(x)}
    fns.update({name: (lambda f=forward: f(x)) for name, forward in variants.items()})
    with torch.no_grad():
        t = alternate(fns, repeats, warmup=2)
    speedup = t["dense"] / t["ours"]
    met = "met" if speedup >= TARGET_SPEEDUP else "MISSED"
    main_row = (
        f"| {channels}->{channels}, batch {batch} | {ranks} | {dense_flops(conv, shape) / ours.flops(shape):.2f}x "
        f"| {dense_params:,} / {ours.num_params:,} / {their_params:,} | {t['dense'] * 1e3:.2f} ms "
        f"| {t['ours'] * 1e3:.2f} ms | {t['tltorch'] * 1e3:.2f} ms | {speedup:.2f}x (>= {TARGET_SPEEDUP:g}x: {met}) "
        f"| {t['tltorch'] / t['ours']:.2f}x | {ours_error:.4f} / {their_error:.4f} |"
    )
    variant_cells = " | ".join(f"{t[name] * 1e3:.2f} ms ({t['dense'] / t[name]:.2f}x)" for name in variants)
    variant_row = f"| {channels}->{channels}, batch {batch} | {t['ours'] * 1e3:.2f} ms ({speedup:.2f}x) "
    variant_row += f"| {variant_cells} |"
    return main_row, variant_row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--record", action="store_true", help="append the tables to benchmarks/RESULTS.md")
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run, not the targets)")
    parser.add_argument("--system-malloc", action="store_true", help="leave glibc's malloc settings alone")
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--repeats", type=int, default=100, help="timed repeats of each forward")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    malloc = "default" if args.system_malloc or not keep_freed_memory() else "keeps freed memory (mallopt)"
    tl.set_backend("pytorch")
    repeats = 5 if args.quick else args.repeats
    main_rows = [
        "| conv 3x3, 32x32 maps | Tucker-2 ranks | FLOP reduction | params dense / ours / tltorch | dense median "
        "| ours median | tltorch median | ours vs dense | ours vs tltorch | weight error ours / tltorch |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    variant_rows = [
        "| conv 3x3, 32x32 maps | Tucker2Conv (1x1 conv, channels-last core, GEMM last) | "
        + " | ".join(VARIANTS) + " |",
        "|---|---|" + "---|" * len(VARIANTS),
    ]
    for channels, batch in CASES:
        main_row, variant_row = run_case(channels, batch, repeats)
        main_rows.append(main_row)
        variant_rows.append(variant_row)
        print(main_row, flush=True)
    tables = "\n".join(main_rows) + "\n\nThe same Tucker-2 chain run other ways (median, speed-up over dense):\n\n"
    tables += "\n".join(variant_rows)
    print("\n" + tables)
    if args.record:
        record(
            "layers: factorized convolutions",
            tables,
            f"mkldnn {torch.backends.mkldnn.is_available()}, tensorly-torch {tltorch.__version__}, glibc malloc "
            f"{malloc}. Forward passes under `torch.no_grad()`, float32, medians of {repeats} alternating repeats "
            "in one process. Tucker-2 ranks keep 1/4 of the weight parameters (and MACs); tltorch gets Tucker ranks "
            "(r_out, r_in, 3, 3): the same factors and core plus two 3x3 spatial factors. Weight errors are relative "
            "Frobenius errors of the rebuilt kernel (random kernels, so both are large).",
        )


if __name__ == "__main__":
    main()
