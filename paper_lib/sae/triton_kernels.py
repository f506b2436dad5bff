"""Triton kernels of the "triton" gradient strategy (`kernels.strategy(grads="triton")`).

Both weight gradients of a TopK-family step are sums of selected rows: dW_dec[j] = sum over
selections (r, j) of val * g[r], and dW_enc^T[j] = sum of gp * x_c[r]. `segment_rows`
computes such sums with the selections ordered by column, one program per (latent, block
of d): no atomics, no dense [B, n] matrix, no 2 B d n products. `selected_dots` gives the
selected values' gradient <g[r], W_dec[j]> per selection, reading only the rows it needs.
Sums accumulate in fp32 whatever the operands' dtype. On a GPU each kernel's block sizes and
warp count are autotuned on first use (per d, and for `segment_rows` per mean selections per
latent, a power of two), so the H100's choice is measured, not guessed;
PAPER_LIB_TRITON_AUTOTUNE=0 (read at import) keeps each kernel's default configuration
instead, for correctness runs where tuning every small test shape would cost more device
time than the tests. `config=` runs one given candidate (the tests check each one).

On a machine without CUDA the kernels can run in Triton's interpreter: slow, but the same
code, which is how the CPU tests check them. The interpreter must be chosen before anything
imports Triton (torch._dynamo does): TRITON_INTERPRET=1 in the environment, as
tests/conftest.py sets it. Triton is optional (`pip install triton`; CUDA builds of torch
ship it).
"""

from __future__ import annotations

import itertools
import os

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction

# Triton's own helpers (tl.zeros, tl.sum) are interpreted only if Triton was imported so.
INTERPRETED = isinstance(tl.zeros, InterpretedFunction)


AUTOTUNE = os.environ.get("PAPER_LIB_TRITON_AUTOTUNE", "1") != "0"


def candidates(**grid: tuple[int, ...]) -> list[triton.Config]:
    """Every combination of `grid` (block sizes and num_warps) as a Triton config."""
    names = [k for k in grid if k != "num_warps"]
    return [triton.Config(dict(zip(names, values)), num_warps=w)
            for values in itertools.product(*(grid[k] for k in names))
            for w in grid["num_warps"]]


def _configs(default: dict[str, int], **grid: tuple[int, ...]) -> list[triton.Config]:
    """Autotuning candidates: `candidates(**grid)` on a GPU; the interpreter, which has no
    timer, and runs with autotuning off get `default` alone (a single config is never
    timed)."""
    if INTERPRETED or not AUTOTUNE:
        return [triton.Config(default, num_warps=4)]
    return candidates(**grid)


SEGMENT_ROWS_GRID = dict(BLOCK_S=(8, 16, 32), BLOCK_D=(128, 256), num_warps=(4, 8))
SELECTED_DOTS_GRID = dict(BLOCK_S=(16, 32, 64), BLOCK_D=(128, 256), num_warps=(4, 8))


@triton.autotune(_configs(dict(BLOCK_S=16, BLOCK_D=256), **SEGMENT_ROWS_GRID),
                 key=["d", "mean_run"])
@triton.jit
def _segment_rows_kernel(x_ptr, rows_ptr, coef_ptr, seg_ptr, out_ptr, d, stride_x, stride_out,
                         mean_run, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    # mean_run (selections per latent, rounded to a power of two) only keys the tuner
    j = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    in_d = offs < d
    start = tl.load(seg_ptr + j)
    end = tl.load(seg_ptr + j + 1)
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    i0 = start
    while i0 < end:  # not range(start, end): the interpreter cannot index with loaded scalars
        idx = i0 + tl.arange(0, BLOCK_S)
        ok = idx < end
        r = tl.load(rows_ptr + idx, mask=ok, other=0)
        c = tl.load(coef_ptr + idx, mask=ok, other=0.0).to(tl.float32)
        tile = tl.load(x_ptr + r[:, None] * stride_x + offs[None, :],
                       mask=ok[:, None] & in_d[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(tile * c[:, None], axis=0)
        i0 += BLOCK_S
    tl.store(out_ptr + j * stride_out + offs, acc, mask=in_d)


@triton.autotune(_configs(dict(BLOCK_S=32, BLOCK_D=128), **SELECTED_DOTS_GRID), key=["D"])
@triton.jit
def _selected_dots_kernel(a_ptr, b_ptr, rows_ptr, cols_ptr, out_ptr, m, stride_a, stride_b,
                          D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    idx = tl.program_id(0) * BLOCK_S + tl.arange(0, BLOCK_S)
    ok = idx < m
    r = tl.load(rows_ptr + idx, mask=ok, other=0)
    c = tl.load(cols_ptr + idx, mask=ok, other=0)
    acc = tl.zeros([BLOCK_S], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):  # D constexpr: a fixed trip count (and interpretable)
        offs = d0 + tl.arange(0, BLOCK_D)
        both = ok[:, None] & (offs < D)[None, :]
        a = tl.load(a_ptr + r[:, None] * stride_a + offs[None, :], mask=both, other=0.0)
        b = tl.load(b_ptr + c[:, None] * stride_b + offs[None, :], mask=both, other=0.0)
        acc += tl.sum(a.to(tl.float32) * b.to(tl.float32), axis=1)
    tl.store(out_ptr + idx, acc, mask=ok)


def check_device(*tensors: Tensor) -> None:
    """Refuse tensors the kernels cannot run on (CPU ones outside the interpreter)."""
    dev = tensors[0].device
    if dev.type != "cuda" and not INTERPRETED:
        raise ValueError(f"grads='triton' got {dev.type} tensors: its kernels run on CUDA, "
                         "or on a CPU in Triton's interpreter (TRITON_INTERPRET=1 set before "
                         "torch._dynamo is imported); pick grads='index' for CPU training")
    if any(t.device != dev for t in tensors):
        raise ValueError("grads='triton': all tensors must be on one device")


class ColumnOrder:
    """A selection's columns in ascending order: `perm` (selection ids, stable) and `seg`,
    [n + 1] offsets where each column's run starts in that order (CSR of the transpose)."""

    def __init__(self, cols: Tensor, n: int) -> None:
        # int32 keys (n < 2^31): a radix sort over half the key bits, same stable order
        self.perm = torch.argsort(cols.to(torch.int32), stable=True)
        self.seg = torch.searchsorted(cols[self.perm], torch.arange(n + 1, device=cols.device))


def _launcher(tuner: triton.runtime.Autotuner, config: triton.Config | None
              ) -> tuple[object, dict[str, int]]:
    """The kernel to launch and its extra arguments: the autotuner, or one given config."""
    if config is None:
        return tuner, {}
    return tuner.fn, {**config.kwargs, "num_warps": config.num_warps}


def segment_rows(x: Tensor, rows: Tensor, coef: Tensor, order: ColumnOrder,
                 config: triton.Config | None = None) -> Tensor:
    """[n, d] fp32: out[j] = sum over selections i with column j of coef[i] * x[rows[i]]."""
    check_device(x, rows, coef)
    x = x.contiguous()
    n, d = order.seg.numel() - 1, x.shape[1]
    out = torch.empty(n, d, dtype=torch.float32, device=x.device)
    mean_run = triton.next_power_of_2(max(1, rows.numel() // max(n, 1)))
    kernel, extra = _launcher(_segment_rows_kernel, config)
    kernel[lambda meta: (n, triton.cdiv(d, meta["BLOCK_D"]))](
        x, rows[order.perm].contiguous(), coef[order.perm].contiguous(), order.seg, out, d,
        x.stride(0), out.stride(0), mean_run, **extra)
    return out


def selected_dots(a: Tensor, b: Tensor, rows: Tensor, cols: Tensor,
                  config: triton.Config | None = None) -> Tensor:
    """[m] fp32 = <a[rows[i]], b[cols[i]]>, reading only the selected rows."""
    check_device(a, b, rows, cols)
    a, b = a.contiguous(), b.contiguous()
    m, d = rows.numel(), a.shape[1]
    out = torch.empty(m, dtype=torch.float32, device=a.device)
    if m:
        kernel, extra = _launcher(_selected_dots_kernel, config)
        kernel[lambda meta: (triton.cdiv(m, meta["BLOCK_S"]),)](
            a, b, rows.contiguous(), cols.contiguous(), out, m, a.stride(0), b.stride(0), D=d,
            **extra)
    return out
