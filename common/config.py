"""Configuration: ``configs/default.yaml`` names every key; a task config and ``--set`` overrides change some.

Resolution order: defaults, then the task file (``--config``), then each ``--set section.key=value``. Every
key must exist in the defaults and keep its type (an int is accepted where a float is expected). Mappings
whose default is empty (``model.kwargs``) are free-form: their entries go to another library as they are.
"""
from __future__ import annotations

import copy
import difflib
from pathlib import Path
from typing import Any, Iterable

import yaml

from .errors import UserError

REPO_ROOT = Path(__file__).resolve().parent.parent
CONFIG_DIR = REPO_ROOT / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"


class Config(dict):
    """A nested dict with read-only attribute access (``cfg.supernet.lr``)."""

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to_dict(self) -> dict:
        return _plain(self)


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_plain(v) for v in x]
    return x


def _wrap(x: Any) -> Any:
    if isinstance(x, dict):
        return Config({k: _wrap(v) for k, v in x.items()})
    if isinstance(x, list):
        return [_wrap(v) for v in x]
    return x


def _all_keys(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        out.append(prefix + k)
        if isinstance(v, dict) and v:
            out.extend(_all_keys(v, prefix + k + "."))
    return out


def _type_name(v: Any) -> str:
    return {bool: "bool", int: "int", float: "float", str: "str", list: "list", dict: "mapping"}.get(
        type(v), type(v).__name__)


def _coerce(key: str, value: Any, default: Any) -> Any:
    """``value`` checked against the default's type (ints widen to floats)."""
    if default is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, str):
        if isinstance(value, str):
            return value
    elif isinstance(default, list):
        if isinstance(value, list):
            if default:
                return [_coerce(f"{key}[{i}]", v, default[0]) for i, v in enumerate(value)]
            return value
    elif isinstance(default, dict):
        if isinstance(value, dict):
            return value
    raise UserError(f"config key {key}: expected {_type_name(default)}, got {value!r} ({_type_name(value)})")


def _unknown(key: str, valid: Iterable[str]) -> UserError:
    near = difflib.get_close_matches(key, list(valid), n=3, cutoff=0.5)
    hint = f"; nearest valid: {', '.join(near)}" if near else ""
    return UserError(f"unknown config key {key!r}{hint}")


def merge_into(base: dict, update: dict, defaults: dict, prefix: str = "", source: str = "",
               valid_keys: list[str] | None = None) -> None:
    """Merge ``update`` into ``base`` in place, checking keys and types against ``defaults``.
    ``valid_keys``: every dotted key of the whole config, for the nearest-key hint of an unknown key."""
    valid_keys = _all_keys(defaults) if valid_keys is None else valid_keys
    if not isinstance(update, dict):
        raise UserError(f"{source or 'config'}: expected a mapping at {prefix.rstrip('.') or 'top level'}")
    for k, v in update.items():
        key = prefix + str(k)
        if k not in defaults:
            raise _unknown(key, valid_keys)
        dv = defaults[k]
        if isinstance(dv, dict) and dv:
            if not isinstance(v, dict):
                raise UserError(f"config key {key}: expected a mapping of {', '.join(dv)}, got {v!r}")
            merge_into(base[k], v, dv, key + ".", source, valid_keys)
        else:
            base[k] = _coerce(key, v, dv)


def load_defaults() -> dict:
    with open(DEFAULT_CONFIG) as f:
        return yaml.safe_load(f)


def find_config(name: str) -> Path:
    """``name`` as a path, else ``configs/name``, else ``configs/name.yaml``."""
    candidates = [Path(name), CONFIG_DIR / name, CONFIG_DIR / f"{name}.yaml", CONFIG_DIR / f"{name}.yml"]
    for c in candidates:
        if c.is_file():
            return c
    avail = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    raise UserError(f"config {name!r} not found: give a yaml path or one of {', '.join(avail)}")


def parse_set(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise UserError(f"--set {item!r}: expected section.key=value")
    key, _, raw = item.partition("=")
    key = key.strip()
    if not key:
        raise UserError(f"--set {item!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def load_config(name: str | None = None, overrides: Iterable[str] = ()) -> Config:
    """Resolve defaults + task file + ``--set`` overrides into a :class:`Config`."""
    defaults = load_defaults()
    cfg = copy.deepcopy(defaults)
    if name:
        path = find_config(name)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
        merge_into(cfg, data, defaults, source=str(path))
    for item in overrides:
        parts, value = parse_set(item)
        # a key inside a free-form mapping (model.kwargs.img_size=112) sets one entry of that mapping
        node, free = defaults, None
        for i, p in enumerate(parts[:-1]):
            if not isinstance(node, dict) or p not in node:
                raise _unknown(".".join(parts[:i + 1]), _all_keys(defaults))
            node = node[p]
            if isinstance(node, dict) and not node:
                free = i
                break
        if free is not None:
            target = cfg
            for p in parts[:free]:
                target = target[p]
            mapping = dict(target[parts[free]] or {})
            inner = mapping
            for p in parts[free + 1:-1]:
                inner = inner.setdefault(p, {})
                if not isinstance(inner, dict):
                    raise UserError(f"--set {item!r}: {p} is not a mapping")
            inner[parts[-1]] = value
            target[parts[free]] = mapping
            continue
        update: Any = value
        for p in reversed(parts):
            update = {p: update}
        merge_into(cfg, update, defaults, source="--set")
    validate(cfg)
    return _wrap(cfg)


def _one_of(key: str, value: Any, valid: Iterable[str]) -> None:
    valid = list(valid)
    if value not in valid:
        raise UserError(f"config key {key}: {value!r} is not one of {', '.join(map(str, valid))}")


def validate(cfg: dict) -> None:
    """Checks of values (not only types) that would otherwise fail late in a run."""
    _one_of("precision", cfg["precision"], ["fp32", "bf16"])
    dev = cfg["device"]
    if not (dev in ("auto", "cpu", "cuda") or (isinstance(dev, str) and dev.startswith("cuda:"))):
        raise UserError(f"config key device: {dev!r} is not one of auto, cpu, cuda, cuda:N")
    d = cfg["retrain"]["dir"]
    if not d or "/" in d or "\\" in d or d in (".", "..", "supernet", "search"):
        raise UserError(f"config key retrain.dir: {d!r} must be a plain folder name other than supernet, search")
    _one_of("retrain.init", cfg["retrain"]["init"], ["supernet", "scratch"])
    for b in cfg["retrain"]["baselines"]:
        _one_of("retrain.baselines entry", b, ["lora", "head"])
    if len(set(cfg["retrain"]["baselines"])) != len(cfg["retrain"]["baselines"]):
        raise UserError(f"config key retrain.baselines: an entry appears twice in {cfg['retrain']['baselines']}")
    if cfg["retrain"]["top_k"] < 1:
        raise UserError(f"config key retrain.top_k: must be >= 1, got {cfg['retrain']['top_k']}")
    if cfg["retrain"]["lora_rank"] < 0:
        raise UserError(f"config key retrain.lora_rank: must be >= 0 (0 = the largest rank within the searched "
                        f"subnet's params), got {cfg['retrain']['lora_rank']}")
    grid = []
    for v in cfg["retrain"]["lr_grid"]:
        try:
            f = float(v) if isinstance(v, (int, float, str)) and not isinstance(v, bool) else float("nan")
        except ValueError:
            f = float("nan")
        if not f > 0 or f == float("inf"):
            raise UserError(f"config key retrain.lr_grid: {v!r} is not a positive learning rate (e.g. [3e-4, 1e-3])")
        grid.append(f)
    cfg["retrain"]["lr_grid"] = grid
    _one_of("supernet.path_sampling", cfg["supernet"]["path_sampling"], ["uniform", "budget"])
    _one_of("glora.parametrisation", cfg["glora"]["parametrisation"], ["paper", "scaled"])
    if not cfg["glora"]["a_lora_scale"] > 0:
        raise UserError(f"config key glora.a_lora_scale: must be > 0, got {cfg['glora']['a_lora_scale']}")
    for sec, key in [("supernet", "epochs"), ("retrain", "epochs"), ("search", "generations"),
                     ("search", "population"), ("data", "batch_size"), ("data", "eval_batch_size")]:
        if cfg[sec][key] < 1 and not (key == "epochs" and cfg[sec][key] == 0):
            raise UserError(f"config key {sec}.{key}: must be >= 1, got {cfg[sec][key]}")
    for sec in ("supernet", "retrain"):
        if cfg[sec]["lr"] <= 0:
            raise UserError(f"config key {sec}.lr: must be > 0, got {cfg[sec]['lr']}")
    s = cfg["search"]
    if not 0.0 <= s["mutation_prob"] <= 1.0:
        raise UserError(f"config key search.mutation_prob: must be in [0, 1], got {s['mutation_prob']}")
    if s["select"] < 1:
        raise UserError(f"config key search.select: must be >= 1, got {s['select']}")
    if s["min_params_m"] > s["max_params_m"]:
        raise UserError(f"search.min_params_m ({s['min_params_m']}) is above search.max_params_m "
                        f"({s['max_params_m']})")
    ranks = cfg["glora"]["ranks"]
    if not ranks or any(r <= 0 for r in ranks):
        raise UserError(f"config key glora.ranks: expected positive integers, got {ranks}")


def dump_config(cfg: dict, path: str | Path) -> None:
    from .io import atomic_write_yaml
    atomic_write_yaml(path, _plain(cfg))
