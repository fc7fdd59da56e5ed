"""bench/accuracy.md item 37: searched GLoRA against LoRA at LoRA r=1's budget and at r=4's, on one GPU.

    python bench/budget_table.py --setting "H200 fp32" runs/g-* runs/r4-*   # suite roots (one task-seed each, or more)

Reads every ``<root>/<task>/seed<S>/retrain/metrics.json`` and the retrained ``subnet.yaml``, adds or replaces one
row per (setting, budget, task, seed) of ``accuracy_budget_gpu.csv`` (test top-1 of GLoRA and LoRA, params, the lr
and epochs each chose on val200, and what the retrained subnet is made of) and prints GLoRA minus LoRA per setting
and budget: over all task-seeds (mean, sample sd, standard error) and per task. ``--setting`` names the machine
and anything else the config does not record (precision, weights), so runs made elsewhere never replace these
rows; a row whose figures would change is refused unless ``--replace`` is given.
"""
from __future__ import annotations

import csv
import json
import statistics as st
import sys
from pathlib import Path

import yaml

CSV = Path(__file__).parent / "accuracy_budget_gpu.csv"
FIELDS = ["setting", "budget", "task", "seed", "glora_test", "lora_test", "diff", "glora_params", "lora_params", "lora_rank",
          "glora_lr", "glora_epochs", "glora_val", "search_rank", "lora_lr", "lora_epochs", "lora_val",
          "b_lora_layers", "a_vectors", "d_vectors", "e_vectors", "layers"]


def row(seed_dir: Path, setting: str) -> dict:
    m = json.loads((seed_dir / "retrain" / "metrics.json").read_text())
    sub = yaml.safe_load((seed_dir / "retrain" / "subnet.yaml").read_text())
    lo = m["baselines"]["lora"]
    layers = sub["layers"]
    count = lambda t, pred: sum(1 for L in layers if pred(L[t]))  # noqa: E731
    g_test, l_test = round(100 * m["test_acc"], 2), round(100 * lo["test_acc"], 2)
    return {
        "setting": setting, "budget": f"LoRA r={lo['rank']}", "task": seed_dir.parent.name, "seed": int(seed_dir.name[4:]),
        "glora_test": g_test, "lora_test": l_test, "diff": round(g_test - l_test, 2),
        "glora_params": m["adapter_params"], "lora_params": lo["adapter_params"], "lora_rank": lo["rank"],
        "glora_lr": m["lr"], "glora_epochs": m["epochs"], "glora_val": m["val_acc"], "search_rank": m["search_rank"],
        "lora_lr": lo["lr"], "lora_epochs": lo["epochs"], "lora_val": lo["val_acc"],
        "b_lora_layers": count("B", lambda c: str(c).startswith("lora")),
        "a_vectors": count("A", lambda c: c == "vector"), "d_vectors": count("D", lambda c: c == "vector"),
        "e_vectors": count("E", lambda c: c == "vector"), "layers": len(layers),
    }


def main(setting: str, roots: list[str], replace: bool = False) -> None:
    rows = {}
    if CSV.is_file():
        with open(CSV, newline="") as f:
            rows = {(r["setting"], r["budget"], r["task"], int(r["seed"])): r for r in csv.DictReader(f)}
    for root in roots:
        for mj in sorted(Path(root).glob("*/seed*/retrain/metrics.json")):
            r = row(mj.parent.parent, setting)
            key = (r["setting"], r["budget"], r["task"], r["seed"])
            old = rows.get(key)
            if old is not None and not replace and any(str(old[k]) != str(r[k]) for k in ("glora_test", "lora_test")):
                sys.exit(f"{mj}: {key} is in {CSV.name} with other figures (GLoRA {old['glora_test']}, LoRA "
                         f"{old['lora_test']}); give another --setting, or --replace")
            rows[key] = r
    ordered = [rows[k] for k in sorted(rows)]
    tmp = CSV.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS)
        w.writeheader()
        w.writerows(ordered)
    tmp.replace(CSV)
    for setting_, budget in sorted({(r["setting"], r["budget"]) for r in ordered}):
        rs = [r for r in ordered if r["setting"] == setting_ and r["budget"] == budget]
        d = [float(r["diff"]) for r in rs]
        sd = st.stdev(d) if len(d) > 1 else float("nan")
        print(f"{setting_}, {budget}: {len(d)} task-seeds, GLoRA - LoRA {st.mean(d):+.2f} (sd {sd:.2f}, se {sd / len(d) ** 0.5:.2f}), "
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
    import argparse
    ap = argparse.ArgumentParser(description="GLoRA minus LoRA per setting and budget (bench/accuracy.md item 37)")
    ap.add_argument("--setting", required=True, help="the machine and what the config does not record")
    ap.add_argument("--replace", action="store_true", help="let these runs replace rows with other figures")
    ap.add_argument("roots", nargs="*", help="suite roots; none: print the csv's table")
    a = ap.parse_args()
    main(a.setting, a.roots, a.replace)
