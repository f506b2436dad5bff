"""SAE architectures: shapes, the defining equations on hand cases, training hooks, and
save/load in the SAELens layout (including bad files)."""

import json
from pathlib import Path

import pytest
import torch

from paper_lib.sae import ARCHITECTURES, SAEConfig, kernels, load_sae, make_sae, save_sae
from paper_lib.sae.io import CFG_FILE, WEIGHTS_FILE
from paper_lib.sae.matryoshka import group_ends
from paper_lib.sae.topk import topk_codes


def cfg_for(arch: str, d_in: int = 8, d_sae: int = 32, **kw) -> SAEConfig:
    extra = {"k": 4} if arch in ("topk", "batchtopk", "matryoshka") else {}
    if arch == "mlp":
        extra["mlp_hidden"] = 16
    if arch in ("relu", "mlp"):
        extra["l1_coeff"] = 1e-3
    if arch == "topafa":
        extra["standardize_input"] = True
    return SAEConfig(arch, d_in, d_sae, **{**extra, **kw})


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_forward_shapes_and_finite_loss(arch):
    """Every architecture: codes [B, n] >= 0, recon [B, d], finite loss, gradients flow."""
    sae = make_sae(cfg_for(arch, dead_tokens=1))
    x = torch.randn(16, 8)
    out = sae(x)
    assert out.codes.shape == (16, 32) and out.recon.shape == (16, 8)
    assert (out.codes >= 0).all()
    dead = torch.ones(32, dtype=torch.bool)
    terms = sae.loss(out, dead)
    loss = sum(terms.values())
    assert torch.isfinite(loss)
    loss.backward()
    assert sae.W_enc.grad is not None and torch.isfinite(sae.W_enc.grad).all()
    if arch in ("topk", "batchtopk", "matryoshka", "topafa"):
        assert "auxk" in terms


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_auxk_hand_case(sparse):
    """x = [1, 0], pre = [1, 2, -1] (W_enc's first row), k = 1 keeps latent 1: x_hat = 2 *
    W_dec[1] = [0, 2], residual e = [1, -2]. Dead latents {0, 2}, k_aux = 1: latent 0 (pre
    1) reconstructs e_hat = W_dec[0] = [1, 0]; L_aux = (1/32) * ||e - e_hat||^2 = 4 / 32."""
    sae = make_sae(SAEConfig("topk", 2, 3, k=1, aux_k=1)).train()
    with torch.no_grad():
        sae.W_enc.copy_(torch.tensor([[1.0, 2.0, -1.0], [0.0, 0.0, 0.0]]))
        sae.W_dec.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    with kernels.use_sparse(sparse):
        out = sae(torch.tensor([[1.0, 0.0]]))
        terms = sae.loss(out, torch.tensor([True, False, True]))
    assert out.recon.tolist() == [[0.0, 2.0]]
    assert float(terms["auxk"].detach()) == pytest.approx(4 / 32)


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "matryoshka", "topafa"])
def test_unit_norm_decoder_maintained(arch):
    """After a step the decoder rows are unit norm, and the parallel gradient was removed."""
    sae = make_sae(cfg_for(arch))
    out = sae(torch.randn(16, 8))
    sum(sae.loss(out, None).values()).backward()
    sae.before_step_()
    w = sae.W_dec / sae.W_dec.norm(dim=1, keepdim=True)
    assert torch.allclose((sae.W_dec.grad * w).sum(1), torch.zeros(32), atol=1e-6)
    with torch.no_grad():
        sae.W_dec.mul_(1.7)
    sae.after_step_()
    assert torch.allclose(sae.W_dec.norm(dim=1), torch.ones(32), atol=1e-6)


def test_topk_hand_case():
    """pre = [3, -1, 2, 0.5], k = 2 -> [3, 0, 2, 0]; negative winners are ReLU'd to 0."""
    pre = torch.tensor([[3.0, -1.0, 2.0, 0.5], [-3.0, -1.0, -2.0, -0.5]])
    assert topk_codes(pre, 2).tolist() == [[3.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0]]


def test_topk_tied_init_and_bad_k():
    sae = make_sae(cfg_for("topk"))
    assert torch.equal(sae.W_enc, sae.W_dec.T)
    with pytest.raises(ValueError, match="k=40 exceeds d_sae=32"):
        SAEConfig("topk", 8, 32, k=40)
    with pytest.raises(ValueError, match="k=0 must be >= 1"):
        SAEConfig("topk", 8, 32, k=0)
    with pytest.raises(ValueError, match="unknown architecture 'gated'"):
        SAEConfig("gated", 8, 32)


def test_initial_decoder_is_the_init_and_shared_by_a_seeds_smaller_saes():
    """An SAE starts from initial_decoder(cfg) (unit rows); a seed's n = 32 draw is the
    first 32 rows of its n = 64 draw (what the explorer's 'at init' column relies on),
    and another seed draws other directions."""
    from paper_lib.sae.base import initial_decoder

    small, large = SAEConfig("topk", 8, 32, k=2, seed=3), SAEConfig("relu", 8, 64, seed=3)
    w = initial_decoder(small)
    assert torch.equal(make_sae(small).W_dec.detach(), w)
    assert torch.allclose(w.norm(dim=1), torch.ones(32))
    assert torch.equal(initial_decoder(large)[:32], w)
    other = initial_decoder(SAEConfig("topk", 8, 32, k=2, seed=4))
    assert (other * w).sum(1).abs().max() < 0.99


def test_batchtopk_keeps_k_times_batch_and_calibrates_threshold():
    """Training: exactly k*B nonzeros over the batch; eval: one threshold, plain ReLU until
    `calibrate_threshold_` sets it (the trainer does before each held-out evaluation)."""
    sae = make_sae(cfg_for("batchtopk"))
    sae.train()
    x = torch.randn(10, 8)
    codes = sae(x).codes
    assert int((codes > 0).sum()) == 4 * 10
    sae.eval()
    pre = sae.pre_acts(x)
    assert float(sae.threshold) == -1 and torch.equal(sae(x).codes, pre.relu())
    sae.calibrate_threshold_(x)
    assert torch.equal(sae(x).codes, pre.relu() * (pre > sae.threshold))


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka"])
@pytest.mark.parametrize("chunk", [4096, 1])
def test_batchtopk_threshold_by_hand(arch, chunk):
    """Identity encoder, zero biases: pre-activations are the rows themselves. k = 1 over
    two rows keeps the 2 largest positives, 3 and 2, so theta = 2 (with rows encoded one at
    a time too: both are row 0's, had each row kept only its own k); k = 3 would keep 6 but
    only 4 are positive, so theta is the smallest of them, 0.5; no positive entry leaves
    theta alone."""
    x = torch.tensor([[3.0, 2.0, -1.0, 0.0], [1.0, 0.5, 0.0, 0.0]])
    for k, want in ((1, 2.0), (3, 0.5)):
        sae = make_sae(SAEConfig(arch, 4, 4, k=k, group_fractions=(0.5, 0.5)))
        with torch.no_grad():
            sae.W_enc.copy_(torch.eye(4))
        sae.calibrate_threshold_(x, chunk=chunk)
        assert float(sae.threshold) == want
    sae.eval()
    assert sae(x).codes.tolist() == [[3.0, 2, 0, 0], [1, 0, 0, 0]]  # pre > 0.5: 0.5 drops
    sae.calibrate_threshold_(-x.abs(), chunk=chunk)
    assert float(sae.threshold) == 0.5


def test_matryoshka_groups_and_prefix_sum():
    """Group ends follow the fractions; the last prefix reconstruction is the full one."""
    assert group_ends(32, (1 / 16, 1 / 16, 1 / 8, 1 / 4, 1 / 2)) == [2, 4, 8, 16, 32]
    assert group_ends(5, (0.1, 0.1, 0.8)) == [1, 2, 5]
    sae = make_sae(cfg_for("matryoshka"))
    out = sae(torch.randn(6, 8))
    prefixes = sae.prefix_recons(out.codes)
    assert torch.allclose(prefixes[-1], out.recon_in, atol=1e-6)
    assert len(prefixes) == 5
    with pytest.raises(ValueError, match="sum to 1"):
        SAEConfig("matryoshka", 8, 32, k=4, group_fractions=(0.5, 0.4))


def test_topafa_picks_k_by_norm_hand_case():
    """Orthonormal decoder, b_dec = 0, no standardisation: acts (3, 2, 1, 0.1) for an input
    of norm sqrt(13): cumulative norms 3, 3.61, 3.74 -> keep 2 latents (closest to 3.61)."""
    cfg = SAEConfig("topafa", 4, 4, standardize_input=False)
    sae = make_sae(cfg)
    with torch.no_grad():
        sae.W_enc.copy_(torch.eye(4))
        sae.W_dec.copy_(torch.eye(4))
    x = torch.tensor([[3.0, 2.0, 0.0, 0.0]])
    pre = torch.tensor([[3.0, 2.0, 1.0, 0.1]])
    codes = sae.activation(pre, x)
    assert codes.tolist() == [[3.0, 2.0, 0.0, 0.0]]
    assert not sae.b_enc.requires_grad


def test_topafa_rows_with_few_positives_hand_case():
    """n = 6 unit decoder rows, b_dec = 0. Row 1: one positive act 0.5 under a target of 10
    keeps it alone (the cumulative norm stays 0.5). Row 2: no positive act keeps no code.
    Row 3: acts (1.01, 1, 0.99, 0.98) sum cumulatively to norms 1.01, 1.42, 1.73, 1.99;
    the target 1.8 keeps the first three. Row 4: the first case's acts (3, 2, 1, 0.1), here on
    latents 0, 2, 4, 3, keep latents 0 and 2. An empty batch gives an empty mask."""
    sae = make_sae(SAEConfig("topafa", 4, 6, standardize_input=False))
    with torch.no_grad():
        sae.W_dec.copy_(torch.cat([torch.eye(4), torch.eye(4)[:2]]))
    pre = torch.tensor([[-1.0, 0.5, -2.0, 0.0, -1.0, -1.0],
                        [-1.0, -1.0, -1.0, -1.0, 0.0, -3.0],
                        [1.0, 1.01, 0.99, 0.98, -1.0, -1.0],
                        [3.0, -1.0, 2.0, 0.1, 1.0, 0.0]])
    x = torch.tensor([[10.0, 0, 0, 0], [1.0, 0, 0, 0], [1.8, 0, 0, 0], [13 ** 0.5, 0, 0, 0]])
    expected = torch.tensor([[0.0, 0.5, 0.0, 0.0, 0.0, 0.0],
                             [0.0] * 6,
                             [1.0, 1.01, 0.99, 0.0, 0.0, 0.0],
                             [3.0, 0.0, 2.0, 0.0, 0.0, 0.0]])
    assert torch.equal(sae.activation(pre, x), expected)
    assert sae.keep_mask(pre[:0], x[:0]).shape == (0, 6)


def test_topafa_norm_loss_hand_case():
    """The authors' norm term, weighted against a per-element MSE: lambda * d * (||f|| - ||x||)^2
    with x the (standardised) input, not x - b_dec. d = 4, W_enc = 0.75 I, W_dec = I,
    b_dec = (1, 0, 0, 0), x = (4, 0, 0, 0): x_c = (3, 0, 0, 0), one active code 2.25, so the
    term is (1/32) * 4 * (4 - 2.25)^2 = 0.3828125 (it would be 0.0703125 against ||x_c||)."""
    sae = make_sae(SAEConfig("topafa", 4, 4, standardize_input=False, afa_lambda=1 / 32,
                             auxk=False))
    with torch.no_grad():
        sae.W_enc.copy_(0.75 * torch.eye(4))
        sae.W_dec.copy_(torch.eye(4))
        sae.b_dec.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0]))
    sae.eval()
    out = sae(torch.tensor([[4.0, 0.0, 0.0, 0.0]]))
    assert out.codes.tolist() == [[2.25, 0.0, 0.0, 0.0]]
    assert sae.extra_loss(out, None)["afa"].item() == pytest.approx(0.3828125)


def test_mlp_encoder_has_hidden_layer():
    sae = make_sae(cfg_for("mlp"))
    assert sae.W_1.shape == (8, 16) and sae.W_enc.shape == (16, 32)


def test_mlp_hidden_layer_is_not_the_next_seeds_draws():
    """W_1 = (U - 1/2) * 2 / sqrt(d_in) with U uniform: its U must not be the first uniform
    draws of seed + 1, which an SAE with seed + 1 (say, the next replicate) starts from."""
    sae = make_sae(SAEConfig("mlp", 8, 32, mlp_hidden=16, seed=3))
    u = (sae.W_1.detach() * 8 ** 0.5 + 1) / 2
    assert not torch.allclose(u, torch.rand(8, 16, generator=torch.Generator().manual_seed(4)),
                              atol=1e-6)
    assert torch.equal(sae.W_1, make_sae(SAEConfig("mlp", 8, 32, mlp_hidden=16, seed=3)).W_1)


def test_frozen_decoder_and_no_bias():
    sae = make_sae(SAEConfig("relu", 8, 16, freeze_decoder=True, decoder_bias=False))
    assert not sae.W_dec.requires_grad and not sae.b_dec.requires_grad
    sae.init_from_data_(torch.randn(50, 8) + 5)
    assert torch.equal(sae.b_dec, torch.zeros(8))


def test_geometric_median_init():
    """b_dec starts at the geometric median: robust to one far outlier, unlike the mean."""
    sae = make_sae(cfg_for("topk"))
    x = torch.zeros(101, 8)
    x[0] = 1000.0
    sae.init_from_data_(x)
    assert sae.b_dec.abs().max() < 1e-3


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_save_load_bit_identical(arch, tmp_path):
    """A saved SAE loads back and reconstructs bit-identically; cfg.json has SAELens keys."""
    sae = make_sae(cfg_for(arch, hook_name="blocks.1.hook_resid_pre", model_name="m"))
    if arch in ("batchtopk", "matryoshka"):
        sae.train()
        sae(torch.randn(32, 8))
    sae.eval()
    save_sae(sae, tmp_path / "s")
    raw = json.loads((tmp_path / "s" / CFG_FILE).read_text())
    assert {"architecture", "d_in", "d_sae", "apply_b_dec_to_input", "metadata"} <= set(raw)
    assert raw["metadata"]["hook_name"] == "blocks.1.hook_resid_pre"
    back = load_sae(tmp_path / "s").eval()
    x = torch.randn(20, 8)
    assert torch.equal(back(x).recon, sae(x).recon)


def test_input_scale_folded_into_saved_weights(tmp_path):
    """Saved with input_scale s, the file maps raw activations to raw reconstructions."""
    sae = make_sae(cfg_for("topk")).eval()
    with torch.no_grad():
        sae.b_dec.normal_()
    save_sae(sae, tmp_path / "s", input_scale=2.5)
    raw_sae = load_sae(tmp_path / "s").eval()
    x_raw = torch.randn(10, 8)
    expected = sae(x_raw * 2.5).recon / 2.5
    assert torch.allclose(raw_sae(x_raw).recon, expected, atol=1e-5)


@pytest.mark.parametrize("arch", ["topk", "relu", "batchtopk", "matryoshka", "jumprelu"])
@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_saelens_loads_our_files(tmp_path, arch, scale):
    """SAELens reads our TopK, ReLU ("standard") and BatchTopK/Matryoshka ("jumprelu": their
    inference form) files and encodes/decodes raw activations like we do on scaled ones."""
    sae_lens = pytest.importorskip("sae_lens")
    sae = make_sae(cfg_for(arch)).eval()
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_(std=0.1)
        if hasattr(sae, "threshold"):
            sae.threshold.fill_(0.05)
    save_sae(sae, tmp_path / "s", input_scale=scale)
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path / "s"))
    raw = torch.randn(12, 8)
    with torch.no_grad():
        codes = sae.encode(raw * scale)
        assert (codes > 0).any() and (codes == 0).any()  # both sides of the activation
        assert torch.allclose(theirs.encode(raw), codes, atol=1e-5)
        assert torch.allclose(theirs(raw), sae(raw * scale).recon / scale, atol=1e-5)


def _saelens_sae(sae_lens, arch: str, tmp: Path, **opts):
    """An SAE built and saved by SAELens itself, with random weights (decoder rows of
    varied norm, non-zero biases) so every folded option matters."""
    meta = sae_lens.saes.sae.SAEMetadata(hook_name="blocks.1.hook_resid_pre", model_name="m")
    if arch == "standard":
        theirs = sae_lens.StandardSAE(sae_lens.StandardSAEConfig(d_in=8, d_sae=32,
                                                                 metadata=meta, **opts))
    elif arch == "jumprelu":
        theirs = sae_lens.JumpReLUSAE(sae_lens.JumpReLUSAEConfig(d_in=8, d_sae=32,
                                                                 metadata=meta, **opts))
    else:
        theirs = sae_lens.TopKSAE(sae_lens.TopKSAEConfig(d_in=8, d_sae=32, k=4, metadata=meta,
                                                         **opts))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in theirs.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        theirs.W_dec.mul_(torch.rand(32, 1, generator=gen) * 2 + 0.2)
        if arch == "jumprelu":  # thresholds that cut some positive pre-activations, not all
            theirs.threshold.copy_(torch.rand(32, generator=gen))
    theirs.save_model(tmp / "theirs")
    return theirs.eval()


@pytest.mark.parametrize("arch,opts", [
    ("standard", {}),
    ("standard", {"apply_b_dec_to_input": False}),
    ("standard", {"normalize_activations": "layer_norm"}),
    ("topk", {}),
    ("topk", {"rescale_acts_by_decoder_norm": True}),
    ("topk", {"apply_b_dec_to_input": False, "rescale_acts_by_decoder_norm": True}),
    ("jumprelu", {}),
    ("jumprelu", {"apply_b_dec_to_input": False}),
])
def test_we_load_saelens_files(tmp_path, arch, opts):
    """A "standard", "topk" or "jumprelu" SAE saved by SAELens loads here (ReLU / TopK /
    JumpReLU) and encodes and reconstructs like SAELens' own model, its options folded into
    our weights."""
    sae_lens = pytest.importorskip("sae_lens")
    theirs = _saelens_sae(sae_lens, arch, tmp_path, **opts)
    ours = load_sae(tmp_path / "theirs").eval()
    assert ours.cfg.architecture == {"standard": "relu", "topk": "topk",
                                     "jumprelu": "jumprelu"}[arch]
    assert not ours.init_known and load_sae(tmp_path / "theirs").cfg == ours.cfg
    assert (ours.cfg.hook_name, ours.cfg.model_name) == ("blocks.1.hook_resid_pre", "m")
    x = torch.randn(64, 8, generator=torch.Generator().manual_seed(1)) * 3
    with torch.no_grad():
        codes = theirs.encode(x)
        assert (codes > 0).any() and (codes == 0).any()  # both sides of the activation
        assert torch.allclose(ours.encode(x), codes, atol=1e-5)
        assert torch.allclose(ours(x).recon, theirs(x), atol=1e-4)
        if arch == "topk":
            assert ((ours.encode(x) > 0).sum(-1) <= 4).all()
        if arch == "jumprelu":  # some positive pre-activations fall below their threshold
            pre = ours.pre_acts(x)
            assert ((pre > 0) & (codes == 0)).any()


@pytest.mark.parametrize("arch", ["topk", "relu"])
def test_our_file_resaved_by_saelens_loads_back(tmp_path, arch):
    """Ours -> SAELens (load_from_disk, save_model: its own cfg.json, no paper_lib section)
    -> ours again: the same encoding of raw activations (the input scale stays folded)."""
    sae_lens = pytest.importorskip("sae_lens")
    sae = make_sae(cfg_for(arch, hook_name="blocks.1.hook_resid_pre")).eval()
    with torch.no_grad():
        sae.b_dec.normal_()
    save_sae(sae, tmp_path / "ours", input_scale=2.5)
    sae_lens.SAE.load_from_disk(str(tmp_path / "ours")).save_model(tmp_path / "theirs")
    assert "paper_lib" not in json.loads((tmp_path / "theirs" / CFG_FILE).read_text())
    back = load_sae(tmp_path / "theirs").eval()
    assert back.cfg.hook_name == "blocks.1.hook_resid_pre"
    assert load_sae(tmp_path / "ours").init_known and not back.init_known
    x = torch.randn(16, 8)
    with torch.no_grad():
        assert torch.allclose(back.encode(x), sae.encode(x * 2.5), atol=1e-5)
        assert torch.allclose(back(x).recon, sae(x * 2.5).recon / 2.5, atol=1e-5)


def test_saelens_file_of_wrong_shapes_is_named(tmp_path):
    """A SAELens file whose W_enc is stored transposed: the shape error, not a matmul's."""
    from safetensors.torch import load_file, save_file

    sae_lens = pytest.importorskip("sae_lens")
    _saelens_sae(sae_lens, "standard", tmp_path, apply_b_dec_to_input=False)
    wfile = tmp_path / "theirs" / WEIGHTS_FILE
    state = load_file(str(wfile))
    save_file({**state, "W_enc": state["W_enc"].T.contiguous()}, str(wfile))
    with pytest.raises(ValueError, match=r"has wrong shapes \{'W_enc': \(\(32, 8\), \(8, 32\)\)"):
        load_sae(tmp_path / "theirs")


@pytest.mark.parametrize("change,message", [
    ({"architecture": "gated"}, r"SAELens architecture 'gated' cannot be loaded here; "
                                r"paper_lib reads SAELens 'standard', 'topk', 'jumprelu' SAEs"),
    ({"normalize_activations": "expected_average_only_in"},
     r"normalize_activations='expected_average_only_in' has no equivalent here; fold"),
    ({"reshape_activations": "hook_z"}, r"per-head SAEs .* are not supported"),
])
def test_saelens_files_we_cannot_read_are_named(tmp_path, change, message):
    """What has no exact equivalent here is refused by name, before the weights are read."""
    sae_lens = pytest.importorskip("sae_lens")
    _saelens_sae(sae_lens, "standard", tmp_path)
    cfg = json.loads((tmp_path / "theirs" / CFG_FILE).read_text())
    (tmp_path / "theirs" / CFG_FILE).write_text(json.dumps({**cfg, **change}))
    (tmp_path / "theirs" / WEIGHTS_FILE).write_bytes(b"not read")
    with pytest.raises(ValueError, match=message):
        load_sae(tmp_path / "theirs")


def test_load_errors(tmp_path):
    """Missing files, bad JSON, missing keys, corrupt weights, wrong d_in: clear errors."""
    sae = make_sae(cfg_for("topk"))
    d = save_sae(sae, tmp_path / "s")
    with pytest.raises(ValueError, match="d_in=8 but the activations have d_in=16"):
        load_sae(d, expected_d_in=16)
    with pytest.raises(FileNotFoundError, match="no cfg.json"):
        load_sae(tmp_path / "nothing")
    (d / WEIGHTS_FILE).write_bytes(b"\x00" * 20)
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_sae(d)
    cfg = json.loads((d / CFG_FILE).read_text())
    del cfg["d_sae"]
    (d / CFG_FILE).write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"lacks required key\(s\) \['d_sae'\]"):
        load_sae(d)
    (d / CFG_FILE).write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_sae(d)


def test_missing_weight_key(tmp_path):
    from safetensors.torch import load_file, save_file

    d = save_sae(make_sae(cfg_for("relu")), tmp_path / "s")
    state = load_file(str(d / WEIGHTS_FILE))
    del state["b_enc"]
    save_file(state, str(d / WEIGHTS_FILE))
    with pytest.raises(ValueError, match=r"lacks weight\(s\) \['b_enc'\]"):
        load_sae(d)
