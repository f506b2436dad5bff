"""`python -m paper_lib.evaluate`: saved SAEs (ours, SAELens') scored on held-out activations
of the LM they record, in raw units, with refusals before any LM is loaded."""

import functools
import json

import pytest
import torch

from paper_lib import evaluate
from paper_lib.sae import SAEConfig, make_sae, save_sae

HOOK = "blocks.1.hook_resid_pre"


@pytest.fixture
def tiny_world(tiny_corpus, tiny_lm, tmp_path, monkeypatch):
    """`embedded-tiny` is the tiny trained LM on the tiny corpus, cached under tmp_path."""
    from paper_lib.data import activations as act

    monkeypatch.setattr(act, "load_lm", lambda *a, **k: (tiny_lm[0], {}))
    monkeypatch.setattr(act, "load_stdlib_corpus", lambda data_dir: tiny_corpus)
    load = functools.partial(act.load_activations, data_dir=tmp_path / "data")
    monkeypatch.setattr(evaluate, "load_activations", load)
    return load


def _sae(d_in: int = 32, model: str = "embedded-tiny"):
    sae = make_sae(SAEConfig("topk", d_in, 64, k=4, hook_name=HOOK, model_name=model)).eval()
    with torch.no_grad():
        sae.b_dec.normal_(std=0.1)
    return sae


def test_scores_match_hand_computation_in_raw_units(tiny_world, tmp_path):
    """The model and hook come from the SAE's record; FVU and L0 are recomputed here from
    their definitions on raw held-out rows, CE recovered from the reported losses; an SAE
    saved with an input scale (weights folded) scores as the same SAE on scaled rows."""
    sae = _sae()
    save_sae(sae, tmp_path / "saes" / "plain")
    save_sae(sae, tmp_path / "saes" / "scaled", input_scale=2.0)  # takes raw x, as x * 2 above
    out = tmp_path / "eval.json"
    assert evaluate.main([str(tmp_path / "saes"), "--out", str(out), "--n-eval-tokens", "124",
                          "--ce-rows", "2", "--quiet"]) == 0
    rec = json.loads(out.read_text())
    assert (rec["model"], rec["hook"], rec["n_eval_tokens"]) == ("embedded-tiny", HOOK, 124)
    given = str(tmp_path / "saes").strip("/")  # each SAE named by the folder as given
    assert sorted(r["name"] for r in rec["saes"]) == [f"{given}/plain", f"{given}/scaled"]
    by = {r["name"].rsplit("/", 1)[1]: r for r in rec["saes"]}
    acts = tiny_world("embedded-tiny", "stdlib", HOOK, 1, 124, "cpu", 0, progress=False)
    x = acts.eval / acts.scale
    with torch.no_grad():
        codes, recon = sae.encode(x), sae(x).recon
        scaled_recon = sae(x * 2.0).recon / 2.0
    fvu = float((x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    plain = by["plain"]
    assert plain["fvu"] == pytest.approx(fvu, rel=1e-5)
    assert plain["l0"] == pytest.approx(float((codes > 0).sum(-1).float().mean()))
    assert plain["ce_recovered"] == pytest.approx(
        (plain["ce_zero"] - plain["ce_spliced"]) / (plain["ce_zero"] - plain["ce_clean"]))
    assert plain["delta_lm"] == pytest.approx(plain["ce_spliced"] - plain["ce_clean"])
    assert 0 <= plain["under_activated"] <= 1 and plain["zf_ratio_median"] > 0
    fvu_scaled = float((x - scaled_recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum())
    assert by["scaled"]["fvu"] == pytest.approx(fvu_scaled, rel=1e-5)


def test_an_saelens_copy_scores_like_ours(tiny_world, tmp_path):
    """The same SAE as our file and as SAELens saved it: the same numbers."""
    sae_lens = pytest.importorskip("sae_lens")
    save_sae(_sae(), tmp_path / "ours")
    sae_lens.SAE.load_from_disk(str(tmp_path / "ours")).save_model(tmp_path / "theirs")
    out = tmp_path / "eval.json"
    evaluate.main([str(tmp_path / "ours"), str(tmp_path / "theirs"), "--out", str(out),
                   "--n-eval-tokens", "124", "--ce-rows", "2", "--quiet"])
    ours, theirs = json.loads(out.read_text())["saes"]
    for key in evaluate.COLUMNS:
        assert theirs[key] == pytest.approx(ours[key], rel=1e-4, abs=1e-6), key


@pytest.mark.filterwarnings("ignore:To copy construct from a tensor")  # SAELens' own code
def test_saelens_reads_the_activations_our_saes_trained_on(tiny_world, tmp_path):
    """A saved SAE records how its data was read (SAELens' metadata: context_size, the BOS
    position left out as seqpos_slice; the dataset only for a hub one), so SAELens'
    `ActivationsStore.from_sae` on the same token rows yields exactly our activations."""
    sae_lens = pytest.importorskip("sae_lens")
    from dataclasses import replace

    from datasets import Dataset

    acts = tiny_world("embedded-tiny", "stdlib", HOOK, 310, 124, progress=False)
    rows = acts.eval_tokens.shape[0]
    assert acts.saelens_metadata() == {"context_size": 32, "seqpos_slice": [1, None]}
    assert replace(acts, source="Skylion007/openwebtext").saelens_metadata()["dataset_path"] \
        == "Skylion007/openwebtext"
    save_sae(_sae(), tmp_path / "sae", metadata=acts.saelens_metadata())
    lens = sae_lens.SAE.load_from_disk(str(tmp_path / "sae"))
    store = sae_lens.ActivationsStore.from_sae(
        acts.model, lens, Dataset.from_dict({"input_ids": acts.eval_tokens.tolist()}),
        store_batch_size_prompts=rows, train_batch_size_tokens=124, n_batches_in_buffer=2,
        total_tokens=rows)  # which SAELens compares with the rows, to warn of repeats
    theirs = store.get_activations(store.get_batch_tokens()).reshape(-1, acts.d)
    assert torch.allclose(theirs, acts.eval / acts.scale, rtol=1e-5, atol=1e-6)


RELEASE = "sae_lens:gpt2-small-res-jb/blocks.6.hook_resid_pre"


def test_a_saelens_release_is_fetched_once_and_scored(tiny_world, tmp_path, monkeypatch,
                                                      capsys):
    """"sae_lens:<release>/<sae_id>" names an SAE of SAELens' directory: SAELens'
    from_pretrained fetches it once (here a stand-in for the hub returns our SAE as SAELens
    loads it) into data/sae_lens/, it scores as that SAE does, with what SAELens lists for
    it alongside, and a second run reads the saved copy without fetching."""
    sae_lens = pytest.importorskip("sae_lens")
    from paper_lib.sae import io

    save_sae(_sae(), tmp_path / "ours")
    fetched = []

    def from_pretrained(release, sae_id, device="cpu", **kw):
        fetched.append((release, sae_id))
        return sae_lens.SAE.load_from_disk(str(tmp_path / "ours"), device=device)
    monkeypatch.setattr(sae_lens.SAE, "from_pretrained", from_pretrained)
    monkeypatch.setattr(io, "SAELENS_ROOT", tmp_path / "sae_lens")
    out = tmp_path / "eval.json"
    args = ["--out", str(out), "--n-eval-tokens", "124", "--ce-rows", "2", "--quiet"]
    evaluate.main([str(tmp_path / "ours"), RELEASE] + args)
    ours, release = json.loads(out.read_text())["saes"]
    assert release["name"] == RELEASE and fetched == [("gpt2-small-res-jb",
                                                       "blocks.6.hook_resid_pre")]
    assert release["path"] == str(tmp_path / "sae_lens/gpt2-small-res-jb/blocks.6.hook_resid_pre")
    for key in evaluate.COLUMNS:
        assert release[key] == pytest.approx(ours[key], rel=1e-4, abs=1e-6), key
    # next to ours, what SAELens' pretrained_saes.yaml lists for blocks.6 of that release
    assert release["saelens_lists"] == {"l0": 51.0, "explained_variance": 0.9}
    assert "saelens_lists" not in ours
    evaluate.main([RELEASE] + args)
    assert len(fetched) == 1
    assert (f"{RELEASE}: SAELens lists l0 51, explained variance 0.9 (its authors' data); "
            f"here L0 {release['l0']:.4g}") in capsys.readouterr().err


def test_an_saelens_sae_of_a_hub_repo_is_fetched_and_scored(tiny_world, tmp_path,
                                                           monkeypatch, capsys):
    """"sae_lens:<owner>/<repo>/<folder>" names an SAE SAELens saved into a Hugging Face
    repo that its directory does not list (say, one a researcher uploaded): SAELens' own
    `from_pretrained` reads it (a stand-in serves the repo's files) into
    data/sae_lens/<owner>/<repo>/<folder>, and it scores as the SAE does, with nothing
    listed beside it. Trained on shorter contexts than the rows scored (its recorded
    context_size), it is flagged: positions past them are outside its training."""
    sae_lens = pytest.importorskip("sae_lens")
    from huggingface_hub.utils import EntryNotFoundError
    from sae_lens.loading import pretrained_sae_loaders

    from paper_lib.sae import io

    save_sae(_sae(), tmp_path / "ours")
    hub = tmp_path / "hub"  # the repo someone/my-saes: its SAE in layer1/topk, SAELens-saved
    lens_sae = sae_lens.SAE.load_from_disk(str(tmp_path / "ours"))
    lens_sae.save_model(hub / "someone/my-saes/layer1/topk")
    cfg_file = hub / "someone/my-saes/layer1/topk/cfg.json"  # trained on 16-token contexts
    cfg = json.loads(cfg_file.read_text())
    cfg["metadata"]["context_size"] = 16
    cfg_file.write_text(json.dumps(cfg))
    asked = []

    def hf_hub_download(repo_id, filename, force_download=False, **kw):
        asked.append((repo_id, filename))
        if not (hub / repo_id / filename).is_file():
            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        return str(hub / repo_id / filename)
    monkeypatch.setattr(pretrained_sae_loaders, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(io, "SAELENS_ROOT", tmp_path / "sae_lens")
    out = tmp_path / "eval.json"
    spec = "sae_lens:someone/my-saes/layer1/topk"
    evaluate.main([str(tmp_path / "ours"), spec, "--out", str(out), "--n-eval-tokens", "124",
                   "--ce-rows", "2", "--quiet"])
    ours, theirs = json.loads(out.read_text())["saes"]
    assert ("someone/my-saes", "layer1/topk/cfg.json") in asked
    assert theirs["name"] == spec
    assert theirs["path"] == str(tmp_path / "sae_lens/someone/my-saes/layer1/topk")
    for key in evaluate.COLUMNS:
        assert theirs[key] == pytest.approx(ours[key], rel=1e-4, abs=1e-6), key
    assert "saelens_lists" not in theirs
    rows = json.loads(out.read_text())["row_tokens"]
    assert theirs["context_size"] == 16 < rows and "context_size" not in ours
    note = (f"{spec}: trained on contexts of 16 tokens, scored on rows of {rows}: its codes "
            "past position 16 are outside what it was trained on")  # no option: embedded LM
    assert f"{note}\n" in capsys.readouterr().err


def test_saelens_release_refusals(tmp_path, monkeypatch):
    """A malformed name, a release or id SAELens does not list (with close names), and a
    fetch that fails (the hub offline) are refused with what to do; a failed fetch leaves
    nothing behind."""
    pytest.importorskip("sae_lens")
    import huggingface_hub

    from paper_lib.sae.io import listed_saes

    monkeypatch.setattr("paper_lib.sae.io.SAELENS_ROOT", tmp_path / "sae_lens")
    cases = [("sae_lens:gpt2-small-res-jb", r"is not 'sae_lens:<release>/<sae_id>'"),
             ("sae_lens:someone/repo/../../x", r"is not 'sae_lens:<release>/<sae_id>' .* or "
              r"'sae_lens:<owner>/<repo>/<folder>' \(a Hugging Face repo\)"),
             ("sae_lens:gpt2-small-res-j/blocks.6.hook_resid_pre",
              r"lists no release 'gpt2-small-res-j'; close: gpt2-small-res-jb.*; a Hugging Face "
              r"repo is named with the folder that holds the SAE: "
              r"'sae_lens:gpt2-small-res-j/blocks.6.hook_resid_pre/<folder>'"),
             ("sae_lens:gpt2-small-res-jb/blocks.6.hook_resid",
              r"has no SAE 'blocks.6.hook_resid'; it has 13, e.g. blocks.6.hook_resid_pre"),
             # a repo SAELens lists is named by its release, whose settings SAELens applies
             ("sae_lens:jbloom/GPT2-Small-SAEs-Reformatted/blocks.6.hook_resid_pre",
              r"jbloom/GPT2-Small-SAEs-Reformatted is SAELens release 'gpt2-small-res-jb': "
              r"name it 'sae_lens:gpt2-small-res-jb/blocks.6.hook_resid_pre'$")]
    for spec, message in cases:
        with pytest.raises(ValueError, match=r"^SAE folder: '.*" + message):
            listed_saes([spec], what="SAE folder")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ValueError, match=r"could not be fetched \(.*\): an SAE of SAELens "
                                         r"needs the internet once"):
        listed_saes([RELEASE])
    # three names, the first no release: a repo's folder, unless a release was misspelt
    with pytest.raises(ValueError, match=r"could not be fetched \(.*\): if release "
                                         r"'gemma-scope-2b-pt-res' was meant, name it; "):
        listed_saes(["sae_lens:gemma-scope-2b-pt-re/layer_12/width_16k/average_l0_82"])
    assert list((tmp_path / "sae_lens").iterdir()) == []  # no folder, full or empty, left


def test_refusals(tiny_world, tmp_path, monkeypatch, capsys):
    """A missing folder is refused before any LM is loaded; more CE rows than the held-out
    tokens fill (124 tokens of the tiny LM's 32-token rows, 31 activations a row: 4 rows)
    before any SAE is scored; an SAE of another width is named, not skipped."""
    save_sae(_sae(d_in=16), tmp_path / "narrow")

    def no_lm(*a, **k):
        raise AssertionError("loaded an LM")
    with monkeypatch.context() as m:
        m.setattr(evaluate, "load_activations", no_lm)
        with pytest.raises(SystemExit):
            evaluate.main([str(tmp_path / "nope"), "--out", str(tmp_path / "e.json")])
    assert "is not a folder" in capsys.readouterr().err
    save_sae(_sae(), tmp_path / "fits")
    with pytest.raises(SystemExit):
        evaluate.main([str(tmp_path / "fits"), "--out", str(tmp_path / "e.json"),
                       "--n-eval-tokens", "124", "--ce-rows", "5", "--quiet"])
    assert ("--ce-rows = 5 exceeds the 4 held-out token rows (--n-eval-tokens = 124 in rows of "
            "32 tokens); ask for fewer rows or raise --n-eval-tokens" in capsys.readouterr().err)
    with pytest.raises(SystemExit):
        evaluate.main([str(tmp_path / "narrow"), "--out", str(tmp_path / "e.json"),
                       "--n-eval-tokens", "124", "--ce-rows", "2", "--quiet"])
    assert ("narrow (" in (err := capsys.readouterr().err)
            and "not made for these activations: d_in 16, the activations' 32" in err)
    assert not (tmp_path / "e.json").exists()
