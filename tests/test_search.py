"""Search operators and the evolutionary searcher on synthetic objectives (no model, CPU, fast)."""
import itertools
import json
import time

import numpy as np
import pytest
import yaml

from glora.core.errors import UserError
from search.evolution import EvolutionSearcher
from search.operators import check_budget, crossover, mutate, repair, sample_in_budget
from supernet.space import LayerChoice, LayerSpec, SearchSpace, Subnet

# made-up shapes: 8 layers, some without bias
SPECS = [
    LayerSpec("blocks.0.attn.qkv", 32, 96), LayerSpec("blocks.0.attn.proj", 32, 32, bias=False),
    LayerSpec("blocks.0.mlp.fc1", 32, 128), LayerSpec("blocks.0.mlp.fc2", 128, 32),
    LayerSpec("blocks.1.attn.qkv", 32, 96, bias=False), LayerSpec("blocks.1.attn.proj", 32, 32),
    LayerSpec("blocks.1.mlp.fc1", 32, 128), LayerSpec("blocks.1.mlp.fc2", 128, 32, bias=False),
]


def make_space(specs=SPECS, ranks=(2, 4)):
    return SearchSpace(specs, ranks=ranks)


def weight_score(space, seed=0):
    """Additive synthetic objective: a fixed random weight per (layer, tensor, choice)."""
    rng = np.random.default_rng(seed)
    w = [[{c: float(rng.random()) for c in opts} for opts in layer] for layer in space.options]

    def score(subnet):
        return sum(w[i][j][c] for i, lc in enumerate(subnet.layers) for j, c in enumerate(lc))
    return score


def run_search(space, score_fn, out_dir=None, **kw):
    args = dict(min_params=0, max_params=2000, generations=6, population=20, select=5, mutation=8,
                mutation_prob=0.3, crossover=8, seed=0, out_dir=out_dir, model_name="toy", progress=False)
    args.update(kw)
    return EvolutionSearcher(space, score_fn, **args).run()


class Recorder:
    """Wraps a score function: records every call, can raise after ``fail_after`` calls (a killed run)."""

    def __init__(self, fn, fail_after=None):
        self.fn, self.fail_after, self.calls = fn, fail_after, []

    def __call__(self, subnet):
        if self.fail_after is not None and len(self.calls) >= self.fail_after:
            raise KeyboardInterrupt("killed")
        self.calls.append(subnet)
        return self.fn(subnet)


# ------------------------------------------------------------------------------------------------ operators
def test_sample_in_budget_respects_budget():
    space = make_space()
    rng = np.random.default_rng(0)
    lo, hi = space.param_range()
    for a, b in [(0, 500), (1000, 1200), (lo, lo), (hi - 50, hi), (3000, 3005)]:
        for _ in range(10):
            s = sample_in_budget(space, rng, a, b)
            assert s is not None and a <= space.params(s) <= b and space.contains(s)


def test_sample_in_budget_gives_up_without_hanging():
    space = make_space()
    lo, hi = space.param_range()
    t = time.time()
    assert sample_in_budget(space, np.random.default_rng(0), hi + 1, hi + 10, max_tries=5) is None
    # a non-empty interval that no subnet hits: only `none`/`scalar`/... sums; bias-free rank-only layers
    tiny = SearchSpace([LayerSpec("a", 10, 10, bias=False)], ranks=(4,), choices_ab=("lora", "none"))
    assert sample_in_budget(tiny, np.random.default_rng(0), 1, 79, max_tries=5) is None
    assert time.time() - t < 5


def test_mutate_and_crossover_stay_in_space_and_budget():
    space = make_space()
    rng = np.random.default_rng(1)
    a = sample_in_budget(space, rng, 800, 1600)
    b = sample_in_budget(space, rng, 800, 1600)
    assert mutate(space, a, rng, 0.0) == a
    changed = 0
    for _ in range(30):
        m = mutate(space, a, rng, 0.5, 800, 1600)
        c = crossover(space, a, b, rng, 800, 1600)
        for s in (m, c):
            assert s is not None and space.contains(s) and 800 <= space.params(s) <= 1600
        changed += m != a
        # without a budget a crossover child holds each choice from one of its parents
        free = crossover(space, a, b, rng)
        for la, lb, lc in zip(a.layers, b.layers, free.layers):
            assert all(x in (y, z) for x, y, z in zip(lc, la, lb))
    assert changed > 20
    big = space.uniform(LayerChoice("lora_4", "lora_4", "lora_4", "vector", "vector"))
    fixed = repair(space, big, rng, 0, 500)
    assert fixed is not None and space.params(fixed) <= 500


def test_check_budget_reports_feasible_range():
    space = make_space()
    lo, hi = space.param_range()
    with pytest.raises(UserError, match=r"infeasible: subnets of this space have .*M to .*M"):
        check_budget(space, hi + 1, hi + 1000)
    with pytest.raises(UserError, match="infeasible"):
        check_budget(space, 500, 100)
    check_budget(space, 0, 1)


def test_searcher_infeasible_budget_raises_before_scoring():
    space = make_space()
    rec = Recorder(weight_score(space))
    hi = space.param_range()[1]
    with pytest.raises(UserError, match=f"{hi / 1e6:.3f}M"):
        run_search(space, rec, min_params=hi + 1, max_params=hi + 100)
    assert rec.calls == []


# ------------------------------------------------------------------------------------------------ searcher
def brute_force_best(space, score, lo, hi):
    """Best in-budget subnet by exhaustive enumeration (vectorised: score and params add over layers)."""
    per_layer = [[LayerChoice(*c) for c in itertools.product(*opts)] for opts in space.options]
    none = [LayerChoice() for _ in space.names]
    base = score(Subnet(space.names, tuple(none)))
    params = np.zeros(())
    scores = np.zeros(())
    for i, choices in enumerate(per_layer):
        p = np.array([space.layer_params(i, c) for c in choices])
        v = np.array([score(Subnet(space.names, tuple(none[:i] + [c] + none[i + 1:]))) - base for c in choices])
        params = params[..., None] + p
        scores = scores[..., None] + v
    scores = np.where((params >= lo) & (params <= hi), scores, -np.inf)
    best = np.unravel_index(int(np.argmax(scores)), scores.shape)
    subnet = Subnet(space.names, tuple(per_layer[i][k] for i, k in enumerate(best)))
    return score(subnet), subnet


def small_space():
    specs = [LayerSpec("l0", 16, 24, bias=False), LayerSpec("l1", 24, 16, bias=False),
             LayerSpec("l2", 16, 16, bias=False), LayerSpec("l3", 16, 8, bias=True)]
    return SearchSpace(specs, ranks=(2,), choices_c=("vector", "none"), choices_de=("scalar", "none"))


def test_finds_brute_force_optimum_under_budget():
    space = small_space()              # 16 * 16 * 16 * 64 = 262144 subnets
    score = weight_score(space, seed=3)
    lo, hi = 60, 160
    want_score, want = brute_force_best(space, score, lo, hi)
    rec = Recorder(score)
    res = run_search(space, rec, min_params=lo, max_params=hi, generations=25, population=30, select=8,
                     mutation=15, crossover=15, mutation_prob=0.2, seed=0)
    assert res.best == want and res.best_score == pytest.approx(want_score)
    assert len(rec.calls) <= 25 * 30 < 262144


def test_never_evaluates_illegal_or_duplicate():
    space = make_space()
    rec = Recorder(weight_score(space))
    res = run_search(space, rec, min_params=700, max_params=900, generations=8)
    keys = [s.key for s in rec.calls]
    assert len(keys) == len(set(keys)) == res.evaluated
    assert all(700 <= space.params(s) <= 900 for s in rec.calls)
    assert 700 <= res.best_params <= 900


def test_exhausted_space_finishes_with_fewer_candidates():
    specs = [LayerSpec("a", 4, 4, bias=False), LayerSpec("b", 4, 4, bias=False)]
    space = SearchSpace(specs, ranks=(1,), choices_ab=("scalar", "none"))   # 16 subnets in all
    rec = Recorder(lambda s: float(sum(c == "scalar" for lc in s.layers for c in lc)))
    res = run_search(space, rec, min_params=0, max_params=3, generations=5, population=10)
    assert len(rec.calls) == 15 and len({s.key for s in rec.calls}) == 15   # all but the 4-scalar subnet
    assert res.best_score == 3.0


def test_tight_budget_finishes_quickly():
    space = make_space()
    rec = Recorder(weight_score(space))
    t = time.time()
    res = run_search(space, rec, min_params=1500, max_params=1502, generations=5, population=15)
    assert time.time() - t < 10
    assert all(1500 <= space.params(s) <= 1502 for s in rec.calls) and rec.calls
    assert 1500 <= res.best_params <= 1502


def test_deterministic_for_a_seed():
    space = make_space()
    score = weight_score(space)
    r1 = Recorder(score)
    r2 = Recorder(score)
    a = run_search(space, r1, seed=7)
    b = run_search(space, r2, seed=7)
    assert [s.key for s in r1.calls] == [s.key for s in r2.calls]
    assert a.best == b.best and a.history == b.history
    r3 = Recorder(score)
    run_search(space, r3, seed=8)
    assert [s.key for s in r3.calls] != [s.key for s in r1.calls]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    space = make_space()
    out = tmp_path_factory.mktemp("full")
    full = run_search(space, Recorder(weight_score(space)), out_dir=out)
    assert len(full.history) == full.evaluated > 80
    return full, out


@pytest.mark.parametrize("kill_at", [0, 1, 19, 20, 23, 47, 80])
def test_resume_equals_uninterrupted(tmp_path, kill_at, uninterrupted):
    space = make_space()
    score = weight_score(space)
    full, full_dir = uninterrupted

    out = tmp_path / "killed"
    first = Recorder(score, fail_after=kill_at)
    with pytest.raises(KeyboardInterrupt):
        run_search(space, first, out_dir=out)
    if kill_at == 23:   # a line torn by the kill
        with open(out / "history.jsonl", "a") as f:
            f.write('{"generation": 1, "par')
    second = Recorder(score)
    res = run_search(space, second, out_dir=out)
    keys = [s.key for s in first.calls + second.calls]
    assert len(keys) == len(set(keys)) == full.evaluated            # nothing scored twice
    assert res.best == full.best and res.best_score == full.best_score
    assert [c.subnet for c in res.topk] == [c.subnet for c in full.topk]
    hist = [json.loads(l) for l in (out / "history.jsonl").read_text().splitlines()]
    assert len(hist) == len(full.history)
    canon = lambda rows: sorted(json.dumps(r, sort_keys=True) for r in rows)  # noqa: E731
    assert canon(hist) == canon(full.history)
    assert (out / "subnet.yaml").read_text() == (full_dir / "subnet.yaml").read_text()

    # a finished search returns its stored result without scoring anything
    third = Recorder(score)
    again = run_search(space, third, out_dir=out)
    assert third.calls == [] and again.best == full.best and again.best_score == full.best_score


def test_more_generations_extend_a_finished_search(tmp_path):
    space = make_space()
    score = weight_score(space)
    full = run_search(space, Recorder(score), generations=6)
    run_search(space, Recorder(score), out_dir=tmp_path, generations=4)
    rec = Recorder(score)
    res = run_search(space, rec, out_dir=tmp_path, generations=6)
    assert res.best == full.best and res.history == full.history and 0 < len(rec.calls) < full.evaluated


def test_out_of_budget_candidate_is_refused_before_scoring(monkeypatch):
    import search.evolution as evo
    space = make_space()
    rec = Recorder(weight_score(space))
    searcher = EvolutionSearcher(space, rec, min_params=0, max_params=500, generations=2, population=5, select=2,
                                 mutation=2, mutation_prob=0.3, crossover=2, seed=0, progress=False)
    big = space.uniform(LayerChoice("lora_4", "lora_4", "lora_4", "vector", "vector"))
    with pytest.raises(AssertionError, match="outside the budget"):
        searcher._evaluate(big, 0)
    monkeypatch.setattr(evo, "sample_in_budget", lambda *a, **k: big)
    with pytest.raises(AssertionError, match="outside the budget"):
        searcher.run()
    assert rec.calls == []


def test_changed_settings_on_resume_is_a_user_error(tmp_path):
    space = make_space()
    score = weight_score(space)
    with pytest.raises(KeyboardInterrupt):
        run_search(space, Recorder(score, fail_after=30), out_dir=tmp_path)
    with pytest.raises(UserError, match="settings changed.*max_params"):
        run_search(space, Recorder(score), out_dir=tmp_path, max_params=1500)


def test_output_files_and_subnet_yaml_round_trip(tmp_path):
    space = make_space()
    res = run_search(space, Recorder(weight_score(space)), out_dir=tmp_path, min_params=500, max_params=1500)
    for name in ("state.json", "history.jsonl", "subnet.yaml", "topk.yaml", "done"):
        assert (tmp_path / name).exists(), name
    state = json.loads((tmp_path / "state.json").read_text())
    assert state["finished"] is True and state["generation"] == 6
    data = yaml.safe_load((tmp_path / "subnet.yaml").read_text())
    assert data["model"] == "toy" and data["params"] == res.best_params == space.params(res.best)
    assert data["val_acc"] == pytest.approx(res.best_score)
    assert [l["name"] for l in data["layers"]] == list(space.names)
    back = Subnet.from_yaml(tmp_path / "subnet.yaml")
    assert back == res.best and space.params(back) == data["params"]
    topk = yaml.safe_load((tmp_path / "topk.yaml").read_text())
    assert len(topk["topk"]) == 5 and topk["topk"][0]["val_acc"] == pytest.approx(res.best_score)
    assert [t["val_acc"] for t in topk["topk"]] == sorted((t["val_acc"] for t in topk["topk"]), reverse=True)
    hist = [json.loads(l) for l in (tmp_path / "history.jsonl").read_text().splitlines()]
    assert {"generation", "params", "val_acc", "layers"} <= set(hist[0])
    assert all(500 <= h["params"] <= 1500 for h in hist)


def test_choices_a_and_b_replace_choices_ab_for_one_tensor():
    specs = [LayerSpec("a", 8, 12, bias=True), LayerSpec("b", 12, 8, bias=False)]
    space = SearchSpace(specs, ranks=(2, 4), choices_a=("vector", "none"), choices_b=("lora", "none"),
                        choices_c=("none",), choices_de=("vector", "none"))
    assert space.tensor_options["A"] == ("vector", "none")
    assert space.tensor_options["B"] == ("lora_2", "lora_4", "none")
    rng = np.random.default_rng(0)
    seen_a, seen_b = set(), set()
    for _ in range(200):
        s = space.random(rng)
        seen_a |= {lc.A for lc in s.layers}
        seen_b |= {lc.B for lc in s.layers}
        assert all(lc.C == "none" for lc in s.layers)
    assert seen_a == {"vector", "none"} and seen_b == {"lora_2", "lora_4", "none"}
    # without them both tensors take choices_ab
    both = SearchSpace(specs, ranks=(4,), choices_ab=("lora", "scalar"))
    assert both.tensor_options["A"] == both.tensor_options["B"] == ("lora_4", "scalar")
    with pytest.raises(UserError, match="unknown choice 'bogus'"):
        SearchSpace(specs, choices_b=("lora", "bogus"))


def test_choices_d_and_e_replace_choices_de_for_one_tensor():
    specs = [LayerSpec("a", 8, 12, bias=True), LayerSpec("b", 12, 8, bias=False)]
    space = SearchSpace(specs, ranks=(2,), choices_ab=("lora", "none"), choices_c=("none",),
                        choices_de=("vector", "scalar", "none"), choices_d=("none",), choices_e=("vector", "none"))
    assert space.tensor_options["D"] == ("none",) and space.tensor_options["E"] == ("vector", "none")
    rng = np.random.default_rng(0)
    seen_e = set()
    for _ in range(100):
        s = space.random(rng)
        assert all(lc.D == "none" for lc in s.layers)
        assert s.layers[1].E == "none"            # no bias: E stays none whatever choices_e says
        seen_e.add(s.layers[0].E)
    assert seen_e == {"vector", "none"}
    one = SearchSpace(specs, choices_d=("scalar",))  # only D's list replaced; E keeps choices_de
    assert one.tensor_options["D"] == ("scalar",) and one.tensor_options["E"] == ("vector", "scalar", "none")
    with pytest.raises(UserError, match="not valid for tensor E"):
        SearchSpace(specs, choices_e=("lora",))
