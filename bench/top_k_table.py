"""bench/accuracy.md items 30 and 31: items 26 and 27 with the retrain's choice among the search's best subnet
alone (``retrain.top_k: 1``) or its best four (``top_k: 4``) instead of its best two (``top_k: 2``).

    python bench/top_k_table.py bench/accuracy_top_k.csv

Reads the run folders under ``runs/`` (not kept in the repository). With ``top_k: 1`` the retrain scores the
same (lr, epochs) grid for the search's first subnet, whose points items 26 and 27 already trained (the CPU
reproduces them bit for bit), and trains on train800val200 the point it chooses: where the first subnet won
under ``top_k: 2`` the result is the same run; elsewhere ``runs/k1/<task>/seed<S>`` holds that refit, made with
``--stage retrain --set retrain.top_k=1`` on a copy of the run folder and the first subnet's grid points.
``runs/k4/<task>/seed<S>`` likewise holds the ``top_k: 4`` retrains (the first two subnets' grid points reused,
the third and fourth trained), for the task-seeds that were run.
"""
from __future__ import annotations

import json
import statistics as st
import sys
from pathlib import Path

from drop_path_table import TASKS, without, write_csv


def main(out: str | None) -> None:
    rows = []
    for seed in (0, 1, 2):
        for task in TASKS:
            old = json.loads((without(task, seed) / "metrics.json").read_text())
            first = [c for c in old["candidates"] if c["rank"] == 1][0]
            if old["search_rank"] == 1:
                k1, k1_val, k1_params = old["test_acc"], old["val_acc"], old["adapter_params"]
            else:
                new = Path("runs/k1") / task / f"seed{seed}" / "retrain" / "metrics.json"
                if not new.is_file():
                    continue
                n = json.loads(new.read_text())
                assert (n["lr"], n["epochs"], n["val_acc"]) == (first["lr"], first["epochs"], first["val_acc"]), new
                k1, k1_val, k1_params = n["test_acc"], n["val_acc"], n["adapter_params"]
            sel = [c["select_time_s"] for c in old["candidates"]]
            k4 = Path("runs/k4") / task / f"seed{seed}" / "retrain" / "metrics.json"
            k4 = json.loads(k4.read_text()) if k4.is_file() else None
            rows.append(dict(task=task, seed=seed, lora_test=old["baselines"]["lora"]["test_acc"],
                             k2_rank=old["search_rank"], k2_test=old["test_acc"], k2_val=old["val_acc"],
                             k2_params=old["adapter_params"], k1_test=k1, k1_val=k1_val, k1_params=k1_params,
                             k2_select_s=round(sum(sel), 1), k1_select_s=first["select_time_s"],
                             lora_select_s=old["baselines"]["lora"]["select_time_s"],
                             k4_rank=k4 and k4["search_rank"], k4_test=k4 and k4["test_acc"],
                             k4_val=k4 and k4["val_acc"], k4_params=k4 and k4["adapter_params"]))
    write_csv(out, rows)
    for r in rows:
        print(f"| {r['task']} | {r['seed']} | {100 * r['lora_test']:.2f} | {r['k2_rank']} | {100 * r['k2_test']:.2f} | "
              f"{100 * (r['k2_test'] - r['lora_test']):+.2f} | {100 * r['k1_test']:.2f} | "
              f"{100 * (r['k1_test'] - r['lora_test']):+.2f} | {r['k2_select_s']:.0f} / {r['k1_select_s']:.0f} |")
    for name, key in (("top_k 2", "k2_test"), ("top_k 1", "k1_test")):
        x = [100 * (r[key] - r["lora_test"]) for r in rows]
        per_task = {t: st.mean(v for r, v in zip(rows, x) if r["task"] == t) for t in {r["task"] for r in rows}}
        print(f"GLoRA - LoRA, {name}: mean {st.mean(x):+.2f} over {len(x)} (sd {st.stdev(x):.2f}), level on "
              f"{sum(v >= 0 for v in x)}; per task " + ", ".join(f"{t} {v:+.2f}" for t, v in sorted(per_task.items())))
    d = [100 * (r["k1_test"] - r["k2_test"]) for r in rows if r["k2_rank"] != 1]
    print(f"where the second subnet had won ({len(d)}): top_k 1 minus top_k 2 {st.mean(d):+.2f} "
          f"({', '.join(f'{v:+.2f}' for v in d)})")
    four = [r for r in rows if r["k4_test"] is not None]
    for r in four:
        print(f"| {r['task']} | {r['seed']} | {100 * r['lora_test']:.2f} | {100 * r['k2_test']:.2f} "
              f"({r['k2_val']:.3f}) | {r['k4_rank']} | {100 * r['k4_test']:.2f} ({r['k4_val']:.3f}) | "
              f"{100 * (r['k4_test'] - r['lora_test']):+.2f} |")
    if four:
        for name, key in (("top_k 2", "k2_test"), ("top_k 4", "k4_test")):
            x = [100 * (r[key] - r["lora_test"]) for r in four]
            print(f"on the {len(four)} task-seeds run with top_k 4, GLoRA - LoRA, {name}: mean {st.mean(x):+.2f}")
    print("GLoRA's selection time, median: top_k 2 %.0f s, top_k 1 %.0f s; LoRA's %.0f s" % (
        st.median(r["k2_select_s"] for r in rows), st.median(r["k1_select_s"] for r in rows),
        st.median(r["lora_select_s"] for r in rows)))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
