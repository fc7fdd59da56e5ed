"""The search stage: score subnets of the trained supernet on val200 and evolve them under the budget."""
from __future__ import annotations

import logging
from pathlib import Path

from glora.core import accel
from glora.core.build import load_split, prepare_data, stage_dir
from glora.core.config import Config
from glora.core.engine import evaluate, resolve_device, set_threads
from supernet.space import Subnet
from glora.stages.supernet import load_trained_supernet

from search.evolution import FINAL_FILES, EvolutionSearcher, read_state
from search.operators import check_budget

_logger = logging.getLogger(__name__)


def search_complete(cfg: Config) -> bool:
    out = Path(cfg.output_dir) / "search"
    if not all((out / f).is_file() for f in FINAL_FILES) or not (out / "state.json").is_file():
        return False
    return read_state(out / "state.json")["generation"] >= cfg.search.generations  # more generations: extend it


def run_search(cfg: Config, progress: bool = True) -> dict:
    set_threads(cfg.threads)
    device = resolve_device(cfg.device)
    accel.configure(cfg, device)
    s = cfg.search
    num_classes = prepare_data(cfg)
    sn = load_trained_supernet(cfg, num_classes, device).eval()
    min_p, max_p = int(round(s.min_params_m * 1e6)), int(round(s.max_params_m * 1e6))
    check_budget(sn.space, min_p, max_p)  # before any image is loaded
    val = load_split(cfg, sn.model, "val200", progress=progress, device=device)  # on the GPU: no copy a candidate

    def score(subnet: Subnet) -> float:
        sn.set_subnet(subnet, freeze=True)  # fold each layer once; every batch then runs plain linears
        return evaluate(sn, val.batches(cfg.data.eval_batch_size), device, cfg.precision,
                        max_batches=s.max_eval_batches)

    searcher = EvolutionSearcher(sn.space, score, min_params=min_p, max_params=max_p, generations=s.generations,
                                 population=s.population, select=s.select, mutation=s.mutation,
                                 mutation_prob=s.mutation_prob, crossover=s.crossover, seed=s.seed,
                                 out_dir=stage_dir(cfg, "search"), model_name=cfg.model.name, progress=progress)
    result = searcher.run()
    _logger.info("search: best subnet %d adapter params, val top-1 %.4f (%d candidates evaluated)",
                 result.best_params, result.best_score, result.evaluated)
    return {"params": result.best_params, "val_acc": result.best_score, "evaluated": result.evaluated,
            "subnet_file": str(Path(cfg.output_dir) / "search" / "subnet.yaml")}
