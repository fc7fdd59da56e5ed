"""The library API: GLoRA with per-layer search on any PyTorch model, in the user's own training loop.

    from supernet import GloraSupernet, search_subnet, apply_subnet, merge_and_unload

    sn = GloraSupernet(model, target_modules=["q_proj", "v_proj"], ranks=[4, 8])   # model changed in place
    for step, batch in enumerate(loader):          # the user's loop: a fresh path at every step
        sn.sample_path(seed=0, step=step)
        loss = my_loss(sn(batch)); loss.backward(); opt.step(); opt.zero_grad()
    result = search_subnet(sn, score_fn=lambda m: -my_val_loss(m), max_params=100_000)
    model = apply_subnet(sn.model, result.best)    # compact: only the chosen tensors, trainable
    ...                                           # fine-tune it with the same loop
    plain = merge_and_unload(model)                # plain nn.Linear layers again, the base architecture

Units: parameter counts and budgets are numbers of adapter elements (the classifier head not included);
scores are whatever ``score_fn`` returns, higher is better (return ``-loss`` to minimise a loss).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

import torch

from retrain.build import adapter_parameters, apply_subnet, merge_and_unload
from retrain.glora import GloraLinear
from search.evolution import Candidate, EvolutionSearcher, SearchResult

from .inject import classifier_names, find_targets, layer_specs
from .layer import SuperGloraLinear
from .space import LayerChoice, LayerSpec, SearchSpace, Subnet
from .wrapper import GloraSupernet

__all__ = [
    "GloraSupernet", "SearchSpace", "Subnet", "LayerChoice", "LayerSpec", "SearchResult", "Candidate",
    "search_subnet", "apply_subnet", "merge_and_unload", "adapter_parameters", "find_targets", "layer_specs",
    "classifier_names", "GloraLinear", "SuperGloraLinear",
]


def search_subnet(supernet: GloraSupernet, score_fn: Callable[[GloraSupernet], float], max_params: int, *,
                  min_params: int = 0, generations: int = 20, population: int = 50, select: Optional[int] = None,
                  mutation: Optional[int] = None, crossover: Optional[int] = None, mutation_prob: float = 0.2,
                  seed: int = 0, out_dir: str | Path | None = None, progress: bool = False) -> SearchResult:
    """Evolutionary search for the subnet of ``supernet`` with the highest ``score_fn`` within a budget.

    Args:
        supernet: a trained :class:`GloraSupernet`.
        score_fn: called once per distinct candidate with ``supernet`` set to that candidate (each layer folded
            to a plain weight, eval mode, under ``torch.no_grad()``); returns a float, higher is better
            (validation accuracy, or ``-loss``). It runs the supernet as the user's evaluation code does.
        max_params, min_params: the budget, in adapter elements (``supernet.space.params(subnet)``; the head is
            not counted). ``supernet.space.param_range()`` gives the smallest and largest subnet.
        generations, population: evolution length and candidates per generation.
        select: parents kept each generation (default ``population // 5``, at least 1).
        mutation, crossover: children made each generation by each operator (default ``population // 2`` each;
            random subnets fill the rest of the population). ``mutation_prob``: chance that each choice of a
            mutated child is redrawn.
        seed: the search's seed; the same seed and scores give the same search.
        out_dir: when given, ``history.jsonl``, ``state.json``, ``subnet.yaml`` and ``topk.yaml`` are written
            there and a search killed part way resumes from them.

    Returns:
        :class:`SearchResult`: ``best`` (a :class:`Subnet`), ``best_score``, ``best_params``, ``topk`` and
        ``history`` (one dict per scored candidate). The supernet is left on ``best`` (not folded) in the
        training mode it had.
    """
    select = max(1, population // 5) if select is None else select
    mutation = population // 2 if mutation is None else mutation
    crossover = population // 2 if crossover is None else crossover
    was_training = supernet.training

    def score(subnet: Subnet) -> float:
        supernet.eval()
        supernet.set_subnet(subnet, freeze=True)
        with torch.no_grad():
            return float(score_fn(supernet))

    searcher = EvolutionSearcher(supernet.space, score, min_params=min_params, max_params=max_params,
                                 generations=generations, population=population, select=select, mutation=mutation,
                                 mutation_prob=mutation_prob, crossover=crossover, seed=seed, out_dir=out_dir,
                                 progress=progress)
    try:
        result = searcher.run()
    finally:
        supernet.train(was_training)
    supernet.set_subnet(result.best)
    return result
