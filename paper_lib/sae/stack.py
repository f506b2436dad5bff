"""Many SAEs per pass: TopK-family SAEs that differ only in seed and k, trained as one module.

A sweep of small SAEs (seeds for error bars, the k of a scaling law at one n) spends a
GPU step mostly launching kernels: every SAE's step is the same few dozen small kernels.
`SAEStack` lays G such SAEs (TopK, BatchTopK or Matryoshka) side by side,

    W_enc [d, G n],  b_enc [G n],  W_dec [G n, d],  b_dec [G, d],

and runs the training step once for all of them: one encoder product, one selection, one
grouped decode (a bag per sample and SAE, or per sample, SAE and nested group: Matryoshka's
mechanism, `kernels.sparse_decode`), one loss, one Adam over four tensors, one decoder
renormalisation. The loss is the sum of the G SAEs' own losses (reconstruction, or the
mean over Matryoshka's prefixes, plus AuxK per SAE: Gao et al. 2024 App. B.1), so each SAE
receives the gradient, and (with Adam's elementwise update and one shared lr) the update it
would get alone; only float rounding differs (tests/test_stack.py). TopK selects for all
SAEs at once, each keeping its own k (the top max(k) of each row, in order, each SAE its
first k); BatchTopK and Matryoshka select batch-wide per SAE (`select`).

One encoder product serves G centrings: with c the SAEs' mean b_dec (detached),
    (x - b_dec_g) W_g + b_enc_g = (x - c) W_g + [b_enc_g - (b_dec_g - c) W_g],
so x - c is shared, and the correction is small (SAEs trained on the same data start from
the same geometric median), which keeps the bf16 product as precise as a single SAE's.

While the stack trains, the SAEs' parameters are views of its tensors, so held-out
evaluations, eval_fn and checkpoints read current weights through the SAEs themselves;
`unstack_` gives each SAE its own contiguous tensors again (SAELens' files need them).
The forward returns an `SAEOutput` whose recon and recon_in are [B, G, d], pre [B, G n],
and for Matryoshka prefixes [B, G, m, d] (m nested groups per SAE).
"""

from __future__ import annotations

import json

import torch
from torch import Tensor, nn

from paper_lib.sae import kernels
from paper_lib.sae.base import (
    SAE,
    TOPK_FAMILY,
    SAEConfig,
    SAEOutput,
    remove_parallel_grad_,
    renorm_rows_,
)
from paper_lib.sae.registry import REGISTRY


def stack_key(cfg: SAEConfig) -> str | None:
    """What SAEs must share to train as one stack: their whole config but seed and k.
    None for a config that never stacks (outside the TopK family, or multi-TopK, whose
    L(4k) term needs the dense codes)."""
    if cfg.architecture not in TOPK_FAMILY or cfg.multi_topk:
        return None
    return json.dumps({**cfg.to_dict(), "seed": None, "k": None}, sort_keys=True, default=str)


def stack_groups(saes: list[SAE]) -> list[list[int]]:
    """Indices of the SAEs that can train as one `SAEStack`: groups of two or more SAEs of
    the registry's own classes with the same `stack_key`, on one device and dtype, each on
    the sparse path (`kernels.want_sparse`: a stack always runs sparse, so an SAE the
    current mode would train densely stays alone). In order of first appearance."""
    groups: dict[tuple, list[int]] = {}
    for i, sae in enumerate(saes):
        key = stack_key(sae.cfg)
        if key is None or not _plain(sae) or not kernels.want_sparse(sae.expected_density()):
            continue
        groups.setdefault((key, sae.W_enc.device, sae.W_enc.dtype), []).append(i)
    return [g for g in groups.values() if len(g) > 1]


@torch.compiler.disable
def largest(counts: Tensor) -> int:
    """The largest entry of an integer tensor as a Python int (a device sync), kept out of
    torch.compile's graphs like `base.count_true`: it decides AuxK's shapes."""
    return int(counts.max())


def _plain(sae: SAE) -> bool:
    """An SAE of its architecture's registered class (a subclass may change the step)."""
    return type(sae) is REGISTRY[sae.cfg.architecture]


class SAEStack(nn.Module):
    """G TopK-family SAEs trained as one module (see the module docstring); `saes` are the
    SAEs themselves, whose parameters become views of the stack's until `unstack_`."""

    def __init__(self, saes: list[SAE]) -> None:
        super().__init__()
        keys = {stack_key(s.cfg) for s in saes}
        if not saes or None in keys or len(keys) > 1 or not all(map(_plain, saes)):
            raise ValueError("an SAEStack takes TopK, BatchTopK or Matryoshka SAEs (no "
                             "multi-TopK) whose configs differ in seed and k only; "
                             "stack_groups(saes) finds them")
        self.saes = list(saes)  # a plain list: their parameters are not the stack's own
        self.cfg = saes[0].cfg
        """The shared config (d_sae = n per SAE; k is the first SAE's, see `ks`)."""
        self.ks = tuple(s.cfg.k for s in saes)
        g, n = len(saes), self.cfg.d_sae
        self.n_latents = g * n
        """Latents of the whole stack, G n: SAE g owns columns [g n, (g + 1) n)."""
        nested = saes[0].nested_ends or (n,)
        self.groups = len(nested)
        """Bags per sample and SAE in the decode: Matryoshka's nested groups m, else 1."""
        self.ends = tuple(a * n + e for a in range(g) for e in nested)
        with torch.no_grad():
            joined = {"W_enc": torch.cat([s.W_enc for s in saes], 1),
                      "b_enc": torch.cat([s.b_enc for s in saes]),
                      "W_dec": torch.cat([s.W_dec for s in saes]),
                      "b_dec": torch.stack([s.b_dec for s in saes])}
        for name, value in joined.items():
            setattr(self, name, nn.Parameter(value, getattr(saes[0], name).requires_grad))
        dev = self.W_enc.device
        # row b G + g of the [B G, n] pre-activations belongs to SAE g: its k, its offset
        self.register_buffer("k_of", torch.tensor(self.ks, device=dev), persistent=False)
        self.register_buffer("offset", torch.arange(g, device=dev) * n, persistent=False)
        self._bind_(lambda view: view)

    def _views(self, g: int) -> dict[str, Tensor]:
        """SAE g's slices of the stacked parameters (sharing their memory)."""
        a, b = g * self.cfg.d_sae, (g + 1) * self.cfg.d_sae
        return {"W_enc": self.W_enc.data[:, a:b], "b_enc": self.b_enc.data[a:b],
                "W_dec": self.W_dec.data[a:b], "b_dec": self.b_dec.data[g]}

    def _bind_(self, make) -> None:
        """Point every SAE's parameters at make(its view) (the view itself, or a copy)."""
        for g, sae in enumerate(self.saes):
            for name, view in self._views(g).items():
                setattr(sae, name, nn.Parameter(make(view), getattr(sae, name).requires_grad))

    @torch.no_grad()
    def unstack_(self) -> None:
        """Give every SAE its own contiguous copy of its current parameters: the SAEs are
        independent again, and the stack no longer trains them."""
        self._bind_(lambda view: view.clone())

    # -- the step ------------------------------------------------------------------------
    def _centred(self, w: Tensor, b: Tensor, width: int) -> tuple[Tensor, Tensor]:
        """(c, per-column bias) for encoder columns w [d, G width] with biases b [G width],
        SAE g owning columns [g width, (g + 1) width): (x - c) w + bias is the shared-centring
        form of (x - b_dec_g) w_g + b_g (module docstring)."""
        c = self.b_dec.detach().mean(0)
        g = self.b_dec.shape[0]
        # every SAE's offset against every SAE's columns, then each SAE's own block: G times
        # the products needed (G / B of the encoder's), but no permuted copy of w, forward
        # or backward (an einsum over w viewed [d, G, width] copied all of W_enc each step)
        full = (self.b_dec - c) @ w                                    # [G, G width]
        shift = full.view(g, g, width).diagonal(dim1=0, dim2=1).T     # [G, width]
        return c, b - shift.reshape(-1)

    def _select(self, pre: Tensor, x_in: Tensor) -> tuple[Tensor, Tensor]:
        """(rows, cols) of every SAE's selection, ordered by sample, then SAE, then column:
        each bag of the grouped decode contiguous and ascending, as it needs."""
        g_count, n = len(self.ks), self.cfg.d_sae
        if self.cfg.architecture != "topk":  # batch-wide, each SAE on its own block
            sel = [sae.select(pre[:, g * n:(g + 1) * n].contiguous(), x_in)
                   for g, sae in enumerate(self.saes)]
            rows = torch.cat([r for r, _ in sel])
            cols = torch.cat([c + g * n for g, (_, c) in enumerate(sel)])
            # each SAE's selection is (row, column)-ordered: a stable sort by (row, SAE)
            order = (rows * g_count + cols.div(n, rounding_mode="floor")).argsort(stable=True)
            return rows[order], cols[order]
        flat = pre.view(-1, n)                       # [B G, n]: row b G + g is SAE g's
        if len(set(self.ks)) == 1:
            r, c = kernels.row_topk(self.ks[0])(flat)
        else:  # the top max(k) in order; each SAE keeps its first k_g
            kmax = max(self.ks)
            idx = flat.topk(kmax, dim=-1).indices   # [B G, kmax], largest first
            keep = torch.arange(kmax, device=pre.device) < self.k_of.repeat(
                flat.shape[0] // g_count)[:, None]
            r = torch.arange(flat.shape[0], device=pre.device)[:, None].expand_as(idx)[keep]
            c = idx[keep]
        return r.div(g_count, rounding_mode="floor"), c + self.offset[r % g_count]

    def forward(self, x: Tensor) -> SAEOutput:
        """Every SAE's sparse forward at once: recon and recon_in [B, G, d]."""
        x_in, mu, sd = self.saes[0].prepare(x)      # one config: one standardisation
        c, bias = self._centred(self.W_enc, self.b_enc, self.cfg.d_sae)
        shared: dict = {}  # what both backward passes derive from the selection
        vals, rows, cols, pre = kernels.SparseEncode.apply(
            x_in, self.W_enc, bias, c, lambda p: self._select(p, x_in), shared)
        batch, g_count = x.shape[0], len(self.saes)
        parts = kernels.sparse_decode(rows, cols, vals, self.W_dec, batch, self.ends, shared)
        parts = parts.view(batch, g_count, self.groups, -1)          # [B, G, m, d]
        prefixes = None
        if self.groups > 1:  # running sums in the weights' precision (parts may be bf16)
            prefixes = parts.cumsum(2, dtype=self.W_dec.dtype) + self.b_dec[:, None]
            recon_in = prefixes[:, :, -1]
        else:
            recon_in = parts[:, :, 0] + self.b_dec                     # [B, G, d]
        recon = recon_in if mu is None else recon_in * sd[:, None] + mu[:, None]
        return SAEOutput(None, recon, pre, x_in, recon_in, (rows, cols, vals), prefixes)

    def loss(self, out: SAEOutput, dead_mask: Tensor | None) -> dict[str, Tensor]:
        """The sum over the SAEs of their own loss terms (`SAE.loss`): reconstruction (for
        Matryoshka the mean over its prefixes, `MatryoshkaSAE.recon_loss`) and, where
        configured, AuxK. `dead_mask`: [G n] bool."""
        if out.prefixes is None:
            per_sae = (out.x_in[:, None] - out.recon_in).pow(2).sum(-1).mean(0)        # [G]
        else:
            per_sae = (out.x_in[:, None, None] - out.prefixes).pow(2).sum(-1).mean(0).mean(1)
        terms = {"mse": per_sae.sum()}
        terms.update(self.auxk_loss(out, dead_mask))
        return terms

    def auxk_loss(self, out: SAEOutput, dead_mask: Tensor | None) -> dict[str, Tensor]:
        """Each SAE's AuxK term (`SAE.auxk_loss`, sparse form), summed: its top k_aux dead
        latents, pre-activations from their own encoder columns, reconstruct its residual.
        The SAEs' dead columns are gathered side by side, padded to the largest count with
        masked (-inf) entries, so one product and one top-k serve all of them."""
        if not self.cfg.auxk or dead_mask is None:
            return {}
        g_count, n = len(self.ks), self.cfg.d_sae
        dead = dead_mask.view(g_count, n)
        counts = dead.sum(1)                                                  # [G]
        most = largest(counts)                                                # a device sync
        if most == 0:
            return {}
        # each SAE's dead columns first, in column order, then live ones as padding
        cols = (~dead).to(torch.int8).argsort(dim=1, stable=True)[:, :most]  # [G, most]
        valid = torch.arange(most, device=dead.device) < counts[:, None]
        flat = (cols + self.offset[:, None]).reshape(-1)                      # [G most]
        w = self.W_enc[:, flat]
        c, bias = self._centred(w, self.b_enc[flat], most)
        pre = torch.addmm(bias, out.x_in - c, w).view(-1, g_count, most)  # [B, G, most]
        pre = pre.masked_fill(~valid, -torch.inf)
        vals, pos = pre.topk(min(self.cfg.k_aux, most), dim=-1)              # [B, G, k_aux]
        codes = torch.zeros_like(pre).scatter(-1, pos, vals.relu())           # -inf -> 0
        e_hat = torch.einsum("bgm,gmd->bgd", codes, self.W_dec[flat].view(g_count, most, -1))
        e = (out.x_in[:, None] - out.recon_in).detach()
        per_sae = (e - e_hat).pow(2).sum(-1).mean(0) * (counts > 0)          # none dead: 0
        return {"auxk": self.cfg.aux_coeff * per_sae.sum()}

    def before_step_(self) -> None:
        if self.cfg.unit_norm_decoder:
            remove_parallel_grad_(self.W_dec)

    def after_step_(self) -> None:
        if self.cfg.unit_norm_decoder:
            renorm_rows_(self.W_dec)
