"""Experiments of notebook 02: the amortisation gap (O'Neill, Gumran, Klindt, arXiv 2411.13117).

Known dictionary: the decoder is frozen at the true D; amortised encoders (linear-ReLU
SAE, MLPs) are trained with MSE + l1 * L1 and scored by latent MCC on held-out data; ITO
refines the SAE's codes. Unknown dictionary: SAE and MLP learn their decoders, sparse
coding learns D and codes jointly; scored by latent and dictionary MCC.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import signal
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from paper_lib import metrics
from paper_lib.config import AmortParams, Params
from paper_lib.data.activations import ActivationSet
from paper_lib.data.synthetic import SparseData, make_sparse_data
from paper_lib.experiments import common
from paper_lib.experiments.common import train_on
from paper_lib.inference import inference_flops, refine_codes, sparse_coding
from paper_lib.runtime import has_checkpoint, keep_until_recorded, read_checkpoint, write_checkpoint
from paper_lib.sae import SAE, SAEConfig, make_sae
from paper_lib.train import ShuffledBatches, TrainConfig, train_saes

ITO_LR = 5e-2


def datasets_for(p: AmortParams, seed: int, dim: int, n_latents: int) -> tuple[SparseData,
                                                                              SparseData]:
    train = make_sparse_data(p.n_train, n_latents, dim, p.k, seed)
    test = make_sparse_data(p.n_test, n_latents, dim, p.k, seed + 100_003,
                            dictionary=train.dictionary)
    return train, test


def encoder_configs(p: AmortParams, dim: int, n_latents: int, seed: int, known: bool,
                    widths: tuple[int, ...]) -> dict[str, SAEConfig]:
    """The amortised encoders: {"sae": linear-ReLU, "mlp32": ..., ...}; no decoder bias
    (X = S D has none); a known dictionary is frozen, a learned one kept unit-norm."""
    common = dict(d_in=dim, d_sae=n_latents, l1_coeff=p.l1, decoder_bias=False,
                  freeze_decoder=known, unit_norm_decoder=not known, seed=seed)
    cfgs = {"sae": SAEConfig("relu", tied_init=True, **common)}
    for h in widths:
        cfgs[f"mlp{h}"] = SAEConfig("mlp", mlp_hidden=h, **common)
    return cfgs


def _train(p: AmortParams, cfgs: dict[str, SAEConfig], train: SparseData, known: bool,
           device: torch.device, steps: int | None = None) -> dict[str, Any]:
    saes = {name: make_sae(c).to(device) for name, c in cfgs.items()}
    if known:
        for s in saes.values():
            s.set_decoder_(train.dictionary.to(device))
            if s.cfg.tied_init and s.cfg.architecture == "relu":
                with torch.no_grad():  # a tied init ties the encoder to the decoder it trains
                    s.W_enc.copy_(s.W_dec.T)  # with, here the known dictionary
    x, codes = train.x.to(device), train.codes

    def eval_fn(sae: SAE) -> dict[str, float]:
        with torch.no_grad():
            return {"mcc_train": metrics.mcc(codes, sae.encode(x).cpu())}

    steps = steps or p.train_steps
    tc = TrainConfig(steps=steps, lr=p.lr, decay_fraction=0.2, eval_every=max(1, steps // 40),
                     progress=False)
    res = train_saes(list(saes.values()), ShuffledBatches(x, x.shape[0], p.seed), tc,
                     eval_fn=eval_fn)
    return {name: r for name, r in zip(saes, res)}


def ito_trace(sae: SAE, test: SparseData, l1: float, steps: int, device: torch.device,
              every: int = 10) -> tuple[Tensor, list[tuple[int, float]]]:
    """Refine the SAE's test codes with ITO; returns final codes and (step, MCC) pairs."""
    x = test.x.to(device)
    with torch.no_grad():
        z0 = sae.encode(x)
    trace = [(0, metrics.mcc(test.codes, z0.cpu()))]

    def on_step(step: int, z: Tensor) -> None:
        if step % every == 0 or step == steps:
            trace.append((step, metrics.mcc(test.codes, z.cpu())))
    z = refine_codes(x, z0, sae.W_dec, sae.b_dec, l1, steps, ITO_LR, on_step=on_step)
    return z, trace


def known_dictionary(p: AmortParams, seed: int, device: torch.device,
                     dim: int | None = None, n_latents: int | None = None) -> dict[str, Any]:
    """One seed of the known-dictionary table (+ curves and traces for the figures)."""
    dim, n_latents = dim or p.dim, n_latents or p.n_latents
    train, test = datasets_for(p, seed, dim, n_latents)
    trained = _train(p, encoder_configs(p, dim, n_latents, seed, True, p.mlp_widths), train,
                     True, device)
    out: dict[str, Any] = {"mcc": {}, "curves": {}, "flops": {}}
    with torch.no_grad():
        for name, r in trained.items():
            out["mcc"][name] = metrics.mcc(test.codes, r.sae.encode(test.x.to(device)).cpu())
            out["curves"][name] = [(h["step"], h["mcc_train"]) for h in r.history]
            hidden = r.sae.cfg.mlp_hidden
            out["flops"][name] = inference_flops("mlp" if hidden else "sae", dim, n_latents,
                                                 hidden)
    z_ito, trace = ito_trace(trained["sae"].sae, test, p.l1, p.ito_steps, device)
    out["mcc"]["sae_ito"] = metrics.mcc(test.codes, z_ito.cpu())
    out["ito_trace"] = [(inference_flops("ito", dim, n_latents, steps=s), m) for s, m in trace]
    # Sparse inference from zero codes with the true dictionary: the no-encoder reference.
    zero = torch.zeros(test.x.shape[0], n_latents, device=device)
    sc_trace: list[tuple[float, float]] = []

    def on_step(step: int, z: Tensor) -> None:
        if step % 10 == 0 or step == p.ito_steps:
            sc_trace.append((inference_flops("sparse_coding", dim, n_latents, steps=step),
                             metrics.mcc(test.codes, z.cpu())))
    refine_codes(test.x.to(device), zero, test.dictionary.to(device), None, p.l1, p.ito_steps,
                 ITO_LR, on_step=on_step)
    out["sc_trace"] = sc_trace
    out["sae"] = trained["sae"].sae
    out["dictionary"] = train.dictionary
    return out


def unknown_dictionary(p: AmortParams, seed: int, device: torch.device,
                       dim: int | None = None, n_latents: int | None = None,
                       widths: tuple[int, ...] | None = None) -> dict[str, Any]:
    """One seed of the unknown-dictionary table: latent and dictionary MCC per method."""
    dim, n_latents = dim or p.dim, n_latents or p.n_latents
    widths = (max(p.mlp_widths),) if widths is None else widths
    train, test = datasets_for(p, seed, dim, n_latents)
    trained = _train(p, encoder_configs(p, dim, n_latents, seed, False, widths), train, False,
                     device)
    out: dict[str, Any] = {"latent": {}, "dict": {}, "curves": {}}
    with torch.no_grad():
        for name, r in trained.items():
            out["latent"][name] = metrics.mcc(test.codes, r.sae.encode(test.x.to(device)).cpu())
            out["dict"][name] = metrics.dictionary_mcc(train.dictionary, r.sae.W_dec.cpu())
            out["curves"][name] = [(h["step"], h["mcc_train"]) for h in r.history]
    sc = sparse_coding(train.x.to(device), n_latents, p.l1, p.sc_steps, p.sc_lr, seed,
                       trace_every=max(1, p.sc_steps // 40))
    z_test = refine_codes(test.x.to(device), torch.zeros(test.x.shape[0], n_latents,
                                                         device=device),
                          sc.dictionary, None, p.l1, p.ito_steps, ITO_LR)
    out["latent"]["sparse_coding"] = metrics.mcc(test.codes, z_test.cpu())
    out["dict"]["sparse_coding"] = metrics.dictionary_mcc(train.dictionary, sc.dictionary.cpu())
    out["curves"]["sparse_coding_dict"] = [
        (s, metrics.dictionary_mcc(train.dictionary, d.cpu())) for s, d in sc.trace]
    return out


def pair_recovery(sae: SAE, dictionary: Tensor, l1: float, steps: int,
                  device: torch.device) -> dict[str, np.ndarray]:
    """Encode every 1- and 2-sparse unit code s = e_i + e_j through x = s D; returns the
    [N, N] relative errors ||z - s|| / ||s|| of the SAE and of ITO-refined codes, and the
    rank of the linear part of encode(decode(.)), which is at most M < N."""
    n = dictionary.shape[0]
    i, j = torch.triu_indices(n, n)
    s = torch.zeros(i.numel(), n)
    s[torch.arange(i.numel()), i] = 1.0
    s[torch.arange(i.numel()), j] = 1.0
    x = (s @ dictionary).to(device)
    with torch.no_grad():
        z = sae.encode(x)
    z_ito = refine_codes(x, z, sae.W_dec, sae.b_dec, l1, steps, ITO_LR)
    support = s > 0
    out: dict[str, np.ndarray] = {}
    for name, codes in (("sae", z.cpu()), ("ito", z_ito.cpu())):
        err = ((codes - s).norm(dim=1) / s.norm(dim=1)).numpy()
        # Support recovered: the |supp s| largest codes are exactly supp s.
        top = codes.topk(2, dim=1).indices
        k_true = support.sum(1)
        ok = torch.tensor([set(top[r, :k_true[r]].tolist()) == set(support[r].nonzero()
                                                                     .flatten().tolist())
                           for r in range(s.shape[0])])
        for key, vals in ((name, err), (f"{name}_support_ok", ok.float().numpy())):
            grid = np.full((n, n), np.nan)
            grid[i.numpy(), j.numpy()] = vals
            grid[j.numpy(), i.numpy()] = vals
            out[key] = grid
    # [N, N]: codes -> encoder pre-activations, in float64 so rounding is not mistaken for rank.
    lin = dictionary.double() @ sae.W_enc.detach().double().cpu()
    out["rank"] = np.array(int(torch.linalg.matrix_rank(lin)))
    return out


def mean_std(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=float)
    return float(a.mean()), float(a.std(ddof=1)) if a.size > 1 else 0.0


def lm_gap(acts: ActivationSet, eval_rows: int, k: int, n_latents: int, steps: int,
           batch_size: int, ito_steps: int, seed: int, device: torch.device,
           progress: bool = False) -> dict[str, float]:
    """Amortisation gap on real activations: train a TopK SAE on `acts`' training batches
    (held in memory or streamed), then re-optimise the codes of the first `eval_rows`
    held-out rows on the same support (equal L0) with the decoder fixed; FVU before and
    after."""
    cfg = SAEConfig("topk", acts.d, n_latents, k=k, seed=seed,
                    dead_tokens=max(batch_size * 50, 1))
    # train_on: checkpointed, as every SAE trained on an LM's activations is
    sae = train_on(acts, [cfg], steps, batch_size, 1e-3, device, progress, desc="lm SAE",
                   seed=seed)[0].sae
    x = acts.eval[:eval_rows].to(device)
    with torch.no_grad():
        z = sae.encode(x)
    trace: list[tuple[int, float]] = []

    def on_step(step: int, codes: Tensor) -> None:
        if step % 10 == 0 or step == ito_steps:
            with torch.no_grad():
                trace.append((step, metrics.fvu(x, sae.decode(codes))))
    z_ito = refine_codes(x, z, sae.W_dec, sae.b_dec, 0.0, ito_steps, 3e-3, support=z > 0,
                         on_step=on_step)
    with torch.no_grad():
        fvu_sae = metrics.fvu(x, sae.decode(z))
        fvu_ito = metrics.fvu(x, sae.decode(z_ito))
    return {"fvu_sae": fvu_sae, "fvu_ito": fvu_ito, "l0_sae": metrics.l0(z),
            "l0_ito": metrics.l0(z_ito), "relative_gap": (fvu_sae - fvu_ito) / fvu_sae,
            "trace": trace}


def _leave_interrupts_to_parent() -> None:
    # Ctrl-C in a terminal, or a Jupyter interrupt, signals the whole process group: the
    # workers finish their task (which the parent keeps) instead of dying with it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _run_task(task: tuple[Callable[..., Any], tuple, dict]) -> Any:
    fn, args, kwargs = task
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny problems: one thread per task, the same in every process
    try:
        return fn(*args, **kwargs)
    finally:
        torch.set_num_threads(threads)


# What a task's result depends on besides its arguments: the experiments here and the code
# they call. A checkpoint written by other code is not reused.
TASK_CODE = ("experiments/amortisation.py", "inference.py", "metrics.py", "data/synthetic.py",
             "train.py", "sae/*.py")
# Parameters that by design leave results unchanged: a rerun may change them and resume.
_NOT_IN_KEY = {"progress", "workers"}


def _key_default(obj: Any) -> Any:
    if isinstance(obj, Params):
        d = {k: v for k, v in obj.to_dict().items() if k not in _NOT_IN_KEY}
        return {"params": type(obj).__name__, **d}
    if isinstance(obj, torch.device):
        return str(obj)
    raise TypeError(f"cannot key a task by an argument of type {type(obj).__name__}")


def task_path(task: tuple[Callable[..., Any], tuple, dict]) -> Path:
    """Where run_tasks keeps the result of `task`: data/ckpt/tasks/<hash>.pt, the hash of
    the function, its arguments (Params without `progress` and `workers`) and TASK_CODE."""
    fn, args, kwargs = task
    key = json.dumps([f"{fn.__module__}.{fn.__qualname__}", args, kwargs,
                      common.code_sha(*TASK_CODE)], default=_key_default, sort_keys=True)
    return common.CKPT_ROOT / "tasks" / f"{hashlib.sha256(key.encode()).hexdigest()[:16]}.pt"


def _to_state(obj: Any) -> Any:
    """`obj` in types torch.load(weights_only=True) reads back: an SAE becomes its config
    and state dict, a NumPy array a tensor."""
    if isinstance(obj, SAE):
        return {"__sae__": obj.cfg.to_dict(), "state": obj.state_dict(),
                "device": str(obj.W_dec.device), "training": obj.training}
    if isinstance(obj, np.ndarray):
        return {"__ndarray__": torch.from_numpy(obj)}
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, dict):
        return {k: _to_state(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_state(v) for v in obj)
    if obj is None or isinstance(obj, (bool, int, float, str, Tensor)):
        return obj
    raise TypeError(f"a task returned a {type(obj).__name__}, which run_tasks cannot "
                    "checkpoint; return tensors, NumPy arrays, SAEs or plain values, or pass "
                    "checkpoint=False")


def _from_state(obj: Any) -> Any:
    if isinstance(obj, dict) and "__sae__" in obj:
        sae = make_sae(SAEConfig.from_dict(obj["__sae__"]))
        sae.load_state_dict(obj["state"])
        return sae.to(obj["device"]).train(obj["training"])
    if isinstance(obj, dict) and "__ndarray__" in obj:
        return obj["__ndarray__"].numpy()
    if isinstance(obj, dict):
        return {k: _from_state(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_from_state(v) for v in obj)
    return obj


def _restore(path: Path) -> tuple[bool, Any]:
    try:  # another run of the same tasks may release the file between these two calls
        state = read_checkpoint(path, path.stem, "task checkpoint") if has_checkpoint(path) \
            else None
    except FileNotFoundError:
        state = None
    if state is None:
        return False, None
    result = _from_state(state["result"])
    keep_until_recorded(path)
    return True, result


def _save(path: Path, result: Any) -> None:
    write_checkpoint(path, {"key": path.stem, "result": _to_state(result)})
    keep_until_recorded(path)


def run_tasks(tasks: list[tuple[Callable[..., Any], tuple, dict]], workers: int = 0,
              progress: bool = True, desc: str = "seeds", checkpoint: bool = True) -> list[Any]:
    """Run independent (fn, args, kwargs) tasks, in `workers` spawned processes when > 1
    (0: one per CPU core). Each task seeds itself, so results do not depend on workers.
    `checkpoint`: each result is saved as its task finishes (`task_path`) and kept until
    the notebook's record is written (`runtime.keep_until_recorded`), so a rerun after an
    interruption reads the finished tasks and runs only the others."""
    paths = [task_path(t) for t in tasks] if checkpoint else [None] * len(tasks)
    out: list[Any] = [None] * len(tasks)
    todo = []
    for i, path in enumerate(paths):
        found, result = _restore(path) if path else (False, None)
        if found:
            out[i] = result
        else:
            todo.append(i)
    bar = tqdm(total=len(tasks), initial=len(tasks) - len(todo), desc=desc,
               disable=not progress)

    done: set[int] = set()

    def finished(i: int, result: Any) -> None:
        out[i] = result
        done.add(i)
        if paths[i]:
            _save(paths[i], result)
        bar.update()

    workers = min(workers or (os.cpu_count() or 1), len(todo))
    with bar:
        if workers <= 1:
            for i in todo:
                finished(i, _run_task(tasks[i]))
        else:
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=workers, mp_context=ctx,
                                     initializer=_leave_interrupts_to_parent) as pool:
                futures = {pool.submit(_run_task, tasks[i]): i for i in todo}
                try:
                    for f in as_completed(futures):
                        finished(futures[f], f.result())
                except BaseException:
                    # Interrupted, or a task failed: the tasks not started are dropped (the
                    # pool would run them all before letting go), those running are waited
                    # for and kept (a second interrupt stops the wait).
                    for f in futures:
                        f.cancel()
                    for f, i in futures.items():
                        if i not in done and not f.cancelled() and f.exception() is None:
                            finished(i, f.result())
                    raise
    return out


def summarise(per_seed: list[dict[str, float]]) -> dict[str, tuple[float, float]]:
    """{method: (mean, std over seeds)} from a list of {method: value} dicts."""
    return {k: mean_std([d[k] for d in per_seed]) for k in per_seed[0]}
