"""Glue shared by the LM-activation notebooks: train SAE configs on an ActivationSet,
splice an SAE into its LM, and encode held-out activations in chunks."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from paper_lib import metrics
from paper_lib.data.activations import ActivationSet
from paper_lib.runtime import PROJECT_ROOT
from paper_lib.sae import SAE, SAEConfig, make_sae, save_sae
from paper_lib.train import TrainConfig, TrainResult, train_saes

SAE_ROOT = PROJECT_ROOT / "data" / "saes"


def train_on(acts: ActivationSet, cfgs: list[SAEConfig], steps: int, batch_size: int,
             lr: float, device: torch.device, progress: bool = True, desc: str = "train SAEs",
             seed: int = 0, eval_n: int = 8192, lr_scale_with_n: bool = False,
             lr_ref_latents: int = 16384,
             eval_every: int = 0, sparsity_warmup_steps: int | None = None,
             eval_fn: Callable[[SAE], dict[str, float]] | None = None) -> list[TrainResult]:
    """Train every config in lockstep on the same batches of `acts` (one harvest, a sweep).
    The L1 penalty of ReLU SAEs ramps up over the first 20% of steps by default."""
    saes = [make_sae(c).to(device) for c in cfgs]
    warm = steps // 5 if sparsity_warmup_steps is None else sparsity_warmup_steps
    tc = TrainConfig(steps=steps, lr=lr, lr_scale_with_n=lr_scale_with_n,
                     lr_ref_latents=lr_ref_latents, progress=progress,
                     desc=desc, eval_every=eval_every, sparsity_warmup_steps=warm)
    return train_saes(saes, acts.batches(batch_size, seed), tc, eval_x=acts.eval[:eval_n],
                      init_x=acts.eval[:4096], eval_fn=eval_fn)


@torch.no_grad()
def encode_all(sae: SAE, x: Tensor, chunk: int = 8192) -> tuple[Tensor, Tensor]:
    """(codes, reconstruction) of x in eval mode, chunked."""
    was = sae.training
    sae.eval()
    codes, recon = [], []
    for i in range(0, x.shape[0], chunk):
        out = sae(x[i:i + chunk])
        codes.append(out.codes.float())
        recon.append(out.recon.float())
    sae.train(was)
    return torch.cat(codes), torch.cat(recon)


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
    tokens = acts.eval_tokens[:rows].to(next(acts.model.parameters()).device)
    with torch.no_grad():
        return metrics.lm_losses(acts.model, tokens, acts.hook, reconstruct)


def save_trained(results: dict[str, TrainResult], acts: ActivationSet, folder: str,
                 root: Path = SAE_ROOT) -> dict[str, Path]:
    """Save SAEs as cfg.json + sae_weights.safetensors (SAELens layout) under
    root/folder/<name>, with the activation scale folded in so they take raw activations."""
    out = {}
    for name, res in results.items():
        extra = {k: float(v) for k, v in res.final.items() if isinstance(v, (int, float))}
        out[name] = save_sae(res.sae, root / folder / name, input_scale=acts.scale,
                             extra={"final_metrics": extra})
    return out
