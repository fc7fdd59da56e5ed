"""Does the supernet rank subnets the way retraining does? Spearman correlation between a subnet's supernet
score (search/history.jsonl, val200 with shared weights) and its val200 top-1 after training it alone on
train800 (same epochs and lr for every subnet, one seed).

    python bench/rank_correlation.py runs/bench-mnist --n 6 --lr 1e-3 [--init scratch] [--set key=value ...]

Picks ``n`` evaluated candidates spread evenly over the supernet-score order (best, worst and between), trains
each, and prints and appends one JSON line to ``bench/rank_correlation.jsonl``.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from glora.core.build import load_split, prepare_data  # noqa: E402
from glora.core.config import load_config  # noqa: E402
from glora.core.engine import evaluate, set_threads  # noqa: E402
from glora.core.io import read_jsonl  # noqa: E402
from glora.core.trainer import fit  # noqa: E402
from glora.stages.retrain import Method, _fit_spec  # noqa: E402
from supernet.inject import head_names  # noqa: E402
from supernet.space import LayerChoice, Subnet  # noqa: E402

from rank_supernets import spearman  # noqa: E402  (bench/ is this script's folder)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("run_dir")
    ap.add_argument("--n", type=int, default=6)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--init", default="scratch", choices=["scratch", "supernet"])
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args()
    run = Path(args.run_dir)
    cfg = load_config(str(run / "config.yaml"), args.set)
    set_threads(cfg.threads)
    device = torch.device("cpu")
    nc = prepare_data(cfg)
    hist = sorted(read_jsonl(run / "search" / "history.jsonl"), key=lambda r: -r["val_acc"])
    names = tuple(l["name"] for l in json.loads(json.dumps(
        __import__("yaml").safe_load((run / "search" / "subnet.yaml").read_text())["layers"])))
    picks = [hist[int(round(i))] for i in np.linspace(0, len(hist) - 1, args.n)]
    rows = []
    ref = None
    for rec in picks:
        sub = Subnet(names, tuple(LayerChoice(*lc) for lc in rec["layers"]))
        m = Method("glora", "subnet", sub, args.init)
        model = m.build(cfg, nc, device)
        if ref is None:
            train = load_split(cfg, model, "train800", progress=False)
            val = load_split(cfg, model, "val200", progress=False)
            ref = True
        named = {n: p for n, p in model.named_parameters() if p.requires_grad}
        t0 = time.time()
        with tempfile.TemporaryDirectory() as d:
            fit(model, named, train, _fit_spec(cfg, "rank", {}, lr=args.lr), d, device, progress=False,
                head_names=head_names(model))
        acc = evaluate(model, val.batches(cfg.data.eval_batch_size), device, cfg.precision)
        rows.append({"supernet_val": rec["val_acc"], "retrained_val": acc, "params": rec["params"],
                     "time_s": round(time.time() - t0, 1)})
        print(json.dumps(rows[-1]), flush=True)
    rho = spearman([r["supernet_val"] for r in rows], [r["retrained_val"] for r in rows])
    out = {"run": run.name, "task": cfg.data.task, "n": len(rows), "lr": args.lr, "init": args.init,
           "epochs": cfg.retrain.epochs, "spearman": rho, "rows": rows, "extra": args.set}
    print(json.dumps(out))
    with open(Path(__file__).resolve().parent / "rank_correlation.jsonl", "a") as f:
        f.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
