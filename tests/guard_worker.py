"""``run_search.py`` with LoRA's train800val200 refit made to look collapsed, on rank 0 only; run by
``tests/test_dist.py`` in one process and under torchrun. Rank 0's log says diverged and the other rank's does
not: every rank must still follow rank 0's verdict (train again at the next lr), or the collectives of the next
training and of the test pass no longer pair up.

    python tests/guard_worker.py RUN_SEARCH_ARGS...
    torchrun --nproc_per_node 2 tests/guard_worker.py RUN_SEARCH_ARGS...
"""
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:
    sys.path.insert(0, str(HERE.parent))

COLLAPSED_LOSS = 50.0


def diverging_fit(real_fit):
    """``fit`` whose first train800val200 run of LoRA ends, as rank 0 reads it, at a collapsed loss."""
    from glora.core import dist

    def fit(model, named, train, spec, out_dir, *args, **kwargs):
        log = real_fit(model, named, train, spec, out_dir, *args, **kwargs)
        if spec.desc == "lora (train800val200)" and out_dir.parent.name != "refit" and dist.is_main():
            log[-1]["loss"] = COLLAPSED_LOSS
            (out_dir / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
        return log
    return fit


def main(argv: list[str]) -> int:
    import glora.stages.retrain as rt
    import run_search
    rt.fit = diverging_fit(rt.fit)
    return run_search.main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
