"""Local stand-ins for the hub, so the `paper` path (a transformer-lens model from
`from_pretrained`, a dataset streamed through `datasets`) runs offline: a BPE tokenizer
trained here, a randomly initialised HookedTransformer with GPT-2's layer count, and a
local text file served for any hub dataset name.

`patch(folder, setattr)` installs them with a `setattr`-like function (pytest's
`monkeypatch.setattr` in a test); `install(folder)` does it for good, for a notebook
kernel (tests/test_paper_path.py loads it from an IPython startup file)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

N_LAYERS = 12  # GPT-2 small's: the paper presets' layers (01: 6, 7, 8) exist


def texts(lines: int) -> list[str]:
    return [f"line {i}: the quick brown fox jumps over the lazy dog {i * 7}"
            for i in range(lines)]


def tokenizer(lines: list[str], folder: Path) -> Any:
    """A real BPE tokenizer trained here and saved locally, so transformer-lens can reload
    it by path (it re-instantiates tokenizers from name_or_path)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if not (folder / "tokenizer.json").exists():
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel()
        tok.decoder = decoders.ByteLevel()  # as GPT-2's: decode gives " fox", not "Ġfox"
        tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=300,
                                                           special_tokens=["<bos>", "<unk>"]))
        PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>",
                                unk_token="<unk>").save_pretrained(folder)
    return PreTrainedTokenizerFast.from_pretrained(str(folder))


def patch(folder: Path, setattr: Callable[[Any, str, Any], None], lines: int = 400,
          n_layers: int = 2) -> tuple[Path, Any]:
    """Write the text file and tokenizer under `folder`, build the model, and redirect
    `HookedTransformer.from_pretrained` (any name) to it and `datasets.load_dataset` (any
    name but the builders "text"/"json"/...) to the text file. Returns (text file, tokenizer)."""
    import datasets
    from transformer_lens import HookedTransformer, HookedTransformerConfig

    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "owt.txt"
    body = texts(lines)
    data.write_text("\n".join(body))
    tok = tokenizer(body, folder / "tok")
    cfg = HookedTransformerConfig(n_layers=n_layers, d_model=32, n_heads=2, d_head=16,
                                  n_ctx=64 if n_layers <= 2 else 128, d_vocab=len(tok),
                                  act_fn="gelu", normalization_type="LN", device="cpu", seed=0)
    standin = HookedTransformer(cfg, tokenizer=tok, move_to_device=False)
    setattr(HookedTransformer, "from_pretrained",
            classmethod(lambda cls, name, **kw: standin))
    real = datasets.load_dataset

    def load_dataset(path: str, *args: Any, **kwargs: Any) -> Any:
        if "/" in path:  # a hub dataset name: serve the local file instead
            kwargs["data_files"] = str(data)
            path = "text"
        return real(path, *args, **kwargs)

    setattr(datasets, "load_dataset", load_dataset)
    return data, tok


def install(folder: Path, sae_root: Path) -> None:
    """The stand-ins for a whole process (a notebook kernel), with the notebooks' saved
    SAEs and checkpoints kept under `sae_root` instead of the project's data/."""
    import os

    from paper_lib.experiments import common

    os.environ["HF_HUB_OFFLINE"] = "1"
    patch(folder, lambda obj, name, value: setattr(obj, name, value), lines=2000,
          n_layers=N_LAYERS)
    common.SAE_ROOT = sae_root / "saes"
    common.CKPT_ROOT = sae_root / "ckpt"
