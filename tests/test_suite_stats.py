"""The suite's paired interval of GLoRA minus LoRA over seeds, against independent computations."""
import math
import re

import numpy as np
import pytest

from glora.suite import t975, write_tables


def t_central_mass(q: float, df: int) -> float:
    """P(|T| <= q) for Student's t, by integrating its density (from the gamma function) on a fine grid."""
    x = np.linspace(0.0, q, 100_001)
    logc = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
    pdf = np.exp(logc - (df + 1) / 2 * np.log1p(x * x / df))
    return float(2 * np.sum((pdf[1:] + pdf[:-1]) / 2 * np.diff(x)))


def exact_t975(df: int) -> float:
    """The quantile itself, by bisection on the integrated density."""
    lo, hi = 1.0, 20.0
    for _ in range(26):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if t_central_mass(mid, df) < 0.95 else (lo, mid)
    return (lo + hi) / 2


@pytest.mark.parametrize("df", list(range(1, 31)) + [31, 45, 120, 1000])
def test_t_quantile_matches_the_integrated_density(df):
    # the table holds 3 decimals (within 5e-4); beyond it the expansion is within 1e-3
    assert abs(t975(df) - exact_t975(df)) < (6e-4 if df <= 30 else 1e-3), (df, t975(df), exact_t975(df))


def test_t_quantile_refuses_zero_degrees_of_freedom():
    with pytest.raises(ValueError, match="degrees of freedom must be >= 1, got 0"):
        t975(0)


def rows(diffs_by_seed):
    return [{"task": task, "seed": seed, "group": "", "glora_test": 0.5 + d / 100, "lora_test": 0.5}
            for seed, per_task in enumerate(diffs_by_seed) for task, d in per_task.items()]


@pytest.mark.parametrize("diffs,verdict", [
    ([{"a": 1.0, "b": 1.5}, {"a": 0.8, "b": 1.2}, {"a": 1.1, "b": 0.9}], "above zero"),
    ([{"a": 1.0, "b": -1.5}, {"a": -0.8, "b": 1.2}, {"a": 0.1, "b": -0.9}], "includes zero"),
    ([{"a": -2.0}, {"a": -2.5}, {"a": -1.5}], "below zero"),
])
def test_suite_table_prints_the_paired_interval(tmp_path, diffs, verdict):
    write_tables(tmp_path, rows(diffs))
    md = (tmp_path / "suite.md").read_text()
    d = np.array([v for per_task in diffs for v in per_task.values()])
    n = len(d)
    half = t975(n - 1) * d.std(ddof=1) / math.sqrt(n)
    m = re.search(r"Pooled over the (\d+) task-seeds .*?: GLoRA minus LoRA ([+-]\d+\.\d\d) points \(sample "
                  r"sd (\d+\.\d\d); 95% confidence interval of the mean difference ([+-]\d+\.\d\d) to "
                  r"([+-]\d+\.\d\d), Student's t with (\d+) degrees of freedom: ([a-z ]+)\)", md)
    assert m, md
    assert int(m[1]) == n and int(m[6]) == n - 1 and m[7] == verdict
    for got, want in zip(m.groups()[1:5], (d.mean(), d.std(ddof=1), d.mean() - half, d.mean() + half)):
        assert abs(float(got) - want) <= 0.0051, (m[0], want)


def test_one_run_has_no_interval(tmp_path):
    write_tables(tmp_path, rows([{"a": 1.0}]))
    assert "Pooled over" not in (tmp_path / "suite.md").read_text()


def test_equal_differences_give_no_zero_width_interval(tmp_path):
    """Test accuracy moves in steps of 1/n_test, so two task-seeds can differ by the same amount (here equal up to
    float rounding): no spread, so no interval and no verdict."""
    write_tables(tmp_path, [{"task": "a", "seed": s, "group": "", "glora_test": g, "lora_test": lo}
                            for s, (g, lo) in enumerate([(0.706, 0.705), (0.512, 0.511)])])
    md = (tmp_path / "suite.md").read_text()
    assert "Pooled over the 2 task-seeds" in md and "+0.10 points in every task-seed alike (no spread, so no interval)" in md
    assert "confidence interval" not in md and "above zero" not in md
