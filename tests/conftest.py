"""Shared fixtures: quiet third-party warnings, deterministic torch, a tiny trained LM."""

from __future__ import annotations

import os

from paper_lib.kernelspec import cpu_flags, pinned_cpu_env

# The CPU numerics the notebooks' kernel runs with (kernelspec): the tests, and the processes
# they start, compute as the notebooks do. Read lazily by torch, MKL and oneDNN, so it must
# be set before their first operation; nothing has imported torch yet (no plugin does).
for _name, _value in pinned_cpu_env(cpu_flags()).items():
    os.environ.setdefault(_name, _value)

import pytest  # noqa: E402
import torch  # noqa: E402

# Without CUDA, Triton kernels (paper_lib.sae.triton_kernels) run in Triton's interpreter,
# which must be chosen before anything imports Triton (paper_lib does, via torch._dynamo).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from paper_lib.runtime import quiet_warnings  # noqa: E402

quiet_warnings()

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def require_grads(grads: str, device: str = "cpu") -> None:
    """Skip a test of the "triton" strategy where it cannot run on `device`: Triton not
    installed, or CPU tensors on a machine with CUDA (no interpreter there)."""
    if grads != "triton":
        return
    pytest.importorskip("triton")
    from paper_lib.sae import triton_kernels

    if device == "cpu" and not triton_kernels.INTERPRETED:
        pytest.skip("Triton on CPU tensors needs its interpreter (set without CUDA)")


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _scratch_checkpoints(tmp_path_factory, monkeypatch):
    """Training checkpoints that `train_on` writes (and keeps until a notebook's record)
    go to a scratch folder, never the project's data/ckpt; none outlives its test."""
    from paper_lib import runtime
    from paper_lib.experiments import common

    monkeypatch.setattr(common, "CKPT_ROOT", tmp_path_factory.mktemp("ckpt"))
    yield
    runtime.release_kept()


@pytest.fixture
def broken_compiler(monkeypatch):
    """TrainConfig.compile's torch.compile with a backend that fails the way inductor did on
    the H100 for the sparse step ("NotImplementedError: View"); dynamo's caches are reset
    around it so no compiled code leaks into or out of the test."""
    from paper_lib import train

    def broken_backend(gm, example_inputs):
        raise NotImplementedError("View")

    torch._dynamo.reset()
    monkeypatch.setattr(train, "_compiled_forward_loss",
                        lambda: torch.compile(train.forward_loss, backend=broken_backend))
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory):
    """A corpus of a few real stdlib files (loaded through `datasets`)."""
    from paper_lib.data.corpus import load_stdlib_corpus, stdlib_files

    files = [f for f in stdlib_files() if f.name in {"abc.py", "bisect.py", "colorsys.py",
                                                     "heapq.py", "keyword.py", "shlex.py"}]
    return load_stdlib_corpus(tmp_path_factory.mktemp("data"), val_every=3, files=files)


@pytest.fixture(scope="session")
def tiny_lm(tiny_corpus):
    """A 2-layer byte-level HookedTransformer trained for a few steps."""
    from paper_lib.data.lm import LMConfig, train_lm

    cfg = LMConfig("tiny", n_layers=2, d_model=32, n_heads=2, n_ctx=32, steps=250, batch_rows=16,
                   warmup=5)
    model, manifest = train_lm(cfg, tiny_corpus, "cpu", progress=False)
    return model, manifest


class Interrupted(Exception):
    """Raised by `interrupting_batches` to simulate a run dying mid-training."""


def interrupting_batches(x: torch.Tensor, batch_size: int, at_step: int):
    """ShuffledBatches that raise Interrupted when training asks for step `at_step`."""
    from paper_lib.train import ShuffledBatches

    class Interrupting(ShuffledBatches):
        def batch(self, step: int) -> torch.Tensor:
            if step == at_step:
                raise Interrupted
            return super().batch(step)

    return Interrupting(x, batch_size)
