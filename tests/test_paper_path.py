"""Every notebook on the `paper` path, offline: papermill runs each at profile='paper' with
small overrides, in a kernel whose IPython startup file installs the hub stand-ins
(tests/standin_hub.py: a 12-layer HookedTransformer with a BPE tokenizer for
`from_pretrained`, a local text file for the streamed dataset). What it guards: the code
that only the paper profile reaches (tokenizer-based text, hub datasets, GPT-2's layers,
streamed activations) runs end to end with no code change."""

from __future__ import annotations

import json
from pathlib import Path

from paper_lib.reproduce import NOTEBOOK_DIR, kernel_name

LM = {"n_tokens": 4096, "n_eval_tokens": 1024, "batch_size": 256, "analysis_tokens": 1024,
      "dead_window": 1024}
SMALL = {
    "01_afa_bound": {**LM, "ce_rows": 4, "n_atoms": 64, "atom_dim": 32, "eps_values": [0.3],
                     "h_values": [2, 4], "n_samples": 200, "d_sae": 128, "k": 8,
                     "topk_ks": [8, 16, 32], "afa_lambdas": [0.01, 0.03], "steps": 20},
    # its LM section reads the paper preset's 50M-token stream: tested in test_data.py
    "02_amortisation_gap": {"n_seeds": 1, "train_steps": 50, "sc_steps": 50, "ito_steps": 20,
                            "sweep_dims": [8, 16], "sweep_latents": [16, 32], "sweep_seeds": 1,
                            "lm_gap": False, "workers": 1},
    "03_topk_scaling": {**LM, "ce_rows": 4, "n_values": [32, 64, 128], "k_values": [4, 8, 16],
                        "relu_l1": [1.0, 4.0], "frontier_n": 128, "dead_n": 128, "dead_k": 4,
                        "multi_k": 4, "steps": 20, "lr_ref_n": 128,
                        "eval_every": 5, "n_explain": 8, "n_ablate": 4},
    "04_matryoshka_tradeoffs": {**LM, "ce_rows": 4, "d_sae": 256, "k": 8,
                                "min_granularity": 64, "steps": 20, "rsa_samples": 64,
                                "n_explain": 8, "cost_sizes": [128, 256], "cost_ks": [8, 16],
                                "cost_batch": 256, "cost_rounds": 3, "syn_features": 64,
                                "syn_dim": 16, "syn_steps": 20, "extra_sizes": [128],
                                "extra_ks": [8], "context_size": 64},  # the others: 128
    # after 01, 03, 04: a custom run, it explores their SAEs, saved under paper-custom
    "05_explore": {**LM, "fallback_steps": 20},
}


def test_every_notebook_runs_on_the_paper_path(tmp_path, monkeypatch):
    import papermill as pm

    startup = tmp_path / "ipython" / "profile_default" / "startup"
    startup.mkdir(parents=True)
    root = Path(__file__).resolve().parents[1]
    (startup / "00-standin-hub.py").write_text(
        "import sys\nfrom pathlib import Path\n"
        f"sys.path.insert(0, {str(root)!r})\n"
        "from tests import standin_hub\n"
        f"standin_hub.install(Path({str(tmp_path / 'hub')!r}), Path({str(tmp_path / 'data')!r}))\n"
        # The paper preset's 50 M tokens stream from the LM (train is None): so do these.
        "import paper_lib.data.activations as acts\nacts.CACHE_LIMIT_BYTES = 0\n")
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    monkeypatch.setenv("PAPER_LIB_OUTPUT_ROOT", str(tmp_path / "out"))
    for stem, params in SMALL.items():
        pm.execute_notebook(str(NOTEBOOK_DIR / f"{stem}.ipynb"), str(tmp_path / f"{stem}.ipynb"),
                            parameters={"profile": "paper", "device": "cpu", **params},
                            kernel_name=kernel_name(), progress_bar=False,
                            cwd=str(NOTEBOOK_DIR))
    records = {p.stem: json.loads(p.read_text())
               for p in (tmp_path / "out" / "results" / "paper-custom").glob("*.json")}
    assert set(records) == set(SMALL)
    for stem, rec in records.items():
        assert rec["params"]["profile"] == "paper" and rec["params"].get("model", "gpt2") == "gpt2"
        assert rec["claims"] or stem == "05_explore"
    def printed(stem):
        cells = json.loads((tmp_path / f"{stem}.ipynb").read_text())["cells"]
        return ["".join(out.get("data", {}).get("text/plain", "") or out.get("text", ""))
                for c in cells for out in c.get("outputs", [])]
    for stem in ("01_afa_bound", "03_topk_scaling", "04_matryoshka_tradeoffs"):
        assert any("4,096 streamed train" in t for t in printed(stem)), stem
    # 03 read the stand-in's subword text: its n-gram explanations are words of it
    tables = printed("03_topk_scaling")
    table = next(t for t in tables if "ngram" in t and "fit_f1" in t)
    assert "Ġ" not in table and any(w in table for w in (" quick", " brown", " fox", " jumps"))
    # 05 found the SAEs that 01, 03 and 04 saved (under the stand-in data root, not data/)
    found = records["05_explore"]["metrics"]["saes"]
    assert {name.split("/")[1] for name in found} == {"01_afa_bound", "03_topk_scaling",
                                                      "04_matryoshka_tradeoffs"}
    saved = tmp_path / "data" / "saes" / "paper-custom"
    contexts: dict[str, set[int]] = {}  # the token rows' length each saved SAE records
    for cfg in saved.glob("*/*/cfg.json"):
        contexts.setdefault(cfg.parts[-3], set()).add(
            json.loads(cfg.read_text())["metadata"]["context_size"])
    assert contexts == {"01_afa_bound": {128}, "03_topk_scaling": {128},
                        "04_matryoshka_tradeoffs": {64}}
