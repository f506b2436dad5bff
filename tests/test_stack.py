"""Many SAEs per pass: an SAEStack's step against its SAEs' own (dense reference) steps,
which SAEs stack, and stacked training through the one trainer (resume, saving)."""

import copy
import itertools

import pytest
import torch

from paper_lib.sae import SAEConfig, kernels, load_sae, make_sae, save_sae
from paper_lib.sae.stack import SAEStack, stack_groups
from paper_lib.train import ShuffledBatches, TrainConfig, train_saes
from tests.conftest import Interrupted, interrupting_batches, require_grads, requires_cuda
from tests.test_train import sparse_data

STRATEGIES = list(itertools.product(kernels.GRADS, kernels.TOPK))
D, N = 12, 48


def _saes(ks, arch="topk", **extra):
    """SAEs of one architecture and size, seed g for the g-th k, with non-trivial biases
    (b_dec apart, so the stack's shared centring has something to correct)."""
    saes = [make_sae(SAEConfig(arch, D, N, k=k, seed=g, **extra)) for g, k in enumerate(ks)]
    with torch.no_grad():
        for s in saes:
            s.b_dec.normal_()
            s.b_enc.normal_(std=0.1)
    return saes


def _dead_masks(g_count):
    """[G N] dead latents: every third of the first SAE, none of the second, two of the
    rest (with k_aux = 6: more dead latents than AuxK uses, none, and fewer)."""
    dead = torch.zeros(g_count, N, dtype=torch.bool)
    dead[0, ::3] = True
    dead[2:, [5, 40]] = True
    return dead.flatten()


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "matryoshka"])
@pytest.mark.parametrize("ks", [(5, 5, 5), (5, 2, 7)], ids=["one_k", "k_per_sae"])
@pytest.mark.parametrize("with_dead", [False, True], ids=["no_dead", "auxk"])
@pytest.mark.parametrize("grads,topk", STRATEGIES, ids=["-".join(s) for s in STRATEGIES])
def test_stack_matches_each_sae_alone(arch, ks, with_dead, grads, topk):
    """The stack's loss terms are the sums of each SAE's own (dense reference) terms, and
    every gradient of the stacked parameters is that SAE's own gradient (float32, 1e-4
    relative), for every kernel strategy and architecture of the TopK family."""
    require_grads(grads)
    saes = _saes(ks, arch, aux_k=6)
    alone = copy.deepcopy(saes)
    x = torch.randn(24, D)
    dead = _dead_masks(len(ks)) if with_dead else None
    stack = SAEStack(saes)
    with kernels.strategy(grads=grads, topk=topk):
        terms = stack.loss(stack(x), dead)
        sum(terms.values()).backward()
    want: dict[str, float] = {}
    with kernels.use_sparse(False):
        for g, sae in enumerate(alone):
            own = sae.loss(sae(x), None if dead is None else dead.view(len(ks), N)[g])
            sum(own.values()).backward()
            for name, value in own.items():
                want[name] = want.get(name, 0.0) + float(value.detach())
    assert set(terms) == set(want) == ({"mse", "auxk"} if with_dead else {"mse"})
    for name in want:
        assert float(terms[name].detach()) == pytest.approx(want[name], rel=1e-5), name
    join = {"W_enc": lambda ts: torch.cat(ts, 1), "b_enc": torch.cat, "W_dec": torch.cat,
            "b_dec": torch.stack}
    for name, cat in join.items():
        ref = cat([getattr(s, name).grad for s in alone])
        err = (getattr(stack, name).grad - ref).norm() / ref.norm()
        assert err < 1e-4, f"{name}: relative gradient error {err:.2e}"


def test_stack_standardised_inputs_and_frozen_decoder():
    """Row-standardised inputs (recon back in input units) and a frozen decoder (no
    gradient, no renormalisation) stack too: reconstructions equal each SAE's own."""
    saes = _saes((3, 4), standardize_input=True, freeze_decoder=True)
    alone = copy.deepcopy(saes)
    x = 3 + 2 * torch.randn(16, D)
    stack = SAEStack(saes)
    out = stack(x)
    assert not stack.W_dec.requires_grad
    for g, sae in enumerate(alone):
        with kernels.use_sparse(False):
            torch.testing.assert_close(out.recon[:, g], sae(x).recon, rtol=1e-5, atol=1e-5)
    w_dec = stack.W_dec.detach().clone()
    stack.after_step_()
    assert torch.equal(stack.W_dec, w_dec)


def test_which_saes_stack():
    """Hand case: TopK-family SAEs of one architecture and config up to seed and k group
    together (in order of first appearance); another n, another option, multi-TopK,
    another architecture or a lone SAE stay alone."""
    halves = (0.5, 0.5)
    cfgs = [SAEConfig("topk", 16, 64, k=4, seed=0),          # 0: group A
            SAEConfig("topk", 16, 128, k=4),                  # 1: alone (n)
            SAEConfig("topk", 16, 64, k=8, seed=5),           # 2: group A
            SAEConfig("topk", 16, 64, k=4, auxk=False),       # 3: group B
            SAEConfig("relu", 16, 64, l1_coeff=1.0),          # 4: alone (architecture)
            SAEConfig("topk", 16, 64, k=4, multi_topk=True),  # 5: alone (multi-TopK)
            SAEConfig("topk", 16, 64, k=2, auxk=False),       # 6: group B
            SAEConfig("batchtopk", 16, 64, k=4),              # 7: alone (the only BatchTopK)
            SAEConfig("topk", 16, 64, k=8, seed=1),           # 8: group A
            SAEConfig("matryoshka", 16, 64, k=4),             # 9: group C
            SAEConfig("matryoshka", 16, 64, k=2, seed=3),     # 10: group C
            SAEConfig("matryoshka", 16, 64, k=4, group_fractions=halves)]  # 11: alone
    assert stack_groups([make_sae(c) for c in cfgs]) == [[0, 2, 8], [3, 6], [9, 10]]
    # k / n above the sparse path's 1/8 threshold: trained densely, so never stacked
    dense = [make_sae(SAEConfig("topk", 16, 64, k=k)) for k in (4, 16)]
    assert stack_groups(dense) == []
    with kernels.use_sparse(True):
        assert stack_groups(dense) == [[0, 1]]


def test_stack_refuses_saes_that_differ():
    """SAEs whose configs differ beyond seed and k are refused with a pointer to
    stack_groups, before any parameter is touched."""
    saes = [make_sae(SAEConfig("topk", 16, 64, k=4)), make_sae(SAEConfig("topk", 16, 128, k=4))]
    w_enc = saes[0].W_enc
    with pytest.raises(ValueError, match="differ in seed and k only; stack_groups"):
        SAEStack(saes)
    assert saes[0].W_enc is w_enc


def test_stacked_training_matches_separate_training():
    """train_saes with stack=True (three TopK SAEs stacked, two Matryoshka SAEs stacked, a
    ReLU SAE beside them, dead latents and AuxK on) ends within float rounding of separate
    training, with the same dead-latent counts, held-out metrics and BatchTopK thresholds;
    afterwards each SAE owns contiguous weights."""
    x = sparse_data(n=2048, d=16, n_feat=64)
    cfgs = [SAEConfig("topk", 16, 128, k=k, seed=g, dead_tokens=128)
            for g, k in enumerate((4, 8, 4))] + [SAEConfig("relu", 16, 64, l1_coeff=1e-3)] + [
            SAEConfig("matryoshka", 16, 128, k=k, seed=k, dead_tokens=128) for k in (4, 8)]
    runs = {}
    for stack in (False, True):
        tc = TrainConfig(steps=60, lr=3e-3, eval_every=20, stack=stack, progress=False)
        runs[stack] = train_saes([make_sae(c) for c in cfgs], ShuffledBatches(x, 128), tc,
                                 eval_x=x[:512], init_x=x[:512])
    assert any(h["dead_train"] > 0 for r in runs[False][:3] for h in r.history), \
        "no latent was ever dead: AuxK never ran"
    for a, b in zip(runs[False], runs[True]):
        for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
            torch.testing.assert_close(getattr(b.sae, name), getattr(a.sae, name),
                                       rtol=1e-4, atol=1e-5)
            assert getattr(b.sae, name).is_contiguous() or name == "W_enc" and \
                b.sae.cfg.architecture == "relu"
        assert torch.equal(b.tokens_since_fired, a.tokens_since_fired)
        if hasattr(a.sae, "threshold"):
            assert float(b.sae.threshold) == pytest.approx(float(a.sae.threshold), rel=1e-4)
        for ra, rb in zip(a.history, b.history):
            assert rb.keys() == ra.keys()
            assert rb["fvu"] == pytest.approx(ra["fvu"], rel=1e-4)
    first, second = (r.sae for r in runs[True][:2])
    assert first.W_dec.untyped_storage().data_ptr() != second.W_dec.untyped_storage().data_ptr()


def test_stacked_sae_saves_and_loads(tmp_path):
    """A stacked SAE, after training, saves in the SAELens layout and loads back equal."""
    x = sparse_data(n=512)
    saes = [make_sae(SAEConfig("topk", 16, 64, k=k, seed=k)) for k in (2, 4)]
    train_saes(saes, ShuffledBatches(x, 128), TrainConfig(steps=5, stack=True, progress=False))
    save_sae(saes[1], tmp_path / "sae")
    back = load_sae(tmp_path / "sae")
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(back, name), getattr(saes[1], name))


def test_stacked_checkpoint_resume_matches_uninterrupted(tmp_path):
    """A stacked run stopped after a checkpoint resumes to bit-identical weights and
    history; the checkpoint is keyed on stacking (a separate run refuses it)."""
    x = sparse_data()
    ck = tmp_path / "ck.pt"
    cfgs = [SAEConfig("topk", 16, 64, k=k, seed=k, dead_tokens=256) for k in (2, 4)]
    tc = TrainConfig(steps=40, eval_every=10, stack=True, progress=False)
    full = train_saes([make_sae(c) for c in cfgs], ShuffledBatches(x, 128), tc, eval_x=x)
    ctc = TrainConfig(steps=40, eval_every=10, stack=True, checkpoint_every=20,
                      checkpoint_path=str(ck), progress=False)
    with pytest.raises(Interrupted):
        train_saes([make_sae(c) for c in cfgs], interrupting_batches(x, 128, 25), ctc, eval_x=x)
    with pytest.raises(ValueError, match="different configuration"):
        train_saes([make_sae(c) for c in cfgs], ShuffledBatches(x, 128),
                   TrainConfig(steps=40, eval_every=10, checkpoint_every=20,
                               checkpoint_path=str(ck), progress=False), eval_x=x)
    resumed = train_saes([make_sae(c) for c in cfgs], ShuffledBatches(x, 128), ctc, eval_x=x)
    for a, b in zip(full, resumed):
        assert torch.equal(a.sae.W_dec, b.sae.W_dec) and torch.equal(a.sae.W_enc, b.sae.W_enc)
        assert a.history == b.history
        assert torch.equal(a.tokens_since_fired, b.tokens_since_fired)
    assert not ck.exists()


@requires_cuda
@pytest.mark.parametrize("arch", ["topk", "batchtopk", "matryoshka"])
@pytest.mark.parametrize("grads", kernels.GRADS)
def test_stacked_bf16_matches_dense_on_cuda(grads, arch):
    """On a GPU under bf16 autocast, the stack's loss and gradients agree with each SAE's
    dense reference, within the tolerances the single-SAE kernels meet there
    (test_kernels.test_strategies_match_dense_bf16_cuda)."""
    require_grads(grads, "cuda")
    dev = torch.device("cuda")
    saes = [make_sae(SAEConfig(arch, 256, 4096, k=k, seed=g)).to(dev)
            for g, k in enumerate((16, 32, 64))]
    alone = copy.deepcopy(saes)
    x = torch.randn(1024, 256, device=dev)
    dead = torch.zeros(3 * 4096, dtype=torch.bool, device=dev)
    dead[::7] = True
    stack = SAEStack(saes)
    with kernels.strategy(grads=grads), torch.autocast("cuda", dtype=torch.bfloat16):
        loss = sum(stack.loss(stack(x), dead).values())
    loss.float().backward()
    want = 0.0
    for g, sae in enumerate(alone):
        with kernels.use_sparse(False), torch.autocast("cuda", dtype=torch.bfloat16):
            own = sum(sae.loss(sae(x), dead.view(3, -1)[g]).values())
        own.float().backward()
        want += float(own)
    assert float(loss) == pytest.approx(want, rel=2e-2)
    for name, cat in (("W_enc", lambda ts: torch.cat(ts, 1)), ("W_dec", torch.cat)):
        ref = cat([getattr(s, name).grad.float() for s in alone])
        assert (getattr(stack, name).grad.float() - ref).norm() / ref.norm() < 3e-2, name
