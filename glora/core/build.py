"""Build what every stage needs from a resolved config: the task data and the backbone.

``model.source`` picks the kind: ``timm`` (image models, VTAB-1k image lists) or ``hf`` (Hugging Face
transformers sequence classifiers, text tasks of :mod:`glora.data.text`)."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn as nn

from .engine import InMemorySplit
from .errors import UserError

_logger = logging.getLogger(__name__)
SOURCES = ("timm", "hf")


def model_source(cfg) -> str:
    """``model.source`` checked: ``timm`` or ``hf``."""
    source = cfg.model.get("source", "timm")
    if source not in SOURCES:
        raise UserError(f"config key model.source: {source!r} is not one of {', '.join(SOURCES)}")
    return source


def tokenizer_source(cfg) -> str:
    """Where an ``hf`` model's tokenizer is read from: ``model.checkpoint``, else ``model.name``."""
    from glora.data.hf import weights_source
    return weights_source(cfg.model.name, cfg.model.checkpoint)


def prepare_data(cfg) -> int:
    """Make sure the task folder exists (generating an offline task on first use); return the class count."""
    if model_source(cfg) == "hf":
        from glora.data.text import text_num_classes
        return text_num_classes(cfg.data.root, cfg.data.task)
    from glora.data.offline import ensure_task
    from glora.data.vtab import num_classes

    from . import dist
    with dist.main_first():  # under torchrun the first rank of a node writes a missing task, the others read it
        ensure_task(cfg.data.root, cfg.data.task, prepare_missing=cfg.data.prepare_missing,
                    seed=cfg.data.seed)
    return num_classes(cfg.data.root, cfg.data.task)


def build_backbone(cfg, num_classes: int) -> nn.Module:
    """The model of ``cfg`` with a ``num_classes`` head, weights loaded: ``model(x) -> logits (N, K)``."""
    from . import dist
    m = cfg.model
    with dist.main_first():  # under torchrun the first rank of a node fills the weight caches first
        if model_source(cfg) == "hf":
            from glora.data.hf import create_hf_classifier
            return create_hf_classifier(m.name, num_classes, pretrained=m.pretrained, checkpoint=m.checkpoint,
                                        kwargs=dict(m.kwargs), num_blocks=m.num_blocks)
        from glora.data.backbones import create_backbone
        return create_backbone(m.name, num_classes=num_classes, pretrained=m.pretrained, checkpoint=m.checkpoint,
                               kwargs=dict(m.kwargs), num_blocks=m.num_blocks)


def input_size(cfg, model: nn.Module) -> int:
    """``data.image_size``, else the size the model was built for."""
    if cfg.data.image_size:
        return int(cfg.data.image_size)
    pe = getattr(model, "patch_embed", None)
    size = getattr(pe, "img_size", None)
    if size:
        return int(size[0] if isinstance(size, (tuple, list)) else size)
    import timm.data
    return int(timm.data.resolve_model_data_config(model)["input_size"][-1])


def reference_model(cfg, num_classes: int) -> nn.Module:
    """The untouched architecture the merged weights must load into (random weights: only keys and shapes)."""
    m = cfg.model
    if model_source(cfg) == "hf":
        from glora.data.hf import reference_hf_classifier
        return reference_hf_classifier(m.name, num_classes, checkpoint=m.checkpoint, kwargs=dict(m.kwargs))
    from glora.data.backbones import create_backbone
    return create_backbone(m.name, num_classes=num_classes, kwargs=dict(m.kwargs), num_blocks=m.num_blocks)


def _text_split(cfg, model: nn.Module, split: str, in_memory: bool):
    from glora.data.hf import load_tokenizer, max_positions
    from glora.data.text import load_text_split
    length = cfg.data.get("max_length", 128)
    limit = max_positions(model) if model is not None else 0
    if limit and isinstance(length, int) and length > limit:
        raise UserError(f"config key data.max_length: {length} tokens exceed the {limit} positions of the model")
    from . import dist
    with dist.main_first():  # the tokenizer may be downloaded once per node
        tokenizer = load_tokenizer(tokenizer_source(cfg))
    x, y = load_text_split(cfg.data.root, cfg.data.task, split, tokenizer, length)
    return InMemorySplit(x, y) if in_memory else torch.utils.data.TensorDataset(x, y)


def load_split(cfg, model: nn.Module, split: str, in_memory: bool = True, progress: bool = True,
               device: torch.device | None = None):
    """A split as an :class:`InMemorySplit` (decoded once) or a streaming dataset (``in_memory=False``).
    Text tasks (``model.source: hf``) are tokenized once into packed tokens (:mod:`glora.data.text`).
    ``device``: where the run computes; on CUDA the split goes to the GPU or to pinned memory (``data.on_device``)."""
    if model_source(cfg) == "hf":
        out = _text_split(cfg, model, split, in_memory)
    else:
        from glora.data.vtab import VtabDataset, build_transform
        transform = build_transform(model, input_size(cfg, model))
        ds = VtabDataset(cfg.data.root, cfg.data.task, split, transform)
        if not in_memory:
            return ds
        out = InMemorySplit.from_dataset(ds, desc=split, batch_size=cfg.data.eval_batch_size,
                                         num_workers=cfg.data.num_workers, progress=progress)
    if not in_memory or device is None:
        return out
    return out.place(device, cfg.data.get("on_device", "auto"))


def stream_batches(cfg, dataset, shard: bool = True, device: torch.device | None = None):
    """Batches of a streaming split in file order; under torchrun (``shard``) only this rank's items, so no
    rank decodes the whole split (``evaluate`` sums the counts over ranks). ``data.num_workers`` processes
    decode; for a CUDA ``device`` the batches come in pinned memory (asynchronous copies)."""
    from . import dist
    if shard and dist.world_size() > 1:
        dataset = torch.utils.data.Subset(dataset, dist.shard_indices(len(dataset)))
    pin = device is not None and device.type == "cuda"
    return torch.utils.data.DataLoader(dataset, batch_size=cfg.data.eval_batch_size, shuffle=False,
                                       num_workers=cfg.data.num_workers, pin_memory=pin,
                                       persistent_workers=False)


def first_batch(cfg, dataset) -> torch.Tensor:
    """The images of the split's first ``data.eval_batch_size`` items, decoded here without starting loader
    workers (what ``stream_batches(..., shard=False)`` yields first)."""
    n = min(cfg.data.eval_batch_size, len(dataset))
    return torch.stack([dataset[i][0] for i in range(n)])


def stage_dir(cfg, stage: str) -> Path:
    p = Path(cfg.output_dir) / stage
    p.mkdir(parents=True, exist_ok=True)
    return p
