"""Offline interpretability measures on hand-made byte rows."""

import math

import pytest
import torch

from paper_lib import interp
from paper_lib.data.corpus import BOS, Vocab


def row(text: str) -> torch.Tensor:
    return torch.tensor([[BOS] + list(text.encode())])


def test_byte_labels_hand_case():
    """'x = "a#b"  # c\\n        def Fo9' labelled by hand."""
    text = 'x = "a#b"  # c\n        def Fo9'
    lab = {k: v[0, 1:].tolist() for k, v in interp.token_labels(row(text)).items()}
    pos = {i: ch for i, ch in enumerate(text)}
    in_str = [i for i, v in enumerate(lab["in_string"]) if v]
    assert "".join(pos[i] for i in in_str) == 'a#b"'  # the opening quote is outside
    in_com = [i for i, v in enumerate(lab["in_comment"]) if v]
    assert "".join(pos[i] for i in in_com) == " c"
    assert [pos[i] for i, v in enumerate(lab["line_start"]) if v] == [" "]
    assert [pos[i] for i, v in enumerate(lab["after_def"]) if v] == ["F"]
    assert [pos[i] for i, v in enumerate(lab["digit"]) if v] == ["9"]
    assert [pos[i] for i, v in enumerate(lab["uppercase"]) if v] == ["F"]
    indented = [i for i, v in enumerate(lab["indent_ge_8"]) if v]
    assert text[indented[0]:] == " def Fo9"  # from the 8th leading space on


def test_escaped_quote_stays_in_string():
    lab = interp.token_labels(row(r"'a\'b' c"))["in_string"][0, 1:].tolist()
    assert lab == [False, True, True, True, True, True, False, False]


def test_logistic_probe_separable_feature():
    """A latent equal to the label gives near-zero BCE; a useless one gives the prior."""
    y = (torch.arange(400) % 3 == 0)
    codes = torch.stack([y.float() * 2.0, torch.rand(400)], dim=1)
    res = interp.best_single_latent_probe(codes, y)
    assert res["latent"] == 0 and res["bce"] < 0.05 and res["relative"] < 0.1
    assert abs(res["prior_bce"] - 0.6365) < 0.02  # entropy (nats) of p = 1/3


def test_probe_latent_is_chosen_on_the_fit_half():
    """Latent 0 equals the label on the fit half and is noise on the test half; latent 1 the
    reverse. The probe must choose latent 0 (it never sees test labels when choosing) and
    report its poor held-out loss, not latent 1's near-zero one."""
    g = torch.Generator().manual_seed(0)
    y = torch.rand(800, generator=g) < 0.5
    noise = torch.rand(800, generator=g)
    half = torch.arange(800) < 400
    codes = torch.stack([torch.where(half, y.float(), noise),
                         torch.where(half, noise, y.float())], dim=1)
    res = interp.best_single_latent_probe(codes, y)
    assert res["latent"] == 0
    assert res["relative"] > 0.9  # no better than the prior on data it was not chosen on


def test_suffix_codes_and_decode():
    codes = interp.suffix_codes(row("abc"), max_n=2)
    assert interp.decode_code(int(codes[1][2]), 2) == "bc"
    assert int(codes[1][0]) == -1  # 'a' has no two-byte suffix in its row


def test_ngram_explanation_finds_the_trigger():
    """A latent that fires exactly on 'def' completions is explained by an n-gram ending in 'f'."""
    text = ("def f(): pass\nx = 1\n" * 40)
    tok = row(text)
    codes = torch.zeros(tok.shape[1] - 1, 2)
    for i, ch in enumerate(text):
        if text[max(0, i - 2):i + 1] == "def":
            codes[i, 0] = 1.0
    exp = interp.ngram_explanations(codes, tok, [0])
    assert exp[0]["precision"] == 1.0 and exp[0]["recall"] == 1.0
    assert exp[0]["ngram"].endswith("f") and exp[0]["pearson"] > 0.99


class _HookBeforeUnembed(torch.nn.Module):
    """A model whose one hook point `resid` sits between an embedding and the unembedding
    U = I: logits = hook(E[tokens]), so every log-probability can be worked out by hand."""

    def __init__(self, emb: torch.Tensor) -> None:
        super().__init__()
        self.E = torch.nn.Parameter(emb)

    def run_with_hooks(self, tokens, fwd_hooks):
        resid = self.E[tokens]
        for name, fn in fwd_hooks:
            assert name == "resid"
            resid = fn(resid)
        return resid


def test_latent_ablation_hand_case():
    """Tokens 0/1 embed as (0, 0) / (1, 0); column 0 is BOS (dropped). Latent 0 (decoder
    row (1, 0)) fires 0.5 at row 0's position 1 and 0.25 at its last position 3, and 0.1
    in row 2, which rows=1 leaves out (row 0 holds the strongest activation). Removing it
    turns the logits (1, 0) at positions 1 and 3 into (0.5, 0) and (0.75, 0). With
    lse(a) = log(e^a + 1), log p(token 0) = a - lse(a) and log p(token 1) = -lse(a); the
    next token after position 1 is 0, position 3 has none, and position 2 (latent silent,
    logits unchanged) is the only later position. Supported and suppressed tokens go by
    the mean change of probability: p(token 0) = sigmoid(a), p(token 1) = 1 - sigmoid(a)."""
    from paper_lib.sae import SAEConfig, make_sae

    tokens = torch.tensor([[0, 1, 0, 1], [0, 0, 0, 0], [0, 1, 1, 1]])
    model = _HookBeforeUnembed(torch.tensor([[0.0, 0.0], [1.0, 0.0]]))
    acts = model.E.detach()[tokens[:, 1:]].reshape(-1, 2)
    codes = torch.zeros(9, 2)
    codes[0, 0], codes[2, 0], codes[6, 0] = 0.5, 0.25, 0.1
    codes[4, 1] = 3.0  # another latent: stays in place
    sae = make_sae(SAEConfig("topk", 2, 2, k=1))
    sae.set_decoder_(torch.eye(2))
    eff = interp.latent_ablation(model, "resid", tokens, acts, codes, sae, latent=0, rows=1,
                                 top=2)

    def lse(a):
        return math.log(math.exp(a) + 1)
    def sigmoid(a):
        return 1 / (1 + math.exp(-a))
    assert (eff.rows, eff.positions) == (1, 2)
    assert eff.next_token == pytest.approx((0.5 - lse(0.5)) - (1 - lse(1)), abs=1e-6)
    assert eff.elsewhere == pytest.approx(0.0, abs=1e-7)
    dp0 = (sigmoid(0.5) + sigmoid(0.75)) / 2 - sigmoid(1)   # token 0, mean of positions 1, 3
    assert [t for t, _ in eff.supported] == [0, 1]
    assert [v for _, v in eff.supported] == pytest.approx([dp0, -dp0], abs=1e-6)
    assert [t for t, _ in eff.suppressed] == [1, 0]
    assert interp.latent_ablation(model, "resid", tokens, acts, torch.zeros(9, 2), sae, 0) is None


PIECES = {1: "def", 2: " foo", 3: "(", 4: "'A", 5: "1'", 6: ")", 7: "\n", 8: "  #", 9: " X"}
SUBWORDS = Vocab(size=10, bos=0, piece=PIECES.__getitem__)


def test_subword_tokens_take_the_labels_of_their_first_visible_character():
    """Text "def foo('A1')\n  # X" in subword pieces: ' foo' follows "def " (its 'f'
    does), "'A" opens the string (its quote is not inside one) while "1'" is inside it, and
    ' X' sits in the comment that '  #' opens."""
    lab = interp.token_labels(torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]]), SUBWORDS)
    where = {t: [i for i, v in enumerate(lab[t][0].tolist()) if v] for t in interp.TASKS}
    assert where["after_def"] == [2]
    assert where["in_string"] == [5] and where["digit"] == [5]
    assert where["in_comment"] == [9] and where["uppercase"] == [9]
    assert where["line_start"] == [] and where["indent_ge_8"] == []


def test_ngram_codes_count_in_the_vocabulary_size():
    """In base 257 the bigrams (1, 43) and (0, 300) share a code (257 + 43 = 300); counted in
    the vocabulary's size they do not, and a code decodes back to its pieces' text."""
    vocab = Vocab(size=1000, bos=999, piece=str)
    rows = torch.tensor([[999, 1, 43], [999, 0, 300]])
    bigrams = interp.suffix_codes(rows, max_n=2, vocab=vocab)[1].view(2, 2)
    assert bigrams[0, 1] != bigrams[1, 1] and bigrams[0, 0] == bigrams[1, 0] == -1
    codes = interp.suffix_codes(torch.tensor([[0, 1, 2, 3]]), max_n=2, vocab=SUBWORDS)[1]
    assert int(codes[2]) == 2 * 10 + 3 and interp.decode_code(23, 2, SUBWORDS) == " foo("
    with pytest.raises(ValueError, match="do not fit an int64 code"):
        interp.suffix_codes(rows, max_n=7, vocab=Vocab(size=50257, bos=0, piece=str))
