"""Build what every stage needs from a resolved config: the task data and the backbone."""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn as nn

from .engine import InMemorySplit

_logger = logging.getLogger(__name__)


def prepare_data(cfg) -> int:
    """Make sure the task folder exists (generating an offline task on first use); return the class count."""
    from data.offline import ensure_task
    from data.vtab import num_classes

    from . import dist
    with dist.main_first():  # under torchrun the first rank of a node writes a missing task, the others read it
        ensure_task(cfg.data.root, cfg.data.task, prepare_missing=cfg.data.prepare_missing, seed=cfg.seed)
    return num_classes(cfg.data.root, cfg.data.task)


def build_backbone(cfg, num_classes: int) -> nn.Module:
    from data.backbones import create_backbone

    from . import dist
    with dist.main_first():  # under torchrun the first rank of a node fills the weight caches first
        return create_backbone(cfg.model.name, num_classes=num_classes, pretrained=cfg.model.pretrained,
                               checkpoint=cfg.model.checkpoint, kwargs=dict(cfg.model.kwargs),
                               num_blocks=cfg.model.num_blocks)


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


def load_split(cfg, model: nn.Module, split: str, in_memory: bool = True, progress: bool = True,
               device: torch.device | None = None):
    """A split as an :class:`InMemorySplit` (decoded once) or a streaming dataset (``in_memory=False``).
    ``device``: where the run computes; on CUDA the split goes to the GPU or to pinned memory (``data.on_device``)."""
    from data.vtab import VtabDataset, build_transform
    transform = build_transform(model, input_size(cfg, model))
    ds = VtabDataset(cfg.data.root, cfg.data.task, split, transform)
    if not in_memory:
        return ds
    mem = InMemorySplit.from_dataset(ds, desc=split, batch_size=cfg.data.eval_batch_size,
                                     num_workers=cfg.data.num_workers, progress=progress)
    return mem if device is None else mem.place(device, cfg.data.get("on_device", "auto"))


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


def build_supernet(cfg, num_classes: int):
    """Backbone with GLoRA super-layers injected into ``glora.target_modules``."""
    from supernet.wrapper import GloraSupernet
    torch.manual_seed(cfg.seed)  # head initialisation
    model = build_backbone(cfg, num_classes)
    torch.manual_seed(cfg.seed + 1)  # adapter initialisation, whatever loading the weights drew
    return GloraSupernet(model, target_modules=list(cfg.glora.target_modules), ranks=list(cfg.glora.ranks),
                         choices_ab=list(cfg.glora.choices_ab), choices_c=list(cfg.glora.choices_c),
                         choices_de=list(cfg.glora.choices_de), parametrisation=cfg.glora.parametrisation,
                         a_lora_scale=cfg.glora.a_lora_scale)


def stage_dir(cfg, stage: str) -> Path:
    p = Path(cfg.output_dir) / stage
    p.mkdir(parents=True, exist_ok=True)
    return p
