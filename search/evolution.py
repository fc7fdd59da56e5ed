"""Evolutionary search over GLoRA subnets (AutoFormer / NOAH style), resumable and deterministic for a seed.

Generation 0 is a random population inside the parameter budget. Each later generation is made from the
top-``select`` candidates evaluated so far: ``mutation`` children by mutation, ``crossover`` children from
pairs of parents, and random subnets to fill up to ``population``. A whole generation is drawn before any
of it is scored, so the random stream does not depend on scoring, and a run killed at any point and started
again (from ``state.json`` plus the scores already in ``history.jsonl``) ends where an uninterrupted run ends.

Files under ``out_dir``: ``history.jsonl`` (one line per evaluated candidate, appended as it is scored),
``state.json`` (written at the end of every generation), and at the end ``subnet.yaml`` (the best subnet)
and ``topk.yaml``; ``state.json`` then holds ``"finished": true``.
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from glora.core import dist
from glora.core.clock import save_clocks
from glora.core.errors import UserError
from glora.core.io import append_jsonl, atomic_write_json, atomic_write_text, atomic_write_yaml, read_jsonl
from supernet.space import LayerChoice, SearchSpace, Subnet

from .operators import check_budget, crossover, in_budget, mutate, sample_in_budget

log = logging.getLogger(__name__)

STATE_VERSION = 1
FINAL_FILES = ("subnet.yaml", "topk.yaml", "done")   # written in this order once state.json says finished
CHILD_TRIES = 10        # draws per child slot before it is left empty (colliding or out-of-budget children)


@dataclass(frozen=True)
class Candidate:
    """A scored subnet: its adapter parameter count, score (``score_fn``, higher is better) and generation."""
    subnet: Subnet
    params: int
    score: float
    generation: int


@dataclass
class SearchResult:
    """The outcome of a search: the best subnet, its score and parameter count, the top-k candidates, and
    ``history`` (one dict per scored candidate: generation, params, val_acc = the score, layers)."""
    best: Subnet
    best_score: float
    best_params: int
    topk: list[Candidate]
    history: list[dict] = field(default_factory=list)
    generations: int = 0

    @property
    def evaluated(self) -> int:
        return len(self.history)


STATE_KEYS = ("settings", "generation", "finished", "cache", "rng")
RECORD_KEYS = ("generation", "params", "val_acc", "layers")


def read_state(path: str | Path) -> dict:
    """``state.json`` checked for what a resume reads; a damaged file is a UserError that names it."""
    path = Path(path)
    fix = "delete the search folder to start the search over"
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e}); {fix}") from None
    if not isinstance(state, dict):
        raise UserError(f"{path}: expected a mapping with {', '.join(STATE_KEYS)}, got a {type(state).__name__}; "
                        f"{fix}")
    missing = [k for k in STATE_KEYS if k not in state]
    if missing:
        raise UserError(f"{path}: no {', '.join(missing)} in it; {fix}")
    if not isinstance(state["cache"], list) or not isinstance(state["settings"], dict) or \
            not isinstance(state["generation"], int) or not all(_good_record(r) for r in state["cache"]):
        raise UserError(f"{path}: damaged (settings, generation or cache entries of the wrong kind); {fix}")
    return state


def _good_record(r) -> bool:
    return isinstance(r, dict) and all(k in r for k in RECORD_KEYS) and isinstance(r["layers"], list)


def read_history(path: str | Path) -> list[dict]:
    """``history.jsonl``: every intact record (a torn last line left by a kill is dropped; a damaged line
    elsewhere, or a record without generation/params/val_acc/layers, is a UserError that names its line)."""
    records = read_jsonl(path)
    for i, r in enumerate(records):
        if not _good_record(r):
            lacks = ", ".join(k for k in RECORD_KEYS if k not in r) or "a layers list"
            raise UserError(f"{path}: record {i + 1} lacks {lacks}; repair or delete that line to go on")
    return records


def _layers_json(subnet: Subnet) -> list[list[str]]:
    return [list(lc) for lc in subnet.layers]


def _subnet_from_json(names: tuple[str, ...], layers: list) -> Subnet:
    return Subnet(names, tuple(LayerChoice(*lc) for lc in layers))


class EvolutionSearcher:
    """Search ``space`` for the subnet with the highest ``score_fn`` (e.g. validation top-1) in a params budget.

    ``min_params`` / ``max_params`` are absolute adapter parameter counts. ``score_fn(subnet) -> float`` is
    called at most once per distinct subnet, and never for a subnet outside the budget.

    Under torchrun every rank runs the same searcher in lockstep (same files read, same draws, and a
    ``score_fn`` that returns the same value on every rank); only rank 0 writes the files.
    """

    def __init__(self, space: SearchSpace, score_fn: Callable[[Subnet], float], *, min_params: int,
                 max_params: int, generations: int, population: int, select: int, mutation: int,
                 mutation_prob: float, crossover: int, seed: int, out_dir: str | Path | None = None,
                 model_name: str = "", progress: bool = True):
        for name, value, least in (("generations", generations, 1), ("population", population, 1),
                                   ("select", select, 1), ("mutation", mutation, 0), ("crossover", crossover, 0)):
            if int(value) != value or value < least:
                raise UserError(f"search.{name} must be an integer >= {least}, got {value!r}")
        if not 0.0 <= float(mutation_prob) <= 1.0:
            raise UserError(f"search.mutation_prob must lie in [0, 1], got {mutation_prob!r}")
        self.space = space
        self.score_fn = score_fn
        self.min_params, self.max_params = int(min_params), int(max_params)
        self.generations, self.population, self.select = int(generations), int(population), int(select)
        self.n_mutation, self.n_crossover = int(mutation), int(crossover)
        self.mutation_prob = float(mutation_prob)
        self.seed = int(seed)
        self.out_dir = Path(out_dir) if out_dir is not None else None
        self.model_name = model_name
        self.progress = progress
        # evaluated candidates in evaluation order (key -> Candidate)
        self.cache: dict[tuple[LayerChoice, ...], Candidate] = {}
        self.history: list[dict] = []
        self.rng = np.random.default_rng(self.seed)
        self.generation = 0           # next generation to run
        self._pending: dict[tuple[LayerChoice, ...], float] = {}   # scored after the last state.json

    # ----------------------------------------------------------------------------------------------- files
    def _path(self, name: str) -> Path:
        assert self.out_dir is not None
        return self.out_dir / name

    def _settings(self) -> dict:
        return {"names": list(self.space.names), "options": [[list(o) for o in opts] for opts in self.space.options],
                "min_params": self.min_params, "max_params": self.max_params, "generations": self.generations,
                "population": self.population, "select": self.select, "mutation": self.n_mutation,
                "mutation_prob": self.mutation_prob, "crossover": self.n_crossover, "seed": self.seed}

    def _record(self, cand: Candidate) -> dict:
        return {"generation": cand.generation, "params": cand.params, "val_acc": cand.score,
                "layers": _layers_json(cand.subnet)}

    def _write_state(self, population: list[Subnet], finished: bool = False) -> None:
        if self.out_dir is None or not dist.is_main():
            return
        state = {
            "version": STATE_VERSION, "settings": self._settings(), "generation": self.generation,
            "finished": finished, "evaluated": len(self.cache),
            "population": [_layers_json(s) for s in population],
            "cache": [self._record(c) for c in self.cache.values()],
            "topk": [self._record(c) for c in self.topk()],
            "rng": self.rng.bit_generator.state,
        }
        atomic_write_json(self._path("state.json"), state)
        save_clocks()  # a generation is kept work: a killed search counts its time

    def _load(self) -> bool:
        """Continue from ``state.json`` when there is one; True when the stored search is finished."""
        if self.out_dir is None or not self._path("state.json").exists():
            if self.out_dir is not None and self._path("history.jsonl").exists():
                # killed during generation 0: its scores are reused, the draws are repeated from the seed
                self._adopt_history(read_history(self._path("history.jsonl")), after=0)
            return False
        path = self._path("state.json")
        state = read_state(path)
        saved = state["settings"]
        mine = self._settings()
        # generations may change: a longer run extends a finished search, exactly as if it had run on
        changed = [k for k in mine if k != "generations" and saved.get(k) != mine[k]]
        if changed:
            raise UserError(f"{path}: the search settings changed since this state was saved ({', '.join(changed)}); "
                            "use another output_dir or delete the search folder to start over")
        names = self.space.names
        self.generation = int(state["generation"])
        if self.generation > self.generations:
            raise UserError(f"{path}: this search ran {self.generation} generations, more than search.generations="
                            f"{self.generations}; set it to {self.generation} or more, or delete {self.out_dir} "
                            "to search again")
        try:
            for r in state["cache"]:
                s = _subnet_from_json(names, r["layers"])
                self.cache[s.key] = Candidate(s, int(r["params"]), float(r["val_acc"]), int(r["generation"]))
            self.rng.bit_generator.state = state["rng"]
        except (TypeError, ValueError, KeyError) as e:
            raise UserError(f"{path}: damaged ({type(e).__name__}: {e}); delete {self.out_dir} to search again") \
                from None
        history = read_history(self._path("history.jsonl"))
        self._adopt_history(history, after=self.generation)
        if state.get("finished") and self.generation < self.generations:
            log.info("extending the finished search in %s from %d to %d generations", self.out_dir,
                     self.generation, self.generations)
            if dist.is_main():
                self._path("done").unlink(missing_ok=True)
            return False
        return bool(state.get("finished"))

    def _adopt_history(self, history: list[dict], after: int) -> None:
        """Keep the intact lines of ``history.jsonl``; scores of the generation that was cut short are
        reused instead of scored again. The file is rewritten so a torn last line does not stay in it."""
        names = self.space.names
        kept = []
        for i, r in enumerate(history):
            try:
                key = _subnet_from_json(names, r["layers"]).key
                gen, score = int(r["generation"]), float(r["val_acc"])
            except (TypeError, ValueError) as e:
                raise UserError(f"{self._path('history.jsonl')}: record {i + 1} does not fit this search space "
                                f"({e}); repair or delete that line to go on") from None
            if gen >= after:
                if key in self.cache or key in self._pending:
                    continue
                self._pending[key] = score
            kept.append(r)
        self.history = kept
        if dist.is_main():
            atomic_write_text(self._path("history.jsonl"),
                              "".join(json.dumps(r, sort_keys=True) + "\n" for r in kept))

    def _write_final(self) -> None:
        if self.out_dir is None or not dist.is_main():
            return
        best = self.topk()[0]
        best.subnet.to_yaml(self._path("subnet.yaml"), self.space.specs, model=self.model_name,
                            val_acc=best.score)
        atomic_write_yaml(self._path("topk.yaml"), {
            "model": self.model_name, "min_params": self.min_params, "max_params": self.max_params,
            "names": list(self.space.names),
            "topk": [{"rank": i + 1, "params": c.params, "val_acc": c.score, "generation": c.generation,
                      "layers": _layers_json(c.subnet)} for i, c in enumerate(self.topk())],
        })
        atomic_write_text(self._path("done"), "finished\n")

    # ---------------------------------------------------------------------------------------------- search
    def topk(self, k: int | None = None) -> list[Candidate]:
        """Best candidates so far: highest score, then fewest params, then earliest evaluated."""
        k = self.select if k is None else k
        return sorted(self.cache.values(), key=lambda c: (-c.score, c.params))[:k]

    def _evaluate(self, subnet: Subnet, generation: int) -> Candidate:
        params = self.space.params(subnet)
        if not in_budget(params, self.min_params, self.max_params):
            raise AssertionError(f"candidate with {params} params is outside the budget "
                                 f"[{self.min_params}, {self.max_params}]")
        if subnet.key in self.cache:
            raise AssertionError("candidate evaluated twice")
        reused = subnet.key in self._pending
        score = self._pending.pop(subnet.key) if reused else float(self.score_fn(subnet))
        cand = Candidate(subnet, params, score, generation)
        self.cache[subnet.key] = cand
        if not reused:
            rec = self._record(cand)
            self.history.append(rec)
            if self.out_dir is not None and dist.is_main():
                append_jsonl(self._path("history.jsonl"), rec)
        return cand

    def _draw_generation(self) -> list[Subnet]:
        """The candidates of the next generation, all new, all in budget (fewer when the space runs dry)."""
        lo, hi, rng, space = self.min_params, self.max_params, self.rng, self.space
        seen = set(self.cache)
        out: list[Subnet] = []

        def take(child: Subnet | None) -> bool:
            if child is None or child.key in seen:
                return False
            if not in_budget(space.params(child), lo, hi):
                raise AssertionError("an operator returned a subnet outside the budget")
            seen.add(child.key)
            out.append(child)
            return True

        if self.generation > 0:
            parents = [c.subnet for c in self.topk()]
            for _ in range(self.n_mutation):
                for _ in range(CHILD_TRIES):
                    p = parents[int(rng.integers(len(parents)))]
                    if take(mutate(space, p, rng, self.mutation_prob, lo, hi)):
                        break
            for _ in range(self.n_crossover):
                for _ in range(CHILD_TRIES):
                    if len(parents) >= 2:
                        i, j = rng.choice(len(parents), size=2, replace=False)
                    else:
                        i = j = 0
                    if take(crossover(space, parents[int(i)], parents[int(j)], rng, lo, hi)):
                        break
        misses = 0
        while len(out) < self.population and misses < CHILD_TRIES * max(1, self.population - len(out)):
            s = sample_in_budget(space, rng, lo, hi)
            if s is None and not self.cache and not out:
                lo_m, hi_m = space.param_range()
                raise UserError(
                    f"found no subnet with {lo} to {hi} adapter params after bounded tries "
                    f"(the space spans {lo_m} to {hi_m}); widen search.min_params_m / search.max_params_m")
            if not take(s):
                misses += 1
        return out

    def run(self) -> SearchResult:
        check_budget(self.space, self.min_params, self.max_params)
        finished = self._load()
        dist.barrier()  # every rank has read the files before rank 0 writes again
        if finished:
            log.info("search in %s is finished: returning the stored result", self.out_dir)
            if not all(self._path(f).is_file() for f in FINAL_FILES):
                log.info("search in %s: writing the final files a stopped run left out", self.out_dir)
                self._write_final()  # killed between state.json and done: make the finished stage whole
            return self._result()
        bar = None
        if self.progress:
            from glora.core.progress import progress_bar
            bar = progress_bar(total=self.generations, initial=self.generation, desc="search", unit="gen",
                               enabled=dist.is_main())
        try:
            while self.generation < self.generations:
                population = self._draw_generation()
                scores = [self._evaluate(s, self.generation).score for s in population]
                self.generation += 1
                self._write_state(population)
                if bar is not None:
                    best = self.topk(1)[0].score if self.cache else math.nan
                    mean = float(np.mean(scores)) if scores else math.nan
                    bar.set_postfix(best=f"{best:.4g}", mean=f"{mean:.4g}", n=len(population))
                    bar.update(1)
                if not population:
                    log.warning("generation %d drew no new candidate: the budget's subnets look exhausted",
                                self.generation - 1)
        finally:
            if bar is not None:
                bar.close()
        if not self.cache:
            raise UserError("the search evaluated no candidate; widen the budget or raise search.population")
        self._write_state([], finished=True)
        self._write_final()
        return self._result()

    def _result(self) -> SearchResult:
        top = self.topk()
        if not top:
            raise UserError(f"{self.out_dir}: the stored search holds no evaluated candidate")
        return SearchResult(best=top[0].subnet, best_score=top[0].score, best_params=top[0].params, topk=top,
                            history=list(self.history), generations=self.generation)
