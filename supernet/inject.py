"""Find target linear layers in a timm model and swap modules in place."""
from __future__ import annotations

import re
from typing import Iterable, Sequence

import torch.nn as nn

from common.errors import UserError


def classifier_names(model: nn.Module) -> set[str]:
    """Qualified names of the classifier head's modules (never adapted)."""
    heads: set[str] = set()
    get = getattr(model, "get_classifier", None)
    head = get() if callable(get) else None
    ids = set()
    if isinstance(head, nn.Module):
        ids = {id(m) for m in head.modules()}
    for name, m in model.named_modules():
        if id(m) in ids:
            heads.add(name)
    if not heads and hasattr(model, "head"):
        heads.update(n for n, _ in model.named_modules() if n == "head" or n.startswith("head."))
    return heads


def _matches(name: str, pattern: str) -> bool:
    if name == pattern or name.endswith("." + pattern.lstrip(".")):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def find_targets(model: nn.Module, target_modules: Sequence[str] | str) -> list[str]:
    """Names (model order) of the ``nn.Linear`` modules matched by an exact name, a ``.name`` suffix or a
    full-match regex. The classifier head is never a target. Raises UserError when nothing matches."""
    patterns = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    if not patterns:
        raise UserError("glora.target_modules is empty: give module names, suffixes or regexes (e.g. [qkv, fc1])")
    for p in patterns:
        if not isinstance(p, str) or not p:
            raise UserError(f"glora.target_modules entry {p!r} is not a non-empty string")
    heads = classifier_names(model)
    names = [n for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and n not in heads and any(_matches(n, p) for p in patterns)]
    if not names:
        linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in heads]
        example = sorted({n.rsplit(".", 1)[-1] for n in linear})[:8]
        raise UserError(f"target modules {patterns} not found in the model: linear layers are named like "
                        f"{', '.join(example) or '(none)'}")
    return names


def layer_specs(model: nn.Module, target_modules: Sequence[str] | str) -> list["LayerSpec"]:
    """Shapes (model order) of the linear layers ``target_modules`` matches (see ``find_targets``)."""
    from .space import LayerSpec
    specs = []
    for n in find_targets(model, target_modules):
        lin = model.get_submodule(n)
        specs.append(LayerSpec(n, lin.in_features, lin.out_features, lin.bias is not None))
    return specs


def get_submodule_parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, child = get_submodule_parent(model, name)
    setattr(parent, child, new)


def freeze_all_but(model: nn.Module, trainable: Iterable[nn.Parameter]) -> None:
    keep = {id(p) for p in trainable}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    heads = classifier_names(model)
    out, seen = [], set()
    for name, m in model.named_modules():
        if name in heads:
            for p in m.parameters(recurse=False):
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append(p)
    return out


def head_names(model: nn.Module) -> set[str]:
    """Parameter names (as ``model.named_parameters`` gives them) of the classifier head."""
    ids = {id(p) for p in head_parameters(model)}
    return {n for n, p in model.named_parameters() if id(p) in ids}
