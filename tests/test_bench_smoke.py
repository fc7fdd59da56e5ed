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


def test_rank_statistics_match_scipy():
    """bench/rank_supernets.py's Spearman rho and Kendall tau-b against scipy's, ties included."""
    import numpy as np
    from scipy import stats
    spec = importlib.util.spec_from_file_location("rank_supernets", os.path.join(ROOT, "bench", "rank_supernets.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    rng = np.random.default_rng(0)
    for n in (5, 8, 12):
        a = rng.integers(0, 6, n) / 200  # val200 scores: ties are common
        b = rng.normal(size=n)
        b[:2] = b[2]
        assert math.isclose(mod.spearman(a, b), stats.spearmanr(a, b).statistic, abs_tol=1e-12)
        assert math.isclose(mod.kendall(a, b), stats.kendalltau(a, b).statistic, abs_tol=1e-12)
    assert mod.spearman([1, 2, 3], [3, 2, 1]) == -1.0 and mod.kendall([1, 2, 3], [1, 2, 3]) == 1.0
