"""The GLoRA super-layer: a frozen ``nn.Linear`` with shared-storage support tensors A-E.

Storage (DESIGN.md §1): A and B each own ``down (d_out x r_max)`` and ``up (r_max x d_in)``; ``lora_r``
uses the first r columns / rows, ``vector`` is ``down[:, 0]`` and ``scalar`` is ``down[0, 0]``. C owns
``down (d_in x r_max)`` and ``up (r_max x 1)``; ``vector`` is ``down[:, 0]``. D and E own one ``d_out``
vector whose first element is the ``scalar``. ``down``, D and E start at zero, so the untrained supernet
computes exactly the base layer for every path.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .ops import Lora, Support, glora_linear, merged_bias, merged_weight
from .params import lora_rank
from .space import NONE_CHOICE, TENSORS, LayerChoice


def init_up_(t: torch.Tensor) -> None:
    """Random init of an ``up`` factor (LoRA practice: Kaiming-uniform with a = sqrt(5))."""
    nn.init.kaiming_uniform_(t, a=math.sqrt(5))


PARAMETRISATIONS = ("paper", "scaled")


def support_scales(parametrisation: str, in_features: int, out_features: int,
                   a_lora_scale: float = 1.0, vector_scale: float = 1.0) -> dict[tuple[str, str], float]:
    """Multipliers applied to the stored support tensors, by (tensor, kind of choice).

    ``paper``: none (every tensor is used as stored). ``scaled``: B as ``vector``/``scalar`` is divided by
    ``d_in``, so it adds ``mean(x) * B`` instead of ``sum(x) * B`` and moves the output as fast as the other
    choices under one learning rate; a LoRA A is multiplied by ``a_lora_scale``; a ``vector``/``scalar`` A, C,
    D or E by ``vector_scale`` (they start at zero, so under AdamW this multiplies their learning rate). The
    function class and the merge are the same: a multiplier is folded into ``W`` and ``b`` like the tensor it
    scales.
    """
    if parametrisation not in PARAMETRISATIONS:
        raise ValueError(f"unknown parametrisation {parametrisation!r}: valid are {', '.join(PARAMETRISATIONS)}")
    if parametrisation == "paper":
        if a_lora_scale != 1.0 or vector_scale != 1.0:
            raise ValueError(f"a_lora_scale={a_lora_scale} and vector_scale={vector_scale} need "
                             f"parametrisation='scaled' (the 'paper' one uses every tensor as stored)")
        return {}
    out = {("B", "vector"): 1.0 / in_features, ("B", "scalar"): 1.0 / in_features}
    if a_lora_scale != 1.0:
        out[("A", "lora")] = float(a_lora_scale)
    if vector_scale != 1.0:
        out.update({(t, k): float(vector_scale) for t in "ACDE" for k in ("vector", "scalar")})
    return out


def _scaled(sup: Support, scale: float) -> Support:
    if sup is None or scale == 1.0:
        return sup
    if isinstance(sup, Lora):
        return Lora(sup.down * scale, sup.up)
    return sup * scale


def _kind(choice: str) -> str:
    return "lora" if choice.startswith("lora_") else choice


class GloraAlgebra:
    """What a GLoRA layer computes from its ``supports()`` (A-E) and its frozen ``base_layer``.

    ``scales`` (see :func:`support_scales`) multiplies a stored tensor by a constant per (tensor, kind)."""

    base_layer: nn.Linear
    scales: dict[tuple[str, str], float] = {}

    def apply_scales(self, sup: dict[str, Support], choice) -> dict[str, Support]:
        if not self.scales:
            return sup
        return {t: _scaled(s, self.scales.get((t, _kind(c)), 1.0)) for (t, s), c in zip(sup.items(), choice)}

    def supports(self) -> dict[str, Support]:
        raise NotImplementedError

    def merged_weight(self) -> torch.Tensor:
        s = self.supports()
        return merged_weight(self.base_layer.weight, s["A"], s["B"])

    def merged_bias(self) -> Optional[torch.Tensor]:
        s = self.supports()
        return merged_bias(self.base_layer.weight, self.base_layer.bias, s["C"], s["D"], s["E"])

    def adapted_forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.supports()
        return glora_linear(x, self.base_layer.weight, self.base_layer.bias, s["A"], s["B"], s["C"], s["D"], s["E"])


class SuperGloraLinear(GloraAlgebra, nn.Module):
    """A frozen linear layer plus every GLoRA choice at once; ``set_choice`` picks the active path.

    Args:
        base_layer: the ``nn.Linear`` to adapt; its weight and bias are frozen.
        max_rank: largest LoRA rank any tensor may take (the shared storage size).
        scales: constant multipliers of the stored tensors (:func:`support_scales`).
        own_b_vector: B as ``vector``/``scalar`` gets its own ``d_out`` vector ``B_vec`` (first element = scalar)
            instead of ``B_down[:, 0]``. With the ``scaled`` parametrisation the stored B vector is ``d_in`` times
            the value it stands for, which would swamp a LoRA B sharing that column.
    """

    def __init__(self, base_layer: nn.Linear, max_rank: int = 4, scales: dict | None = None,
                 own_b_vector: bool = False):
        super().__init__()
        self.scales = dict(scales or {})
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"SuperGloraLinear adapts nn.Linear, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        base_layer.requires_grad_(False)
        d_out, d_in = base_layer.out_features, base_layer.in_features
        self.in_features, self.out_features = d_in, d_out
        self.has_bias = base_layer.bias is not None
        r = max(int(max_rank), 1)
        self.max_rank = r
        w = base_layer.weight
        kw = dict(device=w.device, dtype=w.dtype)
        self.A_down = nn.Parameter(torch.zeros(d_out, r, **kw))
        self.A_up = nn.Parameter(torch.empty(r, d_in, **kw))
        self.B_down = nn.Parameter(torch.zeros(d_out, r, **kw))
        self.B_up = nn.Parameter(torch.empty(r, d_in, **kw))
        if own_b_vector:
            self.B_vec = nn.Parameter(torch.zeros(d_out, **kw))
        if self.has_bias:
            self.C_down = nn.Parameter(torch.zeros(d_in, r, **kw))
            self.C_up = nn.Parameter(torch.empty(r, 1, **kw))
            self.D = nn.Parameter(torch.zeros(d_out, **kw))
            self.E = nn.Parameter(torch.zeros(d_out, **kw))
        self.reset_parameters()
        self.choice: LayerChoice = NONE_CHOICE
        self._merged: Optional[tuple[torch.Tensor, Optional[torch.Tensor]]] = None
        self._merged_cast: Optional[tuple[torch.Tensor, Optional[torch.Tensor]]] = None

    def reset_parameters(self) -> None:
        for name in ("A_down", "B_down", "B_vec", "C_down", "D", "E"):
            if hasattr(self, name):
                nn.init.zeros_(getattr(self, name))
        for name in ("A_up", "B_up", "C_up"):
            if hasattr(self, name):
                init_up_(getattr(self, name))

    # ---- path selection -------------------------------------------------------------------------------
    def set_choice(self, choice: LayerChoice) -> None:
        for t, c in zip(TENSORS, choice):
            r = lora_rank(c)
            if r > self.max_rank:
                raise ValueError(f"{t}={c} exceeds the stored rank {self.max_rank}")
            if t in "CDE" and not self.has_bias and c != "none":
                raise ValueError(f"a layer without bias keeps {t} at none, got {c}")
        self.choice = LayerChoice(*choice)
        self._merged = self._merged_cast = None

    def freeze_merged(self) -> None:
        """Fold the current path into a dense weight and bias once, for repeated evaluation of one subnet.

        The cache is dropped by the next ``set_choice``, by ``train()`` and whenever gradients are enabled.
        """
        with torch.no_grad():
            self._merged = (self.merged_weight(), self.merged_bias())
        self._merged_cast = None

    def _frozen_for(self, x: torch.Tensor) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """The folded weight and bias; under autocast cast once per frozen path, not once per batch."""
        w, b = self._merged
        dev = x.device.type
        if torch.is_autocast_enabled(dev):
            dt = torch.get_autocast_dtype(dev)
            if w.dtype != dt and w.is_floating_point():
                if self._merged_cast is None or self._merged_cast[0].dtype != dt:
                    self._merged_cast = (w.to(dt), None if b is None else b.to(dt))
                return self._merged_cast
        return w, b

    def train(self, mode: bool = True):
        if mode:
            self._merged = self._merged_cast = None
        return super().train(mode)

    # ---- the active support tensors -----------------------------------------------------------------
    def _ab(self, tensor: str) -> Support:
        c = getattr(self.choice, tensor)
        down, up = getattr(self, f"{tensor}_down"), getattr(self, f"{tensor}_up")
        if c == "none":
            return None
        if c in ("vector", "scalar") and tensor == "B" and hasattr(self, "B_vec"):
            return self.B_vec if c == "vector" else self.B_vec[:1]
        if c == "vector":
            return down[:, 0]
        if c == "scalar":
            return down[0, :1]
        r = lora_rank(c)
        return Lora(down[:, :r], up[:r, :])

    def _c(self) -> Support:
        c = self.choice.C
        if c == "none":
            return None
        if c == "vector":
            return self.C_down[:, 0]
        r = lora_rank(c)
        return Lora(self.C_down[:, :r], self.C_up[:r, :])

    def _de(self, tensor: str) -> Support:
        c = getattr(self.choice, tensor)
        if c == "none":
            return None
        v = getattr(self, tensor)
        return v if c == "vector" else v[:1]

    def raw_supports(self) -> dict[str, Support]:
        """The active path's A-E as stored: views of the shared storage, before ``scales``."""
        return {"A": self._ab("A"), "B": self._ab("B"), "C": self._c(), "D": self._de("D"), "E": self._de("E")}

    def supports(self) -> dict[str, Support]:
        """The active path's A-E as the algebra uses them (``scales`` applied)."""
        return self.apply_scales(self.raw_supports(), self.choice)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._merged is not None and not torch.is_grad_enabled() and not self.training:
            return F.linear(x, *self._frozen_for(x))
        return self.adapted_forward(x)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.has_bias}, "
                f"max_rank={self.max_rank}, choice={tuple(self.choice)}")
