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


def test_saelens_release_refusals(tmp_path, monkeypatch):
    """A malformed name, a release or id SAELens does not list (with close names), and a
    fetch that fails (the hub offline) are refused with what to do; a failed fetch leaves
    nothing behind."""
    pytest.importorskip("sae_lens")
    import huggingface_hub

    from paper_lib.sae.io import listed_saes

    monkeypatch.setattr("paper_lib.sae.io.SAELENS_ROOT", tmp_path / "sae_lens")
    cases = [("sae_lens:gpt2-small-res-jb", r"is not 'sae_lens:<release>/<sae_id>'"),
             ("sae_lens:gpt2-small-res-j/blocks.6.hook_resid_pre",
              r"lists no release 'gpt2-small-res-j'; close: gpt2-small-res-jb"),
             ("sae_lens:gpt2-small-res-jb/blocks.6.hook_resid",
              r"has no SAE 'blocks.6.hook_resid'; it has 13, e.g. blocks.6.hook_resid_pre")]
    for spec, message in cases:
        with pytest.raises(ValueError, match=r"^SAE folder: '.*" + message):
            listed_saes([spec], what="SAE folder")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    with pytest.raises(ValueError, match=r"could not be fetched \(.*\): a release SAE needs "
                                         r"the internet once"):
        listed_saes([RELEASE])
    assert list((tmp_path / "sae_lens").iterdir()) == []  # no folder, full or empty, left


def test_refusals(tiny_world, tmp_path, monkeypatch, capsys):
    """A missing folder is refused before any LM is loaded; an SAE of another width is
    named, not skipped."""
    save_sae(_sae(d_in=16), tmp_path / "narrow")

    def no_lm(*a, **k):
        raise AssertionError("loaded an LM")
    with monkeypatch.context() as m:
        m.setattr(evaluate, "load_activations", no_lm)
        with pytest.raises(SystemExit):
            evaluate.main([str(tmp_path / "nope"), "--out", str(tmp_path / "e.json")])
    assert "is not a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        evaluate.main([str(tmp_path / "narrow"), "--out", str(tmp_path / "e.json"),
                       "--n-eval-tokens", "124", "--quiet"])
    assert ("narrow (" in (err := capsys.readouterr().err)
            and "not made for these activations: d_in 16, the activations' 32" in err)
    assert not (tmp_path / "e.json").exists()
