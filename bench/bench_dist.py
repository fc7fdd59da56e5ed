#!/usr/bin/env python
"""Data-parallel scaling of a supernet training step on the CPU: images/s of ``glora.core.trainer.fit`` (random
paths, AdamW, the gradient all-reduce) with

- 1 process of 1 thread,
- 1 process of 2 threads,
- 2 gloo processes of 1 thread each (``torchrun --standalone --nproc_per_node 2``), same global batch.

On 2 cores this can only show the cost of the data-parallel machinery against threads; it says nothing about
GPUs. Rounds are interleaved (each round runs the three setups in turn) and medians reported. Writes
``bench/scaling.md``.

    python bench/bench_dist.py [--model small] [--steps 12] [--warmup 3] [--rounds 3]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

MODELS = {
    "small": dict(name="vit_small_patch16_224", img=112, batch=32, kw={}),
    "tiny": dict(name="vit_tiny_patch16_224", img=32, batch=8,
                 kw=dict(patch_size=8, embed_dim=32, depth=2, num_heads=2)),
}


def worker(args) -> None:
    import tempfile

    import timm
    import torch

    import glora.core.trainer as trainer
    from glora.core import dist
    from glora.core.engine import InMemorySplit
    from supernet.inject import head_names
    from supernet.wrapper import GloraSupernet

    torch.set_num_threads(args.threads)
    spec = MODELS[args.model]
    dist.init("cpu", batch_size=spec["batch"])
    torch.manual_seed(0)
    model = timm.create_model(spec["name"], pretrained=False, num_classes=100, img_size=spec["img"], **spec["kw"])
    sn = GloraSupernet(model)
    n = spec["batch"] * (args.steps + args.warmup)
    g = torch.Generator().manual_seed(1)
    train = InMemorySplit(torch.randn(n, 3, spec["img"], spec["img"], generator=g),
                          torch.randint(0, 100, (n,), generator=g))
    named = {k: p for k, p in sn.model.named_parameters() if p.requires_grad}
    stamps: dict[int, float] = {}
    comm = [0.0]
    reduce = dist.all_reduce_grads

    def timed_reduce(params):
        t = time.perf_counter()
        reduce(params)
        step = len(stamps) - 1
        comm[0] += time.perf_counter() - t if args.warmup <= step < args.warmup + args.steps else 0.0
    dist.all_reduce_grads = timed_reduce

    def before_step(step):
        stamps[step] = time.perf_counter()
        sn.sample_path(0, step)

    fit_spec = trainer.FitSpec(epochs=1, lr=1e-4, weight_decay=1e-4, batch_size=spec["batch"], seed=0,
                               max_steps_per_epoch=args.steps + args.warmup + 1, desc="bench")
    with tempfile.TemporaryDirectory() as tmp:
        trainer.fit(sn, named, train, fit_spec, tmp, torch.device("cpu"), before_step=before_step, progress=False,
                    head_names=head_names(sn.model))
    last = max(stamps)
    seconds = stamps[last] - stamps[args.warmup]
    steps = last - args.warmup
    if dist.is_main():
        print("RESULT " + json.dumps({"images_per_s": steps * spec["batch"] / seconds, "step_s": seconds / steps,
                                      "allreduce_s_per_step": comm[0] / steps, "world_size": dist.world_size(),
                                      "threads": args.threads}), flush=True)
    dist.cleanup()


def run_setup(name: str, args) -> dict:
    base = [str(Path(__file__).resolve()), "--worker", "--model", args.model, "--steps", str(args.steps),
            "--warmup", str(args.warmup)]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    env.pop("WORLD_SIZE", None)
    if name == "2 procs x 1 thread":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *base,
               "--threads", "1"]
        env["OMP_NUM_THREADS"] = "1"
    else:
        threads = 2 if name == "1 proc x 2 threads" else 1
        cmd = [sys.executable, *base, "--threads", str(threads)]
        env["OMP_NUM_THREADS"] = str(threads)
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("RESULT ")]
    if r.returncode or not lines:
        raise RuntimeError(f"{name} failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    return json.loads(lines[-1][len("RESULT "):])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--model", default="small", choices=sorted(MODELS))
    p.add_argument("--steps", type=int, default=12, help="timed steps per run")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=str(ROOT / "bench" / "scaling.md"))
    args = p.parse_args()
    if args.worker:
        return worker(args)
    setups = ["1 proc x 1 thread", "1 proc x 2 threads", "2 procs x 1 thread"]
    results: dict[str, list[dict]] = {s: [] for s in setups}
    for r in range(args.rounds):
        order = setups if r % 2 == 0 else setups[::-1]
        for s in order:
            results[s].append(run_setup(s, args))
            print(f"round {r + 1}: {s}: {results[s][-1]['images_per_s']:.2f} images/s", flush=True)
    med = {s: statistics.median(x["images_per_s"] for x in v) for s, v in results.items()}
    comm = statistics.median(x["allreduce_s_per_step"] for x in results["2 procs x 1 thread"])
    step2 = statistics.median(x["step_s"] for x in results["2 procs x 1 thread"])
    spec = MODELS[args.model]
    cmd = "python bench/bench_dist.py " + " ".join(
        f"--{k} {getattr(args, k)}" for k in ("model", "steps", "warmup", "rounds"))
    try:
        load = "load average %.1f / %.1f / %.1f at the end" % os.getloadavg()
    except OSError:
        load = ""
    lines = [
        "# Data-parallel scaling on the CPU", "",
        f"`{cmd}`", "",
        f"Supernet training step (`glora.core.trainer.fit`: a random path per step, AdamW, gradient all-reduce) of "
        f"{spec['name']} at {spec['img']} px, global batch {spec['batch']}, {args.steps} timed steps after "
        f"{args.warmup} untimed, median of {args.rounds} interleaved rounds. "
        f"{platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, torch {__import__('torch').__version__}; {load}.", "",
        "| setup | images/s | vs 1 proc x 1 thread |", "|---|---:|---:|",
    ]
    for s in setups:
        lines.append(f"| {s} | {med[s]:.2f} | {med[s] / med[setups[0]]:.2f} |")
    lines += ["", f"2 processes: gradient all-reduce (gloo, flattened) {comm * 1e3:.1f} ms of a {step2 * 1e3:.0f} ms "
              f"step ({100 * comm / step2:.1f}%).", "",
              "Per-round figures (images/s): " + "; ".join(
                  f"{s}: " + ", ".join(f"{x['images_per_s']:.2f}" for x in results[s]) for s in setups), ""]
    Path(args.out).write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
