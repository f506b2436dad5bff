"""The hook-free harvest forward against TransformerLens' own, and when it must stand aside."""

import warnings

import pytest
import torch
from transformer_lens import HookedTransformer, HookedTransformerConfig

from paper_lib.data import fused
from paper_lib.data import harvest as hv
from tests.conftest import requires_cuda


def random_model(dtype=torch.float32, **overrides) -> HookedTransformer:
    kw = dict(n_layers=3, d_model=32, n_heads=4, d_head=8, d_mlp=64, n_ctx=16, d_vocab=50,
              act_fn="gelu_new", normalization_type="LN", seed=0, dtype=dtype,
              device="cpu")  # else TransformerLens sends tokens to cuda where there is one
    kw.update(overrides)
    model = HookedTransformer(HookedTransformerConfig(**kw), move_to_device=False).eval()
    with torch.no_grad():  # biases and LayerNorm weights away from their 0/1 init
        for name, p in model.named_parameters():
            if name.split(".")[-1] in ("b_Q", "b_K", "b_V", "b_O", "b_in", "b_out", "w", "b"):
                p.add_(0.3 * torch.randn_like(p))
    return model


def tokens(model, rows=4):
    return torch.randint(0, model.cfg.d_vocab, (rows, model.cfg.n_ctx),
                         generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("overrides", [
    {}, {"act_fn": "gelu"}, {"act_fn": "relu"}, {"normalization_type": "LNPre"},
    {"scale_attn_by_inverse_layer_idx": True}, {"use_attn_scale": False},
], ids=["gelu_new", "gelu", "relu", "LNPre", "inverse_layer_scale", "no_attn_scale"])
def test_fused_resid_equals_stop_at_layer(overrides):
    """Every supported variant gives TransformerLens' residual at every layer (fp32)."""
    model = random_model(**overrides)
    assert fused.unsupported_reason(model) is None
    t = tokens(model)
    with torch.inference_mode():
        for layer in range(model.cfg.n_layers + 1):
            want = model(t, stop_at_layer=layer)
            got = fused.fused_resid(model, t, layer)
            assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), layer


def test_fused_resid_on_the_trained_embedded_lm(tiny_lm):
    model, _ = tiny_lm
    t = torch.randint(0, model.cfg.d_vocab, (3, model.cfg.n_ctx))
    with torch.inference_mode():
        assert torch.allclose(fused.fused_resid(model, t, 2), model(t, stop_at_layer=2),
                              rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("overrides", [{}, {"act_fn": "gelu"}], ids=["gelu_new", "gelu"])
def test_fused_lm_loss_and_gradients_equal_transformer_lens(overrides):
    """The embedded LMs train through fused_lm_loss: its loss is TransformerLens' mean
    next-token CE and every parameter's gradient matches the one through the hook points."""
    model = random_model(**overrides).train()
    t = tokens(model)
    want = model(t, return_type="loss")
    want_grads = torch.autograd.grad(want, list(model.parameters()), allow_unused=True)
    got = fused.fused_lm_loss(model, t)
    got_grads = torch.autograd.grad(got, list(model.parameters()), allow_unused=True)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)
    for (name, _), g, w in zip(model.named_parameters(), got_grads, want_grads):
        if w is None:  # parameters TransformerLens' loss does not reach
            assert g is None or not g.any(), name
            continue
        assert torch.allclose(g, w, rtol=1e-4, atol=1e-6), name


def test_fused_resid_bf16_within_rounding():
    model = random_model(torch.bfloat16)
    with torch.inference_mode():
        assert fused.verify_fused(model, tokens(model), 3) is None


@pytest.mark.parametrize("overrides,reason", [
    ({"positional_embedding_type": "rotary", "rotary_dim": 8}, "positional_embedding_type"),
    ({"normalization_type": "RMS"}, "normalization_type='RMS'"),
    ({"act_fn": "solu_ln"}, "act_fn='solu_ln'"),
    ({"gated_mlp": True}, "gated_mlp"),
    ({"n_key_value_heads": 2}, "n_key_value_heads"),
    ({"attn_only": True}, "attn_only"),
])
def test_unsupported_models_are_named(overrides, reason):
    assert reason in fused.unsupported_reason(random_model(**overrides))


def test_harvest_takes_the_fused_path_unless_hooked(monkeypatch):
    """harvest uses the fused forward by default; a hook on a HookPoint or a plain forward
    hook on a block must run, so with either attached it uses TransformerLens' forward."""
    model = random_model()
    t = tokens(model)
    real = fused.fused_resid
    calls = []
    monkeypatch.setattr(fused, "fused_resid", lambda *a: calls.append(1) or real(*a))
    hook = "blocks.2.hook_resid_pre"
    n = t.numel() - t.shape[0]
    plain = hv.harvest(model, hv.row_batches(t, 2), hook, n, progress=False)
    assert len(calls) == 3  # the one-time comparison, then two batches of two rows
    seen = []
    model.add_hook("blocks.0.hook_mlp_out", lambda act, hook: seen.append(1))
    try:
        assert "blocks.0.hook_mlp_out" in fused.unsupported_reason(model)
        hooked = hv.harvest(model, hv.row_batches(t, 2), hook, n, progress=False)
    finally:
        model.reset_hooks()
    assert len(calls) == 3 and len(seen) == 2  # the hook ran; the fused path did not
    assert torch.allclose(plain, hooked, rtol=1e-5, atol=1e-5)
    handle = model.blocks[1].register_forward_pre_hook(lambda m, a: seen.append(2))
    try:
        hv.harvest(model, hv.row_batches(t, 2), hook, n, progress=False)
    finally:
        handle.remove()
    assert seen.count(2) == 2 and len(calls) == 3


def test_disagreeing_fused_forward_warns_and_falls_back(monkeypatch):
    """If the one-time comparison fails, harvest warns once and uses TransformerLens."""
    model = random_model()
    t = tokens(model)
    real = fused.fused_resid
    monkeypatch.setattr(fused, "fused_resid", lambda *a: real(*a) * 1.1)
    hook = "blocks.1.hook_resid_pre"
    n = t.numel() - t.shape[0]
    with pytest.warns(RuntimeWarning, match="disagrees with TransformerLens.*relative error"):
        got = hv.harvest(model, hv.row_batches(t, 2), hook, n, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # decided once per model: no second warning
        again = hv.harvest(model, hv.row_batches(t, 2), hook, n, progress=False)
    want = hv.harvest(model, hv.row_batches(t, 2), hook, n, progress=False, fused=False)
    assert torch.equal(got, want) and torch.equal(again, want)


@requires_cuda
def test_fused_resid_cuda_bf16_within_rounding():
    """On the GPU (flash attention under bf16) the fused residual matches TransformerLens'."""
    model = random_model(torch.bfloat16, n_ctx=128).to("cuda", print_details=False)
    with torch.inference_mode():
        assert fused.verify_fused(model, tokens(model).cuda(), 3) is None
