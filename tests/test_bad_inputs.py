"""The bad-input catalogue: each bad input raises its own clear error (naming the problem
and, where there is one, the fix) before any compute, and leaves no half-written file."""

import json
import math
import re
from pathlib import Path

import pytest
import torch

from paper_lib import scaling
from paper_lib.config import AFAParams, AmortParams, ExploreParams, MatryoshkaParams, TopKParams
from paper_lib.data import corpus as corp
from paper_lib.data import harvest as hv
from paper_lib.data.synthetic import quasi_orthogonal_dictionary
from paper_lib.sae import SAEConfig, load_sae, make_sae, save_sae
from paper_lib.sae.io import CFG_FILE, WEIGHTS_FILE
from paper_lib.train import ShuffledBatches, TrainConfig, train_saes
from tests.conftest import Interrupted, interrupting_batches


def _saved(tmp: Path) -> Path:
    return save_sae(make_sae(SAEConfig("topk", 8, 16, k=2)), tmp / "sae")


def _corrupt_weights(tmp: Path):
    d = _saved(tmp)
    data = (d / WEIGHTS_FILE).read_bytes()
    (d / WEIGHTS_FILE).write_bytes(data[: len(data) // 2])
    return lambda: load_sae(d)


def _cfg_without(key: str, **change):
    """A case: a saved SAE whose cfg.json lacks `key` (and has `change`)."""
    def case(tmp: Path):
        d = _saved(tmp)
        cfg = json.loads((d / CFG_FILE).read_text())
        del cfg[key]
        (d / CFG_FILE).write_text(json.dumps({**cfg, **change}))
        return lambda: load_sae(d)
    return case


def _cfg_not_json(tmp: Path):
    d = _saved(tmp)
    (d / CFG_FILE).write_text("{\"d_in\": 8,")
    return lambda: load_sae(d)


def _wrong_d_in(tmp: Path):
    d = _saved(tmp)
    return lambda: load_sae(d, expected_d_in=768)


def _unwritable_output(tmp: Path):
    blocker = tmp / "a_file"
    blocker.write_text("not a directory")
    return lambda: save_sae(make_sae(SAEConfig("topk", 8, 16, k=2)), blocker / "sae")


def _stale_checkpoint(tmp: Path):
    x = torch.randn(128, 8)
    ck = tmp / "ck.pt"
    tc = TrainConfig(steps=4, checkpoint_every=1, checkpoint_path=str(ck), progress=False)

    with pytest.raises(Interrupted):
        train_saes([make_sae(SAEConfig("topk", 8, 16, k=2))], interrupting_batches(x, 32, 2),
                   tc)
    return lambda: train_saes([make_sae(SAEConfig("topk", 8, 32, k=2))],
                              ShuffledBatches(x, 32), tc)


class _Model:
    """Just enough of a HookedTransformer for hook validation."""

    class cfg:
        n_layers = 2
    hook_dict = {"hook_embed": None, "blocks.0.hook_resid_pre": None,
                 "blocks.1.hook_resid_pre": None}


CASES = [
    ("unknown notebook parameter", lambda t: lambda: AmortParams.from_profile("smoke", n_sed=3),
     ValueError, r"unknown parameter\(s\) 'n_sed'"),
    ("wrong parameter type", lambda t: lambda: TopKParams.from_profile("smoke", steps="many"),
     ValueError, r"'steps' = 'many' \(str\) is invalid: expected int"),
    ("negative learning rate", lambda t: lambda: AFAParams.from_profile("smoke", lr=-0.1),
     ValueError, r"'lr' = -0.1 is out of range: must be > 0"),
    ("TopK frontier k above the dictionary",
     lambda t: lambda: AFAParams.from_profile("smoke", topk_ks=[16, 1024]),
     ValueError, r"'topk_ks' = \[16, 1024\] must hold at least two k, none above "
                 r"'d_sae' = 512"),
    ("top-AFA sweep lambda of 0", lambda t: lambda: AFAParams.from_profile("smoke",
                                                                          afa_lambdas=[0.0]),
     ValueError, r"'afa_lambdas' = \(0.0,\) is out of range: must be > 0"),
    ("unknown profile", lambda t: lambda: AFAParams.from_profile("cluster"),
     ValueError, r"'profile' = 'cluster' is invalid"),
    ("granularity not a power of two",
     lambda t: lambda: MatryoshkaParams.from_profile("smoke", min_granularity=48),
     ValueError, r"'min_granularity' = 48 must be a power of two"),
    ("frontier n not in the sweep", lambda t: lambda: TopKParams.from_profile("smoke",
                                                                             frontier_n=300),
     ValueError, r"'frontier_n' = 300 must be one of"),
    ("too few SAEs for the joint law", lambda t: lambda: TopKParams.from_profile(
        "smoke", n_values=[256, 512], k_values=[4, 8], frontier_n=512, dead_n=512, dead_k=4,
        multi_k=4), ValueError, r"give 4 \(n, k\) SAEs; the joint scaling law has 6 parameters"),
    ("row length for an embedded LM", lambda t: lambda: TopKParams.from_profile(
        "smoke", context_size=64), ValueError,
     r"'context_size' = 64 is for hub LMs: embedded-smoke reads rows of its whole context; "
     r"leave it 0"),
    ("row of one token", lambda t: lambda: MatryoshkaParams.from_profile(
        "smoke", model="gpt2", dataset="Skylion007/openwebtext", context_size=1), ValueError,
     r"'context_size' = 1: a row needs BOS and a token"),
    ("more CE rows than held-out rows", lambda t: lambda: TopKParams.from_profile(
        "paper", context_size=1024), ValueError,
     r"'ce_rows' = 512 exceeds the 257 held-out token rows \(n_eval_tokens = 262,144 in rows "
     r"of 1024 tokens\); ask for fewer rows or raise n_eval_tokens"),
    ("more RSA samples than analysis tokens", lambda t: lambda: MatryoshkaParams.from_profile(
        "smoke", rsa_samples=20_000), ValueError,
     r"'rsa_samples' = 20000 exceeds 'analysis_tokens' = 16384, the rows it is drawn from"),
    ("dead-latent window past the training", lambda t: lambda: TopKParams.from_profile(
        "smoke", dead_window=256_000), ValueError,
     r"'dead_window' = 256,000 is not below the 256,000 tokens trained on \(steps x "
     r"batch_size\): no latent could count as dead"),
    ("explorer's dead-latent window past its fallback training", lambda t: lambda:
        ExploreParams.from_profile("smoke", fallback_steps=40), ValueError,
     r"'dead_window' = 50,000 is not below the 40,960 tokens trained on \(fallback_steps x "
     r"batch_size\): no latent could count as dead \(AuxK would never act"),
    ("more active atoms than atoms", lambda t: lambda: AFAParams.from_profile(
        "smoke", h_values=[2, 200]), ValueError,
     r"'h_values' = \[2, 200\]: a synthetic code cannot have more active atoms than "
     r"'n_atoms' = 128"),
    ("LM of another profile's data in 02", lambda t: lambda: AmortParams.from_profile(
        "smoke", lm_model="gpt2"), ValueError,
     r"'lm_model' = 'gpt2' does not fit profile 'smoke', which reads the embedded corpus: use "
     r"'embedded-smoke' or 'embedded-gpu'"),
    ("k > n", lambda t: lambda: SAEConfig("topk", 8, 16, k=17),
     ValueError, r"k=17 exceeds d_sae=16"),
    ("k <= 0", lambda t: lambda: SAEConfig("batchtopk", 8, 16, k=0),
     ValueError, r"k=0 must be >= 1"),
    ("unknown architecture", lambda t: lambda: SAEConfig("gated", 8, 16),
     ValueError, r"unknown architecture 'gated'; choose one of"),
    ("training an SAE only read from SAELens' files",
     lambda t: lambda: train_saes([make_sae(SAEConfig("jumprelu", 8, 16))],
                                  ShuffledBatches(torch.randn(64, 8), 16),
                                  TrainConfig(steps=1, progress=False)),
     ValueError, r"jumprelu SAEs are read from SAELens' files, to explore and score; training "
                 r"them .* is not implemented"),
    ("Matryoshka groups not summing to 1",
     lambda t: lambda: SAEConfig("matryoshka", 8, 16, k=2, group_fractions=(0.5, 0.25)),
     ValueError, r"must be positive and sum to 1"),
    ("unknown hook", lambda t: lambda: hv.stop_layer(_Model, "blocks.0.mlp_out"),
     ValueError, r"unknown hook 'blocks.0.mlp_out'. Residual-stream hooks"),
    ("layer out of range", lambda t: lambda: hv.stop_layer(_Model, "blocks.9.hook_resid_pre"),
     ValueError, r"layer 9 is out of range, the model has 2 layers"),
    ("NaN activations", lambda t: lambda: hv.check_finite(
        torch.tensor([[[0.0, math.nan]]]), "blocks.0.hook_resid_pre", 3),
     ValueError, r"non-finite activations at hook 'blocks.0.hook_resid_pre' in batch 3"),
    ("empty corpus", lambda t: lambda: corp.load_stdlib_corpus(t, files=[]),
     ValueError, r"the corpus is empty"),
    ("text too short for a row", lambda t: lambda: corp.byte_tokens(["ab"], n_ctx=64),
     ValueError, r"not enough text for one row of 64 tokens"),
    ("corrupt safetensors", _corrupt_weights, ValueError, r"corrupt or truncated"),
    ("cfg.json with a missing key", _cfg_without("d_in"), ValueError,
     r"lacks required key\(s\) \['d_in'\]"),
    ("cfg.json not JSON", _cfg_not_json, ValueError, r"is not valid JSON"),
    ("SAELens file of an architecture not read here",
     _cfg_without("paper_lib", architecture="gated"), ValueError,
     r"SAELens architecture 'gated' cannot be loaded here; paper_lib reads SAELens "
     r"'standard', 'topk', 'jumprelu' SAEs and its own files"),
    ("SAE for another model width", _wrong_d_in, ValueError,
     r"d_in=8 but the activations have d_in=768: wrong hook or model"),
    ("missing SAE directory", lambda t: lambda: load_sae(t / "nope"), FileNotFoundError,
     r"no cfg.json in .*not a saved SAE directory"),
    ("unwritable output directory", _unwritable_output, OSError, r"cannot write to"),
    ("checkpoint of another configuration", _stale_checkpoint, ValueError,
     r"belongs to a different configuration \(SAEs, training settings or data\); delete it "
     r"or choose another checkpoint_path"),
    ("batch larger than the data", lambda t: lambda: ShuffledBatches(torch.zeros(10, 2), 64),
     ValueError, r"batch_size=64 exceeds the 10 rows available"),
    ("zero training steps", lambda t: lambda: TrainConfig(steps=0), ValueError,
     r"steps=0 must be positive"),
    ("coherence below the Welch bound",
     lambda t: lambda: quasi_orthogonal_dictionary(512, 16, 0.01, seed=0),
     ValueError, r"below what 512 atoms in 16 dims allow \(Welch bound"),
    ("power-law fit on non-positive data",
     lambda t: lambda: scaling.fit_power_law([1.0, 2.0], [0.5, 0.0]),
     ValueError, r"need positive x and y"),
    ("k' outside the dictionary", lambda t: lambda: make_sae(
        SAEConfig("topk", 8, 16, k=2)).encode_at_k(torch.zeros(1, 8), 99),
     ValueError, r"k'=99 must satisfy 0 < k' <= d_sae=16"),
]


@pytest.mark.parametrize("name, build, exc, pattern", CASES, ids=[c[0] for c in CASES])
def test_bad_input(name, build, exc, pattern, tmp_path):
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    call = build(tmp_path)
    after_setup = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    with pytest.raises(exc, match=pattern):
        call()
    after = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    changed = set(after) ^ set(after_setup)
    assert not changed, f"{name}: files appeared or vanished: {changed}"
    assert not [p for p in after if str(p).endswith(".tmp")]
    assert before == [] or before == after_setup[: len(before)]


def test_catalogue_size():
    assert len(CASES) >= 20


def test_failed_save_keeps_the_previous_sae(tmp_path, monkeypatch):
    """A crash while overwriting a saved SAE leaves the old one intact and loadable."""
    import paper_lib.sae.io as io

    old = make_sae(SAEConfig("topk", 8, 16, k=2))
    d = save_sae(old, tmp_path / "sae")

    def broken(tensors, path):
        Path(path).write_bytes(b"partial")
        raise OSError("disk full")
    monkeypatch.setattr(io, "save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        save_sae(make_sae(SAEConfig("topk", 8, 16, k=2, seed=1)), d)
    assert torch.equal(load_sae(d).W_dec, old.W_dec)
    assert [p.name for p in tmp_path.iterdir()] == ["sae"]


@pytest.mark.parametrize("args, message", [
    (["--arch", "mlp"], "an mlp SAE needs mlp_hidden >= 1"),
    (["--k", "999"], "k=999 exceeds d_sae=256"),
    (["--steps", "0"], "--steps 0: must be >= 1"),
    (["--acts", "missing.safetensors"], "--acts missing.safetensors: no such file"),
    (["--acts", "{wrong}"], "no tensor named 'acts' \\(found x\\)"),
    (["--acts", "{wrong}", "--model", "embedded-smoke"], "give --acts or --model, not both"),
    (["--acts", "{short}"], "100 rows; training needs --batch 256 rows beside the tenth held"),
    (["--data-files", "x.txt"], "--data-files needs --model and a --dataset loader"),
    (["--k", "8,x"], "'8,x' is not an integer or a comma-separated list of them"),
    (["--l1-coeff", "1,e"], "'1,e' is not a number or a comma-separated list"),
    (["--k", "8,16,8"], "'8,16,8' lists a value twice"),
    (["--d-sae", "256,0"], "--d-sae 0: must be >= 1"),
    (["--arch", "relu", "--k", "4,8"], "--k lists several values, but a relu SAE does not use"),
    (["--l1-coeff", "1,3"], "--l1-coeff lists several values, but a topk SAE does not use"),
    (["--stack"], "--stack: no two of these SAEs can train as one stack"),
    (["--stack", "--arch", "relu", "--l1-coeff", "1,3"], "--stack: no two of these SAEs"),
    (["--stack", "--k", "8,64"], "--stack: no two of these SAEs"),  # k=64 of 256: dense path
    (["--context-size", "64"], "context_size = 64: embedded-smoke reads rows of its whole "
                               "context, 128 tokens"),
    (["--context-size", "1"], "context_size = 1: a row needs BOS and a token"),
    (["--steps", "100", "--batch", "256", "--dead-tokens", "25600"],  # 100 x 256 = 25,600
     "--dead-tokens = 25,600 is not below the 25,600 tokens trained on \\(--steps x --batch\\): "
     "no latent could count as dead \\(AuxK would never act, dead_train would read 0\\)"),
    (["--dead-tokens", "0"], "--dead-tokens 0: must be >= 1"),
    (["--acts", "{short}", "--context-size", "64"], "--context-size needs --model"),
    (["--dataset", "Skylion007/openwebtext"], "model 'embedded-smoke' and dataset "
     "'Skylion007/openwebtext' disagree: the embedded LMs read dataset 'stdlib'; a hub model "
     "needs a hub dataset"),
])
def test_train_command_line_refuses_bad_settings_before_any_work(args, message, tmp_path,
                                                                  monkeypatch, capsys):
    """`python -m paper_lib.train`: bad settings end in a usage error naming the problem,
    before activations are harvested (with --model, an LM might be trained first)."""
    from safetensors.torch import save_file

    import paper_lib.data.activations as acts_mod
    from paper_lib.train import main

    save_file({"x": torch.zeros(4, 8)}, str(tmp_path / "wrong.safetensors"))
    save_file({"acts": torch.zeros(100, 8)}, str(tmp_path / "short.safetensors"))
    monkeypatch.setattr(acts_mod, "load_activations",
                        lambda *a, **k: pytest.fail("activations loaded before the check"))
    argv = [a.replace("{wrong}", str(tmp_path / "wrong.safetensors"))
            .replace("{short}", str(tmp_path / "short.safetensors")) for a in args]
    with pytest.raises(SystemExit) as exit_info:
        main(argv + ["--model", "embedded-smoke"] * ("--acts" not in args)
             + ["--out", str(tmp_path / "o.json")])
    assert exit_info.value.code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "o.json").exists()


def test_activations_too_large_for_memory_are_refused_before_any_work(tmp_path, monkeypatch):
    """1,000 + 24 activations of width 128 take 1024 * 128 * 4 = 524,288 bytes: refused
    with 0.5 MB of RAM free, before the embedded LM is loaded (let alone trained), naming
    the sizes and the fix; accepted with 0.6 MB free."""
    from paper_lib.data import activations

    monkeypatch.setattr(activations, "available_memory", lambda device: [("RAM", 500_000)])

    def no_lm(*args, **kwargs):
        raise AssertionError("the LM was loaded")
    monkeypatch.setattr(activations, "load_lm", no_lm)
    with pytest.raises(ValueError, match=r"n_tokens = 1,000 \+ n_eval_tokens = 24 activations "
                       r"of width 128 take 0\.5 MB held in memory, more than the 0\.5 MB "
                       r"free RAM: lower n_tokens$"):
        activations.load_activations("embedded-smoke", "stdlib", n_tokens=1000,
                                     n_eval_tokens=24, data_dir=tmp_path, progress=False)
    monkeypatch.setattr(activations, "available_memory", lambda device: [("RAM", 600_000)])
    with pytest.raises(AssertionError, match="the LM was loaded"):  # got past the check
        activations.load_activations("embedded-smoke", "stdlib", n_tokens=1000,
                                     n_eval_tokens=24, data_dir=tmp_path, progress=False)
    # streamed (evaluate), only the 24 x 128 x 4 = 12,288 held-out bytes are held
    kw = dict(n_tokens=1000, n_eval_tokens=24, data_dir=tmp_path, progress=False, stream=True)
    monkeypatch.setattr(activations, "available_memory", lambda device: [("RAM", 12_000)])
    with pytest.raises(ValueError, match=r"^n_eval_tokens = 24 activations of width 128 take "
                                         r".* held in memory, .*: lower n_eval_tokens$"):
        activations.load_activations("embedded-smoke", "stdlib", **kw)
    monkeypatch.setattr(activations, "available_memory", lambda device: [("RAM", 12_300)])
    with pytest.raises(AssertionError, match="the LM was loaded"):
        activations.load_activations("embedded-smoke", "stdlib", **kw)


def _write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_memory_limits_of_control_groups_are_read(tmp_path, monkeypatch):
    """A container's or a batch job's memory limit (cgroup v1 or v2) bounds what a harvest
    may take, where the machine's free RAM does not see it: limit - usage + inactive file
    cache, the tightest of the process's group and the groups above it."""
    from paper_lib.data import activations
    from paper_lib.data.activations import cgroup_free_memory

    proc, root = tmp_path / "cgroup", tmp_path / "fs"
    # v2, a job step with no limit of its own inside a job of 8 GB: 8 - 5 + 1 = 4 GB
    _write(proc, "0::/job/step\n")
    _write(root / "job/memory.max", "8000000000\n")
    _write(root / "job/memory.current", "5000000000\n")
    _write(root / "job/memory.stat", "anon 3000000000\ninactive_file 1000000000\n")
    _write(root / "job/step/memory.max", "max\n")
    _write(root / "job/step/memory.current", "4900000000\n")
    assert cgroup_free_memory(proc, root) == 4_000_000_000
    _write(root / "job/step/memory.max", "4950000000\n")  # tighter below: 4.95 - 4.9 GB
    assert cgroup_free_memory(proc, root) == 50_000_000
    # v2 in a cgroup namespace: "/" is the container's own group, at the root
    _write(proc, "0::/\n")
    _write(root / "memory.max", "3000000000\n")
    _write(root / "memory.current", "1000000000\n")
    assert cgroup_free_memory(proc, root) == 2_000_000_000
    # v1 (SLURM): 2 GB - 1.5 GB used + 0.5 GB reclaimable; "no limit" above it
    _write(proc, "9:cpu,cpuacct:/slurm\n4:memory:/slurm/job_2\n")
    _write(root / "memory/slurm/job_2/memory.limit_in_bytes", "2000000000\n")
    _write(root / "memory/slurm/job_2/memory.usage_in_bytes", "1500000000\n")
    _write(root / "memory/slurm/job_2/memory.stat", "cache 600000000\n"
                                                     "total_inactive_file 500000000\n")
    _write(root / "memory/slurm/memory.limit_in_bytes", "9223372036854771712\n")
    _write(root / "memory/slurm/memory.usage_in_bytes", "1500000000\n")
    assert cgroup_free_memory(proc, root) == 1_000_000_000
    _write(root / "memory/slurm/job_2/memory.limit_in_bytes", "9223372036854771712\n")
    assert cgroup_free_memory(proc, root) is None  # no limit anywhere
    assert cgroup_free_memory(tmp_path / "absent", root) is None
    # the harvest check names the limit when it is the tighter bound
    monkeypatch.setattr(activations, "cgroup_free_memory", lambda: 400_000)
    with pytest.raises(ValueError, match=r"take 0\.5 MB held in memory, more than the 0\.4 MB "
                       r"free RAM under this process's memory limit \(cgroup\)"):
        activations.check_fits(1000, 24, 128, torch.device("cpu"))
