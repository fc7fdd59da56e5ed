"""CLI behaviour: data errors and subcommands exit with a one-line message and code 2; nothing is damaged."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--config", "tiny", "--no-progress"]


def one_line_error(r, fragment):
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0] and "Traceback" not in r.stderr, r.stderr


def test_missing_task_folder(cli, tmp_path):
    r = cli(*TINY, "--set", f"output_dir={tmp_path / 'o'}", "--set", f"data.root={tmp_path / 'nothing'}",
            "--set", "data.task=my_task")
    one_line_error(r, "my_task")


def test_offline_task_not_prepared_when_disabled(cli, tmp_path):
    r = cli(*TINY, "--set", f"output_dir={tmp_path / 'o'}", "--set", f"data.root={tmp_path}",
            "--set", "data.prepare_missing=false")
    one_line_error(r, "prepare_missing")


def test_malformed_list_line(cli, tmp_path):
    task = tmp_path / "bad_task"
    task.mkdir()
    for split in ["train800", "val200", "train800val200", "test"]:
        (task / f"{split}.txt").write_text("img.png not_a_label\n")
    r = cli(*TINY, "--set", f"output_dir={tmp_path / 'o'}", "--set", f"data.root={tmp_path}",
            "--set", "data.task=bad_task")
    one_line_error(r, "train800")


def test_unknown_model_and_checkpoint(cli, tmp_path):
    r = cli(*TINY, "--set", f"output_dir={tmp_path / 'o'}", "--set", "model.name=vit_nope")
    one_line_error(r, "vit_nope")
    r = cli(*TINY, "--set", f"output_dir={tmp_path / 'o'}", "--set", "model.checkpoint=offline:nope")
    one_line_error(r, "nope")


def test_search_before_supernet_and_retrain_before_search(cli, tmp_path):
    r = cli(*TINY, "--set", f"output_dir={tmp_path / 'o'}", "--stage", "retrain")
    one_line_error(r, "run --stage search first")


def test_prepare_and_inspect_errors(cli, tmp_path):
    one_line_error(cli("prepare", "--task", "imagenet", "--root", str(tmp_path)), "unknown offline task 'imagenet'")
    one_line_error(cli("inspect", str(tmp_path / "missing")), "missing")


def test_prepare_writes_a_task(cli, tmp_path):
    r = cli("prepare", "--task", "dsprites_ori", "--root", str(tmp_path))
    assert r.returncode == 0, r.stderr
    for split in ["train800", "val200", "train800val200", "test"]:
        assert (tmp_path / "dsprites_ori" / f"{split}.txt").is_file()
    assert len((tmp_path / "dsprites_ori" / "train800.txt").read_text().splitlines()) == 800


def test_a_task_prepared_from_another_seed_needs_data_seed(cli, tmp_path):
    r = cli("prepare", "--task", "dsprites_loc", "--root", str(tmp_path), "--seed", "3")
    assert r.returncode == 0 and "--set data.seed=3" in r.stdout, (r.stdout, r.stderr)
    r = cli(*TINY, "--set", f"output_dir={tmp_path / 'o'}", "--set", f"data.root={tmp_path}")
    one_line_error(r, "was generated from seed 3, not 0")
    assert not (tmp_path / "o").exists()
