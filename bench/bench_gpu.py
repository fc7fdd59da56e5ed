#!/usr/bin/env python
"""GPU figures at the ``configs/vtab.yaml`` setting (ViT-B/16, 224 px, batch 64): images/s and ms per step of

- a supernet training step (a fresh random path each step, bf16/fp32 forward, backward, AdamW),
- a retrain step (the compact model at the largest choice: a fixed graph; ``--compile`` adds torch.compile),
- a search candidate (fold the frozen candidate, score val200's 200 images at eval batch 256),

in three numeric modes: ``fp32`` (strict, TF32 off), ``tf32`` (fp32 with TF32 matmuls) and ``bf16`` (autocast,
TF32 on for what stays fp32: the project's CUDA default). Batches come from an ``InMemorySplit`` as the stages
use it (``--data device``: on the GPU; ``pinned``: pinned host memory). Also: ms to get one batch onto the GPU
from pageable, pinned and on-device splits, and, from a ``torch.profiler`` trace of supernet steps, the share of
the step's wall time the GPU spends outside kernels (host overhead, launch gaps, syncs).

    python bench/bench_gpu.py                        # vit_base, 224 px, batch 64; writes bench/gpu_results.md
    python bench/bench_gpu.py --model tiny --steps 5 --warmup 2 --out /tmp/gpu.md   # smoke

Without CUDA it exits with code 2 and one line.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

NUM_CLASSES = 100
TARGETS = ("qkv", "proj", "fc1", "fc2")
MODELS = {
    "base": dict(name="vit_base_patch16_224", img=224, batch=64, eval_batch=256, kw={}),
    "tiny": dict(name="vit_tiny_patch16_224", img=32, batch=16, eval_batch=64,
                 kw=dict(patch_size=8, embed_dim=32, depth=2, num_heads=2)),
}
MODES = ("fp32", "tf32", "bf16")
TRAIN_IMAGES, VAL_IMAGES = 800, 200


def set_mode(mode: str) -> str:
    """TF32 per mode; returns the autocast precision."""
    from glora.core.accel import _set_tf32
    _set_tf32(mode != "fp32")
    return "bf16" if mode == "bf16" else "fp32"


def create(spec: dict, seed: int = 0):
    import timm
    torch.manual_seed(seed)
    return timm.create_model(spec["name"], pretrained=False, num_classes=NUM_CLASSES, img_size=spec["img"],
                             **spec["kw"])


def split(spec: dict, n: int, device, where: str):
    from glora.core.engine import InMemorySplit
    g = torch.Generator().manual_seed(n)
    s = InMemorySplit(torch.randn(n, 3, spec["img"], spec["img"], generator=g),
                      torch.randint(0, NUM_CLASSES, (n,), generator=g))
    return s if where == "pageable" else s.place(device, where == "device")


def cycle(sp, bs: int):
    epoch = 0
    while True:
        yield from sp.batches(bs, shuffle=True, seed=0, epoch=epoch, drop_last=True)
        epoch += 1


def timed(fn, steps: int, warmup: int) -> float:
    """Seconds per call, the device drained before and after."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / steps


def train_step(model, params, batches, device, precision: str, before=None):
    from glora.core.engine import autocast
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-4)
    state = {"i": 0}

    def step() -> None:
        if before is not None:
            before(state["i"])
        state["i"] += 1
        x, y = next(batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        opt.zero_grad(set_to_none=True)
        with autocast(device, precision):
            logits = model(x)
        F.cross_entropy(logits.float(), y).backward()
        opt.step()
    return step


def build_supernet(spec: dict, device):
    from supernet.wrapper import GloraSupernet
    sn = GloraSupernet(create(spec), target_modules=TARGETS, ranks=[4]).to(device).train()
    return sn, sn.trainable_parameters()


def build_retrain(spec: dict, device):
    from retrain.build import apply_subnet, layer_specs
    from supernet.space import LayerChoice, SearchSpace
    model = create(spec)
    space = SearchSpace(layer_specs(model, TARGETS), ranks=[4])
    apply_subnet(model, space.uniform(LayerChoice("lora_4", "lora_4", "lora_4", "vector", "vector")))
    model = model.to(device).train()
    return model, [p for p in model.parameters() if p.requires_grad]


def kernel_share(step, steps: int) -> dict:
    """Profile ``steps`` calls: wall time, summed CUDA kernel (device) time and host CPU time; the share of the
    wall time the device is not running kernels."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        wall = time.perf_counter() - t0
    events = prof.key_averages()

    def dev_time(e) -> float:
        return float(getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0.0)))
    # only the kernels themselves: an aten op's self device time is the time of the kernels it launched, so summing
    # ops and kernels together counts each kernel twice (the first GPU report showed 304 ms of kernels in 155 ms)
    kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
    device_us = sum(dev_time(e) for e in kernels)
    cpu_us = sum(float(e.self_cpu_time_total) for e in events)
    top = sorted(kernels, key=dev_time, reverse=True)[:5]
    return {"wall_ms_per_step": 1e3 * wall / steps, "kernel_ms_per_step": device_us / 1e3 / steps,
            "host_cpu_ms_per_step": cpu_us / 1e3 / steps,
            "share_outside_kernels": max(0.0, 1.0 - device_us / 1e6 / wall),
            "top_kernels": [[e.key[:80], round(dev_time(e) / 1e3 / steps, 3)] for e in top]}


def bench(args) -> dict:
    device = torch.device("cuda")
    spec = MODELS[args.model]
    bs, ebs = spec["batch"], spec["eval_batch"]
    from glora.core.engine import evaluate
    report = {"model": spec["name"], "image_size": spec["img"], "batch": bs, "eval_batch": ebs,
              "data": args.data, "modes": {}, "versions": versions()}

    # the data path: one batch onto the GPU from each kind of split
    data = {}
    for where in ("pageable", "pinned", "device"):
        sp = split(spec, TRAIN_IMAGES if args.model == "base" else 200, device, where)
        it = cycle(sp, bs)
        data[where] = 1e3 * timed(lambda: next(it)[0].to(device, non_blocking=True), args.steps, args.warmup)
        del sp, it
    report["batch_to_gpu_ms"] = data
    torch.cuda.empty_cache()

    train = split(spec, TRAIN_IMAGES, device, args.data)
    val = split(spec, VAL_IMAGES, device, args.data)
    for mode in args.modes:
        precision = set_mode(mode)
        out = {}
        sn, params = build_supernet(spec, device)
        step = train_step(sn, params, cycle(train, bs), device, precision,
                          before=lambda i: sn.sample_path(seed=0, step=i))
        sec = timed(step, args.steps, args.warmup)
        out["supernet"] = {"ms_per_step": 1e3 * sec, "images_per_s": bs / sec}
        out["supernet_profile"] = kernel_share(step, max(2, args.steps // 2))

        sn.eval()
        rng = np.random.default_rng(0)

        def candidate() -> None:
            sn.set_subnet(sn.space.random(rng), freeze=True)
            evaluate(sn, val.batches(ebs), device, precision)
        sec = timed(candidate, args.steps, args.warmup)
        out["search"] = {"ms_per_candidate": 1e3 * sec, "images_per_s": VAL_IMAGES / sec}
        del sn, params, step
        torch.cuda.empty_cache()

        model, params = build_retrain(spec, device)
        step = train_step(model, params, cycle(train, bs), device, precision)
        sec = timed(step, args.steps, args.warmup)
        out["retrain"] = {"ms_per_step": 1e3 * sec, "images_per_s": bs / sec}
        if args.compile:
            compiled = torch.compile(model)
            step = train_step(compiled, params, cycle(train, bs), device, precision)
            t0 = time.perf_counter()
            step()
            torch.cuda.synchronize()
            out["retrain_compile_first_step_s"] = time.perf_counter() - t0
            sec = timed(step, args.steps, args.warmup)
            out["retrain_compiled"] = {"ms_per_step": 1e3 * sec, "images_per_s": bs / sec}
        del model, params, step
        torch.cuda.empty_cache()
        out["peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2 ** 30
        torch.cuda.reset_peak_memory_stats()
        report["modes"][mode] = out
        print(json.dumps({mode: {k: v for k, v in out.items() if k != "supernet_profile"}}), file=sys.stderr)
    return report


def versions() -> dict:
    import timm
    return {"torch": torch.__version__, "timm": timm.__version__, "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name(0), "python": platform.python_version()}


def write_markdown(path: str, r: dict, command: str) -> None:
    lines = [f"# GPU figures: {r['model']}, {r['image_size']} px, batch {r['batch']}", "",
             f"`{command}`  ", f"{r['versions']['gpu']}, torch {r['versions']['torch']} (CUDA "
             f"{r['versions']['cuda']}), timm {r['versions']['timm']}; splits: {r['data']}", "",
             "| mode | supernet ms/step | supernet img/s | retrain ms/step | retrain img/s | search ms/candidate "
             "| search img/s | outside kernels (supernet) | peak GiB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for mode, o in r["modes"].items():
        lines.append(f"| {mode} | {o['supernet']['ms_per_step']:.1f} | {o['supernet']['images_per_s']:.0f} | "
                     f"{o['retrain']['ms_per_step']:.1f} | {o['retrain']['images_per_s']:.0f} | "
                     f"{o['search']['ms_per_candidate']:.1f} | {o['search']['images_per_s']:.0f} | "
                     f"{100 * o['supernet_profile']['share_outside_kernels']:.0f}% | {o['peak_mem_gib']:.1f} |")
    compiled = {m: o["retrain_compiled"] for m, o in r["modes"].items() if "retrain_compiled" in o}
    if compiled:
        lines += ["", "torch.compile retrain: " + ", ".join(
            f"{m} {c['ms_per_step']:.1f} ms/step" for m, c in compiled.items())]
    d = r["batch_to_gpu_ms"]
    lines += ["", f"One training batch onto the GPU: pageable {d['pageable']:.2f} ms, pinned {d['pinned']:.2f} ms, "
              f"on-device gather {d['device']:.2f} ms.", "",
              "Profile of the supernet step (per step): wall, kernel and host CPU ms, top kernels:", ""]
    for mode, o in r["modes"].items():
        p = o["supernet_profile"]
        lines.append(f"- {mode}: wall {p['wall_ms_per_step']:.1f}, kernels {p['kernel_ms_per_step']:.1f}, host CPU "
                     f"{p['host_cpu_ms_per_step']:.1f}; " + "; ".join(f"{k} {t}" for k, t in p["top_kernels"][:3]))
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="base", choices=sorted(MODELS))
    p.add_argument("--modes", default=",".join(MODES), help="comma-separated subset of fp32,tf32,bf16")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--data", default="device", choices=("device", "pinned"))
    p.add_argument("--compile", action="store_true", help="also time the retrain step under torch.compile")
    p.add_argument("--out", default=os.path.join(ROOT, "bench", "gpu_results.md"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu.py: no CUDA device here; run it on a machine with a GPU", file=sys.stderr)
        return 2
    args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in args.modes if m not in MODES]
    if bad:
        p.error(f"unknown mode(s) {bad}: choose from {', '.join(MODES)}")
    report = bench(args)
    print(json.dumps(report, indent=1))
    write_markdown(args.out, report, "python bench/bench_gpu.py " + " ".join(argv if argv is not None else
                                                                             sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
