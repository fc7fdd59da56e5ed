"""Find the target linear layers of a model (timm, Hugging Face transformers or any ``nn.Module``) and swap
modules in place."""
from __future__ import annotations

import re
from typing import Iterable, Sequence

import torch
import torch.nn as nn

from glora.core.errors import UserError

# top-level children that are a classifier / output head in timm and Hugging Face transformers models
HEAD_ATTRS = ("head", "classifier", "score", "lm_head")


def _module_ids(m: object) -> set[int]:
    return {id(x) for x in m.modules()} if isinstance(m, nn.Module) else set()


def classifier_names(model: nn.Module) -> set[str]:
    """Qualified names of the classifier / output head's modules: never adapted, trained unless frozen.

    Found by timm's ``get_classifier()``, Hugging Face's ``get_output_embeddings()`` (an ``lm_head``, tied to
    the input embeddings or not), and else the top-level children named ``head``, ``classifier``, ``score`` or
    ``lm_head``."""
    ids: set[int] = set()
    for getter in ("get_classifier", "get_output_embeddings"):
        get = getattr(model, getter, None)
        if callable(get):
            try:
                ids |= _module_ids(get())
            except (NotImplementedError, AttributeError, TypeError):
                pass
    if not ids:
        for attr in HEAD_ATTRS:
            ids |= _module_ids(getattr(model, attr, None))
    return {name for name, m in model.named_modules() if id(m) in ids}


def _matches(name: str, pattern: str) -> bool:
    if name == pattern or name.endswith("." + pattern.lstrip(".")):
        return True
    try:
        return re.fullmatch(pattern, name) is not None
    except re.error:
        return False


def unsupported_linear(module: nn.Module) -> str | None:
    """Why GLoRA cannot adapt ``module`` in place of an ``nn.Linear`` (None when it can).

    Adaptable: an ``nn.Linear`` (or a subclass) whose weight is a plain floating-point tensor. A quantized
    linear layer (bitsandbytes ``Linear4bit``/``Linear8bitLt``, a tensor-subclass weight, an integer weight) is
    not: its weight cannot be added to."""
    if not isinstance(module, nn.Linear):
        return f"is a {type(module).__name__}, not an nn.Linear"
    w = module.weight
    quantized = (type(module).__module__.split(".")[0] == "bitsandbytes"
                 or type(w) not in (nn.Parameter, torch.Tensor) or not w.is_floating_point())
    if quantized:
        return (f"is a quantized or wrapped linear layer ({type(module).__name__}, weight {type(w).__name__} of "
                f"{w.dtype}); GLoRA adds to plain floating-point nn.Linear weights: load the model without "
                "quantization")
    return None


def _has_weight_matrix(module: nn.Module) -> bool:
    w = getattr(module, "weight", None)
    return isinstance(w, torch.Tensor) and w.ndim >= 2


def find_targets(model: nn.Module, target_modules: Sequence[str] | str) -> list[str]:
    """Names (model order) of the ``nn.Linear`` modules matched by an exact name, a ``.name`` suffix or a
    full-match regex. The classifier head (:func:`classifier_names`) is never a target.

    Raises UserError when nothing matches, when a matched ``nn.Linear`` is quantized, and when a pattern
    matches no ``nn.Linear`` but a layer with a weight matrix of another type (GPT-2's ``Conv1D``, a conv, an
    embedding): the message names that layer and its type. A pattern that matches linear layers and, besides
    them, other layers (``proj`` also names a ViT's ``patch_embed.proj`` conv) adapts the linear ones only;
    containers, norms and activations are never targets."""
    patterns = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    if not patterns:
        raise UserError("glora.target_modules is empty: give module names, suffixes or regexes (e.g. [qkv, fc1])")
    for p in patterns:
        if not isinstance(p, str) or not p:
            raise UserError(f"glora.target_modules entry {p!r} is not a non-empty string")
    heads = classifier_names(model)
    names: list[str] = []
    other: dict[str, tuple[str, str]] = {}   # pattern -> first matched non-linear layer with a weight matrix
    hit: set[str] = set()                    # patterns that matched an nn.Linear
    for n, m in model.named_modules():
        if n in heads:
            continue
        matched = [p for p in patterns if _matches(n, p)]
        if not matched:
            continue
        if isinstance(m, nn.Linear):
            why = unsupported_linear(m)
            if why is not None:
                raise UserError(f"target layer {n} {why}")
            names.append(n)
            hit.update(matched)
        elif _has_weight_matrix(m):
            for p in matched:
                other.setdefault(p, (n, type(m).__name__))
    for p, (n, kind) in other.items():
        if p not in hit:
            raise UserError(f"target layer {n} (matched by {p!r}) is a {kind}, not an nn.Linear: GLoRA adapts "
                            "nn.Linear layers only; leave it out of glora.target_modules")
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
    """Parameters of the classifier head (:func:`classifier_names`), in model order. A parameter the head
    shares with the rest of the model (an ``lm_head`` tied to the input embeddings) is left out: training
    it would change the backbone."""
    heads = classifier_names(model)
    body = {id(p) for name, m in model.named_modules() if name not in heads for p in m.parameters(recurse=False)}
    out, seen = [], set()
    for name, m in model.named_modules():
        if name in heads:
            for p in m.parameters(recurse=False):
                if id(p) not in seen and id(p) not in body:
                    seen.add(id(p))
                    out.append(p)
    return out


def head_names(model: nn.Module) -> set[str]:
    """Parameter names (as ``model.named_parameters`` gives them) of the classifier head."""
    ids = {id(p) for p in head_parameters(model)}
    return {n for n, p in model.named_parameters() if id(p) in ids}
