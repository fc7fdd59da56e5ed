#!/usr/bin/env python
"""GLoRA: supernet training, evolutionary search and retrain + merge, from one command.

    python run_search.py --config demo                      # every stage, skipping finished ones
    python run_search.py --config vtab --set data.task=cifar --stage supernet
    python run_search.py prepare --task dsprites_loc --root datasets/vtab-1k
    python run_search.py inspect runs/demo
    python run_search.py suite --config demo --tasks mnist,dsprites_loc   # one folder per task + suite.md
"""
from __future__ import annotations

import argparse
import errno
import logging
import sys
import time
from pathlib import Path

from glora.core import dist
from glora.core.errors import UserError

_logger = logging.getLogger("glora")
STAGES = ("supernet", "search", "retrain")


def setup_logging(output_dir: Path | None = None) -> None:
    """INFO to stdout and ``<output_dir>/run.log``; under torchrun the other ranks than 0 log warnings only."""
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if output_dir is not None and dist.is_main():
        output_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(output_dir / "run.log"))
    logging.basicConfig(level=logging.INFO if dist.is_main() else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        handlers=handlers, force=True)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (a UserError), like every other mistake."""

    def error(self, message: str):
        raise UserError(f"{self.prog}: {message} (see {self.prog} -h)")


# what a full, read-only or unwritable folder raises: the user's to fix, not a bug
USER_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.ENOTDIR, errno.EISDIR,
               errno.EEXIST, errno.ENAMETOOLONG, errno.ELOOP, errno.ENOENT}


def os_error_line(e: OSError) -> str:
    where = e.filename or "a file"
    hint = {errno.ENOSPC: "free some space or use another output_dir",
            errno.EDQUOT: "free some space or use another output_dir",
            errno.EROFS: "the file system is read-only: use another output_dir"}.get(
        e.errno, "check that the path is a folder you can write to, or use another one")
    if e.errno == errno.ENOENT:  # a folder that cannot be made there (a path under /proc, a vanished parent)
        return f"cannot make or use {where}: {e.strerror or e}; give a path under a folder you can write to"
    return f"cannot write {where}: {e.strerror or e}; {hint}"


def run_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="run_search.py",
                       description="GLoRA supernet, search and retrain on timm and Hugging Face models.",
                                epilog="other commands: 'run_search.py suite -h', 'run_search.py prepare -h', "
                                       "'run_search.py inspect -h'")
    p.add_argument("-c", "--config", default=None, help="task config: a yaml path or a name under configs/")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value (repeatable); the value is read as YAML")
    p.add_argument("--stage", default="all", choices=("all",) + STAGES, help="which stage to run (default: all)")
    p.add_argument("--subnet", default=None, help="subnet.yaml to retrain (same as --set retrain.subnet=PATH)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    return p


def cmd_run(argv: list[str]) -> int:
    args = run_parser().parse_args(argv)
    from glora.core.config import dump_config, load_config
    overrides = list(args.overrides)
    if args.subnet:
        overrides.append(f"retrain.subnet={args.subnet}")
    cfg = load_config(args.config, overrides)
    if args.print_config:
        if dist.is_main():
            import yaml
            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    from glora.core import accel
    accel.configure(cfg)  # deterministic: the cuBLAS workspace setting before anything starts CUDA
    dist.init(cfg.device, cfg.data.batch_size)  # under torchrun: join the job (nothing without it)
    out = Path(cfg.output_dir)
    stages = STAGES if args.stage == "all" else (args.stage,)
    from glora.pipeline import check_not_busy
    from glora.preflight import preflight
    with dist.together():  # a rank that refuses the command stops every rank
        check_not_busy(out)  # another command working in the folder: say so before judging its files
        preflight(cfg, stages)  # nothing is written before the command is accepted
    from glora.pipeline import hold_output, run_stages
    with hold_output(out):  # no second command works in this folder meanwhile
        setup_logging(out)
        if dist.is_main():
            dump_config(cfg, out / "config.yaml")
            _logger.info("config resolved and written to %s", out / "config.yaml")
        check_shared_output(out)
        if dist.world_size() > 1:
            _logger.info("data parallel: %d processes (%s), global batch %d", dist.world_size(), dist.backend(),
                         cfg.data.batch_size)
        run_stages(cfg, stages, progress=not args.no_progress and dist.is_main(), skip_complete=args.stage == "all")
    return 0


def check_shared_output(out: Path) -> None:
    """Under torchrun every rank reads the files rank 0 writes (resume, next stage): output_dir must be one
    folder for all of them (a shared file system across nodes)."""
    if dist.world_size() == 1:
        return
    dist.barrier()
    text = dist.broadcast_object((out / "config.yaml").read_text() if dist.is_main() else None)
    try:
        seen = (out / "config.yaml").read_text() == text
    except OSError:
        seen = False
    bad = dist.failing_ranks(seen)
    if bad:
        raise UserError(f"output_dir {out}: rank(s) {', '.join(map(str, bad))} do not see the config.yaml rank 0 "
                        "wrote; under torchrun every rank needs the same folder (on several nodes a shared "
                        "file system)")


def cmd_suite(argv: list[str]) -> int:
    p = ArgumentParser(prog="run_search.py suite",
                                description="run every stage on several tasks, each into <output_dir>/<task>/, "
                                            "and write suite.md and suite.csv (GLoRA beside each baseline)")
    p.add_argument("-c", "--config", default=None, help="config: a yaml path or a name under configs/")
    p.add_argument("--tasks", required=True, help="task folders under data.root, separated by commas")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value for every task (repeatable)")
    p.add_argument("--seeds", default=None, metavar="S,S,...",
                   help="run each task once per seed (the global seed), into <output_dir>/<task>/seed<S>/, and "
                        "report mean ± std over seeds and GLoRA minus LoRA paired by seed")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = p.parse_args(argv)
    from glora.suite import parse_tasks, run_suite, task_configs
    tasks = parse_tasks(args.tasks)
    seeds = None if args.seeds is None else _int_list(args.seeds, "seeds")
    if seeds is not None and len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds {args.seeds!r}: a seed appears twice")
    root, cfgs = task_configs(args.config, args.overrides, tasks, seeds)  # every run's config checked first
    dist.init(cfgs[0].device, cfgs[0].data.batch_size)  # under torchrun: join the job (nothing without it)
    setup_logging(root)
    run_suite(args.config, args.overrides, tasks, progress=not args.no_progress and dist.is_main(), seeds=seeds)
    if dist.is_main():
        print(f"\n{(root / 'suite.md').read_text()}\nwrote {root / 'suite.md'} and {root / 'suite.csv'}")
    return 0


def _int_list(text: str, what: str) -> list[int]:
    try:
        vals = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--{what} {text!r}: expected integers separated by commas (e.g. 1,2,4,8,16)") from None
    if not vals or any(v < 0 for v in vals):
        raise UserError(f"--{what} {text!r}: expected non-negative integers separated by commas")
    return vals


def cmd_fewshot(argv: list[str]) -> int:
    p = ArgumentParser(prog="run_search.py fewshot",
                                description="turn NOAH's few-shot lists (train_meta.list.num_shot_K.seed_S, "
                                            "val_meta.list, test_meta.list) into VTAB-1k-layout task folders")
    p.add_argument("--src", required=True, help="folder holding the lists (or an annotations/ folder with them)")
    p.add_argument("--root", default="datasets/few-shot", help="data.root to write <name>_shot<K>_seed<S>/ into")
    p.add_argument("--name", default="", help="task name prefix (default: the --src folder name)")
    p.add_argument("--images", default=None, help="folder the list paths are relative to (default: --src)")
    p.add_argument("--shots", default="1,2,4,8,16")
    p.add_argument("--seeds", default="0,1,2")
    args = p.parse_args(argv)
    from glora.data.fewshot import convert_fewshot
    tasks = convert_fewshot(args.src, args.root, args.name, _int_list(args.shots, "shots"),
                            _int_list(args.seeds, "seeds"), args.images)
    print(f"wrote {len(tasks)} task folders under {args.root}; run them with\n"
          f"  python run_search.py suite --config CONFIG --set data.root={args.root} --tasks {','.join(tasks)}")
    return 0


def cmd_prepare(argv: list[str]) -> int:
    from glora.data.offline import OFFLINE_TASKS, prepare_task
    p = ArgumentParser(prog="run_search.py prepare", description="write an offline task in VTAB-1k layout")
    p.add_argument("--task", required=True, help=f"one of {', '.join(OFFLINE_TASKS)}")
    p.add_argument("--root", default="datasets/vtab-1k", help="folder to write <root>/<task> into")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing task folder")
    args = p.parse_args(argv)
    if args.task not in OFFLINE_TASKS:
        raise UserError(f"unknown offline task {args.task!r}: valid are {', '.join(OFFLINE_TASKS)}")
    from glora.core.config import MAX_SEED
    if not 0 <= args.seed <= MAX_SEED:
        raise UserError(f"prepare --seed {args.seed}: must be an integer in [0, {MAX_SEED}] (the range of data.seed)")
    target = Path(args.root) / args.task
    if target.exists() and not args.overwrite:
        print(f"left {target} as it is: it exists already (--overwrite replaces it)")
        return 0
    from glora.preflight import check_writable_folder
    check_writable_folder(Path(args.root), "prepare --root")
    setup_logging()
    path = prepare_task(args.task, args.root, seed=args.seed, overwrite=args.overwrite)
    print(f"wrote {path}" + (f"; runs on it need --set data.seed={args.seed}" if args.seed else ""))
    return 0


def cmd_inspect(argv: list[str]) -> int:
    p = ArgumentParser(prog="run_search.py inspect",
                       description="per-layer table and pictures of a searched subnet")
    p.add_argument("target", help="a run folder (output_dir) or a subnet.yaml")
    p.add_argument("--out", default=None, help="folder for the PNGs (default: beside subnet.yaml)")
    args = p.parse_args(argv)
    if args.out:
        from glora.preflight import check_writable_folder
        check_writable_folder(Path(args.out), "inspect --out")
    from search.inspect import inspect_main
    return inspect_main(args.target, args.out)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"prepare": cmd_prepare, "inspect": cmd_inspect, "run": cmd_run, "suite": cmd_suite,
                "fewshot": cmd_fewshot}
    try:
        rc = commands[argv[0]](argv[1:]) if argv and argv[0] in commands else cmd_run(argv)
        dist.barrier()  # under torchrun: no rank tears the group down while another still uses it
        return rc
    except UserError as e:
        if dist.reports(e):  # under torchrun every rank stops, one prints
            print("error: " + " ".join(str(e).split()), file=sys.stderr)  # one line, whatever the message holds
        else:
            dist.linger()
        return 2
    except OSError as e:
        if e.errno not in USER_ERRNOS:
            raise
        if dist.reports(e):
            print(f"error: {os_error_line(e)}", file=sys.stderr)
        else:
            dist.linger()
        return 2
    except KeyboardInterrupt:
        if dist.is_main():
            print("interrupted: rerun the same command to continue where it stopped", file=sys.stderr)
        return 130
    finally:
        dist.cleanup()


if __name__ == "__main__":
    sys.exit(main())
