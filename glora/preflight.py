"""What a command must pass before it writes anything: the run folder, the data lists, the model and search budget,
the network for pretrained weights, and the settings each stage folder was made with.

Every stage folder records its settings in ``settings.json`` (the stage's fingerprint: every setting that changes
its result, the stages it reads from included) when it starts. A rerun with the same output_dir checks each
folder it would run or read against the current config and refuses a mismatch in one line, so a finished stage
is never reported for settings it did not run with, and a half-trained one is never resumed with other ones.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
from pathlib import Path
from typing import Any, Iterable

from .core.config import Config
from .core.errors import UserError
from .core.io import atomic_write_json, is_partial_write

_logger = logging.getLogger("glora")

SETTINGS = "settings.json"
STAGES = ("supernet", "search", "retrain")
HF_HOST = ("huggingface.co", 443)
NETWORK_TIMEOUT_S = 3.0


# ------------------------------------------------------------------------------------------------ fingerprints

def _flat(d: Any, prefix: str = "") -> dict:
    if isinstance(d, dict) and d:
        out = {}
        for k, v in d.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): d}


# keys that count only away from their default, so a run folder keeps the fingerprint it had before the key
# existed (model.source before text tasks, retrain.select_by before the loss choice, glora.vector_scale,
# retrain.refit_guard, retrain.drop_path_rate, glora.choices_d/e); a mismatch message shows such a key by its
# default value
LEFT_OUT_AT_DEFAULT = {"model.source": "timm", "retrain.select_by": "top1", "glora.vector_scale": 1.0,
                       "retrain.refit_guard": 2.0, "retrain.epochs_grid": [], "retrain.drop_path_rate": None,
                       "glora.choices_d": None, "glora.choices_e": None, "data.seed": 0}


def _keys(cfg: Config, prefixes: Iterable[str], leave_out: Iterable[str] = ()) -> dict:
    """The config values under ``prefixes`` (dotted keys: ``seed``, ``model`` for every model key...), less
    ``leave_out`` and the keys of ``LEFT_OUT_AT_DEFAULT`` at their default."""
    flat = _flat(cfg.to_dict())
    leave_out = set(leave_out)
    if flat.get("supernet.path_sampling") != "sandwich":  # it changes nothing else; older folders lack it
        leave_out.add("supernet.sandwich_paths")
    return {k: v for k, v in flat.items()
            if k not in leave_out and any(k == p or k.startswith(p + ".") for p in prefixes)
            and not (k in LEFT_OUT_AT_DEFAULT and v == LEFT_OUT_AT_DEFAULT[k])}


BASE_KEYS = ("seed", "precision", "model", "data.root", "data.task", "data.seed", "data.image_size",
             "data.batch_size", "glora")


def _is_hf(cfg: Config) -> bool:
    from .core.build import model_source
    return model_source(cfg) == "hf"


def _base_keys(cfg: Config, prefixes: Iterable[str], leave_out: Iterable[str] = ()) -> dict:
    """``BASE_KEYS`` and ``prefixes``; ``data.max_length`` only for ``hf`` (it changes what a text model sees,
    and nothing of an image model)."""
    return _keys(cfg, BASE_KEYS + (("data.max_length",) if _is_hf(cfg) else ()) + tuple(prefixes), leave_out)


def _file_digest(path: Path) -> str | None:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def stage_fingerprint(cfg: Config, stage: str) -> dict:
    """See :func:`_stage_fingerprint`; ``precision`` as it resolves on this run's device (``auto`` is fp32 on the
    CPU, so a CPU run keeps the fingerprint it had before ``auto`` existed)."""
    fp = _stage_fingerprint(cfg, stage)
    from .core.accel import config_device_type, resolve_precision
    fp["precision"] = resolve_precision(cfg.precision, config_device_type(cfg.device))
    return fp


def _stage_fingerprint(cfg: Config, stage: str) -> dict:
    """Every config value that changes what ``stage`` computes, those of the stages it reads from included, as
    ``{dotted key: value}``.

    Left out: device, threads, num_workers (how, not what) and search.generations for the search itself (a longer
    search extends a finished one exactly as if it had run on; a shorter one is refused by the check of the
    folder's files)."""
    if stage == "supernet":
        fp = _base_keys(cfg, ("supernet",))
        if cfg.supernet.path_sampling in ("budget", "sandwich"):  # training paths drawn inside the search budget
            fp.update(_keys(cfg, ["search.min_params_m", "search.max_params_m"]))
        return fp
    if stage == "search":
        return _base_keys(cfg, ("supernet", "search", "data.eval_batch_size"), leave_out=["search.generations"])
    if stage == "retrain":
        fp = _base_keys(cfg, ("retrain",), leave_out=["retrain.dir", "retrain.subnet"])
        if cfg.retrain.init == "supernet":
            fp.update(_keys(cfg, ["supernet"]))
        if cfg.retrain.subnet:
            fp["retrain.subnet (sha256 of the file)"] = _file_digest(Path(cfg.retrain.subnet))
        else:
            fp.update(_stage_fingerprint(cfg, "search"))
            fp["search.generations"] = cfg.search.generations
        return fp
    raise ValueError(stage)


def stage_folder(cfg: Config, stage: str) -> Path:
    return Path(cfg.output_dir) / (cfg.retrain.dir if stage == "retrain" else stage)


def record_settings(cfg: Config, stage: str) -> None:
    """Write ``<stage folder>/settings.json`` (the fingerprint and the whole config it ran with), once."""
    path = stage_folder(cfg, stage) / SETTINGS
    if not path.is_file():
        atomic_write_json(path, {"stage": stage, "fingerprint": stage_fingerprint(cfg, stage),
                                 "config": cfg.to_dict()})


def forget_settings(cfg: Config, stage: str) -> None:
    """Undo :func:`record_settings` for a stage that failed before writing anything else (a bad checkpoint, a
    device that is not there): the corrected command then finds the folder free, not made with the bad value."""
    folder = stage_folder(cfg, stage)
    try:
        left = [p for p in folder.iterdir() if not is_partial_write(p)]
        if [p.name for p in left] == [SETTINGS]:
            for p in folder.iterdir():
                p.unlink()
            folder.rmdir()
    except OSError:
        pass


def _differences(old: dict, new: dict, limit: int = 3) -> str:
    def get(d, k):
        return d.get(k, LEFT_OUT_AT_DEFAULT.get(k, "<unset>"))
    keys = sorted(k for k in set(old) | set(new) if get(old, k) != get(new, k))
    shown = [f"{k}: {get(old, k)!r} -> {get(new, k)!r}" for k in keys]
    more = f" (+{len(shown) - limit} more)" if len(shown) > limit else ""
    return "; ".join(shown[:limit]) + more


def _read_json(path: Path, what: str, fix: str) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: damaged, not valid JSON ({str(e).splitlines()[0]}); {fix}") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read {what} ({e.strerror or e}); {fix}") from None


def check_stage_settings(cfg: Config, stage: str) -> None:
    """Refuse a stage folder made with other settings (or with no record of them)."""
    folder = stage_folder(cfg, stage)
    if not folder.exists():
        return
    if not folder.is_dir():
        raise UserError(f"{folder} is a file where the {stage} stage keeps its folder; move it away or use "
                        "another output_dir")
    path = folder / SETTINGS
    fix = f"delete {folder} to run the {stage} stage again, or use another output_dir"
    if not path.is_file():
        # a run killed while writing its settings record leaves only that write's temporary file: nothing ran
        if any(not is_partial_write(p) for p in folder.iterdir()):
            raise UserError(f"{folder} holds files but no {SETTINGS} saying what settings made them (an older "
                            f"version, or files put there by hand); {fix}")
        return
    rec = _read_json(path, "the settings record", fix)
    if not isinstance(rec, dict) or not isinstance(rec.get("fingerprint"), dict):
        raise UserError(f"{path}: damaged, expected a mapping with a 'fingerprint' mapping; {fix}")
    mine = json.loads(json.dumps(stage_fingerprint(cfg, stage)))
    old = dict(rec["fingerprint"])
    if isinstance(rec.get("config"), dict):  # a key the fingerprint gained later: read it off the config it ran with
        ran = _flat(rec["config"])
        old.update({k: ran[k] for k in mine if k not in old and k in ran})
    if old != mine:
        other = "another retrain.dir or output_dir" if stage == "retrain" else "another output_dir"
        raise UserError(f"{folder} was made with other settings ({_differences(old, mine)}); "
                        f"use {other}, or delete {folder} to redo it")


# ------------------------------------------------------------------------------------------------ stage files

def check_stage_files(cfg: Config, stage: str) -> None:
    """The files a rerun of ``stage`` reads back, checked without loading the model: a damaged one is refused
    here, in one line, before anything is written."""
    folder = stage_folder(cfg, stage)
    if not folder.is_dir():
        return
    from .core.checkpoint import checkpoint_info
    from .core.io import read_jsonl
    if stage in ("supernet", "retrain"):
        read_jsonl(folder / "log.jsonl")
    if stage == "supernet":
        checkpoint_info(folder)
        adapters = folder / "adapters.safetensors"
        if adapters.exists():
            from .core.io import load_safetensors
            load_safetensors(adapters, f"delete {folder} to train the supernet again")
    elif stage == "search":
        from search.evolution import read_history, read_state
        state = None
        if (folder / "state.json").exists():
            state = read_state(folder / "state.json")
        read_history(folder / "history.jsonl")
        if (folder / "subnet.yaml").exists():
            from supernet.space import Subnet
            Subnet.from_yaml(folder / "subnet.yaml")
        if state is not None and state["generation"] > cfg.search.generations:
            raise UserError(f"{folder} ran {state['generation']} search generations, more than search.generations="
                            f"{cfg.search.generations}; set it to {state['generation']} or more, or delete "
                            f"{folder} to search again")
    else:
        checkpoint_info(folder)
        select = sorted((folder / "select").glob("*")) if (folder / "select").is_dir() else []
        refits = [r for d in (folder, folder / "head_only", folder / "lora") if (d / "refit").is_dir()
                  for r in sorted((d / "refit").glob("*"))]
        for sub in [folder / "head_only", folder / "lora"] + select + refits:
            checkpoint_info(sub)
            read_jsonl(sub / "log.jsonl")
            if (sub / "val.json").exists() and not isinstance(
                    _read_json(sub / "val.json", "a learning-rate choice", f"delete {sub} to train it again"), dict):
                raise UserError(f"{sub / 'val.json'}: damaged, expected a mapping; delete {sub} to train it again")
        if (folder / "subnet.yaml").exists():
            from supernet.space import Subnet
            Subnet.from_yaml(folder / "subnet.yaml")
        fix = f"delete {folder} to retrain"
        if (folder / "metrics.json").exists() and not isinstance(
                _read_json(folder / "metrics.json", "the metrics", fix), dict):
            raise UserError(f"{folder / 'metrics.json'}: damaged, expected a mapping; {fix}")
        from .core.checkpoint import safetensors_header
        from .stages.retrain import ADAPTERS, MERGED
        for name in (MERGED, ADAPTERS):  # a rerun reuses the trained points and writes a deleted one again
            if (folder / name).exists():
                safetensors_header(folder / name, f"delete {folder / name} and run again to write it anew")


def check_summary(cfg: Config) -> None:
    path = Path(cfg.output_dir) / "summary.json"
    if path.exists():
        fix = "delete it (each stage folder keeps its own results; the next stage that runs writes a new one)"
        if not isinstance(_read_json(path, "the run summary", fix), dict):
            raise UserError(f"{path}: damaged, expected a mapping of stage results; {fix}")


# ------------------------------------------------------------------------------------------------ inputs

def check_writable_folder(path: Path, what: str) -> None:
    """``path`` is a folder that can be written, or can be made."""
    p = path
    while not p.exists() and p != p.parent:
        p = p.parent
    if p.exists() and not p.is_dir():
        if p == path:
            raise UserError(f"{what} {path} is a file; give a folder")
        raise UserError(f"{what} {path}: {p} is a file, so the folder cannot be made; give another path")
    if not os.access(p, os.W_OK | os.X_OK):
        raise UserError(f"{what} {path}: {p} is not writable; give a folder you can write to")


def check_output_dir(cfg: Config) -> None:
    out = Path(cfg.output_dir)
    check_writable_folder(out, "output_dir")
    for name in ("config.yaml", "summary.json", "run.log"):
        p = out / name
        if p.exists() and (p.is_dir() or not os.access(p, os.W_OK)):
            raise UserError(f"output_dir {out}: {p} is not a writable file; fix its permissions or use another "
                            "output_dir")


def check_data(cfg: Config) -> None:
    """The task's list files (labels, encoding) when the task folder exists; the errors of a missing one."""
    if _is_hf(cfg):  # a text task: every split's lines read and checked (labels, fields)
        from glora.data.text import text_num_classes
        text_num_classes(cfg.data.root, cfg.data.task)
        return
    from glora.data.offline import OFFLINE_TASKS, ensure_task
    from glora.data.vtab import num_classes
    target = Path(cfg.data.root) / cfg.data.task
    if target.is_dir():
        ensure_task(cfg.data.root, cfg.data.task, seed=cfg.data.seed)  # an offline task: generated from data.seed
        num_classes(cfg.data.root, cfg.data.task)
    elif cfg.data.task not in OFFLINE_TASKS or not cfg.data.prepare_missing:
        ensure_task(cfg.data.root, cfg.data.task, prepare_missing=cfg.data.prepare_missing)  # raises its error
    else:
        check_writable_folder(Path(cfg.data.root), "data.root (the offline task is written there)")


def model_space(cfg: Config):
    """The search space of ``cfg``'s model, from a weightless copy on the meta device (no memory, no download):
    checks the model name, ``model.kwargs``, ``num_blocks`` and ``glora`` at once."""
    import torch
    from glora.data.backbones import create_backbone
    from supernet.inject import layer_specs
    from supernet.space import SearchSpace
    g = cfg.glora
    hf = _is_hf(cfg)
    try:
        with torch.device("meta"):
            if hf:
                from glora.data.hf import reference_hf_classifier
                if cfg.model.num_blocks:
                    raise UserError("model.num_blocks applies to timm models; with model.source: hf set "
                                    "model.kwargs.num_hidden_layers instead")
                model = reference_hf_classifier(cfg.model.name, 2, checkpoint=cfg.model.checkpoint,
                                                kwargs=dict(cfg.model.kwargs))
            else:
                model = create_backbone(cfg.model.name, num_classes=2, kwargs=dict(cfg.model.kwargs),
                                        num_blocks=cfg.model.num_blocks)
    except UserError:
        raise
    except Exception as e:
        lib = "transformers" if hf else "timm"
        raise UserError(f"model.kwargs: {lib} cannot build {cfg.model.name} with {dict(cfg.model.kwargs)} "
                        f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if hf:
        check_max_length(cfg, model)
    else:
        check_image_size(cfg, model)
    from glora.stages.supernet import glora_options  # the supernet's own reading of the glora section
    opts = glora_options(g)
    specs = layer_specs(model, opts.pop("target_modules"))
    widest = max((min(s.in_features, s.out_features) for s in specs), default=0)
    for key, ranks in (("glora.ranks", list(g.ranks)), ("retrain.lora_rank", [cfg.retrain.lora_rank])):
        if specs and max(ranks) > widest:
            raise UserError(f"config key {key}: rank {max(ranks)} is above {widest}, the largest rank any adapted "
                            f"layer of {cfg.model.name} can use (min of its in and out features)")
    return SearchSpace(specs, **{k: v for k, v in opts.items() if k == "ranks" or k.startswith("choices_")})


def check_image_size(cfg: Config, model) -> None:
    """``data.image_size`` against a ViT's fixed input size (timm's patch embedding refuses any other)."""
    size = cfg.data.image_size
    pe = getattr(model, "patch_embed", None)
    fixed = getattr(pe, "img_size", None)
    if not size or fixed is None or getattr(pe, "dynamic_img_size", False) or not getattr(pe, "strict_img_size", True):
        return
    if tuple(fixed) != (size, size):
        raise UserError(f"config key data.image_size: {size} does not match the {fixed[0]}x{fixed[1]} input of "
                        f"{cfg.model.name}; set model.kwargs.img_size={size} as well, or data.image_size=0 (the "
                        "model's own size)")


def check_max_length(cfg: Config, model) -> None:
    """``data.max_length`` of a text task fits the model's position table."""
    from glora.data.hf import max_positions
    length, limit = cfg.data.get("max_length", 128), max_positions(model)
    if limit and isinstance(length, int) and length > limit:
        raise UserError(f"config key data.max_length: {length} tokens exceed the {limit} positions of the model")


def check_checkpoint_path(cfg: Config) -> None:
    """A ``model.checkpoint`` file that is not there is found now, not after the data is prepared."""
    if _is_hf(cfg):  # a save_pretrained folder (config.json, weights, tokenizer)
        from glora.data.hf import weights_source
        weights_source(cfg.model.name, cfg.model.checkpoint)
        return
    ck = str(cfg.model.checkpoint)
    if ck and not ck.startswith("offline:"):
        path = Path(ck).expanduser()
        if not path.is_file():
            what = "is a folder" if path.is_dir() else "not found"
            raise UserError(f"model.checkpoint: {path} {what}; expected a .npz, .pth/.pt or .safetensors file "
                            "or offline:NAME")


def _pretrained_cached(name: str) -> bool:
    """Whether timm's pretrained weights for ``name`` are in the local Hugging Face cache already."""
    try:
        from huggingface_hub import try_to_load_from_cache
        from timm.models._builder import resolve_pretrained_cfg
        hub_id = resolve_pretrained_cfg(name).hf_hub_id
        if not hub_id:
            return False
        repo = hub_id.split("@")[0]
        return any(isinstance(try_to_load_from_cache(repo, f), str)
                   for f in ("model.safetensors", "pytorch_model.bin"))
    except Exception:  # no hub package, an unknown name: let timm say what is wrong
        return False


def _reachable(host: tuple[str, int], timeout: float) -> bool:
    try:
        with socket.create_connection(host, timeout=timeout):
            return True
    except OSError:
        return False


def _hf_model_cached(source: str) -> bool:
    """Whether a Hugging Face model ``source`` is a local folder or its config is in the local hub cache."""
    if Path(source).expanduser().is_dir():
        return True
    try:
        from huggingface_hub import try_to_load_from_cache
        return isinstance(try_to_load_from_cache(source, "config.json"), str)
    except Exception:  # an invalid repo name: let transformers say what is wrong
        return False


def check_pretrained(cfg: Config) -> None:
    """``model.pretrained: true`` downloads from the Hugging Face hub (``model.source: hf``: any hub name without a
    local folder): refuse at once, in one line, when it is not cached and the hub cannot be reached (instead of a
    minute of retries)."""
    if _is_hf(cfg):
        from glora.data.hf import weights_source
        source = weights_source(cfg.model.name, cfg.model.checkpoint)
        if _hf_model_cached(source):
            return
        what = f"model.name: {source} is not a local folder, is not in the local Hugging Face cache,"
        hint = ("give model.checkpoint=FOLDER, a folder written by save_pretrained (the model and its tokenizer) "
                "on this machine")
    else:
        if not cfg.model.pretrained or _pretrained_cached(cfg.model.name):
            return
        what = f"model.pretrained: the weights of {cfg.model.name} are not in the local cache"
        hint = ("set model.pretrained=false and give model.checkpoint=PATH (a .npz, .pth or .safetensors file on "
                "this machine) or offline:dinov2_vits14")
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on"):
        raise UserError(f"{what} and HF_HUB_OFFLINE is set; {hint}")
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return  # through a proxy a direct connection says nothing: let the download try
    from urllib.parse import urlsplit
    endpoint = urlsplit(os.environ.get("HF_ENDPOINT", "").strip() or f"https://{HF_HOST[0]}")
    host = (endpoint.hostname or HF_HOST[0], endpoint.port or (80 if endpoint.scheme == "http" else 443))
    if not _reachable(host, NETWORK_TIMEOUT_S):
        raise UserError(f"{what} and {host[0]} cannot be reached (no network?); {hint}")


def _stages_read(cfg: Config, stages: Iterable[str]) -> list[str]:
    """The stage folders a command runs or reads from."""
    stages = set(stages)
    out = set(stages)
    if "search" in stages or ("retrain" in stages and cfg.retrain.init == "supernet"):
        out.add("supernet")
    if "retrain" in stages and not cfg.retrain.subnet:
        out.add("search")
    return [s for s in STAGES if s in out]


def preflight(cfg: Config, stages: Iterable[str]) -> None:
    """Every check a command can make before it writes anything; raises UserError on the first failure."""
    from search.operators import check_budget
    stages = list(stages)
    check_output_dir(cfg)
    check_data(cfg)
    if _is_hf(cfg):  # building the model reads its config: the folder or the hub first
        check_checkpoint_path(cfg)
        check_pretrained(cfg)
    space = model_space(cfg)
    if "supernet" in stages or "search" in stages:
        s = cfg.search
        check_budget(space, int(round(s.min_params_m * 1e6)), int(round(s.max_params_m * 1e6)))
    if "retrain" in stages and cfg.retrain.subnet:
        from supernet.space import Subnet
        subnet = Subnet.from_yaml(cfg.retrain.subnet)
        space.check_subnet(subnet, max_rank=space.max_rank if cfg.retrain.init == "supernet" else None)
    check_checkpoint_path(cfg)
    check_pretrained(cfg)
    check_summary(cfg)
    for stage in _stages_read(cfg, stages):
        check_stage_settings(cfg, stage)
        check_stage_files(cfg, stage)
    for stage in STAGES:  # the other stage folders too: a stage run beside them must not leave them stale
        if stage not in _stages_read(cfg, stages):
            check_stage_settings(cfg, stage)
