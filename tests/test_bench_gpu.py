"""The benchmark runs end to end (tiny sizes on CPU; JSON schema), and GPU training works
under bf16 autocast (skipped without CUDA)."""

import json

import pytest
import torch

from paper_lib import bench
from paper_lib.sae import SAEConfig, make_sae
from paper_lib.train import ShuffledBatches, TrainConfig, train_saes
from tests.conftest import requires_cuda


@pytest.fixture(scope="module")
def quick_bench(tmp_path_factory):
    """One quick benchmark run (tiny sizes), shared by the tests below."""
    out = tmp_path_factory.mktemp("bench") / "b.json"
    assert bench.main(["--quick", "--out", str(out), "--skip", "profile"]) == 0
    return json.loads(out.read_text())


def test_quick_bench_writes_json(quick_bench):
    rec = quick_bench
    assert {"env", "topk", "harvest"} <= set(rec)
    rows = [r for r in rec["topk"] if r["variant"].startswith("paper_lib sparse")
            and "grads" in r]
    assert {(r["grads"], r["topk"]) for r in rows} == set(bench.STRATEGIES)
    ours = [r for r in rows if r["grads"] != "triton"]  # timed on CUDA only
    assert all(r["error"] == bench.SKIPPED_OFF_CUDA for r in rows if r["grads"] == "triton")
    assert all(r.get("tokens_per_s", 0) > 0 and r["n"] == 2048 for r in ours), ours
    variants = {r["variant"] for r in rec["harvest"]}
    assert variants == {"harvest (fused forward)", "harvest (fused forward, torch.compile)",
                        "harvest (TransformerLens, stop_at_layer=L)",
                        "harvest (TransformerLens, stop_at_layer=L, torch.compile)",
                        "run_with_cache, stop_at_layer=L+1", "full forward"}
    assert all(r["tokens_per_s"] > 0 for r in rec["harvest"]), rec["harvest"]
    assert rec["peaks"]["copy_bytes_per_s"] > 0 and rec["peaks"]["matmul_flop_per_s"] > 0
    assert all(0 < r["fraction_of_floor"] for r in ours)
    table = bench.summary(rec)
    assert "| paper_lib sparse, csr grads, blockmax topk (Adam) | 32 | 2048 | 8 | 256 |" in table
    assert "| harvest (fused forward, torch.compile) (rows 8) |" in table
    assert rec["targets"] == bench.targets(rec["topk"]) and len(rec["targets"]) == 1
    separate, stacked = rec["stack"]  # many SAEs per pass: both sides of one timing
    assert (separate["variant"], stacked["variant"]) == ("2 separate topk steps",
                                                         "stacked topk (one step)")
    assert separate["ks"] == stacked["ks"] == [4, 8] and stacked["speedup"] > 0
    assert all(r["sae_tokens_per_s"] > 0 for r in rec["stack"])
    assert "| stacked topk (one step) | 32 | 512 | 4,8 | 256 |" in table


def test_quick_bench_compiled_step_runs(quick_bench):
    """The torch.compile row timed compiled code (an eager fallback is recorded as its
    error; inductor raised "NotImplementedError: View" on the H100 on 2026-11-24)."""
    row, = [r for r in quick_bench["topk"] if r["variant"] == "paper_lib sparse, torch.compile "
            "(Adam)"]
    assert row.get("tokens_per_s", 0) > 0, row.get("error")


@pytest.mark.parametrize("grads,topk", [("index", "full"), ("gemm", "full"),
                                        ("index", "blockmax")])
def test_profile_step_uses_the_strategy(grads, topk):
    """The profile runs the requested kernels (only gemm's backward holds GemmDecode, only
    blockmax takes block maxima) and the summary labels its rows with them."""
    rows = bench.profile_step(SAEConfig("topk", 16, 256, k=4), 32, torch.device("cpu"),
                              grads=grads, topk=topk, top=200)
    assert rows and all(r["grads"] == grads and r["topk"] == topk and r["batch"] == 32
                        and r["self_us_per_step"] >= 0 for r in rows)
    assert any("GemmDecode" in r["op"] for r in rows) == (grads == "gemm")
    assert any(r["op"] == "aten::amax" for r in rows) == (topk == "blockmax")
    assert f"| {grads}/{topk}/32 | " in bench.summary({"profile": rows})


def test_time_pair_ratio_survives_host_drift(monkeypatch):
    """B takes exactly twice A's time while the host slows 1.5x after every pair of steps
    (timing A's rounds, then B's, would read 2 * 1.5^3 = 6.75): each per-round ratio is
    exactly 2, the medians are those of the drifting times, and the order alternates
    (A B, B A, A B) after the warm-up pair."""
    clock, speed, calls = [0.0], [1.0], []
    monkeypatch.setattr(bench.time, "perf_counter", lambda: clock[0])

    def step(name, cost):
        def run():
            calls.append(name)
            clock[0] += cost * speed[0]
            if len(calls) % 2 == 0:
                speed[0] *= 1.5
        return run

    t = bench.time_pair(step("a", 1.0), step("b", 2.0), torch.device("cpu"), rounds=3, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert t.ratios == pytest.approx([2.0, 2.0, 2.0]) and t.ratio == pytest.approx(2.0)
    assert t.seconds_a == pytest.approx(2.25) and t.seconds_b == pytest.approx(4.5)
    with pytest.raises(ValueError, match="rounds"):
        bench.time_pair(step("a", 1), step("b", 1), torch.device("cpu"), rounds=0)


def test_time_step_pair_runs_real_steps():
    t = bench.time_step_pair(SAEConfig("topk", 16, 64, k=4), SAEConfig("topk", 16, 128, k=4),
                             torch.randn(64, 16), rounds=2, warmup=1)
    assert len(t.ratios) == 2 and t.seconds_a > 0 and t.seconds_b > 0 and t.ratio > 0


@requires_cuda
@pytest.mark.parametrize("arch,compile", [("topk", False), ("batchtopk", False),
                                          ("matryoshka", False), ("topafa", False),
                                          ("relu", False), ("topk", True)])
def test_training_on_cuda_bf16(arch, compile):
    """Every architecture trains on the GPU with bf16 autocast and fp32 master weights
    (TopK also with TrainConfig.compile)."""
    dev = torch.device("cuda")
    g = torch.Generator(device=dev).manual_seed(0)
    dic = torch.nn.functional.normalize(torch.randn(512, 64, device=dev, generator=g), dim=1)
    idx = torch.rand(8192, 512, device=dev, generator=g).argsort(1)[:, :4]
    codes = torch.zeros(8192, 512, device=dev).scatter_(1, idx, 1.0)
    x = codes @ dic
    extra = {"k": 8} if arch in ("topk", "batchtopk", "matryoshka") else {}
    extra.update({"l1_coeff": 1e-3} if arch == "relu" else {})
    sae = make_sae(SAEConfig(arch, 64, 1024, standardize_input=arch == "topafa", **extra)).to(dev)
    res = train_saes([sae], ShuffledBatches(x, 1024), TrainConfig(steps=200, lr=3e-3,
                                                                   compile=compile,
                                                                   progress=False),
                     eval_x=x[:2048], init_x=x[:2048])[0]
    assert sae.W_enc.dtype == torch.float32
    assert res.final["fvu"] < 0.5


def test_step_floor_hand_case():
    """d = n = batch = 1: 4 parameters -> Adam moves 28 B each (112 B) plus 16 B of fp32
    gradients, and the encoder product is 2 FLOP: 128 s at 1 B/s plus 2 s at 1 FLOP/s."""
    peaks = {"copy_bytes_per_s": 1.0, "matmul_flop_per_s": 1.0}
    assert bench.step_floor_seconds(1, 1, 1, peaks) == 130.0
    # d=768, n=32768, batch 4096 at 3 TB/s and 790 TFLOP/s (the H100 figures in KINDS):
    # 50.4 M params * 32 B = 1.61 GB -> 0.537 ms; 206 GFLOP -> 0.261 ms.
    h100 = {"copy_bytes_per_s": 3.0e12, "matmul_flop_per_s": 790e12}
    assert bench.step_floor_seconds(768, 32768, 4096, h100) == pytest.approx(7.98e-4, rel=1e-3)


def test_targets_hand_case():
    """At the target size our fastest TopK row (any strategy, not BatchTopK, not the dense
    reference, not an error row) against eai-sparsify's fastest: 6 / 4 = 1.5x and 6 M tok/s,
    both met; at another size only the ratio applies (0.5: not met), and without
    eai-sparsify neither side's ratio exists."""
    def row(variant, tok, d=768, n=32768, k=32, batch=4096):
        return {"variant": variant, "tokens_per_s": tok, "d": d, "n": n, "k": k, "batch": batch}
    rows = [row("paper_lib sparse (Adam)", 5e6), row("paper_lib sparse, triton grads, "
            "blockmax topk (Adam)", 6e6), row("paper_lib sparse batchtopk (Adam)", 9e6),
            row("naive dense PyTorch (Adam)", 8e6), row("eai-sparsify (signum)", 3e6),
            row("eai-sparsify (adam)", 4e6),
            {"variant": "paper_lib sparse, torch.compile (Adam)",
             "error": "InductorError: NotImplementedError: View\n\nSet TORCHDYNAMO_VERBOSE=1"},
            row("paper_lib sparse (Adam)", 1e6, 2304, 65536, 64),
            row("eai-sparsify (adam)", 2e6, 2304, 65536, 64),
            row("paper_lib sparse (Adam)", 2e6, batch=65536)]
    at, other, alone = bench.targets(rows)
    assert at["ours"] == "paper_lib sparse, triton grads, blockmax topk (Adam)"
    assert at["eai"] == "eai-sparsify (adam)" and at["ratio_to_eai"] == 1.5
    assert at["meets_ratio"] is True and at["meets_tokens_per_s"] is True
    assert (other["d"], other["ratio_to_eai"], other["meets_ratio"]) == (2304, 0.5, False)
    assert other["meets_tokens_per_s"] is None  # not the target size
    assert alone["batch"] == 65536 and alone["eai"] is None and alone["ratio_to_eai"] is None
    assert alone["meets_tokens_per_s"] is False  # 2 M < 5 M
    table = bench.summary({"env": {"gpu": "NVIDIA H200"}, "topk": rows})
    assert "on NVIDIA H200" in table
    assert "| 768 | 32768 | 32 | 4096 | paper_lib sparse, triton grads, blockmax topk (Adam) | " \
           "6.00 | eai-sparsify (adam) | 4.00 | 1.50 | True | True |" in table
    assert "| error: InductorError: NotImplementedError: View Set TORCHDYNAMO" in table  # one row


def test_compile_fallback_is_recorded_not_timed(broken_compiler):
    """A compiler failure during the torch.compile row makes that row an error naming the
    fallback, with the compiler's traceback, instead of eager timings under the compiled
    label."""
    rows = bench.topk_suite(16, 256, 4, 32, torch.device("cpu"), steps=1, warmup=1)
    row, = [r for r in rows if r["variant"] == "paper_lib sparse, torch.compile (Adam)"]
    assert "tokens_per_s" not in row
    assert row["error"].startswith("CompileFallbackWarning: torch.compile failed")
    assert "broken_backend" in row["traceback"]  # the compiler's own frame, for diagnosis
    assert all(r.get("tokens_per_s", 0) > 0 for r in rows if r["variant"].startswith(
        "paper_lib sparse (Adam)"))


@pytest.mark.parametrize("args, message", [
    (["--configs", "768x32768x32"], "give DxNxKxB"),
    (["--configs", "16x256x512x32"], "k <= n"),
    (["--strategies", "triton/topk"], "not a strategy; choose from index/full"),
    (["--stacks", "16x64x4x32x8"], "give [ARCH:]DxNxK1,K2,...xB"),
    (["--stacks", "relu:16x64x4x32"], "'relu' does not stack; choose one of topk"),
    (["--stacks", "16x64x4,128x32"], "every k <= n"),
    (["--steps", "0"], "--steps 0: must be >= 1"),
])
def test_bad_bench_arguments_are_refused_before_any_work(args, message, capsys, monkeypatch):
    """A malformed size, an unknown strategy or no steps end in a usage error naming the
    fix, before the device is measured."""
    monkeypatch.setattr(bench, "device_peaks", lambda *a: pytest.fail("measured anyway"))
    with pytest.raises(SystemExit) as e:
        bench.main(["--quick", *args])
    assert e.value.code == 2 and message in capsys.readouterr().err


@pytest.fixture
def compile_asked(monkeypatch):
    """(d, compile) of each topk_suite that bench.main runs, which then runs uncompiled:
    compiling on 2 cores takes ~15 s, and the compiled row is checked by
    test_quick_bench_compiled_step_runs."""
    asked, real = [], bench.topk_suite

    def uncompiled(*args, compile=True, **kwargs):
        asked.append((args[0], compile))
        return real(*args, compile=False, **kwargs)

    monkeypatch.setattr(bench, "topk_suite", uncompiled)
    return asked


def test_bench_runs_the_chosen_sizes_and_strategies(tmp_path, compile_asked):
    """--configs, --strategies and --stacks time just those, torch.compile asked for at the
    first size only."""
    out = tmp_path / "b.json"
    assert bench.main(["--quick", "--out", str(out), "--skip", "harvest", "profile",
                       "--configs", "16x256x4x32", "8x128x2x16",
                       "--strategies", "index/blockmax",
                       "--stacks", "8x64x2,2,2x16", "matryoshka:8x64x2,4x16"]) == 0
    rec = json.loads(out.read_text())
    assert [(r["arch"], r["n"], r["ks"], r["saes"]) for r in rec["stack"]] == \
        [("topk", 64, [2] * 3, 3)] * 2 + [("matryoshka", 64, [2, 4], 2)] * 2
    assert all(r["sae_tokens_per_s"] > 0 for r in rec["stack"]), rec["stack"]
    assert rec["complete"] and not bench.partial_path(out).exists()
    assert [(r["d"], r["batch"]) for r in rec["topk"] if "grads" in r] == [(16, 32), (8, 16)]
    assert {(r["grads"], r["topk"]) for r in rec["topk"] if "grads" in r} == {("index", "blockmax")}
    assert compile_asked == [(16, True), (8, False)]
    assert all(r.get("tokens_per_s", 0) > 0 for r in rec["topk"]
               if r["variant"].startswith("paper_lib")), rec["topk"]


def test_killed_bench_keeps_finished_suites_beside_the_old_file(tmp_path, monkeypatch,
                                                                compile_asked):
    """A run killed in its second suite (a device's time limit) leaves the first suite's rows
    in <out>.partial.json, marked incomplete, and the earlier finished file untouched."""
    out = tmp_path / "b.json"
    out.write_text('{"old": true}')

    def killed(*a, **k):
        raise KeyboardInterrupt  # not an Exception: what a kill looks like to the loop

    monkeypatch.setattr(bench, "harvest_suite", killed)
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--quick", "--out", str(out), "--skip", "profile",
                    "--strategies", "index/full"])
    assert json.loads(out.read_text()) == {"old": True}
    partial = json.loads(bench.partial_path(out).read_text())
    assert partial["complete"] is False and partial["harvest"] == []
    assert any(r.get("grads") == "index" and r["tokens_per_s"] > 0 for r in partial["topk"])
