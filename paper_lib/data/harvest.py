"""Harvest activations at a hook, cache them on disk, and serve training batches.

`harvest` runs the model under `torch.inference_mode`, batched, up to the hook only: for
`blocks.L.hook_resid_pre` (the default) the residual entering block L (blocks 0..L-1, by
the hook-free forward of `paper_lib.data.fused` where the model allows it), for any other
hook `run_with_cache(names_filter=[hook], stop_at_layer=L + 1)`. A NaN/inf check says where a bad value appeared.
`ActivationCache` stores harvests as memory-mapped .npy shards plus a manifest (model,
hook, dtype, token count, checksums) and rebuilds anything truncated or stale.
`StreamingActivations` feeds the trainer from a buffer the LM fills a block of the stream
at a time, shuffled, for runs too large to hold in memory (the paper profile); a resumed
run skips the text it trained on without running the LM on it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from torch import Tensor
from tqdm import tqdm

from paper_lib.data import fused as fsd
from paper_lib.runtime import atomic_dir, load_or_build, stream_generator

MANIFEST = "manifest.json"


def default_hook(model: Any) -> str:
    """The residual stream entering the middle block."""
    return f"blocks.{model.cfg.n_layers // 2}.hook_resid_pre"


def resid_hook(model: Any, layer: int) -> str:
    n = model.cfg.n_layers
    if not 0 <= layer < n:
        raise ValueError(f"layer {layer} is out of range: the model has {n} layers (0..{n - 1})")
    return f"blocks.{layer}.hook_resid_pre"


def resid_pre_layer(hook: str) -> int | None:
    """L when `hook` is blocks.L.hook_resid_pre (the residual entering block L), else None."""
    m = re.fullmatch(r"blocks\.(\d+)\.hook_resid_pre", hook)
    return int(m.group(1)) if m else None


def stop_layer(model: Any, hook: str) -> int | None:
    """Validate `hook` and return the stop_at_layer that still computes it."""
    if hook not in model.hook_dict:
        m = re.match(r"blocks\.(\d+)\.", hook)
        if m and int(m.group(1)) >= model.cfg.n_layers:
            raise ValueError(f"hook {hook!r}: layer {m.group(1)} is out of range, the model "
                             f"has {model.cfg.n_layers} layers (0..{model.cfg.n_layers - 1})")
        resid = [h for h in model.hook_dict if h.endswith("hook_resid_pre")]
        raise ValueError(f"unknown hook {hook!r}. Residual-stream hooks: {', '.join(resid)}; "
                         f"all {len(model.hook_dict)} hooks are listed by model.hook_dict")
    m = re.match(r"blocks\.(\d+)\.", hook)
    if m:
        return int(m.group(1)) + 1
    return 0 if hook in ("hook_embed", "hook_pos_embed") else None


def activations_at(model: Any, tokens: Tensor, hook: str, stop: int | None,
                   compile: bool = False, fused: bool = True) -> Tensor:
    """[B, T, d] activations at `hook` (validated, `stop` from `stop_layer`).

    The residual entering block L is computed without running block L (one block fewer
    than run_with_cache needs: 6 not 7 at GPT-2 small's layer 6), by `fused.fused_resid`
    (whole-tensor kernels, flash attention; checked against TransformerLens once per model)
    when `fused` and the model allows it, else by `model(tokens, stop_at_layer=L)`. Any
    other hook, or a hook attached anywhere in the model, takes run_with_cache or
    TransformerLens' forward. `compile` runs the residual forward through torch.compile
    (compiled once, not under inference_mode)."""
    layer = resid_pre_layer(hook)
    if layer is not None and not model.hook_dict[hook].fwd_hooks:
        if fused and fsd.use_fused(model, tokens, layer):
            fwd = _compiled_fused() if compile else fsd.fused_resid
            return fwd(model, tokens, layer)
        fwd = model
        if compile:  # kept in the model's __dict__: not a submodule, freed with the model
            fwd = model.__dict__.get("_compiled_forward")
            if fwd is None:
                fwd = model.__dict__["_compiled_forward"] = torch.compile(model)
        return fwd(tokens, stop_at_layer=layer)
    _, cache = model.run_with_cache(tokens, names_filter=[hook], stop_at_layer=stop)
    return cache[hook]


@functools.cache
def _compiled_fused() -> Callable[..., Tensor]:
    return torch.compile(fsd.fused_resid)


def model_device(model: Any) -> torch.device:
    """Where the model's weights are, after checking that TransformerLens agrees: its
    forward sends the tokens to `model.cfg.device`, so a model built with
    move_to_device=False and moved with plain nn.Module.to would fail deep inside."""
    dev = next(model.parameters()).device
    cfg_dev = getattr(model.cfg, "device", None)
    if cfg_dev is not None and torch.device(cfg_dev).type != dev.type:
        raise ValueError(f"the model's weights are on {dev} but model.cfg.device is "
                         f"{cfg_dev!r}, where TransformerLens sends the tokens; move it with "
                         f"model.to({dev.type!r}) (which updates cfg.device) or build it "
                         f"with HookedTransformerConfig(device={dev.type!r})")
    return dev


def check_finite(x: Tensor, hook: str, batch_index: int) -> None:
    bad = ~torch.isfinite(x)
    if bool(bad.any()):
        where = bad.nonzero()[:3].tolist()
        raise ValueError(f"non-finite activations at hook {hook!r} in batch {batch_index} "
                         f"(first positions [row, pos, dim]: {where}); check the model weights "
                         "and the input tokens")


def harvest(model: Any, token_batches: Iterable[Tensor], hook: str, n_tokens: int,
            drop_bos: bool = True, out_device: str | torch.device = "cpu",
            out_dtype: torch.dtype = torch.float32, progress: bool = True,
            compile: bool = False, fused: bool = True) -> Tensor:
    """[n_tokens, d_model] activations at `hook` from successive token batches [B, T].
    `compile`, `fused`: see `activations_at` (torch.compile's guards fail under
    inference_mode, so a compiled harvest runs under no_grad). The result is an ordinary
    tensor, allocated outside inference mode, so callers may scale it in place."""
    stop = stop_layer(model, hook)
    out = torch.empty(n_tokens, model.cfg.d_model, dtype=out_dtype, device=out_device)
    with torch.no_grad() if compile else torch.inference_mode():
        _harvest(model, token_batches, hook, out, stop, drop_bos, progress, compile, fused)
    return out


def _harvest(model: Any, token_batches: Iterable[Tensor], hook: str, out: Tensor, stop: int | None,
             drop_bos: bool, progress: bool, compile: bool, fused: bool) -> None:
    n_tokens, out_device, out_dtype = out.shape[0], out.device, out.dtype
    dev = model_device(model)
    filled = 0
    bar = tqdm(total=n_tokens, desc=f"harvest {hook}", disable=not progress, unit="tok",
               mininterval=1.0)
    for i, tokens in enumerate(token_batches):
        act = activations_at(model, tokens.to(dev), hook, stop, compile, fused)
        check_finite(act, hook, i)
        if drop_bos:
            act = act[:, 1:]
        act = act.reshape(-1, act.shape[-1])
        take = min(act.shape[0], n_tokens - filled)
        out[filled:filled + take] = act[:take].to(out_device, out_dtype)
        filled += take
        bar.update(take)
        if filled >= n_tokens:
            break
    bar.close()
    if filled < n_tokens:
        raise ValueError(f"the token source ran out after {filled} of {n_tokens} activation "
                         "tokens: ask for fewer tokens or give more text")


def row_batches(tokens: Tensor, batch_rows: int) -> Iterator[Tensor]:
    for i in range(0, tokens.shape[0], batch_rows):
        yield tokens[i:i + batch_rows]


# --------------------------------------------------------------------------- disk cache


def spec_key(spec: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


class ActivationCache:
    """Activations on disk: data/acts/<key>/shard_XXX.npy + manifest.json.

    The manifest records the spec (model, weights checksum, hook, corpus hash, token
    count, drop_bos, dtype), the array shape and each shard's sha256; `load` returns
    None for anything missing, truncated, corrupt or made for another spec.
    """

    def __init__(self, root: Path, spec: dict[str, Any], shard_rows: int = 1 << 18) -> None:
        self.spec, self.shard_rows = spec, shard_rows
        self.dir = Path(root) / spec_key(spec)

    def load(self) -> Tensor | None:
        try:
            man = json.loads((self.dir / MANIFEST).read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if man.get("spec") != self.spec:
            return None
        parts = []
        for shard in man["shards"]:
            f = self.dir / shard["file"]
            if not f.is_file() or f.stat().st_size != shard["bytes"]:
                return None
            if hashlib.sha256(f.read_bytes()).hexdigest() != shard["sha256"]:
                return None
            try:
                parts.append(np.load(f, mmap_mode="r"))
            except ValueError:
                return None
        arr = np.concatenate(parts) if len(parts) > 1 else np.array(parts[0])
        if list(arr.shape) != man["shape"]:
            return None
        return torch.from_numpy(arr)

    def save(self, x: Tensor) -> None:
        arr = x.detach().cpu().numpy()
        with atomic_dir(self.dir) as tmp:
            shards = []
            for j, i in enumerate(range(0, arr.shape[0], self.shard_rows)):
                name = f"shard_{j:03d}.npy"
                np.save(tmp / name, np.ascontiguousarray(arr[i:i + self.shard_rows]))
                data = (tmp / name).read_bytes()
                shards.append({"file": name, "bytes": len(data),
                               "sha256": hashlib.sha256(data).hexdigest()})
            man = {"spec": self.spec, "shape": list(arr.shape), "dtype": str(arr.dtype),
                   "shards": shards}
            (tmp / MANIFEST).write_text(json.dumps(man, indent=2) + "\n")

    def get_or_build(self, build: Callable[[], Tensor]) -> tuple[Tensor, bool]:
        """(activations, hit): the cached tensor if valid, else `build()` saved first."""
        def build_and_save() -> Tensor:
            x = build()
            self.save(x)
            return x
        return load_or_build(self.dir, self.load, build_and_save)


# --------------------------------------------------------------------------- streaming


class StreamingActivations:
    """A BatchSource that harvests on the fly, one buffer at a time: fill f is the stream's
    next `buffer_tokens` activation tokens (rounded down to whole batches), shuffled by a
    generator of its own (seed, f) and served as consecutive batches. With `epoch_fills`
    the stream restarts after that many fills, so training sees its first epoch_fills *
    buffer_tokens tokens again, in a new order, as an in-memory set's epochs do (0: never).
    A batch depends only on its step, so any step can be asked for first (a resumed run's):
    the token batches of the fills before it are read and skipped without running the LM,
    and only the fill that holds the step is harvested (`progress`: a bar while skipping)."""

    def __init__(self, model: Any, make_token_iter: Callable[[], Iterator[Tensor]], hook: str,
                 batch_size: int, buffer_tokens: int, scale: float = 1.0, seed: int = 0,
                 drop_bos: bool = True, epoch_fills: int = 0, progress: bool = False) -> None:
        if buffer_tokens < 2 * batch_size:
            raise ValueError("buffer_tokens must hold at least two batches")
        if epoch_fills < 0:
            raise ValueError(f"epoch_fills={epoch_fills}: give 0 (never restart) or more")
        self.epoch_fills, self.progress = epoch_fills, progress
        self.model, self.make_iter, self.hook = model, make_token_iter, hook
        self.batch_size, self.scale, self.seed, self.drop_bos = batch_size, scale, seed, drop_bos
        self.per_fill = buffer_tokens // batch_size
        self.buffer_tokens = self.per_fill * batch_size
        self.device = next(model.parameters()).device
        self.tokens: Iterator[Tensor] | None = None
        self.read = 0  # fills read from `tokens` so far
        self.fill, self.buf, self.order = -1, None, None  # the fill held in `buf`, its order

    def _skip(self, bar: tqdm) -> None:
        """Consume one fill's token batches as `harvest` would, without the LM."""
        assert self.tokens is not None
        got = 0
        for tokens in self.tokens:
            n = tokens.shape[0] * (tokens.shape[1] - (1 if self.drop_bos else 0))
            bar.update(min(n, self.buffer_tokens - got))  # a fill's last batch: in part
            got += n
            if got >= self.buffer_tokens:
                self.read += 1
                return
        raise ValueError(f"the token source ran out in fill {self.read} of the activation "
                         "stream: give more text or train for fewer steps")

    def _load(self, fill: int) -> None:
        self.fill, self.buf, self.order = -1, None, None  # none until the new one is complete
        at = fill % self.epoch_fills if self.epoch_fills else fill  # where in the stream
        if self.tokens is None or at < self.read:
            self.tokens, self.read = self.make_iter(), 0
        try:
            with tqdm(total=(at - self.read) * self.buffer_tokens, unit="tok", leave=False,
                      desc="stream: skip text trained on (no LM)", mininterval=1.0,
                      disable=not self.progress or at == self.read) as bar:
                while self.read < at:
                    self._skip(bar)
            x = harvest(self.model, self.tokens, self.hook, self.buffer_tokens, self.drop_bos,
                        self.device, progress=False).mul_(self.scale)
        except BaseException:
            self.tokens = None  # read partway into a fill: the next request starts over
            raise
        self.read += 1
        gen = stream_generator(self.seed, f"activation stream fill {fill}")
        # Rows are gathered batch by batch in this order: no shuffled copy of the buffer
        # (6.4 GB at GPT-2's width) beside it.
        self.buf, self.order = x, torch.randperm(self.buffer_tokens, generator=gen).to(x.device)
        self.fill = fill

    def batch(self, step: int) -> Tensor:
        fill, i = divmod(step, self.per_fill)
        if fill != self.fill:
            self._load(fill)
        assert self.buf is not None and self.order is not None
        return self.buf[self.order[i * self.batch_size:(i + 1) * self.batch_size]]
