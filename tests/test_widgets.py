"""Widget explorers without a browser: set values, check the outputs change."""

from types import SimpleNamespace

import pytest
import torch

from paper_lib import interp
from paper_lib.data.corpus import byte_tokens
from paper_lib.data.harvest import harvest, row_batches
from paper_lib.experiments.matryoshka import matryoshka_config
from paper_lib.sae import SAEConfig, load_sae, make_sae, save_sae
from paper_lib.train import ShuffledBatches, TrainConfig, train_saes
from paper_lib.widgets import ExplorerData, LatentExplorer, PrefixExplorer, ZFExplorer, saved_saes


@pytest.fixture(scope="module")
def data(tiny_lm, tiny_corpus, tmp_path_factory):
    """Held-out activations of the tiny LM and two SAEs saved and reloaded from disk."""
    model, _ = tiny_lm
    tokens = byte_tokens(list(tiny_corpus.validation["text"]) + list(tiny_corpus.train["text"]), 32,
                         max_rows=96)
    hook = "blocks.1.hook_resid_pre"
    acts = harvest(model, row_batches(tokens, 16), hook, tokens.shape[0] * 31, progress=False)
    cfgs = [SAEConfig("topk", 32, 128, k=4, hook_name=hook),
            matryoshka_config(32, 128, 4, 16, hook_name=hook, model_name="tiny", seed=0)]
    res = train_saes([make_sae(c) for c in cfgs], ShuffledBatches(acts, 256),
                     TrainConfig(steps=60, lr=3e-3, progress=False), init_x=acts[:512])
    root = tmp_path_factory.mktemp("saes")
    for name, r in zip(("topk", "matryoshka"), res):
        save_sae(r.sae, root / "smoke" / name)
    paths = saved_saes(root)
    assert set(paths) == {"smoke/topk", "smoke/matryoshka"}
    saes = ExplorerData.load_saes(paths, d_in=32)

    def token_str(t):
        return "<BOS>" if t == 256 else bytes([t]).decode("latin-1")

    return ExplorerData(acts, tokens, model, token_str, lambda s: list(s.encode()), saes,
                        hook=hook)


def test_sparse_codes_read_as_the_dense_matrix():
    """The explorers keep codes as their nonzero entries: a latent's column, tokens' rows
    (a list, a tensor, one token), tokens' mean code, firing rates and per-token norms
    (scaled per latent) equal those of the dense matrix, a token with no active latent
    included; encoding in blocks gives the SAE's own codes (to rounding)."""
    from paper_lib.widgets import SparseCodes

    dense = torch.tensor([[0.0, 2.0, 0.0, 1.0],
                          [0.0, 0.0, 0.0, 0.0],
                          [3.0, 0.0, 0.0, 4.0],
                          [0.0, 0.5, 0.0, 0.0]])
    r, c = dense.nonzero(as_tuple=True)
    codes = SparseCodes(r, c, dense[r, c], (4, 4))
    assert torch.equal(codes[:, 3], torch.tensor([1.0, 0.0, 4.0, 0.0]))
    assert torch.equal(codes[[2, 1, 0]], dense[[2, 1, 0]])
    assert torch.equal(codes[torch.tensor([3])], dense[[3]]) and torch.equal(codes[2], dense[2])
    assert torch.equal(codes.mean_rows(torch.tensor([0, 2])), torch.tensor([1.5, 1.0, 0.0, 2.5]))
    assert torch.equal(codes.firing_rates(), torch.tensor([0.25, 0.5, 0.0, 0.5]))
    scale = torch.tensor([1.0, 2.0, 3.0, 0.5])
    assert torch.allclose(codes.norms(scale), torch.tensor([(16 + 0.25) ** 0.5, 0.0,
                                                            (9 + 4) ** 0.5, 1.0]))
    sae = make_sae(SAEConfig("topk", 8, 32, k=3)).eval()
    x = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    blocks = SparseCodes.encode(sae, x, entries=32 * 7)  # 7 tokens a block
    with torch.no_grad():
        want = sae.encode(x)
    # (blocks of other sizes may round the encoder product differently in the last bit)
    assert torch.allclose(blocks[torch.arange(50)], want, rtol=1e-5, atol=1e-6)
    assert len(blocks) == 50 and torch.equal(blocks[torch.arange(50)] > 0, want > 0)


def test_explorer_loads_only_saes_made_for_these_activations(tmp_path):
    """Saved SAEs of the same width but another hook or model are left out; one that
    records neither is taken on trust (its d_in is all there is to check)."""
    l0, l1 = "blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"
    specs = {"here": (l1, "tiny"), "other_layer": (l0, "tiny"), "other_model": (l1, "gpt2"),
             "unrecorded": ("", ""), "wider": (l1, "tiny")}
    for name, (hook, model) in specs.items():
        d_in = 16 if name == "wider" else 8
        save_sae(make_sae(SAEConfig("topk", d_in, 32, k=2, hook_name=hook, model_name=model)),
                 tmp_path / name)
    got = ExplorerData.load_saes(saved_saes(tmp_path), 8, "blocks.1.hook_resid_pre", "tiny")
    assert sorted(got) == ["here", "unrecorded"]


def test_saes_match_their_model_by_official_name_and_weight_processing(tmp_path):
    """An SAE that records a transformer-lens alias of the LM (SAELens' GPT-2 SAEs say
    "gpt2-small") fits "gpt2"; one whose LM was loaded with other weight processing (here
    center_writing_weights=False, another residual stream) or that read text without BOS
    does not, and a listed one says why."""
    import json

    from paper_lib.data.lm import PROCESSING_DEFAULTS

    hook = "blocks.1.hook_resid_pre"
    for name, model, kwargs, bos in (
            ("alias", "gpt2-small", {"center_writing_weights": True}, True),
            ("uncentred", "gpt2", {"center_writing_weights": False}, True),
            ("no_bos", "gpt2", {}, False), ("other", "gpt2-medium", {}, True)):
        save_sae(make_sae(SAEConfig("topk", 8, 32, k=2, hook_name=hook, model_name=model)),
                 tmp_path / name)
        cfg = json.loads((tmp_path / name / "cfg.json").read_text())
        cfg["metadata"].update(model_from_pretrained_kwargs=kwargs, prepend_bos=bos)
        (tmp_path / name / "cfg.json").write_text(json.dumps(cfg))
    # older SAELens files record model and hook at the top level, not under "metadata"
    save_sae(make_sae(SAEConfig("topk", 8, 32, k=2)), tmp_path / "old_format")
    cfg = json.loads((tmp_path / "old_format" / "cfg.json").read_text())
    del cfg["metadata"]
    cfg.update(model_name="gpt2", hook_name="blocks.0.hook_resid_pre")
    (tmp_path / "old_format" / "cfg.json").write_text(json.dumps(cfg))
    assert sorted(ExplorerData.load_saes(saved_saes(tmp_path), 8, hook, "gpt2")) == ["alias"]
    with pytest.raises(ValueError, match=r"old_format .* hook 'blocks.0.hook_resid_pre'"):
        ExplorerData.load_saes(saved_saes(tmp_path), 8, hook, "gpt2", required=("old_format",))
    with pytest.raises(ValueError, match=r"uncentred .* its LM loaded with "
                                         r"center_writing_weights=False \(here True\)"):
        ExplorerData.load_saes(saved_saes(tmp_path), 8, hook, "gpt2", required=("uncentred",))
    with pytest.raises(ValueError, match=r"no_bos .* \(prepend_bos=False\)"):
        ExplorerData.load_saes(saved_saes(tmp_path), 8, hook, "gpt2", required=("no_bos",))
    # load_lm takes from_pretrained's defaults: the table of them must be transformer-lens'
    import inspect

    from transformer_lens import HookedTransformer
    params = inspect.signature(HookedTransformer.from_pretrained).parameters
    assert {k: params[k].default for k in PROCESSING_DEFAULTS} == PROCESSING_DEFAULTS


def test_listed_saes_are_found_named_and_must_fit(tmp_path):
    """`-p sae_dirs`: a folder that is one SAE or holds several, read from the project root
    when relative and named as given; a missing or empty folder is refused by name before
    any work, and a listed SAE made for other activations raises instead of being skipped."""
    from paper_lib.config import ExploreParams
    from paper_lib.sae.io import listed_saes
    from paper_lib.widgets import sae_source

    l1 = "blocks.1.hook_resid_pre"
    for name, hook in (("mine/a", l1), ("mine/b", "blocks.0.hook_resid_pre"), ("one", l1)):
        save_sae(make_sae(SAEConfig("topk", 8, 32, k=2, hook_name=hook)), tmp_path / name)
    (tmp_path / "empty").mkdir()
    found = listed_saes(["mine", "one/"], root=tmp_path)
    assert found == {"listed/mine/a": tmp_path / "mine/a", "listed/mine/b": tmp_path / "mine/b",
                     "listed/one": tmp_path / "one"}
    absolute = listed_saes([str(tmp_path / "one")], root=tmp_path / "elsewhere")
    assert absolute == {"listed/" + str(tmp_path / "one").strip("/"): tmp_path / "one"}
    assert sae_source(tmp_path / "one", root=tmp_path / "mine") == str(tmp_path / "one")
    assert sae_source(tmp_path / "mine/a", root=tmp_path / "mine") == "a"
    with pytest.raises(ValueError, match=r"'sae_dirs': 'empty' .* holds no saved SAE"):
        listed_saes(["empty"], root=tmp_path)
    save_sae(make_sae(SAEConfig("topk", 8, 32, k=2)), tmp_path / "elsewhere/one")
    both = listed_saes(["one", "elsewhere/one"], root=tmp_path)  # named as given: no clash
    assert both == {"listed/one": tmp_path / "one",
                    "listed/elsewhere/one": tmp_path / "elsewhere/one"}
    # an absolute path and the relative path of the same letters name other folders
    mirror = str(tmp_path / "one").strip("/")
    save_sae(make_sae(SAEConfig("topk", 8, 32, k=2)), tmp_path / mirror)
    assert listed_saes(["one", "one/"], root=tmp_path) == {"listed/one": tmp_path / "one"}
    with pytest.raises(ValueError, match=r"names listed/.*/one as an earlier entry does, but "
                                         r"for another folder"):
        listed_saes([str(tmp_path / "one"), mirror], root=tmp_path)
    with pytest.raises(ValueError, match=r"'sae_dirs': 'nope' .* is not a folder"):
        ExploreParams.from_profile("smoke", sae_dirs="nope")  # one path: a list of one
    got = ExplorerData.load_saes(found, 8, l1, "", required=("listed/one",))
    assert sorted(got) == ["listed/mine/a", "listed/one"]  # b, not required, is skipped
    with pytest.raises(ValueError, match=r"listed/mine/b .* not made for these activations: "
                                         r"hook 'blocks.0.hook_resid_pre', the activations' "
                                         r"'blocks.1.hook_resid_pre'"):
        ExplorerData.load_saes(found, 8, l1, "", required=tuple(found))


def test_explorer_lists_reference_and_custom_run_saes(tmp_path):
    """Notebooks run with non-preset parameters save under <profile>-custom/, so they do
    not replace the reference SAEs; the explorer offers both, the custom ones marked, or the
    reference ones alone."""
    from paper_lib.widgets import profile_saes

    assert profile_saes(tmp_path, "smoke") == {}
    for folder in ("smoke/03_topk_scaling/topk", "smoke-custom/03_topk_scaling/topk",
                   "gpu/01_afa_bound/relu"):
        save_sae(make_sae(SAEConfig("topk", 8, 32, k=2)), tmp_path / folder)
    got = profile_saes(tmp_path, "smoke")
    assert got == {"03_topk_scaling/topk": tmp_path / "smoke/03_topk_scaling/topk",
                   "custom/03_topk_scaling/topk": tmp_path / "smoke-custom/03_topk_scaling/topk"}
    # what a preset run of 05 explores (-p custom_saes False): its record is the reference,
    # so it does not depend on the custom runs one machine happens to have made
    assert profile_saes(tmp_path, "smoke", custom=False) == {
        "03_topk_scaling/topk": tmp_path / "smoke/03_topk_scaling/topk"}


def test_latent_explorer_updates(data):
    ex = LatentExplorer(data)
    first_html, first_png = ex.contexts.value, ex.histogram.value
    assert "latent 0" in first_html and first_png[:4] == b"\x89PNG"
    ex.latent_slider.value = 5
    assert "latent 5" in ex.contexts.value and ex.contexts.value != first_html
    assert ex.histogram.value != first_png
    assert "promotes" in ex.promoted.value
    ex.sae_dropdown.value = "smoke/matryoshka"
    assert ex.latent_slider.max == 127


def test_latent_explorer_effect_and_neighbours(data):
    """The effect panel re-runs the LM with the latent removed where it fires (a latent
    that fires changes the next-token log-probabilities); the neighbours panel lists the
    closest latent of every other SAE, so an SAE loaded twice finds each latent itself."""
    import copy
    import dataclasses

    ex = LatentExplorer(data)
    ex.sae_dropdown.value = "smoke/topk"
    j = int(data.codes("smoke/topk").firing_rates().argmax())  # the most frequent
    ex.latent_slider.value = j
    assert "removing it</b> from blocks.1.hook_resid_pre" in ex.effect.value
    assert "it supports" in ex.effect.value and "it suppresses" in ex.effect.value
    eff = interp.latent_ablation(data.model, data.hook, data.tokens, data.acts,
                                 data.codes("smoke/topk"), data.saes["smoke/topk"], j)
    assert eff.positions > 0 and eff.next_token != 0
    assert "smoke/matryoshka" in ex.neighbours.value and "smoke/topk<" not in ex.neighbours.value
    twice = dataclasses.replace(data, saes={"a": data.saes["smoke/topk"],
                                            "b": data.saes["smoke/topk"]}, _codes={})
    ex2 = LatentExplorer(twice)
    ex2.latent_slider.value = 7
    assert "<tr><td>b</td><td>7</td><td>1.00</td><td>1.00</td></tr>" in ex2.neighbours.value
    foreign = copy.deepcopy(data.saes["smoke/topk"])
    foreign.init_known = False  # as load_sae marks an SAE SAELens saved: its start is unknown
    ex3 = LatentExplorer(dataclasses.replace(twice, saes={"a": twice.saes["a"], "b": foreign}))
    ex3.latent_slider.value = 7
    assert "<tr><td>b</td><td>7</td><td>1.00</td><td>n/a</td></tr>" in ex3.neighbours.value
    no_hook = LatentExplorer(dataclasses.replace(data, hook="", _codes={}))
    assert no_hook.effect.value == ""  # nothing to re-run without knowing the hook


def test_latent_explorer_links_latents_of_neuronpedia_saes(data, tmp_path):
    """An SAE whose file records a Neuronpedia id (SAELens' release SAEs do) gets a link to
    the shown latent's page there, following the slider; one without gets none."""
    import json
    from dataclasses import replace

    from paper_lib.widgets import NEURONPEDIA

    for name in ("smoke/topk", "smoke/matryoshka"):
        save_sae(data.saes[name], tmp_path / name)
    cfg_file = tmp_path / "smoke/topk/cfg.json"
    cfg = json.loads(cfg_file.read_text())
    cfg["metadata"]["neuronpedia_id"] = "gpt2-small/6-res-jb"
    cfg_file.write_text(json.dumps(cfg))
    acts_set = SimpleNamespace(eval=data.acts, scale=1.0, eval_tokens=data.tokens,
                               model=data.model, token_str=data.token_str,
                               encode_text=data.encode_text, drop_bos=True, hook=data.hook)
    linked = ExplorerData.from_activations(acts_set, data.saes, paths=saved_saes(tmp_path))
    assert linked.neuronpedia == {"smoke/topk": "gpt2-small/6-res-jb"}
    ex = LatentExplorer(replace(linked, _codes=data._codes))
    ex.sae_dropdown.value, ex.latent_slider.value = "smoke/topk", 7
    assert f'href="{NEURONPEDIA}/gpt2-small/6-res-jb/7"' in ex.contexts.value
    ex.latent_slider.value = 9
    assert f'href="{NEURONPEDIA}/gpt2-small/6-res-jb/9"' in ex.contexts.value
    ex.sae_dropdown.value = "smoke/matryoshka"
    assert "neuronpedia" not in ex.contexts.value


def test_explorer_notes_saes_trained_on_shorter_rows(data, tmp_path):
    """An SAE whose file records a training context shorter than the explored rows gets a
    line saying its codes past that position are outside its training; one trained on rows
    as long, or recording none, gets none."""

    rows = data.tokens.shape[1]
    for name, context in (("smoke/topk", rows), ("smoke/matryoshka", 16)):
        save_sae(data.saes[name], tmp_path / name, metadata={"context_size": context})
    acts_set = SimpleNamespace(eval=data.acts, scale=1.0, eval_tokens=data.tokens,
                               model=data.model, token_str=data.token_str,
                               encode_text=data.encode_text, drop_bos=True, hook=data.hook)
    explored = ExplorerData.from_activations(acts_set, data.saes, paths=saved_saes(tmp_path))
    assert explored.contexts == {"smoke/topk": rows, "smoke/matryoshka": 16}
    assert explored.context_notes() == [
        f"smoke/matryoshka: trained on contexts of 16 tokens, explored on rows of {rows}: its "
        "codes past position 16 are outside what it was trained on (-p context_size 16 reads "
        "rows of its length)"]
    assert ExplorerData.from_activations(acts_set, data.saes).context_notes() == []


def test_latent_search_picks_a_firing_latent(data):
    ex = LatentExplorer(data)
    ex.search.value = "def "
    assert "best latent for 'def '" in ex.status.value
    j = ex.latent_slider.value
    hits = data.find("def ")
    assert len(hits) > 0 and data.codes(ex.sae_dropdown.value)[hits][:, j].mean() > 0
    ex.search.value = "\x01\x02never"
    assert "does not occur" in ex.status.value


def test_context_indices_hand_case():
    """Activations (0, 5, 1, 0, 3, 2, 4): the 3 strongest are tokens 1, 6, 4; spread over
    the 5 active ones ranked (1, 6, 4, 5, 2), ranks 0, 2 and 4 are tokens 1, 4, 2."""
    from paper_lib.widgets import context_indices

    a = torch.tensor([0.0, 5, 1, 0, 3, 2, 4])
    assert context_indices(a, 3) == [1, 6, 4]
    assert context_indices(a, 3, spread=True) == [1, 4, 2]
    assert context_indices(a, 9, spread=True) == [1, 6, 4, 5, 2]  # fewer active than asked
    assert context_indices(torch.zeros(4), 3) == []


def test_latent_explorer_spread_contexts_and_token_search(data):
    ex = LatentExplorer(data)
    ex.sae_dropdown.value = "smoke/topk"
    ex.latent_slider.value = int(data.codes("smoke/topk").firing_rates().argmax())
    strongest = ex.contexts.value
    ex.spread.value = "across its range"
    assert ex.contexts.value != strongest and "fires on" in ex.contexts.value
    ex.token_search.value = "("
    t = ord("(")
    logits = data.saes["smoke/topk"].W_dec.detach() @ data.model.W_U.detach()[:, t]
    assert ex.latent_slider.value == int(logits.argmax())
    assert "latent promoting" in ex.status.value and "&#x27;(&#x27;" in ex.status.value


def test_find_locates_text(data):
    hits = data.find("def")
    row, pos = data.locate(int(hits[0]))
    assert bytes(data.tokens[row, pos - 2:pos + 1].tolist()) == b"def"


def test_zf_explorer_band_and_selection(data):
    ex = ZFExplorer(data)
    png, summary = ex.plot.value, ex.summary.value
    ex.band.value = 1.5
    assert ex.plot.value != png and ex.summary.value != summary
    before = ex.contexts.value
    ex.ratio_range.value = (0.5, 1.0)
    assert ex.contexts.value != before and "tokens with ratio in [0.50, 1.00]" in ex.contexts.value


def test_prefix_explorer_changes_fvu(data):
    ex = PrefixExplorer(data, "smoke/matryoshka", n_eval=512)
    full = ex.fvu.value
    ex.prefix.value = ex.prefix.options[0]
    assert ex.fvu.value != full and "first 16 latents" in ex.fvu.value
    assert "active latents kept" in ex.active.value
    fvus = ex.curve
    assert fvus[0] >= fvus[-1] - 1e-6  # the full dictionary reconstructs at least as well


def test_loaded_sae_matches_saved(tmp_path):
    sae = make_sae(SAEConfig("topk", 8, 16, k=2))
    save_sae(sae, tmp_path / "a")
    assert torch.equal(load_sae(tmp_path / "a").W_dec, sae.W_dec)
