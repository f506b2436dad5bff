"""The one trainer: schedule, lockstep sweeps, dead-latent tracking, checkpoints."""

import json
import warnings

import pytest
import torch

from paper_lib import train
from paper_lib.sae import ARCHITECTURES, SAEConfig, load_sae, make_sae
from paper_lib.train import ShuffledBatches, TrainConfig, lr_factor, train_saes
from tests.conftest import Interrupted, interrupting_batches


def sparse_data(n=2048, d=16, n_feat=64, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    dic = torch.nn.functional.normalize(torch.randn(n_feat, d, generator=g), dim=1)
    codes = torch.zeros(n, n_feat)
    idx = torch.rand(n, n_feat, generator=g).argsort(1)[:, :k]
    codes.scatter_(1, idx, torch.rand(n, k, generator=g) + 0.5)
    return codes @ dic


def test_lr_schedule_hand_values():
    """Warmup 10 steps, decay over the last 20% of 100 steps."""
    cfg = TrainConfig(steps=100, warmup_steps=10, decay_fraction=0.2)
    assert lr_factor(0, cfg) == pytest.approx(0.1)
    assert lr_factor(9, cfg) == pytest.approx(1.0)
    assert lr_factor(50, cfg) == pytest.approx(1.0)
    assert lr_factor(80, cfg) == pytest.approx(1.0)
    assert lr_factor(90, cfg) == pytest.approx(0.5)
    assert lr_factor(99, cfg) == pytest.approx(0.05)


def test_train_config_rejects_bad_values():
    with pytest.raises(ValueError, match="lr=-1"):
        TrainConfig(steps=10, lr=-1)
    with pytest.raises(ValueError, match="steps=0"):
        TrainConfig(steps=0)
    with pytest.raises(ValueError, match="checkpoint_path"):
        TrainConfig(steps=10, checkpoint_every=5)


def test_batches_are_addressable_and_cover_epochs():
    x = torch.arange(12.0).unsqueeze(1)
    b = ShuffledBatches(x, 4, seed=3)
    epoch0 = torch.cat([b.batch(i) for i in range(3)]).flatten().sort().values
    assert torch.equal(epoch0, torch.arange(12.0))
    again = ShuffledBatches(x, 4, seed=3)
    assert torch.equal(again.batch(5), b.batch(5))
    with pytest.raises(ValueError, match="batch_size=20 exceeds"):
        ShuffledBatches(x, 20)


@pytest.mark.parametrize("arch", ARCHITECTURES)
def test_every_architecture_learns(arch):
    """Each architecture beats the mean-reconstruction baseline (FVU < 1) quickly."""
    x = sparse_data()
    extra = {"k": 6} if arch in ("topk", "batchtopk", "matryoshka") else {}
    extra.update({"l1_coeff": 1e-3} if arch in ("relu", "mlp") else {})
    extra.update({"mlp_hidden": 32} if arch == "mlp" else {})
    sae = make_sae(SAEConfig(arch, 16, 64, standardize_input=arch == "topafa", **extra))
    res = train_saes([sae], ShuffledBatches(x, 256), TrainConfig(steps=150, lr=3e-3,
                                                                   progress=False),
                     eval_x=x[:512], init_x=x[:512])
    assert res[0].final["fvu"] < 0.6


@pytest.mark.parametrize("arch", ["batchtopk", "matryoshka"])
def test_batchtopk_threshold_is_set_from_the_last_training_batch(arch):
    """The inference threshold is the smallest activation the batch selection keeps on
    the last training batch under the final weights, so there (pre > theta, strictly)
    the SAE keeps k*B - 1 codes: theta's own entry drops out, no two floats tie."""
    x = sparse_data()
    batches = ShuffledBatches(x, 128)
    sae = make_sae(SAEConfig(arch, 16, 64, k=4))
    train_saes([sae], batches, TrainConfig(steps=25, lr=3e-3, eval_every=10, progress=False),
               eval_x=x[:256], init_x=x[:256])
    sae.eval()
    with torch.no_grad():
        assert int((sae.encode(batches.batch(24)) > 0).sum()) == 4 * 128 - 1


def test_lockstep_equals_separate_training():
    """Training two SAEs together gives each the result of training it alone."""
    x = sparse_data()
    cfgs = [SAEConfig("topk", 16, 64, k=4, seed=1), SAEConfig("relu", 16, 64, l1_coeff=1e-3)]
    tc = TrainConfig(steps=30, progress=False)
    together = train_saes([make_sae(c) for c in cfgs], ShuffledBatches(x, 128), tc, eval_x=x)
    for c, res in zip(cfgs, together):
        alone = train_saes([make_sae(c)], ShuffledBatches(x, 128), tc, eval_x=x)[0]
        assert torch.equal(alone.sae.W_enc, res.sae.W_enc)


def test_heldout_metrics_only_at_the_end_when_asked():
    """heldout_midway=False: rows every eval_every steps carry dead_train only, the last
    row the held-out metrics too; the training itself is unchanged."""
    x = sparse_data()
    cfg = SAEConfig("topk", 16, 64, k=4, seed=1)
    runs = {}
    for midway in (True, False):
        tc = TrainConfig(steps=6, eval_every=2, heldout_midway=midway, progress=False)
        runs[midway] = train_saes([make_sae(cfg)], ShuffledBatches(x, 128), tc, eval_x=x)[0]
    cheap = runs[False].history
    assert [r["step"] for r in cheap] == [2, 4, 6]
    assert [sorted(r) for r in cheap[:2]] == [["dead_train", "step", "tokens"]] * 2
    assert {"fvu", "l0", "dead_eval"} <= set(cheap[-1])
    assert torch.equal(runs[True].sae.W_enc, runs[False].sae.W_enc)
    assert cheap[-1] == runs[True].history[-1]
    assert [r["dead_train"] for r in cheap] == [r["dead_train"] for r in runs[True].history]


def test_dead_latent_tracking_counts_tokens():
    """A latent that never fires accumulates batch_size tokens per step; AuxK switches on."""
    x = sparse_data(n=512)
    sae = make_sae(SAEConfig("topk", 16, 64, k=2, dead_tokens=256))
    with torch.no_grad():
        sae.W_enc[:, 0] = 0.0
        sae.b_enc[0] = -1e3  # latent 0 can never fire (and gets no gradient)
    res = train_saes([sae], ShuffledBatches(x, 128), TrainConfig(steps=4, progress=False),
                     eval_x=x)[0]
    assert int(res.tokens_since_fired[0]) == 4 * 128
    assert res.final["dead_train"] > 0


def test_checkpoint_resume_matches_uninterrupted(tmp_path):
    """Stop after a checkpoint, resume from it: identical weights and history."""
    x = sparse_data()
    ck = tmp_path / "ck.pt"
    cfg = SAEConfig("topk", 16, 64, k=4)
    full = train_saes([make_sae(cfg)], ShuffledBatches(x, 128),
                      TrainConfig(steps=40, eval_every=10, progress=False), eval_x=x)[0]
    tc = TrainConfig(steps=40, eval_every=10, checkpoint_every=20, checkpoint_path=str(ck),
                     progress=False)

    with pytest.raises(Interrupted):
        train_saes([make_sae(cfg)], interrupting_batches(x, 128, 25), tc, eval_x=x)
    assert ck.exists()
    resumed = train_saes([make_sae(cfg)], ShuffledBatches(x, 128), tc, eval_x=x)[0]
    assert torch.equal(resumed.sae.W_dec, full.sae.W_dec)
    assert [h["fvu"] for h in resumed.history] == [h["fvu"] for h in full.history]
    assert not ck.exists()


class NoBatches:
    """A BatchSource that must not be read (a finished run needs no data)."""
    batch_size = 128

    def batch(self, step):
        raise AssertionError(f"batch {step} read")


@pytest.mark.parametrize("stack", [False, True])
def test_finished_checkpoint_is_kept_and_returned_without_training(tmp_path, stack):
    """keep_finished: the checkpoint stays when training ends, marked finished; a rerun
    reads no batch and evaluates nothing, and returns the same weights, history, firing
    counts and global RNG state; a rerun without keep_finished then removes the file."""
    x = sparse_data()
    ck = tmp_path / "ck.pt"
    cfgs = [SAEConfig("topk", 16, 64, k=k) for k in (2, 4)]
    tc = TrainConfig(steps=30, eval_every=10, checkpoint_every=20, checkpoint_path=str(ck),
                     progress=False, keep_finished=True, stack=stack)
    calls = []

    def eval_fn(sae):
        calls.append(1)
        return {"extra": float(sae.W_dec.detach().sum())}

    torch.manual_seed(5)
    first = train_saes([make_sae(c) for c in cfgs], ShuffledBatches(x, 128), tc, eval_x=x,
                       eval_fn=eval_fn)
    rng_after = torch.get_rng_state()
    state = torch.load(ck, weights_only=True)
    assert state["finished"] and state["step"] == 30 and state["opts"] == []
    n_evals = len(calls)
    torch.manual_seed(6)
    again = train_saes([make_sae(c) for c in cfgs], NoBatches(), tc, eval_x=x, eval_fn=eval_fn)
    assert len(calls) == n_evals and torch.equal(torch.get_rng_state(), rng_after)
    for a, b in zip(first, again):
        for (name, u), v in zip(a.sae.state_dict().items(), b.sae.state_dict().values()):
            assert torch.equal(u, v), name
        assert a.history == b.history and len(a.history) == 3
        assert torch.equal(a.tokens_since_fired, b.tokens_since_fired)
    assert ck.exists()
    plain = TrainConfig(steps=30, eval_every=10, checkpoint_every=20, checkpoint_path=str(ck),
                        progress=False, stack=stack)
    third = train_saes([make_sae(c) for c in cfgs], NoBatches(), plain, eval_x=x)
    assert torch.equal(third[1].sae.W_dec, first[1].sae.W_dec) and not ck.exists()


def test_checkpoint_of_other_config_is_refused(tmp_path):
    x = sparse_data(n=512)
    ck = tmp_path / "ck.pt"
    tc = TrainConfig(steps=10, checkpoint_every=5, checkpoint_path=str(ck), progress=False)

    with pytest.raises(Interrupted):
        train_saes([make_sae(SAEConfig("topk", 16, 64, k=4))], interrupting_batches(x, 128, 7),
                   tc)
    with pytest.raises(ValueError, match="different configuration"):
        train_saes([make_sae(SAEConfig("topk", 16, 64, k=5))], ShuffledBatches(x, 128), tc)


def test_checkpoint_resumes_when_only_bookkeeping_changed(tmp_path):
    """A run interrupted with one progress / description / checkpoint cadence resumes under
    another (those settings change no number), to the uninterrupted weights."""
    x = sparse_data()
    ck = tmp_path / "ck.pt"
    cfg = SAEConfig("topk", 16, 64, k=4)
    full = train_saes([make_sae(cfg)], ShuffledBatches(x, 128),
                      TrainConfig(steps=40, progress=False), eval_x=x)[0]
    first = TrainConfig(steps=40, checkpoint_every=20, checkpoint_path=str(ck), progress=False,
                        desc="first")
    with pytest.raises(Interrupted):
        train_saes([make_sae(cfg)], interrupting_batches(x, 128, 25), first, eval_x=x)
    again = TrainConfig(steps=40, checkpoint_seconds=30.0, checkpoint_path=str(ck),
                        progress=True, desc="again")
    resumed = train_saes([make_sae(cfg)], ShuffledBatches(x, 128), again, eval_x=x)[0]
    assert torch.equal(resumed.sae.W_dec, full.sae.W_dec)


def test_failing_compiler_warns_and_trains_eagerly(broken_compiler):
    """A compiler that breaks (inductor did on the H100 for the sparse step) costs a warning,
    not the run: the step redoes itself eagerly and training equals an eager one exactly."""
    x = sparse_data()
    cfg = SAEConfig("topk", 16, 64, k=4, seed=2)
    runs = []
    for c in (False, True):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            runs.append(train_saes([make_sae(cfg)], ShuffledBatches(x, 128),
                                   TrainConfig(steps=5, compile=c, progress=False))[0])
        fell_back = [w for w in caught if issubclass(w.category, train.CompileFallbackWarning)]
        assert len(fell_back) == c  # once, on the first step only
    assert "torch.compile failed" in str(fell_back[0].message)
    assert "NotImplementedError: View" in str(fell_back[0].message)
    for name, p in runs[0].sae.named_parameters():
        assert torch.equal(p, dict(runs[1].sae.named_parameters())[name]), name


@pytest.mark.parametrize("arch", ["topk", "batchtopk", "matryoshka", "relu"])
def test_compiled_step_matches_eager(arch):
    """TrainConfig.compile changes where the arithmetic runs, not what it computes: the
    same training (L1 warm-up and AuxK included) within float rounding."""
    x = sparse_data()
    cfg = SAEConfig(arch, 16, 64, k=0 if arch == "relu" else 4, l1_coeff=1e-3, seed=2,
                    dead_tokens=256)

    def build():
        sae = make_sae(cfg)
        with torch.no_grad():
            sae.b_enc[:8] = -20.0  # 8 latents never fire, die after 2 steps, and feed AuxK
        return sae

    res = [train_saes([build()], ShuffledBatches(x, 128),
                      TrainConfig(steps=12, sparsity_warmup_steps=6, compile=c, progress=False),
                      eval_x=x)[0] for c in (False, True)]
    for name, p in res[0].sae.named_parameters():
        q = dict(res[1].sae.named_parameters())[name]
        assert torch.allclose(p, q, rtol=1e-4, atol=1e-5), name
    assert res[0].final["fvu"] == pytest.approx(res[1].final["fvu"], rel=1e-4)
    if arch != "relu":
        assert all(r.final["dead_train"] > 0 for r in res)


def test_command_line_sweep_trains_every_combination_on_one_pass(tmp_path, capsys):
    """`--k 4,8 --seed 0,1`: four SAEs on the same batches, one record and one SAELens folder
    each, named by their settings; `--stack` trains them as one module to the same result
    (float32 rounding apart) and says how it grouped them."""
    common = ["--k", "4,8", "--seed", "0,1", "--d-sae", "64", "--steps", "40", "--batch", "128",
              "--quiet"]
    assert train.main(common + ["--out", str(tmp_path / "a.json"),
                                "--save", str(tmp_path / "saes")]) == 0
    assert train.main(common + ["--stack", "--out", str(tmp_path / "b.json")]) == 0
    assert "stacked: 4 SAEs in 1 stack(s)" in capsys.readouterr().err
    alone, stacked = (json.loads((tmp_path / f).read_text()) for f in ("a.json", "b.json"))
    names = ["topk-n64-k4-s0", "topk-n64-k4-s1", "topk-n64-k8-s0", "topk-n64-k8-s1"]
    assert [r["name"] for r in alone["saes"]] == names and alone["stack"] is False
    assert [(r["config"]["k"], r["config"]["seed"]) for r in alone["saes"]] == \
        [(4, 0), (4, 1), (8, 0), (8, 1)]
    assert len({r["weights_sha256"] for r in alone["saes"]}) == 4
    for a, b in zip(alone["saes"], stacked["saes"]):
        assert a["final"]["l0"] == pytest.approx(a["config"]["k"], abs=0.05)
        assert b["final"]["fvu"] == pytest.approx(a["final"]["fvu"], abs=1e-3)
    for r in alone["saes"]:  # each saved SAE is the one its record describes
        sae = load_sae(tmp_path / "saes" / r["name"])
        assert (sae.cfg.k, sae.cfg.seed, sae.cfg.d_sae) == \
            (r["config"]["k"], r["config"]["seed"], 64)
    # one SAE keeps the single-SAE record and saves at --save itself
    assert train.main(["--d-sae", "64", "--steps", "5", "--quiet", "--out",
                       str(tmp_path / "c.json"), "--save", str(tmp_path / "one")]) == 0
    assert "final" in json.loads((tmp_path / "c.json").read_text())
    assert (tmp_path / "one" / "cfg.json").exists()


def test_command_line_dead_window_scales_with_a_short_run_and_is_recorded(tmp_path):
    """Gao et al.'s 10M-token window would leave a run of 40 x 64 = 2,560 tokens with no
    dead latent ever, and AuxK idle: by default the window is a tenth of the tokens trained
    (256), so a 512-latent SAE at k = 2 on 32-dim data has dead latents; --dead-tokens sets
    it. cfg.json and the JSON record both hold it, the record with every setting that ran."""
    for extra, window in (([], 256), (["--dead-tokens", "1000"], 1000)):
        out = tmp_path / f"w{window}"
        assert train.main(["--d-sae", "512", "--k", "2", "--steps", "40", "--batch", "64",
                           "--quiet", "--out", str(out / "m.json"), "--save", str(out / "sae"),
                           *extra]) == 0
        assert load_sae(out / "sae").cfg.dead_tokens == window
        record = json.loads((out / "m.json").read_text())  # what ran, defaults resolved
        assert record["config"]["dead_tokens"] == record["settings"]["dead_tokens"] == window
        assert (record["settings"]["steps"], record["settings"]["batch"]) == (40, 64)
        assert record["data"] == "synthetic d_in=32"
    assert json.loads((tmp_path / "w256" / "m.json").read_text())["final"]["dead_train"] > 0


def test_command_line_holds_out_rows_it_never_trains_or_initialises_on(tmp_path, monkeypatch):
    """`--acts`: the last tenth of the rows (here 20 of 200) is the evaluation set; the
    training batches and the decoder-bias sample come from the other rows only."""
    from safetensors.torch import save_file

    x = torch.arange(200, dtype=torch.float32)[:, None].repeat(1, 8)  # row i reads i
    save_file({"acts": x}, str(tmp_path / "a.safetensors"))
    seen = {}

    def spy(saes, data, tc, eval_x=None, init_x=None):
        seen.update(train={int(v) for s in range(data.per_epoch) for v in data.batch(s)[:, 0]},
                    eval={int(v) for v in eval_x[:, 0]}, init={int(v) for v in init_x[:, 0]})
        raise SystemExit(0)
    monkeypatch.setattr(train, "train_saes", spy)
    with pytest.raises(SystemExit):
        train.main(["--acts", str(tmp_path / "a.safetensors"), "--d-sae", "16", "--k", "2",
                    "--batch", "30", "--quiet", "--out", str(tmp_path / "o.json")])
    assert seen["eval"] == set(range(180, 200))
    assert seen["train"] <= set(range(180)) and len(seen["train"]) == 180
    assert seen["init"] == set(range(180))  # fewer than 2048 rows: all training rows


def test_command_line_refuses_a_checkpoint_of_other_data(tmp_path, monkeypatch):
    """An interrupted `python -m paper_lib.train --acts A` leaves its checkpoint; rerun on
    another activation file (or another --batch) the command refuses it, naming the fix,
    instead of resuming those SAEs on other data; rerun as before, it resumes."""
    from safetensors.torch import save_file

    for name, seed in (("a", 0), ("b", 1)):
        save_file({"acts": sparse_data(n=600, seed=seed)}, str(tmp_path / f"{name}.safetensors"))

    def command(acts, batch="64", steps="20"):
        return train.main(["--acts", str(tmp_path / acts), "--d-sae", "32", "--k", "2",
                           "--steps", steps, "--batch", batch, "--checkpoint-every", "5",
                           "--quiet", "--out", str(tmp_path / "o.json")])

    class DiesAtStep8(ShuffledBatches):
        def batch(self, step):
            if step == 8:
                raise Interrupted
            return super().batch(step)
    monkeypatch.setattr(train, "ShuffledBatches", DiesAtStep8)
    with pytest.raises(Interrupted):
        command("a.safetensors")
    monkeypatch.setattr(train, "ShuffledBatches", ShuffledBatches)
    ck = tmp_path / "o.json.ckpt.pt"
    assert torch.load(ck, weights_only=True)["step"] == 5
    for other in (dict(acts="b.safetensors"), dict(acts="a.safetensors", batch="32")):
        with pytest.raises(ValueError, match="belongs to a different configuration .* delete "
                                             "it or choose another checkpoint_path"):
            command(**other)
    assert command("a.safetensors") == 0 and not ck.exists()


@pytest.mark.parametrize("chunk", [None, 1, 2])
def test_evaluate_by_hand(chunk):
    """TopK, k = 1, identity encoder and decoder, zero biases, rows (2, 1), (0, 3), (-1, -1):
    codes (2, 0), (0, 3), (0, 0), so squared errors 1 + 0 + 2 = 3; the rows' mean is
    (1/3, 1) and their summed squared deviation 25/9 + 37/9 + 52/9 = 114/9, so FVU =
    27/114; L0 = 2/3; both latents fire, none is dead. The same in any chunking; on the
    last two rows latent 0 never fires: half are dead."""
    sae = make_sae(SAEConfig("topk", 2, 2, k=1))
    with torch.no_grad():
        for w in (sae.W_enc, sae.W_dec):
            w.copy_(torch.eye(2))
        sae.b_enc.zero_()
        sae.b_dec.zero_()
    x = torch.tensor([[2.0, 1.0], [0.0, 3.0], [-1.0, -1.0]])
    got = train.evaluate(sae, x, chunk=chunk)
    assert got["fvu"] == pytest.approx(27 / 114, rel=1e-12)
    assert got["l0"] == pytest.approx(2 / 3) and got["dead_eval"] == 0.0
    assert train.evaluate(sae, x[1:], chunk=chunk)["dead_eval"] == 0.5
    assert sae.training  # left in the mode it was in


def test_evaluate_holds_a_bounded_number_of_codes(monkeypatch):
    """By default each forward pass encodes EVAL_ENTRIES // n rows: with 4 codes allowed
    and n = 2 latents, 5 rows go through in passes of 2, 2 and 1."""
    monkeypatch.setattr(train, "EVAL_ENTRIES", 4)
    sae = make_sae(SAEConfig("topk", 3, 2, k=1))
    rows = []
    sae.register_forward_hook(lambda mod, args, out: rows.append(args[0].shape[0]))
    train.evaluate(sae, torch.randn(5, 3))
    assert rows == [2, 2, 1]
