"""Token sources: the embedded corpus (offline default) and Hugging Face text datasets.

Embedded corpus (DESIGN.md): the running interpreter's standard library, its .py sources
plus the pydoc topics text, file list sorted and hashed so the corpus is identified,
loaded through `datasets.load_dataset("text", sample_by="document")`, split into train
and validation by file, and tokenised as bytes (256 byte values + BOS = 256).

Paper path: `hf_token_batches` streams any HF dataset (`load_dataset(name,
streaming=True)`), tokenises with a transformer-lens model's tokenizer and packs to the
context length with a BOS at the start of every row.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

from paper_lib.runtime import PROJECT_ROOT, atomic_write_text

BOS = 256
VOCAB = 257


@dataclass(frozen=True)
class Vocab:
    """How to read token ids as text: the embedded corpus's bytes (the default), or a
    tokenizer's subword pieces (the paper profile's GPT-2)."""

    size: int = VOCAB
    """Every id is below it (n-gram codes count in this base)."""
    bos: int = BOS
    piece: Any = None
    """id -> its text; None for bytes (id -> chr(id))."""

    def text(self, token: int) -> str:
        return chr(token) if self.piece is None else self.piece(token)


BYTES = Vocab()
_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_files(root: Path | None = None) -> list[Path]:
    """Sorted .py files of the standard library, without tests and third-party packages."""
    root = root or stdlib_root()
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS
                             and not (rel == Path(".") and d.startswith("config-")))
        out += [Path(dirpath) / f for f in filenames if f.endswith(".py")]
    return sorted(out)


def pydoc_topics_file(data_dir: Path) -> Path:
    """Write the interpreter's pydoc topics (the language reference text) to a file."""
    from pydoc_data.topics import topics

    path = data_dir / "corpus" / "pydoc_topics.txt"
    text = "\n\n".join(f"{k}\n{'=' * len(k)}\n{v}" for k, v in sorted(topics.items()))
    if not path.exists() or path.read_text() != text:
        atomic_write_text(path, text)
    return path


def hash_files(files: list[Path], root: Path) -> str:
    """sha256 over (relative path, content) of each file in order: the corpus identity."""
    h = hashlib.sha256()
    for f in files:
        rel = f.relative_to(root) if f.is_relative_to(root) else Path(f.name)
        h.update(str(rel).encode() + b"\0")
        h.update(f.read_bytes() + b"\0")
    return h.hexdigest()


@dataclass(frozen=True)
class Corpus:
    """The embedded corpus as two `datasets.Dataset`s with a "text" column."""

    train: Any
    validation: Any
    sha256: str
    n_files: int
    n_bytes: int

    def describe(self) -> str:
        return (f"stdlib corpus: {self.n_files} files, {self.n_bytes / 1e6:.1f} MB, "
                f"sha256 {self.sha256[:12]} (train {len(self.train)} / val "
                f"{len(self.validation)} files)")


def load_stdlib_corpus(data_dir: Path = PROJECT_ROOT / "data", val_every: int = 20,
                       files: list[Path] | None = None) -> Corpus:
    """The embedded corpus; every `val_every`-th file (sorted order) is validation."""
    import datasets

    datasets.disable_progress_bars()
    root = stdlib_root()
    files = list(files) if files is not None else stdlib_files(root)
    if not files or all(f.stat().st_size == 0 for f in files):
        raise ValueError("the corpus is empty: no readable text files were found "
                         f"under {root}")
    files.append(pydoc_topics_file(data_dir))
    val = [str(f) for i, f in enumerate(files) if i % val_every == 0]
    train = [str(f) for i, f in enumerate(files) if i % val_every != 0]
    if not train or not val:
        raise ValueError(f"the corpus has {len(files)} file(s): too few to split into "
                         f"train and validation (need at least 2)")
    ds = datasets.load_dataset("text", data_files={"train": train, "validation": val},
                               sample_by="document", encoding_errors="replace",
                               cache_dir=str(data_dir / "hf"))
    return Corpus(ds["train"], ds["validation"], hash_files(files, root), len(files),
                  sum(f.stat().st_size for f in files))


def byte_tokens(texts: list[str] | Iterator[str], n_ctx: int, max_rows: int | None = None,
                seed: int = 0) -> torch.Tensor:
    """Pack documents (shuffled with `seed`) into rows [BOS, b_1, ..., b_{n_ctx-1}] of
    byte ids; returns a LongTensor [rows, n_ctx]."""
    texts = list(texts)
    order = torch.randperm(len(texts), generator=torch.Generator().manual_seed(seed))
    per_row = n_ctx - 1
    need = None if max_rows is None else max_rows * per_row
    chunks, total = [], 0
    for i in order.tolist():
        b = texts[i].encode("utf-8", errors="replace")
        chunks.append(b)
        total += len(b) + 1
        if need is not None and total >= need:
            break
    stream = torch.frombuffer(bytearray(b"\n".join(chunks)), dtype=torch.uint8).long()
    rows = stream.numel() // per_row
    if max_rows is not None:
        rows = min(rows, max_rows)
    if rows == 0:
        raise ValueError(f"not enough text for one row of {n_ctx} tokens")
    body = stream[: rows * per_row].view(rows, per_row)
    return torch.cat([torch.full((rows, 1), BOS), body], dim=1)


def unigram_bits_per_byte(train: torch.Tensor, val: torch.Tensor) -> float:
    """Cross-entropy (bits/byte) of validation bytes under the add-one-smoothed byte
    unigram distribution of the training bytes (BOS excluded): the baseline an LM must beat."""
    counts = torch.bincount(train[:, 1:].flatten(), minlength=256).double() + 1
    logp = (counts / counts.sum()).log2()
    return float(-logp[val[:, 1:].flatten()].mean())


DOC_BATCH = 256  # documents per tokenizer call in `hf_token_batches`


def hf_token_batches(dataset: str, tokenizer: Any, n_ctx: int, batch_size: int,
                     split: str = "train", text_column: str = "text", streaming: bool = True,
                     data_files: Any = None, bos_id: int | None = None,
                     seed: int | None = None) -> Iterator[torch.Tensor]:
    """Stream a Hugging Face text dataset, tokenise with `tokenizer` and yield packed
    LongTensor batches [batch_size, n_ctx], each row starting with BOS. `seed`: documents
    in an order drawn by it (`shuffle`: shard order, then a buffer of 1000 documents), the
    same order on every call, so each seed reads another sample of the dataset."""
    import datasets

    try:
        ds = datasets.load_dataset(dataset, split=split, streaming=streaming,
                                   data_files=data_files)
    except OSError as e:  # incl. ConnectionError and datasets' not-found errors
        raise OSError(f"could not open dataset {dataset!r} ({e}). Streaming a hub dataset "
                      "needs the internet; offline, use dataset='stdlib' (the embedded "
                      "corpus) or a local text dataset via data_files.") from e
    if seed is not None:
        ds = ds.shuffle(seed=seed, buffer_size=1000) if streaming else ds.shuffle(seed=seed)
    bos = tokenizer.bos_token_id if bos_id is None else bos_id
    if bos is None:
        raise ValueError("the tokenizer has no BOS token; pass bos_id")
    per_row, buf, rows = n_ctx - 1, [], []
    texts = (t for t in (ex.get(text_column) for ex in ds) if t)
    # Documents are tokenised DOC_BATCH at a time: a fast tokenizer encodes a batch on all
    # cores (the same ids as one by one), and streaming runs read the text once per epoch.
    while group := list(itertools.islice(texts, DOC_BATCH)):
        for ids in tokenizer(group)["input_ids"]:
            buf.extend(ids)
            start = 0
            while len(buf) - start >= per_row:
                rows.append([bos] + buf[start:start + per_row])
                start += per_row
                if len(rows) == batch_size:
                    yield torch.tensor(rows, dtype=torch.long)
                    rows = []
            del buf[:start]
