"""Save and load SAEs as `cfg.json` + `sae_weights.safetensors`, the layout SAELens reads.

The weights keep SAELens' names and shapes (W_enc [d_in, d_sae], b_enc [d_sae],
W_dec [d_sae, d_in], b_dec [d_in]; JumpReLU adds threshold [d_sae]). cfg.json carries
SAELens' fields (architecture, d_in, d_sae, k, apply_b_dec_to_input,
normalize_activations, metadata.hook_name, ...) and our full config under "paper_lib".
SAELens names: relu -> "standard", topk -> "topk", batchtopk / matryoshka -> "jumprelu"
(their inference form: one threshold), topafa / mlp have no SAELens equivalent.

If the SAE was trained on activations multiplied by `input_scale`, the scale is folded
into the saved weights so the file works on raw activations. Loading uses JSON and
safetensors only: no pickle on any path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from paper_lib.runtime import atomic_dir
from paper_lib.sae.base import SAE, SAEConfig
from paper_lib.sae.registry import make_sae

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
FORMAT_VERSION = 1
SAELENS_NAMES = {"relu": "standard", "topk": "topk", "batchtopk": "jumprelu",
                 "matryoshka": "jumprelu", "topafa": "paper_lib.topafa", "mlp": "paper_lib.mlp"}


def _state(sae: SAE, input_scale: float) -> dict[str, torch.Tensor]:
    sd = {k: v.detach().float().cpu().contiguous() for k, v in sae.state_dict().items()}
    if sae.cfg.architecture in ("batchtopk", "matryoshka"):
        theta = float(sd.pop("threshold").clamp_min(0))
        sd["threshold"] = torch.full((sae.cfg.d_sae,), theta)
    if input_scale != 1.0 and not sae.cfg.standardize_input:
        # (x s - b) W = (x - b/s)(s W); the codes are unchanged, x_hat_raw = x_hat / s.
        first = "W_1" if sae.cfg.architecture == "mlp" else "W_enc"
        sd[first] = sd[first] * input_scale
        sd["b_dec"] = sd["b_dec"] / input_scale
        sd["W_dec"] = sd["W_dec"] / input_scale
    return sd


def save_sae(sae: SAE, path: str | Path, input_scale: float = 1.0,
             extra: dict[str, Any] | None = None) -> Path:
    """Write `path/cfg.json` and `path/sae_weights.safetensors` atomically (a crash leaves
    any previous SAE at `path` intact)."""
    cfg = sae.cfg
    saelens: dict[str, Any] = {
        "architecture": SAELENS_NAMES[cfg.architecture],
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "layer_norm" if cfg.standardize_input else "none",
        "reshape_activations": "none",
        "metadata": {"model_name": cfg.model_name, "hook_name": cfg.hook_name,
                     "hook_head_index": None, "prepend_bos": True,
                     "sae_lens_version": "6.0.0"},
    }
    if cfg.architecture == "topk":
        saelens.update(k=cfg.k, rescale_acts_by_decoder_norm=False)
    saelens["paper_lib"] = {"format_version": FORMAT_VERSION, "config": cfg.to_dict(),
                            "input_scale": float(input_scale), **(extra or {})}
    with atomic_dir(path) as tmp:
        save_file(_state(sae, float(input_scale)), str(tmp / WEIGHTS_FILE))
        (tmp / CFG_FILE).write_text(json.dumps(saelens, indent=2) + "\n")
    return Path(path)


def read_cfg(path: str | Path) -> dict[str, Any]:
    """Parse and check cfg.json; raises ValueError naming what is wrong."""
    f = Path(path) / CFG_FILE
    if not f.is_file():
        raise FileNotFoundError(f"no {CFG_FILE} in {path}: not a saved SAE directory")
    try:
        raw = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{f} is not valid JSON ({e}); the file is corrupt") from None
    missing = [k for k in ("architecture", "d_in", "d_sae") if k not in raw]
    if missing:
        raise ValueError(f"{f} lacks required key(s) {missing}")
    ours = raw.get("paper_lib")
    if not isinstance(ours, dict) or "config" not in ours:
        raise ValueError(f"{f} has no 'paper_lib.config' section: not saved by paper_lib "
                         "(load SAELens files with sae_lens.SAE.load_from_disk)")
    return raw


def load_sae(path: str | Path, device: str | torch.device = "cpu",
             expected_d_in: int | None = None) -> SAE:
    """Load an SAE saved by `save_sae` (weights in the units they were saved in)."""
    raw = read_cfg(path)
    cfg = SAEConfig.from_dict(raw["paper_lib"]["config"])
    if (raw["d_in"], raw["d_sae"]) != (cfg.d_in, cfg.d_sae):
        raise ValueError(f"{path}: cfg.json d_in/d_sae disagree with its paper_lib config")
    if expected_d_in is not None and cfg.d_in != expected_d_in:
        raise ValueError(f"SAE at {path} has d_in={cfg.d_in} but the activations have "
                         f"d_in={expected_d_in}: wrong hook or model for this SAE")
    wfile = Path(path) / WEIGHTS_FILE
    if not wfile.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_FILE} in {path}")
    try:
        state = load_file(str(wfile))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{wfile} is not a readable safetensors file ({e}); "
                         "it is corrupt or truncated") from None
    sae = make_sae(cfg)
    expected = {k: tuple(v.shape) for k, v in sae.state_dict().items()}
    if "threshold" in state and "threshold" in expected:
        state["threshold"] = state["threshold"][0].clone()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(f"{wfile} lacks weight(s) {missing}")
    bad = {k: (tuple(state[k].shape), s) for k, s in expected.items() if tuple(state[k].shape) != s}
    if bad:
        raise ValueError(f"{wfile} has wrong shapes {bad} (found, expected)")
    sae.load_state_dict({k: state[k] for k in expected})
    return sae.to(device)
