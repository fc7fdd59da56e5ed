"""Configuration: ``configs/default.yaml`` names every key; a task config and ``--set`` overrides change some.

Resolution order: defaults, then the task file (``--config``), then each ``--set section.key=value``. A task
file may start from another with ``base: NAME`` (found beside it first, then under ``configs/``): the base is
resolved first and the file changes only what it lists (free-form mappings gain entries), so a variant of a
benchmark config names only its differences. Every
key must exist in the defaults and keep its type (an int is accepted where a float is expected, and a float
that is a whole number where an int is). Numbers are read as people type them: ``1e-3``, ``1E-3``, ``.5`` and
``5e4`` are numbers in a file and in ``--set`` alike (plain YAML 1.1 reads ``1e-3`` as a string). Mappings whose
default is empty (``model.kwargs``) are free-form: their entries go to another library as they are.
"""
from __future__ import annotations

import copy
import difflib
import math
import re
from pathlib import Path
from typing import Any, Iterable

import yaml

from .errors import UserError

REPO_ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO_ROOT / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "default.yaml"


def lr_tag(lr: float) -> str:
    """The name of a learning rate's run folders (``select/<method>_<tag>``, ``refit/<tag>``)."""
    return f"lr{lr:.3g}"


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


class _Loader(yaml.SafeLoader):
    """YAML 1.1 safe loading plus the float forms of YAML 1.2 (``1e-3``, ``5E4``: no dot needed), refusing a key
    given twice in one mapping (plain YAML keeps the last one silently, so a config would not say what runs)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # ``<<: *base``: its keys may be overridden here
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:  # an unhashable key: the base class reports it
                break
            if first is not None:
                raise DuplicateKeyError(
                    f"key {key!r} is given twice (lines {first + 1} and {key_node.start_mark.line + 1}); keep one",
                    None, f"found duplicate key {key!r}", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping names one key twice."""


_FLOAT_RE = re.compile(r'''^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$''', re.X)
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_RE, list("-+0123456789."))
_NUMBER_RE = re.compile(r"^[-+]?(?:[0-9][0-9_]*\.?[0-9_]*|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?$")


def yaml_load(text: str):
    """``yaml.safe_load`` that reads ``1e-3`` as a number."""
    return yaml.load(text, Loader=_Loader)


def _number(value: Any) -> Any:
    """A number typed as a string (``'1e-3'``, ``'nan'``) as a float; anything else as it is."""
    if isinstance(value, str):
        t = value.strip()
        if _NUMBER_RE.match(t) and any(ch.isdigit() for ch in t):
            return float(t.replace("_", ""))
        if t.lower().lstrip("+-.") in ("nan", "inf", "infinity"):
            return float(t.lower().replace(".", ""))
    return value


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
        value = _number(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(default, int):
        value = _number(value)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)  # 5e4 for an int key: exact, so accepted
    elif isinstance(default, str):
        if isinstance(value, str):
            return value
        if default == "auto" and isinstance(value, bool):  # auto | true | false keys (data.on_device)
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
    if key == "base":
        return UserError("config key 'base' is read only at the top level of a config file (base: NAME); "
                         "on the command line give --config NAME")
    near = difflib.get_close_matches(key, list(valid), n=3, cutoff=0.5)
    hint = f"; nearest valid: {', '.join(near)}" if near else ""
    return UserError(f"unknown config key {key!r}{hint}")


def merge_into(base: dict, update: dict, defaults: dict, prefix: str = "", source: str = "",
               valid_keys: list[str] | None = None, merge_free: bool = False) -> None:
    """Merge ``update`` into ``base`` in place, checking keys and types against ``defaults``.
    ``valid_keys``: every dotted key of the whole config, for the nearest-key hint of an unknown key.
    ``merge_free``: a free-form mapping (``model.kwargs``) gains the update's entries instead of being replaced
    (a config file over its base)."""
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
            merge_into(base[k], v, dv, key + ".", source, valid_keys, merge_free)
        elif merge_free and isinstance(dv, dict) and isinstance(v, dict) and isinstance(base.get(k), dict):
            base[k] = {**base[k], **v}
        else:
            base[k] = _coerce(key, v, dv)


def load_defaults() -> dict:
    return yaml_load(DEFAULT_CONFIG.read_text())


def find_config(name: str) -> Path:
    """``name`` as a path, else ``configs/name``, else ``configs/name.yaml``."""
    candidates = [Path(name), CONFIG_DIR / name, CONFIG_DIR / f"{name}.yaml", CONFIG_DIR / f"{name}.yml"]
    for c in candidates:
        if c.is_file():
            return c
    raise UserError(f"config {name!r} not found: give a yaml path or one of {_config_names()}")


def _config_names() -> str:
    """The names ``--config`` (and ``base:``) accept under configs/, for error messages."""
    return ", ".join(sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))


def _yaml_reason(e: yaml.YAMLError) -> str:
    """What is wrong and where, in one line: PyYAML's first line is often only the context ("while constructing a
    mapping"), its problem ("found unhashable key") on a later one."""
    if isinstance(e, DuplicateKeyError):
        return e.context
    problem, mark = getattr(e, "problem", None), getattr(e, "problem_mark", None)
    if problem:
        return f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else problem
    return str(e).splitlines()[0]


def _read_config_file(path: Path) -> Any:
    try:
        return yaml_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise UserError(f"{path}: not valid YAML ({_yaml_reason(e)})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read it as a UTF-8 text file ({e})") from None


MAX_BASE_DEPTH = 16


def config_chain(path: Path) -> list[tuple[Path, Any]]:
    """The files a task config resolves through, the outermost ``base`` first, each with its contents less the
    ``base`` key. A base is looked up beside the file naming it (``NAME``, ``NAME.yaml``, ``NAME.yml``; never the
    file itself), then under ``configs/``; a loop, a missing base or a base that is not a name is an error."""
    chain: list[tuple[Path, Any]] = []
    seen: list[Path] = []
    while True:
        real = path.resolve()
        if real in seen:
            raise UserError(f"config {seen[0].name}: its base configs loop back to {path} "
                            f"({' -> '.join(p.name for p in seen + [real])})")
        if len(seen) >= MAX_BASE_DEPTH:
            raise UserError(f"config {seen[0].name}: more than {MAX_BASE_DEPTH} files in one chain of base configs")
        seen.append(real)
        data = _read_config_file(path)
        if not isinstance(data, dict) or "base" not in data:
            chain.append((path, data))
            return chain[::-1]
        data = dict(data)
        base = data.pop("base")
        chain.append((path, data))
        if not isinstance(base, str) or not base.strip():
            raise UserError(f"{path}: base must name a config (a yaml path or a name under configs/), got {base!r}")
        base = base.strip()
        candidates = [d / f"{base}{ext}" for d in (path.parent, CONFIG_DIR) for ext in ("", ".yaml", ".yml")]
        existing = [c for c in candidates if c.is_file()]
        others = [c for c in existing if c.resolve() != real]
        if not others:
            raise UserError(f"{path}: base {base!r} names this file itself; name another config" if existing else
                            f"{path}: base config {base!r} not found beside it or under configs/ "
                            f"(a yaml path, or one of {_config_names()})")
        path = others[0]


def parse_set(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise UserError(f"--set {item!r}: expected section.key=value")
    key, _, raw = item.partition("=")
    key = key.strip()
    if not key:
        raise UserError(f"--set {item!r}: empty key")
    try:
        value = yaml_load(raw) if raw.strip() else ""
    except DuplicateKeyError as e:
        raise UserError(f"--set {item!r}: {str(e).splitlines()[0].split(' (lines')[0]}; keep one") from None
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def load_config(name: str | None = None, overrides: Iterable[str] = ()) -> Config:
    """Resolve defaults + task file + ``--set`` overrides into a :class:`Config`."""
    defaults = load_defaults()
    cfg = copy.deepcopy(defaults)
    if name:
        for path, data in config_chain(find_config(name)):
            try:
                merge_into(cfg, data, defaults, source=str(path), merge_free=True)
            except UserError as e:  # name the file of the chain the bad key came from
                raise (e if str(e).startswith(str(path)) else UserError(f"{path}: {e}")) from None
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


MAX_SEED = 2 ** 32 - 1
MAX_WORKERS = 1024  # threads and loader processes: more than any machine's cores


def _at_least(key: str, value: Any, least: float, finite: bool = True) -> None:
    """``value >= least`` (and finite); NaN fails every comparison, so it is refused too."""
    if not (value >= least) or (finite and not math.isfinite(value)):
        kind = "an integer" if isinstance(value, int) else "a finite number" if finite else "a number"
        raise UserError(f"config key {key}: must be {kind} >= {least:g}, got {value!r}")


def _at_most(key: str, value: Any, most: float, what: str) -> None:
    if value > most:
        raise UserError(f"config key {key}: {value!r} is more than {most:g} ({what})")


def _positive(key: str, value: Any) -> None:
    if not (value > 0) or not math.isfinite(value):
        raise UserError(f"config key {key}: must be a finite number > 0, got {value!r}")


def validate(cfg: dict) -> None:
    """Checks of values (not only types) that would otherwise fail late in a run, or give a wrong run."""
    _one_of("precision", cfg["precision"], ["auto", "fp32", "bf16"])
    dev = cfg["device"]
    if not (dev in ("auto", "cpu", "cuda") or (isinstance(dev, str) and re.fullmatch(r"cuda:\d+", dev))):
        raise UserError(f"config key device: {dev!r} is not one of auto, cpu, cuda, cuda:N")
    if not str(cfg["output_dir"]).strip():
        raise UserError("config key output_dir: empty; give the folder the run writes into (e.g. runs/my_task)")
    for key, seed in (("seed", cfg["seed"]), ("search.seed", cfg["search"]["seed"]),
                      ("data.seed", cfg["data"]["seed"])):
        if not 0 <= seed <= MAX_SEED:
            raise UserError(f"config key {key}: must be an integer in [0, {MAX_SEED}], got {seed}")
    _at_least("threads", cfg["threads"], 0)
    _at_most("threads", cfg["threads"], MAX_WORKERS, "0 uses torch's default, one per core")
    m = cfg["model"]
    if not str(m["name"]).strip():
        raise UserError("config key model.name: empty; give a timm model name (timm.list_models())")
    _at_least("model.num_blocks", m["num_blocks"], 0)
    d = cfg["data"]
    for key in ("root", "task"):
        if not str(d[key]).strip():
            raise UserError(f"config key data.{key}: empty")
    if "/" in d["task"] or "\\" in d["task"] or d["task"] in (".", ".."):
        raise UserError(f"config key data.task: {d['task']!r} must be a task folder name under data.root")
    _at_least("data.image_size", d["image_size"], 0)
    _at_least("data.num_workers", d["num_workers"], 0)
    _at_most("data.num_workers", d["num_workers"], MAX_WORKERS, "about one loader process per core is plenty")
    _at_most("data.image_size", d["image_size"], 4096, "0 uses the model's own input size")
    if d["on_device"] not in ("auto", True, False):
        raise UserError(f"config key data.on_device: {d['on_device']!r} is not one of auto, true, false")
    r = cfg["retrain"]
    rd = r["dir"]
    if not rd or "/" in rd or "\\" in rd or rd.startswith(".") or rd in ("supernet", "search"):
        raise UserError(f"config key retrain.dir: {rd!r} must be a plain folder name, not hidden (no leading dot), "
                        "other than supernet, search")
    _one_of("retrain.init", r["init"], ["supernet", "scratch"])
    _one_of("retrain.select_by", r["select_by"], ["top1", "loss"])
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
        same = [g for g in grid if lr_tag(g) == lr_tag(f)]
        if same:
            raise UserError(f"config key retrain.lr_grid: {same[0]:g} and {f:g} name the same run folder "
                            f"({lr_tag(f)}: lrs are named to 3 significant digits); give distinct lrs")
        grid.append(f)
    cfg["retrain"]["lr_grid"] = grid
    epochs_grid = []
    for v in cfg["retrain"]["epochs_grid"]:
        v = _number(v)  # "10" as 10, as for retrain.epochs
        if isinstance(v, float) and math.isfinite(v) and v.is_integer():
            v = int(v)
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise UserError(f"config key retrain.epochs_grid: {v!r} is not a whole number of epochs >= 1 "
                            f"(e.g. [5, 10])")
        if v in epochs_grid:
            raise UserError(f"config key retrain.epochs_grid: {v} appears twice; give distinct epoch counts")
        epochs_grid.append(v)
    cfg["retrain"]["epochs_grid"] = epochs_grid
    _one_of("supernet.path_sampling", cfg["supernet"]["path_sampling"], ["uniform", "budget", "fair", "sandwich"])
    _one_of("glora.parametrisation", cfg["glora"]["parametrisation"], ["paper", "scaled"])
    for key in ("a_lora_scale", "vector_scale"):
        v = cfg["glora"][key]
        if not v > 0 or v == float("inf"):
            raise UserError(f"config key glora.{key}: must be a positive number, got {v}")
        if v != 1.0 and cfg["glora"]["parametrisation"] != "scaled":
            raise UserError(f"config key glora.{key}: {v} has no effect with glora.parametrisation "
                            f"{cfg['glora']['parametrisation']!r}; set glora.parametrisation=scaled or leave it at 1")
    for sec, key in [("supernet", "epochs"), ("retrain", "epochs"), ("search", "generations"),
                     ("search", "population"), ("data", "batch_size"), ("data", "eval_batch_size")]:
        if cfg[sec][key] < 1 and not (key == "epochs" and cfg[sec][key] == 0):
            raise UserError(f"config key {sec}.{key}: must be >= 1, got {cfg[sec][key]}")
    for sec in ("supernet", "retrain"):
        t = cfg[sec]
        _positive(f"{sec}.lr", t["lr"])
        for key in ("weight_decay", "warmup_epochs", "min_lr", "head_lr_scale", "max_steps_per_epoch"):
            _at_least(f"{sec}.{key}", t[key], 0)
        _at_most(f"{sec}.warmup_epochs", t["warmup_epochs"], 1e6, "a warmup longer than the training only keeps "
                 "every lr below its peak")
        grid = sec == "retrain" and bool(t["lr_grid"])
        lrs = list(t["lr_grid"]) if grid else [t["lr"]]
        if t["min_lr"] > min(lrs):
            which = "the smallest of retrain.lr_grid" if grid else f"{sec}.lr"
            raise UserError(f"config key {sec}.min_lr: {t['min_lr']:g} is above {which} ({min(lrs):g}); the cosine "
                            f"schedule falls from the lr to min_lr, so min_lr must be at most the lr (e.g. 1e-6)")
    _at_least("supernet.grad_clip", cfg["supernet"]["grad_clip"], 0)
    _at_least("supernet.probe_paths", cfg["supernet"]["probe_paths"], 0)
    if not 1 <= cfg["supernet"]["sandwich_paths"] <= 64:
        raise UserError(f"config key supernet.sandwich_paths: must be an integer from 1 to 64 (passes per step "
                        f"besides the largest path), got {cfg['supernet']['sandwich_paths']!r}")
    _at_least("retrain.merge_atol", r["merge_atol"], 0)
    dp = r["drop_path_rate"]
    if dp is not None and (isinstance(dp, bool) or not isinstance(dp, (int, float)) or not 0 <= dp < 1):
        raise UserError(f"config key retrain.drop_path_rate: must be null (the model's own) or a number in [0, 1) "
                        f"(the stochastic depth of the last block), got {dp!r}")
    if dp is not None and cfg["model"].get("source", "timm") == "hf":
        raise UserError(f"config key retrain.drop_path_rate: {dp!r} works on timm models only; for model.source hf "
                        "leave it null and set the model's own dropout in model.kwargs")
    if not (r["refit_guard"] == 0 or r["refit_guard"] >= 1) or not math.isfinite(r["refit_guard"]):
        raise UserError(f"config key retrain.refit_guard: must be 0 (off) or a finite number >= 1 (a factor on the "
                        f"train800 loss), got {r['refit_guard']!r}")
    s = cfg["search"]
    if not 0.0 <= s["mutation_prob"] <= 1.0:
        raise UserError(f"config key search.mutation_prob: must be in [0, 1], got {s['mutation_prob']}")
    if s["select"] < 1:
        raise UserError(f"config key search.select: must be >= 1, got {s['select']}")
    for key in ("mutation", "crossover", "max_eval_batches", "min_params_m", "max_params_m"):
        _at_least(f"search.{key}", s[key], 0)
    for key in ("mutation", "crossover"):  # children made per generation, each scored on the val split
        _at_most(f"search.{key}", s[key], 100_000, "children scored per generation")
    if s["min_params_m"] > s["max_params_m"]:
        raise UserError(f"search.min_params_m ({s['min_params_m']}) is above search.max_params_m "
                        f"({s['max_params_m']})")
    g = cfg["glora"]
    ranks = g["ranks"]
    if not ranks or any(r <= 0 for r in ranks):
        raise UserError(f"config key glora.ranks: expected positive integers, got {ranks}")
    for key in ("target_modules", "choices_ab", "choices_c", "choices_de"):
        if not g[key] or not all(isinstance(x, str) and x.strip() for x in g[key]):
            raise UserError(f"config key glora.{key}: expected a non-empty list of names, got {g[key]}")
    for key, shared in (("choices_a", "choices_ab"), ("choices_b", "choices_ab"), ("choices_d", "choices_de"),
                        ("choices_e", "choices_de")):  # optional: null means the shared list
        v = g[key]
        if v is not None and (not isinstance(v, list) or not v or not all(isinstance(x, str) and x.strip() for x in v)):
            raise UserError(f"config key glora.{key}: expected null (use {shared}) or a non-empty list of names, "
                            f"got {v!r}")


def dump_config(cfg: dict, path: str | Path) -> None:
    from .io import atomic_write_yaml
    atomic_write_yaml(path, _plain(cfg))
