"""Turn a backbone (or a trained supernet) into the compact model of a subnet, and merge it back."""
from __future__ import annotations


import torch
import torch.nn as nn

from supernet.inject import freeze_all_but, head_parameters, layer_specs, replace_module  # noqa: F401
from supernet.layer import SuperGloraLinear, support_scales
from supernet.space import SearchSpace, Subnet

from .glora import GloraLinear


def apply_subnet(model: nn.Module, subnet: Subnet, space: SearchSpace | None = None,
                 parametrisation: str = "paper", a_lora_scale: float = 1.0, train_head: bool = True,
                 vector_scale: float = 1.0) -> nn.Module:
    """The compact model of ``subnet``: each of its layers in ``model`` (in place) becomes a GloraLinear holding
    only the tensors the subnet chose (``space.params(subnet)`` elements in all); every other parameter is
    frozen except the classifier head (unless ``train_head=False``). Returns ``model``.

    ``model`` may be a plain backbone (fresh adapters: ``down`` factors, vectors and scalars at zero, so the
    model computes the backbone's output) or the ``.model`` of a GloraSupernet, whose SuperGloraLinear layers
    pass on their shared weights and scales; super-layers the subnet does not name go back to their
    ``nn.Linear``. ``space``, when given, checks the subnet first (names, bias, choices). ``parametrisation``,
    ``a_lora_scale`` and ``vector_scale`` apply to fresh layers made from a plain ``nn.Linear``."""
    if space is not None:
        space.check_subnet(subnet)
    for name, choice in zip(subnet.names, subnet.layers):
        layer = model.get_submodule(name)
        if isinstance(layer, SuperGloraLinear):
            new = GloraLinear.from_super(layer, choice)
        elif isinstance(layer, nn.Linear):
            new = GloraLinear(layer, choice, scales=support_scales(parametrisation, layer.in_features,
                                                                   layer.out_features, a_lora_scale,
                                                                   vector_scale))
        else:
            raise TypeError(f"{name} is a {type(layer).__name__}, not a linear layer")
        replace_module(model, name, new)
    # any super-layer left (not in the subnet) goes back to its base layer
    for name, m in list(model.named_modules()):
        if isinstance(m, SuperGloraLinear):
            replace_module(model, name, m.base_layer)
    freeze_all_but(model, adapter_parameters(model) + (head_parameters(model) if train_head else []))
    return model


def glora_layers(model: nn.Module) -> list[tuple[str, GloraLinear]]:
    """``(name, GloraLinear)`` of every compact GLoRA layer of ``model``, in model order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, GloraLinear)]


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The GLoRA tensors of a compact model (the head not included); their total size is the subnet's
    parameter count."""
    return [p for _, m in glora_layers(model) for p in m.adapter_parameters()]


@torch.no_grad()
def merge_and_unload(model: nn.Module) -> nn.Module:
    """Fold every GloraLinear into a plain ``nn.Linear`` (in place) and freeze every parameter. The result has
    the base model's architecture, state-dict keys and parameter count: no cost at inference. Raises
    FloatingPointError when a merged weight is not finite (diverged adapters)."""
    for name, layer in glora_layers(model):
        merged = layer.merge()
        if not (torch.isfinite(merged.weight).all() and (merged.bias is None or torch.isfinite(merged.bias).all())):
            raise FloatingPointError(f"merging {name} gave non-finite weights; the adapters have diverged")
        replace_module(model, name, merged)
    for p in model.parameters():
        p.requires_grad_(False)
    return model
