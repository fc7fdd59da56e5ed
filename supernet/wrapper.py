"""GloraSupernet: a model (timm, Hugging Face transformers, any ``nn.Module``) with every target linear layer
replaced by a SuperGloraLinear."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

import torch
import torch.nn as nn

from .inject import freeze_all_but, head_parameters, layer_specs, replace_module
from .layer import SuperGloraLinear, support_scales
from .space import SearchSpace, Subnet


class GloraSupernet(nn.Module):
    """Wraps ``model`` (modified in place): adapters and the classifier head train, the rest is frozen.

    Args:
        model: any ``nn.Module``; each ``nn.Linear`` that ``target_modules`` names becomes a SuperGloraLinear.
        target_modules: exact module names, ``.name`` suffixes or full-match regexes (``q_proj``,
            ``attention.self.query``, ``blocks\\.[0-3]\\.mlp\\.fc1``). The classifier head (timm
            ``get_classifier()``, Hugging Face ``classifier`` / ``score`` / ``lm_head``) is never a target.
        ranks: LoRA ranks of the space (``lora_<r>`` for each r); storage holds the largest.
        choices_ab, choices_c, choices_de: what A/B, C and D/E may be (``lora`` expands to every rank);
            choices_a / choices_b (optional) give A or B a list of its own instead of choices_ab, and
            choices_d / choices_e D or E one instead of choices_de.
            A layer without bias (LLaMA's projections) keeps C, D and E at ``none``.
        parametrisation, a_lora_scale, vector_scale: constant multipliers of the stored tensors
            (:func:`supernet.layer.support_scales`); ``paper`` uses every tensor as stored.
        train_head: also train the classifier head (a fresh head for a new task); False freezes it (a
            pretrained ``lm_head``). A head tied to the input embeddings is never trained.

    ``space`` (a :class:`SearchSpace`) lists the adapted layers in model order (``layer_names``).
    Verbs: ``set_subnet`` fixes a path, ``sample_path(seed, step)`` draws and sets the training path of a step,
    ``save_adapters`` / ``load_adapters`` write and read only what training changes (a safetensors file).
    Calling the supernet calls ``model`` with the same arguments under the current path.
    """

    def __init__(self, model: nn.Module, target_modules: Sequence[str] | str = ("qkv", "proj", "fc1", "fc2"),
                 ranks: Iterable[int] = (4,), choices_ab: Iterable[str] = ("lora", "vector", "scalar", "none"),
                 choices_c: Iterable[str] = ("lora", "vector", "none"),
                 choices_de: Iterable[str] = ("vector", "scalar", "none"), parametrisation: str = "paper",
                 a_lora_scale: float = 1.0, train_head: bool = True, choices_a: Iterable[str] | None = None,
                 choices_b: Iterable[str] | None = None, vector_scale: float = 1.0,
                 choices_d: Iterable[str] | None = None, choices_e: Iterable[str] | None = None):
        super().__init__()
        self.model = model
        specs = layer_specs(model, target_modules)
        names = [sp.name for sp in specs]
        self.space = SearchSpace(specs, ranks=ranks, choices_ab=choices_ab, choices_c=choices_c,
                                 choices_de=choices_de, choices_a=choices_a, choices_b=choices_b,
                                 choices_d=choices_d, choices_e=choices_e)
        max_rank = self.space.max_rank
        self.layer_names: tuple[str, ...] = tuple(names)
        for n in names:
            lin = model.get_submodule(n)
            scales = support_scales(parametrisation, lin.in_features, lin.out_features, a_lora_scale,
                                    vector_scale)
            replace_module(model, n, SuperGloraLinear(lin, max_rank=max_rank, scales=scales,
                                                      own_b_vector=parametrisation == "scaled"))
        freeze_all_but(model, list(self.adapter_parameters()) + (head_parameters(model) if train_head else []))

    # ---- structure -----------------------------------------------------------------------------------
    def super_layers(self) -> list[tuple[str, SuperGloraLinear]]:
        """``(name, SuperGloraLinear)`` of every adapted layer, in model order."""
        return [(n, self.model.get_submodule(n)) for n in self.layer_names]

    def adapter_parameters(self) -> Iterable[nn.Parameter]:
        """The shared A-E storage of every super-layer (the head not included)."""
        for _, layer in self.super_layers():
            for pname, p in layer.named_parameters(recurse=False):
                yield p

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What an optimizer should update: adapters, and the head unless ``train_head=False``."""
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

    def forward(self, *args, **kwargs):
        """``model(*args, **kwargs)`` under the current path (e.g. images ``(N, 3, H, W)`` -> logits ``(N, K)``,
        or a Hugging Face model's keyword arguments -> its output)."""
        return self.model(*args, **kwargs)

    # ---- state ---------------------------------------------------------------------------------------
    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Adapters and the classifier head: everything supernet training changes (model-relative keys)."""
        keep = {id(p) for p in self.trainable_parameters()}
        return {k: v.detach().clone() for k, v in self.model.named_parameters() if id(v) in keep}

    def load_trainable_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy ``state`` (from :meth:`trainable_state_dict`) into the model; ValueError when keys or shapes
        differ (another model, target list or rank)."""
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

    def save_adapters(self, path: str | Path, metadata: dict[str, str] | None = None) -> None:
        """Write :meth:`trainable_state_dict` (adapters and trained head) to a safetensors file, atomically."""
        from glora.core.io import atomic_save_safetensors
        atomic_save_safetensors(path, self.trainable_state_dict(), metadata=metadata)

    def load_adapters(self, path: str | Path) -> "GloraSupernet":
        """Read a file written by :meth:`save_adapters` into this supernet (same model, targets and ranks).
        Raises UserError when the file is missing or does not fit."""
        from glora.core.errors import UserError
        from glora.core.io import load_safetensors
        path = Path(path)
        if not path.is_file():
            raise UserError(f"adapter file not found: {path}")
        try:
            self.load_trainable_state_dict(load_safetensors(path))
        except ValueError as e:
            raise UserError(f"{path} does not fit this model/search space: {e}") from None
        return self
