"""bench/accuracy.md item 37: searched GLoRA against LoRA at LoRA r=1's budget and at r=4's, on one GPU.

    python bench/budget_table.py runs/g-* runs/r4-*     # suite roots (one task-seed each, or more)

Reads every ``<root>/<task>/seed<S>/retrain/metrics.json`` and the retrained ``subnet.yaml``, writes one row per
budget and task-seed into ``accuracy_budget_gpu.csv`` (test top-1 of GLoRA and LoRA, params, the lr and epochs
each chose on val200, and what the retrained subnet is made of) and prints GLoRA minus LoRA per budget: over
all task-seeds (mean, sample sd, standard error) and per task.
"""
from __future__ import annotations

import csv
import json
import statistics as st
import sys
from pathlib import Path

import yaml

CSV = Path(__file__).parent / "accuracy_budget_gpu.csv"
FIELDS = ["budget", "task", "seed", "glora_test", "lora_test", "diff", "glora_params", "lora_params", "lora_rank",
          "glora_lr", "glora_epochs", "glora_val", "search_rank", "lora_lr", "lora_epochs", "lora_val",
          "b_lora_layers", "a_vectors", "d_vectors", "e_vectors", "layers"]


def row(seed_dir: Path) -> dict:
    m = json.loads((seed_dir / "retrain" / "metrics.json").read_text())
    sub = yaml.safe_load((seed_dir / "retrain" / "subnet.yaml").read_text())
    lo = m["baselines"]["lora"]
    layers = sub["layers"]
    count = lambda t, pred: sum(1 for L in layers if pred(L[t]))  # noqa: E731
    return {
        "budget": f"LoRA r={lo['rank']}", "task": seed_dir.parent.name, "seed": int(seed_dir.name[4:]),
        "glora_test": round(100 * m["test_acc"], 2), "lora_test": round(100 * lo["test_acc"], 2),
        "diff": round(100 * (m["test_acc"] - lo["test_acc"]), 2),
        "glora_params": m["adapter_params"], "lora_params": lo["adapter_params"], "lora_rank": lo["rank"],
        "glora_lr": m["lr"], "glora_epochs": m["epochs"], "glora_val": m["val_acc"], "search_rank": m["search_rank"],
        "lora_lr": lo["lr"], "lora_epochs": lo["epochs"], "lora_val": lo["val_acc"],
        "b_lora_layers": count("B", lambda c: str(c).startswith("lora")),
        "a_vectors": count("A", lambda c: c == "vector"), "d_vectors": count("D", lambda c: c == "vector"),
        "e_vectors": count("E", lambda c: c == "vector"), "layers": len(layers),
    }


def main(roots: list[str]) -> None:
    rows = {}
    if CSV.is_file():
        with open(CSV, newline="") as f:
            rows = {(r["budget"], r["task"], int(r["seed"])): r for r in csv.DictReader(f)}
    for root in roots:
        for mj in sorted(Path(root).glob("*/seed*/retrain/metrics.json")):
            r = row(mj.parent.parent)
            rows[(r["budget"], r["task"], r["seed"])] = r
    ordered = [rows[k] for k in sorted(rows)]
    tmp = CSV.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(ordered)
    tmp.replace(CSV)
    for budget in sorted({r["budget"] for r in ordered}):
        rs = [r for r in ordered if r["budget"] == budget]
        d = [float(r["diff"]) for r in rs]
        sd = st.stdev(d) if len(d) > 1 else float("nan")
        print(f"{budget}: {len(d)} task-seeds, GLoRA - LoRA {st.mean(d):+.2f} (sd {sd:.2f}, se {sd / len(d) ** 0.5:.2f}), "
              f"level or above on {sum(x >= 0 for x in d)}; GLoRA {st.mean(float(r['glora_test']) for r in rs):.2f}, "
              f"LoRA {st.mean(float(r['lora_test']) for r in rs):.2f}")
        for task in sorted({r["task"] for r in rs}):
            t = [r for r in rs if r["task"] == task]
            print(f"  {task}: {st.mean(float(r['diff']) for r in t):+.2f} ("
                  + ", ".join(f"{float(r['diff']):+.2f}" for r in t) + ")"
                  + f"; B lora on {st.mean(int(r['b_lora_layers']) for r in t):.1f} of {t[0]['layers']} layers, "
                  f"A/D/E vectors {st.mean(int(r['a_vectors']) for r in t):.1f}/{st.mean(int(r['d_vectors']) for r in t):.1f}"
                  f"/{st.mean(int(r['e_vectors']) for r in t):.1f}")


if __name__ == "__main__":
    if len(sys.argv) < 2:
        sys.exit("usage: python bench/budget_table.py SUITE_ROOT [SUITE_ROOT ...]")
    main(sys.argv[1:])
