"""Offline interpretability measures on token positions (the embedded corpus's bytes, or a
tokenizer's pieces).

- `token_labels`: binary features of Python source we can label without any model
  (inside a string, inside a comment, line start, after `def `, digit, uppercase,
  indentation >= 8), one label per token position (bytes, or a tokenizer's pieces: `Vocab`);
- `best_single_latent_probe`: Gao et al.'s probe loss (Sec. 4.2): the best 1-D logistic
  probe on one latent, per task, fit on one half of the positions and scored on the other;
- `ngram_explanations`: N2G-style explanations (Gao et al. Sec. 4.3; Foote et al. 2023):
  per latent, the token n-gram (n <= 3, ending at the position) that best predicts firing,
  with held-out precision, recall and the Pearson correlation between the explanation's
  simulated activation and the true one (the offline proxy for Peter & Sogaard's
  explanation-correlation score);
- `ablation_sparsity`: how many output logits ablating one latent changes
  ((L1/L2)^2 / size of the logit-difference vector; Gao et al. Sec. 4.5);
- `latent_ablation`: what removing one latent's contribution from the model's own
  activation does to its next-token predictions where the latent fires (the explorer's
  "effect" panel).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from paper_lib import metrics
from paper_lib.data.corpus import BYTES, Vocab

TASKS = ("in_string", "in_comment", "line_start", "after_def", "digit", "uppercase",
         "indent_ge_8")


def token_labels(tokens: Tensor, vocab: Vocab = BYTES) -> dict[str, Tensor]:
    """[rows, T] tokens -> {task: bool [rows, T]}. The labels are properties of characters
    (a state machine over each row's text); a token takes those of its first non-space
    character (of its only one, for bytes). Rows are chunks of files, so the line state
    starts unknown (assumed outside strings/comments) at each row's start."""
    rows, width = tokens.shape
    out = {t: np.zeros((rows, width), dtype=bool) for t in TASKS}
    toks = tokens.cpu().numpy()
    for r in range(rows):
        chars: list[str] = []
        at: list[int] = []  # token position -> index of its labelling character, or -1
        for i in range(width):
            t = int(toks[r, i])
            piece = "" if t == vocab.bos else vocab.text(t)
            lead = len(piece) - len(piece.lstrip(" "))  # leading spaces
            at.append((len(chars) + (lead if lead < len(piece) else 0)) if piece else -1)
            chars.extend(piece)
            if t == vocab.bos:
                chars.append("")  # BOS: no character, but it breaks the line-start context
        lab = _char_labels(chars)
        for i, c in enumerate(at):
            if c >= 0:
                for task in TASKS:
                    out[task][r, i] = lab[task][c]
    return {t: torch.from_numpy(v) for t, v in out.items()}


def _char_labels(chars: list[str]) -> dict[str, list[bool]]:
    """The tasks' labels of each character of one row ("" stands for BOS)."""
    out: dict[str, list[bool]] = {t: [False] * len(chars) for t in TASKS}
    quote, comment, escape, indent, seen_text, prev = None, False, False, 0, False, ""
    recent: list[str] = []
    for i, ch in enumerate(chars):
        if ch == "":
            prev = ch
            continue
        out["in_string"][i] = quote is not None and ch != "\n"
        out["in_comment"][i] = comment and ch != "\n"
        out["line_start"][i] = prev == "\n"
        out["after_def"][i] = "".join(recent[-4:]) == "def "
        out["digit"][i] = ch.isdigit()
        out["uppercase"][i] = "A" <= ch <= "Z"
        if ch == "\n":
            quote, comment, escape, indent, seen_text = None, False, False, 0, False
        else:
            if not seen_text:
                if ch == " ":
                    indent += 1
                else:
                    seen_text = True
            if quote is not None:
                if escape:
                    escape = False
                elif ch == "\\":
                    escape = True
                elif ch == quote:
                    quote = None
            elif not comment:
                if ch in "'\"":
                    quote = ch
                elif ch == "#":
                    comment = True
        out["indent_ge_8"][i] = indent >= 8
        recent = (recent + [ch])[-4:]
        prev = ch
    return out


def position_labels(tokens: Tensor, n: int | None = None, drop_bos: bool = True,
                    vocab: Vocab = BYTES) -> dict[str, Tensor]:
    """Labels flattened to match activation rows (positions 1.. when drop_bos), first n."""
    lab = token_labels(tokens, vocab)
    start = 1 if drop_bos else 0
    return {t: v[:, start:].reshape(-1)[:n] for t, v in lab.items()}


# --------------------------------------------------------------------------- probes


def _bce(p: Tensor, y: Tensor) -> Tensor:
    p = p.clamp(1e-7, 1 - 1e-7)
    return -(y * p.log() + (1 - y) * (1 - p).log()).mean(0)


def logistic_1d(feats: Tensor, y: Tensor, iters: int = 25,
                ridge: float = 1e-4) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fit y ~ sigmoid(w * standardised(f) + c) for every column of feats [N, m] at once by
    Newton's method; returns (w, c, mean, std) per column."""
    y = y.double()
    f = feats.double()
    mu, sd = f.mean(0), f.std(0).clamp_min(1e-8)
    z = (f - mu) / sd
    w = torch.zeros(f.shape[1], dtype=torch.float64, device=f.device)
    c = torch.full_like(w, float(torch.logit(y.mean().clamp(1e-4, 1 - 1e-4))))
    for _ in range(iters):
        p = torch.sigmoid(z * w + c)
        r = (p - y[:, None])
        s = p * (1 - p)
        gw, gc = (r * z).sum(0), r.sum(0)
        hww, hwc, hcc = (s * z * z).sum(0) + ridge, (s * z).sum(0), s.sum(0) + ridge
        det = hww * hcc - hwc * hwc
        w = w - (hcc * gw - hwc * gc) / det
        c = c - (hww * gc - hwc * gw) / det
    return w, c, mu, sd


def best_single_latent_probe(codes: Tensor, y: Tensor, candidates: int = 64,
                             chunk: int = 2048) -> dict[str, float]:
    """Gao et al.'s probe loss for one binary task: fit a 1-D logistic probe on each latent
    (first half of rows) and pick the latent whose probe fits best there; report that
    probe's BCE on the second half, with the BCE of the constant (prior) predictor for scale.
    Choosing on the fit half keeps the reported loss held out: the best of many latents on
    the test half would be an optimistic estimate. Only the `candidates` latents most
    correlated with the label on the fit half are probed (a 1-D probe's loss is monotone in
    that correlation up to the link's nonlinearity)."""
    n = codes.shape[0] // 2
    y_fit, y_test = y[:n].double(), y[n:].double()
    live = (metrics.firing_count(codes[:n]) > 0).nonzero().flatten()
    if len(live) > candidates:
        yc = y_fit - y_fit.mean()
        corr = []
        # a block of latents at a time: all of a 131,072-latent SAE's in float64 would take
        # 34 GB per 32,768 rows, twice (each column is standardised on its own)
        for i in range(0, len(live), 8192):
            f = codes[:n, live[i:i + 8192]].double()
            f = (f - f.mean(0)) / f.std(0).clamp_min(1e-12)
            corr.append((f.T @ yc).abs())
        live = live[torch.cat(corr).topk(candidates).indices]
    p0 = float(y_fit.mean())
    prior = float(_bce(torch.full((len(y_test), 1), p0, dtype=torch.float64), y_test[:, None]))
    # The constant predictor competes too: a latent must fit better than it to be chosen.
    best_fit = float(_bce(torch.full((n, 1), p0, dtype=torch.float64), y_fit[:, None]))
    best_loss, best_latent = prior, -1
    for i in range(0, len(live), chunk):
        idx = live[i:i + chunk]
        w, c, mu, sd = logistic_1d(codes[:n, idx], y_fit)
        fit = _bce(torch.sigmoid((codes[:n, idx].double() - mu) / sd * w + c), y_fit[:, None])
        j = int(fit.argmin())
        if float(fit[j]) < best_fit:
            z = (codes[n:, idx[j]].double() - mu[j]) / sd[j]
            best_fit, best_latent = float(fit[j]), int(idx[j])
            best_loss = float(_bce(torch.sigmoid(z * w[j] + c[j])[:, None], y_test[:, None]))
    return {"bce": best_loss, "prior_bce": prior, "relative": best_loss / prior,
            "latent": best_latent}


def probe_losses(codes: Tensor, labels: dict[str, Tensor]) -> dict[str, dict[str, float]]:
    """best_single_latent_probe for every task with both classes present."""
    out = {}
    for task, y in labels.items():
        frac = float(y.float().mean())
        if 0.001 < frac < 0.999:
            out[task] = best_single_latent_probe(codes.cpu(), y.cpu())
    return out


# --------------------------------------------------------------------------- n-grams


def suffix_codes(tokens: Tensor, max_n: int = 3, drop_bos: bool = True,
                 vocab: Vocab = BYTES) -> list[Tensor]:
    """For n = 1..max_n, an int64 code of the n tokens ending at each position (-1 where the
    row has fewer than n tokens after BOS), flattened like the activations. The code counts
    in base vocab.size, so distinct n-grams never share one (GPT-2: 50257^3 < 2^63)."""
    if vocab.size ** max_n >= 2 ** 63:
        raise ValueError(f"n-grams of {max_n} tokens over a vocabulary of {vocab.size} do not "
                         "fit an int64 code: lower max_n")
    t = tokens.long()
    rows, width = t.shape
    out = []
    for n in range(1, max_n + 1):
        code = torch.full((rows, width), -1, dtype=torch.long)
        if width >= n:
            acc = torch.zeros(rows, width - n + 1, dtype=torch.long)
            valid = torch.ones_like(acc, dtype=torch.bool)
            for j in range(n):
                part = t[:, j:width - n + 1 + j]
                acc = acc * vocab.size + part
                valid &= part != vocab.bos
            code[:, n - 1:] = torch.where(valid, acc, torch.full_like(acc, -1))
        start = 1 if drop_bos else 0
        out.append(code[:, start:].reshape(-1))
    return out


def decode_code(code: int, n: int, vocab: Vocab = BYTES) -> str:
    """The text of the n-gram a suffix code stands for."""
    ids = []
    for _ in range(n):
        code, t = divmod(code, vocab.size)
        ids.append(t)
    return "".join(vocab.text(t) for t in reversed(ids))


def ngram_explanations(codes: Tensor, tokens: Tensor, latents: list[int], max_n: int = 3,
                       top: int = 20, drop_bos: bool = True,
                       vocab: Vocab = BYTES) -> list[dict[str, Any]]:
    """Best n-gram explanation per latent; fit on the first half of positions, scored on
    the second half (precision, recall, F1, and Pearson r of simulated activations)."""
    n_pos = codes.shape[0]
    suffix = [c[:n_pos] for c in suffix_codes(tokens, max_n, drop_bos, vocab)]
    half = n_pos // 2
    out = []
    for j in latents:
        a = codes[:, j].float().cpu()
        fire = a > 0
        if int(fire[:half].sum()) == 0 or int(fire[half:].sum()) == 0:
            continue
        top_pos = a[:half].topk(min(top, int(fire[:half].sum()))).indices
        best = None
        for n, code in enumerate(suffix, start=1):
            for cand in set(code[top_pos].tolist()) - {-1}:
                match = code[:half] == cand
                tp = int((match & fire[:half]).sum())
                prec = tp / max(1, int(match.sum()))
                rec = tp / max(1, int(fire[:half].sum()))
                f1 = 2 * prec * rec / (prec + rec) if tp else 0.0
                if best is None or f1 > best[0]:
                    best = (f1, n, cand, float(a[:half][match].mean()) if match.any() else 0.0)
        if best is None:
            continue
        f1_fit, n, cand, mean_act = best
        m_test = suffix[n - 1][half:] == cand
        tp = int((m_test & fire[half:]).sum())
        prec = tp / max(1, int(m_test.sum()))
        rec = tp / max(1, int(fire[half:].sum()))
        sim = m_test.float() * mean_act
        out.append({"latent": j, "ngram": decode_code(cand, n, vocab), "n": n, "precision": prec,
                    "recall": rec, "f1": 2 * prec * rec / (prec + rec) if tp else 0.0,
                    "pearson": metrics.pearson(sim, a[half:]), "fit_f1": f1_fit})
    return out


# --------------------------------------------------------------------------- ablation


@torch.no_grad()
def ablation_sparsity(model: Any, hook: str, tokens: Tensor, acts: Tensor, codes: Tensor,
                      sae: Any, scale: float, latents: list[int], rows: int = 4,
                      drop_bos: bool = True) -> list[float]:
    """Per latent: splice the SAE reconstruction at `hook` for token rows where the latent
    fires, then the same with that latent zeroed; the logit difference over all positions
    and vocabulary gives (||d||_1 / ||d||_2)^2 / size in (0, 1] (lower: sparser effect)."""
    dev = next(model.parameters()).device
    per_row = tokens.shape[1] - (1 if drop_bos else 0)
    by_row = by_token_row(acts, per_row)
    full = by_row.shape[0]
    out = []
    for j in latents:
        fired = torch.unique((codes[: full * per_row, j] > 0).nonzero().flatten() // per_row)
        fired_rows = fired[:rows].cpu()
        if len(fired_rows) == 0:
            continue
        tok = tokens[fired_rows].to(dev)
        x = by_row[fired_rows.to(acts.device)].to(dev)

        def run(zero_latent: bool) -> Tensor:
            flat = x.reshape(-1, x.shape[-1])
            out_ = sae(flat)
            c = out_.codes.clone()
            if zero_latent:
                c[:, j] = 0
            recon = sae.decode_like(flat, c).view_as(x) / scale

            def hook_fn(act: Tensor, hook=None) -> Tensor:  # noqa: ARG001
                new = act.clone()
                start = 1 if drop_bos else 0
                new[:, start:] = recon.to(act.dtype)
                return new
            return model.run_with_hooks(tok, fwd_hooks=[(hook, hook_fn)]).float()

        d = (run(True) - run(False)).flatten()
        l2 = d.norm()
        if l2 > 0:
            out.append(float((d.abs().sum() / l2) ** 2 / d.numel()))
    return out


def by_token_row(t: Tensor, per_row: int) -> Tensor:
    """[N, ...] per-token rows (activations, codes) as [rows, per_row, ...]: only complete
    token rows, the ones a model can re-run."""
    full = t.shape[0] // per_row
    return t[: full * per_row].view(full, per_row, *t.shape[1:])


@dataclass(frozen=True)
class LatentEffect:
    """What removing one latent did to the model's next-token log-probabilities."""

    rows: int
    """Token rows re-run (those of the latent's strongest activations)."""
    positions: int
    """Positions in them where the latent fired (and was removed)."""
    next_token: float
    """Mean change of log p(actual next token) at those positions (negative: the latent
    helped predict what came next). The last position of a row has no next token."""
    elsewhere: float
    """Mean change of log p(actual next token) at the rows' other positions after the
    first firing: effects carried to later tokens (through attention)."""
    supported: list[tuple[int, float]]
    """Tokens whose probability falls most where the latent fired, with the mean change
    (probabilities, not log-probabilities: a rare token's log-probability swings with any
    shift of the logits and would crowd out the tokens the model actually predicts)."""
    suppressed: list[tuple[int, float]]
    """Tokens whose probability rises most there."""


@torch.no_grad()
def latent_ablation(model: Any, hook: str, tokens: Tensor, acts: Tensor, codes: Tensor,
                    sae: Any, latent: int, rows: int = 4, top: int = 8,
                    drop_bos: bool = True) -> LatentEffect | None:
    """Remove latent `latent`'s contribution from the model's own activation at `hook`
    and compare next-token log-probabilities with the clean run.

    acts [N, d] are the held-out activations at `hook` in raw model units, codes [N, n]
    the SAE's codes of them (a tensor, or anything indexed as one by codes[:, j] and
    codes[token indices]), laid out as `tokens` [rows, T] minus the BOS column when
    drop_bos. The contribution is decode(codes) - decode(codes with the latent zeroed),
    subtracted from the activation itself, not from the SAE's reconstruction: the rest of
    the residual (and the SAE's error) stays, so only this latent's part is tested.
    None when the latent never fires in a complete row."""
    off = 1 if drop_bos else 0
    per_row = tokens.shape[1] - off
    col = by_token_row(codes[:, latent], per_row)                  # [full, per_row]
    strongest = col.flatten().argsort(descending=True)
    fired = strongest[col.flatten()[strongest] > 0] // per_row
    if fired.numel() == 0:
        return None
    picked = list(dict.fromkeys(fired.tolist()))[:rows]  # each row once, strongest first
    pick = torch.tensor(picked)
    x = by_token_row(acts, per_row)[pick]                          # [R, P, d]
    # the picked rows' codes alone (codes may be the explorer's SparseCodes: no view)
    c = codes[(pick[:, None] * per_row + torch.arange(per_row)).flatten()].view(
        len(pick), per_row, -1)                                    # [R, P, n]
    dev_sae = sae.W_dec.device
    flat_x = x.reshape(-1, x.shape[-1]).to(dev_sae)
    flat_c = c.reshape(-1, c.shape[-1]).to(dev_sae)
    without = flat_c.clone()
    without[:, latent] = 0
    delta = (sae.decode_like(flat_x, flat_c) - sae.decode_like(flat_x, without)).view_as(x)
    dev = next(model.parameters()).device
    tok = tokens[pick].to(dev)
    delta = delta.to(dev)

    def remove(act: Tensor, hook=None) -> Tensor:  # noqa: ARG001
        new = act.clone()
        new[:, off:] -= delta.to(act.dtype)
        return new

    clean = model.run_with_hooks(tok, fwd_hooks=[]).float().log_softmax(-1)[:, off:]
    ablated = model.run_with_hooks(tok, fwd_hooks=[(hook, remove)]).float().log_softmax(-1)
    diff = ablated[:, off:] - clean                                 # [R, P, V]
    active = c[..., latent].to(dev) > 0                             # [R, P]
    nxt = diff[:, :-1].gather(-1, tok[:, off + 1:, None]).squeeze(-1)  # [R, P - 1]
    at = active[:, :-1]
    later = (active.int().cumsum(1) > 0)[:, :-1] & ~at
    vocab = (ablated[:, off:].exp() - clean.exp())[active].mean(0)  # [V] probabilities
    low, high = vocab.topk(min(top, vocab.numel()), largest=False), vocab.topk(
        min(top, vocab.numel()))
    return LatentEffect(
        rows=len(picked), positions=int(active.sum()),
        next_token=float(nxt[at].mean()) if at.any() else float("nan"),
        elsewhere=float(nxt[later].mean()) if later.any() else float("nan"),
        supported=list(zip(low.indices.tolist(), low.values.tolist())),
        suppressed=list(zip(high.indices.tolist(), high.values.tolist())))
