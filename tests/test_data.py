"""Data pipeline: corpus, byte tokens, the embedded LM cache, harvesting, activation
caches, streaming, and the hub path with local stand-ins."""

import itertools
import json
import math
import os

import pytest
import torch

from paper_lib.data import corpus as corp
from paper_lib.data import harvest as hv
from paper_lib.data import lm as lmmod
from tests import standin_hub


def test_stdlib_files_sorted_without_tests():
    files = corp.stdlib_files()
    assert files == sorted(files) and len(files) > 100
    assert not any("site-packages" in f.parts or "test" in f.parts for f in files)


def test_corpus_hash_identifies_content(tmp_path):
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("x = 1\n")
    b.write_text("y = 2\n")
    h1 = corp.hash_files([a, b], tmp_path)
    assert h1 == corp.hash_files([a, b], tmp_path)
    b.write_text("y = 3\n")
    assert corp.hash_files([a, b], tmp_path) != h1


def test_tiny_corpus_split_by_file(tiny_corpus):
    """Loaded through datasets; validation is every val_every-th file; hash recorded."""
    assert len(tiny_corpus.train) + len(tiny_corpus.validation) == tiny_corpus.n_files
    assert len(tiny_corpus.validation) >= 1 and len(tiny_corpus.sha256) == 64
    assert "def " in tiny_corpus.train["text"][0] or "def " in tiny_corpus.train["text"][1]


def test_empty_corpus_is_refused(tmp_path):
    empty = tmp_path / "e.py"
    empty.write_text("")
    with pytest.raises(ValueError, match="too few to split|corpus is empty"):
        corp.load_stdlib_corpus(tmp_path, files=[])


def test_byte_tokens_layout():
    """Rows start with BOS; bytes follow in order across documents joined by newlines."""
    rows = corp.byte_tokens(["abcdef"], n_ctx=4)
    assert rows.tolist() == [[256, 97, 98, 99], [256, 100, 101, 102]]
    two = corp.byte_tokens(["ab", "cd"], n_ctx=3, seed=0)  # "ab\ncd" or "cd\nab": 5 bytes
    assert two.shape == (2, 3) and two[1, 1] == ord("\n")
    with pytest.raises(ValueError, match="not enough text"):
        corp.byte_tokens(["a"], n_ctx=8)


def test_unigram_bits_hand_case():
    """Train bytes 'aaab' (+1 smoothing over 256 values): p(a) = 4/260, so a validation
    byte 'a' costs log2(260/4) bits."""
    train = torch.tensor([[256, 97, 97, 97, 98]])
    val = torch.tensor([[256, 97]])
    assert corp.unigram_bits_per_byte(train, val) == pytest.approx(math.log2(260 / 4))


def test_tiny_lm_beats_unigram(tiny_lm):
    _, manifest = tiny_lm
    assert manifest["val_bits_per_byte"] < manifest["unigram_bits_per_byte"]


@pytest.fixture
def counted_lm(monkeypatch):
    """A tiny embedded LM config registered as "embedded-test", and the list `train_lm`
    appends to each time it trains one."""
    cfg = lmmod.LMConfig("embedded-test", n_layers=1, d_model=16, n_heads=2, n_ctx=16, steps=3,
                         batch_rows=2, warmup=1)
    monkeypatch.setitem(lmmod.EMBEDDED_LMS, "embedded-test", cfg)
    calls = []
    real_train = lmmod.train_lm
    monkeypatch.setattr(lmmod, "train_lm", lambda *a, **k: calls.append(1) or real_train(*a, **k))
    return cfg, calls


def test_lm_cache_reuse_and_invalidation(tiny_corpus, tmp_path, counted_lm):
    """Trained once and reused; retrained when the weights are corrupt or the corpus changes."""
    cfg, calls = counted_lm
    m1, man1 = lmmod.load_embedded_lm("embedded-test", data_dir=tmp_path, progress=False,
                                      corpus=tiny_corpus)
    m2, _ = lmmod.load_embedded_lm("embedded-test", data_dir=tmp_path, progress=False,
                                   corpus=tiny_corpus)
    assert len(calls) == 1
    for (k, v), (_, w) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(v, w), k
    weights = lmmod.lm_dir(cfg, tmp_path) / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])  # truncated
    lmmod.load_embedded_lm("embedded-test", data_dir=tmp_path, progress=False, corpus=tiny_corpus)
    assert len(calls) == 2
    other = tiny_corpus.__class__(tiny_corpus.train, tiny_corpus.validation, "0" * 64, 1, 1)
    lmmod.load_embedded_lm("embedded-test", data_dir=tmp_path, progress=False, corpus=other)
    assert len(calls) == 3
    assert json.loads((lmmod.lm_dir(cfg, tmp_path) / "manifest.json").read_text())[
        "corpus_sha256"] == "0" * 64
    with pytest.raises(ValueError, match="unknown embedded LM"):
        lmmod.load_embedded_lm("embedded-huge", data_dir=tmp_path)


def test_lm_cache_is_kept_per_training_numerics(tiny_corpus, tmp_path, monkeypatch,
                                                counted_lm):
    """A process in other CPU numerics (a shell without the kernel's pins) trains and caches
    its own copy: it neither reuses the pinned one nor replaces it. A cache whose manifest
    names other numerics than its folder's is not trusted."""
    cfg, calls = counted_lm

    def load():
        return lmmod.load_embedded_lm("embedded-test", data_dir=tmp_path, progress=False,
                                      corpus=tiny_corpus)[1]

    monkeypatch.setattr(lmmod, "cpu_numerics", lambda: {"MKL_CBWR": "AVX2,STRICT"})
    pinned_dir = lmmod.lm_dir(cfg, tmp_path)
    assert load()["numerics"] == {"device": "cpu", "MKL_CBWR": "AVX2,STRICT"}
    monkeypatch.setattr(lmmod, "cpu_numerics", lambda: {})
    plain_dir = lmmod.lm_dir(cfg, tmp_path)
    assert plain_dir != pinned_dir and load()["numerics"] == {"device": "cpu"}
    assert len(calls) == 2 and (pinned_dir / "model.safetensors").is_file()
    load()
    assert len(calls) == 2  # each copy reused by its own kind of process
    assert lmmod.lm_dir(cfg, tmp_path, "cuda").name.split("-")[-2] == "cuda"
    manifest = json.loads((plain_dir / "manifest.json").read_text())
    manifest["numerics"] = {"device": "cpu", "MKL_CBWR": "AVX2,STRICT"}
    (plain_dir / "manifest.json").write_text(json.dumps(manifest))
    load()
    assert len(calls) == 3


@pytest.mark.parametrize("hook", ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre",
                                  "blocks.0.hook_mlp_out", "hook_embed"])
def test_harvest_equals_full_forward(tiny_lm, hook):
    """Harvested activations equal a full forward's cache, for the residual shortcut
    (stop_at_layer=L) and the run_with_cache path alike."""
    model, _ = tiny_lm
    tokens = corp.byte_tokens(["def f(x):\n    return x * 2\n" * 20], n_ctx=32)
    got = hv.harvest(model, hv.row_batches(tokens, 2), hook, tokens.shape[0] * 31,
                     progress=False)
    _, cache = model.run_with_cache(tokens)
    want = cache[hook][:, 1:].reshape(-1, model.cfg.d_model)
    assert torch.allclose(got, want, atol=1e-5)
    with_bos = hv.harvest(model, hv.row_batches(tokens, 2), hook, 64, drop_bos=False,
                          progress=False)
    assert torch.allclose(with_bos[0], cache[hook][0, 0], atol=1e-5)


def test_harvest_runs_no_block_at_or_above_the_residual_hook(tiny_lm):
    """blocks.L.hook_resid_pre needs blocks 0..L-1 only; block L must not run."""
    model, _ = tiny_lm
    ran = []
    handles = [b.register_forward_hook(lambda m, i, o, j=j: ran.append(j))
               for j, b in enumerate(model.blocks)]
    try:
        hv.harvest(model, [corp.byte_tokens(["abc" * 50], n_ctx=32)[:1]],
                   "blocks.1.hook_resid_pre", 8, progress=False)
    finally:
        for h in handles:
            h.remove()
    assert ran == [0]


def test_hook_errors(tiny_lm):
    model, _ = tiny_lm
    assert hv.stop_layer(model, "blocks.0.hook_resid_pre") == 1
    assert hv.stop_layer(model, "hook_embed") == 0
    with pytest.raises(ValueError, match="layer 7 is out of range.*2 layers"):
        hv.stop_layer(model, "blocks.7.hook_resid_pre")
    with pytest.raises(ValueError, match="unknown hook 'blocks.0.resid'.*blocks.0.hook_resid_pre"):
        hv.stop_layer(model, "blocks.0.resid")
    with pytest.raises(ValueError, match="layer 5 is out of range"):
        hv.resid_hook(model, 5)
    tokens = corp.byte_tokens(["abc" * 50], n_ctx=32)
    with pytest.raises(ValueError, match="ran out after"):
        hv.harvest(model, hv.row_batches(tokens, 2), "blocks.0.hook_resid_pre", 10**6,
                   progress=False)


def harvest_abc(model):
    """40 activations at blocks.0.hook_resid_pre of a repeated 'abc' text."""
    tokens = corp.byte_tokens(["abc" * 50], n_ctx=32)
    return hv.harvest(model, hv.row_batches(tokens, 2), "blocks.0.hook_resid_pre", 40,
                      progress=False)


@pytest.mark.parametrize("name", list(lmmod.EMBEDDED_LMS))
def test_embedded_lm_config_says_cpu_on_a_cuda_machine(name, monkeypatch):
    """TransformerLens defaults cfg.device to cuda where CUDA exists; the embedded LMs are
    built on the CPU and moved by .to(), so their config must say cpu until then (with the
    default, the fused tests failed on the H100: tokens on cuda, weights on the CPU)."""
    from transformer_lens import HookedTransformerConfig

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert HookedTransformerConfig(n_layers=1, d_model=8, n_ctx=4, d_head=4,
                                   act_fn="gelu").device == "cuda"  # the default it avoids
    assert lmmod.EMBEDDED_LMS[name].tl_config().device == "cpu"


def test_model_device_disagreeing_with_its_config_is_refused(tiny_lm):
    """TransformerLens sends tokens to cfg.device: weights elsewhere would fail inside its
    embedding with an indexing error, so harvest names the mismatch and the fix first."""
    model, _ = tiny_lm
    model.cfg.device = "cuda"
    try:
        with pytest.raises(ValueError, match=r"weights are on cpu but model.cfg.device is "
                                             r"'cuda'.*model.to\('cpu'\)"):
            harvest_abc(model)
    finally:
        model.cfg.device = "cpu"


def test_nan_activations_are_located(tiny_lm):
    model, _ = tiny_lm

    def poison(act, hook):
        act[0, 3, 1] = float("nan")
        return act

    model.add_hook("blocks.0.hook_resid_pre", poison)
    try:
        with pytest.raises(ValueError, match=r"non-finite activations at hook "
                                             r"'blocks.0.hook_resid_pre' in batch 0.*\[0, 3, 1\]"):
            harvest_abc(model)
    finally:
        model.reset_hooks()


def test_activation_cache_roundtrip_and_integrity(tmp_path):
    """Round trip; a different spec, a truncated or a corrupted shard is never used."""
    spec = {"model": "m", "hook": "h", "n": 100}
    x = torch.randn(100, 8)
    cache = hv.ActivationCache(tmp_path, spec, shard_rows=30)
    got, hit = cache.get_or_build(lambda: x)
    assert not hit and torch.equal(got, x)
    again, hit = cache.get_or_build(lambda: pytest.fail("should be cached"))
    assert hit and torch.equal(again, x)
    assert hv.ActivationCache(tmp_path, {**spec, "hook": "other"}).load() is None
    shard = cache.dir / "shard_001.npy"
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert cache.load() is None
    shard.write_bytes(bytes(data[:-40]))
    assert cache.load() is None
    rebuilt, hit = cache.get_or_build(lambda: x)
    assert not hit and cache.load() is not None


def _stream_fixture(tiny_lm):
    model, _ = tiny_lm
    # 31 activation tokens per row after BOS, 4 rows a token batch: 124 tokens a batch.
    tokens = corp.byte_tokens(["def g(y):\n    return y + 1\n" * 200], n_ctx=32)
    hook = "blocks.1.hook_resid_pre"

    def make_iter():
        return hv.row_batches(tokens, 4)

    def source(**kw):
        return hv.StreamingActivations(model, make_iter, hook, batch_size=16, buffer_tokens=64,
                                       scale=2.0, seed=1, **kw)
    return model, make_iter, hook, source


def _rows(x):
    """x's rows as a multiset (sorted distinct rows, counts)."""
    return torch.unique(x, dim=0, return_counts=True)


def test_streaming_fills_serve_each_row_once(tiny_lm):
    """Each fill of 64 tokens is served as 4 batches holding its rows once each, shuffled;
    a fill takes whole token batches as `harvest` does, so fill 1 starts at the second
    batch of 124 tokens (the 60 left over in the first are dropped), not at token 64."""
    model, make_iter, hook, source = _stream_fixture(tiny_lm)
    src = source()
    served = [src.batch(i).clone() for i in range(8)]
    assert all(b.shape == (16, 32) for b in served)
    fills = [hv.harvest(model, make_iter(), hook, 64, progress=False) * 2.0,
             hv.harvest(model, itertools.islice(make_iter(), 1, None), hook, 64,
                        progress=False) * 2.0]
    for f, expected in enumerate(fills):
        got = torch.cat(served[4 * f:4 * f + 4])
        assert not torch.equal(got, expected)  # shuffled
        # The same rows as often (a multiset: the repeating text repeats some rows).
        assert all(map(torch.equal, _rows(got), _rows(expected)))


def test_streaming_step_is_random_access(tiny_lm, monkeypatch):
    """A batch depends on its step alone: a fresh stream asked for step 9 first (as a
    resumed run asks) serves what a stream read from step 0 serves, and runs the LM on that
    one fill only, skipping the token batches before it; an earlier step after a later one
    restarts the stream to the same batches."""
    _, _, _, source = _stream_fixture(tiny_lm)
    src = source()
    served = [src.batch(i).clone() for i in range(12)]
    assert torch.equal(src.batch(1), served[1])

    calls = []
    real = hv.harvest
    monkeypatch.setattr(hv, "harvest", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    fresh = source()
    assert torch.equal(fresh.batch(9), served[9])
    assert calls == [64]
    assert torch.equal(fresh.batch(10), served[10]) and calls == [64]  # same fill: no harvest
    other = hv.StreamingActivations(fresh.model, fresh.make_iter, fresh.hook, batch_size=16,
                                    buffer_tokens=64, scale=2.0, seed=2)
    assert not torch.equal(other.batch(9), served[9])  # another seed shuffles another way


def test_streaming_epochs_repeat_the_first_fills_reshuffled(tiny_lm, monkeypatch):
    """With epoch_fills=2 the stream restarts after two fills, as an in-memory set's epochs
    do: fills 2 and 3 serve the rows of fills 0 and 1 again, in another order; a fresh
    stream asked for step 13 (fill 3) harvests that fill alone."""
    _, _, _, source = _stream_fixture(tiny_lm)
    src = source(epoch_fills=2)
    served = [src.batch(i).clone() for i in range(16)]
    for f in (0, 1):
        first, again = torch.cat(served[4 * f:4 * f + 4]), torch.cat(served[4 * f + 8:4 * f + 12])
        assert all(map(torch.equal, _rows(again), _rows(first)))
        assert not torch.equal(again, first)
    assert not all(map(torch.equal, _rows(torch.cat(served[4:8])), _rows(torch.cat(served[:4]))))
    calls, real = [], hv.harvest
    monkeypatch.setattr(hv, "harvest", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    assert torch.equal(source(epoch_fills=2).batch(13), served[13]) and calls == [64]


def test_streaming_stream_that_runs_out_says_so(tiny_lm):
    _, make_iter, _, source = _stream_fixture(tiny_lm)
    n_batches = sum(1 for _ in make_iter())
    with pytest.raises(ValueError, match="ran out in fill"):
        source().batch(4 * (n_batches + 1))


def _standin_hub(tmp_path, monkeypatch, lines=400):
    """A local text file for a hub dataset and a locally built HookedTransformer with a
    real tokenizer standing in for `from_pretrained`; returns (text file, tokenizer)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return standin_hub.patch(tmp_path, monkeypatch.setattr, lines)


def test_hub_text_is_packed_into_rows_in_order_whatever_the_tokenizer_batch(tmp_path,
                                                                            monkeypatch):
    """Streamed documents (one per line; an empty one skipped) are tokenised a batch of
    documents at a time and packed in order into rows [BOS, 2 tokens]; a last partial row
    or batch is not yielded. By hand: a b c | d e | f g h i j -> [a b] [c d] [e f] [g h]
    [i j], batches of two rows: the first four rows, for one document per tokenizer call
    as for three."""
    class Chars:  # a tokenizer of one id per character, called on lists of documents
        bos_token_id = 0

        def __call__(self, texts):
            assert isinstance(texts, list)
            return {"input_ids": [[ord(c) for c in t] for t in texts]}

    data = tmp_path / "docs.txt"
    data.write_text("abc\n\nde\nfghij\n")
    want = [[[0, 97, 98], [0, 99, 100]], [[0, 101, 102], [0, 103, 104]]]
    for per_call in (1, 3):
        monkeypatch.setattr(corp, "DOC_BATCH", per_call)
        got = [b.tolist() for b in corp.hf_token_batches("text", Chars(), 3, 2,
                                                           data_files=str(data))]
        assert got == want, per_call


def test_paper_path_with_local_standins(tmp_path, monkeypatch):
    """The hub path end to end with no network: a local text dataset streamed through
    `datasets`, a locally built HookedTransformer with a real tokenizer standing in for
    `from_pretrained`, packed rows with BOS, and train/eval activations."""
    from paper_lib.data.activations import load_activations

    data, tok = _standin_hub(tmp_path, monkeypatch)
    acts = load_activations("standin-gpt2", "text", "", n_tokens=2000, n_eval_tokens=500,
                            progress=False, data_dir=tmp_path, batch_rows=4,
                            data_files=str(data))
    assert acts.train.shape == (2000, 32) and acts.eval.shape == (500, 32)
    assert (acts.eval_tokens[:, 0] == tok.bos_token_id).all()
    assert acts.train.pow(2).sum(-1).mean() == pytest.approx(32, rel=1e-3)
    streamed = load_activations("standin-gpt2", "text", "", n_tokens=2000, n_eval_tokens=500,
                                progress=False, data_dir=tmp_path, batch_rows=4,
                                data_files=str(data), stream=True)
    assert streamed.train is None
    assert streamed.batches(64, 0).batch(0).shape == (64, 32)


def test_hub_activations_stream_when_memory_is_short(tmp_path, monkeypatch):
    """On the hub path, activations that would not fit the free memory stream instead of
    being held (2,000 + 500 of width 32: 320,000 bytes, against 0.3 MB free); asked not to
    stream, the call is refused with the sizes and the fix."""
    from paper_lib.data import activations

    data, _ = _standin_hub(tmp_path, monkeypatch)
    monkeypatch.setattr(activations, "available_memory", lambda device: [("RAM", 300_000)])
    kw = dict(n_tokens=2000, n_eval_tokens=500, progress=False, data_dir=tmp_path,
              batch_rows=4, data_files=str(data))
    assert activations.load_activations("standin-gpt2", "text", "", **kw).train is None
    with pytest.raises(ValueError, match="take 0.3 MB held in memory, more than the 0.3 MB "
                                         "free RAM: lower n_tokens, or stream them"):
        activations.load_activations("standin-gpt2", "text", "", stream=False, **kw)
    monkeypatch.setattr(activations, "available_memory", lambda device: [("RAM", 330_000)])
    assert activations.load_activations("standin-gpt2", "text", "", **kw).train is not None


def test_hub_rows_take_the_context_size_and_refuse_one_past_the_lm(tmp_path, monkeypatch):
    """`context_size` sets the hub rows' length (BOS and 15 tokens: 15 activations a row);
    one longer than the LM's context (the stand-in's 64) is refused, not cut to 64."""
    from paper_lib.data.activations import load_activations

    data, _ = _standin_hub(tmp_path, monkeypatch)
    kw = dict(n_tokens=600, n_eval_tokens=300, progress=False, data_dir=tmp_path, batch_rows=4,
              data_files=str(data))
    acts = load_activations("standin-gpt2", "text", "", context_size=16, **kw)
    assert acts.eval_tokens.shape[1] == 16 and acts.saelens_metadata()["context_size"] == 16
    assert len(acts.eval) == 300 and acts.eval_tokens.shape[0] == 20  # ceil(300 / 15)
    with pytest.raises(ValueError, match="context_size = 65 exceeds standin-gpt2's context "
                                         "of 64 tokens; use at most 64"):
        load_activations("standin-gpt2", "text", "", context_size=65, **kw)


def test_hub_seed_draws_another_sample(tmp_path, monkeypatch):
    """On the hub path the seed draws the documents' order, as it draws the embedded
    corpus's rows: the same seed reads the same held-out and training rows, another seed
    other documents (here each line of the stand-in file, "line i: ...", is one)."""
    import re

    from paper_lib.data.activations import load_activations

    data, tok = _standin_hub(tmp_path, monkeypatch)

    def draw(seed):
        acts = load_activations("standin-gpt2", "text", "", n_tokens=600, n_eval_tokens=300,
                                progress=False, data_dir=tmp_path, batch_rows=4,
                                data_files=str(data), seed=seed)
        lines = {int(m) for m in re.findall(r"line (\d+):",
                                             tok.decode(acts.eval_tokens.flatten()))}
        return acts, lines

    a0, lines0 = draw(0)
    b0, again = draw(0)
    _, lines1 = draw(1)
    assert again == lines0 and torch.equal(a0.train, b0.train)
    assert lines0 and lines1 and lines0 != lines1
    # not the file's head in order: the unshuffled stream would start at line 0
    assert lines0 != set(range(len(lines0)))


def test_notebook_helpers_run_on_streamed_activations(tmp_path, monkeypatch):
    """At the paper profile the training activations do not fit in memory (`train` is
    None): the notebooks' helpers that train or rank on them read the stream instead."""
    import torch

    from paper_lib.data.activations import load_activations
    from paper_lib.experiments import amortisation as am

    data, _ = _standin_hub(tmp_path, monkeypatch)
    streamed = load_activations("standin-gpt2", "text", "", n_tokens=2000, n_eval_tokens=500,
                                progress=False, data_dir=tmp_path, batch_rows=4,
                                data_files=str(data), stream=True)
    assert streamed.train is None
    gap = am.lm_gap(streamed, 256, k=4, n_latents=64, steps=5, batch_size=64, ito_steps=20,
                    seed=0, device=torch.device("cpu"))
    assert gap["l0_sae"] <= 4 and gap["fvu_ito"] <= gap["fvu_sae"] + 1e-6
    # train_sample harvests the stream's first rows directly: those an in-memory set of
    # the same tokens starts its training rows with (the tokens after the held-out ones)
    rows = streamed.train_sample(100)
    held = load_activations("standin-gpt2", "text", "", n_tokens=2000, n_eval_tokens=500,
                            progress=False, data_dir=tmp_path, batch_rows=4,
                            data_files=str(data), stream=False)
    assert torch.allclose(rows / streamed.scale, held.train[:100] / held.scale, atol=1e-5)
    # The first training batch draws from a buffer of the stream's first 2000 rows.
    head = streamed.train_sample(2000)
    dist = torch.cdist(streamed.batches(64, 0).batch(0), head,
                       compute_mode="donot_use_mm_for_euclid_dist")
    assert dist.min(1).values.max() < 1e-5


def test_train_sample_draws_training_rows_in_training_order():
    """In memory, train_sample(n, seed) is the first n rows training with that seed sees
    (the first epoch's permutation), never a held-out row; n beyond the rows gives all."""
    from paper_lib.data.activations import ActivationSet
    from paper_lib.train import ShuffledBatches

    train = torch.arange(40, dtype=torch.float32)[:, None].repeat(1, 3)
    acts = ActivationSet(None, {}, "h", train, -torch.ones(8, 3), 1.0, None, torch.zeros(1, 2))
    rows = acts.train_sample(10, seed=3)
    first = ShuffledBatches(train, 4, 3)
    assert torch.equal(rows, torch.cat([first.batch(0), first.batch(1), first.batch(2)])[:10])
    assert len(set(rows[:, 0].tolist())) == 10 and bool((rows >= 0).all())
    assert sorted(acts.train_sample(100)[:, 0].tolist()) == list(range(40))


def test_command_line_trains_an_sae_on_lm_activations(tmp_path, monkeypatch):
    """`python -m paper_lib.train --model ...`: activations harvested at the hook, one SAE
    trained, its downstream CE measured, and a file SAELens-style loaders read back that
    takes raw activations and records the hook."""
    from paper_lib.data.activations import load_activations
    from paper_lib.sae import load_sae
    from paper_lib.train import main

    data, _ = _standin_hub(tmp_path, monkeypatch, lines=2000)  # 64-row harvest batches
    out, saved = tmp_path / "run.json", tmp_path / "sae"
    assert main(["--model", "standin-gpt2", "--dataset", "text", "--data-files", str(data),
                 "--hook", "blocks.1.hook_resid_pre", "--n-tokens", "2000",
                 "--n-eval-tokens", "500", "--d-sae", "64", "--k", "4", "--steps", "30",
                 "--batch", "64", "--out", str(out),
                 "--save", str(saved), "--quiet"]) == 0
    rec = json.loads(out.read_text())
    assert rec["hook"] == "blocks.1.hook_resid_pre" and rec["final"]["l0"] == 4
    assert rec["ce_clean"] <= rec["ce_spliced"] + 0.5 and math.isfinite(rec["ce_recovered"])
    assert not out.with_name("run.json.ckpt.pt").exists()  # removed once training finished
    sae = load_sae(saved).eval()
    assert sae.cfg.hook_name == "blocks.1.hook_resid_pre" and sae.cfg.model_name == "standin-gpt2"
    # how the data was read, for SAELens' tools: rows of the stand-in's whole context (64;
    # GPT-2's would be cut to 128) less BOS; a local file, no dataset SAELens could load
    saved_meta = json.loads((saved / "cfg.json").read_text())["metadata"]
    assert (saved_meta["context_size"], saved_meta["seqpos_slice"]) == (64, [1, None])
    assert "dataset_path" not in saved_meta
    # the LM's loading, said outright (SAELens trains with center_writing_weights=False)
    assert saved_meta["model_from_pretrained_kwargs"] == {
        "fold_ln": True, "center_writing_weights": True, "fold_value_biases": True,
        "refactor_factored_attn_matrices": False}
    acts = load_activations("standin-gpt2", "text", "blocks.1.hook_resid_pre", n_tokens=2000,
                            n_eval_tokens=500, progress=False, data_dir=tmp_path,
                            data_files=str(data))
    raw = acts.eval / acts.scale  # the saved SAE takes raw activations
    with torch.no_grad():
        fvu = float((sae(raw).recon - raw).pow(2).sum() / (raw - raw.mean(0)).pow(2).sum())
    assert fvu == pytest.approx(rec["final"]["fvu"], rel=1e-4)
    # python -m paper_lib.evaluate on the saved SAE: its model and hook from its record, the
    # same held-out stream (only it harvested), the same FVU and CE as at the end of training
    from paper_lib.evaluate import main as evaluate_main

    scored = tmp_path / "eval.json"
    assert evaluate_main([str(saved), "--dataset", "text", "--data-files", str(data),
                          "--n-eval-tokens", "500", "--out", str(scored), "--quiet"]) == 0
    ev = json.loads(scored.read_text())
    # CE on every row of the held-out activations, fewer than 32: 500 of them, 63 a row
    assert rec["ce_rows"] == ev["ce_rows"] == 8
    assert (ev["model"], ev["hook"]) == ("standin-gpt2", "blocks.1.hook_resid_pre")
    assert ev["saes"][0]["fvu"] == pytest.approx(rec["final"]["fvu"], rel=1e-4)
    assert ev["saes"][0]["ce_spliced"] == pytest.approx(rec["ce_spliced"], rel=1e-4)


def test_evaluate_reads_the_dataset_the_saes_record(tmp_path, monkeypatch, capsys):
    """On a hub LM `python -m paper_lib.evaluate` scores on the dataset the SAEs record
    (SAELens' dataset_path; here the local 'text' loader of the stand-in file), as it takes
    their model and hook; with none recorded and none named it asks for --dataset."""
    from paper_lib.evaluate import main as evaluate_main
    from paper_lib.sae import SAEConfig, make_sae, save_sae

    data, _ = _standin_hub(tmp_path, monkeypatch)
    sae = make_sae(SAEConfig("topk", 32, 64, k=4, hook_name="blocks.1.hook_resid_pre",
                             model_name="standin-gpt2"))
    save_sae(sae, tmp_path / "recorded", metadata={"dataset_path": "text"})
    save_sae(sae, tmp_path / "silent")
    args = ["--data-files", str(data), "--n-eval-tokens", "300", "--quiet"]
    assert evaluate_main([str(tmp_path / "recorded"), "--out", str(tmp_path / "a.json"),
                          *args]) == 0
    assert json.loads((tmp_path / "a.json").read_text())["dataset"] == "text"
    with pytest.raises(SystemExit):
        evaluate_main([str(tmp_path / "silent"), "--out", str(tmp_path / "b.json"), *args])
    assert ("--dataset: the SAEs record no dataset of standin-gpt2's text to score them on; "
            "name one") in capsys.readouterr().err
    assert not (tmp_path / "b.json").exists()


def test_evaluate_reads_rows_no_longer_than_the_saes_trained_on(tmp_path, monkeypatch, capsys):
    """On a hub LM `python -m paper_lib.evaluate` holds out rows of the shortest training
    context its SAEs record (here 16 tokens, BOS included; 128 at most by default), so no
    position past it is scored; --context-size reads longer ones, and a line says that the
    SAE is then scored past its context. An embedded LM reads rows of its own context only:
    another length is refused before it is loaded."""
    from paper_lib.evaluate import main as evaluate_main
    from paper_lib.sae import SAEConfig, make_sae, save_sae

    data, _ = _standin_hub(tmp_path, monkeypatch)
    hook = "blocks.1.hook_resid_pre"
    sae = make_sae(SAEConfig("topk", 32, 64, k=4, hook_name=hook, model_name="standin-gpt2"))
    save_sae(sae, tmp_path / "short", metadata={"context_size": 16})
    args = [str(tmp_path / "short"), "--dataset", "text", "--data-files", str(data),
            "--n-eval-tokens", "300", "--ce-rows", "4", "--quiet"]
    assert evaluate_main(args + ["--out", str(tmp_path / "a.json")]) == 0
    scored = json.loads((tmp_path / "a.json").read_text())
    assert scored["row_tokens"] == 16 and scored["n_eval_tokens"] == 300
    assert "scored on rows of" not in capsys.readouterr().err
    assert evaluate_main(args + ["--out", str(tmp_path / "b.json"), "--context-size", "64"]) == 0
    assert json.loads((tmp_path / "b.json").read_text())["row_tokens"] == 64
    assert ("trained on contexts of 16 tokens, scored on rows of 64: its codes past position "
            "16 are outside what it was trained on (--context-size 16 reads rows of its "
            "length)") in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate_main(args[:1] + ["--model", "embedded-smoke", "--context-size", "64",
                                  "--out", str(tmp_path / "c.json")])
    assert ("context_size = 64: embedded-smoke reads rows of its whole context, 128 tokens"
            in capsys.readouterr().err)


def test_paper_path_offline_says_what_to_do_instead(tmp_path):
    """Without the internet (and no local copy), GPT-2 and OpenWebText fail with the
    upstream reason plus the offline alternative, not a bare hub error."""
    import subprocess
    import sys

    script = """
from paper_lib.data.corpus import hf_token_batches
from paper_lib.data.lm import load_lm
for what, call in (("DS", lambda: next(hf_token_batches("Skylion007/openwebtext", None, 64, 2))),
                   ("LM", lambda: load_lm("gpt2"))):
    try:
        call()
    except OSError as e:
        print(what, str(e).replace(chr(10), " "))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf")}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=300).stdout.splitlines()
    assert len(out) == 2, out
    assert out[0].startswith("DS could not open dataset 'Skylion007/openwebtext'")
    assert "use dataset='stdlib'" in out[0]
    assert out[1].startswith("LM could not load model 'gpt2'")
    assert "use profile='smoke' or 'gpu'" in out[1]


def test_compiled_harvest_equals_eager(tiny_lm):
    model, _ = tiny_lm
    tokens = corp.byte_tokens(["def f(x):\n    return x * 2\n" * 20], n_ctx=32)
    hook = "blocks.1.hook_resid_pre"
    n = tokens.shape[0] * 31
    eager = hv.harvest(model, hv.row_batches(tokens, 2), hook, n, progress=False)
    compiled = hv.harvest(model, hv.row_batches(tokens, 2), hook, n, progress=False,
                          compile=True)
    assert torch.allclose(compiled, eager, atol=1e-4)


def test_second_process_waits_for_the_cache_it_would_build(tmp_path, capfd):
    """Another process building the same activation cache holds its lock: this process
    waits (saying so), then reuses what the other built instead of building it again."""
    import subprocess
    import sys
    import time

    spec = {"model": "m", "hook": "h", "n": 4}
    holder = tmp_path / "holding"
    script = f"""
import time, torch
from pathlib import Path
from paper_lib.data.harvest import ActivationCache
from paper_lib.runtime import build_lock
cache = ActivationCache(Path({str(tmp_path)!r}), {spec!r})
with build_lock(cache.dir):
    Path({str(holder)!r}).touch()
    time.sleep(1.5)
    cache.save(torch.full((4, 2), 7.0))
"""
    proc = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.time() + 60
    while not holder.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    assert holder.exists(), "the other process never took the lock"
    cache = hv.ActivationCache(tmp_path, spec)
    x, hit = cache.get_or_build(lambda: pytest.fail("built a second time"))
    assert proc.wait(timeout=60) == 0
    assert hit and torch.equal(x, torch.full((4, 2), 7.0))
    assert "waiting for another process" in capfd.readouterr().err


def test_describe_reports_the_embedded_lm_against_the_unigram():
    """An embedded LM's manifest puts its held-out bits/byte beside the byte-unigram
    baseline in the line notebooks print; a hub model (no manifest numbers) gets none."""
    from paper_lib.data.activations import ActivationSet

    manifest = {"config": {"name": "embedded-smoke"}, "val_bits_per_byte": 3.2428,
                "unigram_bits_per_byte": 4.937, "train_seconds": 87.5, "device": "cpu"}
    acts = ActivationSet(None, manifest, "blocks.1.hook_resid_pre", torch.zeros(10, 4),
                         torch.zeros(3, 4), 0.5, None, torch.zeros(1, 4, dtype=torch.long))
    assert acts.describe() == (
        "embedded-smoke @ blocks.1.hook_resid_pre: 10 train / 3 eval tokens, d=4, scale=0.5; "
        "the LM: 3.24 bits/byte on held-out files (byte unigram 4.94), trained in 88 s on cpu")
    acts.model_info = {"config": {"name": "gpt2"}}
    assert acts.describe().endswith("d=4, scale=0.5")


def test_unit_scale_hand_case_in_chunks():
    """Rows (3, 4) and (0, 0): mean squared norm 12.5, d = 2, scale sqrt(2 / 12.5) = 0.4,
    the same when the squared norms are summed one row at a time."""
    from paper_lib.data.activations import unit_scale

    x = torch.tensor([[3.0, 4.0], [0.0, 0.0]])
    assert unit_scale(x) == pytest.approx(0.4, abs=1e-15)
    assert unit_scale(x, rows=1) == pytest.approx(0.4, abs=1e-15)


def test_embedded_path_scales_its_own_copy_and_leaves_the_cache_raw(tiny_corpus, tiny_lm,
                                                                      tmp_path, monkeypatch):
    """The stdlib path scales activations in place (no second copy of a large harvest), so
    a cache hit must hand out its own copy: the shards on disk stay raw, and a second load
    (a hit) returns the first load's values with E||x||^2 = d."""
    from paper_lib.data import activations as act

    monkeypatch.setattr(act, "load_lm", lambda *a, **k: (tiny_lm[0], {}))
    monkeypatch.setattr(act, "load_stdlib_corpus", lambda data_dir: tiny_corpus)

    def load():
        return act.load_activations("embedded-tiny", "stdlib", "blocks.1.hook_resid_pre",
                                    n_tokens=620, n_eval_tokens=124, progress=False,
                                    data_dir=tmp_path)
    first, second = load(), load()
    assert not first.cache_hit and second.cache_hit
    assert torch.equal(first.train, second.train) and torch.equal(first.eval, second.eval)
    assert first.train.pow(2).sum(-1).mean() == pytest.approx(32, rel=1e-5)
    raw = {}
    for man in (tmp_path / "acts").glob("*/manifest.json"):
        spec = json.loads(man.read_text())["spec"]
        raw[spec["split"]] = hv.ActivationCache(tmp_path / "acts", spec).load()
    assert torch.equal(raw["train"] * first.scale, first.train)
    assert torch.equal(raw["eval"] * first.scale, first.eval)


def test_embedded_path_streams_when_asked(tiny_corpus, tiny_lm, tmp_path, monkeypatch):
    """stream=True on the embedded path (evaluate asks for it: it reads held-out rows only)
    harvests and caches the held-out set alone; training batches are harvested as read from
    the token rows an in-memory set holds, scaled by the held-out set (as on the hub)."""
    from paper_lib.data import activations as act

    monkeypatch.setattr(act, "load_lm", lambda *a, **k: (tiny_lm[0], {}))
    monkeypatch.setattr(act, "load_stdlib_corpus", lambda data_dir: tiny_corpus)

    def load(stream):
        return act.load_activations("embedded-tiny", "stdlib", "blocks.1.hook_resid_pre",
                                    n_tokens=620, n_eval_tokens=124, progress=False,
                                    data_dir=tmp_path, stream=stream)
    streamed = load(True)
    cached = [json.loads(m.read_text())["spec"]["split"]
              for m in (tmp_path / "acts").glob("*/manifest.json")]
    assert cached == ["eval"] and streamed.train is None and streamed.stream_tokens == 620
    held = load(False)
    raw_eval = held.eval / held.scale
    assert streamed.scale == pytest.approx(act.unit_scale(raw_eval), rel=1e-6)
    assert torch.allclose(streamed.eval / streamed.scale, raw_eval, rtol=1e-5, atol=1e-6)
    raw_train = held.train / held.scale
    assert torch.allclose(streamed.train_sample(100) / streamed.scale, raw_train[:100],
                          rtol=1e-5, atol=1e-6)
    batch = streamed.batches(62, seed=3).batch(0) / streamed.scale
    exact = torch.cdist(batch, raw_train, compute_mode="donot_use_mm_for_euclid_dist")
    assert exact.min(1).values.max() < 1e-4  # every row of it a training row


def test_embedded_rows_say_how_often_the_text_was_read():
    """300 bytes fill 9 rows of 32 tokens (BOS and 31 bytes: 279 of them); 5 rows read the
    text once, 25 read it 25 / 9 times, and the activation set says its text repeats."""
    from dataclasses import replace

    from paper_lib.data.activations import ActivationSet, _embedded_rows

    assert _embedded_rows(["a" * 300], 32, 5, seed=0)[1] == 1.0
    rows, passes = _embedded_rows(["a" * 300], 32, 25, seed=0)
    assert rows.shape == (25, 32) and passes == pytest.approx(25 / 9)
    aset = ActivationSet(None, {"config": {"name": "m"}}, "h", torch.zeros(8, 4),
                         torch.zeros(4, 4), 1.0, None, rows, text_passes=(1.0, passes))
    assert aset.describe().endswith("; the corpus is shorter than asked, so its text repeats: "
                                    "its held-out files read 2.8 times")
    assert "repeats" not in replace(aset, text_passes=(1.0, 1.0)).describe()


def test_activation_set_identity_ignores_last_bits_of_the_scale():
    """A redone GPU harvest may move the scale in its last bits (0.82781234 -> 0.82781299):
    the same identity, so a checkpoint still resumes; another draw's scale (0.8290),
    another token count or rows of another length (a hub LM's --context-size) is another
    identity."""
    from paper_lib.data.activations import ActivationSet

    def aset(scale, rows=100, context=2):
        return ActivationSet(None, {"config": {"name": "m"}}, "h", torch.zeros(rows, 4),
                             torch.zeros(10, 4), scale, None,
                             torch.zeros(1, context, dtype=torch.long))
    assert aset(0.82781234).identity() == aset(0.82781299).identity()
    assert aset(0.82781234).identity() != aset(0.8290).identity()
    assert aset(0.82781234).identity() != aset(0.82781234, rows=101).identity()
    assert aset(0.82781234).identity() != aset(0.82781234, context=3).identity()
