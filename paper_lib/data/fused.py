"""A hook-free forward to the residual stream entering block L, for fast harvesting.

TransformerLens computes every intermediate through a hook point, in several element-wise
passes (LayerNorm upcast to fp32 and back, separate Q/K/V products with their own bias
additions, a materialised [B, H, T, T] attention pattern, GELU written out term by term).
For harvesting none of those intermediates is needed, so `fused_resid` runs the same
arithmetic as whole-tensor kernels: `F.layer_norm`, one QKV product per block,
`F.scaled_dot_product_attention` (flash attention on a GPU), `F.linear` with fused biases,
and the activation as one kernel.

It covers the GPT-2 family of architectures (standard positional embeddings, LayerNorm
or the folded LNPre, a plain MLP, global causal attention): `unsupported_reason` names
what rules a model out, and `harvest` then keeps TransformerLens' own forward. Beyond
that check, the first use on each model compares both forwards on a few rows
(`verify_fused`) and falls back, with a warning, if they disagree.
"""

from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor

ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "gelu": F.gelu,
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),  # the same tanh formula as GPT-2
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
    "silu": F.silu,
}

# Settings that change the arithmetic beyond what `fused_resid` does, with the value
# that keeps it plain (attributes missing from an older TransformerLens count as plain).
_PLAIN = {
    "positional_embedding_type": "standard", "attention_dir": "causal",
    "parallel_attn_mlp": False, "attn_only": False, "gated_mlp": False, "num_experts": None,
    "n_key_value_heads": None, "use_local_attn": False, "post_embedding_ln": False,
    "use_normalization_before_and_after": False, "use_attention_sinks": False,
    "clip_qkv": None, "use_logn_attn": False, "load_in_4bit": False, "use_qk_norm": False,
}


def unsupported_reason(model: Any) -> str | None:
    """Why `fused_resid` cannot stand in for this model's forward; None when it can."""
    cfg = model.cfg
    for name, plain in _PLAIN.items():
        value = getattr(cfg, name, plain)
        if value != plain:
            return f"cfg.{name}={value!r}"
    if cfg.normalization_type not in ("LN", "LNPre"):
        return f"normalization_type={cfg.normalization_type!r}"
    if cfg.act_fn not in ACTIVATIONS:
        return f"act_fn={cfg.act_fn!r}"
    if (getattr(cfg, "attn_scores_soft_cap", -1.0) or -1.0) > 0:
        return "attention score soft-capping"
    if getattr(model, "tokenizer", None) is not None and \
            getattr(model.tokenizer, "padding_side", "right") == "left":
        return "a left-padding tokenizer (TransformerLens builds an attention mask)"
    if getattr(cfg, "n_devices", 1) != 1:
        return "a model split across devices"
    kinds = {(type(b.ln1).__name__, type(b.attn).__name__, type(b.mlp).__name__)
             for b in model.blocks}
    if not kinds <= {(ln, "Attention", "MLP") for ln in ("LayerNorm", "LayerNormPre")}:
        return f"block components {sorted(kinds)}"
    # A hook anywhere (a HookPoint's or a plain module's) must see TransformerLens' forward.
    hooked = [name for name, m in model.named_modules()
              if m._forward_hooks or m._forward_pre_hooks or getattr(m, "fwd_hooks", None)]
    if hooked:
        return f"hooks attached at {', '.join(hooked[:3])}"
    return None


def _ln(x: Tensor, ln: Any, eps: float) -> Tensor:
    w, b = getattr(ln, "w", None), getattr(ln, "b", None)  # LNPre has neither
    if x.requires_grad and x.device.type == "cpu" and w is not None:
        # Training on the CPU: F.layer_norm's backward sums the weight and bias gradients
        # per thread, so they change with the thread count; the affine part as plain
        # tensor ops reduces them in a fixed order.
        return F.layer_norm(x, x.shape[-1:], None, None, eps) * w + b
    return F.layer_norm(x, x.shape[-1:], w, b, eps)


def fused_resid(model: Any, tokens: Tensor, layer: int) -> Tensor:
    """[B, T, d_model]: the residual stream entering block `layer` (what
    `model(tokens, stop_at_layer=layer)` returns), for a model `unsupported_reason` accepts."""
    cfg = model.cfg
    n_pos = tokens.shape[1]
    x = model.embed.W_E[tokens] + model.pos_embed.W_pos[:n_pos]
    act = ACTIVATIONS[cfg.act_fn]
    for block in model.blocks[:layer]:
        attn, mlp = block.attn, block.mlp
        h = _ln(x, block.ln1, cfg.eps)
        # [3 H dh, d] from W_Q/W_K/W_V [H, d, dh]: one product gives q, k and v.
        w_qkv = torch.cat([w.permute(0, 2, 1).reshape(-1, w.shape[1])
                           for w in (attn.W_Q, attn.W_K, attn.W_V)])
        b_qkv = torch.cat([attn.b_Q.reshape(-1), attn.b_K.reshape(-1), attn.b_V.reshape(-1)])
        qkv = F.linear(h, w_qkv, b_qkv).view(*h.shape[:2], 3, cfg.n_heads, cfg.d_head)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each [B, H, T, dh]
        z = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           scale=1.0 / float(attn.attn_scale))
        z = z.transpose(1, 2).reshape(*h.shape[:2], cfg.n_heads * cfg.d_head)
        x = x + F.linear(z, attn.W_O.reshape(-1, attn.W_O.shape[-1]).T, attn.b_O)
        h = _ln(x, block.ln2, cfg.eps)
        x = x + F.linear(act(F.linear(h, mlp.W_in.T, mlp.b_in)), mlp.W_out.T, mlp.b_out)
    return x


def fused_lm_loss(model: Any, tokens: Tensor) -> Tensor:
    """Mean next-token CE of the whole model on `tokens` [B, T] by the fused forward (what
    `model(tokens, return_type="loss")` returns, differentiable): the embedded LMs train
    through it (a smoke-LM step on 2 CPU cores: 0.76x the time through the hook points)."""
    x = _ln(fused_resid(model, tokens, model.cfg.n_layers), model.ln_final, model.cfg.eps)
    logits = F.linear(x, model.unembed.W_U.T, model.unembed.b_U)
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), tokens[:, 1:].flatten())


def verify_fused(model: Any, tokens: Tensor, layer: int) -> str | None:
    """Compare `fused_resid` with TransformerLens' forward on the first rows of `tokens`;
    None when they agree (relative error within the dtype's rounding), else the error."""
    rows = tokens[:2]
    ours = fused_resid(model, rows, layer).float()
    theirs = model(rows, stop_at_layer=layer).float()
    err = float((ours - theirs).norm() / theirs.norm().clamp_min(1e-12))
    tol = 1e-5 if model.cfg.dtype in (torch.float32, torch.float64) else 3e-2
    return None if err <= tol else f"relative error {err:.2e} > {tol:g}"


def use_fused(model: Any, tokens: Tensor, layer: int) -> bool:
    """Whether `fused_resid` may stand in for this model's forward now: it passes
    `unsupported_reason` (checked every call: hooks come and go) and its one-time
    comparison with TransformerLens (remembered on the model; a failure warns once)."""
    if unsupported_reason(model) is not None:
        return False
    ok = model.__dict__.get("_fused_ok")
    if ok is None:
        problem = verify_fused(model, tokens, layer)
        ok = model.__dict__["_fused_ok"] = problem is None
        if problem:
            warnings.warn(f"the fused harvest forward disagrees with TransformerLens for this "
                          f"model ({problem}); harvesting through TransformerLens instead",
                          RuntimeWarning, stacklevel=3)
    return ok
