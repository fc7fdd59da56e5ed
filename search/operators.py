"""Budget-aware operators on a SearchSpace: sample, mutate, cross over, repair. Pure numpy, no torch.

Every operator takes a ``numpy.random.Generator`` and consumes it in a fixed order, so a search is
deterministic for a seed. Nothing here loops without a bound: when a budget cannot be met after the
bounded attempts, the operator returns ``None`` and the caller decides what to do.
"""
from __future__ import annotations

import weakref

import numpy as np

from glora.core.errors import UserError
from supernet.space import TENSORS, LayerChoice, SearchSpace, Subnet

DEFAULT_TRIES = 20          # fresh draws (each followed by a repair) before giving up
REJECTION_DRAWS = 8         # plain uniform draws tried first, so a loose budget keeps the uniform law


class _Table:
    """Per (layer, tensor, option) parameter costs of a space, as arrays."""

    def __init__(self, space: SearchSpace):
        n_layers = len(space)
        width = max(len(o) for opts in space.options for o in opts) if n_layers else 1
        self.n_opts = np.array([[len(o) for o in opts] for opts in space.options], dtype=np.int64)
        self.valid = np.zeros((n_layers, len(TENSORS), width), dtype=bool)
        self.cost = np.zeros((n_layers, len(TENSORS), width), dtype=np.int64)
        self.index: list[list[dict[str, int]]] = []
        for i, opts in enumerate(space.options):
            self.index.append([{c: k for k, c in enumerate(o)} for o in opts])
            for j, (t, o) in enumerate(zip(TENSORS, opts)):
                for k, c in enumerate(o):
                    self.valid[i, j, k] = True
                    self.cost[i, j, k] = space.layer_params(i, LayerChoice(**{t: c}))


_TABLES: "weakref.WeakKeyDictionary[SearchSpace, _Table]" = weakref.WeakKeyDictionary()


def _table(space: SearchSpace) -> _Table:
    tab = _TABLES.get(space)
    if tab is None:
        tab = _TABLES[space] = _Table(space)
    return tab


def _to_idx(space: SearchSpace, subnet: Subnet) -> np.ndarray:
    tab = _table(space)
    if subnet.names != space.names:
        raise UserError("subnet layers do not match the search space (names or order differ)")
    idx = np.zeros((len(space), len(TENSORS)), dtype=np.int64)
    for i, lc in enumerate(subnet.layers):
        for j, c in enumerate(lc):
            try:
                idx[i, j] = tab.index[i][j][c]
            except KeyError:
                raise UserError(f"layer {space.names[i]}: {TENSORS[j]}={c} is not in the search space "
                                f"({', '.join(space.options[i][j])})") from None
    return idx


def _to_subnet(space: SearchSpace, idx: np.ndarray) -> Subnet:
    layers = tuple(LayerChoice(*(space.options[i][j][int(idx[i, j])] for j in range(len(TENSORS))))
                   for i in range(len(space)))
    return Subnet(space.names, layers)


def _total(tab: _Table, idx: np.ndarray) -> int:
    return int(np.take_along_axis(tab.cost, idx[..., None], axis=2).sum())


def _random_idx(tab: _Table, rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, tab.n_opts)


def in_budget(params: int, min_params: int | None, max_params: int | None) -> bool:
    return (min_params is None or params >= min_params) and (max_params is None or params <= max_params)


def check_budget(space: SearchSpace, min_params: int, max_params: int) -> None:
    """Raise UserError at once when no subnet of ``space`` can have between min and max adapter params."""
    lo, hi = space.param_range()
    if min_params > max_params or max_params < lo or min_params > hi:
        raise UserError(
            f"search budget [{_millions(min_params)}, {_millions(max_params)}]M adapter params is infeasible: "
            f"subnets of this space have {_millions(lo)}M to {_millions(hi)}M"
            + (" (min_params_m must not exceed max_params_m)" if min_params > max_params else ""))


def _millions(n: int) -> str:
    if n == 0 or n >= 1000:
        return f"{n / 1e6:.3f}" if n < 1e6 else f"{n / 1e6:.4g}"
    return f"{n / 1e6:.6f}"


def _repair_idx(tab: _Table, idx: np.ndarray, rng: np.random.Generator, lo: int, hi: int,
                max_steps: int) -> np.ndarray | None:
    """Move single choices toward cheaper (or dearer) options until the total lies in [lo, hi].

    Each step takes a random move that lands inside the budget when one exists; otherwise a random move in
    the right direction that does not jump past the budget; otherwise the move that jumps least far.
    At most ``max_steps`` steps; ``None`` when the budget was not reached.
    """
    idx = idx.copy()
    total = _total(tab, idx)
    n_tensors = idx.shape[1]
    for _ in range(max_steps):
        if lo <= total <= hi:
            return idx
        cur = np.take_along_axis(tab.cost, idx[..., None], axis=2)
        delta = tab.cost - cur
        new = total + delta
        inside = tab.valid & (new >= lo) & (new <= hi)
        if inside.any():
            moves = inside
        else:
            way = (delta < 0) if total > hi else (delta > 0)
            way &= tab.valid
            if not way.any():
                return None
            keep = way & ((new >= lo) if total > hi else (new <= hi))
            if keep.any():
                # a random move among the larger half of those that stay on this side: the distance to the
                # budget shrinks geometrically instead of one parameter at a time
                size = np.where(keep, np.abs(delta), 0)
                moves = keep & (2 * size >= size.max())
            else:   # every move jumps past the budget: take one of the smallest jumps
                gap = np.where(way, np.where(new < lo, lo - new, new - hi), np.iinfo(np.int64).max)
                moves = gap == gap.min()
        flat = np.flatnonzero(moves)
        pick = int(flat[int(rng.integers(len(flat)))])
        i, rest = divmod(pick, n_tensors * tab.cost.shape[2])
        j, k = divmod(rest, tab.cost.shape[2])
        total += int(delta[i, j, k])
        idx[i, j] = k
    return idx if lo <= total <= hi else None


def _repair_steps(tab: _Table) -> int:
    return 2 * int(tab.n_opts.size) + 64


def repair(space: SearchSpace, subnet: Subnet, rng: np.random.Generator,
           min_params: int | None = None, max_params: int | None = None) -> Subnet | None:
    """``subnet`` moved into [min_params, max_params] by single-choice changes; ``None`` if that failed."""
    tab = _table(space)
    lo = 0 if min_params is None else int(min_params)
    hi = np.iinfo(np.int64).max if max_params is None else int(max_params)
    idx = _to_idx(space, subnet)
    if lo <= _total(tab, idx) <= hi:
        return subnet
    out = _repair_idx(tab, idx, rng, lo, hi, _repair_steps(tab))
    return None if out is None else _to_subnet(space, out)


def sample_in_budget(space: SearchSpace, rng: np.random.Generator, min_params: int | None = None,
                     max_params: int | None = None, max_tries: int = DEFAULT_TRIES) -> Subnet | None:
    """A random subnet with ``space.params`` in [min_params, max_params], or ``None`` after bounded tries.

    A few plain uniform draws come first (a loose budget then keeps the uniform law); after that each draw is
    repaired toward a random point of the budget, so the subnets spread over it instead of hugging one edge.
    """
    tab = _table(space)
    lo = 0 if min_params is None else int(min_params)
    hi = np.iinfo(np.int64).max if max_params is None else int(max_params)
    for _ in range(REJECTION_DRAWS):
        idx = _random_idx(tab, rng)
        if lo <= _total(tab, idx) <= hi:
            return _to_subnet(space, idx)
    steps = _repair_steps(tab)
    r_lo, r_hi = space.param_range()
    a, b = max(lo, r_lo), min(hi, r_hi)
    for _ in range(max(1, int(max_tries))):
        idx = _random_idx(tab, rng)
        # aim first at a random tenth of the budget: a repair alone would stop just inside the edge it
        # came from, and crowd the population there
        if b > a:
            t = int(rng.integers(a, b + 1))
            w = (b - a) // 20
            out = _repair_idx(tab, idx, rng, max(a, t - w), min(b, t + w), steps)
            if out is not None:
                return _to_subnet(space, out)
        out = _repair_idx(tab, idx, rng, lo, hi, steps)
        if out is not None:
            return _to_subnet(space, out)
    return None


def mutate(space: SearchSpace, subnet: Subnet, rng: np.random.Generator, prob: float,
           min_params: int | None = None, max_params: int | None = None) -> Subnet | None:
    """Each choice of each layer redrawn (uniformly over its options) with probability ``prob``, then
    repaired into the budget when one is given. ``None`` when the repair failed."""
    tab = _table(space)
    idx = _to_idx(space, subnet)
    redraw = rng.random(idx.shape) < float(prob)
    fresh = _random_idx(tab, rng)
    idx = np.where(redraw, fresh, idx)
    return repair(space, _to_subnet(space, idx), rng, min_params, max_params)


def crossover(space: SearchSpace, a: Subnet, b: Subnet, rng: np.random.Generator,
              min_params: int | None = None, max_params: int | None = None) -> Subnet | None:
    """Each choice of each layer taken from parent ``a`` or ``b`` with even odds, then repaired into the
    budget when one is given. ``None`` when the repair failed."""
    ia, ib = _to_idx(space, a), _to_idx(space, b)
    take_a = rng.random(ia.shape) < 0.5
    return repair(space, _to_subnet(space, np.where(take_a, ia, ib)), rng, min_params, max_params)
