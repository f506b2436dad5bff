"""Failure paths: a training process killed mid-run resumes to the same result, a notebook
reruns to identical claims, and pickles are never executed on load."""

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from paper_lib.runtime import PROJECT_ROOT
from paper_lib.sae import SAEConfig, load_sae, make_sae, save_sae
from paper_lib.sae.io import WEIGHTS_FILE

TRAIN = [sys.executable, "-m", "paper_lib.train", "--steps", "2500", "--checkpoint-every", "100"]


def _run(args, **kw):
    return subprocess.run(TRAIN + args, cwd=PROJECT_ROOT, capture_output=True, text=True,
                          timeout=300, **kw)


def test_sigkill_then_resume_matches_uninterrupted(tmp_path):
    """Kill a real training process with SIGKILL after a checkpoint; rerunning the same
    command resumes and ends with the same metrics and bit-identical weights as a run that
    was never interrupted; no temporary or partial file is left behind."""
    ref = _run(["--checkpoint", str(tmp_path / "ref.pt"), "--out", str(tmp_path / "ref.json")])
    assert ref.returncode == 0, ref.stderr
    ck = tmp_path / "ck" / "run.pt"
    proc = subprocess.Popen(TRAIN + ["--checkpoint", str(ck), "--out",
                                     str(tmp_path / "run.json")], cwd=PROJECT_ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not ck.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    assert ck.exists(), "no checkpoint appeared before the run ended"
    time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (tmp_path / "run.json").exists()
    resumed = _run(["--checkpoint", str(ck), "--out", str(tmp_path / "run.json")])
    assert resumed.returncode == 0, resumed.stderr
    a = json.loads((tmp_path / "ref.json").read_text())
    b = json.loads((tmp_path / "run.json").read_text())
    assert b["weights_sha256"] == a["weights_sha256"]
    for key in ("fvu", "l0", "dead_eval", "dead_train"):
        assert abs(a["final"][key] - b["final"][key]) <= 1e-6
    leftovers = [p.name for p in ck.parent.iterdir()]
    assert leftovers == [], f"files left in the checkpoint folder: {leftovers}"


class _Boom:
    """A payload that would create a file if unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def test_crafted_pickles_are_refused(tmp_path):
    """A pickle disguised as SAE weights or as a checkpoint is rejected and never runs."""
    marker = tmp_path / "marker.txt"
    payload = pickle.dumps(_Boom(marker))
    d = save_sae(make_sae(SAEConfig("topk", 8, 16, k=2)), tmp_path / "sae")
    (d / WEIGHTS_FILE).write_bytes(payload)
    with pytest.raises(ValueError, match="corrupt or truncated"):
        load_sae(d)
    ck = tmp_path / "ck.pt"
    torch.save({"key": _Boom(marker)}, ck)
    from paper_lib.train import ShuffledBatches, TrainConfig, train_saes

    with pytest.raises(ValueError, match="cannot be read safely"):
        train_saes([make_sae(SAEConfig("topk", 8, 16, k=2))],
                   ShuffledBatches(torch.randn(64, 8), 32),
                   TrainConfig(steps=2, checkpoint_every=1, checkpoint_path=str(ck),
                               progress=False))
    assert not marker.exists(), "a pickle payload was executed"


def _run_notebook(out_root: Path) -> dict:
    import papermill as pm

    out_root.mkdir(parents=True)
    env_before = os.environ.get("PAPER_LIB_OUTPUT_ROOT")
    os.environ["PAPER_LIB_OUTPUT_ROOT"] = str(out_root)
    try:
        from paper_lib.reproduce import kernel_name

        pm.execute_notebook(str(PROJECT_ROOT / "notebooks" / "02_amortisation_gap.ipynb"),
                            str(out_root / "out.ipynb"), kernel_name=kernel_name(),
                            parameters={"n_seeds": 2, "train_steps": 300, "sc_steps": 300,
                                        "ito_steps": 100, "workers": 2, "lm_gap": False,
                                        "progress": False},
                            progress_bar=False, log_output=False,
                            cwd=str(PROJECT_ROOT / "notebooks"))
    finally:
        if env_before is None:
            os.environ.pop("PAPER_LIB_OUTPUT_ROOT", None)
        else:
            os.environ["PAPER_LIB_OUTPUT_ROOT"] = env_before
    # reduced sizes: a custom run, kept apart from the smoke reference results
    assert not (out_root / "results" / "smoke").exists()
    return json.loads((out_root / "results" / "smoke-custom" / "02_amortisation_gap.json")
                      .read_text())


@pytest.mark.slow
def test_notebook_rerun_gives_identical_claims(tmp_path):
    """Two Papermill runs of notebook 02 (reduced sizes, outputs redirected away from the
    committed results) give identical claims and metrics; only timings and env differ."""
    from paper_lib.claims import comparable

    first = _run_notebook(tmp_path / "a")
    second = _run_notebook(tmp_path / "b")
    assert first["claims"] and comparable(first) == comparable(second)
    assert not (PROJECT_ROOT / "results" / "smoke" / "out.ipynb").exists()


def test_cpu_training_switches_on_deterministic_kernels():
    """CPU runs use torch's deterministic kernels; CUDA runs keep the fast ones."""
    from paper_lib.runtime import deterministic_on_cpu

    before = torch.are_deterministic_algorithms_enabled()
    try:
        torch.use_deterministic_algorithms(False)
        deterministic_on_cpu("cuda")
        assert not torch.are_deterministic_algorithms_enabled()
        deterministic_on_cpu(torch.device("cpu"))
        assert torch.are_deterministic_algorithms_enabled()
    finally:
        torch.use_deterministic_algorithms(before)


def test_lm_training_is_bit_identical_across_threads(tiny_corpus):
    """The same LM trained twice with 2 threads and once with 1 gives the same weights
    under the kernel's pinned CPU numerics (without the deterministic kernels, two 2-thread
    trainings of the smoke LM differed; without MKL's strict mode, 1- and 2-thread ones)."""
    from paper_lib.data.lm import LMConfig, train_lm

    # the smoke LM's width: smaller tensors stay under the kernels' parallel grain size
    cfg = LMConfig("tiny-det", n_layers=1, d_model=128, n_heads=4, n_ctx=128, steps=4,
                   batch_rows=32, warmup=2)
    threads = torch.get_num_threads()
    weights = []
    try:
        for n in (2, 2, 1):
            torch.set_num_threads(n)
            model, _ = train_lm(cfg, tiny_corpus, "cpu", progress=False)
            weights.append([p.detach().clone() for p in model.parameters()])
    finally:
        torch.set_num_threads(threads)
    for other in weights[1:]:
        assert all(torch.equal(a, b) for a, b in zip(weights[0], other))


def test_interrupted_lm_training_resumes_to_the_same_weights(tiny_corpus, tmp_path,
                                                             monkeypatch):
    """The embedded LM's training dies after 3 of 8 steps; its checkpoint (written every
    step here, every minute by default) resumes it to the weights an uninterrupted run
    gets, bit for bit, and is removed once training ends, with any half-written temporary
    file beside it."""
    from paper_lib.data import lm

    cfg = lm.LMConfig("tiny-ckpt", n_layers=1, d_model=32, n_heads=2, n_ctx=32, steps=8,
                      batch_rows=8, warmup=2)
    ref, _ = lm.train_lm(cfg, tiny_corpus, "cpu", progress=False)
    ck = tmp_path / "ckpt" / "lm.pt"
    real, calls = lm.fused_lm_loss, []

    def dies_at_step_4(model, batch):
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt
        return real(model, batch)

    monkeypatch.setattr(lm, "fused_lm_loss", dies_at_step_4)
    with pytest.raises(KeyboardInterrupt):
        lm.train_lm(cfg, tiny_corpus, "cpu", progress=False, checkpoint=ck,
                    checkpoint_seconds=0)
    assert torch.load(ck, weights_only=True)["step"] == 3
    (ck.parent / f".{ck.name}.x1y2.tmp").write_bytes(b"half")  # a write cut by SIGKILL
    monkeypatch.setattr(lm, "fused_lm_loss", lambda model, batch: calls.append(1)
                        or real(model, batch))
    # at the default minute no write follows in 5 steps to sweep the temporary file away
    resumed, manifest = lm.train_lm(cfg, tiny_corpus, "cpu", progress=False, checkpoint=ck)
    assert len(calls) == 4 + 5  # the resumed run trained steps 4 to 8 only
    for (name, a), b in zip(ref.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert not ck.exists() and list(ck.parent.iterdir()) == []
    assert manifest["train_seconds"] >= 0
    # a checkpoint of another run is refused with what to do, not silently mixed in
    other = lm.LMConfig("tiny-ckpt", n_layers=1, d_model=32, n_heads=2, n_ctx=32, steps=8,
                        batch_rows=8, warmup=2, seed=1)
    opt = torch.optim.AdamW(resumed.parameters())
    lm._save_checkpoint(ck, lm._checkpoint_key(other, tiny_corpus, torch.device("cpu")), 3,
                        0.0, resumed, opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1),
                        torch.Generator())
    with pytest.raises(ValueError, match="belongs to another configuration.*delete it"):
        lm.train_lm(cfg, tiny_corpus, "cpu", progress=False, checkpoint=ck)


@pytest.fixture
def python_sigint():
    """SIGINT handled by Python's own handler, as in a terminal or a Jupyter cell: a test
    run started in the background (make test runs the unit tests so) has it ignored."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


def test_ctrl_c_stops_lm_training_after_its_step_with_a_checkpoint(tiny_corpus, tmp_path,
                                                                   monkeypatch, python_sigint):
    """Ctrl-C in the embedded LM's training: the step under way ends and is checkpointed
    (none due at the default minute), and the rerun ends with the uninterrupted weights; at
    the last step and in the final evaluation too (the rerun then trains no step)."""
    from paper_lib.data import lm

    cfg = lm.LMConfig("tiny-ctrl-c", n_layers=1, d_model=32, n_heads=2, n_ctx=32, steps=8,
                      batch_rows=8, warmup=2)
    ref, _ = lm.train_lm(cfg, tiny_corpus, "cpu", progress=False)
    ck, real, calls = tmp_path / "lm.pt", lm.fused_lm_loss, []
    for at in (4, 8):  # a middle step, the last
        calls.clear()

        def ctrl_c_in_a_step(model, batch, at=at):
            calls.append(1)
            if len(calls) == at:
                os.kill(os.getpid(), signal.SIGINT)
            return real(model, batch)
        monkeypatch.setattr(lm, "fused_lm_loss", ctrl_c_in_a_step)
        with pytest.raises(KeyboardInterrupt):
            lm.train_lm(cfg, tiny_corpus, "cpu", progress=False, checkpoint=ck)
        assert torch.load(ck, weights_only=True)["step"] == at
        resumed, _ = lm.train_lm(cfg, tiny_corpus, "cpu", progress=False, checkpoint=ck)
        assert len(calls) == 8 and not ck.exists()
        for (name, a), b in zip(ref.state_dict().items(), resumed.state_dict().values()):
            assert torch.equal(a, b), name
    # in the final evaluation (bits per byte, after the last step): the evaluation ends,
    # the trained weights are checkpointed, then it stops; the rerun trains no step
    real_bpb = lm.bits_per_byte

    def ctrl_c_in_evaluation(model, tokens):
        os.kill(os.getpid(), signal.SIGINT)
        return real_bpb(model, tokens)
    monkeypatch.setattr(lm, "fused_lm_loss", lambda model, batch: calls.append(1)
                        or real(model, batch))
    monkeypatch.setattr(lm, "bits_per_byte", ctrl_c_in_evaluation)
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        lm.train_lm(cfg, tiny_corpus, "cpu", progress=False, checkpoint=ck)
    assert len(calls) == 8 and torch.load(ck, weights_only=True)["step"] == 8
    monkeypatch.setattr(lm, "bits_per_byte", real_bpb)
    resumed, manifest = lm.train_lm(cfg, tiny_corpus, "cpu", progress=False, checkpoint=ck)
    assert len(calls) == 8 and not ck.exists() and manifest["val_bits_per_byte"] > 0
    for (name, a), b in zip(ref.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_interrupted_streamed_training_resumes_on_one_fill(tmp_path, monkeypatch):
    """At the paper profile activations stream from the LM, a buffer (here 4 batches) at a
    time. A run that dies at step 9 resumes from its step-8 checkpoint to the weights of an
    uninterrupted run, and runs the LM on the one fill holding step 8 (steps 8-11), not on
    the two fills it had trained on before (hub stand-ins: tests/standin_hub.py)."""
    from paper_lib.data import activations
    from paper_lib.data import harvest as hv
    from paper_lib.data.activations import load_activations
    from paper_lib.train import TrainConfig, train_saes
    from tests import standin_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data, _ = standin_hub.patch(tmp_path / "hub", monkeypatch.setattr)
    monkeypatch.setattr(activations, "STREAM_FILL_TOKENS", 256)  # 2 M at full scale
    acts = load_activations("standin-gpt2", "text", "", n_tokens=768, n_eval_tokens=128,
                            progress=False, data_dir=tmp_path, batch_rows=4,
                            data_files=str(data), stream=True)
    stream = acts.batches(64, 0)
    assert (stream.buffer_tokens, stream.epoch_fills) == (256, 3)  # 768 tokens, 3 fills
    cfg = SAEConfig("topk", acts.d, 64, k=4)
    ck = tmp_path / "ck.pt"
    tc = TrainConfig(steps=12, checkpoint_every=4, checkpoint_path=str(ck), progress=False)
    full = train_saes([make_sae(cfg)], acts.batches(64, 0), TrainConfig(steps=12,
                      progress=False))[0].sae

    class DiesAtStep9:
        batch_size = 64

        def __init__(self):
            self.inner = acts.batches(64, 0)

        def batch(self, step):
            if step == 9:
                raise KeyboardInterrupt
            return self.inner.batch(step)

    with pytest.raises(KeyboardInterrupt):
        train_saes([make_sae(cfg)], DiesAtStep9(), tc)
    assert torch.load(ck, weights_only=True)["step"] == 8
    harvested, real = [], hv.harvest
    monkeypatch.setattr(hv, "harvest", lambda *a, **k: harvested.append(a[3]) or real(*a, **k))
    resumed = train_saes([make_sae(cfg)], acts.batches(64, 0), tc)[0].sae
    assert harvested == [256]
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_trained_saes_outlive_an_interruption_until_the_record(tmp_path, monkeypatch):
    """A notebook interrupted after `train_on` finished (in its analyses) loses no training:
    the rerun's train_on reads the trained SAEs from the kept checkpoint without reading a
    batch, unless the data or the training code changed since; the notebook's `Run.finish`
    then removes the checkpoint."""
    from paper_lib.claims import Run
    from paper_lib.config import TopKParams
    from paper_lib.data.activations import load_activations
    from paper_lib.experiments import common
    from tests import standin_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    data, _ = standin_hub.patch(tmp_path / "hub", monkeypatch.setattr)
    monkeypatch.setattr(common, "CKPT_ROOT", tmp_path / "ckpt")
    acts = load_activations("standin-gpt2", "text", "", n_tokens=1024, n_eval_tokens=128,
                            progress=False, data_dir=tmp_path, batch_rows=4,
                            data_files=str(data))
    cfgs = [SAEConfig("topk", acts.d, 64, k=k) for k in (2, 4)]

    def train():
        return common.train_on(acts, cfgs, steps=12, batch_size=64, lr=1e-3,
                               device=torch.device("cpu"), progress=False)
    first = train()
    kept = list((tmp_path / "ckpt").iterdir())
    assert len(kept) == 1

    class NoBatches:
        batch_size = 64

        def batch(self, step):
            raise AssertionError("the rerun read training batches")
    monkeypatch.setattr(acts, "batches", lambda batch_size, seed: NoBatches())
    again = train()
    for a, b in zip(first, again):
        assert torch.equal(a.sae.W_enc, b.sae.W_enc) and a.history == b.history
    # Nor SAEs trained on other data (here 64 fewer training tokens) or by other training
    # code: the rerun trains
    fewer = load_activations("standin-gpt2", "text", "", n_tokens=960, n_eval_tokens=128,
                             progress=False, data_dir=tmp_path, batch_rows=4,
                             data_files=str(data))
    monkeypatch.setattr(fewer, "batches", lambda batch_size, seed: NoBatches())
    with pytest.raises(AssertionError, match="read training batches"):
        common.train_on(fewer, cfgs, steps=12, batch_size=64, lr=1e-3,
                        device=torch.device("cpu"), progress=False)
    monkeypatch.setattr(common, "training_code_sha", lambda: "edited trainer")
    with pytest.raises(AssertionError, match="read training batches"):
        train()
    Run("03_topk_scaling", TopKParams.from_profile("smoke"), root=tmp_path).finish()
    assert list((tmp_path / "ckpt").iterdir()) == []


_CALLS: list[int] = []
_INTERRUPT_AT: set[int] = set()


def _seed_task(params, seed):
    """A stand-in for one of notebook 02's seed tasks: an SAE, a NumPy grid, NumPy and plain
    scalars, a trace of tuples."""
    _CALLS.append(seed)
    if seed in _INTERRUPT_AT:
        raise KeyboardInterrupt
    import numpy as np

    sae = make_sae(SAEConfig("relu", 4, 8, seed=seed, freeze_decoder=True)).eval()
    return {"sae": sae, "grid": np.arange(3.0) * seed, "mcc": np.float64(seed / 8),
            "trace": [(0, params.l1), (10, 0.5)]}


def test_finished_seed_tasks_outlive_an_interruption(tmp_path, monkeypatch):
    """Notebook 02's seed tasks (`run_tasks`): those finished before an interruption are read
    back on the rerun, equal to what they returned, and only the rest run; a task with other
    arguments or run by edited code runs again; the notebook's record removes them."""
    import numpy as np

    from paper_lib.claims import Run
    from paper_lib.config import AmortParams
    from paper_lib.experiments import amortisation as am
    from paper_lib.experiments import common

    monkeypatch.setattr(common, "CKPT_ROOT", tmp_path / "ckpt")
    p = AmortParams.from_profile("smoke")
    tasks = [(_seed_task, (p, s), {}) for s in range(3)]
    monkeypatch.setattr(sys.modules[__name__], "_INTERRUPT_AT", {2})
    _CALLS.clear()
    with pytest.raises(KeyboardInterrupt):
        am.run_tasks(tasks, workers=1, progress=False)
    assert len(list((tmp_path / "ckpt" / "tasks").iterdir())) == 2
    monkeypatch.setattr(sys.modules[__name__], "_INTERRUPT_AT", set())
    _CALLS.clear()
    # workers and progress bars leave results unchanged: a rerun may change them
    again = am.run_tasks([(f, (p.replace(workers=1, progress=False), s), kw)
                          for f, (_, s), kw in tasks], workers=1, progress=False)
    assert _CALLS == [2]
    for s, got in enumerate(again):
        want = _seed_task(p, s)
        assert type(got["sae"]) is type(want["sae"]) and not got["sae"].training
        assert not got["sae"].W_dec.requires_grad  # the config's frozen decoder
        for name, w in want["sae"].state_dict().items():
            assert torch.equal(got["sae"].state_dict()[name], w)
        assert got["grid"].dtype == np.float64 and np.array_equal(got["grid"], want["grid"])
        assert got["mcc"] == s / 8 and got["trace"] == [(0, 0.01), (10, 0.5)]
    _CALLS.clear()
    am.run_tasks([(_seed_task, (p.replace(l1=0.02), 0), {})], workers=1, progress=False)
    monkeypatch.setattr(common, "code_sha", lambda *files: "edited")
    am.run_tasks(tasks[:1], workers=1, progress=False)
    assert _CALLS == [0, 0]
    Run("02_amortisation_gap", p, root=tmp_path).finish()
    assert list((tmp_path / "ckpt" / "tasks").iterdir()) == []
    # a file found, then released by another run of the same tasks before it was read: run
    monkeypatch.setattr(am, "has_checkpoint", lambda path: True)
    _CALLS.clear()
    am.run_tasks(tasks[:1], workers=1, progress=False)
    assert _CALLS == [0]


def test_seed_tasks_in_worker_processes_are_kept(tmp_path, monkeypatch):
    """With worker processes the parent keeps each result as it arrives."""
    from paper_lib.experiments import amortisation as am
    from paper_lib.experiments import common

    monkeypatch.setattr(common, "CKPT_ROOT", tmp_path / "ckpt")
    tasks = [(am.mean_std, ([1.0, 3.0],), {}), (am.mean_std, ([2.0],), {})]
    assert am.run_tasks(tasks, workers=2, progress=False) == [(2.0, 2 ** 0.5), (2.0, 0.0)]
    assert sorted(am.task_path(t).name for t in tasks) == sorted(
        f.name for f in (tmp_path / "ckpt" / "tasks").iterdir())
    monkeypatch.setattr(am, "_run_task", lambda task: pytest.fail("a finished task ran"))
    assert am.run_tasks(tasks, workers=2, progress=False) == [(2.0, 2 ** 0.5), (2.0, 0.0)]


def _fail_first(i):
    if i == 0:
        raise RuntimeError("task 0 failed")
    time.sleep(1.0)
    return i


def test_worker_tasks_running_at_a_failure_are_kept_and_the_rest_dropped(tmp_path, monkeypatch):
    """When a task fails (or the notebook is interrupted) with tasks in worker processes,
    those already running finish and are kept for the rerun; those not started are dropped
    rather than all run first (the process pool's own way out), their results lost."""
    from paper_lib.experiments import amortisation as am
    from paper_lib.experiments import common

    monkeypatch.setattr(common, "CKPT_ROOT", tmp_path / "ckpt")
    tasks = [(_fail_first, (i,), {}) for i in range(8)]
    with pytest.raises(RuntimeError, match="task 0 failed"):
        am.run_tasks(tasks, workers=2, progress=False)
    kept = {f.name for f in (tmp_path / "ckpt" / "tasks").iterdir()}
    assert am.task_path(tasks[1]).name in kept  # running beside task 0
    assert am.task_path(tasks[7]).name not in kept  # never started


def _interrupted(i):
    os.kill(os.getpid(), signal.SIGINT)  # as Ctrl-C or a Jupyter interrupt signals the group
    time.sleep(0.2)
    return i


def test_worker_tasks_leave_interrupts_to_the_notebook(tmp_path, monkeypatch):
    """An interrupt reaches the worker processes too (it signals the process group): they
    finish their task, whose result the notebook's process keeps, instead of dying in it."""
    from paper_lib.experiments import amortisation as am
    from paper_lib.experiments import common

    monkeypatch.setattr(common, "CKPT_ROOT", tmp_path / "ckpt")
    tasks = [(_interrupted, (i,), {}) for i in range(2)]
    try:
        got = am.run_tasks(tasks, workers=2, progress=False)
    except KeyboardInterrupt:  # raised in a worker and passed on: not a user's Ctrl-C
        pytest.fail("the interrupt stopped a worker's task")
    assert got == [0, 1]


def test_ctrl_c_stops_training_after_its_step_with_a_checkpoint(tmp_path, python_sigint):
    """Ctrl-C (SIGINT) during training stops it once the step under way is done, with a
    checkpoint of that step (none due otherwise), so the rerun ends with the weights of an
    uninterrupted run; a second Ctrl-C stops at once, checkpointing nothing half done. One
    at the last step or during the final evaluation stops once that evaluation is done and
    the finished training is kept (a notebook's), which the rerun reads; where finished
    training is not kept (the command line saves its results), training just ends."""
    from paper_lib.train import ShuffledBatches, TrainConfig, train_saes

    class CtrlC(ShuffledBatches):  # presses Ctrl-C `times` times while reading batch `at`
        def __init__(self, x, at, times=1):
            super().__init__(x, 128)
            self.at, self.times = at, times

        def batch(self, step):
            for _ in range(self.times if step == self.at else 0):
                os.kill(os.getpid(), signal.SIGINT)
            return super().batch(step)

    x = torch.randn(2048, 16, generator=torch.Generator().manual_seed(0))
    cfgs = [SAEConfig("topk", 16, 64, k=4, seed=s) for s in (0, 1)]

    def run(data, path=None, keep=False, eval_fn=None):
        tc = TrainConfig(steps=30, lr=1e-3, progress=False, keep_finished=keep,
                         checkpoint_path=str(path) if path else None,
                         checkpoint_seconds=3600 if path else 0)
        return train_saes([make_sae(c) for c in cfgs], data, tc, init_x=x[:256],
                          eval_fn=eval_fn)
    ref = run(ShuffledBatches(x, 128))
    with pytest.raises(KeyboardInterrupt):
        run(CtrlC(x, at=11), tmp_path / "a.pt")
    assert torch.load(tmp_path / "a.pt", weights_only=True)["step"] == 12
    for want, got in zip(ref, run(ShuffledBatches(x, 128), tmp_path / "a.pt")):
        assert torch.equal(want.sae.W_enc, got.sae.W_enc)
        assert torch.equal(want.sae.W_dec, got.sae.W_dec)
    with pytest.raises(KeyboardInterrupt):
        run(CtrlC(x, at=5, times=2), tmp_path / "b.pt")
    assert not (tmp_path / "b.pt").exists()
    with pytest.raises(KeyboardInterrupt):
        run(CtrlC(x, at=29), tmp_path / "c.pt", keep=True)
    assert torch.load(tmp_path / "c.pt", weights_only=True)["finished"]
    last = run(ShuffledBatches(x, 128), tmp_path / "c.pt", keep=True)
    assert torch.equal(last[0].sae.W_enc, ref[0].sae.W_enc)
    pressed = []

    def ctrl_c_in_final_eval(sae):
        if not pressed:
            pressed.append(os.kill(os.getpid(), signal.SIGINT))
        return {"evaluated": 1.0}
    with pytest.raises(KeyboardInterrupt):
        run(ShuffledBatches(x, 128), tmp_path / "d.pt", keep=True, eval_fn=ctrl_c_in_final_eval)
    kept = torch.load(tmp_path / "d.pt", weights_only=True)
    assert kept["finished"] and [h[-1]["evaluated"] for h in kept["history"]] == [1.0, 1.0]
    absorbed = run(CtrlC(x, at=29), tmp_path / "e.pt")
    assert torch.equal(absorbed[0].sae.W_enc, ref[0].sae.W_enc)
    assert not (tmp_path / "e.pt").exists()
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_run_ends_naming_the_checkpoints_left_behind(tmp_path):
    """After a run, the checkpoints still under data/ckpt (interrupted runs', runs' with
    other parameters: a finished notebook removes its own) are counted with their size and
    the newest one's time, saying how to resume or free them; none, no line."""
    import time

    from paper_lib.reproduce import leftover_checkpoints

    root = tmp_path / "ckpt"
    assert leftover_checkpoints(root) is None
    (root / "tasks").mkdir(parents=True)
    assert leftover_checkpoints(root) is None
    (root / "a.pt").write_bytes(b"x" * 1_500_000)
    (root / "tasks" / "b.pt").write_bytes(b"x" * 500_000)
    (root / "notes.txt").write_text("not a checkpoint")
    stamp = time.mktime((2026, 12, 7, 14, 50, 0, 0, 0, -1))
    os.utime(root / "tasks" / "b.pt", (stamp, stamp))
    os.utime(root / "a.pt", (stamp - 3600, stamp - 3600))
    line = leftover_checkpoints(root)
    assert "holds 2 checkpoint(s) of interrupted runs or runs with other parameters (2.0 MB, "\
        "newest 2026-12-07 14:50): rerunning such a run resumes it; delete " in line


def test_atomic_writes_get_the_usual_permissions(tmp_path):
    """Files and folders written atomically get the mode a plain write would (mkstemp
    and mkdtemp alone would leave them private to the owner), also when they replace a
    private file written before."""
    from paper_lib.runtime import atomic_dir, atomic_write_text

    old = os.umask(0o027)
    try:
        atomic_write_text(tmp_path / "new.json", "{}")
        assert (tmp_path / "new.json").stat().st_mode & 0o777 == 0o640
        (tmp_path / "old.json").write_text("")
        (tmp_path / "old.json").chmod(0o600)
        atomic_write_text(tmp_path / "old.json", "{}")
        assert (tmp_path / "old.json").stat().st_mode & 0o777 == 0o640
        with atomic_dir(tmp_path / "cache") as tmp:
            (tmp / "a").write_text("x")
        assert (tmp_path / "cache").stat().st_mode & 0o777 == 0o750
    finally:
        os.umask(old)


@pytest.mark.skipif("avx2" not in __import__("paper_lib.kernelspec").kernelspec.cpu_flags(),
                    reason="no CPU numerics to pin on a CPU without AVX2")
def test_train_command_runs_in_the_notebooks_numerics(tmp_path):
    """Started from a shell without the kernel's pins, `python -m paper_lib.train` re-executes
    itself with them (so an LM it trains and caches is the one the notebooks read) and
    records them; its weights equal those of a run started pinned."""
    from paper_lib.kernelspec import PINNED_ENV, PINNED_KEYS, pinned_cpu_env

    args = ["--steps", "20", "--d-sae", "64", "--k", "4", "--quiet"]
    bare = {k: v for k, v in os.environ.items() if k not in PINNED_KEYS}
    plain = _run(args + ["--out", str(tmp_path / "plain.json")], env=bare)
    pinned = _run(args + ["--out", str(tmp_path / "pinned.json")],
                  env={**bare, **pinned_cpu_env({"avx2"})})
    assert plain.returncode == 0 and pinned.returncode == 0, plain.stderr + pinned.stderr
    a = json.loads((tmp_path / "plain.json").read_text())
    b = json.loads((tmp_path / "pinned.json").read_text())
    assert a["cpu_numerics"] == b["cpu_numerics"] == PINNED_ENV
    assert a["weights_sha256"] == b["weights_sha256"]
