"""The retrain stage: compact model of the searched subnet, fine-tune on train800val200, test, merge."""
from __future__ import annotations

import copy
import json
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn as nn

from glora.core import accel, dist
from glora.core.build import (build_backbone, first_batch, load_split, model_source, prepare_data, stage_dir, stream_batches,
                          tokenizer_source)
from glora.core.checkpoint import CHECKPOINT
from glora.core.clock import running_clock
from glora.core.config import Config, lr_tag
from glora.core.engine import InMemorySplit, autocast, evaluate, evaluate_with_loss, resolve_device, set_threads
from glora.core.errors import UserError
from glora.core.io import atomic_save_safetensors, atomic_write_json, read_jsonl
from glora.core.trainer import LOG, FitSpec, fit
from supernet.inject import freeze_all_but, head_names, head_parameters
from supernet.space import LayerChoice, SearchSpace, Subnet

from retrain.build import adapter_parameters, apply_subnet, layer_specs, merge_and_unload

_logger = logging.getLogger(__name__)
MERGED = "model_merged.safetensors"
MERGED_PRETRAINED = "merged"  # model.source: hf
METRICS = "metrics.json"


ADAPTERS = "adapters.safetensors"


def retrain_complete(cfg: Config) -> bool:
    """The metrics and both model files are there (a deleted model file is made again by a rerun, which reuses
    every trained point)."""
    out = Path(cfg.output_dir) / cfg.retrain.dir
    return all((out / f).is_file() for f in (METRICS, MERGED, ADAPTERS))


def subnet_path(cfg: Config) -> Path:
    if cfg.retrain.subnet:
        return Path(cfg.retrain.subnet)
    p = Path(cfg.output_dir) / "search" / "subnet.yaml"
    if not p.is_file():
        raise UserError(f"no subnet to retrain: {p} does not exist; run --stage search first or give --subnet PATH")
    return p


def build_compact_model(cfg: Config, subnet: Subnet, num_classes: int,
                        device: torch.device) -> tuple[nn.Module, SearchSpace]:
    """The backbone with only the subnet's tensors, initialised per ``retrain.init``; and the layer space."""
    g = cfg.glora
    if cfg.retrain.init == "supernet":
        from glora.stages.supernet import load_trained_supernet
        sn = load_trained_supernet(cfg, num_classes, device)
        space = sn.space
        space.check_subnet(subnet, max_rank=space.max_rank)
        model = sn.model
    else:
        torch.manual_seed(cfg.seed)
        model = build_backbone(cfg, num_classes).to(device)
        space = SearchSpace(layer_specs(model, list(g.target_modules)), ranks=list(g.ranks))
        space.check_subnet(subnet)
    torch.manual_seed(cfg.seed + 1)  # fresh adapters (init: scratch) start the same whatever loading drew
    apply_subnet(model, subnet, parametrisation=g.parametrisation, a_lora_scale=g.a_lora_scale,
                 vector_scale=g.vector_scale)
    counted = space.params(subnet)
    actual = sum(p.numel() for p in adapter_parameters(model))
    if counted != actual:
        raise RuntimeError(f"compact model has {actual} adapter parameters, the subnet counts {counted}")
    return model, space


def reference_backbone(cfg: Config, num_classes: int) -> nn.Module:
    """The untouched timm (or Hugging Face) model the merged weights must load into (only keys and shapes)."""
    from glora.core.build import reference_model
    return reference_model(cfg, num_classes)


MERGE_CHECK_IMAGES = 16  # images of the first test batch on which the merge is checked in float64
MERGE_RTOL_FP64 = 1e-6  # of the largest float64 logit (at least 1): float64 rounding is about 1e-13 of it


def merge_error_fp64(model: nn.Module, x: torch.Tensor) -> tuple[float, float]:
    """(largest logit difference between the adapted model and its merge, largest |logit|), both models computed
    in float64.

    The check is of the merge's algebra. In fp32 the two models round differently, and through a deep network
    that rounding alone reaches 1.5e-3 in the logits at 224 px on a GPU (bench/accuracy.md, item 14); in float64
    it is about 1e-13, so a tolerance of 1e-6 of the logits' size leaves exact merges seven orders of margin and
    still catches a wrong one."""
    m64 = copy.deepcopy(model).double().eval()  # one copy, merged in place after its adapted logits are taken
    with torch.no_grad():
        x64 = x.double() if x.is_floating_point() else x  # token ids (text models) stay integers
        adapted = m64(x64).double()
        merged = merge_and_unload(m64)(x64).double()
    return float((adapted - merged).abs().max()), float(adapted.abs().max())


def merge_tolerance_fp64(merge_atol: float, scale: float) -> float:
    """``retrain.merge_atol`` or ``MERGE_RTOL_FP64`` of the logits' size, whichever is tighter."""
    return min(float(merge_atol), MERGE_RTOL_FP64 * max(1.0, scale))


def check_merged_keys(merged_sd: dict, reference: nn.Module) -> None:
    ref = reference.state_dict()
    missing, extra = set(ref) - set(merged_sd), set(merged_sd) - set(ref)
    bad = [k for k in set(ref) & set(merged_sd) if tuple(ref[k].shape) != tuple(merged_sd[k].shape)]
    if missing or extra or bad:
        raise RuntimeError(f"merged state dict differs from the timm model: missing {sorted(missing)[:3]}, "
                           f"extra {sorted(extra)[:3]}, shape mismatch {sorted(bad)[:3]}")
    reference.load_state_dict(merged_sd, strict=True)


def _fit_spec(cfg: Config, desc: str, fingerprint: dict, lr: float | None = None,
              epochs: int | None = None) -> FitSpec:
    r = cfg.retrain
    return FitSpec(epochs=r.epochs if epochs is None else epochs, lr=r.lr if lr is None else lr,
                   weight_decay=r.weight_decay, warmup_epochs=r.warmup_epochs, min_lr=r.min_lr,
                   max_steps_per_epoch=r.max_steps_per_epoch,
                   batch_size=cfg.data.batch_size, seed=cfg.seed, precision=cfg.precision, desc=desc,
                   fingerprint=fingerprint, head_lr_scale=r.head_lr_scale)


def lora_baseline(space: SearchSpace, budget: int) -> tuple[Subnet, int]:
    """The uniform LoRA of the same targets: B = ``lora_<r>``, A, C, D, E ``none``, with the largest r whose
    parameter count does not exceed ``budget`` (rank 1 when even that is larger). Returns it and r."""
    rank = 1
    while space.params(space.uniform(LayerChoice(B=f"lora_{rank + 1}"))) <= budget:
        rank += 1
    return space.uniform(LayerChoice(B=f"lora_{rank}")), rank


def topk_subnets(cfg: Config, k: int) -> list[Subnet]:
    """The best ``k`` subnets of the search (``search/topk.yaml``), best first."""
    path = Path(cfg.output_dir) / "search" / "topk.yaml"
    if not path.is_file():
        raise UserError(f"retrain.top_k={k} needs {path}; run the search first")
    import yaml
    data = yaml.safe_load(path.read_text())
    names = data["names"]
    return [Subnet.from_dict({"layers": [dict(zip("ABCDE", lc), name=n) for n, lc in zip(names, e["layers"])]},
                             source=str(path)) for e in data["topk"][:k]]


class Method:
    """One way to fine-tune the backbone on a task: the searched GLoRA subnet or a baseline."""

    def __init__(self, key: str, label: str, subnet: Subnet | None, init: str):
        self.key, self.label, self.subnet, self.init = key, label, subnet, init

    def fingerprint(self, cfg: Config) -> dict:
        fp = {"model": cfg.model.to_dict(), "task": [cfg.data.root, cfg.data.task], "method": self.key,
              "init": self.init, "glora": {k: cfg.glora[k] for k in ("parametrisation", "a_lora_scale")}}
        if cfg.glora.vector_scale != 1.0:  # only away from its default: older run folders keep their fingerprint
            fp["glora"]["vector_scale"] = cfg.glora.vector_scale
        if cfg.data.seed != 0:  # the same: an offline task generated from another seed holds other images
            fp["data_seed"] = cfg.data.seed
        if self.subnet is not None:
            fp.update(subnet=[list(c) for c in self.subnet.layers], names=list(self.subnet.names))
        return fp

    def build(self, cfg: Config, num_classes: int, device: torch.device) -> nn.Module:
        if self.subnet is None:  # the classifier head alone
            torch.manual_seed(cfg.seed)
            model = build_backbone(cfg, num_classes).to(device)
            freeze_all_but(model, head_parameters(model))
            return model
        if self.init == "supernet":
            return build_compact_model(cfg, self.subnet, num_classes, device)[0]
        torch.manual_seed(cfg.seed)
        model = build_backbone(cfg, num_classes).to(device)
        torch.manual_seed(cfg.seed + 1)
        return apply_subnet(model, self.subnet, parametrisation=cfg.glora.parametrisation,
                            a_lora_scale=cfg.glora.a_lora_scale, vector_scale=cfg.glora.vector_scale)


def _has_feature_head(model: nn.Module) -> bool:
    return (callable(getattr(model, "forward_features", None)) and callable(getattr(model, "forward_head", None))
            and callable(getattr(model, "get_classifier", None)) and isinstance(model.get_classifier(), nn.Linear))


@torch.no_grad()
def head_features(model: nn.Module, split: InMemorySplit, device: torch.device, precision: str,
                  batch_size: int) -> InMemorySplit:
    """The frozen backbone's pre-logits features of a split (same order and labels), computed once.

    Under torchrun every rank computes the features of the whole split (``shard=False``), so the feature split
    is the image split's twin on every rank and ``fit`` / ``evaluate`` slice it per rank as they slice images."""
    model.eval()
    feats = []
    for x, _ in split.batches(batch_size, shard=False):
        with autocast(device, precision):
            f = model.forward_head(model.forward_features(x.to(device)), pre_logits=True)
        feats.append(f.float().to(split.images.device))  # where the split is (the CPU, or the GPU)
    return InMemorySplit(torch.cat(feats), split.labels)


def trainable_view(cfg: Config, method: "Method", model: nn.Module, splits: list, device: torch.device,
                   cache: dict) -> tuple[nn.Module, list]:
    """What ``fit`` trains and on which data. The head-only baseline trains the classifier on features the
    frozen backbone computes once per split (the same function and gradients as running the whole model every
    step, for a backbone without active dropout); everything else trains the whole model on the images."""
    if method.subnet is not None or not _has_feature_head(model):
        return model, splits
    out = []
    for sp in splits:
        if id(sp) not in cache:
            cache[id(sp)] = head_features(model, sp, device, cfg.precision, cfg.data.eval_batch_size)
        out.append(cache[id(sp)])
    return model.get_classifier(), out


def _stored_val(done: Path, fingerprint: dict, select_by: str) -> tuple[float, float | None] | None:
    """The val200 (top-1, loss) a finished grid point kept in ``val.json``; None when there is none for these
    settings, or when ``select_by`` needs a loss that an older record lacks (its finished checkpoint then
    reloads in ``fit`` without training, and val200 is scored again)."""
    if not done.is_file():
        return None
    rec = json.loads(done.read_text())
    if rec.get("fingerprint") != json.loads(json.dumps(fingerprint)):
        return None
    if select_by == "loss" and "val_loss" not in rec:
        return None
    loss = rec.get("val_loss")  # null: the point diverged (a non-finite loss)
    return float(rec["val_acc"]), (None if loss is None else float(loss))


FIT_TIME = "fit_time.json"  # beside each grid point's and refit's checkpoint: its seconds over every session


def _stored_seconds(done: Path) -> float:
    """The seconds a finished grid point kept in ``val.json`` (0 for a record written before it kept them)."""
    t = json.loads(done.read_text()).get("time_s", 0.0)
    return float(t) if isinstance(t, (int, float)) and math.isfinite(t) and t >= 0 else 0.0


def _last_loss(log: list[dict]) -> float | None:
    """The last epoch's mean train loss of a ``fit`` log; None without one, or when it is not finite."""
    loss = log[-1].get("loss") if log else None
    return float(loss) if isinstance(loss, (int, float)) and math.isfinite(loss) else None


def _stored_train_loss(done: Path, log_path: Path) -> float | None:
    """A finished grid point's last-epoch train loss: from ``val.json``, or for a record written before it kept
    one, from the point's training log."""
    rec = json.loads(done.read_text())
    if "train_loss" in rec:
        tl = rec["train_loss"]
        return None if tl is None else float(tl)
    return _last_loss(read_jsonl(log_path))


REFIT_SLACK = 0.1  # train-loss points allowed on top of refit_guard x the train800 loss (a loss near 0 doubles freely)


def refit_diverged(refit_loss: float | None, select_loss: float | None, guard: float) -> bool:
    """Whether the train800val200 refit at an lr diverged: its last-epoch train loss is not finite, or ends above
    ``guard`` times the train800 run's at the same lr plus ``REFIT_SLACK``. ``guard`` 0 turns it off; a finite
    refit with no train800 loss to compare with gets no verdict (False)."""
    if guard <= 0:
        return False
    if refit_loss is None:
        return True
    return select_loss is not None and refit_loss > guard * select_loss + REFIT_SLACK


def selection_key(select_by: str, acc: float, loss: float | None) -> float:
    """Larger is better: val200 top-1, or minus the val200 loss with ``retrain.select_by: loss`` (a diverged
    point, whose loss is missing or not finite, ranks last)."""
    if select_by != "loss":
        return float(acc)
    return -float(loss) if loss is not None and math.isfinite(loss) else -math.inf


Point = tuple  # (lr, epochs): one setting of the retrain's grid


def grid_points(cfg: Config, always: bool = False) -> list[Point]:
    """The (lr, epochs) settings chosen among on val200: every ``retrain.lr_grid`` value with every
    ``retrain.epochs_grid`` value (an empty grid stands for ``retrain.lr`` / ``retrain.epochs``); none when
    neither grid is set, unless ``always``."""
    r = cfg.retrain
    if not (r.lr_grid or r.epochs_grid or always):
        return []
    return [(float(lr), int(ep)) for lr in (r.lr_grid or [r.lr]) for ep in (r.epochs_grid or [r.epochs])]


def point_key(cfg: Config, point: Point) -> str:
    """A point's key in ``metrics.json`` (``val_acc_by_lr`` and the rest): the lr (``"0.001"``), with an epochs
    grid also the epochs (``"0.001@10ep"``)."""
    lr, epochs = point
    return f"{lr!r}@{epochs}ep" if cfg.retrain.epochs_grid else repr(lr)


def point_tag(cfg: Config, point: Point) -> str:
    """A point's folder name part: ``lr0.001``; ``lr0.001_e10`` for epochs other than ``retrain.epochs`` (so the
    folders of a run without an epochs grid are the same points of one with it)."""
    lr, epochs = point
    return lr_tag(lr) + ("" if epochs == cfg.retrain.epochs else f"_e{epochs}")


def point_label(point: Point, with_epochs: bool) -> str:
    """``1e-03`` or, with an epochs grid, ``1e-03 x 10 ep`` (the summary, logs and warnings)."""
    return f"{point[0]:.0e}" + (f" x {point[1]} ep" if with_epochs else "")


def select_lr(cfg: Config, method: Method, num_classes: int, train800, val200, out: Path,
              device: torch.device, progress: bool, always: bool = False
              ) -> tuple[Point, dict[str, float], dict[str, float], dict[str, float], float]:
    """The VTAB-1k protocol: train on train800 at each point of the grid (``grid_points``: ``retrain.lr_grid``
    by ``retrain.epochs_grid``), score val200, keep the best by ``retrain.select_by`` (top-1, or the lowest loss;
    on a tie the smaller lr, then the fewer epochs). Each grid point is resumable and its scores are kept in
    ``val.json``. Returns (chosen (lr, epochs), {key: val top-1}, {key: val loss}, {key: last-epoch train loss
    on train800}, seconds spent on the grid over every session that ran it), keyed by ``point_key``. ``always``: score ``retrain.lr`` at ``retrain.epochs``
    on val200 even without a grid."""
    grid = grid_points(cfg, always)
    if not grid:
        return (float(cfg.retrain.lr), int(cfg.retrain.epochs)), {}, {}, {}, 0.0
    select_by = cfg.retrain.select_by
    spent = 0.0  # a point scored in an earlier session adds the seconds it kept
    scores: dict[str, float] = {}
    losses: dict[str, float] = {}
    train_losses: dict[str, float] = {}
    feats: dict = {}
    for point in grid:
        lr, epochs = point
        key = point_key(cfg, point)
        d = out / "select" / f"{method.key}_{point_tag(cfg, point)}"
        done = d / "val.json"
        fit_fp = dict(method.fingerprint(cfg), split="train800", lr=lr)  # not select_by: the training is the same
        fp = dict(fit_fp)  # val.json's: with an epochs grid, the epochs too (the checkpoint has them in its fit spec,
        if cfg.retrain.epochs_grid:  # so a point trained without the grid reloads and is only scored again)
            fp["epochs"] = epochs
        stored = dist.on_main(lambda: _stored_val(done, fp, select_by))  # rank 0's reading decides for every rank
        if stored is not None:
            scores[key] = stored[0]
            if stored[1] is not None:
                losses[key] = stored[1]
            tl = dist.on_main(lambda: _stored_train_loss(done, d / LOG))
            if tl is not None:
                train_losses[key] = tl
            spent += dist.on_main(lambda: _stored_seconds(done))
            continue
        with running_clock(d / FIT_TIME, resume=dist.agree((d / CHECKPOINT).is_file())) as clock:
            model = method.build(cfg, num_classes, device)
            net, (tr, va) = trainable_view(cfg, method, model, [train800, val200], device, feats)
            named = {n: p for n, p in model.named_parameters() if p.requires_grad}
            net = accel.maybe_compile(net, cfg.retrain.compile)
            log = fit(net, named, tr, _fit_spec(cfg, f"{method.key} {point_tag(cfg, point)} (train800)", fit_fp,
                                                lr=lr, epochs=epochs), d,
                      device, progress=progress, head_names=head_names(model))
            acc, loss = evaluate_with_loss(net, va.batches(cfg.data.eval_batch_size), device, cfg.precision)
        seconds = clock.seconds()
        spent += seconds
        _logger.info("%s: lr %.3g, %d epochs -> val200 top-1 %.4f, loss %.4f", method.label, lr, epochs, acc, loss)
        loss = loss if math.isfinite(loss) else None  # JSON has no NaN; a diverged point ranks last
        tl = dist.agree(_last_loss(log))  # rank 0's reading: the refit fallbacks depend on it
        if dist.is_main():
            atomic_write_json(done, {"val_acc": acc, "val_loss": loss, "train_loss": tl, "lr": lr, "epochs": epochs,
                                     "fingerprint": fp, "time_s": round(seconds, 1)})
        scores[key] = acc
        if loss is not None:
            losses[key] = loss
        if tl is not None:
            train_losses[key] = tl
    best = max(grid, key=lambda p: point_rank(cfg, p, scores, losses))
    return best, scores, losses, train_losses, spent


def point_rank(cfg: Config, point: Point, scores: dict, losses: dict) -> tuple:
    """Larger is better: the val200 selection key, then the smaller lr, then the fewer epochs."""
    key = point_key(cfg, point)
    return selection_key(cfg.retrain.select_by, scores[key], losses.get(key)), -point[0], -point[1]


def run_method(cfg: Config, method: Method, num_classes: int, splits: dict, out: Path,
               device: torch.device, progress: bool) -> tuple[nn.Module, dict]:
    """Choose the lr (and with ``retrain.epochs_grid`` the epochs) on val200 (grid runs under
    ``<retrain dir>/select/``), then train on train800val200 with it into ``out``. When that refit diverges
    (``refit_diverged``: its train loss far above the same point's on train800), it is trained again at the next
    point of the grid by val200, under ``out/refit/<point>``; every attempt is listed under ``refits``. The caller
    scores test, once."""
    chosen, scores, losses, train_losses, t_select = select_lr(cfg, method, num_classes, splits.get("train800"),
                                                               splits.get("val200"), stage_dir(cfg, cfg.retrain.dir),
                                                               device, progress)
    with_epochs = bool(cfg.retrain.epochs_grid)
    # the fallbacks: the grid's other points by val200, less those whose train800 run did not end finite
    order = [chosen] + sorted((p for p in grid_points(cfg) if p != chosen and point_key(cfg, p) in train_losses),
                              key=lambda p: point_rank(cfg, p, scores, losses), reverse=True)
    t0 = time.time()
    refits: list[dict] = []
    feats: dict = {}  # head-only: the frozen backbone's features, computed once for every attempt
    guard = cfg.retrain.refit_guard
    earlier: dict[Path, float] = {}  # each refit folder's seconds from earlier sessions (counted once)

    def attempt(i: int) -> tuple[nn.Module, list[dict]]:
        model = method.build(cfg, num_classes, device)
        net, (train,) = trainable_view(cfg, method, model, [splits["train800val200"]], device, feats)
        named = {n: p for n, p in model.named_parameters() if p.requires_grad}
        lr, epochs = order[i]
        fp = dict(method.fingerprint(cfg), lr=lr)  # the epochs are in the checkpoint's fingerprint (the fit spec)
        if not method.key.startswith("glora"):
            fp["split"] = "train800val200"
        d = out if i == 0 else out / "refit" / point_tag(cfg, order[i])
        with running_clock(d / FIT_TIME, resume=dist.agree((d / CHECKPOINT).is_file())) as clock:
            log = fit(accel.maybe_compile(net, cfg.retrain.compile), named, train,
                      _fit_spec(cfg, f"{method.key} (train800val200)", fp, lr=lr, epochs=epochs), d,
                      device, progress=progress, head_names=head_names(model))
        earlier.setdefault(d, clock.before)
        return model, log

    for i, point in enumerate(order):
        model, log = attempt(i)
        loss, select_loss = _last_loss(log), train_losses.get(point_key(cfg, point))
        # rank 0's verdict for every rank: the others must not take a different branch (another fit, or test)
        diverged = dist.agree(refit_diverged(loss, select_loss, guard))
        refits.append({"lr": point[0], **({"epochs": point[1]} if with_epochs else {}), "train_loss": loss,
                       "train800_loss": select_loss, "diverged": diverged})
        if not diverged:
            break
        _logger.warning("%s: the train800val200 refit at lr %s ended at train loss %s against %s on train800 at "
                        "the same setting (retrain.refit_guard %g): diverged; %s", method.label,
                        point_label(point, with_epochs), "nan" if loss is None else f"{loss:.4f}",
                        "nan" if select_loss is None else f"{select_loss:.4f}", guard,
                        f"training again at lr {point_label(order[i + 1], with_epochs)}, the next by val200"
                        if i + 1 < len(order) else "no point of the grid is left")
        if i + 1 < len(order):
            del model  # before the next attempt builds its own
    else:
        # every lr diverged: keep the attempt whose refit ended closest to its train800 loss (the val200 choice on
        # a tie); its finished checkpoint reloads without training
        def ratio(a):
            return (a["train_loss"] if a["train_loss"] is not None else math.inf) / max(a["train800_loss"] or 0, 1e-8)
        best = min(range(len(refits)), key=lambda i: (ratio(refits[i]), i))
        point = order[best]
        _logger.warning("%s: every refit diverged; keeping lr %s (the closest to its train800 loss)",
                        method.label, point_label(point, with_epochs))
        if best != len(refits) - 1:
            del model
            model, _ = attempt(best)
        refits[best]["kept"] = True
    info = {"lr": point[0], "epochs": point[1], "val_acc": scores.get(point_key(cfg, point)),
            "val_acc_by_lr": scores, "val_loss_by_lr": losses, "train800_loss_by_lr": train_losses,
            "refits": refits, "select_time_s": round(t_select, 1),
            "train_time_s": round(time.time() - t0 + sum(earlier.values()), 1),
            "adapter_params": sum(p.numel() for p in adapter_parameters(model)),
            "head_params": sum(p.numel() for p in head_parameters(model))}
    return model, info


def retrain_model_config(cfg: Config) -> Config:
    """``cfg`` with ``retrain.drop_path_rate`` (when set) in place of the model's own: every model the retrain
    builds (GLoRA's, from the supernet or from scratch, and each baseline's) trains with that stochastic depth, and
    its grid points are keyed by it (the model is in their fingerprint). Stochastic depth holds no weights, so the
    supernet's adapters load as they were saved."""
    dp = cfg.retrain.drop_path_rate
    if dp is None:
        return cfg
    cfg = copy.deepcopy(cfg)
    cfg.model.kwargs["drop_path_rate"] = float(dp)
    return cfg


def run_retrain(cfg: Config, progress: bool = True) -> dict:
    model_kwargs = dict(cfg.model.kwargs)  # what the merged model's file records: inference has no stochastic depth
    cfg = retrain_model_config(cfg)
    set_threads(cfg.threads)
    device = resolve_device(cfg.device)
    accel.configure(cfg, device)
    out = stage_dir(cfg, cfg.retrain.dir)
    num_classes = prepare_data(cfg)
    spath = subnet_path(cfg)
    subnet = Subnet.from_yaml(spath)
    model, space = build_compact_model(cfg, subnet, num_classes, device)  # checks the subnet against the model
    del model
    candidates = [subnet]
    if cfg.retrain.top_k > 1 and not cfg.retrain.subnet:
        candidates += [c for c in topk_subnets(cfg, cfg.retrain.top_k) if c != subnet][:cfg.retrain.top_k - 1]

    splits = {"train800val200": load_split(cfg, model_for_data(cfg, num_classes), "train800val200", progress=progress,
                                           device=device)}
    if grid_points(cfg) or len(candidates) > 1:
        ref = model_for_data(cfg, num_classes)
        splits["train800"] = load_split(cfg, ref, "train800", progress=progress, device=device)
        splits["val200"] = load_split(cfg, ref, "val200", progress=progress, device=device)
    test_ds = load_split(cfg, model_for_data(cfg, num_classes), "test", in_memory=False)

    glora = Method("glora", "GLoRA (searched)", subnet, cfg.retrain.init)
    cand_info = []
    if len(candidates) > 1:  # the architecture is chosen on val200 too, among the search's top-k
        for i, c in enumerate(candidates):
            m = Method(f"glora_top{i + 1}", "GLoRA (searched)", c, cfg.retrain.init)
            point, scores, losses, _, t_sel = select_lr(cfg, m, num_classes, splits["train800"], splits["val200"],
                                                     out, device, progress, always=True)
            key = point_key(cfg, point)
            cand_info.append({"rank": i + 1, "params": space.params(c), "lr": point[0], "epochs": point[1],
                              "val_acc": scores[key], "val_loss": losses.get(key), "select_time_s": round(t_sel, 1),
                              "method": m})
        best = max(cand_info, key=lambda d: (selection_key(cfg.retrain.select_by, d["val_acc"], d["val_loss"]),
                                             -d["rank"]))
        glora, subnet = best["method"], best["method"].subnet
        _logger.info("retrain: top-%d subnet of the search chosen on val200 by %s (top-1 %.4f, loss %s)",
                     best["rank"], cfg.retrain.select_by, best["val_acc"],
                     "-" if best["val_loss"] is None else f"{best['val_loss']:.4f}")
    adapter_params = space.params(subnet)
    if dist.on_main(lambda: (out / CHECKPOINT).is_file() and (out / "subnet.yaml").is_file() and
                    Subnet.from_yaml(out / "subnet.yaml") != subnet):  # rank 0 reads it, before it writes it below
        raise UserError(f"{out} holds the retrain of another subnet; keep it and retrain this one elsewhere "
                        f"with --set retrain.dir=retrain-2 (or delete {out})")
    methods = [glora]
    lora_rank_used = None
    for b in cfg.retrain.baselines:
        if b == "lora":
            if cfg.retrain.lora_rank:
                lora_rank_used = int(cfg.retrain.lora_rank)
                lsub = space.uniform(LayerChoice(B=f"lora_{lora_rank_used}"))
            else:
                lsub, lora_rank_used = lora_baseline(space, adapter_params)
            label = f"LoRA r={lora_rank_used}"
            if space.params(lsub) > adapter_params:  # not a comparison at equal budget: say so wherever it shows
                label += " (above GLoRA's params)"
                _logger.warning("LoRA baseline: r=%d has %d adapter params, more than the searched subnet's %d, so "
                                "the comparison is not at equal budget%s", lora_rank_used, space.params(lsub),
                                adapter_params, "" if cfg.retrain.lora_rank else " (even r=1 is above it)")
            methods.append(Method("lora", label, lsub, "scratch"))
        elif b == "head":
            methods.append(Method("head", "head only", None, "scratch"))
    if dist.is_main():
        subnet.to_yaml(out / "subnet.yaml", space.specs, model=cfg.model.name)

    # GLoRA: lr on val200, train800val200, merge, test once on the merged model
    model, info = run_method(cfg, methods[0], num_classes, splits, out, device, progress)
    if cand_info:
        info["select_time_s"] = round(sum(c["select_time_s"] for c in cand_info), 1)
        if info["val_acc"] is None:  # top-k without a grid: the candidate was scored at retrain.lr and epochs
            info["val_acc"] = best["val_acc"]
    if dist.is_main():
        atomic_save_safetensors(out / ADAPTERS,
                                {n: p for n, p in model.named_parameters() if p.requires_grad})
    model.eval()
    x = first_batch(cfg, test_ds).to(device)  # the same batch on every rank, decoded without loader workers
    diff64, scale = merge_error_fp64(model, x[:MERGE_CHECK_IMAGES])
    tol = merge_tolerance_fp64(cfg.retrain.merge_atol, scale)
    if not diff64 <= tol:
        raise RuntimeError(f"merged model differs from the adapted model by {diff64:.3g} in the float64 "
                           f"logits (tolerance {tol:.3g}: retrain.merge_atol={cfg.retrain.merge_atol} or "
                           f"{MERGE_RTOL_FP64:g} of the largest logit, {scale:.3g})")
    merged = merge_and_unload(copy.deepcopy(model))
    with torch.no_grad(), accel.fp32_exact():  # both in fp32 without TF32: what a user deploys, for the record
        after = merged(x).float()
        diff = float((model(x).float() - after).abs().max())
    if not torch.isfinite(after).all():
        raise RuntimeError("the merged model gives non-finite logits in fp32 (an adapter or weight overflows fp32)")
    merged_sd = {k: v.detach().cpu().contiguous() for k, v in merged.state_dict().items()}
    check_merged_keys(merged_sd, reference_backbone(cfg, num_classes))
    meta = {"model": cfg.model.name, "num_classes": str(num_classes), "kwargs": json.dumps(model_kwargs),
            "num_blocks": str(cfg.model.num_blocks)}
    if dist.is_main():
        atomic_save_safetensors(out / MERGED, merged_sd, metadata=meta)
        if model_source(cfg) == "hf":  # a plain Hugging Face folder beside it: from_pretrained loads it
            from glora.data.hf import save_pretrained_folder
            save_pretrained_folder(merged, tokenizer_source(cfg), out / MERGED_PRETRAINED)
    # the test split is scored once, on the merged model (what a user deploys); the adapted model computes the
    # same logits up to merge_max_abs_diff
    t0 = time.time()
    test_acc = evaluate(accel.maybe_compile(merged, cfg.retrain.compile), stream_batches(cfg, test_ds, device=device),
                        device, cfg.precision,
                        desc="test (merged)" if progress else "")
    info["test_time_s"] = round(time.time() - t0, 1)
    del model, merged

    baselines = {}
    for m in methods[1:]:
        bmodel, binfo = run_method(cfg, m, num_classes, splits, out / BASELINE_DIRS[m.key], device, progress)
        binfo["test_acc"] = evaluate(accel.maybe_compile(bmodel, cfg.retrain.compile),
                                     stream_batches(cfg, test_ds, device=device), device, cfg.precision,
                                     desc=f"test ({m.label})" if progress else "")
        binfo["label"] = m.label
        if m.key == "lora":
            binfo["rank"] = lora_rank_used
        baselines[m.key] = binfo
        _logger.info("baseline %s: test top-1 %.4f with %d adapter params (lr %.3g, %d epochs)", m.label,
                     binfo["test_acc"], binfo["adapter_params"], binfo["lr"], binfo["epochs"])
        del bmodel

    metrics = {"test_acc": test_acc, "num_classes": num_classes,
               "adapter_params": adapter_params, "head_params": info["head_params"], "merge_max_abs_diff": diff,
               "merge_max_abs_diff_fp64": diff64,
               "subnet": str(spath), "init": cfg.retrain.init, "lr": info["lr"], "epochs": info["epochs"],
               "drop_path_rate": cfg.retrain.drop_path_rate,
               "val_acc": info["val_acc"],
               "select_by": cfg.retrain.select_by, "epochs_grid": list(cfg.retrain.epochs_grid),
               "val_acc_by_lr": info["val_acc_by_lr"], "val_loss_by_lr": info["val_loss_by_lr"],
               "train800_loss_by_lr": info["train800_loss_by_lr"], "refits": info["refits"],
               "select_time_s": info["select_time_s"],
               "train_time_s": info["train_time_s"], "baselines": baselines,
               "candidates": [{k: v for k, v in c.items() if k != "method"} for c in cand_info],
               "search_rank": next((c["rank"] for c in cand_info if c["method"] is glora), 1),
               "head_only_test_acc": baselines.get("head", {}).get("test_acc")}
    if dist.is_main():
        atomic_write_json(out / METRICS, metrics)
    dist.barrier()  # the files are there for every rank (and the next command) once run_retrain returns
    _logger.info("retrain: test top-1 %.4f (merged model), %d adapter + %d head params, merge diff %.2e (fp32), "
                 "%.2e (float64)", test_acc, adapter_params, info["head_params"], diff, diff64)
    return dict(metrics, merged_file=str(out / MERGED))


BASELINE_DIRS = {"lora": "lora", "head": "head_only"}


def model_for_data(cfg: Config, num_classes: int) -> nn.Module:
    """A model to read the input size and normalisation from (no weights needed)."""
    return reference_backbone(cfg, num_classes)
