"""Carry the offline benchmark to a machine that has torch and timm but neither the data packages nor network
access (a GPU machine, say): the four offline tasks (data seed 0) as arrays and the DINOv2 ViT-S/14 weights in
fp16, about 50 MB together.

    python bench/offline_bundle.py pack BUNDLE                 # here: writes BUNDLE/tasks.npz, BUNDLE/dinov2_fp16.safetensors
    python bench/offline_bundle.py unpack BUNDLE datasets/vtab-1k   # there: the tasks in the VTAB-1k layout, the weights
                                                                   # back in fp32 into the cache folder ($GLORA_CACHE)

``unpack`` keeps a task folder or a converted checkpoint that is already there: on the machine that packed them,
the full-precision weights stay in the cache (give it another ``$GLORA_CACHE`` to try the rounded ones).

The unpacked tasks are the files ``prepare_task`` writes for seed 0. The weights come back rounded to fp16 (at most
4.5e-4 of each tensor's largest entry, bench/accuracy.md "At 224 px on one GPU"); every method of a run loads the
same weights, but figures from unpacked weights are not bit-comparable with the CPU's.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TASKS = ("mnist", "fashion_mnist", "dsprites_loc", "dsprites_ori")
WEIGHTS = "dinov2_vits14_timm.safetensors"


def pack(bundle: Path) -> None:
    from safetensors.torch import load_file, save_file

    from glora.data.backbones import offline_checkpoint_path
    from glora.data.offline import OFFLINE_TASKS
    bundle.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for task in TASKS:
        for split, (x, y) in OFFLINE_TASKS[task](seed=0).items():
            arrays[f"{task}/{split}/x"], arrays[f"{task}/{split}/y"] = x, y
    np.savez_compressed(bundle / "tasks.npz", **arrays)
    sd = load_file(str(offline_checkpoint_path("dinov2_vits14")))
    save_file({k: v.half() if v.is_floating_point() else v for k, v in sd.items()}, str(bundle / "dinov2_fp16.safetensors"))


def unpack(bundle: Path, root: Path) -> None:
    from safetensors.torch import load_file, save_file

    from glora.data import cache_dir
    from glora.data.offline import write_task
    import shutil
    import tempfile
    z = np.load(bundle / "tasks.npz")
    root.mkdir(parents=True, exist_ok=True)
    for task in sorted({k.split("/")[0] for k in z.files}):
        target = root / task
        if target.exists():
            print(f"{target} exists: kept")
            continue
        splits = {s: (z[f"{task}/{s}/x"], z[f"{task}/{s}/y"])
                  for s in sorted({k.split("/")[1] for k in z.files if k.startswith(task + "/")})}
        tmp = Path(tempfile.mkdtemp(prefix=f".{task}.unpack-", dir=root))  # renamed into place when complete
        try:
            write_task(tmp, splits)
            info = {"task": task, "seed": 0, "options": {}, "sizes": {k: int(len(v[1])) for k, v in splits.items()},
                    "num_classes": int(max(int(v[1].max()) for v in splits.values()) + 1)}
            (tmp / "offline_task.json").write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
            tmp.chmod(0o755)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    weights = cache_dir() / WEIGHTS
    if weights.exists():
        print(f"{weights} exists: kept (not replaced by the fp16-rounded weights)")
        return
    weights.parent.mkdir(parents=True, exist_ok=True)
    sd = load_file(str(bundle / "dinov2_fp16.safetensors"))
    part = weights.with_name(weights.name + ".unpack.tmp")
    save_file({k: v.float() if v.is_floating_point() else v for k, v in sd.items()}, str(part))
    part.replace(weights)

if __name__ == "__main__":
    if len(sys.argv) < 3 or sys.argv[1] not in ("pack", "unpack") or (sys.argv[1] == "unpack") != (len(sys.argv) == 4):
        sys.exit("usage: python bench/offline_bundle.py pack BUNDLE | unpack BUNDLE DATA_ROOT")
    if sys.argv[1] == "pack":
        pack(Path(sys.argv[2]))
    else:
        unpack(Path(sys.argv[2]), Path(sys.argv[3]))
