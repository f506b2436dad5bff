"""The shared SAE base: configuration, parameters, the decoder constraint and AuxK.

Parameters use SAELens names and shapes so saved files load there:
W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in].
Every architecture computes pre-activations (x - b_dec) W_enc + b_enc and differs in
its nonlinearity (`activation`) and its extra loss terms (`extra_loss`); the trainer
(paper_lib.train) is the same for all of them.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from paper_lib.sae import kernels

ARCHITECTURES = ("relu", "topk", "batchtopk", "matryoshka", "topafa", "mlp")
"""The architectures this package trains."""
READ_ONLY = ("jumprelu",)
"""Architectures it only reads, from SAELens' files (see paper_lib.sae.io)."""
TOPK_FAMILY = ("topk", "batchtopk", "matryoshka")
GAO_DEAD_TOKENS = 10_000_000
"""Gao et al.'s dead-latent window (App. B.1): no firing in this many training tokens."""


@dataclass(frozen=True)
class SAEConfig:
    """Everything that defines one SAE; saved as `cfg.json` beside its weights."""

    architecture: str
    """One of ARCHITECTURES."""
    d_in: int
    """Input width (the LM's d_model, or M for synthetic data)."""
    d_sae: int
    """Number of latents n."""
    k: int = 0
    """TopK family: active latents per sample (BatchTopK/Matryoshka: on average)."""
    l1_coeff: float = 0.0
    """ReLU / MLP: weight of the L1 penalty sum_i z_i ||W_dec,i||."""
    auxk: bool = True
    """Add the AuxK loss on dead latents where the architecture supports it."""
    aux_k: int = 0
    """Dead latents the AuxK loss uses; 0 means min(512, d_in // 2) (Gao et al. App. B.1)."""
    aux_coeff: float = 1 / 32
    """AuxK loss weight alpha (Gao et al.: 1/32)."""
    dead_tokens: int = GAO_DEAD_TOKENS
    """A latent is dead after this many training tokens without firing (Gao et al.: 10M)."""
    tied_init: bool = True
    """Initialise W_enc as W_dec transposed (Gao et al. Sec. 2.4)."""
    multi_topk: bool = False
    """TopK: add L(4k)/8 to the loss so the SAE generalises to other k (Gao et al. 5.3)."""
    group_fractions: tuple[float, ...] = (1 / 16, 1 / 16, 1 / 8, 1 / 4, 1 / 2)
    """Matryoshka: nested group sizes as fractions of d_sae, summing to 1."""
    afa_lambda: float = 1 / 32
    """top-AFA: weight of the norm-matching loss mean((||f|| - ||x||)^2) against a
    per-element MSE, as in the authors' code (see paper_lib.sae.topafa)."""
    mlp_hidden: int = 0
    """MLP encoder: hidden width (O'Neill et al.)."""
    standardize_input: bool = False
    """Standardise each input row (zero mean, unit std) as Lee et al. do; undone on output."""
    decoder_bias: bool = True
    """Learn b_dec (False keeps it at zero: noiseless synthetic data X = S D)."""
    freeze_decoder: bool = False
    """Keep W_dec fixed (the amortisation gap's known-dictionary setting)."""
    unit_norm_decoder: bool | None = None
    """Constrain decoder rows to unit norm; None picks the architecture's default."""
    hook_name: str = ""
    model_name: str = ""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES + READ_ONLY:
            raise ValueError(f"unknown architecture {self.architecture!r}; "
                             f"choose one of {', '.join(ARCHITECTURES)}")
        if self.d_in <= 0 or self.d_sae <= 0:
            raise ValueError(f"d_in={self.d_in} and d_sae={self.d_sae} must be positive")
        if self.architecture in TOPK_FAMILY:
            if self.k <= 0:
                raise ValueError(f"k={self.k} must be >= 1 for a {self.architecture} SAE")
            if self.k > self.d_sae:
                raise ValueError(f"k={self.k} exceeds d_sae={self.d_sae}: a TopK SAE cannot "
                                 "keep more latents than it has")
        if self.architecture == "matryoshka":
            fr = self.group_fractions
            if any(f <= 0 for f in fr) or abs(sum(fr) - 1) > 1e-6:
                raise ValueError(f"group_fractions={fr} must be positive and sum to 1")
            if len(fr) > self.d_sae:
                raise ValueError(f"{len(fr)} Matryoshka groups need d_sae >= {len(fr)}")
        if self.architecture == "mlp" and self.mlp_hidden <= 0:
            raise ValueError("an mlp SAE needs mlp_hidden >= 1")
        if self.l1_coeff < 0 or self.aux_coeff < 0 or self.afa_lambda < 0:
            raise ValueError("loss coefficients must be >= 0")
        if self.dead_tokens <= 0:
            raise ValueError(f"dead_tokens={self.dead_tokens} must be positive")
        object.__setattr__(self, "group_fractions", tuple(float(f) for f in self.group_fractions))
        if self.unit_norm_decoder is None:
            object.__setattr__(self, "unit_norm_decoder", self.architecture in TOPK_FAMILY
                               or self.architecture == "topafa")

    @property
    def k_aux(self) -> int:
        return self.aux_k or min(512, max(1, self.d_in // 2))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "SAEConfig":
        names = {f.name for f in fields(cls)}
        missing = [n for n in ("architecture", "d_in", "d_sae") if n not in d]
        if missing:
            raise ValueError(f"SAE config lacks required key(s) {missing}")
        kw = {k: v for k, v in d.items() if k in names}
        if "group_fractions" in kw:
            kw["group_fractions"] = tuple(kw["group_fractions"])
        return cls(**kw)

    def short(self) -> str:
        extra = f"k{self.k}" if self.architecture in TOPK_FAMILY else (
            f"l1={self.l1_coeff:g}" if self.architecture in ("relu", "mlp") else "")
        return f"{self.architecture}-n{self.d_sae}-{extra}".rstrip("-")

    def json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


class SAEOutput:
    """What `SAE.forward` returns (attribute access, like a named tuple)."""

    __slots__ = ("_codes", "recon", "pre", "x_in", "recon_in", "sel", "prefixes")

    def __init__(self, codes: Tensor | None, recon: Tensor, pre: Tensor, x_in: Tensor,
                 recon_in: Tensor, sel: tuple[Tensor, Tensor, Tensor] | None = None,
                 prefixes: Tensor | None = None) -> None:
        self._codes = codes
        self.recon = recon
        """[B, d] reconstruction in input units."""
        self.pre = pre
        """[B, n] pre-activations (AuxK picks dead latents from these)."""
        self.x_in = x_in
        """[B, d] the input the SAE sees (standardised when standardize_input)."""
        self.recon_in = recon_in
        """[B, d] reconstruction of x_in (the same tensor as recon unless standardised)."""
        self.sel = sel
        """Sparse path only: (rows, cols, vals) of the active codes, vals carrying gradients."""
        self.prefixes = prefixes
        """Sparse path of a nested SAE only: [B, G, d] reconstructions of x_in from each
        nested prefix of the latents, smallest first (the last is recon_in)."""

    @property
    def codes(self) -> Tensor:
        """[B, n] latent activations. On the sparse path a detached dense copy, built only
        when read (the training loop itself never needs it)."""
        if self._codes is None:
            rows, cols, vals = self.sel
            self._codes = kernels.to_dense(rows, cols, vals, tuple(self.pre.shape))
        return self._codes

    def fired(self) -> Tensor:
        """[n] bool: latents active on at least one row of the batch."""
        if self.sel is None:
            return (self._codes > 0).any(0)
        _, cols, vals = self.sel
        # fixed shapes (no boolean-mask indexing), so torch.compile traces it whole
        hits = torch.zeros(self.pre.shape[1], dtype=torch.float32, device=cols.device)
        return hits.index_add_(0, cols, (vals.detach() > 0).float()) > 0


class SAE(nn.Module):
    """Base class. Subclasses implement `activation` and may add `extra_loss`."""

    architecture: ClassVar[str] = ""
    nested_ends: tuple[int, ...] | None = None
    """Nested dictionaries (Matryoshka): where each prefix of the latents ends."""
    init_known: bool = True
    """Whether `initial_decoder(cfg)` is where its training started: False for an SAE read
    from SAELens' files (`load_sae`), whose config is ours only by translation."""

    def __init__(self, cfg: SAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        gen = torch.Generator().manual_seed(cfg.seed)
        w_dec = initial_decoder(cfg, gen)
        if cfg.tied_init:
            w_enc = w_dec.T.clone()
        else:
            bound = 1 / math.sqrt(cfg.d_in)
            w_enc = (torch.rand(cfg.d_in, cfg.d_sae, generator=gen) * 2 - 1) * bound
        self.W_enc = nn.Parameter(w_enc)
        self.b_enc = nn.Parameter(torch.zeros(cfg.d_sae))
        self.W_dec = nn.Parameter(w_dec, requires_grad=not cfg.freeze_decoder)
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in), requires_grad=cfg.decoder_bias)

    # -- the model -------------------------------------------------------------------
    def prepare(self, x: Tensor) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Standardise rows when configured; returns (x_in, mean, std) for undoing it."""
        if not self.cfg.standardize_input:
            return x, None, None
        mu = x.mean(-1, keepdim=True)
        sd = x.std(-1, keepdim=True) + 1e-5
        return (x - mu) / sd, mu, sd

    def pre_acts(self, x_in: Tensor) -> Tensor:
        """[B, n] = (x - b_dec) W_enc + b_enc."""
        return (x_in - self.b_dec) @ self.W_enc + self.b_enc

    def activation(self, pre: Tensor, x_in: Tensor) -> Tensor:
        """Dense reference nonlinearity: [B, n] pre-activations -> [B, n] codes."""
        raise NotImplementedError

    def select(self, pre: Tensor, x_in: Tensor) -> tuple[Tensor, Tensor] | None:
        """Sparse path: the active (rows, cols), sorted by row, chosen from pre-activations;
        None for architectures that only have the dense path."""
        return None

    @property
    def sparse_capable(self) -> bool:
        return type(self).select is not SAE.select

    def expected_density(self) -> float | None:
        """Fraction of codes active per sample, when fixed by the architecture."""
        return self.cfg.k / self.cfg.d_sae if self.cfg.k else None

    def encode(self, x: Tensor) -> Tensor:
        """[B, d] -> [B, n] codes."""
        x_in, _, _ = self.prepare(x)
        return self.activation(self.pre_acts(x_in), x_in)

    def decode(self, codes: Tensor) -> Tensor:
        """[B, n] -> [B, d], in the SAE's (possibly standardised) input units."""
        return codes @ self.W_dec + self.b_dec

    def decode_like(self, x: Tensor, codes: Tensor) -> Tensor:
        """Reconstruction of x's units from (possibly edited) codes: undoes the row
        standardisation of x when the SAE uses it."""
        recon_in = self.decode(codes)
        if not self.cfg.standardize_input:
            return recon_in
        _, mu, sd = self.prepare(x)
        return recon_in * sd + mu

    def forward(self, x: Tensor) -> SAEOutput:
        x_in, mu, sd = self.prepare(x)
        sel = prefixes = None
        if self.training and self.sparse_capable and \
                kernels.want_sparse(self.expected_density()):
            shared: dict = {}  # what both backward passes derive from the selection
            vals, rows, cols, pre = kernels.SparseEncode.apply(
                x_in, self.W_enc, self.b_enc, self.b_dec, lambda p: self.select(p, x_in), shared)
            batch = x_in.shape[0]
            if self.nested_ends is None:
                recon_in = kernels.sparse_decode(rows, cols, vals, self.W_dec, batch,
                                                 shared=shared) + self.b_dec
            else:  # every prefix's reconstruction from one grouped decode
                parts = kernels.sparse_decode(rows, cols, vals, self.W_dec, batch,
                                              self.nested_ends, shared)
                # running sums in the weights' precision (parts may be bf16)
                prefixes = parts.cumsum(1, dtype=self.W_dec.dtype) + self.b_dec
                recon_in = prefixes[:, -1]
            codes = None  # built lazily from `sel` if anything reads out.codes
            sel = (rows, cols, vals)
        else:
            pre = self.pre_acts(x_in)
            codes = self.activation(pre, x_in)
            recon_in = self.decode(codes)
        recon = recon_in if mu is None else recon_in * sd + mu
        return SAEOutput(codes, recon, pre, x_in, recon_in, sel, prefixes)

    def scaled_code_norm(self, out: SAEOutput) -> Tensor:
        """[B] ||f~|| = ||codes * ||W_dec,i|| ||, differentiable on both paths."""
        norms = self.W_dec.norm(dim=1)
        if out.sel is None:
            return (out.codes * norms).norm(dim=-1)
        rows, cols, vals = out.sel
        return kernels.per_row_sum(rows, (vals * norms[cols]).pow(2), out.x_in.shape[0]).sqrt()

    # -- training --------------------------------------------------------------------
    def loss(self, out: SAEOutput, dead_mask: Tensor | None) -> dict[str, Tensor]:
        """Named loss terms whose sum is minimised. Reconstruction is the per-sample
        squared error summed over dims, averaged over the batch, in the SAE's input units."""
        terms = {"mse": self.recon_loss(out)}
        terms.update(self.extra_loss(out, dead_mask))
        return terms

    def recon_loss(self, out: SAEOutput) -> Tensor:
        return (out.x_in - out.recon_in).pow(2).sum(-1).mean()

    def extra_loss(self, out: SAEOutput, dead_mask: Tensor | None) -> dict[str, Tensor]:
        return {}

    def auxk_loss(self, out: SAEOutput, dead_mask: Tensor | None) -> dict[str, Tensor]:
        """Gao et al. App. B.1: the top k_aux dead latents reconstruct the residual
        e = x - x_hat (detached): L_aux = alpha * ||e - e_hat||^2.

        The dense reference masks the live latents out of all n pre-activations. The sparse
        path computes the dead latents' pre-activations afresh from their own encoder
        columns and decodes with their own decoder rows: products over the n_dead columns
        only, and nothing flows back into the dense [B, n] pre-activations (which would
        cost SparseEncode a dense backward). Same values; with 5% of the latents dead that
        took a 2-core CPU step at d=256, n=8192 from 4x to ~1.2x a step without AuxK."""
        if not self.cfg.auxk or dead_mask is None:
            return {}
        if out.sel is None:
            k_aux = min(self.cfg.k_aux, count_true(dead_mask))
            if k_aux == 0:
                return {}
            pre_dead = out.pre.masked_fill(~dead_mask, float("-inf"))
            vals, idx = pre_dead.topk(k_aux, dim=-1)
            e_hat = torch.zeros_like(out.pre).scatter(-1, idx, vals.relu()) @ self.W_dec
        else:
            dead = dead_mask.nonzero().squeeze(1)  # a device sync, like count_true
            k_aux = min(self.cfg.k_aux, dead.numel())
            if k_aux == 0:
                return {}
            pre_dead = torch.addmm(self.b_enc[dead], out.x_in - self.b_dec, self.W_enc[:, dead])
            vals, idx = pre_dead.topk(k_aux, dim=-1)
            codes = torch.zeros_like(pre_dead).scatter(-1, idx, vals.relu())
            e_hat = codes @ self.W_dec[dead]
        e = (out.x_in - out.recon_in).detach()
        return {"auxk": self.cfg.aux_coeff * (e - e_hat).pow(2).sum(-1).mean()}

    @torch.no_grad()
    def init_from_data_(self, x: Tensor) -> None:
        """b_dec <- geometric median of a data sample (Gao et al. Sec. 2.4), when learned."""
        if not self.cfg.decoder_bias:
            return
        x_in, _, _ = self.prepare(x.float())
        self.b_dec.copy_(geometric_median(x_in))

    @torch.no_grad()
    def set_decoder_(self, w_dec: Tensor) -> None:
        """Install a given dictionary [n, d] (e.g. the ground truth); renormalised when the
        architecture keeps unit-norm rows."""
        self.W_dec.copy_(w_dec)
        if self.cfg.unit_norm_decoder:
            self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)

    def before_step_(self) -> None:
        """Remove the gradient component parallel to each unit-norm decoder row (the rows
        are unit norm already: after_step_ renormalises after every step, and at init)."""
        if self.cfg.unit_norm_decoder:
            remove_parallel_grad_(self.W_dec)

    def after_step_(self) -> None:
        """Renormalise decoder rows to unit norm."""
        if self.cfg.unit_norm_decoder:
            renorm_rows_(self.W_dec)


@torch.no_grad()
def remove_parallel_grad_(w_dec: Tensor) -> None:
    """grad -= W <grad, W> row-wise, for unit-norm rows of W_dec [n, d] (Gao et al. Sec. 2.4)."""
    if w_dec.grad is not None:
        g = w_dec.grad
        # row-wise, with no [n, d] temporaries (two passes, not five)
        g.addcmul_(w_dec, torch.einsum("nd,nd->n", g, w_dec).unsqueeze(1), value=-1)


@torch.no_grad()
def renorm_rows_(w_dec: Tensor) -> None:
    """Rows of a trained W_dec [n, d] back to unit norm (a frozen decoder is left alone)."""
    if w_dec.requires_grad:
        w_dec /= w_dec.norm(dim=1, keepdim=True).clamp_min(1e-8)


def initial_decoder(cfg: SAEConfig, gen: torch.Generator | None = None) -> Tensor:
    """[n, d] the unit-norm random decoder an SAE of this config starts from: the first
    draw of its seed's generator (`gen`, when the caller goes on drawing from it). The
    draw fills rows in order, so SAEs of one seed and width d share their first rows'
    initial directions whatever their n."""
    if gen is None:
        gen = torch.Generator().manual_seed(cfg.seed)
    w_dec = torch.randn(cfg.d_sae, cfg.d_in, generator=gen)
    return w_dec / w_dec.norm(dim=1, keepdim=True)


@torch.compiler.disable
def count_true(mask: Tensor) -> int:
    """How many entries of a bool mask are set, as a Python int (a device sync). Kept out
    of torch.compile's graphs: its value decides shapes (AuxK's k), so it cannot be traced."""
    return int(mask.sum())


def geometric_median(x: Tensor, iters: int = 50, tol: float = 1e-6) -> Tensor:
    """Weiszfeld's algorithm on rows of x [B, d] (float64 internally)."""
    xd = x.double()
    y = xd.mean(0)
    for _ in range(iters):
        w = 1.0 / (xd - y).norm(dim=1).clamp_min(1e-12)
        y_new = (w[:, None] * xd).sum(0) / w.sum()
        if (y_new - y).norm() <= tol * (1 + y.norm()):
            y = y_new
            break
        y = y_new
    return y.to(x.dtype)
