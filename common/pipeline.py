"""Run the stages of a config in turn, skipping finished ones, and summarise."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from . import dist
from .config import Config
from .io import atomic_write_json

_logger = logging.getLogger("glora")


def _stage_fns():
    from retrain.stage import retrain_complete, run_retrain
    from search.stage import run_search, search_complete
    from supernet.train import supernet_complete, train_supernet
    return {
        "supernet": (supernet_complete, train_supernet),
        "search": (search_complete, run_search),
        "retrain": (retrain_complete, run_retrain),
    }


def run_stages(cfg: Config, stages, progress: bool = True, skip_complete: bool = True) -> dict:
    fns = _stage_fns()
    out = Path(cfg.output_dir)
    summary_path = out / "summary.json"
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    for stage in stages:
        complete, run = fns[stage]
        if skip_complete and dist.agree(complete(cfg)):  # rank 0's reading decides for every rank
            _logger.info("%s: already complete, skipped (delete %s to redo it)", stage, out / stage)
            continue
        _logger.info("%s: starting", stage)
        t0 = time.time()
        result = run(cfg, progress=progress)
        result["time_s"] = round(time.time() - t0, 1)
        result["world_size"], result["backend"] = dist.world_size(), dist.backend()
        summary[stage] = result
        if dist.is_main():
            atomic_write_json(summary_path, summary)
        dist.barrier()  # the next stage reads what rank 0 wrote
        _logger.info("%s: done in %.1f s", stage, result["time_s"])
    if dist.is_main():
        print_summary(cfg, summary)
    return summary


def print_summary(cfg: Config, summary: dict) -> None:
    out = Path(cfg.output_dir)
    lines = ["", f"== GLoRA run summary ({out}) =="]
    for stage in ("supernet", "search", "retrain"):
        if stage in summary:
            lines.append(f"  {stage:<9} {summary[stage].get('time_s', 0):>8.1f} s")
    s = summary.get("search")
    if s:
        lines.append(f"  searched subnet: {s.get('params', 0):,} adapter params, val top-1 {s.get('val_acc', 0):.4f}"
                     f"  ({out / 'search' / 'subnet.yaml'})")
    r = summary.get("retrain")
    if r:
        lines.append(f"  GLoRA test top-1: {r['test_acc']:.4f} with {r['adapter_params']:,} adapter params "
                     f"+ {r['head_params']:,} head params")
        if r.get("head_only_test_acc") is not None:
            lines.append(f"  head-only test top-1: {r['head_only_test_acc']:.4f}")
        lines.append(f"  merged model: {r['merged_file']} (max |merged - unmerged| logit {r['merge_max_abs_diff']:.2e})")
    lines.append(f"  files: {out}/{{config.yaml, supernet/, search/, retrain/, summary.json}}")
    print("\n".join(lines))
