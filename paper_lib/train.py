"""One trainer for every SAE architecture.

`train_saes` trains a list of SAEs in lockstep on the same activation batches, so one
harvest feeds a whole sweep. Per SAE: Adam with Gao et al.'s settings (betas 0.9/0.999,
eps 6.25e-10), optional lr ~ 1/sqrt(n) scaling, linear warmup and linear decay, the
decoder constraint (parallel-gradient removal, renormalisation), dead-latent tracking in
tokens since last firing (feeding AuxK), bf16 autocast on CUDA, periodic evaluation
(FVU, L0, dead fraction and any extra metrics), a tqdm bar, and atomic checkpoints from
which an interrupted run resumes with identical results. `make_step` is the step itself
(also timed by paper_lib.bench), optionally with torch.compile.
Architectures differ only in their loss terms (paper_lib.sae); there is one loop.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import time
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Protocol

import torch
from torch import Tensor
from torch._dynamo.exc import BackendCompilerFailed  # InductorError is one too
from tqdm import tqdm

from paper_lib import metrics
from paper_lib.runtime import (
    deterministic_on_cpu,
    has_checkpoint,
    interrupt_between_steps,
    read_checkpoint,
    write_checkpoint,
)
from paper_lib.sae import kernels
from paper_lib.sae.base import READ_ONLY, SAE, SAEConfig
from paper_lib.sae.batchtopk import BatchTopKSAE
from paper_lib.sae.stack import SAEStack, stack_groups


class BatchSource(Protocol):
    batch_size: int

    def batch(self, step: int) -> Tensor:
        """The [batch_size, d] batch for training step `step` (deterministic)."""


class ShuffledBatches:
    """Epoch-wise shuffled minibatches of an in-memory activation tensor, addressable
    by step so a resumed run sees exactly the batches it would have seen."""

    def __init__(self, x: Tensor, batch_size: int, seed: int = 0) -> None:
        if batch_size > x.shape[0]:
            raise ValueError(f"batch_size={batch_size} exceeds the {x.shape[0]} rows available")
        self.x, self.batch_size, self.seed = x, batch_size, seed
        self.per_epoch = x.shape[0] // batch_size
        self._epoch, self._perm = -1, None

    def batch(self, step: int) -> Tensor:
        epoch, i = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._perm = torch.randperm(self.x.shape[0], generator=gen).to(self.x.device)
            self._epoch = epoch
        idx = self._perm[i * self.batch_size:(i + 1) * self.batch_size]
        return self.x[idx]


def first_rows(x: Tensor, n: int, seed: int = 0) -> Tensor:
    """The first n rows (all, if fewer) of the training order ShuffledBatches(x, ., seed)
    serves: a uniform draw of rows the optimiser will see, for choices made from the data
    outside it (b_dec's start, a pruning order)."""
    return ShuffledBatches(x, min(n, x.shape[0]), seed).batch(0)


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings shared by every SAE in one `train_saes` call."""

    steps: int
    """Optimiser steps."""
    lr: float = 4e-4
    """Adam learning rate (for n = lr_ref_latents when lr_scale_with_n)."""
    lr_scale_with_n: bool = False
    """Scale lr by sqrt(lr_ref_latents / n) (Gao et al. Sec. 3.1: optimal lr ~ 1/sqrt(n))."""
    lr_ref_latents: int = 16384
    warmup_steps: int = 0
    """Linear warmup from 0."""
    decay_fraction: float = 0.2
    """Decay linearly to 0 over this final fraction of steps."""
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 6.25e-10
    sparsity_warmup_steps: int = 0
    """Ramp the L1 penalty linearly from 0 over these steps (avoids early dead latents)."""
    eval_every: int = 0
    """Evaluate every this many steps (0: only at the end)."""
    heldout_midway: bool = True
    """Intermediate evaluations include the held-out FVU / L0 / dead_eval (the costly
    part: every SAE encodes all eval rows); False keeps them to the end and records only
    dead_train and eval_fn extras midway (enough for dead-latent curves)."""
    checkpoint_every: int = 0
    """Write a checkpoint every this many steps (0: never)."""
    checkpoint_seconds: float = 0.0
    """Also write one whenever this much wall time passed since the last (0: never)."""
    checkpoint_path: str = ""
    data_key: str = ""
    """What identifies the training data (the caller's choice: a hash, a description). Part
    of a checkpoint's key, so a checkpoint is never resumed on other data."""
    keep_finished: bool = False
    """When training ends, keep the checkpoint, marked finished (weights, histories, no
    optimiser state), instead of removing it: a rerun then returns these results without
    training, and the caller removes the file (`experiments.common.train_on` does once the
    notebook's record is written, so an interruption after training loses no training)."""
    bf16: bool = True
    """bf16 autocast for the forward pass on CUDA (ignored on CPU)."""
    compile: bool = False
    """torch.compile each SAE's forward pass and loss (fuses the elementwise work; the
    first steps pay the compilation; sparse kernels run between compiled pieces)."""
    stack: bool = False
    """Train TopK-family SAEs whose configs differ only in seed and k as one stacked module
    (paper_lib.sae.stack: one encoder product, selection, decode and Adam step for the
    whole group), many SAEs per pass. Same losses and updates as alone, rounded
    differently; so off by default, leaving the committed results' step unchanged."""
    progress: bool = True
    desc: str = "train SAEs"

    def __post_init__(self) -> None:
        if self.steps <= 0:
            raise ValueError(f"steps={self.steps} must be positive")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr} must be positive")
        if not 0 <= self.decay_fraction <= 1:
            raise ValueError(f"decay_fraction={self.decay_fraction} must lie in [0, 1]")
        if (self.checkpoint_every or self.checkpoint_seconds) and not self.checkpoint_path:
            raise ValueError("checkpoint_every / checkpoint_seconds need checkpoint_path")


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the base lr at `step`: warmup, constant, then linear decay."""
    warm = min(1.0, (step + 1) / cfg.warmup_steps) if cfg.warmup_steps else 1.0
    decay_start = cfg.steps * (1 - cfg.decay_fraction)
    if cfg.decay_fraction and step >= decay_start:
        warm *= max(0.0, (cfg.steps - step) / (cfg.steps - decay_start))
    return warm


def base_lr(cfg: TrainConfig, n: int) -> float:
    """The lr of an SAE with n latents before warmup and decay (lr_scale_with_n: ~1/sqrt(n))."""
    return cfg.lr * (math.sqrt(cfg.lr_ref_latents / n) if cfg.lr_scale_with_n else 1)


@dataclass
class TrainResult:
    sae: SAE
    history: list[dict[str, float]] = field(default_factory=list)
    """One row per evaluation: step, tokens, fvu, l0, dead_eval, dead_train, extras."""
    tokens_since_fired: Tensor | None = None
    seconds: float = 0.0

    @property
    def final(self) -> dict[str, float]:
        return self.history[-1] if self.history else {}


@torch.no_grad()
def encode_all(sae: SAE, x: Tensor, chunk: int = 8192) -> tuple[Tensor, Tensor]:
    """(codes, reconstruction) of rows x in eval mode, chunked to bound memory: each
    chunk is written into the outputs (a list of chunks joined at the end would hold the
    codes twice: 2 x 34 GB for 65,536 tokens of a 131,072-latent SAE)."""
    was = sae.training
    sae.eval()
    codes = recon = None
    for i in range(0, x.shape[0], chunk):
        out = sae(x[i:i + chunk].float())
        if codes is None:
            codes = out.codes.new_empty((x.shape[0], out.codes.shape[1]), dtype=torch.float32)
            recon = out.recon.new_empty((x.shape[0], out.recon.shape[1]), dtype=torch.float32)
        codes[i:i + chunk] = out.codes
        recon[i:i + chunk] = out.recon
    sae.train(was)
    if codes is None:  # no rows
        return torch.zeros(0, sae.cfg.d_sae, device=x.device), x.float()[:0]
    return codes, recon


EVAL_ENTRIES = 1 << 26  # codes held at once by `evaluate` (256 MB of float32)


@torch.no_grad()
def evaluate(sae: SAE, x: Tensor, chunk: int | None = None,
             encoded: tuple[Tensor, Tensor] | None = None) -> dict[str, float]:
    """FVU, L0 and eval-window dead fraction of `sae` on rows x (in eval mode); `encoded`:
    their (codes, reconstruction) from `encode_all`, when the caller has them already.
    Otherwise x is encoded `chunk` rows at a time (default: EVAL_ENTRIES codes) and only
    sums are kept, so every held-out token can be scored: a wide SAE's codes of all of them
    would not fit (262,144 tokens x 131,072 latents: 137 GB of float32)."""
    if encoded is not None:
        c, r = encoded
        return {"fvu": metrics.fvu(x, r), "l0": metrics.l0(c),
                "dead_eval": metrics.dead_fraction(c)}
    n, dev = sae.cfg.d_sae, sae.W_enc.device
    chunk = chunk or max(1, EVAL_ENTRIES // n)
    resid, nonzero = 0.0, 0
    fired = torch.zeros(n, dtype=torch.bool, device=dev)
    was = sae.training
    sae.eval()
    for i in range(0, x.shape[0], chunk):  # rows held elsewhere (CPU) go over a chunk at a time
        xb = x[i:i + chunk].to(dev).float()
        out = sae(xb)
        resid += float((xb.double() - out.recon.double()).pow(2).sum())
        nonzero += int((out.codes != 0).sum())
        fired |= (out.codes > 0).any(0)
    sae.train(was)
    return {"fvu": resid / metrics.total_variance(x),
            "l0": nonzero / x.shape[0] if x.shape[0] else float("nan"),
            "dead_eval": float((~fired).float().mean())}


# TrainConfig fields that do not change what a run computes (compile: at most the float
# rounding), so a checkpoint written under one value resumes under another.
_BOOKKEEPING = ("progress", "desc", "checkpoint_every", "checkpoint_seconds", "checkpoint_path",
                "keep_finished", "compile")


def configs_key(saes: list[SAE], cfg: TrainConfig) -> str:
    """What a checkpoint must match to be resumed: the SAE configs and every
    TrainConfig field that changes what the run computes."""
    train = {k: v for k, v in asdict(cfg).items() if k not in _BOOKKEEPING}
    return json.dumps({"saes": [s.cfg.to_dict() for s in saes], "train": train},
                      sort_keys=True, default=str)


def make_adam(sae: SAE | SAEStack, lr: float, betas: tuple[float, float] = (0.9, 0.999),
              eps: float = 6.25e-10) -> torch.optim.Adam:
    """Adam over the SAE's (or stack's) trainable parameters (fused on CUDA; defaults: Gao
    et al.)."""
    params = [p for p in sae.parameters() if p.requires_grad]
    return torch.optim.Adam(params, lr=lr, betas=betas, eps=eps,
                            fused=params[0].device.type == "cuda")


def forward_loss(sae: SAE | SAEStack, x: Tensor, dead: Tensor | None
                 ) -> tuple[dict[str, Tensor], Tensor]:
    """Named loss terms of one batch and the [n] mask of latents that fired in it: the
    part of a step that `TrainConfig.compile` hands to torch.compile."""
    out = sae(x)
    return sae.loss(out, dead), out.fired()


class CompileFallbackWarning(RuntimeWarning):
    """torch.compile could not compile a training step, which then ran eagerly."""


@functools.cache
def _compiled_forward_loss() -> Callable[..., tuple[dict[str, Tensor], Tensor]]:
    return torch.compile(forward_loss)  # one compiled function; dynamo guards per SAE


def make_step(sae: SAE | SAEStack, opt: torch.optim.Optimizer, bf16: bool = True,
              compile: bool = False) -> Callable[..., Tensor]:
    """The training step, `step(x, dead, l1_scale=1.0) -> fired`: forward and loss (bf16
    autocast on CUDA), backward, parallel-gradient removal, Adam, decoder renormalisation.
    `dead` [n] bool feeds AuxK; `l1_scale` ramps the L1 penalty."""
    fl = _compiled_forward_loss() if compile else forward_loss
    use_bf16 = bf16 and next(sae.parameters()).device.type == "cuda"

    def forward_backward(x: Tensor, dead: Tensor | None, l1_scale: float) -> Tensor:
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
            terms, fired = fl(sae, x, dead)
        if "l1" in terms and l1_scale != 1.0:
            terms["l1"] = terms["l1"] * l1_scale
        loss = sum(t.float() for t in terms.values())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        return fired

    def step(x: Tensor, dead: Tensor | None, l1_scale: float = 1.0) -> Tensor:
        nonlocal fl
        try:
            fired = forward_backward(x, dead, l1_scale)
        except BackendCompilerFailed as e:  # forward or (lazily) backward compilation
            if fl is forward_loss:
                raise
            cause = getattr(e, "inner_exception", None) or e
            first = (str(cause).strip().splitlines() or [""])[0][:200]
            warnings.warn(f"torch.compile failed on this SAE's step ({type(cause).__name__}: "
                          f"{first}); training continues without it "
                          "(TrainConfig.compile=False skips the attempt)",
                          CompileFallbackWarning, stacklevel=2)
            fl = forward_loss  # no optimizer step has run: redo this one eagerly
            fired = forward_backward(x, dead, l1_scale)
        sae.before_step_()
        opt.step()
        sae.after_step_()
        return fired
    return step


def train_saes(saes: list[SAE], data: BatchSource, cfg: TrainConfig,
               eval_x: Tensor | None = None,
               eval_fn: Callable[[SAE], dict[str, float]] | None = None,
               init_x: Tensor | None = None) -> list[TrainResult]:
    """Train every SAE in `saes` on the same batches; returns one TrainResult each.

    eval_x: held-out rows for FVU / L0 / dead fraction; eval_fn: extra metrics per SAE;
    init_x: a sample for data-dependent initialisation (b_dec = geometric median).
    With cfg.checkpoint_path, an existing checkpoint for the same configs is resumed.
    """
    read_only = sorted({s.cfg.architecture for s in saes} & set(READ_ONLY))
    if read_only:
        raise ValueError(f"{', '.join(read_only)} SAEs are read from SAELens' files, to explore "
                         "and score; training them (a straight-through estimator for their "
                         "thresholds) is not implemented here")
    device = next(saes[0].parameters()).device
    deterministic_on_cpu(device)
    if init_x is not None:
        for sae in saes:
            sae.init_from_data_(init_x.to(device))
    # What each optimiser step updates: one SAE, or a stack of them (TrainConfig.stack).
    groups = stack_groups(saes) if cfg.stack else []
    stacked = {i for g in groups for i in g}
    stacks = [SAEStack([saes[i] for i in g]) for g in groups]
    units: list[SAE | SAEStack] = [s for i, s in enumerate(saes) if i not in stacked] + stacks
    opts = [make_adam(u, base_lr(cfg, u.cfg.d_sae), (cfg.beta1, cfg.beta2), cfg.eps)
            for u in units]
    base_lrs = [o.param_groups[0]["lr"] for o in opts]
    steps = [make_step(u, o, cfg.bf16, cfg.compile) for u, o in zip(units, opts)]
    # tokens since each latent last fired, per unit; a stack's SAEs read their rows of it
    unit_since = [torch.zeros(u.n_latents if isinstance(u, SAEStack) else u.cfg.d_sae,
                              dtype=torch.long, device=device) for u in units]
    since_of = {}
    for u, cnt in zip(units, unit_since):
        members = zip(u.saes, cnt.view(len(u.saes), -1)) if isinstance(u, SAEStack) else \
            [(u, cnt)]
        since_of.update({id(s): part for s, part in members})
    since = [since_of[id(s)] for s in saes]
    results = [TrainResult(s) for s in saes]
    start, finished, key = 0, False, configs_key(saes, cfg)
    ckpt = Path(cfg.checkpoint_path) if cfg.checkpoint_path else None
    if ckpt is not None and has_checkpoint(ckpt):
        start, finished = _load_checkpoint(ckpt, key, saes, opts, since, results)

    def run_eval(step: int) -> None:
        heldout = eval_x is not None and (cfg.heldout_midway or step == cfg.steps)
        last = None  # the batch just trained on: BatchTopK's inference threshold, from it
        for sae, res, cnt in zip(saes, results, since):
            if isinstance(sae, BatchTopKSAE):  # Matryoshka too
                last = data.batch(step - 1).to(device) if last is None else last
                sae.calibrate_threshold_(last)
            row: dict[str, float] = {"step": step, "tokens": step * data.batch_size}
            if heldout:
                row.update(evaluate(sae, eval_x))
            row["dead_train"] = float((cnt >= sae.cfg.dead_tokens).float().mean())
            if eval_fn is not None:
                row.update(eval_fn(sae))
            res.history.append(row)

    for sae in saes:
        sae.train()
    t0 = last_ckpt = time.perf_counter()
    bar = tqdm(range(start, cfg.steps), desc=cfg.desc, disable=not cfg.progress,
               initial=start, total=cfg.steps, mininterval=1.0)
    with interrupt_between_steps() as interrupted:
        for step in bar:
            x = data.batch(step).to(device, non_blocking=True)
            f = lr_factor(step, cfg)
            l1_scale = (step + 1) / cfg.sparsity_warmup_steps \
                if step < cfg.sparsity_warmup_steps else 1.0
            for unit, opt, base, cnt, train_step in zip(units, opts, base_lrs, unit_since, steps):
                for g in opt.param_groups:
                    g["lr"] = base * f
                fired = train_step(x, cnt >= unit.cfg.dead_tokens, l1_scale)
                with torch.no_grad():
                    cnt.add_(x.shape[0]).masked_fill_(fired, 0)
            done = step + 1
            if cfg.eval_every and done % cfg.eval_every == 0 and done != cfg.steps:
                run_eval(done)
                if cfg.progress and "fvu" in results[0].history[-1]:
                    bar.set_postfix(fvu=f"{results[0].history[-1]['fvu']:.3f}")
            due = (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or (
                cfg.checkpoint_seconds
                and time.perf_counter() - last_ckpt >= cfg.checkpoint_seconds)
            # Ctrl-C: stop after this step, checkpointed (after the last, only once the
            # final evaluation is done: see below; a second Ctrl-C stops at once).
            stop = interrupted()
            if ckpt is not None and ((due and done != cfg.steps) or stop):
                _save_checkpoint(ckpt, key, done, saes, opts, since, results)
                last_ckpt = time.perf_counter()
            if stop and done != cfg.steps:
                bar.close()
                raise KeyboardInterrupt
        bar.close()
        if not finished:  # a finished checkpoint holds the final evaluation already
            run_eval(cfg.steps)
        elapsed = time.perf_counter() - t0
        for st in stacks:
            st.unstack_()  # each SAE its own weights again
        for res, cnt in zip(results, since):
            res.tokens_since_fired = cnt
            res.seconds += elapsed
        if ckpt is not None and cfg.keep_finished:
            if not finished:
                _save_checkpoint(ckpt, key, cfg.steps, saes, [], since, results, finished=True)
            if interrupted():  # at the last step or in the final evaluation: kept, now stop
                raise KeyboardInterrupt
        elif ckpt is not None and ckpt.exists():
            ckpt.unlink()  # finished: the checkpoint has served its purpose (and a Ctrl-C
            # this late lets the caller save the results instead)
    return results


def _save_checkpoint(path: Path, key: str, step: int, saes: list[SAE], opts: list,
                     since: list[Tensor], results: list[TrainResult],
                     finished: bool = False) -> None:
    """opts: one per optimiser unit (an SAE or a stack), none once finished; the rest one
    per SAE (a stack's SAEs hold views of its tensors, which torch.save writes once)."""
    state = {
        "key": key, "step": step, "finished": finished,
        "saes": [s.state_dict() for s in saes],
        "opts": [o.state_dict() for o in opts],
        "since": since,
        "history": [r.history for r in results],
        "seconds": [r.seconds for r in results],
        "rng": torch.get_rng_state(),
    }
    write_checkpoint(path, state)


def _load_checkpoint(path: Path, key: str, saes: list[SAE], opts: list, since: list[Tensor],
                     results: list[TrainResult]) -> tuple[int, bool]:
    """Restore a checkpoint in place; (its step, whether training had finished)."""
    state = read_checkpoint(path, key, other="a different configuration (SAEs, training "
                            "settings or data)", fix="delete it or choose another "
                            "checkpoint_path")
    finished = bool(state.get("finished", False))
    for sae, cnt, res, s_sd, c, h, sec in zip(saes, since, results, state["saes"],
                                              state["since"], state["history"], state["seconds"]):
        sae.load_state_dict(s_sd)  # in place: a stack's SAEs keep viewing its tensors
        cnt.copy_(c)
        res.history, res.seconds = h, sec
    if not finished:
        for opt, o_sd in zip(opts, state["opts"]):
            opt.load_state_dict(o_sd)
    torch.set_rng_state(state["rng"])
    return int(state["step"]), finished


def _demo_data(d_in: int, n: int, seed: int) -> Tensor:
    """Sparse synthetic activations for the command-line demo and the resume test."""
    from paper_lib.data.synthetic import make_sparse_data

    return make_sparse_data(n, 4 * d_in, d_in, 4, seed).x


def _values(kind: type) -> Callable[[str], list]:
    """argparse type: one value or a comma-separated list of them (a sweep), no repeats."""
    def parse(text: str) -> list:
        try:
            vals = [kind(v) for v in text.split(",")]
        except ValueError:
            what = {int: "an integer", float: "a number"}[kind]
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {what} or a comma-separated list of them (e.g. 16,32,64)"
            ) from None
        if len(set(vals)) < len(vals):
            raise argparse.ArgumentTypeError(f"{text!r} lists a value twice")
        return vals
    return parse


def sweep_name(cfg: SAEConfig) -> str:
    """An SAE's name in a command-line sweep: architecture, n, k or L1, seed."""
    return f"{cfg.short()}-s{cfg.seed}"


def main(argv: list[str] | None = None) -> int:
    """`python -m paper_lib.train`: train SAEs with checkpoints (rerunning the same
    command resumes) on the activations of an LM at a hook (`--model`: an embedded LM, or
    any transformer-lens model name with the internet), on a saved activation tensor
    (`--acts`), or on synthetic sparse data (neither). `--d-sae`, `--k`, `--l1-coeff` and
    `--seed` take comma-separated lists: every combination trains on the same batches of
    one harvest (`--stack`: TopK-family SAEs of one width as one module, many SAEs per
    pass). It runs under the notebooks' pinned CPU numerics (re-executing itself with them
    if needed), so its numbers and the LM it caches are the notebooks' own."""
    import hashlib
    import itertools
    import sys

    from paper_lib.config import check_dead_window, check_source, default_ce_rows
    from paper_lib.runtime import atomic_write_json, cpu_numerics, pick_device
    from paper_lib.sae import ARCHITECTURES, make_sae, save_sae
    from paper_lib.sae.base import GAO_DEAD_TOKENS, TOPK_FAMILY

    ap = argparse.ArgumentParser(prog="python -m paper_lib.train", description=main.__doc__)
    ap.add_argument("--arch", default="topk", choices=ARCHITECTURES)
    ap.add_argument("--d-in", type=int, default=32, help="synthetic data only")
    ap.add_argument("--d-sae", type=_values(int), default=[256], help="latents (a list sweeps)")
    ap.add_argument("--k", type=_values(int), default=[8],
                    help="TopK family: active latents per token (a list sweeps)")
    ap.add_argument("--l1-coeff", type=_values(float), default=[3.0],
                    help="relu / mlp L1 weight, for inputs scaled to E||x||^2 = d as --model's "
                    "are (a list sweeps)")
    ap.add_argument("--mlp-hidden", type=int, default=0, help="mlp encoder's hidden width "
                    "(needed with --arch mlp)")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--dead-tokens", type=int,
                    help="training tokens without firing after which a latent is dead: AuxK "
                    "(TopK family) trains the dead ones, dead_train counts them (default: a "
                    "tenth of --steps x --batch, at most Gao et al.'s 10,000,000)")
    ap.add_argument("--lr-scale-with-n", action="store_true",
                    help=f"scale --lr by sqrt({TrainConfig.lr_ref_latents} / d_sae) (Gao et "
                    "al.'s lr ~ 1/sqrt(n))")
    ap.add_argument("--seed", type=_values(int), default=[0],
                    help="SAE initialisation seed (a list sweeps); the first also orders the data")
    ap.add_argument("--stack", action="store_true",
                    help="train TopK-family SAEs of one --d-sae that differ in --k and --seed "
                    "as one stacked module (one encoder product and Adam step per batch)")
    ap.add_argument("--acts", type=Path, help="a .safetensors file with an 'acts' tensor "
                    "[rows, d_in]; its last tenth (at most 2048 rows) is held out")
    ap.add_argument("--model", help="LM whose activations to train on: embedded-smoke, "
                    "embedded-gpu, or a transformer-lens name such as gpt2 (internet)")
    ap.add_argument("--dataset", default="stdlib",
                    help="with --model: stdlib (embedded corpus) or a Hugging Face dataset")
    ap.add_argument("--data-files", help="with --model and --dataset text: local text file(s)")
    ap.add_argument("--hook", default="", help="with --model: hook name (default: "
                    "blocks.L.hook_resid_pre at the middle layer)")
    ap.add_argument("--n-tokens", type=int, default=200_000, help="with --model: training tokens")
    ap.add_argument("--n-eval-tokens", type=int, default=16_384,
                    help="with --model: held-out tokens (FVU, dead latents, CE)")
    ap.add_argument("--context-size", type=int, help="with a hub --model: tokens per row, BOS "
                    "included (default 128, at most the LM's n_ctx); an embedded LM's rows "
                    "are its whole context")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda[:i]")
    ap.add_argument("--checkpoint", type=Path,
                    help="checkpoint file (default: beside --out, as <out>.ckpt.pt)")
    ap.add_argument("--checkpoint-every", type=int, default=100)
    ap.add_argument("--out", type=Path, required=True, help="final metrics JSON")
    ap.add_argument("--save", type=Path, help="save the trained SAE here (SAELens layout); a "
                    "sweep saves each SAE in a folder of its name under it")
    ap.add_argument("--compile", action="store_true",
                    help="torch.compile the forward pass and loss (worth it on a GPU)")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    if args.acts is not None and args.model is not None:
        ap.error("give --acts or --model, not both")
    if args.data_files and (args.model is None or args.dataset == "stdlib"):
        ap.error("--data-files needs --model and a --dataset loader such as text")
    if args.context_size is not None and args.model is None:
        ap.error("--context-size needs --model: it is the length of the LM's token rows")
    if args.model is not None:
        from paper_lib.data.activations import check_context_size

        try:
            check_source(args.model, args.dataset)
            check_context_size(args.model, args.context_size)
        except ValueError as e:
            ap.error(str(e))
    for name in ("steps", "batch", "d_sae", "k", "n_tokens", "n_eval_tokens", "checkpoint_every",
                 "dead_tokens"):
        vals = getattr(args, name)
        for v in vals if isinstance(vals, list) else [vals]:
            if v is not None and v < 1:
                ap.error(f"--{name.replace('_', '-')} {v}: must be >= 1")
    trained = args.steps * args.batch
    # Gao et al.'s 10M tokens suit runs of billions; a short run with it could never see a
    # dead latent, and AuxK would never act.
    dead_tokens = args.dead_tokens or min(GAO_DEAD_TOKENS, max(1, trained // 10))
    try:
        check_dead_window("--dead-tokens" if args.dead_tokens else "the default --dead-tokens",
                          dead_tokens, trained, "--steps x --batch")
    except ValueError as e:
        ap.error(str(e))
    # a list of a setting the architecture ignores would train the same SAE twice
    used = {"k": args.arch in TOPK_FAMILY, "l1_coeff": args.arch in ("relu", "mlp")}
    for name, uses in used.items():
        if not uses and len(getattr(args, name)) > 1:
            ap.error(f"--{name.replace('_', '-')} lists several values, but a {args.arch} SAE "
                     "does not use it: give one value or another --arch")
    try:  # every setting checked before activations are harvested or an LM trained
        device = pick_device(args.device)
        cfgs = [SAEConfig(args.arch, 1, n, k=k, l1_coeff=l1, mlp_hidden=args.mlp_hidden,
                          seed=seed, dead_tokens=dead_tokens)
                for n, k, l1, seed in itertools.product(args.d_sae, args.k, args.l1_coeff,
                                                        args.seed)]
    except ValueError as e:
        ap.error(str(e))
    if args.stack:
        # which SAEs would stack (d_in does not change it; tiny stand-ins on the CPU)
        probe = stack_groups([make_sae(c) for c in cfgs])
        if not probe:
            ap.error("--stack: no two of these SAEs can train as one stack; a stack takes "
                     f"{', '.join(TOPK_FAMILY)} SAEs of one --d-sae that differ only in --k "
                     f"and --seed, with k <= d_sae / {round(1 / kernels.AUTO_MAX_DENSITY)} "
                     "(the sparse path)")
    if args.acts is not None and not args.acts.is_file():
        ap.error(f"--acts {args.acts}: no such file")
    if argv is None:  # a command line: the notebooks' CPU numerics, and so their cached LM
        from paper_lib.kernelspec import exec_pinned

        exec_pinned("paper_lib.train")
    if args.stack:
        alone = len(cfgs) - sum(len(g) for g in probe)
        print(f"stacked: {len(cfgs) - alone} SAEs in {len(probe)} stack(s)"
              + (f", {alone} trained alone" if alone else ""), file=sys.stderr)
    data_seed = args.seed[0]
    meta: dict[str, object] = {}
    saelens_meta: dict[str, object] = {}  # how an LM's activations were read, for SAELens
    if args.model is not None:
        from paper_lib.data.activations import load_activations

        acts = load_activations(args.model, args.dataset, args.hook, args.n_tokens,
                                args.n_eval_tokens, device, data_seed,
                                progress=not args.quiet, data_files=args.data_files,
                                context_size=args.context_size)
        d_in, data, eval_x = acts.d, acts.batches(args.batch, data_seed), acts.eval
        init_x = acts.train_sample(2048, data_seed)
        meta = {"model": args.model, "hook": acts.hook, "dataset": args.dataset,
                "input_scale": acts.scale}
        saelens_meta = acts.saelens_metadata()
        data_id: object = acts.identity()
        data_key = json.dumps(data_id, sort_keys=True)
    else:
        if args.acts is not None:
            from safetensors.torch import load_file

            tensors = load_file(str(args.acts))
            if "acts" not in tensors:
                ap.error(f"--acts {args.acts}: no tensor named 'acts' (found "
                         f"{', '.join(tensors) or 'none'})")
            x = tensors["acts"].float().to(device)
            data_key = "acts sha256 " + hashlib.sha256(args.acts.read_bytes()).hexdigest()
        else:
            x = _demo_data(args.d_in, 8192 + 2048, data_seed).to(device)
            data_key = f"synthetic d_in={args.d_in}"  # + the seed, which configs_key holds
        data_id = data_key
        # The last rows are held out: the reported metrics are never on rows trained on.
        held = min(2048, x.shape[0] // 10)
        if held < 1 or x.shape[0] - held < args.batch:
            source = f"--acts {args.acts}" if args.acts is not None else "the synthetic data"
            ap.error(f"{source}: {x.shape[0]} rows; training needs --batch {args.batch} rows "
                     "beside the tenth held out for evaluation")
        x, eval_x = x[:-held], x[-held:]
        d_in, data = x.shape[1], ShuffledBatches(x, args.batch, data_seed)
        init_x = first_rows(x, 2048, data_seed)
    cfgs = [replace(c, d_in=d_in, hook_name=str(meta.get("hook", "")),
                    model_name=str(meta.get("model", ""))) for c in cfgs]
    ckpt = args.checkpoint or args.out.with_name(args.out.name + ".ckpt.pt")
    sweep = len(cfgs) > 1
    tc = TrainConfig(steps=args.steps, lr=args.lr, lr_scale_with_n=args.lr_scale_with_n,
                     checkpoint_every=args.checkpoint_every, checkpoint_path=str(ckpt),
                     data_key=f"{data_key}; batch {args.batch}", progress=not args.quiet,
                     stack=args.stack, compile=args.compile,
                     desc=f"train {len(cfgs)} SAEs" if sweep else f"train {cfgs[0].short()}")
    results = train_saes([make_sae(c).to(device) for c in cfgs], data, tc, eval_x=eval_x,
                         init_x=init_x)
    from paper_lib.experiments.common import lm_loss

    ce_rows = 0 if args.model is None else \
        default_ce_rows(len(acts.eval), int(acts.eval_tokens.shape[1]))
    records = []
    for res in results:
        rec: dict[str, object] = {"final": res.final}
        if args.model is not None:  # the downstream check: CE with the reconstruction spliced in
            ce = lm_loss(acts, res.sae, rows=ce_rows)
            rec.update(ce_clean=ce.clean, ce_spliced=ce.spliced, ce_recovered=ce.recovered,
                       ce_rows=ce_rows)
        weights = b"".join(v.detach().cpu().numpy().tobytes()
                           for _, v in sorted(res.sae.state_dict().items()))
        rec["weights_sha256"] = hashlib.sha256(weights).hexdigest()
        records.append(rec)
    if sweep:
        body: dict[str, object] = {
            "saes": [{"name": sweep_name(r.sae.cfg), "config": r.sae.cfg.to_dict(), **rec}
                     for r, rec in zip(results, records)],
            "stack": args.stack, **meta}
    else:
        body = {"config": results[0].sae.cfg.to_dict(), **records[0], **meta}
    # what was run, defaults resolved: the record alone says how to train these SAEs again
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    settings["dead_tokens"] = dead_tokens
    atomic_write_json(args.out, {**body, "settings": settings, "data": data_id,
                                 "cpu_numerics": cpu_numerics()})
    scale = float(meta.get("input_scale", 1.0))
    for res in results:
        if args.save is not None:
            save_sae(res.sae, args.save / sweep_name(res.sae.cfg) if sweep else args.save,
                     input_scale=scale, metadata=saelens_meta)
        print(f"{sweep_name(res.sae.cfg) if sweep else res.sae.cfg.short()}: "
              + ", ".join(f"{k} {v:.4g}" for k, v in res.final.items() if isinstance(v, float)),
              file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
