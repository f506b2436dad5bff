"""Glue shared by the LM-activation notebooks: train SAE configs on an ActivationSet,
splice an SAE into its LM, and encode held-out activations in chunks."""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, TypeVar

import torch
from torch import Tensor

from paper_lib import metrics
from paper_lib.config import LMParams
from paper_lib.data.activations import ActivationSet, load_activations
from paper_lib.runtime import PROJECT_ROOT, keep_until_recorded
from paper_lib.sae import SAE, SAEConfig, make_sae, save_sae
from paper_lib.train import TrainConfig, TrainResult, configs_key, encode_all, train_saes

__all__ = ["encode_all", "lm_loss", "lm_loss_fn", "replicate_runs", "reseeded_configs",
           "save_trained", "train_on"]

SAE_ROOT = PROJECT_ROOT / "data" / "saes"
CKPT_ROOT = PROJECT_ROOT / "data" / "ckpt"


LIB = Path(__file__).resolve().parents[1]


@functools.cache
def code_sha(*files: str) -> str:
    """sha256 (16 hex digits) of source files named relative to paper_lib/ (globs allowed),
    with their names: a checkpoint keyed by it is not reused by edited code."""
    h = hashlib.sha256()
    for pattern in files:
        for f in sorted(LIB.glob(pattern)):
            h.update(f.relative_to(LIB).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def training_code_sha() -> str:
    """sha256 of the source that decides what training computes: the trainer and the SAE
    modules (paper_lib/train.py, paper_lib/sae/*.py)."""
    return code_sha("train.py", "sae/*.py")


def train_on(acts: ActivationSet, cfgs: list[SAEConfig], steps: int, batch_size: int,
             lr: float, device: torch.device, progress: bool = True, desc: str = "train SAEs",
             seed: int = 0, eval_n: int | None = None, lr_scale_with_n: bool = False,
             lr_ref_latents: int = 16384,
             eval_every: int = 0, heldout_midway: bool = True,
             sparsity_warmup_steps: int | None = None,
             eval_fn: Callable[[SAE], dict[str, float]] | None = None,
             checkpoint_seconds: float = 60.0, compile: bool = False,
             stack: bool = False) -> list[TrainResult]:
    """Train every config in lockstep on the same batches of `acts` (one harvest, a sweep).
    b_dec starts at the geometric median of 4096 training rows (`acts.train_sample`), and
    the L1 penalty of ReLU SAEs ramps up over the first 20% of steps by default. A
    checkpoint keyed by the configs and data is written every `checkpoint_seconds` of
    training under data/ckpt/, so re-running an interrupted notebook resumes where it
    stopped (0 disables); once training ends it stays, holding the trained SAEs, until the
    notebook's record is written (`runtime.keep_until_recorded`), so an interruption in the
    analyses after training costs no training on the rerun. `compile`: torch.compile each
    SAE's forward and loss. `stack`: TopK-family SAEs that differ only in seed and k train
    as one stacked module (TrainConfig.stack).
    `heldout_midway`: see TrainConfig (False: held-out metrics only at the end). The
    held-out metrics score the first `eval_n` held-out rows (None: all of them)."""
    saes = [make_sae(c).to(device) for c in cfgs]
    warm = steps // 5 if sparsity_warmup_steps is None else sparsity_warmup_steps
    # The data as the trainer sees it: the set, its batches' size and order, the rows scored.
    data_key = json.dumps({"acts": acts.identity(), "batch": batch_size, "order_seed": seed,
                           "eval_rows": len(acts.eval[:eval_n])}, sort_keys=True)
    tc = TrainConfig(steps=steps, lr=lr, lr_scale_with_n=lr_scale_with_n,
                     lr_ref_latents=lr_ref_latents, progress=progress,
                     desc=desc, eval_every=eval_every, heldout_midway=heldout_midway,
                     sparsity_warmup_steps=warm, compile=compile, stack=stack,
                     data_key=data_key)
    if checkpoint_seconds:
        # The trainer's own key (SAE configs, every TrainConfig field that matters, the data)
        # plus the training code names the file: a leftover checkpoint of other settings, or
        # one that code since changed made (a kept finished one would skip training), gets
        # another file, never refused or reused.
        key = hashlib.sha256(json.dumps([configs_key(saes, tc), training_code_sha()])
                             .encode()).hexdigest()[:16]
        tc = replace(tc, checkpoint_seconds=checkpoint_seconds,
                     checkpoint_path=str(CKPT_ROOT / f"{key}.pt"), keep_finished=True)
    results = train_saes(saes, acts.batches(batch_size, seed), tc, eval_x=acts.eval[:eval_n],
                         init_x=acts.train_sample(4096, seed), eval_fn=eval_fn)
    if tc.keep_finished:
        keep_until_recorded(tc.checkpoint_path)
    return results


def reseeded_configs(cfgs: dict[str, SAEConfig], offset: int) -> dict[str, SAEConfig]:
    """A copy of each named config at initialisation seed seed + offset, named
    <name>_s<seed + offset>, every other setting equal."""
    return {f"{name}_s{c.seed + offset}": replace(c, seed=c.seed + offset)
            for name, c in cfgs.items()}


T = TypeVar("T")


def replicate_runs(p: LMParams, hook: str, cfgs: dict[str, SAEConfig], runs: int,
                   device: torch.device,
                   score: Callable[[ActivationSet, dict[str, TrainResult]], T],
                   desc: str, **train_kw: Any) -> list[T]:
    """Runs 2 .. `runs` of an experiment whose first run the caller already has, each a full
    replication: run i + 1 harvests its own draw of training and held-out text at `hook`
    (`load_activations` at seed p.seed + i), initialises every config at its seed + i
    (`reseeded_configs`) and reads its batches in the order of seed p.seed + i, with the
    notebook's steps, batch size and lr (p: an LMParams subclass that defines `steps` and
    `lr`, as AFAParams and TopKParams do; LMParams itself does not). `score(acts,
    {name: result})` reads what the caller compares off that run. A run's draw is dropped
    before the next is harvested, so at most one is held here beside the caller's. Run-to-run
    spread then includes the data, not only training luck."""
    out = []
    for i in range(1, runs):
        acts = load_activations(p.model, p.dataset, hook, p.n_tokens, p.n_eval_tokens,
                                device, p.seed + i, p.progress, context_size=p.row_tokens)
        trained = train_on(acts, list(reseeded_configs(cfgs, i).values()), p.steps,
                           p.batch_size, p.lr, device, p.progress,
                           desc=f"{desc}: run {i + 1} of {runs}", seed=p.seed + i, **train_kw)
        out.append(score(acts, dict(zip(cfgs, trained))))
        del acts, trained
    return out


def lm_loss(acts: ActivationSet, sae: SAE, rows: int = 32) -> metrics.LMLoss:
    """CE clean / with the SAE's reconstruction spliced in / zero-ablated, on `rows` held-out
    token rows. Raw activations are scaled into SAE units and back."""
    s = acts.scale

    @torch.no_grad()
    def reconstruct(a: Tensor) -> Tensor:
        was = sae.training
        sae.eval()
        out = sae(a * s).recon / s
        sae.train(was)
        return out

    return lm_loss_fn(acts, reconstruct, rows)


def lm_loss_fn(acts: ActivationSet, reconstruct: Callable[[Tensor], Tensor],
               rows: int = 32) -> metrics.LMLoss:
    """Like lm_loss for any raw-units reconstruction function."""
    return acts.splice_eval(rows)(reconstruct)


def save_trained(results: dict[str, TrainResult], acts: ActivationSet, folder: str,
                 root: Path = SAE_ROOT) -> dict[str, Path]:
    """Save SAEs as cfg.json + sae_weights.safetensors (SAELens layout) under
    root/folder/<name>, with the activation scale folded in so they take raw activations."""
    out = {}
    for name, res in results.items():
        extra = {k: float(v) for k, v in res.final.items() if isinstance(v, (int, float))}
        out[name] = save_sae(res.sae, root / folder / name, input_scale=acts.scale,
                             extra={"final_metrics": extra}, metadata=acts.saelens_metadata())
    return out
