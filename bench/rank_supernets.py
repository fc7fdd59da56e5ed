"""Which supernet ranks subnets the way training does? The same random subnets of the search budget, trained
alone (the truth) and scored with each given run's supernet (as the search scores them), side by side.

    python bench/rank_supernets.py runs/accuracy-seeds/dsprites_loc/seed0 runs/accuracy-fair/dsprites_loc/seed0 \
        --n 10 --lr 3e-3

Every run must share the task, the model and the search space (the first run's config.yaml is used for the
data, the budget and the training). ``n`` subnets are drawn inside the budget [search.min_params_m,
search.max_params_m] from ``--seed`` (not from either supernet's search, so no supernet chooses them). Each
is trained on train800 from scratch (retrain settings, lr ``--lr``) and scored on val200; each supernet scores
it on val200 with shared weights. Prints and appends one JSON line to ``bench/rank_supernets.jsonl``: the
rows, and Spearman's rho and Kendall's tau of each supernet's scores against the trained ones.
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
from glora.core.trainer import fit  # noqa: E402
from glora.stages.retrain import Method, _fit_spec  # noqa: E402
from glora.stages.supernet import load_trained_supernet  # noqa: E402
from search.operators import sample_in_budget  # noqa: E402
from supernet.inject import head_names  # noqa: E402


def ranks(a) -> np.ndarray:
    """Average ranks (ties share the mean of their positions)."""
    a = np.asarray(a, dtype=float)
    order = np.argsort(a, kind="stable")
    r = np.empty(len(a))
    r[order] = np.arange(len(a), dtype=float)
    for v in np.unique(a):
        r[a == v] = r[a == v].mean()
    return r


def spearman(a, b) -> float:
    ra, rb = ranks(a), ranks(b)
    ra -= ra.mean()
    rb -= rb.mean()
    den = np.sqrt((ra ** 2).sum() * (rb ** 2).sum())
    return float((ra * rb).sum() / den) if den > 0 else float("nan")


def kendall(a, b) -> float:
    """Kendall's tau-b."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    conc = disc = ties_a = ties_b = 0
    for i in range(len(a)):
        for j in range(i + 1, len(a)):
            da, db = np.sign(a[i] - a[j]), np.sign(b[i] - b[j])
            if da == 0 and db == 0:
                continue
            if da == 0:
                ties_a += 1
            elif db == 0:
                ties_b += 1
            elif da == db:
                conc += 1
            else:
                disc += 1
    den = np.sqrt((conc + disc + ties_a) * (conc + disc + ties_b))
    return float((conc - disc) / den) if den > 0 else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", help="run folders (one task and seed each) with a finished supernet")
    ap.add_argument("--n", type=int, default=10)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0, help="draws the subnets")
    args = ap.parse_args()
    runs = [Path(r) for r in args.runs]
    cfgs = [load_config(str(r / "config.yaml"), [f"output_dir={r}"]) for r in runs]
    cfg = cfgs[0]
    for r, c in zip(runs[1:], cfgs[1:]):
        if (c.data.task, c.model.to_dict(), c.glora.to_dict()) != (cfg.data.task, cfg.model.to_dict(),
                                                                   cfg.glora.to_dict()):
            sys.exit(f"{r}: another task, model or search space than {runs[0]}")
    set_threads(cfg.threads)
    device = torch.device("cpu")
    nc = prepare_data(cfg)
    supernets = [load_trained_supernet(c, nc, device).eval() for c in cfgs]
    space = supernets[0].space
    lo, hi = int(round(cfg.search.min_params_m * 1e6)), int(round(cfg.search.max_params_m * 1e6))
    rng = np.random.default_rng([args.seed, 4_242])
    subnets = [sample_in_budget(space, rng, lo, hi) for _ in range(args.n)]
    train = val = None
    rows = []
    for sub in subnets:
        model = Method("glora", "subnet", sub, "scratch").build(cfg, nc, device)
        if train is None:
            train = load_split(cfg, model, "train800", progress=False)
            val = load_split(cfg, model, "val200", progress=False)
        named = {n: p for n, p in model.named_parameters() if p.requires_grad}
        t0 = time.time()
        with tempfile.TemporaryDirectory() as d:
            fit(model, named, train, _fit_spec(cfg, "rank", {}, lr=args.lr), d, device, progress=False,
                head_names=head_names(model))
        row = {"params": space.params(sub), "trained_val": evaluate(model, val.batches(cfg.data.eval_batch_size),
                                                                    device, cfg.precision),
               "train_s": round(time.time() - t0, 1)}
        for r, sn in zip(runs, supernets):
            sn.set_subnet(sub, freeze=True)
            row[str(r)] = evaluate(sn, val.batches(cfg.data.eval_batch_size), device, cfg.precision)
        rows.append(row)
        print(json.dumps(row), flush=True)
    truth = [r["trained_val"] for r in rows]
    out = {"task": cfg.data.task, "n": len(rows), "lr": args.lr, "seed": args.seed, "epochs": cfg.retrain.epochs,
           "supernets": {str(r): {"path_sampling": c.supernet.path_sampling,
                                  "spearman": spearman([x[str(r)] for x in rows], truth),
                                  "kendall": kendall([x[str(r)] for x in rows], truth)}
                         for r, c in zip(runs, cfgs)},
           "rows": rows}
    print(json.dumps(out["supernets"], indent=1))
    with open(Path(__file__).resolve().parent / "rank_supernets.jsonl", "a") as f:
        f.write(json.dumps(out) + "\n")


if __name__ == "__main__":
    main()
