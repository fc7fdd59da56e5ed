"""Data parallelism under torchrun (2 gloo processes on the CPU) gives the answer of one process."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import run_search
from glora.core import dist
from glora.core.checkpoint import CHECKPOINT
from glora.core.engine import InMemorySplit
from glora.stages.retrain import MERGED
from glora.stages.supernet import ADAPTERS

ROOT = Path(__file__).resolve().parent.parent
TIMEOUT = 300  # seconds for one torchrun job: a hang fails the test instead of the suite


def torchrun_cmd(*args, nproc: int = 2) -> list[str]:
    # --standalone: a local rendezvous on a free port
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]


def worker_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("WORLD_SIZE", None)
    return env


def torchrun(*args, nproc: int = 2) -> subprocess.CompletedProcess:
    """Run a torchrun job to its end; past TIMEOUT, kill the launcher and its workers (a hung collective would
    otherwise leave them running after the test fails) and raise TimeoutExpired."""
    cmd = torchrun_cmd(*args, nproc=nproc)
    proc = subprocess.Popen(cmd, cwd=ROOT, env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        kill_job(proc)
        out, err = proc.communicate()
        raise subprocess.TimeoutExpired(cmd, TIMEOUT, output=out, stderr=err) from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:  # field 4 of /proc/PID/stat: the parent's pid
            kids.append(int(stat.parent.name))
    return kids


def kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL a torchrun launcher and its workers (each worker runs in a session of its own, so killing the
    launcher's group alone would leave them running), then wait until none is left."""
    workers = _children(proc.pid)
    os.killpg(proc.pid, signal.SIGKILL)
    for w in workers:
        try:
            os.killpg(w, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=60)
    t0 = time.time()
    while any(Path(f"/proc/{w}").exists() and "Z" not in _state(w) for w in workers) and time.time() - t0 < 60:
        time.sleep(0.05)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def run_args(out, root, *extra):
    sets = [f"output_dir={out}", f"data.root={root}", "supernet.max_steps_per_epoch=6",
            "retrain.max_steps_per_epoch=6", "data.eval_batch_size=50", *extra]
    args = ["--config", "tiny", "--no-progress"]
    for s in sets:
        args += ["--set", s]
    return args


def retrain_on_copy(one: Path, out: Path, root: Path, extra, script: str | None = None) -> str:
    """The retrain stage on a copy of one process's supernet and search: in this process (``script`` None) or
    under torchrun with ``script``, whose stdout it returns."""
    for stage in ("supernet", "search"):
        shutil.copytree(one / stage, out / stage)
    args = [*run_args(out, root, *extra), "--stage", "retrain"]
    if script is None:
        assert run_search.main(args) == 0
        return ""
    r = torchrun(script, *args)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r.stdout


@pytest.fixture(scope="module")
def small_root(tmp_path_factory):
    """dsprites_loc with a 200-image test split (the shared task has 2000)."""
    from glora.data.offline import prepare_task
    root = tmp_path_factory.mktemp("vtab-small")
    prepare_task("dsprites_loc", root, seed=0, n_test=200)
    return root


@pytest.fixture(scope="module")
def one_and_two(tmp_path_factory, small_root):
    """The tiny config end to end in one process and in two (every stage, head-only baseline included)."""
    base = tmp_path_factory.mktemp("dp")
    one, two = base / "one", base / "two"
    assert run_search.main(run_args(one, small_root)) == 0
    r = torchrun("run_search.py", *run_args(two, small_root))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return one, two, r


@pytest.fixture(scope="module")
def search_on_one(one_and_two, small_root):
    """Search and retrain in two processes on the supernet that one process trained: the scores must be
    exactly those of one process (the weights are the same, the counts are summed)."""
    one, two, _ = one_and_two
    out = two.parent / "two-on-one"
    (out / "supernet").mkdir(parents=True)
    for f in (CHECKPOINT, "adapters.safetensors", "log.jsonl", "settings.json"):
        shutil.copy(one / "supernet" / f, out / "supernet" / f)
    r = torchrun("run_search.py", *run_args(out, small_root))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "supernet: already complete" in r.stdout
    return one, out


def test_without_torchrun_nothing_is_sharded():
    assert not dist.is_initialized() and dist.world_size() == 1 and dist.shard_range(10) == (0, 10)
    split = InMemorySplit(torch.arange(10.0), torch.arange(10))
    assert [y.tolist() for _, y in split.batches(4)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]


def test_fit_two_processes_match_one_with_sgd(tmp_path):
    """fit() itself: sharded batches, loss scaled by the global batch, gradients summed, off-path parameters
    left alone. With SGD (linear in the gradient) the weights agree within rtol 1e-5, atol 1e-6.
    44 samples: 5 full batches of 8 an epoch; 1 sample: one batch that leaves rank 0 an empty shard; "44f": fair
    sampling, several passes a step before the gradients are summed over ranks; "44s" and "1s": sandwich steps
    whose students learn the teacher's predictions on each rank's shard ("5s": one batch split 3 / 2)."""
    sys.path.insert(0, str(ROOT / "tests"))
    import dist_worker
    (tmp_path / "two").mkdir()
    r = torchrun("tests/dist_worker.py", str(tmp_path / "two"), "44", "1", "44f", "44s", "1s", "5s")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    untouched = {}
    for tag in ("44", "1", "44f", "44s", "1s", "5s"):
        ref = dist_worker.run(str(tmp_path / "one"), int(tag.rstrip("fs")), fair=tag.endswith("f"),
                              sandwich=tag.endswith("s"))
        got = torch.load(tmp_path / "two" / f"weights-{tag}.pt")
        one = torch.load(tmp_path / "one" / f"weights-{tag}.pt")
        assert got["untouched"] == one["untouched"]
        untouched[tag] = set(got["untouched"])
        for k, v in ref.items():
            torch.testing.assert_close(got["params"][k], v, rtol=1e-5, atol=1e-6, msg=f"{tag}: {k}")
    # one path a step leaves some adapter off every path; fair steps put every option on a path (D, which
    # scales a bias that is zero in this random model, gets no gradient either way)
    assert untouched["44f"] < untouched["44"]


def test_two_processes_score_and_pick_the_same_subnet(search_on_one):
    one, two = search_on_one
    assert (one / "search" / "subnet.yaml").read_text() == (two / "search" / "subnet.yaml").read_text()
    assert (one / "search" / "topk.yaml").read_text() == (two / "search" / "topk.yaml").read_text()
    h1 = [(r["layers"], r["val_acc"]) for r in map(json.loads, (one / "search" / "history.jsonl").open())]
    h2 = [(r["layers"], r["val_acc"]) for r in map(json.loads, (two / "search" / "history.jsonl").open())]
    assert h1 == h2 and len(h1) > 0  # scores are summed counts: exactly equal


def merged_model(path):
    import timm
    model = timm.create_model("vit_tiny_patch16_224", num_classes=16, img_size=32, patch_size=8, embed_dim=32,
                              depth=2, num_heads=2)
    model.load_state_dict(load_file(path))
    return model.eval()


def test_two_processes_retrain_to_the_same_model(search_on_one):
    """The retrained models compute the same logits (atol 1e-5) and report the same test accuracy. Their
    weights differ only in entries whose gradient is zero but for rounding (a scalar bias on the residual
    stream, which the LayerNorms do not see; B times the sum of a LayerNorm output), which AdamW moves by up
    to lr a step on that rounding: at most 12 steps at lr 1e-3 apart."""
    one, two = search_on_one
    m1 = json.loads((one / "retrain" / "metrics.json").read_text())
    m2 = json.loads((two / "retrain" / "metrics.json").read_text())
    for k in ("test_acc", "head_only_test_acc", "adapter_params", "head_params", "num_classes"):
        assert m1[k] == m2[k], k
    a, b = merged_model(one / "retrain" / MERGED), merged_model(two / "retrain" / MERGED)
    for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(vb, va, rtol=0, atol=12 * 1e-3, msg=k)
    x = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(b(x), a(x), rtol=0, atol=1e-5)


def test_two_processes_choose_the_same_lrs_with_baselines(one_and_two, small_root):
    """retrain.lr_grid by retrain.epochs_grid with the LoRA and head-only baselines, on the supernet and search of
    one process: two processes choose the same (lr, epochs) per method (val200 counts summed over ranks) and score
    the same test top-1.
    Head-only trains on cached features, which every rank computes for the whole split. A rerun after the
    metrics and the LoRA folder are deleted reuses every grid point's val.json on every rank."""
    one, _, _ = one_and_two
    extra = ("retrain.lr_grid=[1e-3, 1e-2]", "retrain.epochs_grid=[2, 1]", "retrain.baselines=[lora, head]")
    runs = {}
    for n in (1, 2):
        runs[n] = one.parent / f"grid-{n}"
        retrain_on_copy(one, runs[n], small_root, extra, None if n == 1 else "run_search.py")
    m1, m2 = (json.loads((runs[n] / "retrain" / "metrics.json").read_text()) for n in (1, 2))
    assert set(m1["baselines"]) == set(m2["baselines"]) == {"lora", "head"}
    for a, b in [(m1, m2)] + [(m1["baselines"][k], m2["baselines"][k]) for k in ("lora", "head")]:
        assert set(a["val_acc_by_lr"]) == {"0.001@2ep", "0.001@1ep", "0.01@2ep", "0.01@1ep"}
        assert (a["lr"], a["epochs"], a["val_acc_by_lr"], a["test_acc"]) == \
            (b["lr"], b["epochs"], b["val_acc_by_lr"], b["test_acc"])
    assert m2["head_only_test_acc"] == m1["head_only_test_acc"] == m1["baselines"]["head"]["test_acc"]
    assert json.loads((runs[2] / "summary.json").read_text())["retrain"]["world_size"] == 2
    # rerun in two processes: rank 0 reads each val.json and every rank skips that grid point
    shutil.rmtree(runs[2] / "retrain" / "lora")
    (runs[2] / "retrain" / "metrics.json").unlink()
    stamps = {p: p.stat().st_mtime_ns for p in (runs[2] / "retrain" / "select").rglob("val.json")}
    assert len(stamps) == 12
    r = torchrun("run_search.py", *run_args(runs[2], small_root, *extra), "--stage", "retrain")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps
    again = json.loads((runs[2] / "retrain" / "metrics.json").read_text())
    assert again["baselines"]["lora"]["test_acc"] == m2["baselines"]["lora"]["test_acc"]
    assert again["test_acc"] == m2["test_acc"]


def test_two_processes_follow_rank_zero_when_a_refit_diverges(one_and_two, small_root, monkeypatch):
    """retrain.refit_guard under torchrun: LoRA's refit looks collapsed on rank 0 only (tests/guard_worker.py).
    Both ranks train it again at the next lr (a rank that went on to test alone would leave the other waiting in
    a collective) and end where one process ends with the same collapse."""
    import glora.stages.retrain as rt
    sys.path.insert(0, str(ROOT / "tests"))
    from guard_worker import COLLAPSED_LOSS, diverging_fit
    one, _, _ = one_and_two
    extra = ("retrain.lr_grid=[1e-3, 1e-2]", "retrain.baselines=[lora]")
    lora = {}
    for n in (1, 2):
        out = one.parent / f"guard-{n}"
        with monkeypatch.context() as mp:
            if n == 1:
                mp.setattr(rt, "fit", diverging_fit(rt.fit))
            printed = retrain_on_copy(one, out, small_root, extra, None if n == 1 else "tests/guard_worker.py")
        assert n == 1 or "refit diverged at lr" in printed
        m = json.loads((out / "retrain" / "metrics.json").read_text())
        lora[n] = m["baselines"]["lora"]
        by_val = max(lora[n]["val_acc_by_lr"], key=lambda k: (lora[n]["val_acc_by_lr"][k], -float(k)))
        first, second = lora[n]["refits"]
        assert first["diverged"] and first["train_loss"] == COLLAPSED_LOSS and first["lr"] == float(by_val)
        assert not second["diverged"] and lora[n]["lr"] == second["lr"] != first["lr"]
        assert (out / "retrain" / "lora" / "refit" / f"lr{second['lr']:.3g}" / CHECKPOINT).is_file()
        lora[n]["glora_test_acc"] = m["test_acc"]
    for k in ("lr", "val_acc_by_lr", "test_acc", "glora_test_acc"):
        assert lora[1][k] == lora[2][k], k
    assert [x["diverged"] for x in lora[1]["refits"]] == [x["diverged"] for x in lora[2]["refits"]]


def test_summary_records_world_size_and_backend(one_and_two):
    one, two, _ = one_and_two
    s1 = json.loads((one / "summary.json").read_text())
    s2 = json.loads((two / "summary.json").read_text())
    for stage in ("supernet", "search", "retrain"):
        assert (s1[stage]["world_size"], s1[stage]["backend"]) == (1, None)
        assert (s2[stage]["world_size"], s2[stage]["backend"]) == (2, "gloo")


def test_two_processes_end_with_the_same_supernet(one_and_two):
    """AdamW divides each gradient entry by its running magnitude: entries whose gradient is zero but for
    rounding (directions the LayerNorms and the softmax do not see, such as a scalar bias on the residual
    stream) take steps up to lr (1e-3 here) driven by that rounding. So the end-to-end tolerance is atol 2e-3
    with 98% of the entries within 1e-5; test_fit_two_processes_match_one_with_sgd checks the same training
    loop with SGD (linear in the gradient) at rtol 1e-5, atol 1e-6."""
    one, two, _ = one_and_two
    a, b = load_file(one / "supernet" / ADAPTERS), load_file(two / "supernet" / ADAPTERS)
    assert a.keys() == b.keys()
    close = total = 0
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=2e-3, msg=k)
        close += int(((b[k] - a[k]).abs() <= 1e-5).sum())
        total += a[k].numel()
    assert close >= 0.98 * total, (close, total)
    # the supernet shares those entries between paths, so on paths they show: logits within 1e-3 (of ~0.2)
    from glora.stages.supernet import build_supernet
    from glora.core.config import load_config
    cfg = load_config(str(one / "config.yaml"))
    nets = []
    for state in (a, b):
        sn = build_supernet(cfg, 16).eval()
        sn.load_trainable_state_dict(state)
        nets.append(sn)
    x = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for k in range(4):
        path = nets[0].space.path(123, k)
        with torch.no_grad():
            la, lb = (sn.set_subnet(path) or sn(x) for sn in nets)
        torch.testing.assert_close(lb, la, rtol=0, atol=1e-3)


def test_only_rank_zero_writes_and_logs(one_and_two):
    _, two, r = one_and_two
    assert r.stdout.count("== GLoRA run summary") == 1
    assert r.stdout.count("supernet: starting") == 1
    assert "data parallel: 2 processes (gloo)" in r.stdout
    leftovers = [p.name for p in two.rglob("*") if p.name.startswith(".") and p.name.endswith(".tmp")]
    assert not leftovers


def test_killed_two_process_run_resumes_to_the_same_result(one_and_two, small_root, tmp_path):
    """Kill the whole job (launcher and workers) once the first supernet checkpoint is written, run the same
    command again: it ends with the files of the uninterrupted two-process run."""
    _, two, _ = one_and_two
    out = tmp_path / "killed"
    args = torchrun_cmd("run_search.py", *run_args(out, small_root))
    proc = subprocess.Popen(args, cwd=ROOT, env=worker_env(), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    ckpt = out / "supernet" / CHECKPOINT
    t0 = time.time()
    try:
        while not ckpt.is_file() and proc.poll() is None and time.time() - t0 < TIMEOUT:
            time.sleep(0.02)
    finally:
        kill_job(proc)
    assert ckpt.is_file() and not (out / "retrain" / "metrics.json").exists()  # killed mid-run
    r = subprocess.run(args, cwd=ROOT, env=worker_env(), capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "supernet: starting" in r.stdout + r.stderr  # the rerun resumed the killed stage
    for f in ("search/subnet.yaml", "search/history.jsonl", "supernet/log.jsonl"):
        assert (out / f).read_text() == (two / f).read_text(), f
    for f in ("supernet/adapters.safetensors", "retrain/model_merged.safetensors"):
        a, b = load_file(out / f), load_file(two / f)
        assert all(torch.equal(a[k], b[k]) for k in a), f
    m1 = json.loads((out / "retrain" / "metrics.json").read_text())
    m2 = json.loads((two / "retrain" / "metrics.json").read_text())
    assert m1["test_acc"] == m2["test_acc"] and m1["head_only_test_acc"] == m2["head_only_test_acc"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("override,message", [
    ("data.batch_size=15", "error: data.batch_size 15 is not divisible by the world size 2"),  # before the group
    ("data.task=nope", "error: data.task: "),                                                 # inside the group
])
def test_errors_stop_every_rank_with_one_message(tmp_path, override, message):
    """The two ranks started as torchrun starts them (its environment variables): rank 0 prints the one-line
    error and exits with 2; rank 1 stops silently and waits for the launcher, whose SIGTERM (sent once a rank
    failed) ends it with code 2 too."""
    env = dict(worker_env(), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    args = [sys.executable, "run_search.py", "--config", "tiny", "--no-progress", "--set", f"data.root={tmp_path}",
            "--set", f"output_dir={tmp_path / 'err'}", "--set", override]
    procs = [subprocess.Popen(args, cwd=ROOT, env=dict(env, RANK=str(r), LOCAL_RANK=str(r)), text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for r in range(2)]
    try:
        outs = [procs[0].communicate(timeout=TIMEOUT)]
        time.sleep(0.5)
        procs[1].send_signal(signal.SIGTERM)  # what torchrun does once rank 0 exited with an error
        outs.append(procs[1].communicate(timeout=TIMEOUT))
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [2, 2]
    errs = [ln for ln in outs[0][1].splitlines() if ln.strip()]  # rank 0's stderr: the message alone
    assert len(errs) == 1 and errs[0].startswith(message), errs
    assert outs[1] == ("", "")  # rank 1 says nothing


def test_errors_under_torchrun(tmp_path):
    r = torchrun("run_search.py", "--config", "tiny", "--set", f"output_dir={tmp_path / 'err'}",
                 "--set", "supernet.nope=1")
    assert r.returncode != 0
    lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and lines[0].startswith("error: unknown config key 'supernet.nope'")
    # torchrun's report of the ranks: 2 from each that exited on its own; once one has, torchrun may stop the
    # others with SIGTERM (-15) before they do. Never a crash (1) or any other code.
    codes = set(re.findall(r"exitcode\s*:\s*(-?\d+)", r.stderr))
    assert "2" in codes and codes <= {"2", "-15"}, codes
    assert not (tmp_path / "err").exists()


def test_rerun_of_a_finished_two_process_run_exits_cleanly(one_and_two, small_root):
    """Every stage skipped: the ranks reach the end at different times (rank 0 prints the summary) and must
    still leave the process group together, with exit code 0 on every rank."""
    _, two, _ = one_and_two
    for _ in range(3):
        r = torchrun("run_search.py", *run_args(two, small_root))
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
        assert r.stdout.count("already complete") == 3
        assert "terminate called" not in r.stderr
