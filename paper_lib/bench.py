"""Benchmarks: `python -m paper_lib.bench [--quick] [--out FILE]` writes JSON.

Everything a claim compares is measured in the same run on the same device:
- TopK training step, tokens/s and peak memory: our sparse path under each exact kernel
  strategy (`STRATEGIES`), the dense reference (naive PyTorch), and eai-sparsify's step
  (its default optimiser, and with Adam) when installed (`pip install -e .[bench]`), at
  d=768 n=32768 k=32 (batch 4096, 16384 and 65536) and d=2304 n=65536 k=64 (batch 4096), bf16
  autocast with fp32 master weights;
- BatchTopK and Matryoshka steps on the sparse path;
- many SAEs per pass: G TopK-family SAEs of one size (k per SAE) as one `SAEStack` step
  against their G separate steps, interleaved (`time_pair`), in SAE-tokens/s (G x batch
  per step), with seeds (one k) and with a k sweep, at `STACK_CONFIGS` (`--stacks` picks
  others);
- harvest tokens/s for a GPT-2-small-shaped model (random weights), hook at layer 6:
  `harvest` (blocks 0-5) by the fused forward and by TransformerLens' forward, each eager
  and with torch.compile, run_with_cache with stop_at_layer=7 (blocks 0-6) and a full
  forward;
- a profiler breakdown (top CUDA ops) of one sparse TopK step per gradient strategy, and
  of the triton + blockmax step at the largest batch;
- the device's copy bandwidth and matrix-product throughput, measured in the same run, and
  for every TopK row the step floor they imply (`step_floor_seconds`): how far each
  implementation is from what fp32 Adam and the dense encoder alone cost;
- `targets`: per TopK size and batch, our fastest TopK step against eai-sparsify's fastest,
  and whether #10's targets (5 M tok/s at d=768 n=32768 k=32; >= 1.0x eai-sparsify) are met
  (`--summary FILE` prints them first).
`--quick` runs tiny sizes (the CPU smoke check used by the tests); `--configs` and
`--strategies` pick sizes and kernel strategies (a GPU lease is short), and the torch.compile
row is timed at the first size only (compiling is slow; on the H100 it failed alike at all
four). The results so far are written to `<out>.partial.json` after every suite, so a run
killed at a device's time limit keeps what it measured, and the finished JSON replaces the
output file only at the end. `time_step_pair` (two SAEs' steps interleaved round by round)
gives notebook 04 its Matryoshka / TopK cost ratio.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
import time
import traceback
import warnings
from pathlib import Path
from typing import Any, Callable, NamedTuple

import numpy as np
import torch

from paper_lib.runtime import PROJECT_ROOT, atomic_write_json, env_info
from paper_lib.sae import SAEConfig, kernels, make_sae
from paper_lib.sae.base import TOPK_FAMILY
from paper_lib.sae.stack import SAEStack
from paper_lib.train import CompileFallbackWarning, make_adam, make_step


def _sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def _timed(step: Callable[[], None], dev: torch.device, steps: int, warmup: int) -> float:
    """Median seconds per call of `step` after `warmup` calls."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        _sync(dev)
        t0 = time.perf_counter()
        step()
        _sync(dev)
        times.append(time.perf_counter() - t0)
    return float(sorted(times)[len(times) // 2])


def _peak_reset(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)


def _peak(dev: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None


def our_step(cfg: SAEConfig, x: torch.Tensor, bf16: bool = True, compile: bool = False
             ) -> Callable[[], None]:
    """One training step exactly as paper_lib.train runs it (`make_step`; no dead latents)."""
    sae = make_sae(cfg).to(x.device).train()
    step = make_step(sae, make_adam(sae, lr=1e-4), bf16, compile)
    return lambda: step(x, None)


class PairTiming(NamedTuple):
    seconds_a: float
    """median seconds per step of A"""
    seconds_b: float
    ratios: list[float]
    """B's step time over A's, one per round"""

    @property
    def ratio(self) -> float:
        """Median per-round ratio B / A."""
        return float(np.median(self.ratios))


def time_pair(step_a: Callable[[], None], step_b: Callable[[], None], dev: torch.device,
              rounds: int = 15, warmup: int = 3) -> PairTiming:
    """Time two steps interleaved, one of each per round (alternating which goes first),
    so a host that speeds up or slows down mid-measurement (a shared CPU, GPU clocks)
    moves both alike and their per-round ratio stays put."""
    if rounds < 1:
        raise ValueError(f"rounds={rounds} must be at least 1")
    for _ in range(warmup):
        step_a()
        step_b()
    ta, tb = [], []
    for r in range(rounds):
        for step, out in ((step_a, ta), (step_b, tb))[:: 1 if r % 2 == 0 else -1]:
            _sync(dev)
            t0 = time.perf_counter()
            step()
            _sync(dev)
            out.append(time.perf_counter() - t0)
    return PairTiming(float(np.median(ta)), float(np.median(tb)),
                      [b / a for a, b in zip(ta, tb)])


def time_step_pair(cfg_a: SAEConfig, cfg_b: SAEConfig, x: torch.Tensor, rounds: int = 15,
                   warmup: int = 3, bf16: bool = True) -> PairTiming:
    """Training steps of two fresh SAEs on the fixed batch x [B, d], interleaved
    (`time_pair`): the cost of B relative to A."""
    return time_pair(our_step(cfg_a, x, bf16), our_step(cfg_b, x, bf16), x.device, rounds,
                     warmup)


def sparsify_step(d: int, n: int, k: int, x: torch.Tensor, optimizer: str) -> Callable[[], None]:
    """eai-sparsify's trainer step for one SAE: forward (its own bf16 autocast, fused
    encoder, Triton decoder), FVU loss, backward, parallel-gradient removal, optimiser."""
    from sparsify import SparseCoder, SparseCoderConfig

    sae = SparseCoder(d, SparseCoderConfig(num_latents=n, k=k), device=x.device)
    if optimizer == "signum":  # sparsify's default: schedule-free SignSGD
        from schedulefree import ScheduleFreeWrapper
        from sparsify.sign_sgd import SignSGD

        opt = ScheduleFreeWrapper(SignSGD([{"params": sae.parameters(), "lr": 5e-3}]),
                                  momentum=0.95)
        opt.train()
    else:
        opt = torch.optim.Adam(sae.parameters(), lr=1e-4, eps=6.25e-10,
                               fused=x.device.type == "cuda")

    def step() -> None:
        out = sae(x)
        out.fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
    return step


# Bytes per fp32 parameter of one fused Adam step: read param, grad, m, v; write param, m, v.
ADAM_BYTES_PER_PARAM = 7 * 4


def device_peaks(dev: torch.device, quick: bool) -> dict[str, float]:
    """Measured in this run: copy bandwidth (bytes read + written per second) and matrix
    product throughput (bf16 on CUDA, fp32 on CPU), the two numbers a step floor needs."""
    size, m = (1 << 22, 256) if quick else (1 << 28, 8192)
    a = torch.empty(size, dtype=torch.float32, device=dev)
    b = torch.empty_like(a)
    copy_s = _timed(lambda: b.copy_(a), dev, 5, 2)
    dt = torch.bfloat16 if dev.type == "cuda" else torch.float32
    x = torch.randn(m, m, dtype=dt, device=dev)
    mm_s = _timed(lambda: x @ x, dev, 5, 2)
    return {"copy_bytes_per_s": 2 * size * 4 / copy_s, "matmul_flop_per_s": 2 * m**3 / mm_s,
            "matmul_dtype": str(dt).removeprefix("torch.")}


def step_floor_seconds(d: int, n: int, batch: int, peaks: dict[str, float]) -> float:
    """A lower bound on one TopK training step with fp32 Adam: the optimiser's memory
    traffic over all 2dn + n + d parameters, writing their fp32 gradients once, and the
    dense encoder product (2 B d n FLOP) at the measured peaks. Top-k selection, decoding,
    the sparse gradients and the decoder constraint are counted as free."""
    params = 2 * d * n + n + d
    memory = (ADAM_BYTES_PER_PARAM + 4) * params / peaks["copy_bytes_per_s"]
    return memory + 2 * batch * d * n / peaks["matmul_flop_per_s"]


def bench_step(name: str, make: Callable[[], Callable[[], None]], tokens: int,
               dev: torch.device, steps: int, warmup: int) -> dict[str, Any]:
    _peak_reset(dev)
    try:
        step = make()
        sec = _timed(step, dev, steps, warmup)
    except Exception as e:  # report, do not hide, a variant that cannot run here
        # the chained traceback's end: for a compile fallback it holds the compiler's
        # own error and where it was raised (run with TORCHDYNAMO_VERBOSE=1 for all frames)
        tb = "".join(traceback.format_exception(e))
        return {"variant": name, "error": f"{type(e).__name__}: {e}", "traceback": tb[-8000:]}
    return {"variant": name, "seconds_per_step": sec, "tokens_per_s": tokens / sec,
            "peak_memory_gib": _peak(dev)}


# Exact kernel alternatives of the sparse path (paper_lib.sae.kernels.strategy).
STRATEGIES = list(itertools.product(kernels.GRADS, kernels.TOPK))
SKIPPED_OFF_CUDA = "not run: Triton kernels are timed on CUDA only"


def runs_on(grads: str, dev: torch.device) -> bool:
    """Whether the benchmark times `grads` on `dev` (Triton off CUDA would be its
    interpreter: correct, as the tests use it, but no timing to report)."""
    return grads != "triton" or dev.type == "cuda"


def topk_suite(d: int, n: int, k: int, batch: int, dev: torch.device, steps: int,
               warmup: int, peaks: dict[str, float] | None = None,
               strategies: list[tuple[str, str]] | None = None, compile: bool = True
               ) -> list[dict[str, Any]]:
    """Every TopK-family step row at one size: our sparse path under each of `strategies`
    (default all), torch.compile (if `compile`), the dense reference, eai-sparsify and the
    BatchTopK / Matryoshka steps."""
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(batch, d, device=dev, generator=gen)
    cfg = SAEConfig("topk", d, n, k=k)
    rows = []

    def ours(sparse: bool, grads: str | None = None, topk: str = "full", compile: bool = False
             ) -> Callable[[], None]:  # grads None: the library's default on this device
        def run() -> None:
            with kernels.use_sparse(sparse), kernels.strategy(grads, topk), \
                    warnings.catch_warnings():
                # an eager fallback must not be timed as the compiled step: record the error
                warnings.simplefilter("error", CompileFallbackWarning)
                step()
        step = our_step(cfg, x, compile=compile)
        return run

    for grads, topk in STRATEGIES if strategies is None else strategies:
        plain = (grads, topk) == (kernels.grads_for(dev), "full")  # what a user gets
        label = f"paper_lib sparse{'' if plain else f', {grads} grads, {topk} topk'} (Adam)"
        if not runs_on(grads, dev):
            rows.append({"variant": label, "error": SKIPPED_OFF_CUDA, "grads": grads,
                         "topk": topk})
            continue
        row = bench_step(label, lambda g=grads, t=topk: ours(True, g, t), batch, dev, steps,
                         warmup)
        rows.append({**row, "grads": grads, "topk": topk})
    if compile:
        rows.append(bench_step("paper_lib sparse, torch.compile (Adam)",
                               lambda: ours(True, compile=True), batch, dev, steps, warmup))
    rows.append(bench_step("naive dense PyTorch (Adam)", lambda: ours(False), batch, dev, steps,
                           warmup))
    for opt in ("signum", "adam"):
        rows.append(bench_step(f"eai-sparsify ({opt})",
                               lambda o=opt: sparsify_step(d, n, k, x, o), batch, dev, steps,
                               warmup))
    for arch in ("batchtopk", "matryoshka"):
        c = SAEConfig(arch, d, n, k=k)
        rows.append(bench_step(f"paper_lib sparse {arch} (Adam)",
                               lambda c=c: our_step(c, x), batch, dev, steps, warmup))
    for r in rows:
        r.update({"d": d, "n": n, "k": k, "batch": batch})
        if peaks and "tokens_per_s" in r:
            floor = batch / step_floor_seconds(d, n, batch, peaks)
            r.update({"floor_tokens_per_s": floor, "fraction_of_floor": r["tokens_per_s"] / floor})
    return rows


def stack_suite(arch: str, d: int, n: int, ks: tuple[int, ...], batch: int,
                dev: torch.device, rounds: int, warmup: int) -> list[dict[str, Any]]:
    """G = len(ks) SAEs of `arch` and d x n (SAE g with k = ks[g], seed g) trained one batch
    at a time: as one SAEStack step against their G separate steps (each as `our_step`),
    interleaved round by round. Rows: each side's SAE-tokens/s and peak memory, and the
    median per-round speed-up of the stack."""
    gen = torch.Generator(device=dev).manual_seed(0)
    x = torch.randn(batch, d, device=dev, generator=gen)
    cfgs = [SAEConfig(arch, d, n, k=k, seed=g) for g, k in enumerate(ks)]
    common = {"arch": arch, "d": d, "n": n, "ks": list(ks), "saes": len(ks), "batch": batch}
    try:
        separate = [our_step(c, x) for c in cfgs]
        stack = SAEStack([make_sae(c).to(dev).train() for c in cfgs])
        stacked = make_step(stack, make_adam(stack, lr=1e-4))

        def one_by_one() -> None:
            for step in separate:
                step()
        with kernels.use_sparse(True):
            t = time_pair(one_by_one, lambda: stacked(x, None), dev, rounds, warmup)
            peaks = []
            for step in (one_by_one, lambda: stacked(x, None)):  # peak memory of each alone
                _peak_reset(dev)
                step()
                _sync(dev)
                peaks.append(_peak(dev))
    except Exception as e:  # report, do not hide, a size that cannot run here
        return [{**common, "variant": f"stacked {arch}", "error": f"{type(e).__name__}: {e}"}]
    return [{**common, "variant": label, "seconds_per_step": sec,
             "sae_tokens_per_s": len(ks) * batch / sec, "peak_memory_gib": peak,
             **({"speedup": 1 / t.ratio} if label.startswith("stacked") else {})}
            for label, sec, peak in ((f"{len(ks)} separate {arch} steps", t.seconds_a, peaks[0]),
                                     (f"stacked {arch} (one step)", t.seconds_b, peaks[1]))]


def harvest_suite(dev: torch.device, quick: bool, rows: int | None = None
                  ) -> list[dict[str, Any]]:
    """Tokens/s of harvest() at blocks.6.hook_resid_pre of a GPT-2-small-shaped model."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    from paper_lib.data.harvest import harvest, row_batches, stop_layer

    layers, d, ctx, default_rows = (2, 64, 32, 8) if quick else (12, 768, 128, 512)
    rows = rows or default_rows
    cfg = HookedTransformerConfig(n_layers=layers, d_model=d, n_heads=max(1, d // 64),
                                  d_head=min(64, d), d_mlp=4 * d, n_ctx=ctx,
                                  d_vocab=257 if quick else 50257, act_fn="gelu_new",
                                  normalization_type="LN",
                                  dtype=torch.bfloat16 if dev.type == "cuda" else torch.float32)
    model = HookedTransformer(cfg, move_to_device=False).to(dev, print_details=False).eval()
    hook = f"blocks.{layers // 2}.hook_resid_pre"
    tokens = torch.randint(0, cfg.d_vocab, (rows * 4, ctx), device=dev)
    n_tok = rows * 4 * (ctx - 1)
    stop = stop_layer(model, hook)
    out = []

    def each_batch(fn: Callable[[torch.Tensor], Any]) -> Callable[[], None]:
        def run() -> None:
            with torch.inference_mode():  # as harvest does: no autograd bookkeeping
                for i in range(0, tokens.shape[0], rows):
                    fn(tokens[i:i + rows])
        return run

    def ours(compile: bool, fused: bool) -> Callable[[], None]:
        return lambda: harvest(model, row_batches(tokens, rows), hook, n_tok, out_device=dev,
                               out_dtype=cfg.dtype, progress=False, compile=compile,
                               fused=fused)

    for label, fn in (
        ("harvest (fused forward)", ours(False, True)),
        ("harvest (fused forward, torch.compile)", ours(True, True)),
        ("harvest (TransformerLens, stop_at_layer=L)", ours(False, False)),
        ("harvest (TransformerLens, stop_at_layer=L, torch.compile)", ours(True, False)),
        ("run_with_cache, stop_at_layer=L+1", each_batch(
            lambda t: model.run_with_cache(t, names_filter=[hook], stop_at_layer=stop))),
        ("full forward", each_batch(lambda t: model(t, return_type=None))),
    ):
        sec = _timed(fn, dev, 3 if quick else 5, 1)  # the warm-up call compiles
        out.append({"variant": label, "tokens_per_s": n_tok / sec, "seconds": sec,
                    "layers": layers, "d_model": d, "hook": hook, "batch_rows": rows,
                    "n_ctx": ctx})
    if dev.type == "cuda":
        torch.cuda.empty_cache()  # hand cached blocks back before the next (larger) suite
    return out


def profile_step(cfg: SAEConfig, batch: int, dev: torch.device, grads: str = "index",
                 topk: str = "full", top: int = 25) -> list[dict]:
    """Where the time of one sparse TopK step goes under the `grads` and `topk` kernel
    strategies (CUDA time per op, or CPU on CPU)."""
    x = torch.randn(batch, cfg.d_in, device=dev)
    step = our_step(cfg, x)
    acts = [torch.profiler.ProfilerActivity.CPU]
    if dev.type == "cuda":
        acts.append(torch.profiler.ProfilerActivity.CUDA)
    with kernels.use_sparse(True), kernels.strategy(grads=grads, topk=topk):
        for _ in range(3):
            step()
        _sync(dev)
        with torch.profiler.profile(activities=acts) as prof:
            for _ in range(3):
                step()
            _sync(dev)
    key = "self_device_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    events = sorted(prof.key_averages(), key=lambda e: getattr(e, key, 0), reverse=True)
    total = sum(getattr(e, key, 0) for e in events) or 1
    rows = []
    for e in events[:top]:
        self_t = getattr(e, key, 0)
        rows.append({"op": e.key, "self_us_per_step": self_t / 3, "share": self_t / total,
                     "calls_per_step": e.count / 3, "grads": grads, "topk": topk,
                     "batch": batch})
    return rows


# Issue #10's targets for the TopK step, each met in one benchmark run: tokens/s at one size
# (stated for one H100: on another chip read it beside that run's step floor) and the ratio
# to eai-sparsify's fastest step at the same size and batch.
TARGET_SIZE, TARGET_TOKENS_PER_S, TARGET_RATIO = (768, 32768, 32), 5e6, 1.0


def _side(variant: str) -> str | None:
    """Which side of the targets a step row is on, by its topk_suite name: "ours" (a TopK
    step of the sparse path, any kernel strategy or compiled), "eai" or None (the dense
    reference, the other architectures)."""
    if variant.startswith("paper_lib sparse") and not any(
            arch in variant for arch in ("batchtopk", "matryoshka")):
        return "ours"
    return "eai" if variant.startswith("eai-sparsify") else None


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per size and batch of the TopK rows: our fastest TopK step, eai-sparsify's fastest, the
    ratio, and whether each target is met (None where it does not apply or a side is
    missing, e.g. eai-sparsify not installed)."""
    best: dict[tuple[int, int, int, int], dict[str, dict[str, Any]]] = {}
    for r in rows:
        side = _side(r.get("variant", ""))
        if side is None or "tokens_per_s" not in r:
            continue
        sides = best.setdefault((r["d"], r["n"], r["k"], r["batch"]), {})
        if side not in sides or r["tokens_per_s"] > sides[side]["tokens_per_s"]:
            sides[side] = r
    out = []
    for (d, n, k, batch), sides in best.items():
        ours, eai = sides.get("ours"), sides.get("eai")
        ratio = ours["tokens_per_s"] / eai["tokens_per_s"] if ours and eai else None
        out.append({
            "d": d, "n": n, "k": k, "batch": batch,
            "ours": ours and ours["variant"], "ours_tokens_per_s": ours and ours["tokens_per_s"],
            "eai": eai and eai["variant"], "eai_tokens_per_s": eai and eai["tokens_per_s"],
            "ratio_to_eai": ratio,
            "meets_ratio": None if ratio is None else ratio >= TARGET_RATIO,
            "meets_tokens_per_s": (ours["tokens_per_s"] >= TARGET_TOKENS_PER_S
                                   if ours and (d, n, k) == TARGET_SIZE else None)})
    return out


def _cell(value: Any, fmt: str = "") -> str:
    return "" if value is None else format(value, fmt)


def summary(result: dict[str, Any]) -> str:
    """Markdown tables of a benchmark JSON: #10's targets, steps (with the floor), harvest,
    profile."""
    gpu = result.get("env", {}).get("gpu") or result.get("env", {}).get("device", "?")
    lines = [f"Targets (#10, on {gpu}): >= {TARGET_TOKENS_PER_S / 1e6:g} M tok/s at d, n, k = "
             f"{', '.join(map(str, TARGET_SIZE))} (stated for one H100) and >= "
             f"{TARGET_RATIO:g}x eai-sparsify's fastest step, in the same run.", "",
             "| d | n | k | batch | ours, fastest TopK step | M tok/s | eai-sparsify, fastest "
             "| M tok/s | ratio | ratio met | 5 M met |", "|---" * 11 + "|"]
    for t in targets(result.get("topk", [])):
        lines.append(
            f"| {t['d']} | {t['n']} | {t['k']} | {t['batch']} | {_cell(t['ours'])} | "
            f"{_cell(t['ours_tokens_per_s'] and t['ours_tokens_per_s'] / 1e6, '.2f')} | "
            f"{_cell(t['eai'])} | "
            f"{_cell(t['eai_tokens_per_s'] and t['eai_tokens_per_s'] / 1e6, '.2f')} | "
            f"{_cell(t['ratio_to_eai'], '.2f')} | {_cell(t['meets_ratio'])} | "
            f"{_cell(t['meets_tokens_per_s'])} |")
    lines += ["", "| step | d | n | k | batch | M tok/s | peak GiB | of floor |", "|---" * 8 + "|"]
    for r in result.get("topk", []):
        if "error" in r:
            error = " ".join(r["error"].split())[:60]  # one line: a newline ends the row
            lines.append(f"| {r.get('variant', '?')} | | | | | error: {error} | | |")
            continue
        frac = r.get("fraction_of_floor")
        peak = r.get("peak_memory_gib")
        lines.append(f"| {r['variant']} | {r['d']} | {r['n']} | {r['k']} | {r['batch']} | "
                     f"{r['tokens_per_s'] / 1e6:.2f} | {'' if peak is None else f'{peak:.1f}'} | "
                     f"{'' if frac is None else f'{frac:.0%}'} |")
    if result.get("stack"):
        lines += ["", "| many SAEs per pass | d | n | k per SAE | batch | M SAE-tok/s | "
                  "peak GiB | speed-up |", "|---" * 8 + "|"]
        for r in result["stack"]:
            head = f"| {r['variant']} | {r['d']} | {r['n']} | {','.join(map(str, r['ks']))} | " \
                   f"{r['batch']} |"
            if "error" in r:
                lines.append(f"{head} error: {' '.join(r['error'].split())[:60]} | | |")
                continue
            peak, up = r.get("peak_memory_gib"), r.get("speedup")
            lines.append(f"{head} {r['sae_tokens_per_s'] / 1e6:.2f} | "
                         f"{'' if peak is None else f'{peak:.1f}'} | "
                         f"{'' if up is None else f'{up:.2f}x'} |")
    if result.get("harvest"):
        lines += ["", "| harvest | M tok/s |", "|---|---|"]
        lines += [f"| {r.get('variant', r.get('error'))} (rows {r.get('batch_rows')}) | "
                  f"{r.get('tokens_per_s', 0) / 1e6:.2f} |" for r in result["harvest"]]
    if result.get("profile"):
        lines += ["", "| grads/topk/batch | op | us/step | share |", "|---|---|---|---|"]
        shown: dict[str, int] = {}
        for r in result["profile"]:  # older files lack topk and batch
            g = "/".join(str(r[k]) for k in ("grads", "topk", "batch") if k in r) or "index"
            shown[g] = shown.get(g, 0) + 1
            if "op" in r and shown[g] <= 12:
                lines.append(f"| {g} | {r['op'][:70]} | {r['self_us_per_step']:.0f} | "
                             f"{r['share']:.1%} |")
    return "\n".join(lines)


DEFAULT_CONFIGS = [(768, 32768, 32, 4096), (768, 32768, 32, 16384), (768, 32768, 32, 65536),
                   (2304, 65536, 64, 4096)]
QUICK_CONFIGS = [(32, 2048, 8, 256)]
# Stacks: TopK seeds (one k) and k sweeps where a step is small (n = 4096: launch-bound on
# a GPU) and at the TopK target's size, and a Matryoshka k sweep.
STACK_CONFIGS = [("topk", 768, 4096, (32,) * 4, 4096), ("topk", 768, 4096, (8, 16, 32, 64), 4096),
                 ("topk", 768, 32768, (8, 16, 32, 64), 4096),
                 ("matryoshka", 768, 4096, (8, 16, 32, 64), 4096)]
QUICK_STACKS = [("topk", 32, 512, (4, 8), 256)]


def parse_config(text: str) -> tuple[int, int, int, int]:
    """`DxNxKxB` (e.g. 768x32768x32x4096): input width, latents, k and batch."""
    try:
        d, n, k, b = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give DxNxKxB, e.g. 768x32768x32x4096 (d, latents, k, batch)") from None
    if min(d, n, k, b) < 1 or k > n:
        raise argparse.ArgumentTypeError(f"{text!r}: sizes must be >= 1 and k <= n")
    return d, n, k, b


def parse_stack(text: str) -> tuple[str, int, int, tuple[int, ...], int]:
    """`[ARCH:]DxNxK1,K2,...xB` (e.g. matryoshka:768x4096x8,16,32,64x4096): one SAE per k,
    all d x n, of a TopK-family architecture (default topk)."""
    arch, _, size = text.lower().rpartition(":")
    arch = arch or "topk"
    if arch not in TOPK_FAMILY:
        raise argparse.ArgumentTypeError(f"{text!r}: {arch!r} does not stack; choose one of "
                                         f"{', '.join(TOPK_FAMILY)}")
    try:
        d, n, ks, b = size.split("x")
        d, n, b, ks = int(d), int(n), int(b), tuple(int(k) for k in ks.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give [ARCH:]DxNxK1,K2,...xB, e.g. 768x4096x8,16,32,64x4096 (d, "
            "latents, one k per SAE, batch)") from None
    if min(d, n, b, *ks) < 1 or max(ks) > n:
        raise argparse.ArgumentTypeError(f"{text!r}: sizes must be >= 1 and every k <= n")
    return arch, d, n, ks, b


def parse_strategy(text: str) -> tuple[str, str]:
    """`GRADS/TOPK` (e.g. triton/blockmax), one of `STRATEGIES`."""
    grads, _, topk = text.partition("/")
    if (grads, topk) not in STRATEGIES:
        allowed = ", ".join(f"{g}/{t}" for g, t in STRATEGIES)
        raise argparse.ArgumentTypeError(f"{text!r}: not a strategy; choose from {allowed}")
    return grads, topk


def partial_path(out: Path) -> Path:
    """Where a run keeps its results so far, beside (never over) the finished file."""
    return out.with_name(out.stem + ".partial.json")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny sizes (CPU smoke check)")
    ap.add_argument("--out", type=Path, default=None, help="JSON path (default: results/bench/)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--configs", type=parse_config, nargs="+", default=None,
                    metavar="DxNxKxB", help="TopK step sizes, in the order run (default: "
                    + " ".join("x".join(map(str, c)) for c in DEFAULT_CONFIGS) + ")")
    ap.add_argument("--strategies", type=parse_strategy, nargs="+", default=None,
                    metavar="GRADS/TOPK", help="sparse-path kernel strategies to time "
                    "(default: all, " + " ".join(f"{g}/{t}" for g, t in STRATEGIES) + ")")
    ap.add_argument("--stacks", type=parse_stack, nargs="+", default=None,
                    metavar="[ARCH:]DxNxK1,K2,...xB", help="stacked-SAE sizes (default: "
                    + " ".join(f"{a}:{d}x{n}x{','.join(map(str, ks))}x{b}"
                               for a, d, n, ks, b in STACK_CONFIGS) + ")")
    ap.add_argument("--skip", nargs="*", default=[],
                    choices=["topk", "stack", "harvest", "profile"])
    ap.add_argument("--harvest-rows", type=int, nargs="*", default=[],
                    help="extra harvest batch sizes (rows of 128 tokens) to compare")
    ap.add_argument("--summary", type=Path, default=None,
                    help="print Markdown tables of an existing benchmark JSON and exit")
    args = ap.parse_args(argv)
    if args.summary:
        print(summary(json.loads(args.summary.read_text())))
        return 0
    if args.steps < 1:
        ap.error(f"--steps {args.steps}: must be >= 1")
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    # The larger batches show what the per-step costs (fp32 Adam over all 2 d n weights,
    # about 0.5 ms on an H100 at d=768 n=32768) amount to per token; 65536 tokens is
    # eai-sparsify's default batch (32 sequences of 2048).
    configs = args.configs or (QUICK_CONFIGS if args.quick else DEFAULT_CONFIGS)
    steps, warmup = (3, 1) if args.quick else (args.steps, 5)
    env = env_info(dev)
    slug = "quick" if args.quick else env.get("gpu", "cpu").replace(" ", "_")
    out = args.out or PROJECT_ROOT / "results" / "bench" / f"{slug}.json"
    result: dict[str, Any] = {"env": env, "python": platform.python_version(),
                              "quick": args.quick, "complete": False,
                              "topk": [], "targets": [], "stack": [], "harvest": [],
                              "profile": []}
    try:
        from importlib.metadata import version

        result["env"]["eai_sparsify"] = version("eai-sparsify")
    except Exception:
        result["env"]["eai_sparsify"] = None
    suites: list[tuple[str, Callable[[], list[dict[str, Any]]]]] = []
    if "topk" not in args.skip:
        result["peaks"] = peaks = device_peaks(dev, args.quick)
        for i, (d, n, k, b) in enumerate(configs):
            suites.append(("topk", lambda d=d, n=n, k=k, b=b, first=i == 0:
                           topk_suite(d, n, k, b, dev, steps, warmup, peaks, args.strategies,
                                      compile=first)))
    if "stack" not in args.skip:
        for a, d, n, ks, b in args.stacks or (QUICK_STACKS if args.quick else STACK_CONFIGS):
            suites.append(("stack", lambda a=a, d=d, n=n, ks=ks, b=b:
                           stack_suite(a, d, n, ks, b, dev, 3 if args.quick else 15, warmup)))
    if "harvest" not in args.skip:
        suites.append(("harvest", lambda: harvest_suite(dev, args.quick)))
        for r in args.harvest_rows:
            suites.append(("harvest", lambda r=r: harvest_suite(dev, args.quick, r)))
    if "profile" not in args.skip:
        d, n, k, b = configs[0]
        cfg = SAEConfig("topk", d, n, k=k)
        for g in filter(lambda g: runs_on(g, dev), kernels.GRADS):
            suites.append(("profile", lambda g=g: profile_step(cfg, b, dev, grads=g)))
        # and the candidate for the 5 M tok/s target at the largest batch of that shape
        big = max(c[3] for c in configs if c[:3] == (d, n, k))
        best = "triton" if runs_on("triton", dev) else kernels.grads_for(dev)
        suites.append(("profile", lambda: profile_step(cfg, big, dev, best, "blockmax")))
    partial = partial_path(out)
    for name, run in suites:
        try:
            rows = run()
        except Exception as e:  # record the failure, keep the other suites
            rows = [{"error": f"{type(e).__name__}: {e}"}]
        result[name] += rows
        result["targets"] = targets(result["topk"])
        print(json.dumps(rows, indent=1), flush=True)
        atomic_write_json(partial, result)  # a kill from here on loses only the next suite
    result["complete"] = True
    atomic_write_json(out, result)
    partial.unlink(missing_ok=True)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
