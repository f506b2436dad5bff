"""Language models: the embedded byte-level HookedTransformer and the hub path.

The embedded LM is a small `transformer_lens.HookedTransformer` built from a
`HookedTransformerConfig` (no tokenizer or weights download), trained here on the
stdlib corpus and cached under data/lm/<name>-<hash>-<device>-<numerics>/ as
model.safetensors + config.json + manifest.json (corpus hash, weight checksum, validation
bits/byte, the unigram baseline). A cache is reused only when config, corpus hash, training
numerics (device type, pinned CPU code paths) and weight checksum all match; otherwise the
model is retrained. Training writes a checkpoint every minute under data/ckpt/, so an
interrupted run resumes where it stopped, to the same weights. `load_lm` gives either it
or, for the paper profile, `HookedTransformer.from_pretrained(name)`.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from paper_lib.config import EMBEDDED_CONTEXT
from paper_lib.data.corpus import VOCAB, Corpus, byte_tokens, load_stdlib_corpus, \
    unigram_bits_per_byte
from paper_lib.data.fused import fused_lm_loss, unsupported_reason
from paper_lib.runtime import (PROJECT_ROOT, atomic_dir, cpu_numerics, deterministic_on_cpu,
                               has_checkpoint, interrupt_between_steps, load_or_build,
                               read_checkpoint, write_checkpoint)

warnings.filterwarnings("ignore", message="HookedTransformer is deprecated")


@dataclass(frozen=True)
class LMConfig:
    """Architecture and training budget of an embedded byte-level LM."""

    name: str
    n_layers: int
    d_model: int
    n_heads: int
    n_ctx: int
    steps: int
    """AdamW steps."""
    batch_rows: int
    """Sequences per step (tokens per step = batch_rows * n_ctx)."""
    lr: float = 3e-3
    warmup: int = 50
    seed: int = 0
    trainer: str = "fused"
    """"fused": train through `fused.fused_lm_loss`; "transformer_lens": its own forward
    (part of the cache key: the two round differently, so they train different models)."""

    def __post_init__(self) -> None:
        if self.trainer not in ("fused", "transformer_lens"):
            raise ValueError(f"LMConfig.trainer={self.trainer!r}: use 'fused' or "
                             "'transformer_lens'")

    @property
    def d_mlp(self) -> int:
        return 4 * self.d_model

    def key(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:12]

    def tl_config(self) -> Any:
        from transformer_lens import HookedTransformerConfig

        return HookedTransformerConfig(
            n_layers=self.n_layers, d_model=self.d_model, n_heads=self.n_heads,
            d_head=self.d_model // self.n_heads, d_mlp=self.d_mlp, n_ctx=self.n_ctx,
            d_vocab=VOCAB, act_fn="gelu", normalization_type="LN", seed=self.seed,
            default_prepend_bos=False, device="cpu")  # built on the CPU; .to() moves it


EMBEDDED_LMS = {
    # ~1.6M training tokens: about 80 s on 2 CPU cores.
    "embedded-smoke": LMConfig("embedded-smoke", n_layers=2, d_model=128, n_heads=4,
                               n_ctx=EMBEDDED_CONTEXT["embedded-smoke"], steps=400,
                               batch_rows=32),
    # ~82M tokens: about two minutes on one H100 in bf16.
    "embedded-gpu": LMConfig("embedded-gpu", n_layers=6, d_model=512, n_heads=8,
                             n_ctx=EMBEDDED_CONTEXT["embedded-gpu"], steps=2500,
                             batch_rows=128, lr=1.5e-3, warmup=200),
}


def training_numerics(device: str | torch.device) -> dict[str, str]:
    """What besides the config decides a trained LM's bits: the device type and, on the CPU,
    the code paths the kernelspec pins ({} outside the pinned env)."""
    dev = torch.device(device)
    return {"device": dev.type, **(cpu_numerics() if dev.type == "cpu" else {})}


def lm_dir(cfg: LMConfig, data_dir: Path, device: str | torch.device = "cpu") -> Path:
    """The cache of `cfg` trained on `device` in this process's numerics: one per numerics, so
    a process with other pins (a plain shell, a GPU) trains its own copy instead of silently
    reusing, or replacing, the one the pinned notebooks read."""
    numerics = training_numerics(device)
    tag = hashlib.sha256(json.dumps(numerics, sort_keys=True).encode()).hexdigest()[:8]
    return data_dir / "lm" / f"{cfg.name}-{cfg.key()}-{numerics['device']}-{tag}"


def _checksum(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _cached(cfg: LMConfig, corpus_sha: str, data_dir: Path,
            device: str | torch.device) -> dict[str, Any] | None:
    """The manifest of a valid cached model, or None (missing, stale or corrupt)."""
    d = lm_dir(cfg, data_dir, device)
    try:
        manifest = json.loads((d / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    ok = (manifest.get("config") == asdict(cfg) and manifest.get("corpus_sha256") == corpus_sha
          and manifest.get("numerics") == training_numerics(device)
          and (d / "model.safetensors").is_file()
          and manifest.get("weights_sha256") == _checksum(d / "model.safetensors"))
    return manifest if ok else None


def load_embedded_lm(name: str = "embedded-smoke", device: str | torch.device = "cpu",
                     data_dir: Path = PROJECT_ROOT / "data", progress: bool = True,
                     corpus: Corpus | None = None) -> tuple[Any, dict[str, Any]]:
    """The cached embedded LM (trained first if absent or stale) and its manifest."""
    from transformer_lens import HookedTransformer

    if name not in EMBEDDED_LMS:
        raise ValueError(f"unknown embedded LM {name!r}; choose one of {', '.join(EMBEDDED_LMS)}")
    cfg = EMBEDDED_LMS[name]
    corpus = corpus or load_stdlib_corpus(data_dir)
    path = lm_dir(cfg, data_dir, device)
    manifest, _ = load_or_build(path, lambda: _cached(cfg, corpus.sha256, data_dir, device),
                                lambda: _train_and_save(cfg, corpus, device, progress, data_dir))
    model = HookedTransformer(cfg.tl_config(), move_to_device=False)
    state = load_file(str(path / "model.safetensors"))
    model.load_state_dict(state)
    model.to(device, print_details=False).eval()
    return model, manifest


def _train_and_save(cfg: LMConfig, corpus: Corpus, device: str | torch.device, progress: bool,
                    data_dir: Path) -> dict[str, Any]:
    out = lm_dir(cfg, data_dir, device)
    # named by everything that decides the weights: another corpus gets another file
    ckpt = data_dir / "ckpt" / f"{out.name}-{corpus.sha256[:12]}.pt"
    model, manifest = train_lm(cfg, corpus, device, progress, checkpoint=ckpt)
    with atomic_dir(out) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()},
                  str(tmp / "model.safetensors"))
        manifest["weights_sha256"] = _checksum(tmp / "model.safetensors")
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(asdict(cfg), indent=2) + "\n")
    return manifest


@torch.no_grad()
def bits_per_byte(model: Any, tokens: torch.Tensor, batch_rows: int = 64) -> float:
    """Mean next-byte cross-entropy in bits over `tokens` [rows, n_ctx]."""
    dev = next(model.parameters()).device
    tot, n = 0.0, 0
    for i in range(0, tokens.shape[0], batch_rows):
        t = tokens[i:i + batch_rows].to(dev)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dev.type == "cuda"):
            loss = model(t, return_type="loss", loss_per_token=True)
        tot += float(loss.float().sum())
        n += loss.numel()
    return tot / n / math.log(2)


def _checkpoint_key(cfg: LMConfig, corpus: Corpus, device: torch.device) -> str:
    return json.dumps({"config": asdict(cfg), "corpus_sha256": corpus.sha256,
                       "numerics": training_numerics(device)}, sort_keys=True)


def _save_checkpoint(path: Path, key: str, step: int, seconds: float, model: Any,
                     opt: torch.optim.Optimizer, sched: Any, gen: torch.Generator) -> None:
    state = {"key": key, "step": step, "seconds": seconds, "model": model.state_dict(),
             "opt": opt.state_dict(), "sched": sched.state_dict(), "gen": gen.get_state(),
             "rng": torch.get_rng_state()}
    write_checkpoint(path, state)


def _load_checkpoint(path: Path, key: str, model: Any, opt: torch.optim.Optimizer, sched: Any,
                     gen: torch.Generator) -> tuple[int, float]:
    """Restore a run from its checkpoint: (steps done, training seconds so far)."""
    state = read_checkpoint(path, key, "LM checkpoint",
                            "another configuration, corpus or CPU numerics")
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    gen.set_state(state["gen"])
    torch.set_rng_state(state["rng"])
    return int(state["step"]), float(state["seconds"])


def train_lm(cfg: LMConfig, corpus: Corpus, device: str | torch.device = "cpu",
             progress: bool = True, checkpoint: Path | None = None,
             checkpoint_seconds: float = 60.0) -> tuple[Any, dict[str, Any]]:
    """Train an embedded LM from scratch; returns (model, manifest without checksum).
    With `checkpoint`, the run's state (weights, AdamW, schedule, batch sampler) is written
    there atomically every `checkpoint_seconds` of training, an existing one is resumed
    (giving the weights an uninterrupted run gives), and it is removed when training ends."""
    from transformer_lens import HookedTransformer

    device = torch.device(device)
    checkpoint = Path(checkpoint) if checkpoint is not None else None
    deterministic_on_cpu(device)
    torch.manual_seed(cfg.seed)
    train_rows = cfg.steps * cfg.batch_rows
    train = byte_tokens(corpus.train["text"], cfg.n_ctx, max_rows=train_rows, seed=cfg.seed)
    val = byte_tokens(corpus.validation["text"], cfg.n_ctx, max_rows=256, seed=cfg.seed)
    model = HookedTransformer(cfg.tl_config(), move_to_device=False).to(device, print_details=False)
    # The fused forward (same arithmetic, whole-tensor kernels) where it applies.
    fused = cfg.trainer == "fused" and unsupported_reason(model) is None
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=device.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1, (s + 1) / cfg.warmup)
                                              * 0.5 * (1 + math.cos(math.pi * s / cfg.steps)))
    gen = torch.Generator().manual_seed(cfg.seed)
    key = _checkpoint_key(cfg, corpus, device)
    start, before = 0, 0.0  # steps and training seconds of an interrupted run
    if checkpoint is not None and has_checkpoint(checkpoint):
        start, before = _load_checkpoint(checkpoint, key, model, opt, sched, gen)
    t0 = last = time.perf_counter()
    model.train()
    with interrupt_between_steps() as interrupted:
        for step in tqdm(range(start, cfg.steps), desc=f"train {cfg.name}",
                         disable=not progress, mininterval=2.0, initial=start, total=cfg.steps):
            idx = torch.randint(0, train.shape[0], (cfg.batch_rows,), generator=gen)
            batch = train[idx].to(device, non_blocking=True)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = fused_lm_loss(model, batch) if fused else model(batch, return_type="loss")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sched.step()
            # Ctrl-C: stop after this step, checkpointed (at the last one too: the rerun then
            # only evaluates; without a checkpoint to resume, the last step just ends)
            stop = interrupted() and (step + 1 < cfg.steps or checkpoint is not None)
            if checkpoint is not None and (stop or (
                    step + 1 < cfg.steps and time.perf_counter() - last >= checkpoint_seconds)):
                _save_checkpoint(checkpoint, key, step + 1,
                                 before + time.perf_counter() - t0, model, opt, sched, gen)
                last = time.perf_counter()
            if stop:
                raise KeyboardInterrupt
        seconds = before + time.perf_counter() - t0
        model.eval()
        manifest = {
            "config": asdict(cfg),
            "corpus_sha256": corpus.sha256,
            "train_tokens": cfg.steps * cfg.batch_rows * cfg.n_ctx,
            "train_seconds": round(seconds, 1),
            "device": str(device),
            "numerics": training_numerics(device),  # CPU: {"device": "cpu"} outside pinned env
            "val_bits_per_byte": round(bits_per_byte(model, val), 4),
            "unigram_bits_per_byte": round(unigram_bits_per_byte(train, val), 4),
        }
        # Ctrl-C in this final evaluation: the trained weights are checkpointed, then it
        # stops (the rerun trains no step and only evaluates)
        if interrupted() and checkpoint is not None:
            _save_checkpoint(checkpoint, key, cfg.steps, seconds, model, opt, sched, gen)
            raise KeyboardInterrupt
    if checkpoint is not None:
        checkpoint.unlink(missing_ok=True)  # finished: the cache entry replaces it
    return model, manifest


def official_name(name: str) -> str:
    """transformer-lens' official name of a hub model ("gpt2-small" -> "gpt2"), so SAEs that
    record an alias match the LM; embedded and unknown names stay as they are."""
    if name.startswith("embedded-"):
        return name
    from transformer_lens.loading_from_pretrained import get_official_model_name

    try:
        return get_official_model_name(name)
    except ValueError:  # not a transformer-lens name: compared as written
        return name


# HookedTransformer.from_pretrained's weight processing, which load_lm leaves at its
# defaults; each changes the activations at some hook (centring the writing weights, the
# residual stream's).
PROCESSING_DEFAULTS = {"fold_ln": True, "center_writing_weights": True,
                       "fold_value_biases": True, "refactor_factored_attn_matrices": False}


def loading_misfits(kwargs: dict[str, Any] | None) -> list[str]:
    """The weight processing an SAE's recorded `model_from_pretrained_kwargs` (SAELens'
    metadata) asks for that `load_lm` does not do, e.g. center_writing_weights=False."""
    return [f"{k}={v!r} (here {PROCESSING_DEFAULTS[k]!r})" for k, v in (kwargs or {}).items()
            if k in PROCESSING_DEFAULTS and v != PROCESSING_DEFAULTS[k]]


def load_lm(name: str, device: str | torch.device = "cpu", progress: bool = True,
            data_dir: Path = PROJECT_ROOT / "data") -> tuple[Any, dict[str, Any]]:
    """An embedded LM by name, or any transformer-lens model via from_pretrained (needs
    the internet the first time)."""
    if name.startswith("embedded-"):
        return load_embedded_lm(name, device, data_dir, progress)
    from transformer_lens import HookedTransformer

    try:
        model = HookedTransformer.from_pretrained(name, device=str(device))
    except OSError as e:  # no network and no local copy: say what to do instead
        raise OSError(f"could not load model {name!r} from the Hugging Face hub or its local "
                      f"cache ({e}). The paper profile needs the internet the first time; "
                      "offline, use profile='smoke' or 'gpu' (the embedded LM).") from e
    model.eval()
    return model, {"config": {"name": name, "n_ctx": model.cfg.n_ctx}, "pretrained": True}
