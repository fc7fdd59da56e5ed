"""Hugging Face transformers backbones for the CLI (``model.source: hf``): a sequence classifier and its tokenizer.

Weights and tokenizer come from ``checkpoint`` when it is given (a local folder written by ``save_pretrained``),
else from ``name`` (a folder, or a hub name such as ``bert-base-uncased``, which needs internet the first time).
``pretrained: false`` without a checkpoint builds the architecture of ``name`` with random weights.

The CLI's training loop calls ``model(x)`` with one tensor and expects logits: :func:`packed_forward` makes a
model accept the packed tokens of :mod:`glora.data.text` (``(N, 2, L)``: ids and attention mask) and return
``logits (N, K)`` for such a call. Any other call is left as it is, so the layer names, the state dict and
``save_pretrained`` stay those of the plain Hugging Face model.
"""
from __future__ import annotations

import contextlib
import functools
from pathlib import Path

import torch.nn as nn

from glora.core.errors import UserError

from .text import is_packed_tokens, unpack_tokens

INSTALL_HINT = "model.source: hf needs the transformers package: pip install 'glora-search[hf]'"


def _transformers():
    try:
        import transformers
    except ImportError:
        raise UserError(INSTALL_HINT) from None
    return transformers


def weights_source(name: str, checkpoint: str = "") -> str:
    """Where the weights and tokenizer are read from: the ``checkpoint`` folder, else ``name``."""
    if checkpoint:
        if str(checkpoint).startswith("offline:"):
            raise UserError(f"model.checkpoint: {checkpoint} is a timm checkpoint; with model.source: hf give a "
                            "folder written by save_pretrained, or '' to use model.name")
        path = Path(checkpoint).expanduser()
        if not path.is_dir() or not (path / "config.json").is_file():
            raise UserError(f"model.checkpoint: {path} is not a folder written by save_pretrained "
                            "(config.json, weights and tokenizer files)")
        return str(path)
    if not name or not isinstance(name, str):
        raise UserError("model.name: give a Hugging Face model name or folder (or model.checkpoint)")
    return name


def _load_error(what: str, source: str, e: Exception) -> UserError:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return UserError(f"{what}: could not load {source!r} with transformers ({first}); give a local folder written "
                     "by save_pretrained in model.checkpoint, or a hub name with internet")


@functools.lru_cache(maxsize=4)
def load_tokenizer(source: str):
    """``AutoTokenizer.from_pretrained(source)``, with a padding token (the eos, else unk token) when it has none."""
    transformers = _transformers()
    try:
        tok = transformers.AutoTokenizer.from_pretrained(source)
    except Exception as e:
        raise _load_error("tokenizer", source, e) from None
    if tok.pad_token is None:
        fallback = tok.eos_token or tok.unk_token
        if fallback is None:
            raise UserError(f"tokenizer of {source}: no padding, end or unknown token to pad with")
        tok.pad_token = fallback
    return tok


def _packed_to_kwargs(module, args, kwargs):
    packed = len(args) == 1 and not kwargs and is_packed_tokens(args[0])
    module.__dict__["_packed_call"] = packed
    return ((), unpack_tokens(args[0])) if packed else None


def _logits_of_packed(module, args, output):
    if module.__dict__.pop("_packed_call", False):
        return output.logits if hasattr(output, "logits") else output[0]
    return output


def packed_forward(model: nn.Module) -> nn.Module:
    """Let ``model(x)`` take packed tokens ``x (N, 2, L)`` and return ``logits (N, K)`` (in place; idempotent)."""
    if not getattr(model, "_packed_forward", False):
        model.register_forward_pre_hook(_packed_to_kwargs, with_kwargs=True)
        model.register_forward_hook(_logits_of_packed)
        model._packed_forward = True
    return model


@contextlib.contextmanager
def _no_hf_progress_bars():
    """transformers' own bars (loading and writing shards) off: the stages report progress themselves."""
    hf_logging = _transformers().utils.logging
    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def _config(source: str, num_classes: int, kwargs: dict):
    transformers = _transformers()
    try:
        return transformers.AutoConfig.from_pretrained(source, num_labels=num_classes, **kwargs)
    except Exception as e:
        raise _load_error("model", source, e) from None


def create_hf_classifier(name: str, num_classes: int, pretrained: bool = True, checkpoint: str = "",
                         kwargs: dict | None = None, num_blocks: int = 0) -> nn.Module:
    """An ``AutoModelForSequenceClassification`` with ``num_classes`` outputs that takes packed tokens.

    The classifier head is the checkpoint's when its shape fits, else freshly initialised (from the global torch
    RNG). ``kwargs`` override config entries (``num_hidden_layers``, ``hidden_dropout_prob``, ...)."""
    transformers = _transformers()
    if num_blocks:
        raise UserError("model.num_blocks applies to timm models; with model.source: hf set "
                        "model.kwargs.num_hidden_layers instead")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise UserError(f"num_classes: {num_classes!r} is not a positive integer")
    source = weights_source(name, checkpoint)
    kwargs = dict(kwargs or {})
    config = _config(source, num_classes, kwargs)
    auto = transformers.AutoModelForSequenceClassification
    try:
        with _no_hf_progress_bars():
            if checkpoint or pretrained:
                model = auto.from_pretrained(source, config=config, ignore_mismatched_sizes=True)
            else:
                model = auto.from_config(config)
    except ValueError as e:
        raise UserError(f"model: {source} has no sequence-classification form in transformers ({e})") from None
    except Exception as e:
        raise _load_error("model", source, e) from None
    # fp32 master weights whatever the checkpoint was saved in (transformers loads a bf16 checkpoint as bf16);
    # mixed precision is autocast's job (``precision``)
    model = model.float()
    if getattr(model.config, "pad_token_id", None) is None:
        tok = load_tokenizer(source)
        model.config.pad_token_id = tok.pad_token_id
    return packed_forward(model)


def reference_hf_classifier(name: str, num_classes: int, checkpoint: str = "", kwargs: dict | None = None) -> nn.Module:
    """The architecture of :func:`create_hf_classifier` with random weights (its keys and shapes)."""
    transformers = _transformers()
    config = _config(weights_source(name, checkpoint), num_classes, dict(kwargs or {}))
    return packed_forward(transformers.AutoModelForSequenceClassification.from_config(config))


def max_positions(model: nn.Module) -> int:
    """The longest input the model's position table holds (0 when unknown)."""
    cfg = getattr(model, "config", None)
    return int(getattr(cfg, "max_position_embeddings", 0) or 0)


def save_pretrained_folder(model: nn.Module, tokenizer_src: str, folder: str | Path) -> Path:
    """``model.save_pretrained`` and its tokenizer into ``folder`` (replaced whole, never left half written):
    a plain Hugging Face model that ``from_pretrained`` loads without this package."""
    import shutil
    import tempfile
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        with _no_hf_progress_bars():
            model.save_pretrained(tmp)
        load_tokenizer(tokenizer_src).save_pretrained(tmp)
        if folder.exists():
            shutil.rmtree(folder)
        tmp.rename(folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder
