"""GPU settings: the CPU side (messages, defaults, the TF32 switch, no change on the CPU) runs everywhere; the
tests marked ``gpu`` need CUDA and are skipped without it (run them with ``pytest -m gpu tests/test_gpu.py``)."""
import json
import os
import shutil

import pytest
import torch

from glora.core import accel
from glora.core.build import first_batch
from glora.core.config import load_config
from glora.core.engine import InMemorySplit, evaluate, resolve_device
from glora.core.errors import UserError
from conftest import tiny_args, tiny_vit

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("name, message", [
    ("cuda:7", "device 'cuda:7': this machine has 1 GPU (cuda:0)"),
    ("cuda:x", "device 'cuda:x' is not one of auto, cpu, cuda, cuda:N"),
])
def test_missing_or_malformed_gpu_is_one_line(monkeypatch, name, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_device(name)
    assert resolve_device("cuda:0") == torch.device("cuda", 0)


def test_precision_auto_is_fp32_on_the_cpu_and_bf16_on_cuda():
    assert accel.resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert accel.resolve_precision("auto", "cuda:1") == "bf16"
    assert accel.resolve_precision("fp32", "cuda") == "fp32"
    cfg = load_config(None, ["data.on_device=false", "tf32=false", "deterministic=true"])
    assert cfg.precision == "auto" and cfg.data.on_device is False and not cfg.tf32 and cfg.deterministic
    with pytest.raises(UserError, match="data.on_device: 'gpu' is not one of auto, true, false"):
        load_config(None, ["data.on_device=gpu"])


def test_fp32_exact_turns_tf32_off_and_restores_it():
    state = accel._tf32_state()
    try:
        accel._set_tf32(True)
        with accel.fp32_exact():
            assert not accel.tf32_enabled()
        assert accel.tf32_enabled()
    finally:
        accel._restore_tf32(state)


def test_configure_leaves_the_cpu_alone_and_sets_determinism(monkeypatch):
    state = accel._tf32_state()
    cfg = load_config(None, [])
    accel.configure(cfg, torch.device("cpu"))
    assert accel._tf32_state() == state and not torch.are_deterministic_algorithms_enabled()
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        accel.configure(load_config(None, ["deterministic=true"]))
        assert torch.are_deterministic_algorithms_enabled()
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8" and not torch.backends.cudnn.benchmark
    finally:
        torch.use_deterministic_algorithms(False)
        torch.backends.cudnn.deterministic = False


def test_place_on_the_cpu_changes_nothing():
    split = InMemorySplit(torch.randn(5, 3, 4, 4), torch.arange(5))
    images = split.images
    assert split.place(torch.device("cpu"), True) is split and split.images is images


def test_first_batch_is_the_loaders_first_batch():
    data = [(torch.full((2, 2), float(i)), i) for i in range(5)]
    cfg = load_config(None, ["data.eval_batch_size=3"])
    loader = torch.utils.data.DataLoader(data, batch_size=3)
    assert torch.equal(first_batch(cfg, data), next(iter(loader))[0])


@pytest.mark.slow  # torch.compile on the CPU takes about a minute here
def test_retrain_with_compile_runs(tmp_path, finished_run):
    import run_search
    out = tmp_path / "run"
    shutil.copytree(finished_run, out)
    root = json.loads((out / "supernet" / "settings.json").read_text())["config"]["data"]["root"]
    args = tiny_args(out, root, "retrain.compile=true", "retrain.dir=compiled", "retrain.baselines=[]")
    assert run_search.main(args + ["--stage", "retrain"]) == 0
    m = json.loads((out / "compiled" / "metrics.json").read_text())
    assert m["merge_max_abs_diff"] <= 1e-3 and 0.0 <= m["test_acc"] <= 1.0


# ------------------------------------------------------------------------------------------------ on CUDA

def _split(n=40, classes=5, device=None):
    g = torch.Generator().manual_seed(0)
    return InMemorySplit(torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, classes, (n,), generator=g))


@pytest.mark.gpu
@cuda
def test_on_device_and_pinned_splits_give_the_cpu_batches():
    dev = torch.device("cuda")
    ref = list(_split().batches(8, shuffle=True, seed=1, epoch=2))
    on = _split().place(dev, True)
    pinned = _split().place(dev, False)
    assert on.images.is_cuda and pinned.images.is_pinned()
    for (x0, y0), (x1, y1), (x2, y2) in zip(ref, on.batches(8, shuffle=True, seed=1, epoch=2),
                                            pinned.batches(8, shuffle=True, seed=1, epoch=2)):
        assert torch.equal(x1.cpu(), x0) and torch.equal(y1.cpu(), y0)
        assert x2.is_pinned() and torch.equal(x2, x0) and torch.equal(y2, y0)
    assert _split().place(dev, "auto").images.is_cuda  # a few hundred kB fit


@pytest.mark.gpu
@cuda
def test_supernet_step_and_frozen_search_evaluation_on_cuda(tmp_path):
    from glora.core.trainer import FitSpec, fit
    from supernet.wrapper import GloraSupernet
    dev = torch.device("cuda")
    torch.manual_seed(0)
    sn = GloraSupernet(tiny_vit(), target_modules=["qkv", "proj", "fc1", "fc2"], ranks=[4]).to(dev)
    named = {n: p for n, p in sn.model.named_parameters() if p.requires_grad}
    split = _split().place(dev, True)
    log = fit(sn, named, split, FitSpec(epochs=1, lr=1e-3, weight_decay=0.0, batch_size=8, precision="auto"),
              tmp_path, dev, before_step=lambda s: sn.sample_path(0, s), progress=False)
    assert len(log) == 1 and torch.isfinite(torch.tensor(log[0]["loss"]))
    sn.set_subnet(sn.space.path(0, 123), freeze=True)
    accs = [evaluate(sn, split.batches(16), dev, p) for p in ("fp32", "bf16")]
    host = evaluate(sn, _split().batches(16), dev, "fp32")
    assert accs[0] == host and all(0.0 <= a <= 1.0 for a in accs)


@pytest.mark.gpu
@cuda
def test_bf16_autocast_on_cuda():
    from supernet.wrapper import GloraSupernet
    dev = torch.device("cuda")
    sn = GloraSupernet(tiny_vit(), target_modules=["qkv", "fc1"], ranks=[4]).to(dev)
    sn.sample_path(0, 0)
    from glora.core.engine import autocast
    with autocast(dev, "auto"):
        out = sn(torch.randn(4, 3, 32, 32, device=dev))
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in sn.parameters())


@pytest.mark.gpu
@cuda
def test_full_run_with_retrain_and_merge_check_on_cuda(tmp_path, data_root):
    import run_search
    out = tmp_path / "run"
    assert run_search.main(tiny_args(out, data_root, "device=cuda", "retrain.baselines=[lora]")) == 0
    m = json.loads((out / "retrain" / "metrics.json").read_text())
    assert m["merge_max_abs_diff"] <= 1e-3 and 0.0 <= m["test_acc"] <= 1.0
    settings = json.loads((out / "supernet" / "settings.json").read_text())
    assert settings["fingerprint"]["precision"] == "bf16"  # auto on CUDA


def _bench_gpu():
    import importlib.util
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench", "bench_gpu.py")
    spec = importlib.util.spec_from_file_location("bench_gpu", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_gpu_bench_without_cuda_exits_2_with_one_line(capsys):
    assert _bench_gpu().main([]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no CUDA device" in err


@pytest.mark.gpu
@cuda
def test_gpu_bench_tiny(tmp_path):
    out = tmp_path / "gpu.md"
    assert _bench_gpu().main(["--model", "tiny", "--steps", "2", "--warmup", "1", "--out", str(out)]) == 0
    assert "| bf16 |" in out.read_text()
