"""GloraSupernet: a timm model with every target linear layer replaced by a SuperGloraLinear."""
from __future__ import annotations

from typing import Iterable, Sequence

import torch
import torch.nn as nn

from .inject import freeze_all_but, head_parameters, layer_specs, replace_module
from .layer import SuperGloraLinear, support_scales
from .space import SearchSpace, Subnet


class GloraSupernet(nn.Module):
    """Wraps ``model`` (modified in place): adapters and the classifier head train, the rest is frozen.

    ``parametrisation`` / ``a_lora_scale``: constant multipliers of the stored tensors
    (:func:`supernet.layer.support_scales`); ``paper`` uses every tensor as stored.

    Verbs: ``set_subnet`` fixes a path, ``sample_path(seed, step)`` draws and sets the training path of a step,
    ``adapter_state_dict`` / ``load_adapter_state_dict`` save and restore only what training changes.
    """

    def __init__(self, model: nn.Module, target_modules: Sequence[str] | str = ("qkv", "proj", "fc1", "fc2"),
                 ranks: Iterable[int] = (4,), choices_ab: Iterable[str] = ("lora", "vector", "scalar", "none"),
                 choices_c: Iterable[str] = ("lora", "vector", "none"),
                 choices_de: Iterable[str] = ("vector", "scalar", "none"), parametrisation: str = "paper",
                 a_lora_scale: float = 1.0):
        super().__init__()
        self.model = model
        specs = layer_specs(model, target_modules)
        names = [sp.name for sp in specs]
        self.space = SearchSpace(specs, ranks=ranks, choices_ab=choices_ab, choices_c=choices_c,
                                 choices_de=choices_de)
        max_rank = self.space.max_rank
        self.layer_names: tuple[str, ...] = tuple(names)
        for n in names:
            lin = model.get_submodule(n)
            scales = support_scales(parametrisation, lin.in_features, lin.out_features, a_lora_scale)
            replace_module(model, n, SuperGloraLinear(lin, max_rank=max_rank, scales=scales,
                                                      own_b_vector=parametrisation == "scaled"))
        freeze_all_but(model, list(self.adapter_parameters()) + head_parameters(model))

    # ---- structure -----------------------------------------------------------------------------------
    def super_layers(self) -> list[tuple[str, SuperGloraLinear]]:
        return [(n, self.model.get_submodule(n)) for n in self.layer_names]

    def adapter_parameters(self) -> Iterable[nn.Parameter]:
        for _, layer in self.super_layers():
            for pname, p in layer.named_parameters(recurse=False):
                yield p

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    # ---- paths ---------------------------------------------------------------------------------------
    def set_subnet(self, subnet: Subnet, freeze: bool = False) -> None:
        """Fix every layer's choice. ``freeze=True`` also folds each layer once for fast repeated evaluation."""
        if subnet.names != self.layer_names:
            self.space.check_subnet(subnet)
        for (_, layer), choice in zip(self.super_layers(), subnet.layers):
            layer.set_choice(choice)
            if freeze:
                layer.freeze_merged()

    def sample_path(self, seed: int, step: int) -> Subnet:
        """Draw the path of training step ``step`` (a function of seed and step only) and set it."""
        subnet = self.space.path(seed, step)
        self.set_subnet(subnet)
        return subnet

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)

    # ---- state ---------------------------------------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Adapters and the classifier head: everything supernet training changes (model-relative keys)."""
        keep = {id(p) for p in self.trainable_parameters()}
        return {k: v.detach().clone() for k, v in self.model.named_parameters() if id(v) in keep}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        own = dict(self.model.named_parameters())
        expected = set(self.trainable_state_dict().keys())
        missing, unexpected = expected - set(state), set(state) - expected
        if missing or unexpected:
            raise ValueError(f"adapter state does not fit: missing {sorted(missing)[:3]}, "
                             f"unexpected {sorted(unexpected)[:3]}")
        with torch.no_grad():
            for k, v in state.items():
                if own[k].shape != v.shape:
                    raise ValueError(f"adapter state {k}: shape {tuple(v.shape)} != {tuple(own[k].shape)}")
                own[k].copy_(v)
