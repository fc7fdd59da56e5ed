"""The compact GLoRA layer: fixed choices, only the tensors the subnet chose, and its merge."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn

from supernet.layer import GloraAlgebra, SuperGloraLinear, init_up_
from supernet.ops import Lora, Support
from supernet.params import lora_rank
from supernet.space import TENSORS, LayerChoice


class GloraLinear(GloraAlgebra, nn.Module):
    """A frozen ``nn.Linear`` with the GLoRA support tensors of one fixed choice.

    Parameters (only those the choice uses): ``<T>_down``/``<T>_up`` for ``lora_<r>`` (A/B:
    ``d_out x r``, ``r x d_in``; C: ``d_in x r``, ``r x 1``), ``<T>`` for ``vector`` (``d_out``; C: ``d_in``)
    or ``scalar`` (1 element). Their total size is the subnet's parameter count for this layer.
    """

    def __init__(self, base_layer: nn.Linear, choice: LayerChoice, scales: dict | None = None):
        super().__init__()
        self.scales = dict(scales or {})
        self.base_layer = base_layer
        base_layer.requires_grad_(False)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.choice = LayerChoice(*choice)
        if base_layer.bias is None and any(c != "none" for c in self.choice[2:]):
            raise ValueError("a layer without bias keeps C, D and E at none")
        w = base_layer.weight
        kw = dict(device=w.device, dtype=w.dtype)
        d_out, d_in = self.out_features, self.in_features
        for t, c in zip(TENSORS, self.choice):
            if c == "none":
                continue
            if c == "scalar":
                setattr(self, t, nn.Parameter(torch.zeros(1, **kw)))
            elif c == "vector":
                setattr(self, t, nn.Parameter(torch.zeros(d_in if t == "C" else d_out, **kw)))
            else:
                r = lora_rank(c)
                rows, cols = (d_in, 1) if t == "C" else (d_out, d_in)
                setattr(self, f"{t}_down", nn.Parameter(torch.zeros(rows, r, **kw)))
                up = nn.Parameter(torch.empty(r, cols, **kw))
                init_up_(up)
                setattr(self, f"{t}_up", up)

    @classmethod
    def from_super(cls, layer: SuperGloraLinear, choice: LayerChoice) -> "GloraLinear":
        """The compact layer of ``choice``, initialised from the super-layer's shared storage."""
        new = cls(layer.base_layer, choice, scales=layer.scales)
        prev = layer.choice
        layer.set_choice(choice)
        try:
            with torch.no_grad():
                for t, sup in layer.raw_supports().items():
                    if isinstance(sup, Lora):
                        getattr(new, f"{t}_down").copy_(sup.down)
                        getattr(new, f"{t}_up").copy_(sup.up)
                    elif sup is not None:
                        getattr(new, t).copy_(sup.reshape(getattr(new, t).shape))
        finally:
            layer.set_choice(prev)
        return new

    def supports(self) -> dict[str, Support]:
        out: dict[str, Support] = {}
        for t, c in zip(TENSORS, self.choice):
            if c == "none":
                out[t] = None
            elif c.startswith("lora_"):
                out[t] = Lora(getattr(self, f"{t}_down"), getattr(self, f"{t}_up"))
            else:
                out[t] = getattr(self, t)
        return self.apply_scales(out, self.choice)

    def adapter_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters(recurse=False)]

    def merge(self) -> nn.Linear:
        """A plain ``nn.Linear`` computing what this layer computes."""
        with torch.no_grad():
            w, b = self.merged_weight(), self.merged_bias()
        lin = nn.Linear(self.in_features, self.out_features, bias=b is not None, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            lin.weight.copy_(w)
            if b is not None:
                lin.bias.copy_(b)
        return lin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapted_forward(x)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, choice={tuple(self.choice)}"
