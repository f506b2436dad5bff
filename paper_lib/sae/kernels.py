"""Sparse training path for SAEs whose codes are a selection of pre-activations.

A TopK-family step only needs the encoder forward dense (2 d n FLOP per token). Decoding
touches the k selected decoder rows, and both weight gradients are non-zero only for the
selected latents. `SparseEncode` computes pre-activations densely, lets the architecture
select (row, column) pairs (`select`), and in backward scatters gradients into the selected
encoder columns only (index_add); `sparse_decode` is an `embedding_bag` over the selected
decoder rows. The dense reference (`SAE.activation` + matrix products) stays one switch
away (`use_sparse(False)`), and tests check both give the same loss and gradients.

Gradient of b_dec through the encoder: x_c = x - b_dec, so dL/db_dec = -W_enc (dL/db_enc),
one matrix-vector product instead of a dense backward through the encoder.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

_MODE: str = "auto"  # "auto": sparse when at most 1/8 of the codes can be active
AUTO_MAX_DENSITY = 1 / 8


def sparse_mode() -> str:
    return _MODE


def want_sparse(expected_density: float | None) -> bool:
    """Whether an SAE whose codes are `expected_density` active (None: unknown, data-driven
    like top-AFA) takes the sparse path under the current mode."""
    if _MODE == "auto":
        return expected_density is not None and expected_density <= AUTO_MAX_DENSITY
    return _MODE == "sparse"


@contextlib.contextmanager
def use_sparse(enabled: bool | None) -> Iterator[None]:
    """The one switch: True forces the sparse path, False the dense reference (tests and
    benchmarks), None restores "auto"."""
    global _MODE
    old = _MODE
    _MODE = "auto" if enabled is None else ("sparse" if enabled else "dense")
    try:
        yield
    finally:
        _MODE = old


Select = Callable[[Tensor], tuple[Tensor, Tensor]]


class SparseEncode(torch.autograd.Function):
    """(x [B, d], W_enc [d, n], b_enc [n], b_dec [d]) -> (vals [m], rows [m], cols [m], pre [B, n])
    with vals = ReLU(pre[rows, cols]) for the (row-sorted) selection `select(pre)`."""

    @staticmethod
    def forward(ctx, x: Tensor, w_enc: Tensor, b_enc: Tensor, b_dec: Tensor,  # type: ignore
                select: Select) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        x_c = x - b_dec
        pre = torch.addmm(b_enc, x_c, w_enc)
        rows, cols = select(pre.detach())
        flat = rows * pre.shape[1] + cols
        vals = pre.view(-1).index_select(0, flat).relu()  # 1-D gather: cheaper than pre[r, c]
        ctx.save_for_backward(x_c, w_enc, rows, cols, vals)
        ctx.mark_non_differentiable(rows, cols)
        ctx.set_materialize_grads(False)  # an unused `pre` must not cost a dense backward
        return vals, rows, cols, pre

    @staticmethod
    def backward(ctx, g_vals: Tensor, _r: Tensor, _c: Tensor,  # type: ignore
                 g_pre: Tensor | None):
        x_c, w_enc, rows, cols, vals = ctx.saved_tensors
        n = w_enc.shape[1]
        if g_vals is None:
            g_vals = torch.zeros_like(vals)
        gp = g_vals * (vals > 0)                                   # [m] grad at selections
        g_b_enc = torch.zeros(n, dtype=gp.dtype, device=gp.device).index_add_(0, cols, gp)
        g_w_t = torch.zeros(n, x_c.shape[1], dtype=x_c.dtype, device=x_c.device)
        g_w_t.index_add_(0, cols, x_c.index_select(0, rows).mul_(gp[:, None].to(x_c.dtype)))
        g_w = g_w_t.T
        g_x_c = None
        if g_pre is not None:  # AuxK / multi-TopK read pre directly: dense fallback
            g_w = g_w + x_c.T @ g_pre.to(x_c.dtype)
            g_b_enc = g_b_enc + g_pre.sum(0).to(g_b_enc.dtype)
        if ctx.needs_input_grad[0]:
            dense = torch.zeros(x_c.shape[0], n, dtype=x_c.dtype, device=x_c.device)
            dense.index_put_((rows, cols), gp.to(x_c.dtype))
            if g_pre is not None:
                dense = dense + g_pre.to(x_c.dtype)
            g_x_c = dense @ w_enc.T
        g_b_dec = -(w_enc @ g_b_enc.to(w_enc.dtype)) if ctx.needs_input_grad[3] else None
        return (g_x_c, g_w.to(w_enc.dtype) if ctx.needs_input_grad[1] else None,
                g_b_enc if ctx.needs_input_grad[2] else None, g_b_dec, None)


def offsets_from_rows(rows: Tensor, batch: int) -> Tensor:
    """Bag offsets for embedding_bag from row ids sorted ascending."""
    counts = torch.bincount(rows, minlength=batch)
    return torch.cumsum(counts, 0) - counts


def sparse_decode(rows: Tensor, cols: Tensor, vals: Tensor, w_dec: Tensor, batch: int) -> Tensor:
    """[B, d] = sum over selections of vals * W_dec[cols], without the dense [B, n] codes."""
    return F.embedding_bag(cols, w_dec, offsets_from_rows(rows, batch), mode="sum",
                           per_sample_weights=vals.to(w_dec.dtype))


def row_topk(k: int) -> Select:
    """Selection of each row's k largest entries, as row-sorted (rows, cols)."""
    def select(pre: Tensor) -> tuple[Tensor, Tensor]:
        idx = pre.topk(k, dim=-1, sorted=False).indices
        rows = torch.arange(pre.shape[0], device=pre.device).repeat_interleave(k)
        return rows, idx.flatten()
    return select


def to_dense(rows: Tensor, cols: Tensor, vals: Tensor, shape: tuple[int, int]) -> Tensor:
    """Dense [B, n] codes from a selection (detached: bookkeeping only)."""
    out = torch.zeros(shape, dtype=vals.dtype, device=vals.device)
    out.index_put_((rows, cols), vals.detach())
    return out


def per_row_sum(rows: Tensor, values: Tensor, batch: int) -> Tensor:
    """[B] sums of `values` grouped by row."""
    return torch.zeros(batch, dtype=values.dtype, device=values.device).index_add(0, rows, values)
