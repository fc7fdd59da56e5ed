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
    """``W0 + W0 * A + B`` as a dense matrix (``weight`` itself when A and B are ``none``).

    Fused: ``addcmul`` builds ``W0 + W0 * A`` in one pass and a LoRA B is accumulated by ``addmm`` without a
    dense ``down @ up`` temporary."""
    w = weight
    if A is not None:
        a = A.dense() if isinstance(A, Lora) else _as_rows(A).to(w.dtype)
        w = torch.addcmul(w, w, a)
    if isinstance(B, Lora):
        w = torch.addmm(w, B.down, B.up)
    elif B is not None:
        w = w + _as_rows(B).to(w.dtype)
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
        b = torch.addcmul(bias, bias, D.to(bias.dtype))
    if E is not None:
        b = b + E.to(b.dtype)
    if C is not None:
        c = C.dense().reshape(-1) if isinstance(C, Lora) else C.reshape(-1)
        b = torch.addmv(b.to(weight.dtype), weight, c.to(weight.dtype))
    return b


def glora_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], A: Support, B: Support,
                 C: Support, D: Support, E: Support) -> torch.Tensor:
    """``x @ W.T + b`` for the GLoRA-adapted weight and bias, without building ``W`` unless A is LoRA.

    A as LoRA needs ``W0 * A`` and a weight-sized gradient anyway, so a LoRA B is then folded into that same
    weight (cheaper than B's thin matmuls over every token). Otherwise one frozen matmul, the A scaling and the bias
    in one ``addcmul``, and B as two thin matmuls accumulated by ``addmm`` or as ``sum(x) * B``."""
    b = merged_bias(weight, bias, C, D, E)
    if isinstance(A, Lora):
        out = F.linear(x, merged_weight(weight, A, B if isinstance(B, Lora) else None), b)
        if B is None or isinstance(B, Lora):
            return out
    elif A is None:
        out = F.linear(x, weight, b)
    else:
        out = F.linear(x, weight)
        # the scaling is done in fp32 (at least) and its result kept so: under bf16 autocast, 1 + A rounded to bf16
        # would drop every |A| below ~0.004, while the folded weight of the search path keeps it
        dt = torch.promote_types(out.dtype, torch.float32)
        scale = A.to(dt) + 1
        out = out.to(dt) * scale if b is None else torch.addcmul(b.to(dt), out.to(dt), scale)
    if isinstance(B, Lora):
        h = F.linear(x, B.up)
        if h.dtype != out.dtype:  # autocast: an addmm would round the fp32 sum above back to bf16
            out = out + F.linear(h, B.down)
        else:
            shape = out.shape
            out = torch.addmm(out.reshape(-1, shape[-1]), h.reshape(-1, h.shape[-1]), B.down.t().to(out.dtype))
            out = out.reshape(shape)
    elif B is not None:
        out = torch.addcmul(out, x.sum(dim=-1, keepdim=True).to(out.dtype), B.to(out.dtype))
    return out
