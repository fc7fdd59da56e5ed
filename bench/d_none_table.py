"""bench/accuracy.md item 29: the searched GLoRA with D fixed to ``none`` (``glora.choices_d: [none]``, E still in
{vector, none}) against items 26 and 27 (D and E both in {vector, none}), seed by seed, with how each searched
subnet spends its adapter parameters.

    python bench/d_none_table.py bench/accuracy_d_none.csv

Reads the run folders under ``runs/`` (not kept in the repository). The new runs trained the head-only baseline
only: LoRA's scores are those of items 26 and 27, whose LoRA reproduces bit for bit on the CPU (the same seed,
data and settings); the head's rerun is printed beside its earlier score as a check of that.
"""
from __future__ import annotations

import json
import statistics as st
import sys
from pathlib import Path

import yaml

from drop_path_table import TASKS, without, write_csv


def spend(run: Path) -> dict:
    """Adapter parameters of a searched subnet by tensor (B's LoRA factors, A/D/E vectors) and the D+E overlap."""
    layers = yaml.safe_load((run / "subnet.yaml").read_text())["layers"]
    out = {"B": sum(int(l["B"][5:]) * (l["in_features"] + l["out_features"]) for l in layers
                    if l["B"].startswith("lora_")),
           "B_none": sum(l["B"] == "none" for l in layers)}
    for t in "ADE":
        out[t] = sum(l["out_features"] for l in layers if l[t] == "vector")
    out["DE_both"] = sum(l["out_features"] for l in layers if l["D"] == "vector" and l["E"] == "vector")
    return out


def supernet_and_search(run: Path) -> tuple[float, float]:
    """The supernet's last-epoch train loss and the best supernet val200 top-1 the search found."""
    last = json.loads((run / "supernet" / "log.jsonl").read_text().splitlines()[-1])
    hist = [json.loads(line) for line in (run / "search" / "history.jsonl").read_text().splitlines()]
    return last["loss"], max(h["val_acc"] for h in hist)


def main(out: str | None) -> None:
    rows = []
    for seed in (0, 1, 2):
        for task in TASKS:
            new = Path("runs/dnone") / task / f"seed{seed}" / "retrain"
            if not (new / "metrics.json").is_file():
                continue
            o, n = (json.loads((p / "metrics.json").read_text()) for p in (without(task, seed), new))
            so, sn = spend(without(task, seed)), spend(new)
            rows.append(dict(task=task, seed=seed, lora_test=o["baselines"]["lora"]["test_acc"],
                             glora_test_de=o["test_acc"], glora_val_de=o["val_acc"], glora_params_de=o["adapter_params"],
                             glora_test_e=n["test_acc"], glora_val_e=n["val_acc"], glora_params_e=n["adapter_params"],
                             glora_lr_e=n["lr"], glora_epochs_e=n["epochs"],
                             **{f"spend_de_{k}": v for k, v in so.items()}, **{f"spend_e_{k}": v for k, v in sn.items()},
                             **dict(zip(("supernet_loss_de", "search_best_val_de"),
                                        supernet_and_search(without(task, seed).parent))),
                             **dict(zip(("supernet_loss_e", "search_best_val_e"), supernet_and_search(new.parent))),
                             head_test_before=o["baselines"]["head"]["test_acc"],
                             head_test_rerun=n["baselines"]["head"]["test_acc"]))
    if not rows:
        sys.exit("no runs/dnone/<task>/seed<S>/retrain/metrics.json yet")
    write_csv(out, rows)
    for r in rows:
        print(f"| {r['task']} | {r['seed']} | {100 * r['lora_test']:.2f} | {100 * r['glora_test_de']:.2f} "
              f"({r['glora_params_de']:,}) | {100 * (r['glora_test_de'] - r['lora_test']):+.2f} | "
              f"{100 * r['glora_test_e']:.2f} ({r['glora_params_e']:,}) | "
              f"{100 * (r['glora_test_e'] - r['lora_test']):+.2f} | "
              f"{r['spend_de_B']:,} / {r['spend_e_B']:,} | {r['spend_de_DE_both']:,} | "
              f"{r['supernet_loss_de']:.2f} / {r['supernet_loss_e']:.2f} | "
              f"{r['search_best_val_de']:.3f} / {r['search_best_val_e']:.3f} |")
    for name, key in (("D and E", "glora_test_de"), ("E only", "glora_test_e")):
        x = [100 * (r[key] - r["lora_test"]) for r in rows]
        sd = st.stdev(x) if len(x) > 1 else 0.0
        print(f"GLoRA - LoRA, {name}: mean {st.mean(x):+.2f} over {len(x)} (sd {sd:.2f}), level on "
              f"{sum(v >= 0 for v in x)}")
    x = [100 * (r["glora_test_e"] - r["glora_test_de"]) for r in rows]
    print(f"effect on GLoRA: mean {st.mean(x):+.2f} ({', '.join(f'{v:+.2f}' for v in x)})")
    print("B's LoRA parameters, mean: D and E %.0f, E only %.0f" % (st.mean(r["spend_de_B"] for r in rows),
                                                                   st.mean(r["spend_e_B"] for r in rows)))
    print("head rerun equal to its earlier score on %d of %d" % (
        sum(r["head_test_before"] == r["head_test_rerun"] for r in rows), len(rows)))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else None)
