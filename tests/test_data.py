"""VTAB-1k layout reading, transforms, seeded loaders and offline task builders."""
import filecmp
import os
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from glora.core.errors import UserError
from glora.data.offline import OFFLINE_TASKS, ensure_task, prepare_task
from glora.data.vtab import VtabDataset, build_loader, build_transform, num_classes

SPLIT_SIZES = {"train800": 8, "val200": 4, "test": 6}


def make_task(root: Path, task: str = "toy", classes: int = 3, gray: bool = False) -> Path:
    """A tiny VTAB-layout task: images of varied size (RGB or grayscale), labels cycling over ``classes``."""
    tdir = root / task
    lines = {}
    rng = np.random.default_rng(0)
    for split, n in SPLIT_SIZES.items():
        (tdir / "images" / split).mkdir(parents=True, exist_ok=True)
        lines[split] = []
        for i in range(n):
            rel = f"images/{split}/{i}.png"
            if gray:
                Image.fromarray(rng.integers(0, 255, (20, 17), dtype=np.uint8)).save(tdir / rel)
            else:
                Image.fromarray(rng.integers(0, 255, (13, 21, 3), dtype=np.uint8)).save(tdir / rel)
            lines[split].append(f"{rel} {i % classes}\n")
    lines["train800val200"] = lines["train800"] + lines["val200"]
    for split, ls in lines.items():
        (tdir / f"{split}.txt").write_text("".join(ls))
    return tdir


@pytest.fixture(scope="module")
def tiny_vit():
    return timm.create_model("vit_tiny_patch16_224", img_size=32, depth=1, num_classes=3)


def test_dataset_splits_labels_and_transform(tmp_path, tiny_vit):
    make_task(tmp_path)
    tf = build_transform(tiny_vit, 48)
    sizes = {s: len(VtabDataset(tmp_path, "toy", s, tf)) for s in ("train800", "val200", "train800val200", "test")}
    assert sizes == {"train800": 8, "val200": 4, "train800val200": 12, "test": 6}
    ds = VtabDataset(tmp_path, "toy", "train800", tf)
    x, y = ds[4]
    assert x.shape == (3, 48, 48) and x.dtype == torch.float32
    assert y == 1 and ds.targets[:4] == [0, 1, 2, 0]
    assert num_classes(tmp_path, "toy") == 3
    # default size comes from the model config; normalisation uses its mean/std
    x0, _ = VtabDataset(tmp_path, "toy", "test", build_transform(tiny_vit, 0))[0]
    assert x0.shape == (3, 32, 32)
    cfg = timm.data.resolve_model_data_config(tiny_vit)
    raw = Image.open(tmp_path / "toy" / "images" / "test" / "0.png").convert("RGB").resize((32, 32), Image.BICUBIC)
    ref = (torch.from_numpy(np.asarray(raw, dtype=np.float32) / 255).permute(2, 0, 1)
           - torch.tensor(cfg["mean"])[:, None, None]) / torch.tensor(cfg["std"])[:, None, None]
    assert torch.allclose(x0, ref, atol=0.05)


def test_grayscale_becomes_rgb(tmp_path, tiny_vit):
    make_task(tmp_path, gray=True)
    ds = VtabDataset(tmp_path, "toy", "test", build_transform(tiny_vit, 16))
    x, _ = ds[0]
    assert x.shape == (3, 16, 16)
    assert ds.load_image(0).mode == "RGB"
    assert VtabDataset(tmp_path, "toy", "test", None)[0][0].mode == "RGB"


def _assert_user_error(fn, *needles):
    with pytest.raises(UserError) as ei:
        fn()
    msg = str(ei.value)
    assert "\n" not in msg
    for n in needles:
        assert str(n) in msg, msg
    return msg


def test_bad_inputs_name_the_culprit(tmp_path, tiny_vit):
    tdir = make_task(tmp_path)
    _assert_user_error(lambda: VtabDataset(tmp_path / "nope", "toy", "test"), tmp_path / "nope")
    _assert_user_error(lambda: VtabDataset(tmp_path, "other", "test"), tmp_path / "other")
    _assert_user_error(lambda: VtabDataset(tmp_path, "toy", "train1000"), "train1000")
    os.remove(tdir / "val200.txt")
    _assert_user_error(lambda: VtabDataset(tmp_path, "toy", "val200"), tdir / "val200.txt")

    (tdir / "train800.txt").write_text("images/train800/0.png 0\nimages/train800/1.png\n")
    _assert_user_error(lambda: VtabDataset(tmp_path, "toy", "train800"), f"{tdir / 'train800.txt'}:2")
    (tdir / "train800.txt").write_text("images/train800/0.png zero\n")
    _assert_user_error(lambda: VtabDataset(tmp_path, "toy", "train800"), f"{tdir / 'train800.txt'}:1", "zero")
    (tdir / "train800.txt").write_text("images/train800/0.png 1\nimages/train800/1.png -2\n")
    _assert_user_error(lambda: VtabDataset(tmp_path, "toy", "train800"), f"{tdir / 'train800.txt'}:2", "-2")
    (tdir / "train800.txt").write_text("images/train800/0.png 1\nimages/train800/missing.png 0\n")
    _assert_user_error(lambda: VtabDataset(tmp_path, "toy", "train800"), tdir / "images/train800/missing.png")

    # unreadable image: detected at load time
    (tdir / "images" / "test" / "0.png").write_bytes(b"not a png")
    ds = VtabDataset(tmp_path, "toy", "test", build_transform(tiny_vit, 16))
    _assert_user_error(lambda: ds[0], tdir / "images" / "test" / "0.png")

    # a test label beyond the training classes
    (tdir / "test.txt").write_text("images/test/1.png 7\n")
    _assert_user_error(lambda: num_classes(tmp_path, "toy"), "label out of range", "7")

    _assert_user_error(lambda: build_loader(ds, 0, True), "batch_size")
    _assert_user_error(lambda: build_transform(tiny_vit, -3), "-3")


def test_loader_order_is_a_function_of_seed_and_epoch():
    ds = torch.utils.data.TensorDataset(torch.arange(50))

    def order(seed, epoch):
        return torch.cat([b[0] for b in build_loader(ds, 8, True, seed=seed, epoch=epoch)]).tolist()

    assert order(3, 0) == order(3, 0)
    assert order(3, 1) == order(3, 1)
    assert order(3, 0) != order(3, 1)
    assert order(3, 0) != order(4, 0)
    assert sorted(order(3, 2)) == list(range(50))
    assert torch.cat([b[0] for b in build_loader(ds, 8, False)]).tolist() == list(range(50))
    assert len(list(build_loader(ds, 8, True, drop_last=True))) == 6


def _same_tree(a: Path, b: Path) -> None:
    fa = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    fb = sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert fa == fb
    _, mismatch, errors = filecmp.cmpfiles(a, b, [str(p) for p in fa], shallow=False)
    assert not mismatch and not errors, mismatch[:5]


@pytest.mark.parametrize("task", ["dsprites_loc", "mnist"])
def test_offline_tasks_are_deterministic(tmp_path, task):
    opts = {"n_test": 64} if task.startswith("dsprites") else {"test_limit": 64}
    a = prepare_task(task, tmp_path / "a", seed=1, **opts)
    b = prepare_task(task, tmp_path / "b", seed=1, **opts)
    _same_tree(a, b)
    if task.startswith("dsprites"):   # another seed, other data (mnist: 5000 files a copy, checked once below)
        c = prepare_task(task, tmp_path / "c", seed=2, **opts)
        assert not filecmp.cmp(a / "images/train/00000.png", c / "images/train/00000.png", shallow=False)
    sizes = {s: len((a / f"{s}.txt").read_text().splitlines())
             for s in ("train800", "val200", "train800val200", "test")}
    assert sizes == {"train800": 800, "val200": 200, "train800val200": 1000,
                     "test": 64}
    k = num_classes(a.parent, task)
    assert k == (16 if task.startswith("dsprites") else 10)
    ds = VtabDataset(a.parent, task, "val200")
    img, lab = ds[0]
    assert img.mode == "RGB" and 0 <= lab < k
    assert sorted(set(ds.targets)) == list(range(k))
    assert not list(a.parent.glob(f".{task}.partial-*"))


def test_dsprites_labels_follow_the_factor(tmp_path):
    from glora.data.offline import build_dsprites_loc
    splits = build_dsprites_loc(seed=0, n_test=16)
    imgs, labs = splits["train"]
    assert imgs.shape == (800, 64, 64) and imgs.dtype == np.uint8
    assert np.bincount(labs, minlength=16).min() == 50        # balanced classes
    cols = np.arange(64)
    mass = imgs.astype(np.float64).sum(axis=1)
    cx = (mass * cols).sum(1) / mass.sum(1)                  # horizontal centre of mass grows with the label
    centre = np.array([cx[labs == k].mean() for k in range(16)])
    assert np.all(np.diff(centre) > 0)


def test_fashion_mnist(tmp_path):
    # needs the Debian package (installed, or fetched without root with apt-get download + dpkg -x)
    a = prepare_task("fashion_mnist", tmp_path / "a", seed=0, test_limit=300)
    b = prepare_task("fashion_mnist", tmp_path / "b", seed=0, test_limit=300)
    _same_tree(a, b)
    assert len((a / "test.txt").read_text().splitlines()) == 300
    assert len((a / "train800val200.txt").read_text().splitlines()) == 1000
    assert num_classes(a.parent, "fashion_mnist") == 10
    img, _ = VtabDataset(a.parent, "fashion_mnist", "train800")[0]
    assert img.size == (28, 28) and img.mode == "RGB"


def test_ensure_task(tmp_path):
    _assert_user_error(lambda: ensure_task(tmp_path, "caltech101"), "caltech101", *OFFLINE_TASKS)
    _assert_user_error(lambda: ensure_task(tmp_path, "mnist", prepare_missing=False), tmp_path / "mnist")
    _assert_user_error(lambda: prepare_task("cifar", tmp_path), "cifar")
    make_task(tmp_path, "caltech101")
    assert ensure_task(tmp_path, "caltech101") == tmp_path / "caltech101"
    p = ensure_task(tmp_path, "mnist")
    assert len((p / "test.txt").read_text().splitlines()) == 4000          # default: all of the remaining 4000
    stamp = (p / "train800.txt").stat().st_mtime_ns
    assert ensure_task(tmp_path, "mnist") == p and (p / "train800.txt").stat().st_mtime_ns == stamp
    d = prepare_task("dsprites_ori", tmp_path, seed=0, n_test=16)
    before = (d / "train800.txt").read_text()
    assert prepare_task("dsprites_ori", tmp_path, seed=5, n_test=16) == d and (d / "train800.txt").read_text() == before
    assert prepare_task("dsprites_ori", tmp_path, seed=5, overwrite=True, n_test=16) == d
    assert (d / "train800.txt").read_text() != before
    assert sorted(q.name for q in tmp_path.iterdir()) == ["caltech101", "dsprites_ori", "mnist"]


def test_offline_task_from_another_seed_is_refused(tmp_path):
    d = prepare_task("dsprites_ori", tmp_path, seed=3, n_test=16)
    _assert_user_error(lambda: ensure_task(tmp_path, "dsprites_ori"), d, "seed 3, not 0", "data.seed=3")
    assert ensure_task(tmp_path, "dsprites_ori", seed=3) == d
    mine = make_task(tmp_path, "mnist")  # a VTAB-layout folder of the user's own: no record, nothing to check
    assert ensure_task(tmp_path, "mnist", seed=7) == mine
    (d / "offline_task.json").write_text("{not json")
    _assert_user_error(lambda: ensure_task(tmp_path, "dsprites_ori", seed=3), "damaged", d)


def test_the_runs_seed_does_not_choose_the_offline_data(tmp_path):
    """``data.seed`` generates a missing offline task; the run's ``seed`` (training) does not, so runs of several
    seeds on one data.root see the same images whichever ran first."""
    import json
    from glora.core.build import prepare_data
    from glora.core.config import load_config
    from glora.preflight import check_data
    cfg = load_config("tiny", [f"data.root={tmp_path}", "data.task=dsprites_ori", "seed=4"])
    assert prepare_data(cfg) == 16
    assert json.loads((tmp_path / "dsprites_ori" / "offline_task.json").read_text())["seed"] == 0
    check_data(cfg)
    other = load_config("tiny", [f"data.root={tmp_path}", "data.task=dsprites_ori", "data.seed=2"])
    _assert_user_error(lambda: check_data(other), "data.seed", "seed 0, not 2")
    _assert_user_error(lambda: prepare_data(other), "data.seed", "seed 0, not 2")


def test_interrupted_prepare_leaves_no_task(tmp_path, monkeypatch):
    import glora.data.offline as off

    def boom(folder, splits):
        (folder / "train800.txt").write_text("half\n")
        raise KeyboardInterrupt

    monkeypatch.setattr(off, "write_task", boom)
    with pytest.raises(KeyboardInterrupt):
        off.prepare_task("dsprites_ori", tmp_path, n_test=16)
    assert not (tmp_path / "dsprites_ori").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".dsprites_ori")]
