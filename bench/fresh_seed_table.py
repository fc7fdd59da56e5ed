"""bench/accuracy.md item 35: a fresh seed of the sandwich setting with epochs chosen from {5, 10, 15} by every
method from the start, added to the 12 task-seeds of items 26, 27, 32 and 34.

    python run_search.py suite --config accuracy_sandwich --tasks fashion_mnist,dsprites_loc --seeds 3 \\
        --set output_dir=runs/s3a --set "retrain.epochs_grid=[5, 10, 15]" --set "retrain.baselines=[lora]"
    python bench/fresh_seed_table.py runs/s3a runs/s3b     # any suite roots of that form

Reads ``<root>/<task>/seed<S>/retrain/metrics.json`` and the grid points' ``val.json`` (every candidate's and
LoRA's val200 at each lr x epochs), adds or updates the task-seed's row of ``accuracy_sandwich_seeds.csv``
(``grid`` 5,10,15; the ``*_best3_*`` columns hold the {5, 10, 15} choice, for seeds 0 to 2 filled in from
items 32 and 34), and prints the item's table: each method's choice, the choice had ties gone to the fewer
epochs first, and GLoRA minus LoRA over every task-seed of the csv.
"""
from __future__ import annotations

import csv
import json
import statistics as st
import sys
from pathlib import Path

from drop_path_table import write_csv
from lora15_table import glora_best3

CSV = Path(__file__).parent / "accuracy_sandwich_seeds.csv"


def points(select: Path, prefix: str) -> list[tuple[float, int, float, str]]:
    """(lr, epochs, val200 top-1, folder) of every trained grid point whose folder starts with ``prefix``."""
    out = []
    for v in sorted(select.glob(f"{prefix}*/val.json")):
        d = json.loads(v.read_text())
        out.append((float(d["lr"]), int(d["epochs"]), float(d["val_acc"]), v.parent.name))
    return out


def choose(pts, fewer_epochs_first: bool = False):
    """The retrain's rule: the best val200 top-1, ties to the smaller lr, then the fewer epochs (or, for the
    counterfactual, the fewer epochs first). Candidates of GLoRA tie-break on their search rank, which the folder
    name (``glora_top1`` < ``glora_top2``) orders the same way."""
    if fewer_epochs_first:
        return max(pts, key=lambda p: (p[2], -p[1], -p[0], [-ord(c) for c in p[3]]))
    return max(pts, key=lambda p: (p[2], -p[0], -p[1], [-ord(c) for c in p[3]]))


def run_row(run: Path) -> dict:
    met = json.loads((run / "retrain" / "metrics.json").read_text())
    lora = met["baselines"]["lora"]
    sel = run / "retrain" / "select"
    g, l = points(sel, "glora_top"), points(sel, "lora")
    if not g or not l:
        sys.exit(f"{sel}: no grid points of GLoRA's candidates or of LoRA")
    gc, lc = choose(g), choose(l)
    if (gc[0], gc[1]) != (met["lr"], met["epochs"]) or (lc[0], lc[1]) != (lora["lr"], lora["epochs"]):
        sys.exit(f"{run}: the rule reproduced here ({gc[:2]}, {lc[:2]}) is not the run's choice "
                 f"(({met['lr']}, {met['epochs']}), ({lora['lr']}, {lora['epochs']}))")
    return {"met": met, "lora": lora, "g": g, "l": l, "gc": gc, "lc": lc,
            "gf": choose(g, True), "lf": choose(l, True)}


def main(roots: list[str]) -> None:
    rows = list(csv.DictReader(CSV.open()))
    cols = list(rows[0])
    for c in ("grid", "glora_best3_test", "glora_best3_epochs"):
        if c not in cols:
            cols.insert(cols.index("lora15_test"), c)
    for r in rows:  # seeds 0 to 2: GLoRA from {5, 10} unless items 32 and 34 gave it the 15-epoch points
        r.setdefault("grid", "5,10")
        if not r.get("glora_best3_test"):  # once, while runs/g15 of items 32 and 34 is there
            r["glora_best3_test"], r["glora_best3_epochs"], _ = glora_best3(r["task"], r["seed"], r)
        if not r.get("lora_best3_test"):
            r["lora_best3_test"], r["lora_best3_epochs"] = r["lora_test"], r["lora_epochs"]
    lines = []
    for root in roots:
        for m in sorted(Path(root).glob("*/seed*/retrain/metrics.json")):
            run = m.parent.parent
            task, seed = run.parent.name, run.name[len("seed"):]
            x = run_row(run)
            met, lora = x["met"], x["lora"]
            new = {"task": task, "seed": seed, "grid": "5,10,15",
                   "glora_test": met["test_acc"], "glora_params": met["adapter_params"], "glora_lr": met["lr"],
                   "glora_epochs": met["epochs"], "glora_rank": met["search_rank"],
                   "lora_test": lora["test_acc"], "lora_params": lora["adapter_params"], "lora_lr": lora["lr"],
                   "lora_epochs": lora["epochs"], "glora_best3_test": met["test_acc"],
                   "glora_best3_epochs": met["epochs"], "lora_best3_test": lora["test_acc"],
                   "lora_best3_epochs": lora["epochs"], "glora_select_s": met["select_time_s"],
                   "glora_train_s": met["train_time_s"], "lora_select_s": lora.get("select_time_s"),
                   "lora_train_s": lora.get("train_time_s"), "fresh": "yes"}
            old = next((r for r in rows if (r["task"], r["seed"]) == (task, seed)), None)
            if old is None:
                rows.append({c: "" for c in cols})
                old = rows[-1]
            old.update(new)
            g, l = x["gc"], x["lc"]
            flip = [name for name, a, b in (("GLoRA", x["gc"], x["gf"]), ("LoRA", x["lc"], x["lf"])) if a != b]
            lines.append(f"| {task} | {seed} | {100 * met['test_acc']:.2f} ({g[0]:g}, {g[1]}; {g[3][6:10]}; "
                         f"val200 {g[2]:.3f}) | {100 * lora['test_acc']:.2f} ({l[0]:g}, {l[1]}; val200 {l[2]:.3f}) | "
                         f"{100 * (met['test_acc'] - lora['test_acc']):+.2f} | "
                         f"{', '.join(flip) + ' would move' if flip else 'none'} |")
    if not lines:
        sys.exit(f"no <root>/<task>/seed<S>/retrain/metrics.json under {', '.join(roots)}")
    write_csv(str(CSV), [{c: r.get(c, "") for c in cols} for r in rows], lineterminator="\n")
    print("| task | seed | GLoRA (lr, epochs; candidate; val200) | LoRA r=4 (lr, epochs; val200) | GLoRA - LoRA | "
          "ties to fewer epochs |")
    print("\n".join(lines))

    def diff(r: dict) -> float:
        return 100 * (float(r["glora_best3_test"]) - float(r["lora_best3_test"]))

    for label, sel in (("seeds 0-2", [r for r in rows if r["grid"] == "5,10"]),
                       ("fresh {5, 10, 15} seeds", [r for r in rows if r["grid"] == "5,10,15"]), ("all", rows)):
        d = [diff(r) for r in sel]
        sd = f", sd {st.stdev(d):.2f}, se {st.stdev(d) / len(d) ** 0.5:.2f}" if len(d) > 1 else ""
        print(f"{label}: {len(d)} task-seeds, GLoRA - LoRA {st.mean(d):+.2f}{sd}; level on "
              f"{sum(v >= 0 for v in d)}")
    for t in sorted({r["task"] for r in rows}):
        d = [diff(r) for r in rows if r["task"] == t]
        print(f"  {t}: {st.mean(d):+.2f} ({', '.join(f'{v:+.2f}' for v in d)})")


if __name__ == "__main__":
    main(sys.argv[1:] or ["runs/s3a", "runs/s3b"])
