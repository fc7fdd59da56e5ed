"""Smoke test of the benchmark script: its smallest case on a tiny model, one repeat (no timing asserted)."""
import importlib.util
import math
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_speed", os.path.join(ROOT, "bench", "bench_speed.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_bench_tiny_reports_every_ratio(tmp_path):
    bench = load_bench()
    out = tmp_path / "results.md"
    report = bench.main(["--models", "tiny", "--repeats", "1", "--warmup", "0", "--threads", "1",
                         "--bf16-subnets", "4", "--out", str(out)])
    for key in bench.RATIO_KEYS:
        value = report["ratios"][f"tiny.{key}"]
        assert math.isfinite(value) and value > 0, (key, value)
    rho = report["ratios"]["bf16_fp32_spearman"]
    assert math.isfinite(rho) and -1.0 <= rho <= 1.0
    assert "| supernet step / PEFT LoRA step |" in out.read_text()
