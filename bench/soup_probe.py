"""bench/accuracy.md item 33: does averaging two trained grid points ("weight soup") beat either on val200?

Two grid points of the retrain's lr choice (``<run>/retrain/select/<point>``) that trained the same subnet from the
same initial weights (GLoRA from the supernet; LoRA from the same seed) differ only in their lr. Their trainable
tensors (adapters and head) are interpolated, ``(1 - w) * a + w * b`` for w in 0, 0.25, 0.5, 0.75, 1, loaded into
the subnet's model and scored on val200 (top-1 and loss). w = 0 and w = 1 must reproduce the points' own val.json.
The interpolated model has the subnet's parameter count: no budget is spent.

    python bench/soup_probe.py runs/g15/mnist/seed0 glora_top1 top1 glora_top1_lr0.001_e15 glora_top1_lr0.003_e15
    python bench/soup_probe.py runs/l15/mnist/seed0 glora lora4.yaml glora_lr0.001_e15 glora_lr0.003_e15 --init scratch

``subnet`` is ``topK`` (the search's K-th subnet of that run) or a subnet yaml. One JSON line per pair is appended
to ``bench/probes/soup.jsonl``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from glora.core.build import load_split, prepare_data  # noqa: E402
from glora.core.checkpoint import load_checkpoint  # noqa: E402
from glora.core.config import load_config  # noqa: E402
from glora.core.engine import evaluate_with_loss, set_threads  # noqa: E402
from glora.stages.retrain import Method, model_for_data, topk_subnets  # noqa: E402
from supernet.space import Subnet  # noqa: E402

OUT = Path(__file__).parent / "probes" / "soup.jsonl"
WEIGHTS = (0.0, 0.25, 0.5, 0.75, 1.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run")
    ap.add_argument("method", help="the grid points' method key, e.g. glora_top1")
    ap.add_argument("subnet", help="topK or a subnet yaml")
    ap.add_argument("a")
    ap.add_argument("b")
    ap.add_argument("--init", default="supernet", choices=["supernet", "scratch"])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    cfg = load_config(str(Path(args.run) / "config.yaml"))
    set_threads(args.threads)
    dev = torch.device("cpu")
    num_classes = prepare_data(cfg)
    val = load_split(cfg, model_for_data(cfg, num_classes), "val200", progress=False, device=dev)
    if args.subnet.startswith("top"):
        k = int(args.subnet[3:])
        subnet = topk_subnets(cfg, k)[k - 1]
    else:
        subnet = Subnet.from_yaml(args.subnet)
    method = Method(args.method, args.method, subnet, args.init)
    sel = Path(args.run) / "retrain" / "select"
    pa, pb = (load_checkpoint(sel / p)["params"] for p in (args.a, args.b))
    stored = [json.loads((sel / p / "val.json").read_text())["val_acc"] for p in (args.a, args.b)]
    rows = []
    for w in WEIGHTS:
        model = method.build(cfg, num_classes, dev)
        named = dict(model.named_parameters())
        with torch.no_grad():
            for k, v in pa.items():
                named[k].copy_((1 - w) * v + w * pb[k])
        model.eval()
        acc, loss = evaluate_with_loss(model, val.batches(cfg.data.eval_batch_size), dev, "fp32")
        rows.append({"w": w, "val_acc": round(acc, 4), "val_loss": round(loss, 4)})
        print(f"w={w:.2f}  val200 top-1 {acc:.3f}  loss {loss:.4f}", flush=True)
    if abs(rows[0]["val_acc"] - stored[0]) > 1e-9 or abs(rows[-1]["val_acc"] - stored[1]) > 1e-9:
        sys.exit(f"the end points do not reproduce their val.json ({rows[0]['val_acc']}, {rows[-1]['val_acc']} "
                 f"against {stored[0]}, {stored[1]}): wrong subnet or init")
    line = {"run": args.run, "a": args.a, "b": args.b, "init": args.init, "params": sum(v.numel() for v in pa.values()),
            "rows": rows}
    with OUT.open("a") as f:
        f.write(json.dumps(line) + "\n")


if __name__ == "__main__":
    main()
