"""Run the stages of a config in turn, skipping finished ones, and summarise."""
from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import stat
import time
from pathlib import Path

from .core import dist
from .core.clock import running_clock
from .core.config import Config
from .core.io import atomic_write_json, is_partial_write
from .core.errors import UserError
from .preflight import SETTINGS, STAGES, check_stage_settings, forget_settings, record_settings, stage_folder

try:
    import fcntl
except ImportError:  # not on Windows: runs there are not locked
    fcntl = None

_logger = logging.getLogger("glora")


def _stage_fns():
    from glora.stages.retrain import retrain_complete, run_retrain
    from glora.stages.search import run_search, search_complete
    from glora.stages.supernet import supernet_complete, train_supernet
    return {
        "supernet": (supernet_complete, train_supernet),
        "search": (search_complete, run_search),
        "retrain": (retrain_complete, run_retrain),
    }


RESULT = "result.json"  # in each stage folder: what the stage returned, with its time
STAGE_TIME = "stage_time.json"  # in each stage folder: its seconds over every session that ran it (core.clock)
LOCK = ".lock"  # in output_dir: held (flock) by the command that runs stages there


def _open_lock(out: Path, create: bool) -> int | None:
    """The lock file's descriptor (never through a link: a ``.lock`` pointing at a result must not be written),
    or None when it is not there and ``create`` is false."""
    path = out / LOCK
    flags = (os.O_RDWR | os.O_CREAT if create else os.O_RDONLY) | getattr(os, "O_NOFOLLOW", 0)
    fd = None
    try:
        fd = os.open(path, flags, 0o666)
    except FileNotFoundError:
        if create:
            raise
        return None
    except OSError:
        if not (path.is_symlink() or path.is_dir()):
            raise
    if fd is None or not stat.S_ISREG(os.fstat(fd).st_mode):
        if fd is not None:
            os.close(fd)
        raise UserError(f"{path} is not a plain file (a link, a folder); the tool keeps its lock there: remove it "
                        "and run again")
    return fd


_UNLOCKABLE: set[str] = set()  # folders already warned about


def _busy(fd: int, out: Path, shared: bool) -> bool:
    """Take the lock on ``fd`` (True) or stop with the holder named; a file system without locks lets the run go
    on unguarded (False)."""
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        owner = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
        os.close(fd)
        raise UserError(f"output_dir {out} is in use by another command ({owner or 'holder unknown'}); "
                        f"wait for it to end, or give this one another output_dir") from None
    except OSError as e:  # some network mounts: run, unguarded
        if str(out) in _UNLOCKABLE:  # said once (the probe before preflight, then the hold)
            return False
        _UNLOCKABLE.add(str(out))
        _logger.warning("output_dir %s cannot be locked (%s): nothing stops a second command working in it "
                        "meanwhile", out, e.strerror or e)
        return False


def remove_partial_writes(out: Path) -> int:
    """Delete the temporary files that killed atomic writes left in ``out`` (a half-written model can weigh
    megabytes), and return how many. Only the lock holder calls it: nobody else is writing there. A subfolder
    with a lock of its own (a suite's task folder) belongs to the command that locks it and is not entered."""
    removed, stuck = 0, []
    for root, dirs, files in os.walk(out):  # links to folders are not followed
        dirs[:] = [d for d in dirs if not os.path.lexists(os.path.join(root, d, LOCK))]
        for name in files:
            p = Path(root, name)
            if is_partial_write(p):
                try:
                    p.unlink()
                    removed += 1
                except FileNotFoundError:
                    pass
                except OSError as e:
                    stuck.append((p, e))
    if removed:
        _logger.info("removed %d temporary file(s) left in %s by a killed write", removed, out)
    if stuck:  # harmless to the run (nothing reads them), but they hold disk space the user may want back
        p, e = stuck[0]
        _logger.warning("could not remove %d temporary file(s) left by a killed write, e.g. %s (%s); delete them "
                        "by hand to free the space", len(stuck), p, e.strerror or e)
    return removed


def check_not_busy(out: Path) -> None:
    """Refuse a folder another command is working in, writing nothing: run before the checks of its contents,
    so a busy folder is reported as busy, never as made with other settings (with advice to delete it)."""
    if fcntl is None or not dist.is_main() or not out.is_dir():
        return
    fd = _open_lock(out, create=False)
    if fd is not None:
        _busy(fd, out, shared=True)
        os.close(fd)


@contextlib.contextmanager
def hold_output(out: Path):
    """Run the block as the only command working in ``out``: a second command started on the same folder while
    the first runs (two terminals, two suites on one folder) stops with a one-line error instead of training the
    same stages beside it. The lock is the OS's (``flock``): it goes with the process, so a killed run leaves
    nothing to clean up. Under torchrun rank 0 holds it for every rank."""
    fd = None
    with dist.together():
        if dist.is_main() and fcntl is not None:
            out.mkdir(parents=True, exist_ok=True)
            fd = _open_lock(out, create=True)
            locked = _busy(fd, out, shared=False)
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since "
                          f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
            if locked:
                remove_partial_writes(out)
    try:
        yield
    finally:
        if fd is not None:
            os.ftruncate(fd, 0)  # an empty lock file: nobody holds it
            os.close(fd)  # releases the lock; the file stays (removing it would race a command opening it)


def run_stages(cfg: Config, stages, progress: bool = True, skip_complete: bool = True) -> dict:
    fns = _stage_fns()
    out = Path(cfg.output_dir)
    for stage in stages:
        complete, run = fns[stage]
        if skip_complete and dist.agree(complete(cfg)):  # rank 0's reading decides for every rank
            _logger.info("%s: already complete, skipped (delete %s to redo it)", stage, stage_folder(cfg, stage))
            continue
        _logger.info("%s: starting", stage)
        folder = stage_folder(cfg, stage)
        resumed = dist.agree((folder / SETTINGS).is_file())
        if dist.is_main():
            record_settings(cfg, stage)  # what this stage folder is made with, checked by every later run
        try:
            with running_clock(folder / STAGE_TIME, resume=resumed) as clock:
                result = run(cfg, progress=progress)
        except BaseException:
            if dist.is_main() and not resumed:
                forget_settings(cfg, stage)  # failed before it wrote anything: the folder stays free
            raise
        result["time_s"] = round(clock.seconds(), 1)  # with the earlier sessions' seconds when it resumed
        result["world_size"], result["backend"] = dist.world_size(), dist.backend()
        if resumed:
            result["resumed"] = True
        if dist.is_main():
            atomic_write_json(folder / RESULT, result)
        dist.barrier()  # the next stage reads what rank 0 wrote
        _logger.info("%s: done in %.1f s", stage, result["time_s"])
    summary = read_summary(cfg)
    if dist.is_main():
        atomic_write_json(out / "summary.json", summary)
        print_summary(cfg, summary)
    return summary


def read_summary(cfg: Config) -> dict:
    """The results of this config's finished stage folders, read from the folders themselves: a stage folder
    made with other settings (a new supernet beside an old search, another ``retrain.dir``) is left out rather
    than reported as this run's. ``summary.json`` is a copy, rewritten by every command; runs made before the
    stage folders kept ``result.json`` fall back on it for the supernet and the search."""
    from .stages.retrain import MERGED, METRICS
    from .stages.supernet import ADAPTERS as SUPERNET_ADAPTERS
    out = Path(cfg.output_dir)
    old = {}
    if (out / "summary.json").is_file():
        try:
            old = json.loads((out / "summary.json").read_text())
        except (OSError, ValueError):
            old = {}
    fns = _stage_fns()
    summary = {}
    for stage in STAGES:
        folder = stage_folder(cfg, stage)
        if not folder.is_dir() or not fns[stage][0](cfg):
            continue
        try:
            check_stage_settings(cfg, stage)
        except UserError as e:
            _logger.warning("%s: not part of this run's summary: %s", stage, e)
            continue
        res = _json_dict(folder / RESULT)
        if stage == "retrain":  # the metrics are the record; the times come from result.json
            res = {**{k: res[k] for k in ("time_s", "world_size", "backend", "resumed") if k in res},
                   **(_json_dict(folder / METRICS)), "merged_file": str(folder / MERGED)}
        elif not res and isinstance(old.get(stage), dict):
            res = old[stage]
        if stage == "supernet" and res:
            res["adapter_file"] = str(folder / SUPERNET_ADAPTERS)
        if stage == "search" and res:
            res["subnet_file"] = str(folder / "subnet.yaml")
        if res:
            summary[stage] = res
    return summary


def _json_dict(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


BASELINE_ORDER = ("lora", "head")


def comparison_rows(summary: dict) -> list[dict]:
    """GLoRA and each baseline of a finished run: method, adapter params, lr, epochs, val200 top-1 of the chosen
    setting, test top-1 and seconds (GLoRA: supernet + search + retrain; a baseline: its lr choice + training)."""
    r = summary.get("retrain")
    if not r:
        return []
    glora_time = sum(float(summary.get(s, {}).get("time_s", 0.0)) for s in ("supernet", "search"))
    glora_time += float(r.get("select_time_s", 0.0)) + float(r.get("train_time_s", 0.0))
    rows = [{"method": "GLoRA (searched)", "adapter_params": r["adapter_params"], "lr": r.get("lr"),
             "epochs": r.get("epochs"), "val_acc": _chosen_val(r), "test_acc": r["test_acc"],
             "time_s": round(glora_time, 1)}]
    baselines = r.get("baselines") or {}
    # LoRA before the head alone, whatever order the file kept (summary.json is written with sorted keys)
    for key in sorted(baselines, key=lambda k: (BASELINE_ORDER.index(k) if k in BASELINE_ORDER else 99, k)):
        b = baselines[key]
        rows.append({"method": b.get("label", key), "adapter_params": b["adapter_params"], "lr": b.get("lr"),
                     "epochs": b.get("epochs"), "val_acc": _chosen_val(b), "test_acc": b["test_acc"],
                     "time_s": round(float(b.get("select_time_s", 0.0)) + float(b.get("train_time_s", 0.0)), 1)})
    return rows


def _chosen_val(info: dict) -> float | None:
    """The val200 top-1 of the setting a method was trained with (records from before ``val_acc`` was kept: the
    lr's entry of ``val_acc_by_lr``)."""
    if "val_acc" in info:
        return info["val_acc"]
    return (info.get("val_acc_by_lr") or {}).get(repr(info.get("lr")))


def print_summary(cfg: Config, summary: dict) -> None:
    out = Path(cfg.output_dir)
    lines = ["", f"== GLoRA run summary ({out}) =="]
    for stage in ("supernet", "search", "retrain"):
        if stage in summary:
            lines.append(f"  {stage:<9} {summary[stage].get('time_s', 0):>8.1f} s"
                         + ("   (resumed: every session's time)" if summary[stage].get("resumed") else ""))
    s = summary.get("search")
    if s:
        lines.append(f"  searched subnet: {s.get('params', 0):,} adapter params, val top-1 {s.get('val_acc', 0):.4f}"
                     f"  ({out / 'search' / 'subnet.yaml'})")
    r = summary.get("retrain")
    if r:
        from .stages.retrain import point_label
        rows = comparison_rows(summary)
        lines.append("")
        ep_col = bool(r.get("epochs_grid"))  # the epochs column only when the run chose them too
        w = max([18] + [len(row["method"]) for row in rows])  # a long label ("... above GLoRA's params") widens it
        lines.append(f"  {'method':<{w}} {'adapter params':>14} {'lr':>8} " + (f"{'epochs':>6} " if ep_col else "")
                     + f"{'val200':>7} {'test top-1':>10} {'time':>9}")
        for row in rows:
            lr = f"{row['lr']:.0e}" if row["lr"] is not None else "-"
            ep = (f"{row['epochs'] if row['epochs'] is not None else '-':>6} " if ep_col else "")
            val = f"{row['val_acc']:.4f}" if row["val_acc"] is not None else "-"
            lines.append(f"  {row['method']:<{w}} {row['adapter_params']:>14,} {lr:>8} {ep}{val:>7} "
                         f"{row['test_acc']:>10.4f} {row['time_s']:>7.1f} s")
        baselines = r.get("baselines") or {}
        for name, info in [("GLoRA (searched)", r)] + [
                (baselines[k].get("label", k), baselines[k])
                for k in sorted(baselines, key=lambda k: (BASELINE_ORDER.index(k) if k in BASELINE_ORDER else 99, k))]:
            attempts = info.get("refits") or []
            failed = [point_label((a["lr"], a.get("epochs")), "epochs" in a) for a in attempts if a.get("diverged")]
            if failed:
                every = any(a.get("kept") for a in attempts)
                lines.append(f"  ! {name}: the train800val200 refit diverged at lr {', '.join(failed)} "
                             f"(retrain.refit_guard); " + ("every lr diverged: the lr shown is the one closest to "
                                                           "its train800 loss" if every else
                                                           "the lr shown is the next by val200, which did not"))
        if len(rows) > 1:
            lines.append(f"  ({'lr and epochs' if ep_col else 'lr'} chosen on val200 after training on train800; test "
                         "scored once, after training on train800val200; GLoRA's time includes supernet and search)")
        if r.get("resumed"):
            lines.append("  (the retrain resumed: its times count this session's training only)")
        if r.get("drop_path_rate") is not None:
            lines.append(f"  (retrained with stochastic depth {r['drop_path_rate']:g}: retrain.drop_path_rate; not the "
                         "head alone, which trains on the frozen features)")
        lines.append(f"  + {r['head_params']:,} head params each; merged model: {r['merged_file']} "
                     f"(max |merged - unmerged| logit {r['merge_max_abs_diff']:.2e} in fp32"
                     + (f", {r['merge_max_abs_diff_fp64']:.1e} in float64)" if r.get("merge_max_abs_diff_fp64")
                        is not None else ")"))
    names = [n for n in ("config.yaml", "supernet/", "search/", f"{cfg.retrain.dir}/") if (out / n).exists()]
    lines.append(f"  files: {out}/{{{', '.join(names + ['summary.json'])}}}")  # what this run has made so far
    print("\n".join(lines))
