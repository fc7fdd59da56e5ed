"""Parameter count of a GLoRA choice: a pure function of layer shapes (DESIGN.md §1 table)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

if TYPE_CHECKING:
    from .space import LayerChoice, LayerSpec


def lora_rank(choice: str) -> int:
    """Rank of a canonical ``lora_<r>`` choice, 0 for any other choice."""
    return int(choice[5:]) if choice.startswith("lora_") else 0


def tensor_params(tensor: str, choice: str, in_features: int, out_features: int) -> int:
    """Adapter elements used by one support tensor (A-E) with a canonical choice."""
    if choice == "none":
        return 0
    if choice == "scalar":
        return 1
    if tensor in ("A", "B"):
        if choice == "vector":
            return out_features
        return lora_rank(choice) * (out_features + in_features)
    if tensor == "C":
        if choice == "vector":
            return in_features
        return lora_rank(choice) * (in_features + 1)
    # D, E
    return out_features


def layer_params(choice: "LayerChoice", in_features: int, out_features: int) -> int:
    """Adapter elements used by one layer's five choices."""
    return sum(tensor_params(t, c, in_features, out_features) for t, c in zip("ABCDE", choice))


def count_params(layers: Iterable["LayerChoice"], specs: Iterable["LayerSpec"]) -> int:
    """Adapter elements of a whole subnet: the classifier head is not included."""
    return sum(layer_params(c, s.in_features, s.out_features) for c, s in zip(layers, specs, strict=True))
