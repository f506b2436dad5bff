"""Offline interpretability measures on hand-made byte rows."""

import torch

from paper_lib import interp
from paper_lib.data.corpus import BOS


def row(text: str) -> torch.Tensor:
    return torch.tensor([[BOS] + list(text.encode())])


def test_byte_labels_hand_case():
    """'x = "a#b"  # c\\n        def Fo9' labelled by hand."""
    text = 'x = "a#b"  # c\n        def Fo9'
    lab = {k: v[0, 1:].tolist() for k, v in interp.byte_labels(row(text)).items()}
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
    lab = interp.byte_labels(row(r"'a\'b' c"))["in_string"][0, 1:].tolist()
    assert lab == [False, True, True, True, True, True, False, False]


def test_logistic_probe_separable_feature():
    """A latent equal to the label gives near-zero BCE; a useless one gives the prior."""
    y = (torch.arange(400) % 3 == 0)
    codes = torch.stack([y.float() * 2.0, torch.rand(400)], dim=1)
    res = interp.best_single_latent_probe(codes, y)
    assert res["latent"] == 0 and res["bce"] < 0.05 and res["relative"] < 0.1
    assert abs(res["prior_bce"] - 0.6365) < 0.02  # entropy (nats) of p = 1/3


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
