"""Search space and subnet objects. Pure Python (no torch): the search works on these alone.

A *subnet* fixes one choice for each support tensor A-E of each adapted layer. Choice names are canonical:
``lora_<r>``, ``vector``, ``scalar``, ``none``; on input ``LoRA_<r>`` and ``constant`` are accepted too.
"""
from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, NamedTuple, Sequence

import numpy as np
import yaml

from glora.core.errors import UserError

from .params import count_params, layer_params, lora_rank

TENSORS = ("A", "B", "C", "D", "E")
# which kinds of choice each tensor may take
VALID_KINDS = {
    "A": ("lora", "vector", "scalar", "none"),
    "B": ("lora", "vector", "scalar", "none"),
    "C": ("lora", "vector", "none"),
    "D": ("vector", "scalar", "none"),
    "E": ("vector", "scalar", "none"),
}
_LORA_RE = re.compile(r"^lora_?(\d+)$", re.IGNORECASE)


def canonical_choice(name: object, tensor: str | None = None) -> str:
    """Canonical spelling of a choice; raises UserError for an unknown name or one the tensor cannot take."""
    s = str(name).strip()
    low = s.lower()
    if low == "constant":
        low = "scalar"
    m = _LORA_RE.match(s)
    if m:
        r = int(m.group(1))
        if r <= 0:
            raise UserError(f"bad choice {name!r}: the LoRA rank must be a positive integer")
        out, kind = f"lora_{r}", "lora"
    elif low in ("vector", "scalar", "none"):
        out, kind = low, low
    else:
        raise UserError(f"unknown choice {name!r}: valid are lora_<r> (r > 0), vector, scalar, none")
    if tensor is not None and kind not in VALID_KINDS[tensor]:
        raise UserError(f"choice {name!r} is not valid for tensor {tensor}: valid are "
                        + ", ".join("lora_<r>" if k == "lora" else k for k in VALID_KINDS[tensor]))
    return out


class LayerChoice(NamedTuple):
    """One layer's choices for the five support tensors."""
    A: str = "none"
    B: str = "none"
    C: str = "none"
    D: str = "none"
    E: str = "none"


NONE_CHOICE = LayerChoice()


@dataclass(frozen=True)
class LayerSpec:
    """Shape of an adapted linear layer."""
    name: str
    in_features: int
    out_features: int
    bias: bool = True


@dataclass(frozen=True)
class Subnet:
    """Per-layer choices, in model order. Hashable; ``key`` is what the search compares."""
    names: tuple[str, ...]
    layers: tuple[LayerChoice, ...]

    def __post_init__(self):
        if len(self.names) != len(self.layers):
            raise ValueError("names and layers differ in length")

    @property
    def key(self) -> tuple[LayerChoice, ...]:
        return self.layers

    def __len__(self) -> int:
        return len(self.layers)

    def choice(self, name: str) -> LayerChoice:
        """The A-E choices of layer ``name``."""
        return self.layers[self.names.index(name)]

    def max_rank(self) -> int:
        """The largest LoRA rank any tensor of the subnet uses (0 when none is LoRA)."""
        return max([lora_rank(c) for lc in self.layers for c in lc] + [0])

    @classmethod
    def uniform(cls, names: Sequence[str], choice: LayerChoice) -> "Subnet":
        """Every layer of ``names`` takes ``choice`` (see ``SearchSpace.uniform`` for layers without bias)."""
        return cls(tuple(names), tuple(choice for _ in names))

    def to_dict(self, specs: Sequence[LayerSpec], model: str = "", val_acc: float | None = None,
                extra: dict | None = None) -> dict:
        """The ``subnet.yaml`` structure: model, params (adapter elements), val_acc, and per layer its name,
        in/out features and A-E choices."""
        specs = list(specs)
        out = {"model": model, "params": count_params(self.layers, specs),
               "val_acc": None if val_acc is None else float(val_acc)}
        if extra:
            out.update(extra)
        out["layers"] = [
            {"name": n, "in_features": s.in_features, "out_features": s.out_features, **c._asdict()}
            for n, c, s in zip(self.names, self.layers, specs)
        ]
        return out

    def to_yaml(self, path: str | Path, specs: Sequence[LayerSpec], model: str = "",
                val_acc: float | None = None, extra: dict | None = None) -> None:
        """Write :meth:`to_dict` to ``path`` (atomically); ``specs`` are the layer shapes (``space.specs``)."""
        from glora.core.io import atomic_write_yaml
        atomic_write_yaml(path, self.to_dict(specs, model=model, val_acc=val_acc, extra=extra))

    @classmethod
    def from_dict(cls, data: dict, source: str = "subnet") -> "Subnet":
        """The subnet of a ``subnet.yaml`` structure; UserError (naming ``source``) when it is malformed."""
        if not isinstance(data, dict) or not isinstance(data.get("layers"), list) or not data["layers"]:
            raise UserError(f"{source}: expected a mapping with a non-empty 'layers' list")
        names, layers = [], []
        for i, entry in enumerate(data["layers"]):
            if not isinstance(entry, dict) or "name" not in entry:
                raise UserError(f"{source}: layers[{i}] must be a mapping with 'name' and A..E")
            try:
                choice = LayerChoice(*(canonical_choice(entry.get(t, "none"), t) for t in TENSORS))
            except UserError as e:
                raise UserError(f"{source}: layer {entry['name']}: {e}") from None
            names.append(str(entry["name"]))
            layers.append(choice)
        if len(set(names)) != len(names):
            raise UserError(f"{source}: a layer name appears twice")
        return cls(tuple(names), tuple(layers))

    @classmethod
    def from_yaml(cls, path: str | Path) -> "Subnet":
        """Read a ``subnet.yaml`` (written by :meth:`to_yaml`, the search or by hand)."""
        path = Path(path)
        if not path.is_file():
            raise UserError(f"subnet file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as e:
            raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"{path}: cannot read it as UTF-8 text ({e})") from None
        return cls.from_dict(data, source=str(path))


def _option_costs(spec, options) -> list[list[int]]:
    """Per tensor (A..E), the adapter elements each of its ``options`` adds to a layer of shape ``spec``."""
    return [[layer_params(LayerChoice(**{t: c}), spec.in_features, spec.out_features) for c in o]
            for t, o in zip(TENSORS, options)]


class SearchSpace:
    """The choices each tensor of each layer may take, and the subnets they make.

    ``choices_*`` hold kinds (``lora`` expands to one ``lora_<r>`` per rank) or explicit ``lora_<r>`` names;
    ``choices_a`` / ``choices_b`` (``choices_d`` / ``choices_e``), when given, replace ``choices_ab``
    (``choices_de``) for that tensor alone.
    Layers without a bias have C, D and E fixed to ``none`` (a merged model keeps the base architecture).
    """

    def __init__(self, specs: Sequence[LayerSpec], ranks: Iterable[int] = (4,),
                 choices_ab: Iterable[str] = ("lora", "vector", "scalar", "none"),
                 choices_c: Iterable[str] = ("lora", "vector", "none"),
                 choices_de: Iterable[str] = ("vector", "scalar", "none"),
                 choices_a: Iterable[str] | None = None, choices_b: Iterable[str] | None = None,
                 choices_d: Iterable[str] | None = None, choices_e: Iterable[str] | None = None):
        self.specs = tuple(specs)
        self.names = tuple(s.name for s in self.specs)
        self.ranks = tuple(sorted({int(r) for r in ([ranks] if isinstance(ranks, int) else ranks)}))
        if not self.ranks or any(r <= 0 for r in self.ranks):
            raise UserError(f"glora.ranks must be a non-empty list of positive integers, got {list(self.ranks)}")
        self.tensor_options = {
            "A": self._expand(choices_ab if choices_a is None else choices_a, "A"),
            "B": self._expand(choices_ab if choices_b is None else choices_b, "B"),
            "C": self._expand(choices_c, "C"),
            "D": self._expand(choices_de if choices_d is None else choices_d, "D"),
            "E": self._expand(choices_de if choices_e is None else choices_e, "E"),
        }
        # per layer, per tensor: the options of that layer
        self.options: tuple[tuple[tuple[str, ...], ...], ...] = tuple(
            tuple(self.tensor_options[t] if (s.bias or t in "AB") else ("none",) for t in TENSORS)
            for s in self.specs
        )

    def _expand(self, choices: Iterable[str], tensor: str) -> tuple[str, ...]:
        out: list[str] = []
        for c in ([choices] if isinstance(choices, str) else choices):
            if str(c).lower() == "lora":
                if "lora" not in VALID_KINDS[tensor]:
                    raise UserError(f"choice 'lora' is not valid for tensor {tensor}: valid are "
                                    + ", ".join(VALID_KINDS[tensor]))
                out.extend(f"lora_{r}" for r in self.ranks)
            else:
                out.append(canonical_choice(c, tensor))
        out = list(dict.fromkeys(out))
        if not out:
            raise UserError(f"tensor {tensor} has no choices: give at least one of " + ", ".join(VALID_KINDS[tensor]))
        return tuple(out)

    def __len__(self) -> int:
        return len(self.specs)

    @property
    def max_rank(self) -> int:
        """The largest LoRA rank of the space (the super-layers' storage size)."""
        return max([lora_rank(c) for opts in self.tensor_options.values() for c in opts] + [0])

    def params(self, subnet: Subnet) -> int:
        """Adapter elements of ``subnet`` (the classifier head not counted): the size of its compact model."""
        return count_params(subnet.layers, self.specs)

    def layer_params(self, i: int, choice: LayerChoice) -> int:
        """Adapter elements of layer ``i`` (model order) with ``choice``."""
        s = self.specs[i]
        return layer_params(choice, s.in_features, s.out_features)

    def param_range(self) -> tuple[int, int]:
        """Smallest and largest adapter parameter count of any subnet in the space."""
        lo = hi = 0
        for s, opts in zip(self.specs, self.options):
            per = _option_costs(s, opts)
            lo += sum(min(p) for p in per)
            hi += sum(max(p) for p in per)
        return lo, hi

    def contains(self, subnet: Subnet) -> bool:
        """Whether ``subnet`` names these layers in order and every choice is one of the space's options."""
        return subnet.names == self.names and all(
            all(c in o for c, o in zip(lc, opts)) for lc, opts in zip(subnet.layers, self.options))

    def random(self, rng: np.random.Generator) -> Subnet:
        """A uniform draw: each tensor of each layer picks one of its options."""
        layers = tuple(LayerChoice(*(o[int(rng.integers(len(o)))] for o in opts)) for opts in self.options)
        return Subnet(self.names, layers)

    def path(self, seed: int, step: int) -> Subnet:
        """The training path of a step: a function of (seed, step) only, the same on every data-parallel rank."""
        return self.random(np.random.default_rng([int(seed), int(step)]))

    @property
    def fair_width(self) -> int:
        """The number of paths of one fair step (:meth:`fair_paths`): the most options any tensor has."""
        return max(len(o) for opts in self.options for o in opts)

    def fair_paths(self, rng: np.random.Generator) -> list[Subnet]:
        """Paths of one step under strict fairness: ``n`` subnets (``n`` = :attr:`fair_width`) in which
        every tensor of every layer takes each of its options equally often (a tensor with fewer options than
        ``n`` takes each ``n // len`` times and ``n % len`` distinct ones once more), in a random order."""
        n = self.fair_width
        columns = []  # per (layer, tensor): its option in each of the n paths
        for opts in self.options:
            for o in opts:
                picks = list(o) * (n // len(o)) + [o[j] for j in rng.permutation(len(o))[: n % len(o)]]
                columns.append([picks[j] for j in rng.permutation(n)])
        per_layer = len(TENSORS)
        return [Subnet(self.names, tuple(LayerChoice(*(columns[i * per_layer + t][k] for t in range(per_layer)))
                                         for i in range(len(self.specs))))
                for k in range(n)]

    def largest(self) -> Subnet:
        """The path with the most adapter elements: every tensor of every layer takes its largest option
        (the first listed among equals)."""
        layers = []
        for s, opts in zip(self.specs, self.options):
            # the most elements, the earliest option among equals
            layers.append(LayerChoice(*(o[max(range(len(o)), key=lambda i, p=p: (p[i], -i))]
                                        for o, p in zip(opts, _option_costs(s, opts)))))
        return Subnet(self.names, tuple(layers))

    def uniform(self, choice: LayerChoice) -> Subnet:
        """Every layer takes ``choice``; tensors a layer cannot adapt (no bias) stay ``none``."""
        layers = tuple(LayerChoice(*(c if (s.bias or t in "AB") else "none" for t, c in zip(TENSORS, choice)))
                       for s in self.specs)
        return Subnet(self.names, layers)

    def check_subnet(self, subnet: Subnet, max_rank: int | None = None, within_space: bool = False) -> None:
        """Raise UserError when ``subnet`` does not fit these layers (names, bias, ranks, choices)."""
        unknown = [n for n in subnet.names if n not in self.names]
        if unknown:
            near = difflib.get_close_matches(unknown[0], self.names, n=3)
            raise UserError(f"subnet layer {unknown[0]!r} is not an adapted layer of this model"
                            + (f" (nearest: {', '.join(near)})" if near else ""))
        missing = [n for n in self.names if n not in subnet.names]
        if missing:
            raise UserError(f"subnet has no entry for layer {missing[0]!r} ({len(missing)} layers missing)")
        if subnet.names != self.names:
            raise UserError("subnet layers are not in model order")
        for s, lc, opts in zip(self.specs, subnet.layers, self.options):
            if not s.bias:
                for t in "CDE":
                    if getattr(lc, t) != "none":
                        raise UserError(f"layer {s.name} has no bias: {t} must be none, got {getattr(lc, t)}")
            for t, c, o in zip(TENSORS, lc, opts):
                if max_rank is not None and lora_rank(c) > max_rank:
                    raise UserError(f"layer {s.name}: {t}={c} exceeds the rank the supernet holds "
                                    f"({max_rank}); use a rank <= {max_rank} or retrain.init=scratch")
                if within_space and c not in o:
                    raise UserError(f"layer {s.name}: {t}={c} is not in the search space ({', '.join(o)})")
