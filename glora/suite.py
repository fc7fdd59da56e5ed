"""Several tasks with one config: each into ``<output_dir>/<task>/`` (resumable), then ``suite.md`` and ``suite.csv``
with GLoRA beside each baseline per task, the mean, and for VTAB-1k tasks the paper's group means."""
from __future__ import annotations

import csv
import io
import json
import logging
from pathlib import Path

from .core import dist
from .core.config import load_config, parse_set
from .core.errors import UserError
from .core.io import atomic_write_text

_logger = logging.getLogger("glora")

VTAB_GROUPS = {
    "Natural": ["cifar", "caltech101", "dtd", "oxford_flowers102", "oxford_iiit_pet", "svhn", "sun397"],
    "Specialized": ["patch_camelyon", "eurosat", "resisc45", "diabetic_retinopathy"],
    "Structured": ["clevr_count", "clevr_dist", "dmlab", "kitti", "dsprites_loc", "dsprites_ori", "smallnorb_azi",
                   "smallnorb_ele"],
}
STAGE_NAMES = ("supernet", "search", "retrain")


def parse_tasks(text: str) -> list[str]:
    tasks = [t.strip() for t in str(text).split(",") if t.strip()]
    if not tasks:
        raise UserError(f"--tasks {text!r}: give task folder names separated by commas (e.g. mnist,dsprites_loc)")
    if len(set(tasks)) != len(tasks):
        raise UserError(f"--tasks {text!r}: a task appears twice")
    for t in tasks:
        if "/" in t or "\\" in t or t in (".", ".."):
            raise UserError(f"--tasks: {t!r} is not a task folder name")
    return tasks


def task_configs(config: str | None, overrides: list[str], tasks: list[str], seeds: list[int] | None = None):
    """The resolved config of each run (checked before anything runs) and the suite's folder.

    Without ``seeds`` one run per task, into ``<output_dir>/<task>``; with them one run per (task, seed), into
    ``<output_dir>/<task>/seed<S>`` with the global ``seed`` set to S (``search.seed`` stays as configured)."""
    base = load_config(config, overrides)
    root = Path(base.output_dir)
    for item in overrides:  # the suite sets these per run: a --set of them would be silently replaced
        parts, value = parse_set(item)
        key = ".".join(parts)
        if key == "data" and isinstance(value, dict) and "task" in value:  # --set 'data={task: x, ...}'
            key = "data.task"
        if key == "data.task" or (key == "seed" and seeds is not None):
            flag = "--tasks" if key == "data.task" else "--seeds"
            raise UserError(f"--set {item!r}: the suite sets {key} for each run from {flag}; give it there instead")
    if seeds is None:
        return root, [load_config(config, list(overrides) + [f"data.task={t}", f"output_dir={root / t}"])
                      for t in tasks]
    return root, [load_config(config, list(overrides) + [f"data.task={t}", f"seed={sd}",
                                                         f"output_dir={root / t / f'seed{sd}'}"])
                  for t in tasks for sd in seeds]


def run_suite(config: str | None, overrides: list[str], tasks: list[str], progress: bool = True,
              seeds: list[int] | None = None) -> list[dict]:
    from .pipeline import hold_output
    root, cfgs = task_configs(config, overrides, tasks, seeds)
    with hold_output(root):  # one suite at a time writes this folder's suite.md and suite.csv
        return _run_tasks(root, cfgs, progress, seeds)


def _run_tasks(root: Path, cfgs: list, progress: bool, seeds: list[int] | None) -> list[dict]:
    from .pipeline import hold_output, run_stages
    rows = []
    for i, cfg in enumerate(cfgs):
        what = cfg.data.task if seeds is None else f"{cfg.data.task} seed {cfg.seed}"
        _logger.info("suite: task %s (%d/%d) into %s", what, i + 1, len(cfgs), cfg.output_dir)
        from .core.config import dump_config
        with hold_output(Path(cfg.output_dir)):  # no other command works in this task's folder meanwhile
            if dist.is_main():  # under torchrun rank 0 writes, every rank runs the stages
                dump_config(cfg, Path(cfg.output_dir) / "config.yaml")
            summary = run_stages(cfg, STAGE_NAMES, progress=progress, skip_complete=True)
        rows.append(task_row(cfg.data.task, summary, None if seeds is None else cfg.seed))
        if dist.is_main():
            write_tables(root, rows)  # after every task, so a long suite stopped early keeps its table
    dist.barrier()
    return rows


def task_row(task: str, summary: dict, seed: int | None = None) -> dict:
    from .pipeline import comparison_rows
    r = summary.get("retrain", {})
    row = {"task": task, **({} if seed is None else {"seed": seed}),
           "group": next((g for g, ts in VTAB_GROUPS.items() if task in ts), ""),
           "glora_test": r.get("test_acc"), "glora_params": r.get("adapter_params"), "glora_lr": r.get("lr")}
    chose_epochs = bool(r.get("epochs_grid"))  # retrain.epochs_grid: the epochs chosen, beside the lr
    if chose_epochs:
        row["glora_epochs"] = r.get("epochs")
    for key, b in (r.get("baselines") or {}).items():
        row[f"{key}_test"] = b.get("test_acc")
        row[f"{key}_params"] = b.get("adapter_params")
        row[f"{key}_lr"] = b.get("lr")
        if chose_epochs:
            row[f"{key}_epochs"] = b.get("epochs")
        if key == "lora":
            row["lora_rank"] = b.get("rank")
    diverged = [f"{key}@{a['lr']:.0e}" + (f"x{a['epochs']}ep" if "epochs" in a else "")
                + ("(kept: every lr diverged)" if a.get("kept") else "")
                for key, info in [("glora", r)] + sorted((r.get("baselines") or {}).items())
                for a in info.get("refits") or [] if a.get("diverged")]
    if diverged:  # refits that retrain.refit_guard caught: the method kept the next lr of its grid
        row["diverged_refits"] = " ".join(diverged)
    for st in STAGE_NAMES:
        row[f"{st}_s"] = summary.get(st, {}).get("time_s")
    for c in comparison_rows(summary)[1:]:
        if c["method"].startswith("LoRA"):
            row["lora_s"] = c["time_s"]
    return row


def _mean(values) -> float | None:
    vals = [float(v) for v in values if v is not None]
    return sum(vals) / len(vals) if vals else None


def _pct(v) -> str:
    return "-" if v is None else f"{100 * float(v):.1f}"


def write_tables(root: Path, rows: list[dict]) -> None:
    cols = []
    for r in rows:
        cols.extend(k for k in r if k not in cols)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in cols})
    atomic_write_text(root / "suite.csv", buf.getvalue())

    methods = [("GLoRA", "glora")] + [(lbl, k) for lbl, k in (("LoRA", "lora"), ("head only", "head"))
                                      if any(f"{k}_test" in r for r in rows)]
    head = "| task | " + " | ".join(f"{m} test top-1 | {m} params" for m, _ in methods) + \
        " | supernet s | search s | retrain s | LoRA s |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        cells = [r["task"] if "seed" not in r else f"{r['task']} (seed {r['seed']})"]
        for m, k in methods:
            p = r.get(f"{k}_params")
            lbl = f"{p:,}" if p is not None else "-"
            if k == "lora" and r.get("lora_rank"):
                over = p is not None and r.get("glora_params") is not None and p > r["glora_params"]
                lbl += f" (r={r['lora_rank']}{', above GLoRA' if over else ''})"
            cells += [_pct(r.get(f"{k}_test")), lbl]
        cells += [("-" if r.get(f"{s}_s") is None else f"{r[f'{s}_s']:.0f}") for s in STAGE_NAMES]
        cells.append("-" if r.get("lora_s") is None else f"{r['lora_s']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    groups = [("mean", rows)] + [(g, [r for r in rows if r["group"] == g]) for g in VTAB_GROUPS]
    for name, rs in groups:
        if not rs or (name != "mean" and len(rs) == len(rows) and len(rows) == 1):
            continue
        cells = [f"**{name}** ({len(rs)})"]
        for _, k in methods:
            cells += [_pct(_mean(r.get(f"{k}_test") for r in rs)), "-"]
        cells += ["-"] * 4
        lines.append("| " + " | ".join(cells) + " |")
    caught = [f"{r['task']}" + ("" if "seed" not in r else f" seed {r['seed']}") + f": {r['diverged_refits']}"
              for r in rows if r.get("diverged_refits")]
    if caught:
        lines += ["", "Refits on train800val200 that diverged (retrain.refit_guard; the method was trained again at "
                      "its next lr by val200): " + "; ".join(caught) + "."]
    lines += fewshot_lines(rows, methods)
    if any("seed" in r for r in rows):
        lines += seed_lines(rows, methods)
        atomic_write_text(root / "suite.md", "\n".join(lines) + "\n")
        return
    wins = [r for r in rows if r.get("lora_test") is not None and r.get("glora_test") is not None]
    note = ""
    if wins:
        diff = _mean(r["glora_test"] - r["lora_test"] for r in wins)
        note = (f"\nGLoRA minus LoRA, mean over {_tasks(len(wins))}: {100 * diff:+.2f} points; "
                f"GLoRA at least level on {sum(r['glora_test'] >= r['lora_test'] for r in wins)} of {len(wins)}.\n")
    atomic_write_text(root / "suite.md", "\n".join(lines) + "\n" + note)


def _std(vals: list[float]) -> float | None:
    if len(vals) < 2:
        return None
    m = sum(vals) / len(vals)
    return (sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5


def _tasks(n: int) -> str:
    return f"{n} task" if n == 1 else f"{n} tasks"


def seed_lines(rows: list[dict], methods: list[tuple[str, str]]) -> list[str]:
    """Runs over several seeds: per task, test top-1 as mean ± sample std over its seeds, and GLoRA minus LoRA
    paired by seed (mean ± std); then the mean over tasks of the per-task means."""
    tasks: dict[str, list[dict]] = {}
    for r in rows:
        tasks.setdefault(r["task"], []).append(r)
    paired = any(r.get("lora_test") is not None for r in rows)
    head = "| task | seeds | " + " | ".join(f"{m} test top-1" for m, _ in methods) + \
        (" | GLoRA - LoRA (points) | GLoRA >= LoRA |" if paired else " |")
    out = ["", "Over seeds (mean ± sample std of test top-1):", "", head, "|" + "---|" * (head.count("|") - 1)]
    diffs_by_task, means = {}, {k: [] for _, k in methods}
    for task, rs in tasks.items():
        cells = [task, str(len(rs))] + [_mean_std(r.get(f"{k}_test") for r in rs) for _, k in methods]
        for _, k in methods:
            m = _mean(r.get(f"{k}_test") for r in rs)
            if m is not None:
                means[k].append(m)
        if paired:
            d = [100 * (r["glora_test"] - r["lora_test"]) for r in rs
                 if r.get("glora_test") is not None and r.get("lora_test") is not None]
            diffs_by_task[task] = d
            sd = _std(d)
            cells += ["-" if not d else f"{sum(d) / len(d):+.2f}" + ("" if sd is None else f" ± {sd:.2f}"),
                      f"{sum(v >= 0 for v in d)} of {len(d)}"]
        out.append("| " + " | ".join(cells) + " |")
    cells = [f"**mean** ({len(tasks)})", "-"] + [_pct(_mean(means[k])) for _, k in methods]
    if paired:
        task_means = [sum(d) / len(d) for d in diffs_by_task.values() if d]
        every = [v for d in diffs_by_task.values() for v in d]
        cells += ["-" if not task_means else f"{sum(task_means) / len(task_means):+.2f}",
                  f"{sum(v >= 0 for v in every)} of {len(every)}"]
    out.append("| " + " | ".join(cells) + " |")
    if paired and diffs_by_task:
        task_means = [sum(d) / len(d) for d in diffs_by_task.values() if d]
        out += ["", f"GLoRA minus LoRA, mean over {_tasks(len(task_means))} of the per-task mean over seeds: "
                    f"{sum(task_means) / len(task_means):+.2f} points; GLoRA at least level on "
                    f"{sum(m >= 0 for m in task_means)} of {_tasks(len(task_means))} (on average over seeds)."]
        every = [v for d in diffs_by_task.values() for v in d]
        if len(every) >= 2:
            out += ["", interval_line(every)]
    return out


# two-sided 95% quantiles of Student's t for 1 to 30 degrees of freedom
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t975(df: int) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom (a 95% two-sided interval): the table up to
    30, beyond it the Cornish-Fisher expansion around the normal quantile (within 1e-3 of the exact value)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def interval_line(diffs: list[float]) -> str:
    """GLoRA minus LoRA pooled over every task-seed: mean, sample sd and a 95% Student's t confidence interval of
    the mean difference, saying what it does not cover: other tasks, and other machines, whose arithmetic can move
    the same seed's run by more (bench/accuracy.md, item 37)."""
    n = len(diffs)
    m = sum(diffs) / n
    sd = _std(diffs)
    head = (f"Pooled over the {n} task-seeds (each task-seed counts once, so this mean can differ from the mean of "
            f"the per-task means): GLoRA minus LoRA {m:+.2f} points")
    if sd < 1e-9 * max(1.0, abs(m)):  # every difference the same: a t interval would have no width
        return head + " in every task-seed alike (no spread, so no interval)."
    half = t975(n - 1) * sd / n ** 0.5
    verdict = "above zero" if m - half > 0 else "below zero" if m + half < 0 else "includes zero"
    df = f"{n - 1} degree{'s' if n > 2 else ''} of freedom"
    return (head + f" (sample sd {sd:.2f}; 95% confidence interval of the mean difference {m - half:+.2f} to "
            f"{m + half:+.2f}, Student's t with {df}: {verdict}). It describes the spread between these task-seeds "
            f"on this machine, not other tasks or hardware.")


def _mean_std(values) -> str:
    vals = [100 * float(v) for v in values if v is not None]
    if not vals:
        return "-"
    m = sum(vals) / len(vals)
    if len(vals) == 1:
        return f"{m:.1f}"
    sd = (sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5
    return f"{m:.1f} ± {sd:.1f}"


def fewshot_lines(rows: list[dict], methods: list[tuple[str, str]]) -> list[str]:
    """Few-shot tasks (``<name>_shot<K>_seed<S>``): test top-1 per (name, K) as mean ± sample std over seeds."""
    from glora.data.fewshot import FEWSHOT_TASK
    groups: dict[tuple[str, int], list[dict]] = {}
    for r in rows:
        m = FEWSHOT_TASK.match(r["task"])
        if m:
            groups.setdefault((m["name"], int(m["shot"])), []).append(r)
    if not groups:
        return []
    out = ["", "| few-shot task | shots | seeds | " + " | ".join(f"{m} test top-1" for m, _ in methods) + " |",
           "|---|---|---|" + "---|" * len(methods)]
    for (name, shot), rs in sorted(groups.items()):
        out.append(f"| {name} | {shot} | {len(rs)} | "
                   + " | ".join(_mean_std(r.get(f"{k}_test") for r in rs) for _, k in methods) + " |")
    return out


def read_rows(root: Path, tasks: list[str]) -> list[dict]:
    rows = []
    for t in tasks:
        p = root / t / "summary.json"
        if p.is_file():
            rows.append(task_row(t, json.loads(p.read_text())))
    return rows

