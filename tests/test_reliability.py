"""A hostile or careless user against a finished run: no code runs from a run folder, no stale result is reported,
no good record is dropped, a cut stage is made whole, and every mistake is one line on stderr with exit code 2 that
changes no file of the run."""
import errno
import io
import json
import logging
import os
import pickle
import shutil
import stat
import sys
import time
from pathlib import Path

import pytest
import yaml

from glora.core.errors import UserError
from conftest import tiny_args

BAD_INPUTS = []  # (id, argv builder, setup, expected fragment of the error line)


def copy_run(finished_run, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(finished_run, dst)
    return dst


def snapshot(folder: Path) -> dict:
    """Every file of a run with its bytes and mode, but the lock file: a command accepted by preflight takes
    the folder's lock (writing its pid there) before it can fail on later checks, and that file holds no result."""
    return {str(p.relative_to(folder)): (p.read_bytes(), stat.S_IMODE(p.stat().st_mode))
            for p in sorted(folder.rglob("*")) if p.is_file() and p.relative_to(folder) != Path(".lock")}


def one_line_error(r, fragment=""):
    assert r.returncode == 2, (r.returncode, r.stdout[-2000:], r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in r.stderr, r.stderr
    assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


# ------------------------------------------------------------------------------------------------ the table
class Ctx:
    """What a case may use: the run copy, the data root, a scratch folder and monkeypatch."""

    def __init__(self, run, data_root, tmp, monkeypatch):
        self.run, self.data_root, self.tmp, self.mp = run, data_root, tmp, monkeypatch

    def args(self, *sets):
        return tiny_args(self.run, self.data_root, *sets)


def case(name, fragment, *sets, setup=None, argv=None):
    BAD_INPUTS.append(pytest.param(sets, setup, argv, fragment, id=name))


def write(rel, data):
    def setup(c):
        p = c.run / rel
        if isinstance(data, bytes):
            p.write_bytes(data)
        else:
            p.write_text(data)
    return setup


def truncate(rel, keep=0.5):
    def setup(c):
        p = c.run / rel
        b = p.read_bytes()
        p.write_bytes(b[:int(len(b) * keep)])
    return setup


def edit_json(rel, fn):
    def setup(c):
        p = c.run / rel
        p.write_text(json.dumps(fn(json.loads(p.read_text()))))
    return setup


def damage_history_middle(c):
    p = c.run / "search" / "history.jsonl"
    lines = p.read_text().splitlines(keepends=True)
    lines[len(lines) // 2] = '{"generation": 0, "par\n'
    p.write_text("".join(lines))


class Boom:
    def __reduce__(self):
        return (os.mkdir, (os.environ.get("GLORA_TEST_MARKER", "/nonexistent/marker"),))


def malicious_pickle(rel):
    def setup(c):
        marker = c.tmp / "pwned"
        c.mp.setenv("GLORA_TEST_MARKER", str(marker))
        (c.run / rel).write_bytes(pickle.dumps({"epoch": 1, "x": Boom()}))
    return setup


# config values: refused when the config is resolved
case("seed=-1", "seed", "seed=-1")
case("seed too large", "seed", "seed=4294967296")
case("search.seed=-5", "search.seed", "search.seed=-5")
case("supernet.lr=nan", "supernet.lr", "supernet.lr=nan")
case("retrain.lr=.nan", "retrain.lr", "retrain.lr=.nan")
case("retrain.lr negative", "retrain.lr", "retrain.lr=-1e-3")
case("supernet.lr=0", "supernet.lr", "supernet.lr=0")
case("supernet.lr not a number", "expected float", "supernet.lr=1e-3x")
case("weight_decay<0", "supernet.weight_decay", "supernet.weight_decay=-1")
case("warmup<0", "retrain.warmup_epochs", "retrain.warmup_epochs=-0.5")
case("min_lr<0", "retrain.min_lr", "retrain.min_lr=-1")
case("min_lr above lr", "is above supernet.lr", "supernet.min_lr=1e-2")
case("min_lr above lr_grid", "smallest of retrain.lr_grid", "retrain.lr_grid=[1e-3, 3e-3]", "retrain.min_lr=2e-3")


def dup_key_config(c):
    (c.tmp / "dup.yaml").write_text("base: tiny\nsupernet:\n  lr: 1.0e-3\n  epochs: 1\n  lr: 1.0e-2\n")


def list_key_config(c):
    (c.tmp / "listkey.yaml").write_text("base: tiny\nsupernet:\n  ? [lr, epochs]\n  : 1\n")


case("suite --set data.task under --tasks", "sets data.task for each run from --tasks",
     argv=lambda c: ["suite", "--config", "tiny", "--tasks", "mnist", "--set", "data.task=dsprites_loc",
                     "--set", f"output_dir={c.run}"])
case("suite --set seed under --seeds", "sets seed for each run from --seeds",
     argv=lambda c: ["suite", "--config", "tiny", "--tasks", "mnist", "--seeds", "0,1", "--set", " seed = 4",
                     "--set", f"output_dir={c.run}"])
case("suite --set data={task: ...} under --tasks", "sets data.task for each run from --tasks",
     argv=lambda c: ["suite", "--config", "tiny", "--tasks", "mnist", "--set", "data={task: dsprites_loc}",
                     "--set", f"output_dir={c.run}"])
case("--set mapping with a key twice", "key 'img_size' is given twice",
     "model.kwargs={img_size: 32, img_size: 64}")
case("retrain.dir hidden", "retrain.dir: '.lock' must be a plain folder name, not hidden", "retrain.dir=.lock")
def lock_link(c):
    (c.run / ".lock").unlink(missing_ok=True)
    (c.run / ".lock").symlink_to("search/subnet.yaml")


case(".lock a link to a result", "is not a plain file", setup=lock_link)
case("config key given twice", "key 'lr' is given twice (lines 3 and 5)", setup=dup_key_config,
     argv=lambda c: ["--config", str(c.tmp / "dup.yaml")] + c.args()[2:])
case("config key a list", "found unhashable key at line 3", setup=list_key_config,
     argv=lambda c: ["--config", str(c.tmp / "listkey.yaml")] + c.args()[2:])
case("grad_clip<0", "supernet.grad_clip", "supernet.grad_clip=-1")
case("head_lr_scale=inf", "supernet.head_lr_scale", "supernet.head_lr_scale=.inf")
case("threads<0", "threads", "threads=-2")
case("max_eval_batches<0", "search.max_eval_batches", "search.max_eval_batches=-1")
case("max_steps_per_epoch<0", "supernet.max_steps_per_epoch", "supernet.max_steps_per_epoch=-1")
case("num_workers=-1", "data.num_workers", "data.num_workers=-1")
case("merge_atol<0", "retrain.merge_atol", "retrain.merge_atol=-1e-3")
case("select_by unknown", "retrain.select_by", "retrain.select_by=acc")
case("output_dir empty", "output_dir", "output_dir=")
case("crossover<0", "search.crossover", "search.crossover=-1")
case("mutation<0", "search.mutation", "search.mutation=-2")
case("mutation_prob>1", "search.mutation_prob", "search.mutation_prob=1.5")
case("population=0", "search.population", "search.population=0")
case("population not whole", "expected int", "search.population=7.5")
case("eval_batch_size=0", "data.eval_batch_size", "data.eval_batch_size=0")
case("epochs<0", "supernet.epochs", "supernet.epochs=-1")
case("num_blocks<0", "model.num_blocks", "model.num_blocks=-1")
case("image_size<0", "data.image_size", "data.image_size=-1")
case("target_modules empty", "glora.target_modules", "glora.target_modules=[]")
case("probe_paths<0", "supernet.probe_paths", "supernet.probe_paths=-1")
case("sandwich_paths<1", "supernet.sandwich_paths", "supernet.sandwich_paths=0")
case("epochs_grid 0", "retrain.epochs_grid: 0 is not a whole number of epochs >= 1", "retrain.epochs_grid=[2, 0]")
case("epochs_grid fraction", "retrain.epochs_grid: 2.5 is not a whole number", "retrain.epochs_grid=[2.5]")
case("epochs_grid text", "retrain.epochs_grid: 'ten' is not a whole number", "retrain.epochs_grid=[ten]")
case("epochs_grid twice", "retrain.epochs_grid: 2 appears twice", "retrain.epochs_grid=[2, 1, 2.0]")
case("epochs_grid not a list", "retrain.epochs_grid: expected list", "retrain.epochs_grid=5")
case("sandwich_paths huge", "supernet.sandwich_paths", "supernet.sandwich_paths=1e9")
case("path_sampling unknown", "sandwich", "supernet.path_sampling=sandwiched")
case("device", "device", "device=gpu")
# checked before the first stage: model, budget, data, network, folders
case("model.kwargs unknown", "model.kwargs", "model.kwargs.bogus=3")
case("model.kwargs bad value", "model.kwargs", "model.kwargs.img_size=-3")
case("model.name unknown", "vit_nope", "model.name=vit_nope")
case("target_modules match nothing", "not found", "glora.target_modules=[nomatch]")
case("choice not valid for C", "not valid for tensor C", "glora.choices_c=[scalar]")
case("choices_a not a list", "glora.choices_a", "glora.choices_a=vector")
case("unknown choice in choices_b", "unknown choice 'bogus'", "glora.choices_b=[lora,bogus]")
case("choices_d empty", "glora.choices_d", "glora.choices_d=[]")
case("lora in choices_e", "not valid for tensor E", "glora.choices_e=[lora]")
case("infeasible budget", "infeasible", "search.min_params_m=40", "search.max_params_m=50")
case("checkpoint file missing", "/nonexistent/ViT-B_16.npz not found", "model.checkpoint=/nonexistent/ViT-B_16.npz")
case("checkpoint is a folder", "is a folder; expected a .npz", argv=lambda c: c.args(f"model.checkpoint={c.tmp}"))
case("supernet log damaged mid-file", "log.jsonl:1", setup=lambda c: (c.run / "supernet" / "log.jsonl").write_text(
    "{oops\n" + (c.run / "supernet" / "log.jsonl").read_text()))
case("pretrained offline", "model.pretrained",
     "model.pretrained=true", setup=lambda c: (c.mp.setenv("HF_HUB_OFFLINE", "1"),
                                               c.mp.setattr("glora.preflight._pretrained_cached", lambda n: False)))
case("output_dir is a file", "is a file", argv=lambda c: tiny_args(c.run / "summary.json", c.data_root))
case("output_dir under a file", "is a file", argv=lambda c: tiny_args(c.run / "summary.json" / "x", c.data_root))
case("output_dir read-only", "not writable",
     setup=lambda c: c.mp.setattr("glora.preflight.os.access", lambda p, m: Path(p) != c.run))
case("disk full", "No space left",
     setup=lambda c: c.mp.setattr("glora.core.io.atomic_write", _raise(OSError(errno.ENOSPC, "No space left on device",
                                                                          str(c.run / "config.yaml")))))
case("split not UTF-8", "not UTF-8", argv=lambda c: c.args(f"data.root={_bad_task(c, 'utf8')}"))
case("label missing from train800val200", "label out of range",
     argv=lambda c: c.args(f"data.root={_bad_task(c, 'label')}"))
case("data.root is a file", "data.root", argv=lambda c: c.args(
    f"data.root={c.run / 'summary.json'}", "data.task=dsprites_ori"))
case("retrain subnet missing", "subnet file not found",
     argv=lambda c: c.args("retrain.dir=retrain-x") + ["--stage", "retrain", "--subnet", "/nonexistent/s.yaml"])
case("retrain subnet wrong layer", "is not an adapted layer",
     argv=lambda c: c.args("retrain.dir=retrain-x") + ["--stage", "retrain", "--subnet", str(_bad_subnet(c))])
# the run folder holds another run's results: each stage recognises its settings
case("other task", "data.task", "data.task=dsprites_other",
     setup=lambda c: _other_task(c.data_root))
case("other seed", "seed: 0 -> 1", "seed=1")
case("other supernet lr", "supernet.lr", "supernet.lr=2e-3")
case("other model kwargs", "model.kwargs.drop_path_rate", "model.kwargs.drop_path_rate=0.1")
case("other retrain lr", "retrain.lr", "retrain.lr=2e-3")
case("other retrain select_by", "retrain.select_by: 'top1' -> 'loss'", "retrain.select_by=loss")
case("other retrain epochs_grid", "retrain.epochs_grid: [] -> [1, 2]", "retrain.epochs_grid=[1, 2]")
case("other budget", "search.max_params_m", "search.max_params_m=0.04")
case("fewer generations", "ran 2 search generations", "search.generations=1")
case("image_size not the model's", "data.image_size: 64 does not match the 32x32 input", "data.image_size=64")
case("image_size huge", "data.image_size: 100000 is more than 4096", "data.image_size=100000")
case("rank wider than every layer", "glora.ranks: rank 100000 is above 32", "glora.ranks=[2, 100000]")
case("lora_rank wider than every layer", "retrain.lora_rank: rank 4096 is above 32", "retrain.lora_rank=4096")
case("threads huge", "threads: 1000000 is more than 1024", "threads=1000000")
case("num_workers huge", "data.num_workers: 100000 is more than 1024", "data.num_workers=100000")
case("crossover huge", "search.crossover: 1000000000000 is more than 100000", "search.crossover=1e12")
case("warmup overflows", "supernet.warmup_epochs: 1e+308 is more than", "supernet.warmup_epochs=1e308")
case("a stage run beside later ones it would leave stale", "search was made with other settings (supernet.lr",
     setup=lambda c: shutil.rmtree(c.run / "supernet"), argv=lambda c: c.args("supernet.lr=2e-3") + ["--stage",
                                                                                                  "supernet"])
case("merged model truncated", "model_merged.safetensors is damaged",
     setup=truncate("retrain/model_merged.safetensors", 0.9))
case("retrain adapters empty", "retrain/adapters.safetensors is damaged", setup=write("retrain/adapters.safetensors",
                                                                                        b""))
case("output_dir cannot be made", "cannot make or use /proc/",
     argv=lambda c: tiny_args(Path("/proc/no-such-process/run"), c.data_root))
case("prepare --seed out of range", "prepare --seed -1: must be an integer in [0, 4294967295]",
     argv=lambda c: ["prepare", "--task", "dsprites_ori", "--seed", "-1", "--root", str(c.tmp / "p")])
case("stage folder without record", "no settings.json",
     setup=lambda c: (c.run / "supernet" / "settings.json").unlink())
# damaged files of the run
case("checkpoint truncated", "checkpoint.safetensors is damaged", setup=truncate("supernet/checkpoint.safetensors"))
case("checkpoint empty", "checkpoint.safetensors is damaged", setup=write("supernet/checkpoint.safetensors", b""))
case("checkpoint is a pickle", "checkpoint.safetensors is damaged",
     setup=malicious_pickle("supernet/checkpoint.safetensors"))
case("legacy pickle checkpoint", "never loaded", setup=malicious_pickle("supernet/checkpoint.pt"))
case("retrain checkpoint truncated", "is damaged", setup=truncate("retrain/checkpoint.safetensors", 0.9))
case("refit checkpoint damaged", "lr0.001/checkpoint.safetensors is damaged",
     setup=lambda c: ((c.run / "retrain" / "lora" / "refit" / "lr0.001").mkdir(parents=True),
                      (c.run / "retrain" / "lora" / "refit" / "lr0.001" / "checkpoint.safetensors").write_bytes(b"")))
case("adapters truncated", "adapters.safetensors is damaged", setup=truncate("supernet/adapters.safetensors"))
case("adapters empty", "adapters.safetensors is damaged", setup=write("supernet/adapters.safetensors", b""))
case("state.json a list", "expected a mapping", setup=write("search/state.json", "[1, 2]"))
case("state.json missing keys", "no rng", setup=edit_json("search/state.json",
                                                          lambda d: {k: v for k, v in d.items() if k != "rng"}))
case("state.json not JSON", "not valid JSON", setup=write("search/state.json", '{"generation": 2,'))
case("history damaged mid-file", "damaged line", setup=damage_history_middle)
case("summary.json damaged", "summary.json", setup=write("summary.json", "{not json"))
case("summary.json a list", "summary.json", setup=write("summary.json", "[]"))
case("settings.json damaged", "settings.json", setup=write("supernet/settings.json", "{"))
case("metrics.json damaged", "metrics.json", setup=write("retrain/metrics.json", "{"))
case("subnet.yaml damaged", "subnet.yaml", setup=write("search/subnet.yaml", "layers: [\n"))
case("retrain subnet.yaml damaged", "retrain/subnet.yaml", setup=write("retrain/subnet.yaml", "- 1\n"))
case("stage folder is a file", "is a file",
     setup=lambda c: (shutil.rmtree(c.run / "retrain"), (c.run / "retrain").write_text("x")))
# other commands and usage errors
case("inspect damaged subnet", "subnet.yaml", setup=write("search/subnet.yaml", "layers: 3\n"),
     argv=lambda c: ["inspect", str(c.run)])
case("inspect damaged history", "damaged line", setup=damage_history_middle,
     argv=lambda c: ["inspect", str(c.run)])
case("inspect subnet not UTF-8", "UTF-8", setup=write("search/subnet.yaml", b"model: \xff\n"),
     argv=lambda c: ["inspect", str(c.run)])
case("inspect --out is a file", "inspect --out", argv=lambda c: ["inspect", str(c.run), "--out",
                                                                 str(c.run / "summary.json")])
case("prepare into a file", "prepare --root", argv=lambda c: ["prepare", "--task", "dsprites_ori", "--root",
                                                             str(c.run / "summary.json")])
case("prepare no --task", "--task", argv=lambda c: ["prepare"])
case("inspect no target", "target", argv=lambda c: ["inspect"])
case("unknown --stage", "--stage", argv=lambda c: c.args() + ["--stage", "evolve"])
case("unknown flag", "--bogus", argv=lambda c: c.args() + ["--bogus"])
case("--set without =", "expected section.key=value", argv=lambda c: c.args() + ["--set", "supernet"])


def _raise(exc):
    def f(*a, **k):
        raise exc
    return f


def _bad_task(c, kind) -> Path:
    """A copy of the generated task (lists copied, images linked) with one bad line."""
    root = c.tmp / f"data-{kind}"
    task = root / "dsprites_loc"
    task.mkdir(parents=True)
    src = c.data_root / "dsprites_loc"
    (task / "images").symlink_to(src / "images")
    for split in ("train800", "val200", "train800val200", "test"):
        shutil.copy(src / f"{split}.txt", task / f"{split}.txt")
    lines = (task / "train800.txt").read_bytes().splitlines(keepends=True)
    if kind == "utf8":
        lines[5] = b"images/train/caf\xe9.png 3\n"
    else:
        lines[5] = lines[5].rsplit(b" ", 1)[0] + b" 99\n"
    (task / "train800.txt").write_bytes(b"".join(lines))
    return root


def _bad_subnet(c) -> Path:
    data = yaml.safe_load((c.run / "search" / "subnet.yaml").read_text())
    data["layers"][0]["name"] = "blocks.9.attn.qkv"
    p = c.tmp / "bad_subnet.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def _other_task(data_root: Path) -> None:
    other = data_root / "dsprites_other"
    if not other.exists():
        shutil.copytree(data_root / "dsprites_loc", other, symlinks=True,
                        ignore=lambda d, names: ["images"] if Path(d) == data_root / "dsprites_loc" else [])
        (other / "images").symlink_to(data_root / "dsprites_loc" / "images")


def test_bad_input_table_size():
    assert len(BAD_INPUTS) == 125, len(BAD_INPUTS)


@pytest.mark.parametrize("sets,setup,argv,fragment", BAD_INPUTS)
def test_bad_input_is_one_line_exit_2_and_changes_nothing(finished_run, data_root, tmp_path, monkeypatch, cli,
                                                           sets, setup, argv, fragment):
    run = copy_run(finished_run, tmp_path)
    c = Ctx(run, data_root, tmp_path, monkeypatch)
    if setup is not None:
        setup(c)
    before = snapshot(run)
    data_before = sorted(p.name for p in data_root.iterdir())
    args = argv(c) if argv is not None else c.args(*sets)
    r = cli(*args)
    monkeypatch.undo()
    one_line_error(r, fragment)
    assert snapshot(run) == before  # no file of the run changed, none appeared
    assert sorted(p.name for p in data_root.iterdir()) == data_before
    assert not (tmp_path / "pwned").exists()


# ------------------------------------------------------------------------------------------------ items one by one
def test_finished_run_reruns_without_unpickling(finished_run, data_root, tmp_path, monkeypatch, cli):
    import pickle as pk

    import torch

    def no(*a, **k):
        raise AssertionError("a run folder file was unpickled")
    run = copy_run(finished_run, tmp_path)
    for mod, name in ((torch, "load"), (pk, "load"), (pk, "loads")):
        monkeypatch.setattr(mod, name, no)
    r = cli(*tiny_args(run, data_root))
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("already complete") == 3


def test_malicious_pickle_runs_nothing(finished_run, data_root, tmp_path, monkeypatch, cli):
    """A crafted checkpoint in a shared run folder: refused in one line, and the code in it never runs."""
    from glora.core.checkpoint import load_checkpoint
    run = copy_run(finished_run, tmp_path)
    marker = tmp_path / "pwned"
    monkeypatch.setenv("GLORA_TEST_MARKER", str(marker))
    (run / "supernet" / "checkpoint.pt").write_bytes(pickle.dumps(Boom()))
    one_line_error(cli(*tiny_args(run, data_root), "--stage", "supernet"), "never loaded")
    (run / "supernet" / "checkpoint.pt").unlink()
    (run / "supernet" / "checkpoint.safetensors").write_bytes(pickle.dumps(Boom()))
    one_line_error(cli(*tiny_args(run, data_root), "--stage", "supernet"), "is damaged")
    with pytest.raises(UserError):
        load_checkpoint(run / "supernet")
    assert not marker.exists()
    pickle.loads(pickle.dumps(Boom()))  # the payload is live: loading it as a pickle would have run it
    assert marker.exists()


def test_changed_task_is_refused_not_reported(finished_run, data_root, tmp_path, cli):
    run = copy_run(finished_run, tmp_path)
    _other_task(data_root)
    before = snapshot(run)
    line = one_line_error(cli(*tiny_args(run, data_root, "data.task=dsprites_other")), "data.task")
    assert "'dsprites_loc' -> 'dsprites_other'" in line and str(run / "supernet") in line
    assert snapshot(run) == before  # config.yaml still names the task the stages ran with
    assert yaml.safe_load((run / "config.yaml").read_text())["data"]["task"] == "dsprites_loc"
    # another retrain folder for another retrain setting is the documented way, and it is accepted
    r = cli(*tiny_args(run, data_root, "retrain.dir=retrain-lr", "retrain.lr=2e-3", "retrain.epochs=0",
                       "retrain.baselines=[]"), "--stage", "retrain")
    assert r.returncode == 0, r.stderr
    rec = json.loads((run / "retrain-lr" / "settings.json").read_text())
    assert rec["fingerprint"]["retrain.lr"] == 2e-3 and rec["config"]["retrain"]["lr"] == 2e-3


def test_half_trained_supernet_with_other_seed_or_lr(tmp_path, data_root, cli, monkeypatch):
    """Killed in epoch 2 of the supernet; rerun with another seed or lr: refused; the same command resumes."""
    from supernet.wrapper import GloraSupernet
    orig = GloraSupernet.sample_path

    class Killed(Exception):
        pass

    def dying(self, seed, step):
        if step == 8:
            raise Killed()
        return orig(self, seed, step)
    monkeypatch.setattr(GloraSupernet, "sample_path", dying)
    out = tmp_path / "half"
    with pytest.raises(Killed):
        cli(*tiny_args(out, data_root), "--stage", "supernet")
    monkeypatch.undo()
    before = snapshot(out)
    one_line_error(cli(*tiny_args(out, data_root, "seed=5"), "--stage", "supernet"), "seed: 0 -> 5")
    one_line_error(cli(*tiny_args(out, data_root, "supernet.lr=5e-3"), "--stage", "supernet"), "supernet.lr")
    assert snapshot(out) == before
    assert cli(*tiny_args(out, data_root), "--stage", "supernet").returncode == 0


def test_cut_search_is_made_whole(finished_run, data_root, tmp_path, cli):
    """Killed after subnet.yaml, before topk.yaml and done: the rerun writes what is missing, the same result."""
    run = copy_run(finished_run, tmp_path)
    subnet = (run / "search" / "subnet.yaml").read_bytes()
    topk = (run / "search" / "topk.yaml").read_bytes()
    (run / "search" / "topk.yaml").unlink()
    (run / "search" / "done").unlink()
    r = cli(*tiny_args(run, data_root))
    assert r.returncode == 0, r.stderr
    assert (run / "search" / "done").is_file()
    assert (run / "search" / "topk.yaml").read_bytes() == topk
    assert (run / "search" / "subnet.yaml").read_bytes() == subnet


def test_damaged_history_line_keeps_every_record(tmp_path):
    """A damaged line mid-file stops the resume in one line naming it (the file untouched); a torn last line
    (a kill mid-write) is dropped and the rest kept."""
    from search.evolution import EvolutionSearcher
    from supernet.space import LayerSpec, SearchSpace
    space = SearchSpace([LayerSpec(f"l{i}", 8, 8) for i in range(3)], ranks=(2,))

    def searcher(gens):
        return EvolutionSearcher(space, lambda s: float(len(str(s.layers))) / 100, min_params=0, max_params=10_000,
                                 generations=gens, population=6, select=3, mutation=2, mutation_prob=0.3,
                                 crossover=2, seed=0, out_dir=tmp_path / "s", progress=False)
    ref = searcher(3).run()
    hist = tmp_path / "s" / "history.jsonl"
    good = hist.read_text()
    n = len(good.splitlines())
    (tmp_path / "s" / "state.json").unlink()  # as if killed in generation 0, before any state.json
    lines = good.splitlines(keepends=True)
    lines[n // 2] = lines[n // 2][:20] + "\n"
    hist.write_text("".join(lines))
    with pytest.raises(UserError, match=f"history.jsonl:{n // 2 + 1}: damaged line"):
        searcher(3).run()
    assert hist.read_text() == "".join(lines)
    hist.write_text(good + '{"generation": 2, "lay')  # torn last line
    again = searcher(3).run()
    assert again.best == ref.best
    assert hist.read_text().splitlines()[:n] == good.splitlines()


def test_fail_fast_budget_before_supernet_training(tmp_path, data_root, cli):
    out = tmp_path / "o"
    t0 = time.time()
    one_line_error(cli(*tiny_args(out, data_root, "search.min_params_m=40", "search.max_params_m=50")),
                   "infeasible")
    assert time.time() - t0 < 20 and not out.exists()
    one_line_error(cli(*tiny_args(out, data_root, "search.crossover=-3")), "search.crossover")
    assert not out.exists()


def test_pretrained_without_network_fails_fast(tmp_path, data_root, cli, monkeypatch):
    import glora.preflight as pf
    monkeypatch.setattr(pf, "_pretrained_cached", lambda name: False)
    for var in ("HF_HUB_OFFLINE", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy", "HF_ENDPOINT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(pf, "_reachable", lambda host, timeout: False)
    line = one_line_error(cli(*tiny_args(tmp_path / "o", data_root, "model.pretrained=true")), "cannot be reached")
    assert "model.checkpoint" in line and not (tmp_path / "o").exists()
    monkeypatch.setattr(pf, "_reachable", lambda host, timeout: True)
    from glora.core.config import load_config
    pf.check_pretrained(load_config("tiny", ["model.pretrained=true"]))  # reachable: accepted


@pytest.mark.skipif(os.geteuid() == 0, reason="permissions do not bind root")
def test_read_only_run_folder(finished_run, data_root, tmp_path, cli):
    run = copy_run(finished_run, tmp_path)
    run.chmod(0o555)
    try:
        one_line_error(cli(*tiny_args(run, data_root)), "not writable")
    finally:
        run.chmod(0o755)


def test_prepare_existing_task_says_it_left_it(cli, data_root):
    before = (data_root / "dsprites_loc" / "train800.txt").stat().st_mtime_ns
    r = cli("prepare", "--task", "dsprites_loc", "--root", str(data_root))
    assert r.returncode == 0 and "left" in r.stdout and "--overwrite" in r.stdout
    assert (data_root / "dsprites_loc" / "train800.txt").stat().st_mtime_ns == before


# ------------------------------------------------------------------------------------------------ numbers, files, logs
@pytest.mark.parametrize("typed,key,value", [("1e-3", "retrain.lr", 1e-3), ("1E-3", "supernet.lr", 1e-3),
                                             (".5", "supernet.warmup_epochs", 0.5),
                                             ("5e4", "search.population", 50000), ("2", "retrain.lr", 2.0),
                                             ("'3e-4'", "retrain.lr", 3e-4), ("1e1", "glora.ranks", None)])
def test_numbers_as_people_type_them(typed, key, value, tmp_path):
    from glora.core.config import load_config
    if key == "glora.ranks":
        cfg = load_config("tiny", [f"glora.ranks=[{typed}, 4]"])
        assert cfg.glora.ranks == [10, 4] and all(type(r) is int for r in cfg.glora.ranks)
        return
    cfg = load_config("tiny", [f"{key}={typed}"])
    sec, k = key.split(".")
    assert cfg[sec][k] == value and type(cfg[sec][k]) is type(value)
    f = tmp_path / "c.yaml"
    f.write_text(f"{sec}:\n  {k}: {typed}\n")
    assert load_config(str(f))[sec][k] == value
    with pytest.raises(UserError, match="expected int"):
        load_config("tiny", ["search.population=5.5e0"])


def test_atomic_writes_follow_umask_and_sync(tmp_path, monkeypatch):
    import glora.core.io as cio
    synced = []
    real = os.fsync
    monkeypatch.setattr(cio.os, "fsync", lambda fd: (synced.append(fd), real(fd)))
    old = os.umask(0o022)
    try:
        cio.atomic_write_json(tmp_path / "a.json", {"x": 1})
        assert stat.S_IMODE((tmp_path / "a.json").stat().st_mode) == 0o644
        os.umask(0o027)
        cio.atomic_write_text(tmp_path / "b.txt", "x")
        assert stat.S_IMODE((tmp_path / "b.txt").stat().st_mode) == 0o640
    finally:
        os.umask(old)
    assert len(synced) >= 4  # each write: the file, then its folder
    assert not list(tmp_path.glob(".*.tmp"))


def test_safetensors_bytes_do_not_depend_on_metadata_order(tmp_path):
    import torch
    from safetensors.torch import load_file
    from glora.core.io import atomic_save_safetensors
    t = {"b": torch.arange(6.).reshape(2, 3), "a": torch.ones(4)}
    meta = {f"k{i}": str(i) for i in range(12)}
    blobs = set()
    for i in range(6):
        m = dict(reversed(list(meta.items()))) if i % 2 else meta
        atomic_save_safetensors(tmp_path / f"{i}.safetensors", t, metadata=m)
        blobs.add((tmp_path / f"{i}.safetensors").read_bytes())
    assert len(blobs) == 1
    back = load_file(tmp_path / "0.safetensors")
    assert torch.equal(back["b"], t["b"]) and torch.equal(back["a"], t["a"])


def test_checkpoint_round_trip_is_exact(tmp_path):
    import torch
    from glora.core.checkpoint import load_checkpoint, save_checkpoint
    net = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, betas=(0.8, 0.95))
    net(torch.randn(2, 4)).sum().backward()
    opt.step()
    state = {"epoch": 3, "fingerprint": {"a": [1, 2.5, "x", None, True]}, "optimizer": opt.state_dict(),
             "params": {k: v.detach() for k, v in net.named_parameters()}}
    save_checkpoint(tmp_path / "checkpoint.safetensors", state)
    back = load_checkpoint(tmp_path)
    assert back["epoch"] == 3 and back["fingerprint"] == state["fingerprint"]
    assert back["optimizer"]["param_groups"] == state["optimizer"]["param_groups"]
    for k, v in state["optimizer"]["state"].items():
        for name, t in v.items():
            assert torch.equal(back["optimizer"]["state"][k][name], t)
    opt.load_state_dict(back["optimizer"])


def test_progress_off_a_terminal_is_a_few_plain_lines():
    from glora.core.progress import progress_bar
    buf = io.StringIO()
    bar = progress_bar(total=5000, desc="supernet 1/2", file=buf)
    for _ in range(5000):
        bar.update(1)
        bar.set_postfix(loss="0.123")
    bar.close()
    text = buf.getvalue()
    assert "\r" not in text and "\x1b" not in text
    assert 1 <= len(text.splitlines()) <= 3 and "5000/5000" in text.splitlines()[-1]
    quiet = io.StringIO()
    for _ in progress_bar(range(10), desc="x", enabled=False, file=quiet):
        pass
    assert quiet.getvalue() == ""


def test_retrain_compares_merged_and_unmerged_logits(finished_run, data_root, tmp_path, cli, monkeypatch):
    """A merge that changed the function is caught before the merged model is written."""
    import torch

    import glora.stages.retrain as rs
    real = rs.merge_and_unload

    def off_by_a_little(model):
        merged = real(model)
        with torch.no_grad():
            w = merged.blocks[0].mlp.fc1.weight
            w.add_(0.05 * torch.randn(w.shape, generator=torch.Generator().manual_seed(0)))
        return merged
    monkeypatch.setattr(rs, "merge_and_unload", off_by_a_little)
    run = copy_run(finished_run, tmp_path)
    with pytest.raises(RuntimeError, match="merged model differs"):
        cli(*tiny_args(run, data_root, "retrain.dir=retrain-m", "retrain.epochs=0",
                       "retrain.baselines=[]"), "--stage", "retrain")
    assert not (run / "retrain-m" / "model_merged.safetensors").exists()


# ------------------------------------------------------------------------------------------------ the summary
def test_summary_reports_this_configs_retrain_folder(finished_run, data_root, tmp_path, cli):
    """Another retrain.dir beside the default one: a later run of the default config reports its own folder's
    results, not the last ones written; a deleted summary.json is rebuilt from the stage folders."""
    run = copy_run(finished_run, tmp_path)
    assert cli(*tiny_args(run, data_root, "retrain.dir=retrain2", "retrain.epochs=1")).returncode == 0
    other = json.loads((run / "retrain2" / "metrics.json").read_text())
    r = cli(*tiny_args(run, data_root))
    assert r.returncode == 0, r.stderr
    mine = json.loads((run / "retrain" / "metrics.json").read_text())
    assert mine["epochs"] != other["epochs"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["retrain"]["epochs"] == mine["epochs"] and summary["retrain"]["test_acc"] == mine["test_acc"]
    assert summary["retrain"]["merged_file"] == str(run / "retrain" / "model_merged.safetensors")
    assert "retrain2" not in r.stdout
    (run / "summary.json").unlink()
    r = cli(*tiny_args(run, data_root))
    assert r.returncode == 0, r.stderr
    assert json.loads((run / "summary.json").read_text())["retrain"] == summary["retrain"]
    assert f"{mine['test_acc']:.4f}" in r.stdout and str(run / "search" / "subnet.yaml") in r.stdout


def test_a_moved_run_names_its_files_where_they_are(finished_run, data_root, tmp_path, cli):
    moved = copy_run(finished_run, tmp_path)
    r = cli(*tiny_args(moved, data_root))
    assert r.returncode == 0, r.stderr
    s = json.loads((moved / "summary.json").read_text())
    assert s["retrain"]["merged_file"] == str(moved / "retrain" / "model_merged.safetensors")
    assert s["supernet"]["adapter_file"] == str(moved / "supernet" / "adapters.safetensors")
    assert str(finished_run) not in r.stdout


def test_deleted_model_file_is_written_again(finished_run, data_root, tmp_path, cli):
    """metrics.json alone does not make a retrain complete: a deleted merged model is made again from the trained
    points (the same bytes), and the retrain's time counts the first session's too."""
    run = copy_run(finished_run, tmp_path)
    merged = run / "retrain" / "model_merged.safetensors"
    before, data = json.loads((run / "retrain" / "metrics.json").read_text()), merged.read_bytes()
    first = json.loads((run / "retrain" / "result.json").read_text())["time_s"]
    merged.unlink()
    r = cli(*tiny_args(run, data_root))
    assert r.returncode == 0, r.stderr
    assert merged.read_bytes() == data
    assert json.loads((run / "retrain" / "metrics.json").read_text())["test_acc"] == before["test_acc"]
    assert "(resumed: every session's time)" in r.stdout
    assert json.loads((run / "retrain" / "result.json").read_text())["time_s"] >= first


def test_a_stage_failing_before_it_writes_leaves_its_folder_free(data_root, tmp_path, monkeypatch):
    """A stage that fails at once (a device that is not there, a checkpoint that does not load) must not leave a
    settings record behind that refuses the corrected command; a stage that had started before keeps its own."""
    import glora.stages.supernet as sn
    from glora import pipeline
    from glora.core.config import load_config
    from glora.preflight import record_settings
    out = tmp_path / "run"
    cfg = load_config("tiny", [f"output_dir={out}", f"data.root={data_root}"])

    def fail(cfg, progress=True):
        raise UserError("no such device")
    monkeypatch.setattr(sn, "train_supernet", fail)
    with pytest.raises(UserError):
        pipeline.run_stages(cfg, ["supernet"], progress=False)
    assert not (out / "supernet").exists()
    record_settings(cfg, "supernet")  # a stage begun by an earlier command
    with pytest.raises(UserError):
        pipeline.run_stages(cfg, ["supernet"], progress=False)
    assert (out / "supernet" / "settings.json").is_file()


@pytest.mark.skipif(sys.platform == "win32", reason="flock is POSIX")
def test_a_second_command_in_a_busy_folder_is_refused(finished_run, data_root, tmp_path, cli):
    """While one command works in output_dir (its lock held), a second one on the same folder, a run or a suite
    reaching that task, stops in one line and changes nothing; once the first ends, the same command runs."""
    import fcntl
    run = tmp_path / "dsprites_loc"  # also the suite's folder of that task under output_dir=tmp_path
    shutil.copytree(finished_run, run)
    suite = ["suite", "--config", "tiny", "--no-progress", "--tasks", "dsprites_loc", "--set", f"output_dir={tmp_path}",
             "--set", f"data.root={data_root}"]
    with open(run / ".lock", "a+") as holder:
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        holder.write("pid 12345 on elsewhere\n")
        holder.flush()
        before = snapshot(run)
        line = one_line_error(cli(*tiny_args(run, data_root)), f"output_dir {run} is in use by another command")
        assert "pid 12345 on elsewhere" in line
        # other settings: still "in use", never "made with other settings ... delete it"
        one_line_error(cli(*tiny_args(run, data_root, "supernet.lr=3e-3")), "is in use by another command")
        one_line_error(cli(*suite), f"output_dir {run} is in use by another command")
        assert snapshot(run) == before
    with open(tmp_path / ".lock", "a+") as holder:  # a suite working in the suite folder: a second one waits
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        one_line_error(cli(*suite), f"output_dir {tmp_path} is in use by another command")
        assert not (tmp_path / "suite.md").exists()
    r = cli(*tiny_args(run, data_root))  # the lock went with its holder
    assert r.returncode == 0, r.stderr
    assert (run / ".lock").read_text() == ""  # emptied when its command ended


def test_a_run_killed_while_writing_its_first_record_leaves_a_usable_folder(data_root, tmp_path, cli):
    """Killed inside the first atomic write of a stage (its settings record): the folder holds only that write's
    temporary file. The same command then runs; a folder with any other file and no record is still refused."""
    out = tmp_path / "run"
    (out / "supernet").mkdir(parents=True)
    (out / "supernet" / ".settings.json.k3x9q2ab.tmp").write_text('{"stage": "sup')  # half a record, never renamed
    r = cli(*tiny_args(out, data_root))
    assert r.returncode == 0, r.stderr
    assert json.loads((out / "supernet" / "settings.json").read_text())["stage"] == "supernet"
    assert not (out / "supernet" / ".settings.json.k3x9q2ab.tmp").exists()  # the leftover is cleared
    other = tmp_path / "other"
    (other / "supernet").mkdir(parents=True)
    (other / "supernet" / ".notes.tmp").write_text("by hand")  # hidden and .tmp, but not an atomic write's
    one_line_error(cli(*tiny_args(other, data_root)), "no settings.json")


def test_leftovers_of_killed_writes_are_removed_only_where_the_lock_reaches(tmp_path):
    """The lock holder clears atomic writes' temporary files in its folder and below, but leaves a subfolder
    locked by a command of its own, a folder reached through a link, and files that only look alike."""
    from glora.pipeline import LOCK, remove_partial_writes
    out, elsewhere = tmp_path / "out", tmp_path / "elsewhere"
    for d in (out / "retrain" / "candidates", out / "task_a", elsewhere):
        d.mkdir(parents=True)
    gone = [out / ".summary.json.a1b2c3d4.tmp", out / "retrain" / "candidates" / ".model.safetensors.zz_9y8x7.tmp"]
    kept = [out / "task_a" / ".result.json.a1b2c3d4.tmp",  # task_a has its own lock
            elsewhere / ".result.json.a1b2c3d4.tmp",  # reached only through a link
            out / ".notes.tmp", out / ".summary.json.a1b2c3.tmp", out / "summary.json.a1b2c3d4.tmp"]
    for p in gone + kept:
        p.write_text("half")
    (out / "task_a" / LOCK).write_text("")
    (out / "link").symlink_to(elsewhere)
    assert remove_partial_writes(out) == len(gone)
    assert [p for p in gone if p.exists()] == []
    assert [p for p in kept if not p.exists()] == []
    assert remove_partial_writes(out) == 0


def test_leftovers_that_cannot_be_removed_are_named_in_one_warning(tmp_path, monkeypatch, caplog):
    """A temporary file the lock holder may not delete (another user's, a read-only mount) is not counted as
    removed, and one warning names how many were left and one of them; the others are still removed."""
    from glora.pipeline import remove_partial_writes
    out = tmp_path / "out"
    (out / "retrain").mkdir(parents=True)
    stuck, fine = out / "retrain" / ".model.safetensors.a1b2c3d4.tmp", out / ".summary.json.a1b2c3d4.tmp"
    for p in (stuck, fine):
        p.write_text("half")
    real_unlink = Path.unlink

    def unlink(self, *a, **k):
        if self.name == stuck.name:
            raise PermissionError(13, "Permission denied")
        return real_unlink(self, *a, **k)
    monkeypatch.setattr(Path, "unlink", unlink)
    with caplog.at_level(logging.WARNING, logger="glora"):
        assert remove_partial_writes(out) == 1
    assert stuck.exists() and not fine.exists()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "could not remove 1 temporary file" in warnings[0], warnings
    assert str(stuck) in warnings[0] and "Permission denied" in warnings[0]


@pytest.mark.skipif(sys.platform == "win32", reason="flock is POSIX")
def test_a_folder_that_cannot_be_locked_runs_unguarded_with_one_warning(tmp_path, monkeypatch, caplog):
    """A file system without flock: the command runs, warns once (not at the probe and again at the hold), and
    leaves temporary files alone, since another command may be writing them."""
    import errno
    import logging
    from glora import pipeline

    def no_locks(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(pipeline.fcntl, "flock", no_locks)
    out = tmp_path / "out"
    out.mkdir()
    (out / pipeline.LOCK).write_text("")
    partial = out / ".summary.json.a1b2c3d4.tmp"
    partial.write_text("half")
    with caplog.at_level(logging.WARNING, logger="glora"):
        pipeline.check_not_busy(out)
        with pipeline.hold_output(out):
            pass
    warned = [r for r in caplog.records if "cannot be locked" in r.getMessage()]
    assert len(warned) == 1 and "No locks available" in warned[0].getMessage()
    assert partial.exists()


def test_summary_lists_only_the_files_the_run_has(data_root, tmp_path, cli):
    out = tmp_path / "run"
    r = cli(*tiny_args(out, data_root), "--stage", "supernet")
    assert r.returncode == 0, r.stderr
    assert f"files: {out}/{{config.yaml, supernet/, summary.json}}" in r.stdout
