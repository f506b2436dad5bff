"""ipywidgets explorers for trained SAEs (notebook 05).

- `LatentExplorer`: pick an SAE and a latent (slider, or search by the text that should
  make it fire or the token it should predict); shows its top-activating contexts (or
  contexts spread over its range of activations) with per-token highlighting, its
  activation histogram, the tokens its decoder direction promotes through the
  unembedding, what removing it from the model's activation does to the next-token
  predictions where it fires, and the closest latent of every other SAE.
- `ZFExplorer`: an SAE's ZF plot (Lee et al. 2025) with a slider for the band eps(h-1);
  selecting a range of ||f~||/||z|| lists those tokens in context.
- `PrefixExplorer`: a Matryoshka SAE's prefix size: FVU at that size and which of one
  token's active latents survive the cut.
Each is plain Python: build it, set widget values, read the outputs (what the tests do).
Plots are PNG `Image` widgets so they update identically in JupyterLab and in tests.
"""

from __future__ import annotations

import html
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ipywidgets as W
import matplotlib.pyplot as plt
import numpy as np
import torch
from torch import Tensor

from paper_lib import interp, metrics, plots
from paper_lib.data.lm import loading_misfits, official_name
from paper_lib.experiments.matryoshka import matryoshka_prefix_recon
from paper_lib.runtime import PROJECT_ROOT
from paper_lib.sae import SAE, load_sae
from paper_lib.sae.base import initial_decoder
from paper_lib.sae.io import read_cfg, recorded, saved_saes, short_context_notes

NEURONPEDIA = "https://www.neuronpedia.org"  # a latent's page: <id>/<latent>


def profile_saes(root: Path, profile: str, custom: bool = True) -> dict[str, Path]:
    """The SAEs the notebooks saved for `profile`: those of its reference runs (under
    root/<profile>) and, with `custom`, prefixed "custom/", those of runs with other
    parameters (under root/<profile>-custom, where such runs save so as not to replace the
    reference ones)."""
    from paper_lib.claims import CUSTOM_SUFFIX

    ref = saved_saes(root / profile)
    if not custom:
        return ref
    more = saved_saes(root / (profile + CUSTOM_SUFFIX))  # a missing folder finds none
    return {**ref, **{f"custom/{k}": v for k, v in more.items()}}


def sae_source(path: Path, root: Path = PROJECT_ROOT / "data" / "saes") -> str:
    """Where an explored SAE was read, the same on every machine for those the notebooks
    saved (relative to data/saes) and project-relative or absolute for listed ones."""
    from paper_lib.runtime import project_relative

    path = Path(path)
    return str(path.relative_to(root) if path.is_relative_to(root) else project_relative(path))


class SparseCodes:
    """An SAE's codes of N tokens, [N, n], kept as their nonzero entries in row order: the
    explorers read one latent's column, a few tokens' rows and per-token norms, and an SAE
    codes each token with a few dozen latents, while a dense matrix of a wide SAE's codes
    would not fit (65,536 tokens x 131,072 latents: 34 GB of float32). `codes[:, j]` and
    `codes[rows]` give dense tensors, as indexing a dense matrix would."""

    def __init__(self, rows: Tensor, cols: Tensor, vals: Tensor, shape: tuple[int, int]):
        self.rows, self.cols, self.vals, self.shape = rows, cols, vals, shape
        # entries of token i: [starts[i], starts[i + 1])
        self.starts = torch.zeros(shape[0] + 1, dtype=torch.long)
        self.starts[1:] = torch.bincount(rows, minlength=shape[0]).cumsum(0)

    @classmethod
    @torch.no_grad()
    def encode(cls, sae: SAE, x: Tensor, entries: int = 1 << 25) -> "SparseCodes":
        """sae.encode(x) for x [N, d], in blocks of at most `entries` dense codes (128 MB)."""
        step = max(1, entries // sae.cfg.d_sae)
        parts = []
        for i in range(0, len(x), step):
            c = sae.encode(x[i:i + step].to(sae.W_enc.device))
            r, k = c.nonzero(as_tuple=True)  # on the SAE's device: only entries move
            parts.append((r.cpu() + i, k.cpu(), c[r, k].float().cpu()))
        rows, cols, vals = (torch.cat(t) for t in zip(*parts)) if parts else \
            (torch.zeros(0, dtype=torch.long),) * 2 + (torch.zeros(0),)
        return cls(rows, cols, vals, (len(x), sae.cfg.d_sae))

    def __len__(self) -> int:
        return self.shape[0]

    def _entries(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        """(position in idx, entry) of every stored entry of the tokens idx."""
        lo, counts = self.starts[idx], self.starts[idx + 1] - self.starts[idx]
        owner = torch.repeat_interleave(torch.arange(len(idx)), counts)
        # entry m of the output (counted over all tokens) is lo[owner] + m - (entries before)
        before = counts.cumsum(0) - counts
        return owner, torch.repeat_interleave(lo - before, counts) + torch.arange(len(owner))

    def __getitem__(self, key: Any) -> Tensor:
        if isinstance(key, tuple):  # codes[:, j]: one latent over all tokens
            if len(key) != 2 or key[0] != slice(None):
                raise TypeError("SparseCodes takes codes[:, latent] or codes[token rows]")
            out = torch.zeros(self.shape[0])
            hit = self.cols == int(key[1])
            out[self.rows[hit]] = self.vals[hit]
            return out
        idx = torch.as_tensor(key, dtype=torch.long)
        one = idx.dim() == 0
        idx = idx.reshape(-1)
        owner, entry = self._entries(idx)
        out = torch.zeros(len(idx), self.shape[1])
        out[owner, self.cols[entry]] = self.vals[entry]
        return out[0] if one else out

    def mean_rows(self, idx: Tensor) -> Tensor:
        """[n] the tokens idx's mean code, without their dense rows."""
        _, entry = self._entries(torch.as_tensor(idx, dtype=torch.long).reshape(-1))
        return torch.zeros(self.shape[1]).index_add_(0, self.cols[entry],
                                                     self.vals[entry]) / max(1, len(idx))

    def firing_rates(self) -> Tensor:
        """[n] the fraction of tokens on which each latent is active."""
        fired = self.cols[self.vals > 0]
        return torch.bincount(fired, minlength=self.shape[1]).float() / max(1, self.shape[0])

    def norms(self, scale: Tensor | None = None) -> Tensor:
        """[N] each token's code norm, each latent's entry times scale[latent] if given
        (a decoder row's norm: ||f~||, Lee et al.)."""
        v = self.vals if scale is None else self.vals * scale[self.cols]
        return torch.zeros(self.shape[0]).index_add_(0, self.rows, v * v).sqrt()


@dataclass
class ExplorerData:
    """What the explorers read: raw held-out activations, their token rows, the LM, SAEs."""

    acts: Tensor
    """[N, d] held-out activations in raw model units."""
    tokens: Tensor
    """[rows, T] token rows the activations come from (position 1.. when drop_bos)."""
    model: Any
    token_str: Any
    """token id -> display text."""
    encode_text: Any
    """text -> list of token ids (for search)."""
    saes: dict[str, SAE]
    drop_bos: bool = True
    hook: str = ""
    """Where the activations were read (needed to re-run the model with a latent removed)."""
    neuronpedia: dict[str, str] = field(default_factory=dict)
    """SAE name -> its Neuronpedia id, where its file records one (SAELens' release SAEs):
    the latent explorer links each latent to its page there."""
    contexts: dict[str, int] = field(default_factory=dict)
    """SAE name -> the token rows' length it was trained on (SAELens' context_size), where
    its file records one."""
    _codes: dict[str, SparseCodes] = field(default_factory=dict, repr=False)

    @classmethod
    def from_activations(cls, acts_set: Any, saes: dict[str, SAE], n: int | None = None,
                         paths: dict[str, Path] | None = None) -> "ExplorerData":
        """From an ActivationSet's first n held-out tokens; `saes` must take raw activations
        (as saved files do); `paths`: their folders, to read what else they record."""
        cfgs = {name: read_cfg(paths[name]) for name in saes if paths and name in paths}
        ids = {name: recorded(raw, "neuronpedia_id") for name, raw in cfgs.items()}
        contexts = {name: recorded(raw, "context_size") for name, raw in cfgs.items()}
        return cls((acts_set.eval[:n] / acts_set.scale).cpu(), acts_set.eval_tokens, acts_set.model,
                   acts_set.token_str, acts_set.encode_text, saes, acts_set.drop_bos,
                   acts_set.hook, {name: i for name, i in ids.items() if i},
                   {name: int(c) for name, c in contexts.items() if c})

    def context_notes(self) -> list[str]:
        """A line for each SAE trained on rows shorter than these (`short_context_notes`)."""
        return short_context_notes(self.contexts, self.tokens.shape[1], "explored",
                                   "-p context_size")

    def find(self, text: str) -> Tensor:
        """Activation indices at which `text` has just been read (its last token)."""
        target = torch.tensor(self.encode_text(text), dtype=self.tokens.dtype)
        n = len(target)
        if n == 0 or n > self.tokens.shape[1]:
            return torch.zeros(0, dtype=torch.long)
        windows = self.tokens.unfold(1, n, 1)                       # [rows, T-n+1, n]
        rows, starts = (windows == target).all(-1).nonzero(as_tuple=True)
        end = starts + n - 1
        off = 1 if self.drop_bos else 0
        per_row = self.tokens.shape[1] - off
        keep = end >= off
        idx = rows[keep] * per_row + end[keep] - off
        return idx[idx < len(self.acts)]

    @staticmethod
    def load_saes(paths: dict[str, Path], d_in: int, hook: str = "",
                  model: str = "", required: tuple[str, ...] = ()) -> dict[str, SAE]:
        """Load the saved SAEs made for these activations: same d_in and, where both sides
        record them, the same hook and model (by transformer-lens' official name: an SAE
        for "gpt2-small" reads "gpt2"), loaded as `load_lm` loads it. Others are skipped:
        an SAE trained at another layer (same width) would encode these activations
        without complaint. One named in `required` (the user listed it) that does not fit
        raises a ValueError saying why instead."""
        out = {}
        for name, path in paths.items():
            raw = read_cfg(path)
            have_model = recorded(raw, "model_name")
            misfit = [f"{what} {have!r}, the activations' {want!r}" for what, have, want in (
                ("d_in", raw["d_in"], d_in), ("hook", recorded(raw, "hook_name"), hook),
                ("model", have_model, model)) if want and have and have != want
                and not (what == "model" and official_name(have) == official_name(want))]
            if have_model and not have_model.startswith("embedded-"):
                misfit += [f"its LM loaded with {m}" for m in
                           loading_misfits(recorded(raw, "model_from_pretrained_kwargs"))]
            if recorded(raw, "prepend_bos") is False:  # rows here start with BOS, as in training
                misfit.append("text read without a BOS token (prepend_bos=False), here "
                              "every row starts with one")
            if misfit:
                if name in required:
                    raise ValueError(f"SAE {name} ({path}) was not made for these "
                                     f"activations: {'; '.join(misfit)}; pick its model and "
                                     "hook with -p model / -p hook (the LM is loaded with "
                                     "transformer-lens' defaults, rows start with BOS)")
                continue
            out[name] = load_sae(path, expected_d_in=d_in).eval()
        return out

    def codes(self, name: str) -> SparseCodes:
        """SAE `name`'s codes of the held-out tokens, computed once."""
        if name not in self._codes:
            self._codes[name] = SparseCodes.encode(self.saes[name], self.acts)
        return self._codes[name]

    def locate(self, index: int) -> tuple[int, int]:
        per_row = self.tokens.shape[1] - (1 if self.drop_bos else 0)
        row, pos = divmod(index, per_row)
        return row, pos + (1 if self.drop_bos else 0)

    def context_html(self, index: int, acts_row: Tensor | None = None, before: int = 24,
                     after: int = 6, vmax: float = 1.0) -> str:
        """The tokens around activation `index`, each shaded by its activation."""
        row, pos = self.locate(index)
        per_row = self.tokens.shape[1] - (1 if self.drop_bos else 0)
        lo, hi = max(0, pos - before), min(self.tokens.shape[1], pos + after + 1)
        spans = []
        for p in range(lo, hi):
            text = html.escape(self.token_str(int(self.tokens[row, p]))).replace("\n", "⏎")
            a = 0.0
            if acts_row is not None and (p >= 1 or not self.drop_bos):
                flat = row * per_row + p - (1 if self.drop_bos else 0)
                a = float(acts_row[flat]) if flat < len(acts_row) else 0.0
            alpha = min(1.0, max(0.0, a / vmax)) if vmax > 0 else 0.0
            border = "border-bottom:2px solid #000;" if p == pos else ""
            spans.append(f'<span style="background:rgba(220,40,40,{alpha:.2f});{border}'
                         f'font-family:monospace;white-space:pre">{text}</span>')
        return "".join(spans)


def _png(fig: plt.Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def context_indices(acts: Tensor, n: int, spread: bool = False) -> list[int]:
    """Up to n tokens where a latent is active, strongest first: the n strongest, or
    (spread) n spread evenly over its active tokens ranked by activation, from the
    strongest to the weakest (top activations alone can make a latent look more specific
    than it is)."""
    active = (acts > 0).nonzero().flatten()
    if active.numel() == 0:
        return []
    ranked = active[acts[active].argsort(descending=True, stable=True)]
    if not spread or ranked.numel() <= n:
        return ranked[:n].tolist()
    ranks = torch.linspace(0, ranked.numel() - 1, n).round().long().unique()
    return ranked[ranks].tolist()


class LatentExplorer:
    """SAE dropdown, latent slider and text search; contexts, histogram, promoted tokens,
    the latent's effect on next-token predictions, its closest latents in the other SAEs."""

    def __init__(self, data: ExplorerData, n_contexts: int = 8) -> None:
        self.data, self.n_contexts = data, n_contexts
        names = list(data.saes)
        self.sae_dropdown = W.Dropdown(options=names, value=names[0], description="SAE")
        self.latent_slider = W.IntSlider(0, 0, data.saes[names[0]].cfg.d_sae - 1,
                                         description="latent", continuous_update=False)
        self.search = W.Text(placeholder="text that should fire it, e.g. 'def '",
                             description="search", continuous_update=False)
        self.token_search = W.Text(placeholder="a token it should predict, e.g. '('",
                                   description="promotes", continuous_update=False)
        self.spread = W.ToggleButtons(options=["strongest", "across its range"],
                                      description="contexts")
        self.status = W.HTML()
        self.contexts = W.HTML()
        self.histogram = W.Image(format="png")
        self.promoted = W.HTML()
        self.effect = W.HTML()
        self.neighbours = W.HTML()
        self._inits: dict[tuple[int, int], Tensor] = {}
        self.sae_dropdown.observe(self._on_sae, names="value")
        self.latent_slider.observe(lambda _: self.render(), names="value")
        self.search.observe(self._on_search, names="value")
        self.token_search.observe(self._on_token_search, names="value")
        self.spread.observe(lambda _: self.render(), names="value")
        self.widget = W.VBox([W.HBox([self.sae_dropdown, self.latent_slider]),
                              W.HBox([self.search, self.token_search]), self.status,
                              self.spread, self.contexts,
                              W.HBox([self.histogram, self.promoted]),
                              W.HBox([self.effect, self.neighbours])])
        self.render()

    @property
    def sae(self) -> SAE:
        return self.data.saes[self.sae_dropdown.value]

    def _on_sae(self, _: Any) -> None:
        self.latent_slider.max = self.sae.cfg.d_sae - 1
        self.render()

    def _on_search(self, change: Any) -> None:
        """Pick the latent with the highest mean activation where the text just ended."""
        text = change["new"]
        if not text:
            return
        codes = self.data.codes(self.sae_dropdown.value)
        hits = self.data.find(text)
        if len(hits) == 0:
            self.status.value = f"<i>'{html.escape(text)}' does not occur in the held-out text</i>"
            return
        best = int(codes.mean_rows(hits).argmax())
        self.status.value = (f"best latent for '{html.escape(text)}': {best} "
                             f"({len(hits)} occurrences)")
        self.latent_slider.value = best

    def _on_token_search(self, change: Any) -> None:
        """Pick the latent whose decoder direction raises the token's logit most (the
        logit lens of the promotes panel, read the other way)."""
        text = change["new"]
        w_u = getattr(self.data.model, "W_U", None)
        ids = self.data.encode_text(text) if text else []
        if w_u is None or not ids:
            self.status.value = ("<i>no unembedding to read</i>" if w_u is None else
                                 f"<i>'{html.escape(text)}' encodes to no token</i>")
            return
        t = ids[0]
        with torch.no_grad():
            logit = self.sae.W_dec.to(w_u.device, w_u.dtype) @ w_u[:, t]
        best = int(logit.argmax())
        shown = html.escape(repr(self.data.token_str(t)))
        first = f"; first of {len(ids)} tokens" if len(ids) > 1 else ""
        self.status.value = (f"latent promoting {shown} most: {best} "
                             f"(logit {float(logit[best]):+.2f}{first})")
        self.latent_slider.value = best

    def render(self) -> None:
        j = self.latent_slider.value
        codes = self.data.codes(self.sae_dropdown.value)
        a = codes[:, j]
        top = context_indices(a, self.n_contexts, self.spread.value != "strongest")
        vmax = float(a.max()) if len(top) else 1.0
        freq = float((a > 0).float().mean())
        rows = [f"<div>{a[i]:.3f}&nbsp;&nbsp;{self.data.context_html(i, a, vmax=vmax)}</div>"
                for i in top]
        page = self.data.neuronpedia.get(self.sae_dropdown.value)
        link = (f' (<a href="{NEURONPEDIA}/{html.escape(page)}/{j}" target="_blank" '
                'rel="noopener">its Neuronpedia page</a>)') if page else ""
        self.contexts.value = (f"<b>latent {j}</b>{link} fires on {freq:.2%} of tokens<br>"
                               + ("".join(rows) or "<i>never fires on the held-out text</i>"))
        fig, ax = plt.subplots(figsize=(4, 2.6))
        live = a[a > 0].numpy()
        ax.hist(live if len(live) else [0.0], bins=30, color="C3")
        ax.set(title=f"latent {j}: activations when active", xlabel="activation",
               ylabel="tokens")
        self.histogram.value = _png(fig)
        self.promoted.value = self._promoted_tokens(j)
        self.effect.value = self._effect(j)
        self.neighbours.value = self._neighbours(j)

    def _promoted_tokens(self, j: int, top: int = 10) -> str:
        """Tokens whose logits the decoder direction raises most (logit lens, no LayerNorm)."""
        w_u = getattr(self.data.model, "W_U", None)
        if w_u is None:
            return ""
        with torch.no_grad():
            logits = self.sae.W_dec[j].to(w_u.device, w_u.dtype) @ w_u
        vals, idx = logits.topk(top)
        items = self._tokens_html(list(zip(idx.tolist(), vals.tolist())))
        return f"<b>promotes</b><ol>{items}</ol>"

    def _tokens_html(self, items: list[tuple[int, float]], spec: str = "+.2f") -> str:
        return "".join(f"<li><code>{html.escape(self.data.token_str(t))!r}</code> "
                       f"{v:{spec}}</li>" for t, v in items)

    def _effect(self, j: int) -> str:
        """Removing the latent from the model's own activation where it fires (its
        strongest rows): the change in next-token log-probabilities and probabilities."""
        d = self.data
        if d.model is None or not d.hook:
            return ""
        eff = interp.latent_ablation(d.model, d.hook, d.tokens, d.acts,
                                     d.codes(self.sae_dropdown.value), self.sae, j,
                                     drop_bos=d.drop_bos)
        if eff is None:
            return ""

        def signed(v: float) -> str:
            return "n/a" if v != v else f"{v:+.3f}"  # NaN: no such position
        return (f"<b>removing it</b> from {d.hook} ({eff.positions} positions in "
                f"{eff.rows} rows):<br>log p(next token) {signed(eff.next_token)} where it "
                f"fires, {signed(eff.elsewhere)} at later positions<br>"
                "change of each token's probability there:<br>"
                f"<b>it supports</b><ol>{self._tokens_html(eff.supported, '+.1%')}</ol>"
                f"<b>it suppresses</b><ol>{self._tokens_html(eff.suppressed, '+.1%')}</ol>")

    def _neighbours(self, j: int) -> str:
        """The latent of each other SAE whose decoder direction is closest to this one's,
        with the cosine of the two latents' initial decoder rows: SAEs of one seed start
        from the same directions, so a match inherited from initialisation is no evidence
        of a shared feature. An SAE read from SAELens' files has no known start: n/a."""
        name = self.sae_dropdown.value
        direction = self.sae.W_dec[j]
        start = self._initial_row(self.sae, j) if self.sae.init_known else None
        rows = []
        for other, sae in self.data.saes.items():
            if other != name:
                idx, cos = metrics.nearest_atoms(direction, sae.W_dec)
                i = int(idx[0])
                at_init = (float(self._initial_row(sae, i) @ start)
                           if start is not None and sae.init_known else float("nan"))
                rows.append((float(cos[0]), other, i, at_init))
        items = "".join(f"<tr><td>{html.escape(o)}</td><td>{i}</td><td>{c:.2f}</td>"
                        f"<td>{'n/a' if a != a else f'{a:.2f}'}</td></tr>"
                        for c, o, i, a in sorted(rows, reverse=True))
        return ("<b>closest latent elsewhere</b> (decoder cosine; <i>at init</i>: the same "
                "pair's cosine before training, high when both SAEs share a seed)<table>"
                "<tr><th>SAE</th><th>latent</th><th>cos</th><th>at init</th></tr>"
                f"{items}</table>" if items else "")

    def _initial_row(self, sae: SAE, j: int) -> Tensor:
        """Row j of the SAE's initial decoder. One draw per (seed, d_in), at the largest n
        asked for: a seed's smaller SAEs start from its first rows."""
        key = (sae.cfg.seed, sae.cfg.d_in)
        if key not in self._inits or len(self._inits[key]) < sae.cfg.d_sae:
            self._inits[key] = initial_decoder(sae.cfg)
        return self._inits[key][j]


class ZFExplorer:
    """ZF plot with a band slider; a ratio range selects tokens to show in context."""

    def __init__(self, data: ExplorerData, max_points: int = 3000) -> None:
        self.data, self.max_points = data, max_points
        self._zf: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        names = list(data.saes)
        self.sae_dropdown = W.Dropdown(options=names, value=names[0], description="SAE")
        self.band = W.FloatSlider(0.5, min=0.05, max=2.0, step=0.05, description="eps(h-1)",
                                  continuous_update=False)
        self.ratio_range = W.FloatRangeSlider(value=(0.0, 0.5), min=0.0, max=2.0, step=0.05,
                                              description="||f~||/||z||", continuous_update=False)
        self.plot = W.Image(format="png")
        self.summary = W.HTML()
        self.contexts = W.HTML()
        for w in (self.sae_dropdown, self.band):
            w.observe(lambda _: self.render(), names="value")
        self.ratio_range.observe(lambda _: self.show_selection(), names="value")
        self.widget = W.VBox([W.HBox([self.sae_dropdown, self.band]), self.plot, self.summary,
                              self.ratio_range, self.contexts])
        self.render()

    def _norms(self) -> tuple[np.ndarray, np.ndarray]:
        """(||z||, ||f~||) per token of the chosen SAE, computed once per SAE (the plot, the
        band and the ratio selection all read them)."""
        name = self.sae_dropdown.value
        if name not in self._zf:
            sae = self.data.saes[name]
            with torch.no_grad():
                x_in, _, _ = sae.prepare(self.data.acts.to(sae.W_enc.device))
                z = (x_in - sae.b_dec).norm(dim=-1).cpu().numpy()
                f = self.data.codes(name).norms(
                    sae.W_dec.detach().float().norm(dim=-1).cpu()).numpy()
            self._zf[name] = z, f
        return self._zf[name]

    def render(self) -> None:
        z, f = self._norms()
        fig, ax = plt.subplots(figsize=(5, 4.2))
        plots.zf_plot(ax, z, f, bands=(self.band.value,),
                      title=f"ZF plot: {self.sae_dropdown.value}", max_points=self.max_points)
        self.plot.value = _png(fig)
        c = self.band.value
        ratio2 = (f / np.maximum(z, 1e-12)) ** 2
        inside = (ratio2 >= 1 / (1 + c)) & ((ratio2 <= 1 / (1 - c)) if c < 1 else True)
        self.summary.value = (f"median ||f~||/||z|| = {np.median(np.sqrt(ratio2)):.3f}; "
                              f"{inside.mean():.1%} of tokens inside the eps(h-1) = {c:g} band")
        self.show_selection()

    def show_selection(self, n: int = 8) -> None:
        z, f = self._norms()
        ratio = f / np.maximum(z, 1e-12)
        lo, hi = self.ratio_range.value
        pick = np.nonzero((ratio >= lo) & (ratio <= hi))[0]
        shown = pick[:: max(1, len(pick) // n)][:n]
        rows = "".join(f"<div>{ratio[i]:.2f}&nbsp;&nbsp;{self.data.context_html(int(i))}</div>"
                       for i in shown)
        self.contexts.value = (f"{len(pick)} tokens with ratio in [{lo:.2f}, {hi:.2f}]"
                               + (rows or ""))


class PrefixExplorer:
    """Prefix size of a Matryoshka SAE: FVU at that size and one token's surviving latents."""

    def __init__(self, data: ExplorerData, sae_name: str, n_eval: int = 4096) -> None:
        self.data, self.name = data, sae_name
        self.sae = data.saes[sae_name]
        ends = getattr(self.sae, "ends", [self.sae.cfg.d_sae])
        self.prefix = W.SelectionSlider(options=list(ends), value=ends[-1],
                                        description="prefix size", continuous_update=False)
        self.token = W.IntSlider(0, 0, min(n_eval, len(data.acts)) - 1, description="token",
                                 continuous_update=False)
        self.fvu = W.HTML()
        self.active = W.HTML()
        self.plot = W.Image(format="png")
        self.x = data.acts[:n_eval]
        for w in (self.prefix, self.token):
            w.observe(lambda _: self.render(), names="value")
        self.widget = W.VBox([W.HBox([self.prefix, self.token]), self.fvu, self.plot,
                              self.active])
        self.curve = self._fvu_curve(list(ends))  # held-out FVU per size in `prefix.options`
        self.render()

    def _fvu_curve(self, sizes: list[int]) -> list[float]:
        x = self.x.to(self.sae.W_enc.device)
        return [metrics.fvu(self.x, matryoshka_prefix_recon(self.sae, x, g).cpu())
                for g in sizes]

    def render(self) -> None:
        g = self.prefix.value
        fvu = self.curve[list(self.prefix.options).index(g)]
        self.fvu.value = f"<b>{self.name}</b>: FVU with the first {g} latents = {fvu:.4f}"
        fig, ax = plt.subplots(figsize=(4.5, 2.8))
        ax.plot(list(self.prefix.options), self.curve, "o-")
        ax.axvline(g, color="C3", ls=":")
        ax.set(xscale="log", title="FVU by prefix size", xlabel="latents kept",
               ylabel="FVU (held-out)")
        self.plot.value = _png(fig)
        codes = self.data.codes(self.name)[self.token.value]
        act = codes.nonzero().flatten().tolist()
        kept = [j for j in act if j < g]
        cut = [j for j in act if j >= g]
        self.active.value = (f"token {self.token.value}: "
                             f"{self.data.context_html(self.token.value)}<br>"
                             f"active latents kept ({len(kept)}): {kept}<br>"
                             f"active latents cut ({len(cut)}): {cut}")
