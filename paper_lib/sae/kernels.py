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

Exact alternatives per piece, picked with `strategy(...)` (which is fastest depends on
the GPU; `python -m paper_lib.bench` times every combination in one run):
- weight gradients (and decoding): "index" scatters with index_add / embedding_bag
  (atomics); "csr" builds the selection as a CSR matrix S [B, n] and uses sparse x dense
  products (cuSPARSE on CUDA): decode S W_dec, dW_dec = S^T g, dW_enc = x_c^T G, in the
  autocast dtype; the gradient of the selected values is one row-dot per selection, since
  the sampled product (SDDMM) that would compute it has no bf16 kernel (CPU or CUDA);
  "gemm" decodes with embedding_bag (a gather: no atomics) and writes S and G into dense
  [B, n] matrices for the backward, so both weight gradients and the selected values'
  gradient are dense matrix products (2 B d n FLOP each) in the autocast dtype: more
  FLOP than the sparse kernels, but on a GPU whose matrix units far outrun its atomics
  that can be the cheaper trade;
  "triton" decodes with embedding_bag and computes both weight gradients and the
  selected values' gradient with Triton kernels over the selected rows only
  (`triton_kernels`: selections ordered by column once per step, one program per latent
  and block of d, fp32 sums, block sizes autotuned on the GPU): neither atomics nor
  extra dense products. "gemm" and "triton" decode from W_dec cast once to the autocast
  dtype, which their backward reuses;
- TopK selection: "full" is torch.topk over each row; "blockmax" splits each row into
  blocks of about sqrt(n / k) columns, keeps the k blocks with the largest maxima and
  takes the top k of their entries (exact, see `blockmax_topk_indices`): one pass over
  the [B, n] pre-activations for the block maxima, then two top-k over ~sqrt(n k)
  entries per row instead of one radix select over n.
"""

from __future__ import annotations

import contextlib
import math
import warnings
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


GRADS = ("index", "csr", "gemm", "triton")
TOPK = ("full", "blockmax")
_STRATEGY = {"grads": "auto", "topk": "full"}


def grads_for(device: torch.device) -> str:
    """The GRADS choice in force on `device`. "auto" (the default): gemm on CUDA, the fastest
    on an H100 (results/bench: 0.91 against 0.76 M tok/s for index at d=768, n=32768,
    batch 4096; csr has no bf16 kernel there), index elsewhere (no extra dense products)."""
    g = _STRATEGY["grads"]
    return g if g != "auto" else ("gemm" if device.type == "cuda" else "index")


def current_strategy() -> dict[str, str]:
    return dict(_STRATEGY)


@contextlib.contextmanager
def strategy(grads: str | None = None, topk: str | None = None) -> Iterator[None]:
    """Choose the sparse path's gradient/decoding kernels (GRADS) and TopK selection
    (TOPK) inside the block; None keeps the current choice. Read at forward time."""
    for name, value, allowed in (("grads", grads, (*GRADS, "auto")), ("topk", topk, TOPK)):
        if value is not None and value not in allowed:
            raise ValueError(f"{name}={value!r}: choose one of {', '.join(allowed)}")
    if grads == "triton":
        _triton()  # fail here, before any compute, where Triton is missing
    old = dict(_STRATEGY)
    _STRATEGY.update({k: v for k, v in (("grads", grads), ("topk", topk)) if v is not None})
    try:
        yield
    finally:
        _STRATEGY.update(old)


def _triton():
    """The Triton kernels module (imported on first use: Triton is optional)."""
    try:
        from paper_lib.sae import triton_kernels
    except ImportError as e:
        raise ValueError(f"grads='triton' needs Triton ({e}): `pip install triton` (CUDA "
                         "builds of torch ship it), or pick grads='gemm' or 'index'") from None
    return triton_kernels


def compute_dtype(t: Tensor) -> torch.dtype:
    """The dtype matrix products run in here: autocast's, else t's own."""
    dev = t.device.type
    if torch.is_autocast_enabled(dev):
        return torch.get_autocast_dtype(dev)
    return t.dtype


@contextlib.contextmanager
def _quiet_csr() -> Iterator[None]:
    """torch warns that CSR support is in beta on first use: not the user's concern."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        yield


def csr(rows: Tensor, cols: Tensor, vals: Tensor, shape: tuple[int, int]) -> Tensor:
    """CSR matrix of a selection sorted by (row, col) (see `sort_selection`)."""
    crow = torch.searchsorted(rows, torch.arange(shape[0] + 1, device=rows.device))
    with _quiet_csr():
        return torch.sparse_csr_tensor(crow, cols, vals, shape, check_invariants=False)


def sort_selection(rows: Tensor, cols: Tensor, n: int) -> tuple[Tensor, Tensor]:
    """(rows, cols) ordered by row, then column, as CSR kernels expect."""
    order = (rows * n + cols).argsort()
    return rows[order], cols[order]


def _spmm(a: Tensor, b: Tensor) -> Tensor:
    with _quiet_csr():
        return torch.sparse.mm(a, b)


Select = Callable[[Tensor], tuple[Tensor, Tensor]]


class SparseEncode(torch.autograd.Function):
    """(x [B, d], W_enc [d, n], b_enc [n], b_dec [d]) -> (vals [m], rows [m], cols [m], pre [B, n])
    with vals = ReLU(pre[rows, cols]) for the (row-sorted) selection `select(pre)`."""

    @staticmethod
    def forward(ctx, x: Tensor, w_enc: Tensor, b_enc: Tensor, b_dec: Tensor,  # type: ignore
                select: Select, shared: dict | None = None
                ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        ctx.grads = grads_for(x.device)
        if ctx.grads == "triton":  # refuse tensors its kernels cannot take, before any compute
            _triton().check_device(x, w_enc)
        x_c = x - b_dec
        pre = torch.addmm(b_enc, x_c, w_enc)
        rows, cols = select(pre.detach())
        ctx.dtype, ctx.shared = pre.dtype, shared
        if ctx.grads == "csr":
            rows, cols = sort_selection(rows, cols, pre.shape[1])
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
        if g_pre is not None:  # AuxK / multi-TopK read pre directly: dense fallback
            g_b_enc = g_b_enc + g_pre.sum(0).to(g_b_enc.dtype)
        dense = None  # G [B, n]: the gemm strategy's operand, or for the input gradient
        if ctx.grads == "gemm" or ctx.needs_input_grad[0]:
            dt = ctx.dtype if ctx.grads == "gemm" else x_c.dtype
            dense = scatter_dense(rows * n + cols, gp.to(dt), (x_c.shape[0], n))
            if g_pre is not None:
                dense += g_pre.to(dt)
        if ctx.grads == "gemm":  # one product, AuxK's dense part included
            g_w = x_c.to(dense.dtype).T @ dense
        elif ctx.grads == "triton":  # dW_enc^T[j] = sum of gp * x_c[row] over column j
            tk = _triton()
            order = column_order(ctx.shared, cols, n)
            g_w = tk.segment_rows(x_c.to(ctx.dtype), rows, gp, order).T
        elif ctx.grads == "csr":  # dW_enc^T = G^T x_c, G the [B, n] CSR of selected grads
            g_sel = csr(rows, cols, gp.to(ctx.dtype), (x_c.shape[0], n))
            g_w = _spmm(g_sel.t(), x_c.to(ctx.dtype)).T
        else:
            g_w_t = torch.zeros(n, x_c.shape[1], dtype=x_c.dtype, device=x_c.device)
            g_w_t.index_add_(0, cols, x_c.index_select(0, rows).mul_(gp[:, None].to(x_c.dtype)))
            g_w = g_w_t.T
        if g_pre is not None and ctx.grads != "gemm":
            g_w = g_w + x_c.T @ g_pre.to(x_c.dtype)
        g_x_c = None
        if ctx.needs_input_grad[0]:
            g_x_c = (dense @ w_enc.to(dense.dtype).T).to(x_c.dtype)
        g_b_dec = -(w_enc @ g_b_enc.to(w_enc.dtype)) if ctx.needs_input_grad[3] else None
        return (g_x_c, g_w.to(w_enc.dtype) if ctx.needs_input_grad[1] else None,
                g_b_enc if ctx.needs_input_grad[2] else None, g_b_dec, None, None)


def column_order(shared: dict | None, cols: Tensor, n: int):
    """The triton strategy's `ColumnOrder` of a selection, computed once per forward pass:
    the decoder's and the encoder's backward share it through `shared` (one dict per
    forward, see `SAE.forward`), so the selection is sorted by column once, not twice."""
    if shared is None:
        return _triton().ColumnOrder(cols, n)
    if "column_order" not in shared:
        shared["column_order"] = _triton().ColumnOrder(cols, n)
    return shared["column_order"]


def offsets_from_rows(rows: Tensor, batch: int) -> Tensor:
    """Bag offsets for embedding_bag from row ids sorted ascending: where each row starts
    (a binary search with a fixed output shape, which torch.compile traces)."""
    return torch.searchsorted(rows, torch.arange(batch, device=rows.device))


def sparse_decode(rows: Tensor, cols: Tensor, vals: Tensor, w_dec: Tensor, batch: int,
                  ends: tuple[int, ...] | None = None, shared: dict | None = None) -> Tensor:
    """[B, d] = sum over selections of vals * W_dec[cols], without the dense [B, n] codes.
    Selections sorted by row (by row and column for the "csr" strategy, or with `ends`).

    With `ends` (nested group ends m_1 < ... < m_G = n, as a Matryoshka SAE has) the
    result is [B, G, d]: group g's own decode, over columns [m_{g-1}, m_g), each
    selection landing in its (row, group) bag, so all G cost one decode; their running sum
    over g gives every nested prefix's reconstruction. `shared`: the dict passed to
    `SparseEncode` for the same selection (see `column_order`).

    The gemm and triton strategies decode with W_dec cast once to the compute dtype (bf16
    under autocast; fp32 sums), which their backward reuses: the gather reads half the
    bytes of fp32 rows, and the result is as precise as the dense reference's bf16 product."""
    n_groups = 1 if ends is None else len(ends)
    bags = rows
    if n_groups > 1:  # group of each column from G-1 comparisons: no index tensor to ship
        group = torch.zeros_like(cols)
        for end in ends[:-1]:
            group += cols >= end
        bags = rows * n_groups + group  # ascending: selections are (row, column)-sorted
    grads = grads_for(vals.device)
    if grads == "csr":
        out = CsrDecode.apply(bags, cols, vals, w_dec, batch * n_groups)
    elif grads == "gemm":
        out = GemmDecode.apply(bags, cols, vals, w_dec, batch, tuple(ends or (w_dec.shape[0],)))
    elif grads == "triton":
        out = TritonDecode.apply(bags, cols, vals, w_dec, batch * n_groups, shared)
    else:
        out = bag_decode(bags, cols, vals, w_dec, batch * n_groups)
    return out if ends is None else out.view(batch, n_groups, -1)


def bag_decode(rows: Tensor, cols: Tensor, vals: Tensor, w_dec: Tensor, batch: int) -> Tensor:
    """The gather form of decoding: one embedding_bag sum of weighted decoder rows per row."""
    return F.embedding_bag(cols, w_dec, offsets_from_rows(rows, batch), mode="sum",
                           per_sample_weights=vals.to(w_dec.dtype))


def _decode_saving_weights(ctx, bags: Tensor, cols: Tensor, vals: Tensor, w_dec: Tensor,
                           n_bags: int) -> Tensor:
    """The gemm and triton decoders' forward: W_dec cast once to the compute dtype, saved
    (with the selection) for their backward, and decoded from by embedding_bag."""
    ctx.dtype, ctx.w_dtype = compute_dtype(w_dec), w_dec.dtype
    w = w_dec.detach().to(ctx.dtype)
    ctx.save_for_backward(bags, cols, vals, w)
    with torch.no_grad():
        return bag_decode(bags, cols, vals, w, n_bags)


class CsrDecode(torch.autograd.Function):
    """S W_dec with S the [B, n] CSR of the selection; backward: dW_dec = S^T g and
    d vals = <g[row], W_dec[col]> per selection (`selected_dots`), never a dense [B, n]."""

    @staticmethod
    def forward(ctx, rows: Tensor, cols: Tensor, vals: Tensor, w_dec: Tensor,  # type: ignore
                batch: int) -> Tensor:
        dt = compute_dtype(w_dec)
        w = w_dec.to(dt)
        s = csr(rows, cols, vals.detach().to(dt), (batch, w_dec.shape[0]))
        ctx.save_for_backward(w, rows, cols)
        ctx.s, ctx.vals_dtype, ctx.w_dtype = s, vals.dtype, w_dec.dtype
        return _spmm(s, w)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore
        w, rows, cols = ctx.saved_tensors
        g = g.to(w.dtype)
        g_vals = g_w = None
        if ctx.needs_input_grad[2]:
            g_vals = selected_dots(g, w, rows, cols).to(ctx.vals_dtype)
        if ctx.needs_input_grad[3]:
            g_w = _spmm(ctx.s.t(), g).to(ctx.w_dtype)
        return None, None, g_vals, g_w, None


def selected_dots(a: Tensor, b: Tensor, rows: Tensor, cols: Tensor) -> Tensor:
    """[m] = <a[rows[i]], b[cols[i]]>: (a b^T) read at the selection only, what a sampled
    product (SDDMM) gives, in any dtype (torch's sampled_addmm has no bf16 kernel)."""
    return (a.index_select(0, rows) * b.index_select(0, cols)).sum(-1)


class GemmDecode(torch.autograd.Function):
    """embedding_bag decoding into (row, group) bags; backward by dense products over S
    [B, n] (the codes, in the compute dtype), one per group over its own columns so that
    all of them together cost one product: dW_dec = S^T g, d vals = (g W_dec^T) read at
    the selection. One group (`ends` = (n,)) is plain decoding."""

    @staticmethod
    def forward(ctx, bags: Tensor, cols: Tensor, vals: Tensor, w_dec: Tensor,  # type: ignore
                batch: int, ends: tuple[int, ...]) -> Tensor:
        ctx.ends = ends
        return _decode_saving_weights(ctx, bags, cols, vals, w_dec, batch * len(ends))

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore
        bags, cols, vals, w = ctx.saved_tensors
        n, ends = w.shape[0], ctx.ends
        g = g.to(ctx.dtype).reshape(-1, len(ends), w.shape[1])  # [B, G, d]
        flat = bags.div(len(ends), rounding_mode="floor") * n + cols
        spans = list(zip((0,) + ends[:-1], ends))
        g_vals = g_w = None
        if ctx.needs_input_grad[2]:
            g_codes = _cat([g[:, j] @ w[a:b].T for j, (a, b) in enumerate(spans)], 1)
            g_vals = g_codes.view(-1).index_select(0, flat).to(vals.dtype)
        if ctx.needs_input_grad[3]:
            s = scatter_dense(flat, vals.detach().to(ctx.dtype), (g.shape[0], n))
            g_w = _cat([s[:, a:b].T @ g[:, j] for j, (a, b) in enumerate(spans)], 0)
            g_w = g_w.to(ctx.w_dtype)
        return None, None, g_vals, g_w, None, None


class TritonDecode(torch.autograd.Function):
    """embedding_bag decoding into bags; backward by the Triton kernels, reading only the
    selected rows: d vals = <g[bag], W_dec[col]> per selection, dW_dec[j] = sum of
    vals * g[bag] over the selections of column j (no atomics, no dense [B, n])."""

    @staticmethod
    def forward(ctx, bags: Tensor, cols: Tensor, vals: Tensor, w_dec: Tensor,  # type: ignore
                n_bags: int, shared: dict | None = None) -> Tensor:
        _triton().check_device(w_dec, vals)
        ctx.shared = shared
        return _decode_saving_weights(ctx, bags, cols, vals, w_dec, n_bags)

    @staticmethod
    def backward(ctx, g: Tensor):  # type: ignore
        bags, cols, vals, w = ctx.saved_tensors
        tk = _triton()
        g = g.to(ctx.dtype)
        g_vals = g_w = None
        if ctx.needs_input_grad[2]:
            g_vals = tk.selected_dots(g, w, bags, cols).to(vals.dtype)
        if ctx.needs_input_grad[3]:
            order = column_order(ctx.shared, cols, w.shape[0])
            g_w = tk.segment_rows(g, bags, vals.detach().to(ctx.dtype), order).to(ctx.w_dtype)
        return None, None, g_vals, g_w, None, None


def _cat(parts: list[Tensor], dim: int) -> Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)  # one part: no copy


def scatter_dense(flat: Tensor, values: Tensor, shape: tuple[int, int]) -> Tensor:
    """Dense matrix with `values` at the (distinct) flat positions, zeros elsewhere."""
    out = torch.zeros(shape, dtype=values.dtype, device=values.device)
    out.view(-1).index_copy_(0, flat, values)
    return out


def row_topk(k: int) -> Select:
    """Selection of each row's k largest entries, as row-sorted (rows, cols), by the
    current "topk" strategy."""
    def select(pre: Tensor) -> tuple[Tensor, Tensor]:
        batch, n = pre.shape
        block = topk_block(n, k) if _STRATEGY["topk"] == "blockmax" else None
        if block is not None:
            idx = blockmax_topk_indices(pre, k, block)
        else:
            idx = pre.topk(k, dim=-1, sorted=False).indices
        rows = torch.arange(batch, device=pre.device).repeat_interleave(k)
        return rows, idx.flatten()
    return select


def topk_block(n: int, k: int) -> int | None:
    """Block width for `blockmax_topk_indices`: the power of two nearest sqrt(n / k), which
    balances its two top-k (over n / block maxima, and over k * block candidates); None
    where no block of at least 2 columns leaves k or more whole blocks (use torch.topk)."""
    if k < 1 or n < 4 * k:
        return None
    block = 1 << max(1, round(0.5 * math.log2(n / k)))
    while block > 1 and (n % block or n // block < k):
        block //= 2
    return block if block > 1 else None


def blockmax_topk_indices(pre: Tensor, k: int, block: int) -> Tensor:
    """[B, k] column indices of each row's k largest entries (ties broken arbitrarily).

    Exact: let v be a row's k-th largest value. An entry > v lies in a block whose maximum
    is > v, and fewer than k blocks hold such entries, so the k blocks with the largest
    maxima include them all; the remaining chosen blocks each have maximum v, or else every
    block whose maximum is v was chosen. Either way the chosen blocks hold k entries >= v."""
    batch, n = pre.shape
    blocks = pre.reshape(batch, n // block, block)
    top_blocks = blocks.amax(-1).topk(k, dim=-1, sorted=False).indices        # [B, k]
    cand = blocks.gather(1, top_blocks[:, :, None].expand(batch, k, block))   # [B, k, block]
    pos = cand.reshape(batch, k * block).topk(k, dim=-1, sorted=False).indices   # [B, k]
    return top_blocks.gather(1, pos // block) * block + pos % block


def to_dense(rows: Tensor, cols: Tensor, vals: Tensor, shape: tuple[int, int]) -> Tensor:
    """Dense [B, n] codes from a selection (detached: bookkeeping only)."""
    return scatter_dense(rows * shape[1] + cols, vals.detach(), shape)


def per_row_sum(rows: Tensor, values: Tensor, batch: int) -> Tensor:
    """[B] sums of `values` grouped by row."""
    return torch.zeros(batch, dtype=values.dtype, device=values.device).index_add(0, rows, values)
