"""NOAH's few-shot lists as VTAB-1k-layout task folders, and the mean ± std table over seeds."""
import numpy as np
import pytest
from PIL import Image

import run_search
from glora.suite import write_tables
from glora.data.vtab import read_split


@pytest.fixture
def noah_folder(tmp_path):
    src = tmp_path / "cub"
    (src / "images").mkdir(parents=True)
    (src / "annotations").mkdir()
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(src / "images" / f"{i}.png")
    (src / "annotations" / "val_meta.list").write_text("images/6.png 0\nimages/7.png 1\n")
    (src / "annotations" / "test_meta.list").write_text("images/8.png 0\nimages/9.png 1\nimages/10.png 2\n")
    for k in (1, 2):
        for s in (0, 1):
            picks = rng.choice(6, size=2 * k, replace=False)
            (src / "annotations" / f"train_meta.list.num_shot_{k}.seed_{s}").write_text(
                "".join(f"images/{p}.png {j % 3}\n" for j, p in enumerate(picks)))
    return src


def test_fewshot_lists_become_task_folders(noah_folder, tmp_path, capsys):
    root = tmp_path / "root"
    code = run_search.main(["fewshot", "--src", str(noah_folder), "--root", str(root), "--shots", "1,2",
                            "--seeds", "0,1"])
    assert code == 0
    assert "cub_shot2_seed1" in capsys.readouterr().out
    for k in (1, 2):
        for s in (0, 1):
            task = f"cub_shot{k}_seed{s}"
            train = read_split(root, task, "train800")
            src = (noah_folder / "annotations" / f"train_meta.list.num_shot_{k}.seed_{s}").read_text().split()
            assert [(p.resolve(), lab) for p, lab in train] == [
                ((noah_folder / src[i]).resolve(), int(src[i + 1])) for i in range(0, len(src), 2)]
            assert read_split(root, task, "train800val200") == train
            assert [p.name for p, _ in read_split(root, task, "test")] == ["8.png", "9.png", "10.png"]
            assert len(read_split(root, task, "val200")) == 2
    assert run_search.main(["fewshot", "--src", str(noah_folder), "--root", str(root), "--shots", "4"]) == 2
    assert "num_shot_4.seed_0 not found" in capsys.readouterr().err


def test_fewshot_table_mean_and_std_over_seeds(tmp_path):
    rows = [{"task": f"cub_shot{k}_seed{s}", "group": "", "glora_test": g, "lora_test": l}
            for (k, s, g, l) in [(1, 0, 0.5, 0.4), (1, 1, 0.7, 0.6), (1, 2, 0.6, 0.5), (4, 0, 0.9, 0.8)]]
    write_tables(tmp_path, rows)
    md = (tmp_path / "suite.md").read_text()
    g = np.array([50.0, 70.0, 60.0])
    l = np.array([40.0, 60.0, 50.0])
    assert f"| cub | 1 | 3 | {g.mean():.1f} ± {g.std(ddof=1):.1f} | {l.mean():.1f} ± {l.std(ddof=1):.1f} |" in md
    assert "| cub | 4 | 1 | 90.0 | 80.0 |" in md
