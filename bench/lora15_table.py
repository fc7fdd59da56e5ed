"""bench/accuracy.md items 32 and 34: the 15-epoch control, LoRA first. LoRA r=4 alone chooses its (lr, epochs) on val200 from
lr {1e-3, 3e-3} x epochs {5, 10, 15} and is refit on train800val200; GLoRA keeps the {5, 10} choice of items 26
and 27 unless its own 15-epoch run (below) is there. Fills the ``lora15_test`` / ``lora_best3_test`` /
``lora_best3_epochs`` columns of ``bench/accuracy_sandwich_seeds.csv`` for the task-seeds run and prints the
item's table and summary.

    python bench/lora15_table.py mnist          # reads runs/l15/mnist/seed<S>/retrain*/metrics.json
    python bench/lora15_table.py dsprites_loc   # any task of the csv (item 34: fashion_mnist, dsprites_loc)

The runs (not kept in the repository) are ``--stage retrain --subnet <uniform lora_4 subnet>`` with
``retrain.init: scratch``, ``retrain.epochs_grid: [5, 10, 15]`` and no baselines: the same model, seed, data and
training as the suite's LoRA baseline (its 5- and 10-epoch val200 scores are checked against the csv's choice).
``retrain15`` beside ``retrain``, where present, is the 15-epoch refit of a seed whose val200 choice was not 15.
GLoRA's side of the control (its two candidates at 15 epochs, ``runs/g15/<task>/seed<S>``: the suite's config with
``retrain.epochs_grid: [15]``) is read where present; without it GLoRA keeps its {5, 10} choice.
"""
from __future__ import annotations

import csv
import json
import statistics as st
import sys
from pathlib import Path

from drop_path_table import write_csv

CSV = Path(__file__).parent / "accuracy_sandwich_seeds.csv"
TOPK = Path(__file__).parent / "accuracy_top_k.csv"  # GLoRA's chosen val200 over {5, 10} (column k2_val)


def glora_best3(task: str, seed: str, row: dict) -> tuple[float, int, float | None]:
    """GLoRA's (test, epochs, val200 at 15) when it too may train 15 epochs: its two candidates at lr {1e-3, 3e-3}
    x 15 epochs (``runs/g15/<task>/seed<S>``) against its {5, 10} choice, whose val200 is ``k2_val`` of
    accuracy_top_k.csv; 15 epochs must score above it (a tie keeps the fewer epochs). Without that run: the {5, 10}
    choice, and None."""
    m = Path("runs/g15") / task / f"seed{seed}" / "retrain" / "metrics.json"
    if not m.is_file():
        return float(row["glora_test"]), int(row["glora_epochs"]), None
    met = json.loads(m.read_text())
    val10 = next(float(r["k2_val"]) for r in csv.DictReader(TOPK.open()) if (r["task"], r["seed"]) == (task, seed))
    if met["val_acc"] > val10:
        return float(met["test_acc"]), 15, float(met["val_acc"])
    return float(row["glora_test"]), int(row["glora_epochs"]), float(met["val_acc"])


def best(scores: dict, epochs: tuple[int, ...]) -> tuple[float, int, float]:
    """(lr, epochs, val200) of the best point among ``epochs``: the retrain's rule (top-1, then the smaller lr,
    then the fewer epochs)."""
    pts = []
    for key, acc in scores.items():
        lr, ep = key.split("@")
        if int(ep[:-2]) in epochs:
            pts.append((float(lr), int(ep[:-2]), acc))
    return max(pts, key=lambda p: (p[2], -p[0], -p[1]))


def main(task: str) -> None:
    rows = list(csv.DictReader(CSV.open()))
    lines = []
    for r in rows:
        if r["task"] != task:
            continue
        run = Path("runs/l15") / task / f"seed{r['seed']}"
        m = run / "retrain" / "metrics.json"
        if not m.is_file():
            continue
        met = json.loads(m.read_text())
        scores = met["val_acc_by_lr"]
        lr2, ep2, _ = best(scores, (5, 10))
        if (lr2, ep2) != (float(r["lora_lr"]), int(r["lora_epochs"])):
            sys.exit(f"{run}: the {{5, 10}} choice {lr2}, {ep2} differs from the csv's "
                     f"{r['lora_lr']}, {r['lora_epochs']}: not the suite's LoRA")
        lr15, _, val15 = best(scores, (15,))
        r["lora_best3_test"], r["lora_best3_epochs"] = met["test_acc"], met["epochs"]
        if met["epochs"] == 15:
            r["lora15_test"] = met["test_acc"]
        elif (run / "retrain15" / "metrics.json").is_file():
            r["lora15_test"] = json.loads((run / "retrain15" / "metrics.json").read_text())["test_acc"]
        g, l2 = float(r["glora_test"]), float(r["lora_test"])
        g3, g3_ep, g15_val = glora_best3(task, r["seed"], r)
        l15 = r.get("lora15_test") or ""
        lines.append(f"| {r['seed']} | {100 * g:.2f} ({r['glora_epochs']}) | {100 * l2:.2f} ({ep2}; val200 "
                     f"{scores[f'{lr2!r}@{ep2}ep']:.3f}) | "
                     + (f"{100 * float(l15):.2f}" if l15 != "" else "-") + f" (lr {lr15:g}; val200 {val15:.3f}) | "
                     f"{100 * met['test_acc']:.2f} ({met['epochs']}) | {100 * (g - met['test_acc']):+.2f} | "
                     + ("-" if g15_val is None else f"{g15_val:.3f}") + f" | {100 * g3:.2f} ({g3_ep}) | "
                     f"{100 * (g3 - met['test_acc']):+.2f} |")
    if not lines:
        sys.exit(f"no runs/l15/{task}/seed<S>/retrain/metrics.json yet")
    write_csv(str(CSV), rows, lineterminator="\n")  # the file's own line ends
    print("| seed | GLoRA (epochs) | LoRA chosen from {5, 10} | LoRA 15 epochs | LoRA chosen from {5, 10, 15} | "
          "GLoRA - LoRA {5, 10, 15} | GLoRA 15 epochs, val200 | GLoRA chosen from {5, 10, 15} | both from {5, 10, 15} |")
    print("\n".join(lines))

    def diff(r: dict) -> float:  # GLoRA's choice from {5, 10, 15} where its 15-epoch points were trained
        return 100 * (glora_best3(r["task"], r["seed"], r)[0] - float(r["lora_best3_test"] or r["lora_test"]))

    both = [diff(r) for r in rows]
    done = sorted({r["task"] for r in rows if r["lora_best3_test"]})
    print(f"GLoRA - LoRA over {len(rows)} task-seeds, LoRA from {{5, 10, 15}} on {', '.join(done)} and from "
          f"{{5, 10}} elsewhere (GLoRA from {{5, 10, 15}} where runs/g15 has it): {st.mean(both):+.2f} "
          f"(sd {st.stdev(both):.2f}); level on {sum(x >= 0 for x in both)}")
    for t in sorted({r["task"] for r in rows}):
        x = [diff(r) for r in rows if r["task"] == t]
        print(f"  {t}: {st.mean(x):+.2f} ({', '.join(f'{v:+.2f}' for v in x)})")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "mnist")
