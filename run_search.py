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
import logging
import sys
import time
from pathlib import Path

from common.errors import UserError

_logger = logging.getLogger("glora")
STAGES = ("supernet", "search", "retrain")


def setup_logging(output_dir: Path | None = None) -> None:
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    if output_dir is not None:
        output_dir.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(output_dir / "run.log"))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S",
                        handlers=handlers, force=True)


def run_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="run_search.py",
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
    from common.config import dump_config, load_config
    overrides = list(args.overrides)
    if args.subnet:
        overrides.append(f"retrain.subnet={args.subnet}")
    cfg = load_config(args.config, overrides)
    if args.print_config:
        import yaml
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    out = Path(cfg.output_dir)
    setup_logging(out)
    dump_config(cfg, out / "config.yaml")
    _logger.info("config resolved and written to %s", out / "config.yaml")
    from common.pipeline import run_stages
    stages = STAGES if args.stage == "all" else (args.stage,)
    run_stages(cfg, stages, progress=not args.no_progress, skip_complete=args.stage == "all")
    return 0


def cmd_suite(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="run_search.py suite",
                                description="run every stage on several tasks, each into <output_dir>/<task>/, "
                                            "and write suite.md and suite.csv (GLoRA beside each baseline)")
    p.add_argument("-c", "--config", default=None, help="config: a yaml path or a name under configs/")
    p.add_argument("--tasks", required=True, help="task folders under data.root, separated by commas")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a config value for every task (repeatable)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    args = p.parse_args(argv)
    from common.suite import parse_tasks, run_suite, task_configs
    tasks = parse_tasks(args.tasks)
    root, _ = task_configs(args.config, args.overrides, tasks)  # every task's config checked before any runs
    setup_logging(root)
    run_suite(args.config, args.overrides, tasks, progress=not args.no_progress)
    print(f"\n{(root / 'suite.md').read_text()}\nwrote {root / 'suite.md'} and {root / 'suite.csv'}")
    return 0


def cmd_prepare(argv: list[str]) -> int:
    from data.offline import OFFLINE_TASKS, prepare_task
    p = argparse.ArgumentParser(prog="run_search.py prepare", description="write an offline task in VTAB-1k layout")
    p.add_argument("--task", required=True, help=f"one of {', '.join(OFFLINE_TASKS)}")
    p.add_argument("--root", default="datasets/vtab-1k", help="folder to write <root>/<task> into")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace an existing task folder")
    args = p.parse_args(argv)
    if args.task not in OFFLINE_TASKS:
        raise UserError(f"unknown offline task {args.task!r}: valid are {', '.join(OFFLINE_TASKS)}")
    setup_logging()
    path = prepare_task(args.task, args.root, seed=args.seed, overwrite=args.overwrite)
    print(f"wrote {path}")
    return 0


def cmd_inspect(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="run_search.py inspect",
                                description="per-layer table and pictures of a searched subnet")
    p.add_argument("target", help="a run folder (output_dir) or a subnet.yaml")
    p.add_argument("--out", default=None, help="folder for the PNGs (default: beside subnet.yaml)")
    args = p.parse_args(argv)
    from search.inspect import inspect_main
    return inspect_main(args.target, args.out)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"prepare": cmd_prepare, "inspect": cmd_inspect, "run": cmd_run, "suite": cmd_suite}
    try:
        if argv and argv[0] in commands:
            return commands[argv[0]](argv[1:])
        return cmd_run(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to continue where it stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
