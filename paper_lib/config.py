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

import ast
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar, Literal, Mapping, TypeVar

PROFILES = ("smoke", "gpu", "paper")
# Token rows' length, BOS included: a hub LM's by default (data.activations reads it here)
# and the embedded LMs' (their whole context: data.lm.EMBEDDED_LMS' n_ctx is set from it),
# known here for checks made before an LM is loaded.
HUB_CONTEXT = 128
EMBEDDED_CONTEXT = {"embedded-smoke": 128, "embedded-gpu": 256}
Profile = Literal["smoke", "gpu", "paper"]
P = TypeVar("P", bound="Params")

# Names IPython puts in a kernel's namespace; never parameters.
_IPYTHON_NAMES = {"In", "Out", "get_ipython", "exit", "quit", "open"}
_SEEN_KEY = "_paper_lib_param_names"


def param(default: Any, help: str, *, lo: float | None = None, hi: float | None = None,
          lo_open: bool = False, repeats: bool = False) -> Any:
    """A dataclass field with documentation and an allowed range (`lo <= v <= hi`;
    `lo_open` makes the lower bound strict). A list's values are the settings of a sweep
    and must differ, unless `repeats` (one side of a list of pairs: the pairs must differ,
    which the class's `validate` checks with `refuse_repeats`)."""
    return field(default=default, metadata={"help": help, "lo": lo, "hi": hi, "lo_open": lo_open,
                                            "repeats": repeats})


def refuse_repeats(name: str, values: Any) -> None:
    """A ValueError if a sweep lists one setting twice: its run would be trained twice under
    one name, and fits and trends would count it twice."""
    seen: set = set()
    for v in values:
        if v in seen:
            raise ValueError(f"parameter {name!r} = {list(values)} lists {v!r} twice: each "
                             "value is one setting of the sweep; list it once")
        seen.add(v)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is tuple:
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    return getattr(tp, "__name__", str(tp))


def _annotation(tp: Any) -> str:
    """A plain annotation for the parameters cell (Papermill parses bare names only)."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return type(typing.get_args(tp)[0]).__name__
    if origin in (typing.Union, types.UnionType):
        return _annotation(next(a for a in typing.get_args(tp) if a is not type(None)))
    if origin is tuple:
        return "list"
    return tp.__name__


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
        if isinstance(value, str):  # `papermill -p name "[8, 16]"` passes the text
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                pass
            if isinstance(value, str) and typing.get_args(tp)[0] is str:
                value = [value]  # one path, say: a list of one
            if not isinstance(value, (list, tuple)):
                raise ValueError(f"{bad} (written as a list: -p {name} \"[...]\", or "
                                 f"-y \"{name}: [...]\")")
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


def heldout_rows(n_eval_tokens: int, context: int) -> int:
    """The token rows that `n_eval_tokens` held-out activations come from, in rows of
    `context` tokens (BOS gives none). A hub stream reads whole batches of rows, so its
    held-out text may run on past them; those rows are not counted."""
    return math.ceil(n_eval_tokens / (context - 1))


def default_ce_rows(n_eval_tokens: int, context: int) -> int:
    """The command lines' CE rows unless asked: 32, or every held-out row where fewer."""
    return min(32, heldout_rows(n_eval_tokens, context))


def check_rows(what: str, rows: int, tokens_name: str, n_eval_tokens: int,
               context: int) -> None:
    """Refuse `rows` held-out token rows (`what`: how the user named them) above the
    `heldout_rows` of `n_eval_tokens` (`tokens_name`) in rows of `context` tokens."""
    held = heldout_rows(n_eval_tokens, context)
    if rows > held:
        raise ValueError(f"{what} = {rows} exceeds the {held} held-out token rows "
                         f"({tokens_name} = {n_eval_tokens:,} in rows of {context} tokens); "
                         f"ask for fewer rows or raise {tokens_name}")


def check_source(model_name: str, dataset: str) -> None:
    """A ValueError, before any work, if `model_name` cannot read `dataset`: the embedded
    corpus's byte rows mean nothing to a hub LM's tokenizer, and an embedded LM has no
    tokenizer for a hub dataset's text."""
    if (dataset == "stdlib") != model_name.startswith("embedded-"):
        raise ValueError(f"model {model_name!r} and dataset {dataset!r} disagree: the embedded "
                         "LMs read dataset 'stdlib'; a hub model needs a hub dataset")


def check_dead_window(what: str, window: int, trained: int, trained_name: str) -> None:
    """Refuse a dead-latent window (`what`: how the user named it) not below the `trained`
    tokens (`trained_name`: how they are counted): no latent could ever count as dead."""
    if window >= trained:
        raise ValueError(f"{what} = {window:,} is not below the {trained:,} tokens trained on "
                         f"({trained_name}): no latent could count as dead (AuxK would never "
                         "act, dead_train would read 0); lower it or train longer")


def check_device(profile: str, device: str) -> Any:
    """The torch device `device` names, or a ValueError saying why it cannot be had: the
    gpu and paper profiles refuse a CPU-only machine unless device='cpu' asks for a (slow)
    CPU run, and a CUDA device must exist. 'auto' is the CPU at smoke, GPU or not: smoke is
    the CPU reference (its committed records and the outputs nbval checks are CPU results,
    under the pinned CPU numerics); device='cuda' runs it on a GPU. Elsewhere 'auto' is CUDA
    where torch sees a GPU. Cheap: no CUDA context is created."""
    import torch

    from paper_lib.runtime import pick_device

    if profile == "smoke" and device == "auto":
        return torch.device("cpu")
    if profile in ("gpu", "paper") and device == "auto" and not torch.cuda.is_available():
        raise ValueError(f"profile {profile!r} needs a CUDA GPU and torch sees none; "
                         "use profile='smoke', or pass device='cpu' to force a (slow) CPU run")
    return pick_device(device)


# What a `device` parameter or --device option may say, matched whole: 'cuda:x' or 'cudaa'
# would otherwise reach torch's own "Invalid device string" later.
DEVICE_PATTERN = r"auto|cpu|cuda(:\d+)?"


@dataclass(frozen=True)
class Params:
    """Base for notebook parameters. Subclasses add fields with `param(...)` and a
    `PRESETS` mapping profile -> field overrides."""

    profile: Profile = param("smoke", "named preset: smoke (CPU), gpu (one H100), paper (GPT-2)")
    seed: int = param(0, "base random seed", lo=0)
    device: str = param("auto", "'auto' (smoke: the CPU; gpu, paper: CUDA), 'cpu' or 'cuda[:i]'")
    progress: bool = param(True, "show tqdm progress bars")

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {}

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            value = _coerce(f.name, getattr(self, f.name), hints[f.name])
            _check_range(f.name, value, f.metadata)
            if isinstance(value, tuple) and not f.metadata.get("repeats"):
                refuse_repeats(f.name, value)
            object.__setattr__(self, f.name, value)
        if not re.fullmatch(DEVICE_PATTERN, self.device):
            raise ValueError(f"parameter 'device' = {self.device!r} is invalid: "
                             "expected 'auto', 'cpu' or 'cuda[:i]' (i a GPU number)")
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
        # a notebook may run minutes of CPU work before it first asks for its device
        check_device(params.profile, params.device)
        if isinstance(namespace, dict):
            namespace[_SEEN_KEY] = frozenset(given) | {"profile"}
        return params

    @classmethod
    def parameters_cell(cls) -> str:
        """Source of the notebook's `parameters` cell: every field, annotated and with its
        help, so Papermill knows them all (`papermill --help-notebook` lists them; none
        reads as "unknown parameter"). None keeps the profile's preset."""
        hints = typing.get_type_hints(cls)
        lines = ["# Parameters: Papermill overrides land just below this cell. None keeps the",
                 "# profile's preset (the next cell prints the values this run uses)."]
        for f in fields(cls):
            value = repr(f.default) if f.name == "profile" else "None"
            lines.append(f"{f.name}: {_annotation(hints[f.name])} = {value}  "
                         f"# {f.metadata['help']}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def replace(self: P, **changes: Any) -> P:
        return dataclasses.replace(self, **changes)

    def torch_device(self) -> Any:
        """The torch device for this run (see `check_device`). On the CPU, deterministic
        kernels are switched on (reruns are bit-identical; see runtime.deterministic_on_cpu)."""
        from paper_lib.runtime import deterministic_on_cpu

        device = check_device(self.profile, self.device)
        deterministic_on_cpu(device)
        return device

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
    analysis_tokens: int = param(16_384, "held-out tokens for the heavier analyses (probes, "
                                 "explanations, ZF plots, explorers)", lo=256)
    context_size: int = param(0, "tokens per row read from a hub LM, BOS included (0: "
                              f"{HUB_CONTEXT}); embedded LMs read their whole context: leave 0",
                              lo=0)
    dead_window: int = param(50_000, "training tokens without firing after which a latent is "
                             "dead: AuxK trains the dead ones, dead_train counts them (Gao et "
                             "al.: 10M)", lo=1)

    TRAIN_STEPS: ClassVar[str] = "steps"
    """The parameter that counts a notebook's SAE training steps (dead_window's bound)."""

    def validate(self) -> None:
        if self.analysis_tokens > self.n_eval_tokens:
            raise ValueError(f"'analysis_tokens' = {self.analysis_tokens} exceeds "
                             f"'n_eval_tokens' = {self.n_eval_tokens}")
        embedded = self.model.startswith("embedded-")
        if embedded and self.model not in ("embedded-smoke", "embedded-gpu"):
            raise ValueError(f"parameter 'model' = {self.model!r} is invalid: embedded models "
                             "are 'embedded-smoke' and 'embedded-gpu'")
        check_source(self.model, self.dataset)
        if embedded and self.context_size:
            raise ValueError(f"parameter 'context_size' = {self.context_size} is for hub LMs: "
                             f"{self.model} reads rows of its whole context; leave it 0")
        if self.context_size == 1:
            raise ValueError("parameter 'context_size' = 1: a row needs BOS and a token; "
                             f"use at least 2 (0: the default, {HUB_CONTEXT})")
        steps = getattr(self, self.TRAIN_STEPS, None)  # None: LMParams alone trains no SAE
        if steps is not None:
            check_dead_window("parameter 'dead_window'", self.dead_window,
                              steps * self.batch_size, f"{self.TRAIN_STEPS} x batch_size")

    def check_ce_rows(self) -> None:
        """Refuse `ce_rows` (each subclass that computes CE has it) above the rows that
        n_eval_tokens fill (a hub LM with a shorter context than the rows asked for has
        more, shorter rows: never fewer)."""
        context = EMBEDDED_CONTEXT.get(self.model) or self.context_size or HUB_CONTEXT
        check_rows("parameter 'ce_rows'", getattr(self, "ce_rows"), "n_eval_tokens",
                   self.n_eval_tokens, context)

    @property
    def row_tokens(self) -> int | None:
        """`context_size` as `load_activations` takes it (None: the default)."""
        return self.context_size or None


_LM_SMOKE = {"model": "embedded-smoke", "dataset": "stdlib", "hook": "", "n_tokens": 200_000,
             "n_eval_tokens": 16_384, "batch_size": 1024, "analysis_tokens": 16_384,
             "context_size": 0, "dead_window": 50_000}
_LM_GPU = {"model": "embedded-gpu", "n_tokens": 8_000_000, "n_eval_tokens": 131_072,
           "batch_size": 4096, "analysis_tokens": 32_768, "dead_window": 1_000_000}
_LM_PAPER = {"model": "gpt2", "dataset": "Skylion007/openwebtext", "hook": "",
             "n_tokens": 50_000_000, "n_eval_tokens": 262_144, "batch_size": 4096,
             "analysis_tokens": 65_536, "dead_window": 10_000_000}


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
    sweep_dims: tuple[int, ...] = param((), "M values of the (M, N) scaling sweep", lo=1,
                                        repeats=True)
    sweep_latents: tuple[int, ...] = param((), "N values paired with sweep_dims", lo=2,
                                           repeats=True)
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
        refuse_repeats("(sweep_dims, sweep_latents)", list(zip(self.sweep_dims,
                                                                self.sweep_latents)))
        for m, n in zip(self.sweep_dims, self.sweep_latents):
            if not self.k < m < n:
                raise ValueError(f"sweep pair (M={m}, N={n}) must satisfy K < M < N "
                                 f"with K={self.k}")
        hub_data = lm_preset(self.profile)["dataset"] != "stdlib"
        if self.lm_gap and hub_data == self.lm_model.startswith("embedded-"):
            raise ValueError(f"parameter 'lm_model' = {self.lm_model!r} does not fit profile "
                             f"{self.profile!r}, which reads "
                             + ("a hub dataset: name a hub model such as 'gpt2'" if hub_data
                                else "the embedded corpus: use 'embedded-smoke' or "
                                "'embedded-gpu'"))
        if not {32, 256} <= set(self.mlp_widths) or max(self.mlp_widths) != 256:
            raise ValueError(f"parameter 'mlp_widths' = {list(self.mlp_widths)} must include "
                             "32 and 256, the paper's MLP encoders its claims are about, with "
                             "none wider (the unknown-dictionary MLP is the widest); add "
                             "other widths below 256 beside them")


def lm_preset(profile: str) -> dict[str, Any]:
    """The shared activation settings of a profile (one harvest serves every notebook)."""
    return {**_LM_SMOKE, **{"smoke": {}, "gpu": _LM_GPU, "paper": _LM_PAPER}[profile]}


@dataclass(frozen=True)
class AFAParams(LMParams):
    """Notebook 01: the AFA bound, ZF plots and top-AFA (Lee et al. 2025; arXiv 2503.24277)."""

    n_atoms: int = param(128, "synthetic dictionary size for the bound", lo=2)
    atom_dim: int = param(64, "synthetic dictionary dimension", lo=2)
    eps_values: tuple[float, ...] = param((0.15, 0.25, 0.35), "requested coherences eps",
                                          lo=0, lo_open=True, hi=0.99)
    h_values: tuple[int, ...] = param((2, 4, 8, 16), "active atoms per synthetic code", lo=2)
    n_samples: int = param(20_000, "synthetic codes per (eps, h)", lo=100)
    layers: tuple[int, ...] = param((), "residual layers to study (empty: the hook, or the "
                                    "middle layer)", lo=0)
    d_sae: int = param(512, "latents per SAE", lo=2)
    k: int = param(16, "TopK / BatchTopK / Matryoshka active latents", lo=1)
    l1_coeff: float = param(3.0, "ReLU SAE L1 weight (normalised activations)", lo=0)
    afa_lambda: float = param(1 / 32, "top-AFA norm-matching loss weight (the authors' "
                              "convention: against a per-element MSE)", lo=0)
    afa_lambdas: tuple[float, ...] = param((1 / 128, 1 / 64, 1 / 32, 1 / 24, 1 / 16),
                                           "top-AFA loss weights of the L0-FVU sweep (the "
                                           "authors' grid)", lo=0, lo_open=True)
    topk_ks: tuple[int, ...] = param((16, 32, 64, 128, 256), "k of the TopK frontier that "
                                     "top-AFA is compared with", lo=1)
    steps: int = param(400, "SAE training steps", lo=1)
    lr: float = param(4e-3, "SAE Adam learning rate", lo=0, lo_open=True)
    ce_rows: int = param(32, "held-out token rows for CE loss recovered", lo=1)
    # 2, not 3, at smoke and gpu: a run of 5 top-AFA SAEs costs ~50 s at smoke (make test
    # must fit 15 minutes on 2 cores) and an estimated minute of an H100 (01: 10 minutes)
    lambda_seeds: int = param(2, "runs of top-AFA's lambda sweep behind the L0 trend: the "
                              "sweep's, plus runs each on its own data draw, initialisation "
                              "and batch order", lo=1)

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "smoke": {},
        "gpu": {**_LM_GPU, "n_atoms": 512, "atom_dim": 256, "eps_values": (0.1, 0.15, 0.2),
                "h_values": (2, 4, 8, 16, 32), "n_samples": 100_000, "d_sae": 8192, "k": 32,
                # 4x apart, not 2x: with 7 k, 01 at gpu was unfinished after 430 s (H100)
                "topk_ks": (32, 128, 512, 2048),
                "l1_coeff": 3.0, "steps": 4000, "lr": 1e-3, "ce_rows": 256},
        "paper": {**_LM_PAPER, "n_atoms": 512, "atom_dim": 256, "eps_values": (0.1, 0.15, 0.2),
                  "h_values": (2, 4, 8, 16, 32), "n_samples": 100_000, "layers": (6, 7, 8),
                  "d_sae": 12288, "k": 32, "topk_ks": tuple(2 ** i for i in range(5, 14)),
                  "steps": 20_000, "lr": 3e-4, "ce_rows": 256, "lambda_seeds": 3},
    }

    def validate(self) -> None:
        super().validate()
        self.check_ce_rows()
        if self.k > self.d_sae:
            raise ValueError(f"parameter 'k' = {self.k} exceeds 'd_sae' = {self.d_sae}")
        if len(self.topk_ks) < 2 or max(self.topk_ks) > self.d_sae:  # repeats refused first
            raise ValueError(f"'topk_ks' = {list(self.topk_ks)} must hold at least two "
                             f"k, none above 'd_sae' = {self.d_sae}: the TopK "
                             "frontier interpolates between them")
        if len(self.afa_lambdas) < 2:
            raise ValueError(f"'afa_lambdas' = {list(self.afa_lambdas)} must hold at least two "
                             "values: top-AFA's L0 trend in lambda is read over them")
        if max(self.h_values) > self.n_atoms:
            raise ValueError(f"'h_values' = {list(self.h_values)}: a synthetic code cannot "
                             f"have more active atoms than 'n_atoms' = {self.n_atoms}")
        if self.atom_dim >= self.n_atoms:
            raise ValueError(f"'atom_dim' = {self.atom_dim} must be < 'n_atoms' = "
                             f"{self.n_atoms}: superposition needs more atoms than dimensions")
        if self.layers and self.hook:
            raise ValueError("set either 'layers' or 'hook', not both")


@dataclass(frozen=True)
class TopKParams(LMParams):
    """Notebook 03: TopK SAEs, scaling laws and evaluation (Gao et al. 2024)."""

    n_values: tuple[int, ...] = param((128, 256, 512, 1024), "latents n of the sweep", lo=2)
    k_values: tuple[int, ...] = param((4, 8, 16, 32), "active latents k of the sweep", lo=1)
    relu_l1: tuple[float, ...] = param((1.0, 2.0, 4.0, 8.0), "L1 weights of the ReLU baseline",
                                       lo=0, lo_open=True)
    frontier_n: int = param(512, "n of the TopK-vs-ReLU frontier (one of n_values)", lo=2)
    dead_n: int = param(1024, "n of the dead-latent ablation (one of n_values)", lo=2)
    dead_k: int = param(8, "k of the dead-latent ablation (one of k_values)", lo=1)
    multi_k: int = param(8, "k of the multi-TopK comparison (one of k_values)", lo=1)
    steps: int = param(250, "SAE training steps (all SAEs in lockstep)", lo=1)
    lr: float = param(4e-3, "Adam lr at n of lr_ref_n (other n: times sqrt(lr_ref_n / n))", lo=0,
                      lo_open=True)
    lr_ref_n: int = param(512, "reference n of the lr ~ 1/sqrt(n) rule", lo=1)
    eval_every: int = param(25, "steps between evaluations (dead-latent curves)", lo=1)
    ce_rows: int = param(32, "held-out token rows for downstream loss", lo=1)
    n_explain: int = param(48, "latents per SAE given n-gram explanations", lo=1)
    n_ablate: int = param(12, "latents per SAE ablated for effect sparsity", lo=1)
    probe_seeds: int = param(3, "runs of the probe comparisons (TopK vs ReLU, the trend in "
                             "n): the sweep's, plus runs each on its own data draw, "
                             "initialisation and batch order", lo=1)

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "smoke": {},
        "gpu": {**_LM_GPU, "n_values": (2048, 4096, 8192, 16384, 32768),
                "k_values": (8, 16, 32, 64), "relu_l1": (1.0, 2.0, 4.0, 8.0),
                "frontier_n": 8192, "dead_n": 32768, "dead_k": 16,
                "multi_k": 16, "steps": 1250, "lr": 2e-3, "lr_ref_n": 8192, "eval_every": 125,
                "ce_rows": 256, "n_explain": 128, "n_ablate": 24},
        "paper": {**_LM_PAPER, "n_values": (8192, 16384, 32768, 65536, 131072),
                  "k_values": (16, 32, 64, 128), "frontier_n": 32768, "dead_n": 131072,
                  "dead_k": 32, "multi_k": 32, "steps": 25_000,
                  "lr": 5e-4, "lr_ref_n": 32768, "eval_every": 1000, "ce_rows": 512,
                  "n_explain": 256, "n_ablate": 32},
    }

    def validate(self) -> None:
        super().validate()
        self.check_ce_rows()
        for name, value, pool in (("frontier_n", self.frontier_n, self.n_values),
                                  ("dead_n", self.dead_n, self.n_values),
                                  ("dead_k", self.dead_k, self.k_values),
                                  ("multi_k", self.multi_k, self.k_values)):
            if value not in pool:
                raise ValueError(f"parameter {name!r} = {value} must be one of {pool}")
        if max(self.k_values) > min(self.n_values):
            raise ValueError(f"largest k ({max(self.k_values)}) exceeds smallest n "
                             f"({min(self.n_values)})")
        if len(self.n_values) < 2 or len(self.k_values) < 2:
            raise ValueError("scaling fits need at least two values of n and of k")
        points = len(set(self.n_values)) * len(set(self.k_values))
        if points < 7:
            raise ValueError(f"'n_values' x 'k_values' give {points} (n, k) SAEs; the joint "
                             "scaling law has 6 parameters and needs at least 7 (e.g. 3 n "
                             "and 3 k)")


@dataclass(frozen=True)
class MatryoshkaParams(LMParams):
    """Notebook 04: Matryoshka SAEs and progressive coding (Peter & Sogaard 2025;
    arXiv 2505.00190)."""

    d_sae: int = param(1024, "latents n of the Matryoshka and vanilla TopK SAEs", lo=16)
    k: int = param(16, "active latents (BatchTopK average for Matryoshka)", lo=1)
    min_granularity: int = param(64, "smallest prefix size G (powers of two up to d_sae)", lo=1)
    steps: int = param(250, "SAE training steps", lo=1)
    lr: float = param(4e-3, "SAE Adam learning rate", lo=0, lo_open=True)
    ce_rows: int = param(32, "held-out token rows for recaptured CE loss", lo=1)
    rsa_samples: int = param(512, "samples for RSA", lo=16)
    n_explain: int = param(48, "latents per group given n-gram explanations", lo=4)
    cost_sizes: tuple[int, ...] = param((512, 1024, 2048), "n values of the cost benchmark",
                                        lo=16)
    cost_ks: tuple[int, ...] = param((16, 32, 64), "k values of the cost benchmark", lo=1)
    cost_batch: int = param(1024, "batch size of the cost benchmark", lo=1)
    cost_rounds: int = param(15, "timed rounds of the cost benchmark (one TopK and one "
                             "Matryoshka step each, interleaved)", lo=3)
    syn_features: int = param(256, "ground-truth features of the synthetic check", lo=8)
    syn_dim: int = param(64, "dimension of the synthetic check", lo=4)
    syn_steps: int = param(400, "training steps of the synthetic check", lo=1)
    extra_sizes: tuple[int, ...] = param((512, 1024), "n of further Matryoshka / TopK pairs "
                                         "(Matryoshka vs pruning at other sizes and k)", lo=16,
                                         repeats=True)
    extra_ks: tuple[int, ...] = param((16, 32), "k paired with extra_sizes", lo=1, repeats=True)

    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "smoke": {},
        "gpu": {**_LM_GPU, "extra_sizes": (8192, 16384), "extra_ks": (32, 64),
                "d_sae": 16384, "k": 32, "min_granularity": 512, "steps": 2000,
                "lr": 1e-3, "ce_rows": 256, "rsa_samples": 2048, "n_explain": 128,
                "cost_sizes": (8192, 16384, 32768), "cost_ks": (32, 64, 128),
                "cost_batch": 4096, "syn_features": 2048, "syn_dim": 256, "syn_steps": 2000},
        "paper": {**_LM_PAPER, "extra_sizes": (16384, 65536), "extra_ks": (64, 128),
                  "d_sae": 32768, "k": 64, "min_granularity": 1024,
                  "steps": 12_000, "lr": 5e-4, "ce_rows": 512, "rsa_samples": 4096,
                  "n_explain": 256, "cost_sizes": (16384, 32768, 65536),
                  "cost_ks": (64, 128, 256, 512), "cost_batch": 4096},
    }

    def validate(self) -> None:
        super().validate()
        self.check_ce_rows()
        if self.rsa_samples > self.analysis_tokens:  # drawn from the analysis tokens
            raise ValueError(f"parameter 'rsa_samples' = {self.rsa_samples} exceeds "
                             f"'analysis_tokens' = {self.analysis_tokens}, the rows it is "
                             "drawn from; lower it or raise analysis_tokens")
        if self.min_granularity & (self.min_granularity - 1):
            raise ValueError(f"parameter 'min_granularity' = {self.min_granularity} must be a "
                             "power of two")
        if len(self.extra_sizes) != len(self.extra_ks):
            raise ValueError("'extra_sizes' and 'extra_ks' must have equal length")
        # The main (n, k) pair and every extra pair obey the same nesting rules.
        pairs = [("d_sae", self.d_sae, "k", self.k)]
        pairs += [(f"extra_sizes[{i}]", n, f"extra_ks[{i}]", k)
                  for i, (n, k) in enumerate(zip(self.extra_sizes, self.extra_ks))]
        refuse_repeats("(d_sae, k) and (extra_sizes, extra_ks)", [(n, k) for _, n, _, k in pairs])
        for n_name, n, k_name, k in pairs:
            if n & (n - 1):
                raise ValueError(f"parameter {n_name!r} = {n} must be a power of two")
            if self.min_granularity > n // 2:
                raise ValueError(f"'min_granularity' must be at most {n_name} / 2")
            if k > self.min_granularity:
                raise ValueError(f"{k_name!r} = {k} exceeds 'min_granularity' = "
                                 f"{self.min_granularity}: a prefix could not hold k latents")
        if self.syn_dim >= self.syn_features:
            raise ValueError("'syn_dim' must be < 'syn_features' (superposition)")


@dataclass(frozen=True)
class ExploreParams(LMParams):
    """Notebook 05: the widget explorers."""

    fallback_steps: int = param(200, "training steps when no saved SAEs exist yet", lo=1)
    custom_saes: bool = param(False, "also explore the SAEs that notebook runs with "
                              "non-preset parameters saved (data/saes/<profile>-custom), as "
                              "a run with other non-preset parameters does anyway; a preset "
                              "run, whose record is the reference, explores the reference "
                              "runs' SAEs alone")
    sae_dirs: tuple[str, ...] = param((), "more SAEs to explore: folders holding cfg.json "
                                      "(saved by paper_lib, or SAELens' standard, topk or "
                                      "jumprelu SAEs) or folders of them, relative to the "
                                      "project root, or SAELens SAEs as "
                                      "'sae_lens:<release>/<sae_id>' or "
                                      "'sae_lens:<owner>/<hf-repo>/<folder>' (fetched once)")

    TRAIN_STEPS: ClassVar[str] = "fallback_steps"
    PRESETS: ClassVar[dict[str, dict[str, Any]]] = {
        "smoke": {},
        "gpu": {**_LM_GPU, "fallback_steps": 1000},
        "paper": {**_LM_PAPER, "fallback_steps": 5000},
    }

    def validate(self) -> None:
        super().validate()
        from paper_lib.sae.io import listed_saes

        listed_saes(self.sae_dirs)  # each folder must exist and hold a saved SAE
