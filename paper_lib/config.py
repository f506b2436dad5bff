"""Notebook parameters: one frozen dataclass per notebook, with named profile presets.

A notebook's `parameters` cell sets plain values (Papermill injects overrides after
it); the next cell calls `XParams.from_namespace(globals())`, which rejects unknown
names, wrong types and out-of-range values with a `ValueError` naming the parameter,
the bad value and what is allowed, before any compute starts. (Papermill itself only
warns about unknown parameters.)

Profiles (DESIGN.md): `smoke` (CPU, offline, minutes), `gpu` (one H100, offline,
<= 10 min per notebook), `paper` (GPU + internet: GPT-2 small and a streamed HF dataset).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Literal, Mapping, TypeVar

PROFILES = ("smoke", "gpu", "paper")
Profile = Literal["smoke", "gpu", "paper"]
P = TypeVar("P", bound="Params")

# Names IPython puts in a kernel's namespace; never parameters.
_IPYTHON_NAMES = {"In", "Out", "get_ipython", "exit", "quit", "open"}
_SEEN_KEY = "_paper_lib_param_names"


def param(default: Any, help: str, *, lo: float | None = None, hi: float | None = None,
          lo_open: bool = False) -> Any:
    """A dataclass field with documentation and an allowed range (`lo <= v <= hi`;
    `lo_open` makes the lower bound strict)."""
    return field(default=default, metadata={"help": help, "lo": lo, "hi": hi, "lo_open": lo_open})


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Return `value` converted to `tp`, or raise a ValueError that says what is allowed."""
    origin = typing.get_origin(tp)
    bad = ValueError(f"parameter {name!r} = {value!r} ({type(value).__name__}) is invalid: "
                     f"expected {_type_name(tp)}")
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(tp):
            try:
                return _coerce(name, value, arg)
            except ValueError:
                continue
        raise bad
    if tp is type(None):
        if value is None:
            return None
        raise bad
    if origin is Literal:
        if value in typing.get_args(tp) and not isinstance(value, bool):
            return value
        raise bad
    if origin is tuple:
        if isinstance(value, (list, tuple)):
            elem = typing.get_args(tp)[0]
            return tuple(_coerce(f"{name}[{i}]", v, elem) for i, v in enumerate(value))
        raise bad
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    raise TypeError(f"unsupported parameter type {tp!r} for {name!r}")


def _check_range(name: str, value: Any, meta: Mapping[str, Any]) -> None:
    lo, hi, lo_open = meta.get("lo"), meta.get("hi"), meta.get("lo_open", False)
    values = value if isinstance(value, tuple) else (value,)
    for v in values:
        if not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        too_low = lo is not None and (v <= lo if lo_open else v < lo)
        too_high = hi is not None and v > hi
        if too_low or too_high:
            low = "" if lo is None else (f"> {lo}" if lo_open else f">= {lo}")
            high = "" if hi is None else f"<= {hi}"
            allowed = " and ".join(s for s in (low, high) if s)
            raise ValueError(f"parameter {name!r} = {value!r} is out of range: must be {allowed}")


@dataclass(frozen=True)
class Params:
    """Base for notebook parameters. Subclasses add fields with `param(...)` and a
    `PRESETS` mapping profile -> field overrides."""

    profile: Profile = param("smoke", "named preset: smoke (CPU), gpu (one H100), paper (GPT-2)")
    seed: int = param(0, "base random seed", lo=0)
    device: str = param("auto", "'auto', 'cpu' or 'cuda[:i]'")
    progress: bool = param(True, "show tqdm progress bars")

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            value = _coerce(f.name, getattr(self, f.name), hints[f.name])
            _check_range(f.name, value, f.metadata)
            object.__setattr__(self, f.name, value)
        if self.device not in ("auto", "cpu") and not self.device.startswith("cuda"):
            raise ValueError(f"parameter 'device' = {self.device!r} is invalid: "
                             "expected 'auto', 'cpu' or 'cuda[:i]'")
        self.validate()

    def validate(self) -> None:
        """Cross-field checks; subclasses override and raise ValueError."""

    # -- construction -------------------------------------------------------------
    @classmethod
    def names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_profile(cls: type[P], profile: str = "smoke", **overrides: Any) -> P:
        """The `profile` preset with `overrides` on top; a None override keeps the preset."""
        if profile not in PROFILES:
            raise ValueError(f"parameter 'profile' = {profile!r} is invalid: "
                             f"expected one of {', '.join(PROFILES)}")
        unknown = sorted(set(overrides) - set(cls.names()))
        if unknown:
            raise ValueError(
                f"unknown parameter(s) {', '.join(repr(u) for u in unknown)} for {cls.__name__}; "
                f"allowed: {', '.join(cls.names())}")
        values = {**cls.PRESETS.get(profile, {}), "profile": profile}
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    @classmethod
    def from_namespace(cls: type[P], namespace: Mapping[str, Any]) -> P:
        """Build from a notebook's globals(): every public plain value there (what the
        parameters cell and Papermill's injected cell defined) must be a parameter."""
        plain = (bool, int, float, str, list, tuple, dict, type(None))
        given = {
            k: v for k, v in namespace.items()
            if not k.startswith("_") and k not in _IPYTHON_NAMES and isinstance(v, plain)
        }
        # Re-running this cell interactively after later cells: names those cells defined
        # are not parameters. The first (Papermill) execution sees only parameter names.
        seen = namespace.get(_SEEN_KEY)
        if isinstance(seen, (set, frozenset)):
            given = {k: v for k, v in given.items() if k in seen or k in cls.names()}
        profile = given.pop("profile", "smoke")
        params = cls.from_profile(profile, **given)
        if isinstance(namespace, dict):
            namespace[_SEEN_KEY] = frozenset(given) | {"profile"}
        return params

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def replace(self: P, **changes: Any) -> P:
        return dataclasses.replace(self, **changes)

    def torch_device(self) -> Any:
        """The torch device for this run; the gpu and paper profiles refuse to run on CPU
        unless device='cpu' is passed explicitly."""
        import torch

        from paper_lib.runtime import pick_device

        if self.profile in ("gpu", "paper") and self.device == "auto" \
                and not torch.cuda.is_available():
            raise ValueError(f"profile {self.profile!r} needs a CUDA GPU and torch sees none; "
                             "use profile='smoke', or pass device='cpu' to force a (slow) CPU run")
        return pick_device(self.device)

    def describe(self) -> str:
        """One line per parameter: name = value  # help."""
        return "\n".join(f"{f.name} = {getattr(self, f.name)!r}  # {f.metadata.get('help', '')}"
                         for f in fields(self))


@dataclass(frozen=True)
class LMParams(Params):
    """Parameters shared by the notebooks that read language-model activations."""

    model: str = param("embedded-smoke", "'embedded-smoke', 'embedded-gpu' or a "
                       "transformer-lens model name such as 'gpt2'")
    dataset: str = param("stdlib", "'stdlib' (embedded corpus) or a Hugging Face dataset name")
    hook: str = param("", "hook point; '' picks blocks.{n_layers//2}.hook_resid_pre")
    n_tokens: int = param(200_000, "activation tokens harvested for training", lo=1024)
    n_eval_tokens: int = param(16_384, "held-out activation tokens for evaluation", lo=256)
    batch_size: int = param(1024, "SAE training batch size (tokens)", lo=1)

    def validate(self) -> None:
        embedded = self.model.startswith("embedded-")
        if embedded and self.model not in ("embedded-smoke", "embedded-gpu"):
            raise ValueError(f"parameter 'model' = {self.model!r} is invalid: embedded models "
                             "are 'embedded-smoke' and 'embedded-gpu'")
        if embedded != (self.dataset == "stdlib"):
            raise ValueError("parameters 'model' and 'dataset' disagree: the embedded LMs read "
                             "dataset='stdlib'; a hub model needs a hub dataset")


_LM_SMOKE = {"model": "embedded-smoke", "dataset": "stdlib", "hook": "", "n_tokens": 200_000,
             "n_eval_tokens": 16_384, "batch_size": 1024}
_LM_GPU = {"model": "embedded-gpu", "n_tokens": 8_000_000, "n_eval_tokens": 131_072,
           "batch_size": 4096}
_LM_PAPER = {"model": "gpt2", "dataset": "Skylion007/openwebtext", "hook": "",
             "n_tokens": 50_000_000, "n_eval_tokens": 262_144, "batch_size": 4096}


@dataclass(frozen=True)
class AmortParams(Params):
    """Notebook 02: the amortisation gap (O'Neill, Gumran, Klindt; arXiv 2411.13117)."""

    n_latents: int = param(16, "N, number of ground-truth latents", lo=2)
    dim: int = param(8, "M, data dimension (M < N is the compressed regime)", lo=1)
    k: int = param(3, "K, active latents per sample", lo=1)
    n_train: int = param(1024, "training samples", lo=16)
    n_test: int = param(1024, "test samples", lo=16)
    l1: float = param(0.01, "L1 weight in MSE + l1 * ||z||_1", lo=0.0)
    n_seeds: int = param(3, "independent seeds (data, dictionary and init)", lo=1)
    train_steps: int = param(3000, "full-batch Adam steps for amortised encoders", lo=1)
    lr: float = param(3e-3, "Adam lr of the amortised encoders (SAE, MLP)", lo=0, lo_open=True)
    sc_steps: int = param(4000, "steps of joint dictionary + code optimisation", lo=1)
    sc_lr: float = param(3e-2, "Adam lr of sparse coding", lo=0, lo_open=True)
    ito_steps: int = param(1000, "Adam steps of inference-time optimisation", lo=1)
    mlp_widths: tuple[int, ...] = param((32, 256), "hidden widths of the MLP encoders", lo=1)
    sweep_dims: tuple[int, ...] = param((), "M values of the (M, N) scaling sweep", lo=1)
    sweep_latents: tuple[int, ...] = param((), "N values paired with sweep_dims", lo=2)
    sweep_seeds: int = param(3, "seeds per point of the scaling sweep", lo=1)
    lm_gap: bool = param(True, "measure the SAE vs ITO FVU gap on LM activations")
    lm_model: str = param("embedded-smoke", "LM for the real-activation gap")
    workers: int = param(0, "worker processes for independent seeds (0: one per CPU core)",
                         lo=0)

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "smoke": {},
        "gpu": {"n_seeds": 5, "train_steps": 6000, "sc_steps": 6000, "ito_steps": 2000,
                "sweep_dims": (8, 16, 16, 32, 64), "sweep_latents": (16, 32, 64, 128, 256),
                "lm_model": "embedded-gpu"},
        "paper": {"n_seeds": 5, "train_steps": 6000, "sc_steps": 6000, "ito_steps": 2000,
                  "sweep_dims": (8, 16, 16, 32, 64), "sweep_latents": (16, 32, 64, 128, 256),
                  "lm_model": "gpt2"},
    }

    def validate(self) -> None:
        if self.k > self.n_latents:
            raise ValueError(f"parameter 'k' = {self.k} exceeds 'n_latents' = {self.n_latents}: "
                             "a code cannot have more active latents than latents")
        if len(self.sweep_dims) != len(self.sweep_latents):
            raise ValueError("parameters 'sweep_dims' and 'sweep_latents' must have equal "
                             f"length (got {len(self.sweep_dims)} and {len(self.sweep_latents)})")
        for m, n in zip(self.sweep_dims, self.sweep_latents):
            if not self.k < m < n:
                raise ValueError(f"sweep pair (M={m}, N={n}) must satisfy K < M < N "
                                 f"with K={self.k}")


def lm_preset(profile: str) -> dict[str, Any]:
    """The shared activation settings of a profile (one harvest serves every notebook)."""
    return {**_LM_SMOKE, **{"smoke": {}, "gpu": _LM_GPU, "paper": _LM_PAPER}[profile]}
