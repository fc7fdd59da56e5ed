"""bench/accuracy.md item 28: each task-seed retrained with ``retrain.drop_path_rate: 0.1`` against the same
supernet and search retrained without it (items 26 and 27), and what a choice between the two on val200 would keep.

    python bench/drop_path_table.py bench/accuracy_drop_path.csv

Reads the run folders of those items under ``runs/`` (not kept in the repository); prints the markdown rows and
the summary lines of the item.
"""
from __future__ import annotations

import csv
import json
import statistics as st
import sys
from pathlib import Path

TASKS = ("dsprites_loc", "dsprites_ori", "fashion_mnist", "mnist")
# the retrain without stochastic depth: item 26 (seeds 0 and 1) and item 27 (seed 2)
SEED01 = {"dsprites_loc": "accuracy-sandwich-init", "dsprites_ori": "accuracy-sandwich-init",
          "fashion_mnist": "accuracy-sandwich-init-b", "mnist": "accuracy-sandwich-init-c"}


def without(task: str, seed: int) -> Path:
    if seed == 2:
        return Path("runs/acc-ep-s2") / task / "seed2" / "retrain"
    return Path("runs") / SEED01[task] / task / f"seed{seed}" / "retrain_ep"


def with_dp(task: str, seed: int) -> Path:
    return Path("runs/dp-s2" if seed == 2 else "runs/dp-s01") / task / f"seed{seed}" / "retrain"


def write_csv(out: str | None, rows: list[dict], lineterminator: str = "\r\n") -> None:
    """The table's rows as a csv file at ``out`` (nothing when ``out`` is None), its lines ended as given."""
    if out:
        with open(out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]), lineterminator=lineterminator)
            w.writeheader()
            w.writerows(rows)


def chosen(info: dict) -> tuple[float, float, float, int]:
    return info["test_acc"], info["val_acc"], info["lr"], info["epochs"]


def main(out: str | None) -> None:
    rows = []
    for seed in (0, 1, 2):
        for task in TASKS:
            new = with_dp(task, seed) / "metrics.json"
            if not new.is_file():
                continue
            o, n = json.loads((without(task, seed) / "metrics.json").read_text()), json.loads(new.read_text())
            g0, l0 = chosen(o), chosen(o["baselines"]["lora"])
            g1, l1 = chosen(n), chosen(n["baselines"]["lora"])
            gc = g1 if g1[1] > g0[1] else g0  # a tie on val200 keeps the model's own (no stochastic depth)
            lc = l1 if l1[1] > l0[1] else l0
            rows.append(dict(task=task, seed=seed, glora_test_dp0=g0[0], glora_val_dp0=g0[1], lora_test_dp0=l0[0],
                             lora_val_dp0=l0[1], glora_test_dp01=g1[0], glora_val_dp01=g1[1], glora_lr_dp01=g1[2],
                             glora_epochs_dp01=g1[3], lora_test_dp01=l1[0], lora_val_dp01=l1[1], lora_lr_dp01=l1[2],
                             lora_epochs_dp01=l1[3], glora_test_choice=gc[0], glora_dp_choice=0.1 if gc is g1 else 0,
                             lora_test_choice=lc[0], lora_dp_choice=0.1 if lc is l1 else 0,
                             head_test_dp01=n["baselines"]["head"]["test_acc"]))
    write_csv(out, rows)

    def pts(r, a, b):
        return 100 * (r[a] - r[b])

    for r in rows:
        print(f"| {r['task']} | {r['seed']} | {100 * r['glora_test_dp0']:.2f} | {100 * r['lora_test_dp0']:.2f} | "
              f"{pts(r, 'glora_test_dp0', 'lora_test_dp0'):+.2f} | {100 * r['glora_test_dp01']:.2f} | "
              f"{100 * r['lora_test_dp01']:.2f} | {pts(r, 'glora_test_dp01', 'lora_test_dp01'):+.2f} | "
              f"{pts(r, 'glora_test_choice', 'lora_test_choice'):+.2f} ({r['glora_dp_choice']} / "
              f"{r['lora_dp_choice']}) |")
    for name, a, b in [("none", "glora_test_dp0", "lora_test_dp0"), ("0.1", "glora_test_dp01", "lora_test_dp01"),
                       ("chosen", "glora_test_choice", "lora_test_choice")]:
        x = [pts(r, a, b) for r in rows]
        sd = st.stdev(x) if len(x) > 1 else 0.0
        print(f"GLoRA - LoRA, {name}: mean {st.mean(x):+.2f} over {len(x)} (sd {sd:.2f}), level on "
              f"{sum(v >= 0 for v in x)}; GLoRA {st.mean(100 * r[a] for r in rows):.2f}, "
              f"LoRA {st.mean(100 * r[b] for r in rows):.2f}")
    for m in ("glora", "lora"):
        x = [pts(r, f"{m}_test_dp01", f"{m}_test_dp0") for r in rows]
        print(f"effect of 0.1 on {m}: mean {st.mean(x):+.2f} ({', '.join(f'{v:+.2f}' for v in x)})")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
