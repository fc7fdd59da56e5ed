"""GLoRA algebra shared by the super-layer (supernet) and the compact layer (retrain).

A support tensor is passed as ``None`` (choice ``none``), a :class:`Lora` pair (``down @ up``), or a plain
tensor that broadcasts: a vector (``d_out`` for A/B/D/E, ``d_in`` for C) or a one-element scalar.

    W = W0 + W0 * A + B
    b = b0 + b0 * D + E + W0 @ C

The forward pass never builds ``W`` unless A is a LoRA product: a vector or scalar A scales the rows of
``W0``, which is the same as scaling the output of ``x @ W0.T``; B as LoRA is two thin matmuls; B as a
vector or scalar adds ``sum(x) * B``; C, D, E only change the bias.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Union

import torch
import torch.nn.functional as F


class Lora(NamedTuple):
    """A low-rank factor pair standing for ``down @ up``."""
    down: torch.Tensor  # (rows, r)
    up: torch.Tensor    # (r, cols)

    def dense(self) -> torch.Tensor:
        return self.down @ self.up


Support = Optional[Union[Lora, torch.Tensor]]


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """A vector (d_out,) or scalar (1,) as a (d_out or 1, 1) column that broadcasts over W's columns."""
    return t.reshape(-1, 1)


def merged_weight(weight: torch.Tensor, A: Support, B: Support) -> torch.Tensor:
    """``W0 + W0 * A + B`` as a dense matrix."""
    w = weight
    if A is not None:
        a = A.dense() if isinstance(A, Lora) else _as_rows(A)
        w = w + w * a
    if B is not None:
        b = B.dense() if isinstance(B, Lora) else _as_rows(B)
        w = w + b
    return w


def merged_bias(weight: torch.Tensor, bias: Optional[torch.Tensor], C: Support, D: Support,
                E: Support) -> Optional[torch.Tensor]:
    """``b0 + b0 * D + E + W0 @ C``; ``None`` when the layer has no bias and C, D, E are all ``none``."""
    if bias is None:
        if C is not None or D is not None or E is not None:
            raise ValueError("a layer without bias keeps C, D and E at none")
        return None
    b = bias
    if D is not None:
        b = b + bias * D
    if E is not None:
        b = b + E
    if C is not None:
        c = C.dense().reshape(-1) if isinstance(C, Lora) else C.reshape(-1)
        b = b + weight @ c.to(weight.dtype)
    return b


def glora_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], A: Support, B: Support,
                 C: Support, D: Support, E: Support) -> torch.Tensor:
    """``x @ W.T + b`` for the GLoRA-adapted weight and bias, without building ``W`` unless A is LoRA."""
    b = merged_bias(weight, bias, C, D, E)
    if isinstance(A, Lora):
        out = F.linear(x, weight + weight * A.dense(), b)
    elif A is None:
        out = F.linear(x, weight, b)
    else:
        out = F.linear(x, weight)
        out = out + out * A.to(out.dtype)
        if b is not None:
            out = out + b.to(out.dtype)
    if isinstance(B, Lora):
        out = out + F.linear(F.linear(x, B.up), B.down)
    elif B is not None:
        out = out + x.sum(dim=-1, keepdim=True) * B.to(out.dtype)
    return out
