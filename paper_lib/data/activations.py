"""One call from notebook parameters to normalised training and evaluation activations.

`load_activations` picks the LM (embedded or hub), the token source (embedded corpus or a
streamed HF dataset), harvests train and eval activations at the hook (disk-cached for
the embedded corpus), and scales them so that E||x||^2 = d_model (the SAE hyper-
parameters then transfer across models; `scale` is recorded and folded in on save).
"""

from __future__ import annotations

import math
import itertools
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import Tensor

from paper_lib.config import HUB_CONTEXT, check_source
from paper_lib.data.corpus import (BYTES, Vocab, byte_tokens, hf_token_batches,
                                   load_stdlib_corpus)
from paper_lib.data.harvest import (ActivationCache, StreamingActivations, default_hook, harvest,
                                    row_batches, stop_layer)
from paper_lib.data.lm import EMBEDDED_LMS, PROCESSING_DEFAULTS, load_lm
from paper_lib.metrics import SpliceEval
from paper_lib.runtime import PROJECT_ROOT
from paper_lib.train import BatchSource, ShuffledBatches, first_rows

CACHE_LIMIT_BYTES = 1.5e9  # larger harvests stay in memory (or stream)
STREAM_FILL_TOKENS = 1 << 21  # a streamed run's shuffling buffer, at most (6.4 GB at d=768)
# Token sources that are not a hub dataset: the embedded corpus, `datasets`' builders of
# local files (`--dataset text --data-files ...`).
LOCAL_SOURCES = ("stdlib", "text", "json", "csv", "parquet", "arrow")


@dataclass
class ActivationSet:
    """Activations for one (model, hook), in SAE units (raw * scale)."""

    model: Any
    model_info: dict[str, Any]
    hook: str
    train: Tensor | None
    """[n_tokens, d] training activations, or None when streamed."""
    eval: Tensor
    """[n_eval, d] held-out activations (validation split)."""
    scale: float
    train_tokens: Tensor | None
    """[rows, n_ctx] token rows behind `train` (row r, position 1 + i for drop_bos)."""
    eval_tokens: Tensor
    drop_bos: bool = True
    source: str = "stdlib"
    corpus_sha256: str | None = None
    cache_hit: bool = False
    stream: Callable[[int, int], StreamingActivations] | None = field(default=None, repr=False)
    """(batch_size, seed) -> a streaming BatchSource, when `train` is None."""
    stream_head: Callable[[int], Tensor] | None = field(default=None, repr=False)
    """n -> the training stream's first n activations in SAE units, when `train` is None."""
    stream_tokens: int = 0
    """The distinct training tokens of the stream (n_tokens), when `train` is None."""
    text_passes: tuple[float, float] = (1.0, 1.0)
    """How many times the embedded corpus's training and held-out files were read for the
    tokens asked for (above 1: its text repeats)."""
    _splice: dict[int, SpliceEval] = field(default_factory=dict, init=False, repr=False)

    def splice_eval(self, rows: int) -> SpliceEval:
        """Downstream-CE evaluator on the first `rows` held-out token rows, built once per
        row count so clean and zero-ablated CE (and the residual below the hook) are shared
        by every SAE evaluated on this set."""
        if rows not in self._splice:
            device = next(self.model.parameters()).device
            self._splice[rows] = SpliceEval(self.model, self.eval_tokens[:rows].to(device),
                                            self.hook)
        return self._splice[rows]

    @property
    def d(self) -> int:
        return self.eval.shape[1]

    def batches(self, batch_size: int, seed: int = 0) -> BatchSource:
        if self.train is None:
            assert self.stream is not None
            return self.stream(batch_size, seed)
        return ShuffledBatches(self.train, batch_size, seed)

    def train_sample(self, n: int, seed: int = 0) -> Tensor:
        """n training activations for choices made from data outside the optimiser: the
        decoder bias's initial value, a pruning order. Never held-out rows, which those
        choices would then be scored on. In memory: the first n rows of the training order
        of `batches(., seed)` (a uniform draw); streamed: the stream's first n rows,
        harvested directly (a training batch would first fill a buffer of up to 2 M)."""
        if self.train is None:
            assert self.stream_head is not None
            return self.stream_head(n)
        return first_rows(self.train, n, seed)

    def locate(self, index: int, split: str = "eval") -> tuple[int, int]:
        """(token row, position) of activation row `index`."""
        tokens = self.eval_tokens if split == "eval" else self.train_tokens
        per_row = tokens.shape[1] - (1 if self.drop_bos else 0)
        row, pos = divmod(index, per_row)
        return row, pos + (1 if self.drop_bos else 0)

    def token_str(self, token: int) -> str:
        """Readable text of one token id."""
        vocab = self.vocab
        return "<BOS>" if token == vocab.bos else vocab.text(token)

    @cached_property
    def vocab(self) -> Vocab:
        """How the interpretability measures and token_str read this set's tokens (built
        once: token_str asks for it per token shown)."""
        if self.source == "stdlib":
            return BYTES
        tok = self.model.tokenizer
        return Vocab(max(len(tok), self.model.cfg.d_vocab), tok.bos_token_id,
                     lambda t: tok.decode([t]))

    def encode_text(self, text: str) -> list[int]:
        """Token ids of `text` (no BOS)."""
        if self.source == "stdlib":
            return list(text.encode("utf-8"))
        return list(self.model.tokenizer(text)["input_ids"])

    def identity(self) -> dict[str, Any]:
        """What tells this set's data from another's, for keys of work done on it (a
        training checkpoint): the LM (name, weights), hook, source and corpus, the token
        rows' length, the number of training and held-out tokens, and the scale, a statistic
        of the draw itself (to 4 digits: a GPU harvest redone may differ in the last bits,
        and must still match)."""
        return {"model": self.model_info.get("config", {}).get("name"),
                "weights": self.model_info.get("weights_sha256"), "hook": self.hook,
                "source": self.source, "corpus": self.corpus_sha256,
                "context": int(self.eval_tokens.shape[1]),
                "train": self.stream_tokens if self.train is None else self.train.shape[0],
                "eval": self.eval.shape[0], "scale": f"{self.scale:.4g}"}

    def saelens_metadata(self) -> dict[str, Any]:
        """How an SAE trained here read its data, in SAELens' metadata fields, so SAELens'
        own tools (`ActivationsStore.from_sae`, its evals) read activations as we did: rows
        of `context_size` tokens that start with BOS, whose position is left out
        (`seqpos_slice`), from the hub dataset `dataset_path` (not for the embedded corpus
        or local files, which SAELens cannot load by name), of a hub LM loaded with
        `model_from_pretrained_kwargs` (transformer-lens' defaults, said outright: SAELens
        trains with center_writing_weights=False, another residual stream)."""
        meta: dict[str, Any] = {"context_size": int(self.eval_tokens.shape[1])}
        if self.model_info.get("pretrained"):
            meta["model_from_pretrained_kwargs"] = dict(PROCESSING_DEFAULTS)
        if self.drop_bos:
            meta["seqpos_slice"] = [1, None]
        if self.source not in LOCAL_SOURCES:
            meta["dataset_path"] = self.source
        return meta

    def describe(self) -> str:
        n = f"{self.stream_tokens:,} streamed" if self.train is None else f"{self.train.shape[0]:,}"
        info = self.model_info
        lm = ""  # an embedded LM's quality: how far it is from a byte-frequency model
        if "val_bits_per_byte" in info:
            lm = (f"; the LM: {info['val_bits_per_byte']:.2f} bits/byte on held-out files "
                  f"(byte unigram {info['unigram_bits_per_byte']:.2f}), trained in "
                  f"{info['train_seconds']:.0f} s on {info['device']}")
        repeats = [f"its {what} files read {times:.1f} times" for what, times in
                   zip(("training", "held-out"), self.text_passes) if times > 1]
        return (f"{info.get('config', {}).get('name', '?')} @ {self.hook}: "
                f"{n} train / {self.eval.shape[0]:,} eval tokens, d={self.d}, "
                f"scale={self.scale:.4g}" + (" (cache hit)" if self.cache_hit else "") + lm
                + (f"; the corpus is shorter than asked, so its text repeats: "
                   f"{' and '.join(repeats)}" if repeats else ""))


def unit_scale(x: Tensor, rows: int = 1 << 20) -> float:
    """The factor that makes E||x||^2 = d for activations x [N, d]. Squared norms are summed
    in float64 `rows` rows at a time: a float64 copy of a whole gpu-profile harvest
    (8 M x 512) would need twice its 16 GB again, on the GPU that holds it."""
    sq = torch.cat([c.double().pow(2).sum(-1) for c in x.split(rows)])
    return math.sqrt(x.shape[1] / float(sq.mean()))


def _embedded_rows(texts: list[str], n_ctx: int, rows: int, seed: int) -> tuple[Tensor, float]:
    """At least `rows` packed byte rows, cycling the corpus with fresh shuffles if needed,
    and how many times the texts were read for them (1 when they hold enough)."""
    parts, have, epoch = [], 0, 0
    while have < rows:
        part = byte_tokens(texts, n_ctx, max_rows=rows - have, seed=seed + epoch)
        parts.append(part)
        have += part.shape[0]
        epoch += 1
    return torch.cat(parts), have / parts[0].shape[0]


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):  # absent, unreadable, or "max"
        return None


def cgroup_free_memory(proc: Path = Path("/proc/self/cgroup"),
                       root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Bytes this process may still take under the memory limits of its control groups
    (a container's, a SLURM job's; v1 or v2), the tightest over its group and those above
    it: limit - usage + inactive file cache (reclaimable). None where no limit is set or
    none can be read. The machine's free RAM (psutil) does not see such limits."""
    try:
        lines = proc.read_text().splitlines()
    except OSError:
        return None
    free = []
    for line in lines:
        _, controllers, rel = line.split(":", 2)
        if controllers == "":  # v2: memory.max, memory.current
            base, files = root, ("memory.max", "memory.current", "inactive_file")
        elif "memory" in controllers.split(","):  # v1
            base = root / "memory"
            files = ("memory.limit_in_bytes", "memory.usage_in_bytes", "total_inactive_file")
        else:
            continue
        d = base / rel.lstrip("/")
        if not d.is_dir():  # a namespace shows the group's own files at the base
            d = base
        for g in [d, *d.parents]:
            limit, usage = _read_int(g / files[0]), _read_int(g / files[1])
            if limit is not None and usage is not None and limit < 2 ** 60:  # v1: no limit
                stat = dict(ln.split() for ln in _lines(g / "memory.stat"))
                free.append(limit - usage + int(stat.get(files[2], 0)))
            if g == base:
                break
    return max(0, min(free)) if free else None


def _lines(path: Path) -> list[str]:
    try:
        return [ln for ln in path.read_text().splitlines() if len(ln.split()) == 2]
    except OSError:
        return []


def available_memory(device: torch.device) -> list[tuple[str, int]]:
    """(what, free bytes) of the memories an in-memory harvest on `device` fills: the RAM,
    within this process's control-group limit if one is tighter, and a CUDA device's."""
    import psutil

    ram, limited = int(psutil.virtual_memory().available), cgroup_free_memory()
    out = [("RAM", ram) if limited is None or limited >= ram else
           ("RAM under this process's memory limit (cgroup)", limited)]
    if device.type == "cuda":
        out.append((f"memory of {device}", int(torch.cuda.mem_get_info(device)[0])))
    return out


def memory_shortfall(n_rows: int, d: int, device: torch.device) -> str:
    """'' if n_rows activations of width d (float32, harvested in RAM, then moved to
    `device`) fit the free memory now, else what they need against what is free."""
    def size(n: float) -> str:
        return f"{n / 1e9:.1f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"
    need = n_rows * d * 4
    short = [f"{size(free)} free {what}" for what, free in available_memory(device)
             if need > free]
    return f"take {size(need)} held in memory, more than the {' and '.join(short)}" \
        if short else ""


def check_fits(n_tokens: int, n_eval_tokens: int, d: int, device: torch.device,
               fix: str = "lower n_tokens") -> None:
    """Refuse, before any harvest, activations to be held in memory that exceed the free
    memory: a clear error now instead of an allocator failure, or the kernel killed, after
    minutes of harvesting."""
    short = memory_shortfall(n_tokens + n_eval_tokens, d, device)
    if short:
        what = f"n_tokens = {n_tokens:,} + " if n_tokens else ""  # none held when streamed
        raise ValueError(f"{what}n_eval_tokens = {n_eval_tokens:,} activations of width {d} "
                         f"{short}: {fix}")


def check_context_size(model_name: str, context_size: int | None) -> None:
    """A ValueError, before any work, if rows of `context_size` tokens (None: the default)
    cannot be read from `model_name`."""
    if context_size is None:
        return
    if context_size < 2:
        raise ValueError(f"context_size = {context_size}: a row needs BOS and a token")
    if model_name in EMBEDDED_LMS and context_size != EMBEDDED_LMS[model_name].n_ctx:
        raise ValueError(f"context_size = {context_size}: {model_name} reads rows of its whole "
                         f"context, {EMBEDDED_LMS[model_name].n_ctx} tokens; other lengths are "
                         "for hub LMs")


def _streamed_set(model: Any, info: dict[str, Any], hook: str, ev: Tensor, eval_tok: Tensor,
                  source: str, sha: str | None, token_iter: Callable[[], Iterator[Tensor]],
                  n_tokens: int, device: torch.device, progress: bool,
                  text_passes: tuple[float, float] = (1.0, 1.0)) -> ActivationSet:
    """An ActivationSet whose `n_tokens` training activations are harvested from the token
    batches of `token_iter()` as training reads them, never all held; the scale comes from
    the held-out activations `ev` (raw, scaled here in place)."""
    scale = unit_scale(ev)

    def make_stream(batch_size: int, seed: int) -> StreamingActivations:
        # n_tokens means what it does in memory: the distinct tokens trained on, seen again
        # in a new order once used up. They come in fills of at most STREAM_FILL_TOKENS
        # (n_tokens split evenly, so the last is not short; whole batches, so up to a batch
        # less per fill).
        fills = math.ceil(n_tokens / STREAM_FILL_TOKENS)
        return StreamingActivations(model, token_iter, hook, batch_size,
                                    buffer_tokens=max(2 * batch_size, n_tokens // fills),
                                    scale=scale, seed=seed, epoch_fills=fills,
                                    progress=progress)

    def head(n: int) -> Tensor:
        return harvest(model, token_iter(), hook, n, True, device, progress=False).mul_(scale)
    return ActivationSet(model, info, hook, None, ev.mul_(scale), scale, None, eval_tok, True,
                         source, sha, False, make_stream, head, n_tokens, text_passes)


def load_activations(model_name: str = "embedded-smoke", dataset: str = "stdlib",
                     hook: str = "", n_tokens: int = 200_000, n_eval_tokens: int = 16_384,
                     device: str | torch.device = "cpu", seed: int = 0, progress: bool = True,
                     data_dir: Path = PROJECT_ROOT / "data", stream: bool | None = None,
                     batch_rows: int = 64, data_files: Any = None,
                     context_size: int | None = None) -> ActivationSet:
    """Harvest (or load from cache) normalised activations for training and evaluation.
    Token rows start with BOS and hold an embedded LM's whole context, or on the hub path
    `context_size` tokens (default HUB_CONTEXT, or the LM's n_ctx if shorter; a longer
    `context_size` than n_ctx is refused). `stream`: True harvests the training activations
    as training reads them (`ActivationSet.batches`), never all held, and scales by the
    held-out set; None streams a hub dataset's when they are large or would not fit."""
    device = torch.device(device)
    check_source(model_name, dataset)
    check_context_size(model_name, context_size)
    # what the embedded path holds in memory: streamed, the held-out activations alone
    held, fix = (0, "lower n_eval_tokens") if stream else (n_tokens, "lower n_tokens")
    if dataset == "stdlib" and model_name in EMBEDDED_LMS:  # before the LM is even trained
        check_fits(held, n_eval_tokens, EMBEDDED_LMS[model_name].d_model, device, fix)
    model, info = load_lm(model_name, device, progress, data_dir)
    hook = hook or default_hook(model)
    stop_layer(model, hook)  # validate before any compute
    if context_size and context_size > model.cfg.n_ctx:
        raise ValueError(f"context_size = {context_size} exceeds {model_name}'s context of "
                         f"{model.cfg.n_ctx} tokens; use at most {model.cfg.n_ctx}")
    n_ctx = model.cfg.n_ctx if model_name.startswith("embedded-") else \
        min(model.cfg.n_ctx, context_size or HUB_CONTEXT)
    per_row = n_ctx - 1
    d = model.cfg.d_model
    if dataset == "stdlib":
        if model_name not in EMBEDDED_LMS:
            check_fits(held, n_eval_tokens, d, device, fix)
        corpus = load_stdlib_corpus(data_dir)
        train_tok, train_passes = _embedded_rows(corpus.train["text"], n_ctx,
                                                 math.ceil(n_tokens / per_row), seed)
        eval_tok, eval_passes = _embedded_rows(corpus.validation["text"], n_ctx,
                                               math.ceil(n_eval_tokens / per_row), seed)
        sha = corpus.sha256
        spec_base = {"model": model_name, "weights": info.get("weights_sha256"), "hook": hook,
                     "corpus": sha, "drop_bos": True, "seed": seed, "dtype": "float32"}

        def get(split: str, tokens: Tensor, n: int) -> tuple[Tensor, bool]:
            def build() -> Tensor:
                return harvest(model, row_batches(tokens, batch_rows), hook, n,
                               progress=progress)
            if n * d * 4 > CACHE_LIMIT_BYTES:
                return build().to(device), False
            cache = ActivationCache(data_dir / "acts", {**spec_base, "split": split, "n": n})
            x, hit = cache.get_or_build(build)
            return x.to(device), hit

        ev, hit_e = get("eval", eval_tok, n_eval_tokens)
        if stream:  # asked for: training activations harvested as read, never held
            return _streamed_set(model, info, hook, ev, eval_tok, "stdlib", sha,
                                 lambda: row_batches(train_tok, batch_rows), n_tokens,
                                 device, progress, (train_passes, eval_passes))
        train, hit_t = get("train", train_tok, n_tokens)
        scale = unit_scale(train)
        # In place: every harvest here is this call's own copy (a cache hit is copied out of
        # its memory map), and a gpu-profile one is 16 GB that a scaled copy would double.
        return ActivationSet(model, info, hook, train.mul_(scale), ev.mul_(scale), scale,
                             train_tok, eval_tok, True, "stdlib", sha, hit_t and hit_e,
                             text_passes=(train_passes, eval_passes))
    # Hub dataset (paper profile): stream tokens; hold activations only if they fit.
    tok = model.tokenizer
    eval_rows: list[Tensor] = []
    # The seed draws the documents' order, as it draws the embedded corpus's rows: another
    # seed reads (and holds out) another sample.
    for b in hf_token_batches(dataset, tok, n_ctx, batch_rows, data_files=data_files, seed=seed):
        eval_rows.append(b)
        if sum(r.shape[0] for r in eval_rows) * per_row >= n_eval_tokens:
            break
    eval_tok = torch.cat(eval_rows)

    def token_iter():
        # The first batches are the held-out set: training starts after them.
        return itertools.islice(hf_token_batches(dataset, tok, n_ctx, batch_rows,
                                                 data_files=data_files, seed=seed),
                                len(eval_rows), None)
    ev = harvest(model, row_batches(eval_tok, batch_rows), hook, n_eval_tokens, True, device,
                 progress=progress)
    if stream is None:  # stream what is large, or more than the memory free now
        stream = n_tokens * d * 4 > CACHE_LIMIT_BYTES * 4 or \
            bool(memory_shortfall(n_tokens + n_eval_tokens, d, device))
    if not stream:
        check_fits(n_tokens, n_eval_tokens, d, device, "lower n_tokens, or stream them")
    if stream:
        return _streamed_set(model, info, hook, ev, eval_tok, dataset, None, token_iter,
                             n_tokens, device, progress)
    train = harvest(model, token_iter(), hook, n_tokens, True, device, progress=progress)
    scale = unit_scale(train)
    return ActivationSet(model, info, hook, train.mul_(scale), ev.mul_(scale), scale, None,
                         eval_tok, True, dataset)
