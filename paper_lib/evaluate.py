"""`python -m paper_lib.evaluate`: score saved SAEs with the papers' metrics.

Any SAE folder `load_sae` reads (ours, or a "standard", "topk" or "jumprelu" SAE that
SAELens saved, say a release fetched with `SAE.from_pretrained`) is scored on held-out
activations of the LM it was made for, in raw model units:
- reconstruction: FVU, L0 and the fraction of latents that never fire on those tokens;
- downstream (Gao et al. 2024): next-token CE with the reconstruction spliced in at the
  hook, against the clean and zero-ablated model: CE recovered and delta LM loss;
- under-activation (Lee et al. 2025): the ZF plot's ||f~|| / ||z|| per token (median, and
  the fraction below 1) and the median eps-LBO.
The LM, hook and (on a hub LM) dataset default to the ones the SAEs record, so scoring the
notebooks' own SAEs needs only their folder. Results go to a JSON file, one record per SAE,
and a table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch

from paper_lib.config import HUB_CONTEXT, check_rows, check_source, default_ce_rows
from paper_lib.data.activations import check_context_size, load_activations


def agreed(cfgs: Iterable[dict[str, Any]], key: str) -> str:
    """The model, hook or dataset (`key` of what the parsed cfg.json files record) the
    SAEs agree on, or ""."""
    from paper_lib.sae.io import recorded

    seen = {recorded(raw, key) or "" for raw in cfgs}
    seen.discard("")
    return seen.pop() if len(seen) == 1 else ""


@torch.no_grad()
def score(sae: Any, x: torch.Tensor, splice: Any) -> dict[str, float]:
    """The metrics above for one SAE on raw held-out rows x; `splice` is the activation
    set's `SpliceEval` (raw-units reconstruction -> CE losses)."""
    from paper_lib.experiments.afa import zf_data
    from paper_lib.train import encode_all, evaluate

    sae.eval()
    encoded = encode_all(sae, x)  # once, for the reconstruction metrics and the ZF plot
    out = evaluate(sae, x, encoded=encoded)
    ce = splice(lambda a: sae(a).recon)
    zf = zf_data(sae, x, encoded[0])
    lbo = zf["eps_lbo"][np.isfinite(zf["eps_lbo"])]
    out.update(ce_clean=ce.clean, ce_spliced=ce.spliced, ce_zero=ce.zero,
               ce_recovered=ce.recovered, delta_lm=ce.delta,
               zf_ratio_median=float(np.median(zf["ratio"])),
               under_activated=float(np.mean(zf["ratio"] < 1)),
               eps_lbo_median=float(np.median(lbo)) if lbo.size else float("nan"))
    return out


COLUMNS = ("fvu", "l0", "dead_eval", "ce_recovered", "delta_lm", "zf_ratio_median",
           "under_activated", "eps_lbo_median")


def table(records: list[dict[str, Any]]) -> str:
    """The records as a plain-text table, one row per SAE."""
    width = max(len(r["name"]) for r in records)
    lines = [f"{'SAE':<{width}}  " + "  ".join(f"{c:>15}" for c in COLUMNS)]
    lines += [f"{r['name']:<{width}}  " + "  ".join(f"{r[c]:>15.4g}" for c in COLUMNS)
              for r in records]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Score saved SAEs (folders holding cfg.json, or folders of them) on held-out
    activations of their LM: FVU, L0, dead latents, CE recovered and delta LM loss (Gao et
    al.), ZF under-activation and eps-LBO (Lee et al.). It runs under the notebooks' pinned
    CPU numerics, so the embedded LM it loads is the notebooks' cached one."""
    from paper_lib.runtime import atomic_write_json, cpu_numerics, pick_device
    from paper_lib.sae.io import (
        SAELENS_PREFIX,
        listed_saes,
        read_cfg,
        recorded,
        saelens_lists,
        short_context_notes,
    )
    from paper_lib.widgets import ExplorerData

    ap = argparse.ArgumentParser(prog="python -m paper_lib.evaluate", description=main.__doc__)
    ap.add_argument("saes", nargs="+", help="SAE folders (ours or SAELens'), folders of them, "
                    "or SAELens SAEs as sae_lens:<release>/<sae_id> or "
                    "sae_lens:<owner>/<hf-repo>/<folder> (fetched once)")
    ap.add_argument("--model", default="", help="the LM: embedded-smoke, embedded-gpu or a "
                    "transformer-lens name such as gpt2 (default: the one the SAEs record)")
    ap.add_argument("--dataset", default="", help="stdlib (embedded corpus) or a Hugging Face "
                    "dataset (default: stdlib for an embedded LM, else the one the SAEs "
                    "record)")
    ap.add_argument("--data-files", help="with --dataset text: local text file(s)")
    ap.add_argument("--hook", default="", help="hook name (default: the one the SAEs record, "
                    "else the middle layer's resid_pre)")
    ap.add_argument("--n-eval-tokens", type=int, default=16_384, help="held-out tokens")
    ap.add_argument("--context-size", type=int, default=0, help="tokens per held-out row, BOS "
                    "included, for a hub LM (default: the shortest training context the SAEs "
                    f"record, at most {HUB_CONTEXT}; an embedded LM's rows are its context)")
    ap.add_argument("--ce-rows", type=int, help="held-out token rows for CE (default: 32, or "
                    "all the held-out activations' rows where they are fewer)")
    ap.add_argument("--seed", type=int, default=0, help="which draw of the data is held out")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda[:i]")
    ap.add_argument("--out", type=Path, required=True, help="metrics JSON")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    for name in ("n_eval_tokens", "ce_rows"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} {getattr(args, name)}: must be >= 1")
    try:  # every folder and setting checked before an LM is loaded
        paths = listed_saes(args.saes, root=Path.cwd(), what="SAE folder")
        device = pick_device(args.device)
    except ValueError as e:
        ap.error(str(e))
    cfgs = {name: read_cfg(p) for name, p in paths.items()}
    model = args.model or agreed(cfgs.values(), "model_name") or "embedded-smoke"
    hook = args.hook or agreed(cfgs.values(), "hook_name")
    dataset = args.dataset or ("stdlib" if model.startswith("embedded-")
                               else agreed(cfgs.values(), "dataset_path"))
    if not dataset:
        ap.error(f"--dataset: the SAEs record no dataset of {model}'s text to score them on; "
                 "name one, e.g. --dataset Skylion007/openwebtext")
    # on a hub LM, rows no longer than any SAE's training context: positions past it would
    # score the SAE outside what it was trained on
    trained = {name: int(c) for name, raw in cfgs.items()
               if (c := recorded(raw, "context_size"))}
    context = args.context_size or (min([HUB_CONTEXT, *trained.values()]) if trained and
                                    not model.startswith("embedded-") else None)
    try:
        check_source(model, dataset)
        check_context_size(model, context)
    except ValueError as e:
        ap.error(str(e))
    if argv is None:  # a command line: the notebooks' CPU numerics, and so their cached LM
        from paper_lib.kernelspec import exec_pinned

        exec_pinned("paper_lib.evaluate")
    acts = load_activations(model, dataset, hook, 1, args.n_eval_tokens, device,
                            args.seed, progress=not args.quiet, stream=True,
                            data_files=args.data_files, context_size=context)
    try:
        # the rows' length is known once the LM is: a hub LM's context may be the shorter
        row_tokens = int(acts.eval_tokens.shape[1])
        if args.ce_rows is None:
            args.ce_rows = default_ce_rows(args.n_eval_tokens, row_tokens)
        check_rows("--ce-rows", args.ce_rows, "--n-eval-tokens", args.n_eval_tokens, row_tokens)
        saes = ExplorerData.load_saes(paths, acts.d, acts.hook, model, required=tuple(paths))
    except ValueError as e:
        ap.error(str(e))
    x = acts.eval / acts.scale  # raw units: saved SAEs take raw activations
    splice = acts.splice_eval(args.ce_rows)
    records = [{"name": name.removeprefix("listed/"), "path": str(paths[name]),
                "architecture": sae.cfg.architecture, "d_sae": sae.cfg.d_sae,
                **score(sae.to(device), x, splice),
                **({"context_size": trained[name]} if name in trained else {})}
               for name, sae in saes.items()]
    for r in records:  # what SAELens lists for a release SAE, next to ours
        if r["name"].startswith(SAELENS_PREFIX) and (listed := saelens_lists(r["name"])):
            r["saelens_lists"] = listed
    atomic_write_json(args.out, {"model": model, "dataset": dataset, "hook": acts.hook,
                                 "n_eval_tokens": int(x.shape[0]), "ce_rows": args.ce_rows,
                                 "row_tokens": row_tokens,
                                 "seed": args.seed, "saes": records,
                                 "cpu_numerics": cpu_numerics()})
    print(table(records), file=sys.stderr)
    for r in records:
        listed = r.get("saelens_lists") or {}
        if listed:
            print(f"{r['name']}: SAELens lists " + ", ".join(
                f"{k.replace('_', ' ')} {v:g}" for k, v in listed.items())
                + f" (its authors' data); here L0 {r['l0']:.4g}, explained variance "
                f"(1 - FVU) {1 - r['fvu']:.4g}", file=sys.stderr)
    for line in short_context_notes({r["name"]: r["context_size"] for r in records
                                     if "context_size" in r}, row_tokens, "scored",
                                    None if model.startswith("embedded-") else "--context-size"):
        print(line, file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
