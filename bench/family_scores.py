"""How does a trained supernet score whole families of subnets? Each uniform subnet (one choice for every layer)
is scored on val200 with the supernet's shared weights: top-1 and mean cross-entropy.

    python bench/family_scores.py runs/fam/dsprites_loc [--families lora,l2_ade,...] [--set key=value ...]

Prints and appends one JSON line per family to ``bench/family_scores.jsonl``; compare with the same families
trained alone (``bench/probe.py``).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch  # noqa: E402

from glora.core.build import load_split, prepare_data  # noqa: E402
from glora.core.config import load_config  # noqa: E402
from glora.core.engine import evaluate, set_threads  # noqa: E402
from probe import UNIFORM  # noqa: E402
from glora.stages.supernet import load_trained_supernet  # noqa: E402


@torch.no_grad()
def val_loss(model, batches) -> float:
    total, n = 0.0, 0
    for x, y in batches:
        total += float(torch.nn.functional.cross_entropy(model(x), y, reduction="sum"))
        n += len(y)
    return total / n


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--families", default="lora,l2,l2_ade,l2_acde,glora_vl,vectors")
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args()
    run = Path(args.run_dir)
    cfg = load_config(str(run / "config.yaml"), args.set)
    set_threads(cfg.threads)
    device = torch.device("cpu")
    nc = prepare_data(cfg)
    sn = load_trained_supernet(cfg, nc, device).eval()
    val = load_split(cfg, sn.model, "val200", progress=False, device=device)
    for fam in args.families.split(","):
        sub = sn.space.uniform(UNIFORM[fam])
        sn.set_subnet(sub, freeze=True)
        acc = evaluate(sn, val.batches(200), device)
        loss = val_loss(sn, val.batches(200))
        row = {"run": run.name, "task": cfg.data.task, "family": fam, "params": sn.space.params(sub),
               "val_acc": acc, "val_loss": round(loss, 4)}
        print(json.dumps(row), flush=True)
        with open(Path(__file__).parent / "family_scores.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
