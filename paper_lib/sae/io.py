"""Save and load SAEs as `cfg.json` + `sae_weights.safetensors`, the layout SAELens reads.

The weights keep SAELens' names and shapes (W_enc [d_in, d_sae], b_enc [d_sae],
W_dec [d_sae, d_in], b_dec [d_in]; JumpReLU adds threshold [d_sae]). cfg.json carries
SAELens' fields (architecture, d_in, d_sae, k, apply_b_dec_to_input,
normalize_activations, metadata.hook_name, ...) and our full config under "paper_lib".
SAELens names: relu -> "standard", topk -> "topk", batchtopk / matryoshka -> "jumprelu"
(their inference form: one threshold), topafa / mlp have no SAELens equivalent.

If the SAE was trained on activations multiplied by `input_scale`, the scale is folded
into the saved weights so the file works on raw activations. Loading uses JSON and
safetensors only: no pickle on any path.

`load_sae` also reads SAEs that SAELens itself saved (`SAE.save_model`, a release
downloaded with `SAE.from_pretrained` and saved): "standard" as ReLU, "topk" as TopK and
"jumprelu" (Gemma Scope; SAELens' own BatchTopK and Matryoshka SAEs) as JumpReLU,
`apply_b_dec_to_input=False` and `rescale_acts_by_decoder_norm` folded exactly into the
weights and `layer_norm` inputs standardised per row as SAELens does, so they can be
explored and scored like ours. Anything else is refused by name before any weight is read.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from paper_lib.runtime import PROJECT_ROOT, atomic_dir
from paper_lib.sae.base import SAE, SAEConfig
from paper_lib.sae.registry import make_sae

CFG_FILE = "cfg.json"
WEIGHTS_FILE = "sae_weights.safetensors"
FORMAT_VERSION = 1
SAELENS_NAMES = {"relu": "standard", "topk": "topk", "batchtopk": "jumprelu",
                 "matryoshka": "jumprelu", "topafa": "paper_lib.topafa", "mlp": "paper_lib.mlp",
                 "jumprelu": "jumprelu"}
FROM_SAELENS = {"standard": "relu", "topk": "topk", "jumprelu": "jumprelu"}
"""SAELens architectures `load_sae` reads from SAELens' own files, and what they load as."""


def _state(sae: SAE, input_scale: float) -> dict[str, torch.Tensor]:
    sd = {k: v.detach().float().cpu().contiguous() for k, v in sae.state_dict().items()}
    if sae.cfg.architecture in ("batchtopk", "matryoshka"):
        theta = float(sd.pop("threshold").clamp_min(0))
        sd["threshold"] = torch.full((sae.cfg.d_sae,), theta)
    if input_scale != 1.0 and not sae.cfg.standardize_input:
        # (x s - b) W = (x - b/s)(s W); the codes are unchanged, x_hat_raw = x_hat / s.
        first = "W_1" if sae.cfg.architecture == "mlp" else "W_enc"
        sd[first] = sd[first] * input_scale
        sd["b_dec"] = sd["b_dec"] / input_scale
        sd["W_dec"] = sd["W_dec"] / input_scale
    return sd


def save_sae(sae: SAE, path: str | Path, input_scale: float = 1.0,
             extra: dict[str, Any] | None = None,
             metadata: dict[str, Any] | None = None) -> Path:
    """Write `path/cfg.json` and `path/sae_weights.safetensors` atomically (a crash leaves
    any previous SAE at `path` intact). `metadata`: more of SAELens' metadata fields, such
    as how the training data was read (`ActivationSet.saelens_metadata`)."""
    cfg = sae.cfg
    saelens: dict[str, Any] = {
        "architecture": SAELENS_NAMES[cfg.architecture],
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "layer_norm" if cfg.standardize_input else "none",
        "reshape_activations": "none",
        "metadata": {"model_name": cfg.model_name, "hook_name": cfg.hook_name,
                     "hook_head_index": None, "prepend_bos": True,
                     "sae_lens_version": "6.0.0", **(metadata or {})},
    }
    if cfg.architecture == "topk":
        saelens.update(k=cfg.k, rescale_acts_by_decoder_norm=False)
    saelens["paper_lib"] = {"format_version": FORMAT_VERSION, "config": cfg.to_dict(),
                            "input_scale": float(input_scale), **(extra or {})}
    with atomic_dir(path) as tmp:
        save_file(_state(sae, float(input_scale)), str(tmp / WEIGHTS_FILE))
        (tmp / CFG_FILE).write_text(json.dumps(saelens, indent=2) + "\n")
    return Path(path)


def saved_saes(root: Path = PROJECT_ROOT / "data" / "saes") -> dict[str, Path]:
    """Every saved SAE directory below root, keyed by its path relative to root."""
    return {str(p.parent.relative_to(root)): p.parent for p in sorted(root.rglob(CFG_FILE))}


SAELENS_PREFIX = "sae_lens:"
SAELENS_ROOT = PROJECT_ROOT / "data" / "sae_lens"


def _saelens_names(spec: str) -> tuple[str, str, dict[str, Any]]:
    """(release, sae_id, SAELens' directory of releases) of "sae_lens:<release>/<sae_id>",
    as SAELens' `SAE.from_pretrained` takes them: a release its directory lists (whose ids
    may hold "/", as Gemma Scope's do), else a Hugging Face repo "<owner>/<repo>" and the
    folder in it that holds the SAE (SAELens' cfg.json and weights, as its
    `upload_saes_to_huggingface` leaves them). Checked offline; a ValueError says what is
    wrong and what to do."""
    try:
        from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory
    except ImportError:
        raise ValueError(f"{spec!r} needs SAELens to fetch it: pip install 'sae-lens>=6,<7' "
                         "(in the dev extra), or pass the folder of a saved SAE") from None
    parts = spec.removeprefix(SAELENS_PREFIX).split("/")
    if len(parts) < 2 or not all(parts) or {".", ".."} & set(parts):  # kept in data/sae_lens
        raise ValueError(f"{spec!r} is not 'sae_lens:<release>/<sae_id>' (e.g. "
                         "'sae_lens:gpt2-small-res-jb/blocks.6.hook_resid_pre') or "
                         "'sae_lens:<owner>/<repo>/<folder>' (a Hugging Face repo)")
    releases = get_pretrained_saes_directory()
    cut = 1 if parts[0] in releases or len(parts) == 2 else 2  # a listed release, else a repo
    release, sae_id = "/".join(parts[:cut]), "/".join(parts[cut:])
    if cut == 1 and release not in releases:
        close = difflib.get_close_matches(release, list(releases), n=3, cutoff=0.5)
        raise ValueError(f"{spec!r}: SAELens lists no release {release!r}"
                         + (f"; close: {', '.join(close)}" if close else "")
                         + (f"; a Hugging Face repo is named with the folder that holds "
                            f"the SAE: 'sae_lens:{spec.removeprefix(SAELENS_PREFIX)}/<folder>'"
                            if len(parts) == 2 else ""))
    if cut == 1 and sae_id not in releases[release].saes_map:
        ids = list(releases[release].saes_map)
        close = difflib.get_close_matches(sae_id, ids, n=3, cutoff=0.5) or ids[:3]
        raise ValueError(f"{spec!r}: release {release!r} has no SAE {sae_id!r}; it has "
                         f"{len(ids)}, e.g. {', '.join(close)}")
    # A repo SAELens lists is read through its release: SAELens then applies the release's
    # conversions and settings (the LM's loading options, say), which the repo alone lacks.
    listed = [(r, [i for i, folder in e.saes_map.items() if folder == sae_id])
              for r, e in releases.items() if cut == 2 and e.repo_id == release]
    if listed:
        r, ids = max(listed, key=lambda found: bool(found[1]))  # the first holding the folder
        raise ValueError(f"{spec!r}: {release} is SAELens release {r!r}: name it "
                         f"'sae_lens:{r}/{ids[0] if ids else '<sae_id>'}'")
    return release, sae_id, releases


def saelens_release(spec: str, root: Path | None = None) -> Path:
    """The folder of the SAELens SAE named "sae_lens:<release>/<sae_id>" (the arguments of
    SAELens' `SAE.from_pretrained`: a release of its directory, or "<owner>/<repo>" and a
    folder of a Hugging Face repo): fetched from the hub the first time and saved with
    SAELens' `save_model` in <root>/<release>/<sae_id> (root: data/sae_lens/). The names are
    checked (`_saelens_names`) before anything is fetched; a ValueError says what is wrong
    and what to do."""
    release, sae_id, releases = _saelens_names(spec)
    from sae_lens import SAE as LensSAE

    base = root or SAELENS_ROOT
    path = base / release / sae_id
    if not (path / CFG_FILE).is_file():
        try:
            with atomic_dir(path) as tmp:  # an interrupted fetch leaves no half-saved SAE
                LensSAE.from_pretrained(release, sae_id, device="cpu").save_model(tmp)
        except Exception as e:  # offline, hub errors: what to do instead
            for d in path.parents:  # nor the folders made for it, left empty
                if d == base or not d.is_dir() or any(d.iterdir()):
                    break
                d.rmdir()
            # a repo name whose owner looks like a release may be a misspelt release
            meant = difflib.get_close_matches(release.split("/")[0], list(releases), n=1,
                                              cutoff=0.8) if "/" in release else []
            raise ValueError(
                f"{spec!r} could not be fetched ({type(e).__name__}: "
                f"{(str(e).splitlines() or [''])[0][:200]}): "
                + (f"if release {meant[0]!r} was meant, name it; " if meant else "")
                + "an SAE of SAELens needs the internet once; elsewhere, save it with SAELens"
                " (SAE.from_pretrained(release, sae_id).save_model(folder)) and pass the "
                "folder") from None
    return path


def saelens_lists(spec: str) -> dict[str, float]:
    """What SAELens' directory of releases lists for the SAE `spec`
    ("sae_lens:<release>/<sae_id>"), measured by its authors on their data: {"l0": ...,
    "explained_variance": ...}, each where given (nothing for an SAE of a repo it does not
    list)."""
    release, sae_id, releases = _saelens_names(spec)
    entry = releases.get(release)
    if entry is None:
        return {}
    found = {"l0": (entry.expected_l0 or {}).get(sae_id),
             "explained_variance": (entry.expected_var_explained or {}).get(sae_id)}
    return {k: float(v) for k, v in found.items() if v is not None}


def listed_saes(dirs: tuple[str, ...] | list[str], root: Path = PROJECT_ROOT,
                what: str = "parameter 'sae_dirs'") -> dict[str, Path]:
    """The SAEs a user names (`what`: notebook 05's `-p sae_dirs`, evaluate's arguments),
    keyed "listed/<name as given>[/<sub>]": a folder holding a saved SAE (cfg.json: ours,
    or SAELens'), a folder of them (a relative path is read from `root`), or a SAELens
    release SAE, "sae_lens:<release>/<sae_id>" (`saelens_release`). A ValueError names a
    folder that is missing or holds none, or a release SAE that does not exist or cannot
    be fetched, before any other work."""
    out: dict[str, Path] = {}
    for d in dirs:
        if d.startswith(SAELENS_PREFIX):
            try:
                out[f"listed/{d}"] = saelens_release(d)
            except ValueError as e:
                raise ValueError(f"{what}: {e}") from None
            continue
        path = Path(d).expanduser()
        path = path if path.is_absolute() else root / path
        found = {"": path} if (path / CFG_FILE).is_file() else saved_saes(path)
        if not path.is_dir() or not found:
            raise ValueError(f"{what}: {d!r} ({path}) "
                             + ("is not a folder" if not path.is_dir() else
                                "holds no saved SAE (no cfg.json in it or below it)"))
        label = "listed/" + Path(d).as_posix().strip("/")
        for sub, p in found.items():
            key = label + (f"/{sub}" if sub else "")
            if out.setdefault(key, p) != p:  # "/a/b" and "a/b" (from root) share a name
                raise ValueError(f"{what}: {d!r} names {key} as an earlier entry does, but "
                                 f"for another folder ({p}, not {out[key]}): list one of "
                                 "them by a path that tells them apart")
    return out


def read_cfg(path: str | Path) -> dict[str, Any]:
    """Parse and check cfg.json; raises ValueError naming what is wrong."""
    f = Path(path) / CFG_FILE
    if not f.is_file():
        raise FileNotFoundError(f"no {CFG_FILE} in {path}: not a saved SAE directory")
    try:
        raw = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{f} is not valid JSON ({e}); the file is corrupt") from None
    missing = [k for k in ("architecture", "d_in", "d_sae") if k not in raw]
    if missing:
        raise ValueError(f"{f} lacks required key(s) {missing}")
    return raw


def recorded(raw: dict[str, Any], key: str) -> Any:
    """What a parsed cfg.json records as `key` (model_name, hook_name, prepend_bos, ...):
    under "metadata" as we and SAELens 6 save it, at the top level in older SAELens files."""
    meta = raw.get("metadata") or {}
    return meta[key] if meta.get(key) is not None else raw.get(key)


def short_context_notes(contexts: dict[str, int], rows: int, doing: str,
                        option: str | None = None) -> list[str]:
    """A line for each SAE whose recorded training context (`contexts`: name -> SAELens'
    `context_size`, BOS included) is shorter than the `rows` tokens it is `doing` on
    ("scored", "explored"): its codes past that position are outside its training.
    `option`: the setting that reads shorter rows ("--context-size"), where there is one."""
    return [f"{name}: trained on contexts of {c} tokens, {doing} on rows of {rows}: its codes "
            f"past position {c} are outside what it was trained on"
            + (f" ({option} {c} reads rows of its length)" if option else "")
            for name, c in contexts.items() if c < rows]


def _saved_by_us(raw: dict[str, Any]) -> bool:
    ours = raw.get("paper_lib")
    return isinstance(ours, dict) and "config" in ours


def _saelens_config(raw: dict[str, Any], f: Path) -> SAEConfig:
    """Our config for an SAE SAELens saved; ValueError naming what has no equivalent here."""
    arch = raw["architecture"]
    if arch not in FROM_SAELENS:
        raise ValueError(f"{f}: SAELens architecture {arch!r} cannot be loaded here; "
                         f"paper_lib reads SAELens {', '.join(map(repr, FROM_SAELENS))} "
                         "SAEs and its own files")
    norm = raw.get("normalize_activations") or "none"
    if norm not in ("none", "layer_norm"):
        raise ValueError(f"{f}: normalize_activations={norm!r} has no equivalent here; fold "
                         "the scaling into the weights in SAELens (e.g. "
                         "sae.fold_activation_norm_scaling_factor(factor)) and save it again")
    if (raw.get("reshape_activations") or "none") != "none" \
            or recorded(raw, "hook_head_index") is not None:
        raise ValueError(f"{f}: per-head SAEs (reshape_activations / hook_head_index) are not "
                         "supported: paper_lib reads residual-stream-shaped activations")
    return SAEConfig(FROM_SAELENS[arch], int(raw["d_in"]), int(raw["d_sae"]),
                     k=int(raw.get("k") or 0), standardize_input=norm == "layer_norm",
                     unit_norm_decoder=False,
                     hook_name=str(recorded(raw, "hook_name") or ""),
                     model_name=str(recorded(raw, "model_name") or ""))


@torch.no_grad()
def _saelens_state(raw: dict[str, Any], state: dict[str, torch.Tensor],
                   wfile: Path) -> dict[str, torch.Tensor]:
    """SAELens' weights in our convention, pre = (x - b_dec) W_enc + b_enc, codes decoded
    by W_dec: exact rewrites of their options, in float64, stored as float32."""
    weights = {"W_enc", "b_enc", "W_dec", "b_dec"} | (
        {"threshold"} if raw["architecture"] == "jumprelu" else set())
    extra = sorted(set(state) - weights)
    if extra:
        raise ValueError(f"{wfile} holds weight(s) {extra} that a SAELens "
                         f"{raw['architecture']!r} SAE read here does not use")
    sd = {k: v.double() for k, v in state.items()}
    d_in, d_sae = int(raw["d_in"]), int(raw["d_sae"])
    if len(sd) == len(weights) and sd["W_enc"].shape == (d_in, d_sae) \
            and sd["W_dec"].shape == (d_sae, d_in):  # else load_sae names what is wrong
        if raw.get("apply_b_dec_to_input") is False:  # x W + b = (x - b_dec) W + (b + b_dec W)
            sd["b_enc"] = sd["b_enc"] + sd["b_dec"] @ sd["W_enc"]
        if raw.get("rescale_acts_by_decoder_norm"):
            # TopK on pre * |W_dec,i|, decoded by W_dec,i / |W_dec,i|: the same codes and
            # reconstruction with the norms moved into the encoder.
            norms = sd["W_dec"].norm(dim=1).clamp_min(1e-8)
            sd["W_enc"], sd["b_enc"] = sd["W_enc"] * norms, sd["b_enc"] * norms
            sd["W_dec"] = sd["W_dec"] / norms[:, None]
    return {k: v.float() for k, v in sd.items()}


def load_sae(path: str | Path, device: str | torch.device = "cpu",
             expected_d_in: int | None = None) -> SAE:
    """Load an SAE saved by `save_sae` (weights in the units they were saved in), or a
    "standard", "topk" or "jumprelu" SAE saved by SAELens (see the module docstring)."""
    raw = read_cfg(path)
    ours = _saved_by_us(raw)
    if ours:
        cfg = SAEConfig.from_dict(raw["paper_lib"]["config"])
    else:
        cfg = _saelens_config(raw, Path(path) / CFG_FILE)
    if (raw["d_in"], raw["d_sae"]) != (cfg.d_in, cfg.d_sae):
        raise ValueError(f"{path}: cfg.json d_in/d_sae disagree with its paper_lib config")
    if expected_d_in is not None and cfg.d_in != expected_d_in:
        raise ValueError(f"SAE at {path} has d_in={cfg.d_in} but the activations have "
                         f"d_in={expected_d_in}: wrong hook or model for this SAE")
    wfile = Path(path) / WEIGHTS_FILE
    if not wfile.is_file():
        raise FileNotFoundError(f"no {WEIGHTS_FILE} in {path}")
    try:
        state = load_file(str(wfile))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{wfile} is not a readable safetensors file ({e}); "
                         "it is corrupt or truncated") from None
    if not ours:
        state = _saelens_state(raw, state, wfile)
    sae = make_sae(cfg)
    expected = {k: tuple(v.shape) for k, v in sae.state_dict().items()}
    if "threshold" in state and expected.get("threshold") == ():  # BatchTopK's one theta
        state["threshold"] = state["threshold"][0].clone()
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(f"{wfile} lacks weight(s) {missing}")
    bad = {k: (tuple(state[k].shape), s) for k, s in expected.items() if tuple(state[k].shape) != s}
    if bad:
        raise ValueError(f"{wfile} has wrong shapes {bad} (found, expected)")
    sae.load_state_dict({k: state[k] for k in expected})
    sae.init_known = ours
    return sae.to(device)
