#!/usr/bin/env python
"""Side-by-side CPU benchmark of the GLoRA supernet, retrain and merged models against PEFT and plain timm.

Every comparison runs in one process, interleaved (A B A B ...), and reports medians and their ratio; peak
memory is measured in one subprocess per side. Prints one JSON object and writes ``bench/results.md``.

    python bench/bench_speed.py [--quick] [--models small,base] [--repeats N]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Callable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

THREADS = 2
NUM_CLASSES = 100
TARGETS = ("qkv", "proj", "fc1", "fc2")
MODELS = {
    "small": dict(name="vit_small_patch16_224", img=112, batch=32, kw={}),
    "base": dict(name="vit_base_patch16_224", img=224, batch=8, kw={}),
    # smoke-test model (not part of the report)
    "tiny": dict(name="vit_tiny_patch16_224", img=32, batch=4,
                 kw=dict(patch_size=8, embed_dim=32, depth=2, num_heads=2)),
}
EVAL_BATCHES = 4
RATIO_KEYS = ("train_supernet_vs_peft_lora", "train_supernet_no_lora_A_vs_peft_lora", "retrain_vs_peft_glora",
              "infer_merged_vs_timm", "infer_unmerged_vs_merged", "search_evals_vs_inference",
              "peak_mem_supernet_vs_peft_lora", "peak_mem_total_supernet_vs_peft_lora")
TARGET = {"train_supernet_vs_peft_lora": ("<=", 1.05), "retrain_vs_peft_glora": ("<=", 0.65),
          "infer_merged_vs_timm": ("<=", 1.02), "search_evals_vs_inference": (">=", 0.90),
          "peak_mem_supernet_vs_peft_lora": ("<=", 1.10)}


# ---- models -----------------------------------------------------------------------------------------------
def create(spec: dict, seed: int = 0) -> nn.Module:
    import timm
    torch.manual_seed(seed)
    return timm.create_model(spec["name"], pretrained=False, num_classes=NUM_CLASSES, img_size=spec["img"],
                             **spec["kw"])


def data(spec: dict, n_batches: int = 1, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(spec["batch"], 3, spec["img"], spec["img"], generator=g),
             torch.randint(0, NUM_CLASSES, (spec["batch"],), generator=g)) for _ in range(n_batches)]


def target_names(model: nn.Module) -> list[str]:
    from supernet.inject import find_targets
    return find_targets(model, TARGETS)  # linear layers only: patch_embed.proj (a conv) is not a target


def largest_choice():
    from supernet.space import LayerChoice
    return LayerChoice("lora_4", "lora_4", "lora_4", "vector", "vector")


def build_supernet(spec: dict):
    from supernet.wrapper import GloraSupernet
    sn = GloraSupernet(create(spec), target_modules=TARGETS, ranks=[4])
    return sn.train(), sn.trainable_parameters()


def build_peft_lora(spec: dict):
    import peft
    model = create(spec)
    cfg = peft.LoraConfig(r=4, lora_alpha=4, target_modules=target_names(model), lora_dropout=0.0,
                          modules_to_save=["head"])
    pm = peft.get_peft_model(model, cfg)
    return pm.train(), [p for p in pm.parameters() if p.requires_grad]


def build_retrain(spec: dict):
    from retrain.build import apply_subnet, layer_specs
    from supernet.space import SearchSpace
    model = create(spec)
    space = SearchSpace(layer_specs(model, TARGETS), ranks=[4])
    apply_subnet(model, space.uniform(largest_choice()))
    return model.train(), [p for p in model.parameters() if p.requires_grad]


def build_peft_glora(spec: dict):
    import peft
    model = create(spec)
    cfg = peft.GloraConfig(r=4, target_modules=target_names(model), config_A_B="lora", config_C="lora",
                           config_D_E="vector", modules_to_save=["head"])
    pm = peft.get_peft_model(model, cfg)
    return pm.train(), [p for p in pm.parameters() if p.requires_grad]


def build_merged(spec: dict, seed: int = 1):
    """The retrained compact model (adapters randomised, as after training), unmerged and merged."""
    from retrain.build import apply_subnet, layer_specs, merge_and_unload
    from supernet.space import SearchSpace
    model = create(spec)
    space = SearchSpace(layer_specs(model, TARGETS), ranks=[4])
    apply_subnet(model, space.uniform(largest_choice()))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad and p.ndim <= 2 and p.numel() < 10 ** 6:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    unmerged = model.eval()
    import copy
    merged = merge_and_unload(copy.deepcopy(unmerged)).eval()
    return unmerged, merged


# ---- steps ------------------------------------------------------------------------------------------------
class TrainStep:
    """forward + cross-entropy + backward + AdamW step over ``params``; ``before(i)`` runs first (path draw)."""

    def __init__(self, model: nn.Module, params: list, batch, before: Callable[[int], None] | None = None):
        self.model, self.x, self.y, self.before = model, batch[0], batch[1], before
        self.opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
        self.i = 0

    def __call__(self) -> None:
        if self.before is not None:
            self.before(self.i)
        self.i += 1
        loss = F.cross_entropy(self.model(self.x), self.y)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()


def supernet_step(spec: dict, batch, no_lora_a: bool = False) -> TrainStep:
    sn, params = build_supernet(spec)
    if not no_lora_a:
        return TrainStep(sn, params, batch, before=lambda i: sn.sample_path(seed=0, step=i))
    from supernet.space import Subnet

    def before(i: int) -> None:  # the random path, with A drawn from the non-LoRA choices only
        sub = sn.space.path(0, i)
        rng = np.random.default_rng([1, i])
        layers = tuple(lc._replace(A=("vector", "scalar", "none")[int(rng.integers(3))])
                       if lc.A.startswith("lora") else lc for lc in sub.layers)
        sn.set_subnet(Subnet(sub.names, layers))
    return TrainStep(sn, params, batch, before=before)


def infer(model: nn.Module, x: torch.Tensor) -> Callable[[], None]:
    def run() -> None:
        with torch.no_grad():
            model(x)
    return run


def search_eval(spec: dict, batches, seed: int = 0):
    """(evaluate one random candidate, plain inference of the base model) over the same images."""
    from glora.core.engine import evaluate
    from supernet.wrapper import GloraSupernet
    base = create(spec).eval()
    sn = GloraSupernet(create(spec), target_modules=TARGETS, ranks=[4]).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # a trained supernet: every shared tensor non-zero
        for p in sn.adapter_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    rng = np.random.default_rng(seed)
    cpu = torch.device("cpu")

    def candidate() -> None:
        sn.set_subnet(sn.space.random(rng), freeze=True)
        evaluate(sn, batches, cpu)

    def plain() -> None:
        evaluate(base, batches, cpu)
    return candidate, plain


# ---- timing -----------------------------------------------------------------------------------------------
def interleave(sides: dict[str, Callable[[], None]], repeats: int, warmup: int = 1) -> dict[str, float]:
    """Median seconds per call of each side, timed A B A B ... in this process."""
    for _ in range(warmup):
        for fn in sides.values():
            fn()
    times: dict[str, list[float]] = {k: [] for k in sides}
    for r in range(repeats):  # A B, then B A, ...: a load drift during a round hits both sides alike
        for k in (list(sides) if r % 2 == 0 else list(sides)[::-1]):
            fn = sides[k]
            t0 = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


# ---- peak memory (one subprocess per side) ----------------------------------------------------------------
def _maxrss_mib() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024.0 if sys.platform != "darwin" else r / 2 ** 20


def mem_worker(model_key: str, side: str, steps: int, threads: int = THREADS) -> dict:
    torch.set_num_threads(threads)
    spec = MODELS[model_key]
    batch = data(spec)[0]
    if side == "supernet":
        step = supernet_step(spec, batch)
    else:
        model, params = build_peft_lora(spec)
        step = TrainStep(model, params, batch)
    import gc
    gc.collect()
    if _reset_hwm():  # Linux: reset the high-water mark, so import-time peaks do not hide the step's
        base = _status_mib("VmRSS")
        for _ in range(steps):
            step()
        peak = _status_mib("VmHWM")
        method = "VmHWM after clear_refs"
    else:
        base = _maxrss_mib()
        for _ in range(steps):
            step()
        peak = _maxrss_mib()
        method = "ru_maxrss"
    return {"baseline_mib": base, "peak_mib": peak, "step_mib": peak - base, "method": method}


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _status_mib("VmHWM") > 0
    except OSError:
        return False


def _status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return 0.0


def measure_mem(model_key: str, sides: list[str], steps: int) -> dict[str, dict]:
    """Peak-memory figures of each side, one subprocess per side (run side by side: ru_maxrss is per process)."""
    procs = {}
    for side in sides:
        cmd = [sys.executable, os.path.abspath(__file__), "--mem-worker", side, "--models", model_key,
               "--repeats", str(steps), "--threads", str(torch.get_num_threads())]
        procs[side] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    out = {}
    for side, p in procs.items():
        stdout, stderr = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"memory worker {side} failed:\n{stderr[-2000:]}")
        out[side] = json.loads(stdout.strip().splitlines()[-1])
    return out


# ---- bf16 vs fp32 search ranking --------------------------------------------------------------------------
def spearman(a, b) -> float:
    def ranks(v):
        v = np.asarray(v, dtype=float)
        order = np.argsort(v, kind="mergesort")
        r = np.empty(len(v))
        r[order] = np.arange(len(v))
        for val in np.unique(v):  # ties share their mean rank
            m = v == val
            r[m] = r[m].mean()
        return r
    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = math.sqrt(float((ra ** 2).sum() * (rb ** 2).sum()))
    return float((ra * rb).sum() / den) if den > 0 else float("nan")


def bf16_ranking(n_subnets: int = 20, n_images: int = 256, seed: int = 0, depth: int = 4,
                 adapter_std: float = 0.002) -> dict:
    """Score random subnets of a small supernet with random adapters on fixed data, fp32 vs bf16 autocast.

    Labels are the base model's own predictions, so each subnet's accuracy measures how far its adapters move
    the model: the accuracies spread and the ranking is meaningful."""
    import timm
    from glora.core.engine import InMemorySplit, evaluate
    from supernet.wrapper import GloraSupernet
    torch.manual_seed(seed)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=10, img_size=32, patch_size=8,
                              embed_dim=64, depth=depth, num_heads=2).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():  # non-zero biases so C, D, E matter; a spread-out head
            if n.startswith("head."):
                p.copy_(torch.randn(p.shape, generator=g) * (0.0 if p.ndim == 1 else 1.0))
            elif p.ndim == 1 and not n.startswith("norm") and ".norm" not in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        x = torch.randn(n_images, 3, 32, 32, generator=g)
        logits = model(x)  # centre and scale the head so the base model's predictions spread over the classes
        model.head.weight.div_(logits.std(0).mean())
        model.head.bias.copy_(-logits.mean(0) / logits.std(0).mean())
        y = model(x).argmax(-1)
    sn = GloraSupernet(model, target_modules=TARGETS, ranks=[4]).eval()
    with torch.no_grad():
        for p in sn.adapter_parameters():
            p.copy_(torch.randn(p.shape, generator=g) * adapter_std)
    split = InMemorySplit(x, y)
    rng = np.random.default_rng(seed)
    subnets = [sn.space.random(rng) for _ in range(n_subnets)]
    cpu = torch.device("cpu")
    acc = {}
    for prec in ("fp32", "bf16"):
        acc[prec] = []
        for s in subnets:
            sn.set_subnet(s, freeze=True)
            acc[prec].append(evaluate(sn, split.batches(64), cpu, prec))
    return {"spearman": spearman(acc["fp32"], acc["bf16"]), "n_subnets": n_subnets, "n_images": n_images,
            "fp32_acc": acc["fp32"], "bf16_acc": acc["bf16"],
            "top1_same": int(np.argmax(acc["fp32"])) == int(np.argmax(acc["bf16"]))}


# ---- one model --------------------------------------------------------------------------------------------
PARTS = ("train", "retrain", "infer", "search", "mem")


def bench_model(model_key: str, repeats: int, warmup: int, mem: bool, mem_steps: int, log=print,
                parts=PARTS) -> dict:
    spec = MODELS[model_key]
    batch = data(spec)[0]
    res: dict = {"model": spec["name"], "img": spec["img"], "batch": spec["batch"]}

    if "train" in parts:
        log(f"[{model_key}] 1. supernet step vs PEFT LoRA step")
        sides = {"supernet": supernet_step(spec, batch), "peft_lora": None,
                 "supernet_no_lora_A": supernet_step(spec, batch, no_lora_a=True)}
        m, p = build_peft_lora(spec)
        sides["peft_lora"] = TrainStep(m, p, batch)
        t = interleave(sides, repeats, warmup)
        res["train_s"] = t
        res["train_supernet_vs_peft_lora"] = t["supernet"] / t["peft_lora"]
        res["train_supernet_no_lora_A_vs_peft_lora"] = t["supernet_no_lora_A"] / t["peft_lora"]
        del sides, m, p

    if "retrain" in parts:
        log(f"[{model_key}] 2. retrain step vs PEFT GLoRA step")
        m1, p1 = build_retrain(spec)
        m2, p2 = build_peft_glora(spec)
        t = interleave({"retrain": TrainStep(m1, p1, batch), "peft_glora": TrainStep(m2, p2, batch)}, repeats, warmup)
        res["retrain_s"] = t
        res["retrain_vs_peft_glora"] = t["retrain"] / t["peft_glora"]
        del m1, p1, m2, p2

    if "infer" in parts:
        log(f"[{model_key}] 3. inference: merged vs timm, unmerged vs merged")
        unmerged, merged = build_merged(spec)
        plain = create(spec).eval()
        t = interleave({"merged": infer(merged, batch[0]), "timm": infer(plain, batch[0]),
                        "unmerged": infer(unmerged, batch[0])}, repeats, warmup)
        res["infer_s"] = t
        res["infer_merged_vs_timm"] = t["merged"] / t["timm"]
        res["infer_unmerged_vs_merged"] = t["unmerged"] / t["merged"]
        del unmerged, merged, plain

    if "search" in parts:
        log(f"[{model_key}] 4. search: candidate evaluation vs plain inference over {EVAL_BATCHES} batches")
        candidate, plain_eval = search_eval(spec, data(spec, EVAL_BATCHES, seed=1))
        t = interleave({"candidate": candidate, "inference": plain_eval}, repeats, warmup)
        res["search_s"] = t
        res["search_evals_per_s"] = 1.0 / t["candidate"]
        res["search_evals_vs_inference"] = t["inference"] / t["candidate"]  # (evals/s) / (inference passes/s)
        del candidate, plain_eval

    if mem and "mem" in parts:
        log(f"[{model_key}] 5. peak memory (subprocess per side)")
        mm = measure_mem(model_key, ["supernet", "peft_lora"], mem_steps)
        a, b = mm["supernet"], mm["peft_lora"]
        res["mem_mib"] = {"supernet": a, "peft_lora": b}
        # a 1 MiB floor keeps the ratio finite on models too small to move the high-water mark
        res["peak_mem_supernet_vs_peft_lora"] = max(a["step_mib"], 1.0) / max(b["step_mib"], 1.0)
        res["peak_mem_total_supernet_vs_peft_lora"] = a["peak_mib"] / b["peak_mib"]
    return res


# ---- report -----------------------------------------------------------------------------------------------
def versions() -> dict:
    import peft
    import timm
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"torch": torch.__version__, "timm": timm.__version__, "peft": peft.__version__,
            "python": platform.python_version(), "cpu": cpu, "logical_cpus": os.cpu_count()}


def verdict(key: str, value: float) -> str:
    if key not in TARGET:
        return "(record)"
    op, lim = TARGET[key]
    ok = value <= lim if op == "<=" else value >= lim
    return f"{op} {lim}: {'met' if ok else 'NOT met'}"


def write_markdown(path: str, report: dict, command: str) -> None:
    lines = ["# Benchmark results", "", "Tables generated by `bench/bench_speed.py`; the cost model behind them is in "
             "`bench/README.md`.", "",
             f"Command: `{command}`", "",
             "Machine: " + ", ".join(f"{k} {v}" for k, v in report["env"].items()), "",
             f"Timed rounds per side: {report['repeats']} (medians; sides interleaved in one process, A B then B A in "
             "alternate rounds).", ""]
    for key, res in report["models"].items():
        lines += [f"## {res['model']} ({res['img']} px, batch {res['batch']})", "",
                  "| comparison | A (s) | B (s) | ratio A/B | target |", "|---|---|---|---|---|"]
        rows = [("supernet step / PEFT LoRA step", "train_s", "supernet", "peft_lora", "train_supernet_vs_peft_lora"),
                ("supernet step, A never LoRA / PEFT LoRA step", "train_s", "supernet_no_lora_A", "peft_lora",
                 "train_supernet_no_lora_A_vs_peft_lora"),
                ("retrain step (largest choice) / PEFT GLoRA step", "retrain_s", "retrain", "peft_glora",
                 "retrain_vs_peft_glora"),
                ("merged inference / timm inference", "infer_s", "merged", "timm", "infer_merged_vs_timm"),
                ("unmerged inference / merged inference", "infer_s", "unmerged", "merged", "infer_unmerged_vs_merged")]
        for label, grp, a, b, rk in rows:
            if grp not in res:
                continue
            lines.append(f"| {label} | {res[grp][a]:.4f} | {res[grp][b]:.4f} | {res[rk]:.3f} | {verdict(rk, res[rk])} |")
        s = res.get("search_s")
        if s:
            lines.append(f"| search: evaluations/s / inference passes/s ({EVAL_BATCHES} batches) | "
                         f"{s['candidate']:.4f} | "
                         f"{s['inference']:.4f} | {res['search_evals_vs_inference']:.3f} | "
                         f"{verdict('search_evals_vs_inference', res['search_evals_vs_inference'])} |")
        if "mem_mib" in res:
            mm = res["mem_mib"]
            lines.append(f"| peak memory of a step above the built model (MiB) | {mm['supernet']['step_mib']:.0f} | "
                         f"{mm['peft_lora']['step_mib']:.0f} | {res['peak_mem_supernet_vs_peft_lora']:.3f} | "
                         f"{verdict('peak_mem_supernet_vs_peft_lora', res['peak_mem_supernet_vs_peft_lora'])} |")
            lines.append(f"| peak memory of the process (MiB) | {mm['supernet']['peak_mib']:.0f} | "
                         f"{mm['peft_lora']['peak_mib']:.0f} | {res['peak_mem_total_supernet_vs_peft_lora']:.3f} | "
                         "(record) |")
        lines.append("")
    if "bf16_ranking" in report:
        r = report["bf16_ranking"]
        lines += ["## bf16 vs fp32 search ranking", "",
                  f"{r['n_subnets']} random subnets of a 4-block ViT (dim 64) supernet with random adapters, scored "
                  f"on {r['n_images']} fixed images (labels: the base model's predictions) in fp32 and under bf16 "
                  f"autocast: Spearman rank correlation **{r['spearman']:.3f}**, same best subnet: {r['top1_same']}.",
                  ""]
    lines += ["## Method", "",
              "- Random-weight timm models (`pretrained=False`, 100 classes), fixed seeds, "
              f"`torch.set_num_threads({report['env']['threads']})`, adapters on every `qkv`, `proj`, `fc1`, `fc2` of the blocks.",
              "- A step = forward + cross-entropy + backward + AdamW step over the trainable parameters "
              "(adapters and the head on both sides; PEFT keeps the head trainable with `modules_to_save=['head']`).",
              "- Supernet: `GloraSupernet(model, ranks=[4])`, a fresh `sample_path(seed, step)` each step. "
              "PEFT LoRA: `LoraConfig(r=4, lora_alpha=4, lora_dropout=0)`. Retrain: `apply_subnet` with every layer "
              "at `(lora_4, lora_4, lora_4, vector, vector)`; PEFT GLoRA: `GloraConfig(r=4, config_A_B='lora', "
              "config_C='lora', config_D_E='vector')`.",
              f"- Search: one evaluation = `set_subnet(random subnet, freeze=True)` + `glora.core.engine.evaluate` over "
              f"{EVAL_BATCHES} batches; compared with `evaluate` of the untouched timm model over the same batches.",
              "- Peak memory: one subprocess per side builds its model, optimizer and batch, resets the kernel's "
              "resident high-water mark (`echo 5 > /proc/self/clear_refs`; `ru_maxrss` elsewhere), reads VmRSS "
              "(baseline), runs 3 steps and reads VmHWM; the step figure is the difference (activations, "
              "gradients, optimizer state, temporaries), the process figure the high-water mark itself.", ""]
    with open(path, "w") as f:
        f.write("\n".join(lines))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fast smoke run: small model, 2 repeats, no memory")
    ap.add_argument("--models", default="small,base", help="comma list of: small, base (tiny for tests)")
    ap.add_argument("--repeats", default=None, help="timed rounds per side: N, or one N per model (e.g. 4,2)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=THREADS, help="torch threads (the report uses 2)")
    ap.add_argument("--no-mem", action="store_true")
    ap.add_argument("--no-bf16", action="store_true")
    ap.add_argument("--parts", default=",".join(PARTS), help="comma list of: " + ", ".join(PARTS))
    ap.add_argument("--bf16-subnets", type=int, default=20, help="subnets ranked in fp32 and bf16")
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results.md"), help="markdown report ('' = none)")
    ap.add_argument("--mem-worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.mem_worker:
        r = mem_worker(args.models, args.mem_worker, int(args.repeats or 3), args.threads)
        print(json.dumps(r))
        return r
    keys = [k.strip() for k in args.models.split(",") if k.strip()]
    if args.quick and args.models == "small,base":
        keys = ["small"]
    reps = [int(r) for r in str(args.repeats).split(",")] if args.repeats else [2 if args.quick else 5]
    reps += [reps[-1]] * (len(keys) - len(reps))
    mem = not args.no_mem and not args.quick
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    report: dict = {"env": versions(), "repeats": dict(zip(keys, reps)), "models": {}, "ratios": {}}
    report["env"]["threads"] = args.threads
    report["command"] = ("python bench/bench_speed.py "
                         + " ".join(argv if argv is not None else sys.argv[1:])).strip()

    def flush() -> None:  # the report so far, after every part (a long run stopped early keeps what it has)
        report["ratios"] = {f"{k}.{rk}": report["models"][k][rk] for k in report["models"] for rk in RATIO_KEYS
                            if rk in report["models"][k]}
        if "bf16_ranking" in report:
            report["ratios"]["bf16_fp32_spearman"] = report["bf16_ranking"]["spearman"]
        if args.out:
            write_markdown(args.out, report, report["command"])

    if not args.no_bf16:
        log("bf16 vs fp32 ranking")
        report["bf16_ranking"] = bf16_ranking(n_subnets=min(8, args.bf16_subnets) if args.quick else args.bf16_subnets)
        flush()
    for k, r in zip(keys, reps):
        report["models"][k] = bench_model(k, r, args.warmup, mem, mem_steps=3, log=log,
                                          parts=[p.strip() for p in args.parts.split(",")])
        flush()
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    main()
