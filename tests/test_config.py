"""Notebook parameters: presets, and a clear ValueError for every kind of bad input."""

import pytest
import torch

from paper_lib.config import AFAParams, AmortParams, MatryoshkaParams, Params, TopKParams, lm_preset


def test_presets_and_overrides():
    """Profiles are named presets; overrides win; None keeps the preset."""
    smoke = AmortParams.from_profile("smoke")
    gpu = AmortParams.from_profile("gpu", n_seeds=2, seed=None)
    assert smoke.n_seeds == 3 and gpu.n_seeds == 2 and gpu.sweep_dims
    assert gpu.seed == 0 and gpu.profile == "gpu"


@pytest.mark.parametrize("kwargs, match", [
    ({"n_stesp": 3}, r"unknown parameter\(s\) 'n_stesp'.*allowed: profile"),
    ({"n_seeds": "three"}, r"parameter 'n_seeds' = 'three' \(str\) is invalid: expected int"),
    ({"n_seeds": True}, r"parameter 'n_seeds' = True \(bool\) is invalid"),
    ({"n_seeds": 0}, r"parameter 'n_seeds' = 0 is out of range: must be >= 1"),
    ({"lr": -1e-3}, r"parameter 'lr' = -0.001 is out of range: must be > 0"),
    ({"lr": 0}, r"parameter 'lr' = 0.0 is out of range: must be > 0"),
    ({"k": 20}, r"'k' = 20 exceeds 'n_latents' = 16"),
    ({"mlp_widths": [32, -1]}, r"parameter 'mlp_widths' = \(32, -1\) is out of range"),
    ({"mlp_widths": [32]}, r"'mlp_widths' = \[32\] must include 32 and 256"),
    ({"mlp_widths": [32, 256, 512]}, r"must include 32 and 256.*with none wider"),
    ({"sweep_dims": (8,)}, r"must have equal length"),
    ({"device": "tpu"}, r"parameter 'device' = 'tpu' is invalid"),
    ({"device": "cuda:x"}, r"parameter 'device' = 'cuda:x' is invalid.*'cuda\[:i\]' \(i a GPU"),
    ({"device": "cudaa"}, r"parameter 'device' = 'cudaa' is invalid"),
    ({"device": "cpu:0 "}, r"parameter 'device' = 'cpu:0 ' is invalid"),
])
def test_bad_parameters_raise_clear_errors(kwargs, match):
    """Each bad value names the parameter, the value and what is allowed."""
    with pytest.raises(ValueError, match=match):
        AmortParams.from_profile("smoke", **kwargs)


@pytest.mark.parametrize("cls, kwargs, match", [
    (TopKParams, {"n_values": [128, 256, 256, 512]}, r"'n_values' = \[128, 256, 256, 512\] "
                                                      r"lists 256 twice: .* list it once"),
    (AFAParams, {"afa_lambdas": [1 / 64, 1 / 32, 1 / 64]},
     r"'afa_lambdas' .* lists 0.015625 twice"),
    (AmortParams, {"sweep_dims": [8, 16, 8], "sweep_latents": [16, 32, 16]},
     r"'\(sweep_dims, sweep_latents\)' = \[\(8, 16\), \(16, 32\), \(8, 16\)\] "
     r"lists \(8, 16\) twice"),
    (MatryoshkaParams, {"d_sae": 512, "extra_sizes": [512, 1024], "extra_ks": [16, 32]},
     r"\(d_sae, k\) and \(extra_sizes, extra_ks\).* lists \(512, 16\) twice"),
])
def test_a_sweep_listing_one_setting_twice_is_refused(cls, kwargs, match):
    """A repeated setting would train twice under one name and count twice in fits; lists of
    pairs may repeat one side (M = 16 with N = 32 and 64) but not a whole pair."""
    with pytest.raises(ValueError, match=match):
        cls.from_profile("smoke", **kwargs)
    p = AmortParams.from_profile("smoke", sweep_dims=[8, 16, 16], sweep_latents=[16, 32, 64])
    assert p.sweep_dims == (8, 16, 16)


def test_afa_needs_two_lambdas_for_its_trend():
    with pytest.raises(ValueError, match=r"'afa_lambdas' = \[0.03125\] must hold at least two"):
        AFAParams.from_profile("smoke", afa_lambdas=[1 / 32])


def test_unknown_profile():
    with pytest.raises(ValueError, match=r"'profile' = 'laptop' is invalid: expected one of"):
        AmortParams.from_profile("laptop")


def test_type_coercion():
    """Whole floats become ints, ints become floats, lists become tuples (Papermill's -y)."""
    p = AmortParams.from_profile("smoke", n_seeds=4.0, lr=1, mlp_widths=[32, 64, 256])
    assert p.n_seeds == 4 and isinstance(p.lr, float) and p.mlp_widths == (32, 64, 256)
    with pytest.raises(ValueError, match="expected int"):
        AmortParams.from_profile("smoke", n_seeds=4.5)


def test_list_parameters_written_as_text():
    """`papermill -p sweep_dims "[8, 16]"` hands the notebook the text: it is read as a list;
    text that is not a list says how to write one."""
    p = AmortParams.from_profile("smoke", sweep_dims="[8, 16]", sweep_latents="(16, 32)")
    assert p.sweep_dims == (8, 16) and p.sweep_latents == (16, 32)
    for text in ("8 16", "8"):
        with pytest.raises(ValueError, match=r"expected a list of int \(written as a list: "
                                             r"-p sweep_dims \"\[...\]\""):
            AmortParams.from_profile("smoke", sweep_dims=text, sweep_latents="[16]")
    with pytest.raises(ValueError, match=r"'mlp_widths\[1\]' = 'a' \(str\) is invalid"):
        AmortParams.from_profile("smoke", mlp_widths="[8, 'a']")


def test_from_namespace_like_a_notebook():
    """A notebook's globals: parameters plus imports; an injected typo is refused."""
    import math

    ns = {"profile": "smoke", "n_seeds": 2, "seed": None, "math": math, "AmortParams": AmortParams,
          "_private": 1, "In": [], "Out": {}}
    p = AmortParams.from_namespace(ns)
    assert p.n_seeds == 2
    ns2 = {"profile": "smoke", "n_sedes": 2}
    with pytest.raises(ValueError, match="n_sedes"):
        AmortParams.from_namespace(ns2)


def test_from_namespace_rerun_ignores_later_notebook_variables():
    """Re-running the config cell after later cells defined variables does not fail."""
    ns = {"profile": "smoke", "n_seeds": 2}
    AmortParams.from_namespace(ns)
    ns["results"] = [1, 2]  # defined by a later cell
    assert AmortParams.from_namespace(ns).n_seeds == 2


def test_frozen():
    p = AmortParams.from_profile("smoke")
    with pytest.raises(Exception):
        p.n_seeds = 5


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_gpu_profile_without_cuda_is_refused():
    """profile=gpu on a CPU-only machine: a clear error, unless device='cpu' forces it."""
    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        AmortParams.from_profile("gpu").torch_device()
    assert str(AmortParams.from_profile("gpu", device="cpu").torch_device()) == "cpu"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_notebook_parameters_refuse_a_missing_gpu_before_any_work(monkeypatch):
    """The parameters cell itself refuses profile=gpu without CUDA: notebook 02 would
    otherwise spend minutes on its CPU-side synthetic sweep before first asking for its
    device. The driver refuses before starting any notebook."""
    from paper_lib import reproduce

    with pytest.raises(ValueError, match="needs a CUDA GPU"):
        AmortParams.from_namespace({"profile": "gpu"})
    assert AmortParams.from_namespace({"profile": "gpu", "device": "cpu"}).device == "cpu"
    with pytest.raises(ValueError, match="asked for CUDA but torch sees no GPU"):
        AmortParams.from_namespace({"profile": "smoke", "device": "cuda"})
    started = []
    for name in ("run_parallel", "run_sequential"):
        monkeypatch.setattr(reproduce, name, lambda *a, **k: started.append(a) or [])
    assert reproduce.main(["--profile", "gpu", "--only", "02", "--no-update"]) == 2
    assert reproduce.main(["--profile", "smoke", "-p", "device", "cuda:0", "--only", "02",
                           "--no-update"]) == 2
    assert started == []
    # the check itself lets a valid run through to the runners
    assert reproduce.main(["--profile", "gpu", "-p", "device", "cpu", "--only", "02",
                           "--no-update", "--no-scoreboard"]) == 0
    assert len(started) == 1


def test_driver_refuses_bad_parameters_before_preparing_or_starting_anything(monkeypatch, capsys):
    """`reproduce -p ...` checks each selected notebook's parameters as its parameters cell
    would, before the LM is prepared (minutes at gpu) or a kernel starts."""
    from paper_lib import reproduce

    started = []
    for name in ("run_parallel", "run_sequential", "refresh_if_stale"):
        monkeypatch.setattr(reproduce, name, lambda *a, **k: started.append(a) or [])
    assert reproduce.main(["--only", "03", "-p", "n_values", "[128, 256, 256]",
                           "--no-update"]) == 2
    assert "03_topk_scaling: parameter 'n_values' = [128, 256, 256] lists 256 twice" in \
        capsys.readouterr().err
    # a parameter one of the selected notebooks lacks is refused for that notebook
    assert reproduce.main(["--only", "01", "03", "-p", "n_values", "[128, 256, 512]",
                           "--no-update"]) == 2
    err = capsys.readouterr().err
    assert "01_afa_bound: unknown parameter(s) 'n_values' for AFAParams" in err
    assert err.rstrip().endswith("(of these notebooks, 03 take them all: --only 03)")
    assert started == []
    assert reproduce.main(["--only", "03", "-p", "n_values", "[256, 512, 1024, 2048]",
                           "--no-update", "--no-scoreboard"]) == 0
    assert len(started) == 2  # the kernel check, then the runner


def test_a_cuda_index_beyond_the_machine_is_refused(monkeypatch):
    """device='cuda:3' on a one-GPU machine: named at once, not as a CUDA error later."""
    from paper_lib.runtime import pick_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(ValueError, match=r"torch sees 1 GPU\(s\), numbered from 0"):
        pick_device("cuda:3")
    assert str(pick_device("cuda:0")) == "cuda:0"


def test_auto_is_the_cpu_at_smoke_even_on_a_gpu_machine(monkeypatch, tmp_path):
    """smoke is the CPU reference: on a machine with a GPU, 'auto' must not move it to CUDA
    (its records and nbval's checked outputs are CPU results, and CUDA runs in bf16);
    asking for CUDA still works, and the other profiles' 'auto' still picks the GPU. The
    record names the device the run used."""
    from paper_lib.claims import Run
    from paper_lib.config import check_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert str(AmortParams.from_profile("smoke").torch_device()) == "cpu"
    assert str(check_device("smoke", "cuda")) == "cuda"
    assert str(check_device("gpu", "auto")) == "cuda"
    assert str(check_device("paper", "auto")) == "cuda"
    monkeypatch.setattr("paper_lib.claims.env_info", lambda dev, git=None: {"device": str(dev)})
    run = Run("99_test", AmortParams.from_profile("smoke"), root=tmp_path)
    assert run.record()["env"]["device"] == "cpu"


def test_a_malformed_device_string_is_refused_by_the_commands_too():
    """The train and evaluate commands' --device goes through pick_device: a string torch
    cannot parse is a ValueError (their usage error), not torch's RuntimeError later."""
    from paper_lib.runtime import pick_device

    for bad in ("cuda:x", "cudaa", "gpu", "cuda:"):
        with pytest.raises(ValueError, match=rf"device='{bad}' is not 'auto', 'cpu' or"):
            pick_device(bad)
    assert str(pick_device("cpu")) == "cpu"


def test_lm_preset_is_complete():
    """`reproduce --prepare` builds LMParams itself from lm_preset: it trains no SAE, so
    the dead-latent window's bound (steps x batch_size) does not apply to it."""
    from paper_lib.config import LMParams

    for prof in ("smoke", "gpu", "paper"):
        assert {"model", "dataset", "n_tokens", "batch_size"} <= set(lm_preset(prof))
        assert LMParams(profile=prof, **lm_preset(prof)).dead_window == \
            {"smoke": 50_000, "gpu": 1_000_000, "paper": 10_000_000}[prof]


def test_row_lengths_known_before_the_lm_are_the_lms():
    """config's row lengths, used before an LM is loaded, are the embedded LMs' contexts;
    context_size 0 passes None to load_activations (the hub default)."""
    from paper_lib.config import EMBEDDED_CONTEXT
    from paper_lib.data.lm import EMBEDDED_LMS

    assert EMBEDDED_CONTEXT == {name: cfg.n_ctx for name, cfg in EMBEDDED_LMS.items()}
    assert TopKParams.from_profile("paper").row_tokens is None
    assert TopKParams.from_profile("paper", context_size=64).row_tokens == 64


def test_ce_rows_at_most_the_held_out_rows():
    """At smoke, rows of 128 tokens hold 127 activations (BOS gives none): 16,384 held-out
    tokens fill 130 rows (127 x 129 = 16,383, one short), so ce_rows 130 is allowed and 131
    refused; at the paper preset with rows of 1024, 262,144 tokens fill 257 rows (1023 x 256
    = 261,888)."""
    assert TopKParams.from_profile("smoke", ce_rows=130).ce_rows == 130
    with pytest.raises(ValueError, match=r"'ce_rows' = 131 exceeds the 130 held-out token "
                                         r"rows \(n_eval_tokens = 16,384 in rows of 128"):
        TopKParams.from_profile("smoke", ce_rows=131)
    assert MatryoshkaParams.from_profile("paper", context_size=1024, ce_rows=257).ce_rows == 257
    with pytest.raises(ValueError, match="exceeds the 257 held-out token rows"):
        AFAParams.from_profile("paper", context_size=1024, ce_rows=258)


def test_base_params_describe_lists_every_field():
    text = Params.from_profile("smoke").describe()
    assert "profile = 'smoke'" in text and "device = 'auto'" in text
