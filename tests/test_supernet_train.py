"""Supernet training: save/load of adapter weights and exact resume after an interruption."""
import collections
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file

import glora.core.trainer as st
from glora.core.config import load_config
from glora.stages.supernet import train_supernet

TINY = ["model.name=vit_tiny_patch16_224", "model.checkpoint=''",
        "model.kwargs={img_size: 32, patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}",
        "data.task=dsprites_loc", "data.batch_size=16", "supernet.epochs=2", "supernet.max_steps_per_epoch=5",
        "supernet.probe_paths=1", "glora.ranks=[2, 4]"]


def tiny_cfg(out, root, *extra):
    return load_config(None, TINY + [f"output_dir={out}", f"data.root={root}", *extra])


def test_adapter_weights_round_trip(tmp_path, data_root):
    cfg = tiny_cfg(tmp_path / "run", data_root)
    train_supernet(cfg, progress=False)
    saved = load_file(tmp_path / "run" / "supernet" / "adapters.safetensors")
    from glora.stages.supernet import build_supernet
    sn = build_supernet(cfg, num_classes=16)
    before = sn.trainable_state_dict()
    assert set(saved) == set(before)
    assert any(not torch.equal(saved[k], before[k]) for k in saved)  # training changed something
    sn.load_trainable_state_dict(saved)
    after = sn.trainable_state_dict()
    for k in saved:
        torch.testing.assert_close(after[k], saved[k], atol=0, rtol=0)
    assert any(k.endswith("A_down") for k in saved) and "head.weight" in saved
    assert not any("base_layer" in k for k in saved)
    log = st.read_jsonl(tmp_path / "run" / "supernet" / "log.jsonl")
    assert [r["epoch"] for r in log] == [1, 2] and all("probe_val_acc" in r and "lr" in r for r in log)


class Killed(Exception):
    pass


def assert_resumes_to(cfg, monkeypatch, ref):
    """Run ``cfg``'s supernet until the patched kill, undo the patches, run the same command again: the adapters
    must equal ``ref`` bit for bit."""
    with pytest.raises(Killed):
        train_supernet(cfg, progress=False)
    monkeypatch.undo()
    train_supernet(cfg, progress=False)  # the same command again
    got = load_file(f"{cfg.output_dir}/supernet/adapters.safetensors")
    assert set(got) == set(ref)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=0, rtol=0)


@pytest.mark.parametrize("where", ["mid_epoch_2", "after_log_before_checkpoint", "mid_epoch_1"])
def test_resume_after_kill_is_exact(tmp_path, data_root, monkeypatch, where):
    ref_cfg = tiny_cfg(tmp_path / "ref", data_root)
    train_supernet(ref_cfg, progress=False)
    ref = load_file(tmp_path / "ref" / "supernet" / "adapters.safetensors")

    cfg = tiny_cfg(tmp_path / "killed", data_root)
    if where.startswith("mid_epoch"):
        kill_step = {"mid_epoch_1": 2, "mid_epoch_2": 7}[where]
        from supernet.wrapper import GloraSupernet
        orig = GloraSupernet.sample_path

        def dying(self, seed, step):
            if step == kill_step:
                raise Killed()
            return orig(self, seed, step)
        monkeypatch.setattr(GloraSupernet, "sample_path", dying)
    else:
        orig_save = st.save_checkpoint
        calls = {"n": 0}

        def dying_save(path, obj):
            calls["n"] += 1
            if calls["n"] == 2:  # epoch 2's line is logged, its checkpoint never written
                raise Killed()
            return orig_save(path, obj)
        monkeypatch.setattr(st, "save_checkpoint", dying_save)
    assert_resumes_to(cfg, monkeypatch, ref)
    log = st.read_jsonl(tmp_path / "killed" / "supernet" / "log.jsonl")
    assert [r["epoch"] for r in log] == [1, 2]


def test_paths_depend_on_seed_and_step_only(vit):
    from supernet.wrapper import GloraSupernet
    a = GloraSupernet(vit, ranks=[4, 8])
    paths = [a.space.path(3, s) for s in range(20)]
    assert paths == [a.space.path(3, s) for s in range(20)]
    assert len({p.key for p in paths}) > 15
    assert a.space.path(4, 0) != a.space.path(3, 0)
    kinds = {c for p in paths for lc in p.layers for c in lc}
    assert {"lora_4", "lora_8", "vector", "scalar", "none"} <= kinds


def test_bf16_training_runs(tmp_path, data_root):
    cfg = tiny_cfg(tmp_path / "bf", data_root, "precision=bf16", "supernet.epochs=1")
    out = train_supernet(cfg, progress=False)
    assert out["epochs"] == 1
    saved = load_file(tmp_path / "bf" / "supernet" / "adapters.safetensors")
    assert all(torch.isfinite(v).all() for v in saved.values())


@pytest.mark.parametrize("sampling", ["uniform", "budget"])
def test_path_sampling_budget_keeps_training_paths_in_budget(tmp_path, data_root, monkeypatch, sampling):
    lo, hi = 6000, 9000
    cfg = tiny_cfg(tmp_path / "run", data_root, f"supernet.path_sampling={sampling}", "supernet.epochs=1",
                   "supernet.probe_paths=0", f"search.min_params_m={lo / 1e6}", f"search.max_params_m={hi / 1e6}")
    seen = [build_supernet_space(cfg).params(p) for p in train_recording_paths(cfg, monkeypatch)]
    assert len(seen) == 5 and len(set(seen)) > 1
    inside = [lo <= p <= hi for p in seen]
    assert all(inside) if sampling == "budget" else not all(inside)


def assert_fair(space, paths):
    """Every tensor of every layer takes each of its options n // len or n // len + 1 times over the n paths."""
    n = space.fair_width
    assert len(paths) == n and all(space.contains(p) for p in paths)
    for i, opts in enumerate(space.options):
        for t, o in enumerate(opts):
            got = collections.Counter(p.layers[i][t] for p in paths)
            assert set(got) <= set(o) and sum(got.values()) == n
            assert all(n // len(o) <= got[c] <= n // len(o) + 1 for c in o), (i, t, got)



def tiny_supernet_and_split():
    from conftest import tiny_vit
    from glora.core.engine import InMemorySplit
    from supernet.wrapper import GloraSupernet
    torch.manual_seed(0)
    sn = GloraSupernet(tiny_vit(num_classes=5), ranks=[2, 4])
    g = torch.Generator().manual_seed(1)
    train = InMemorySplit(torch.randn(24, 3, 32, 32, generator=g), torch.randint(0, 5, (24,), generator=g))
    return sn, {n: p for n, p in sn.model.named_parameters() if p.requires_grad}, train


def fit_recording_grads(sn, named, train, spec, out, paths):
    """One ``fit`` step on pass k's path ``paths[k]``; returns the gradient the optimizer was handed."""
    grads = {}

    class Recorder(torch.optim.SGD):
        def step(self, closure=None):
            grads.update({n: p.grad.detach().clone() for n, p in named.items() if p.grad is not None})

    original = st.optimizer_for
    st.optimizer_for = lambda named_params, lr, *a, **k: Recorder(
        [{"params": list(named_params.values()), "lr": lr, "lr_scale": 1.0}], lr=lr)
    try:
        st.fit(sn, named, train, spec, out, torch.device("cpu"), progress=False,
               before_pass=lambda step, k: sn.set_subnet(paths[k]))
    finally:
        st.optimizer_for = original
    return grads

def test_fair_paths_give_every_option_equal_turns(vit):
    import numpy as np
    from supernet.wrapper import GloraSupernet
    space = GloraSupernet(vit, ranks=[2, 4]).space
    assert space.fair_width == 5  # A and B: lora_2, lora_4, vector, scalar, none
    draws = [space.fair_paths(np.random.default_rng([3, s])) for s in range(6)]
    for paths in draws:
        assert_fair(space, paths)
    assert draws[0] == space.fair_paths(np.random.default_rng([3, 0]))  # a function of the generator's seed
    assert len({p.key for paths in draws for p in paths}) == 30  # the order of the options is random
    # n = 5 paths: C (lora_2, lora_4, vector, none) takes one option twice, D (vector, scalar, none) two twice
    assert space.options[0][2] == ("lora_2", "lora_4", "vector", "none")
    assert sorted(collections.Counter(p.layers[0][2] for p in draws[0]).values()) == [1, 1, 1, 2]
    assert sorted(collections.Counter(p.layers[0][3] for p in draws[0]).values()) == [1, 2, 2]


def test_fair_step_averages_the_gradients_of_its_paths(tmp_path):
    """One optimizer step of ``fit`` with n passes gets the mean of the n paths' gradients on the same batch,
    computed here path by path (an independent accumulation)."""
    import numpy as np
    sn, named, train = tiny_supernet_and_split()
    paths = sn.space.fair_paths(np.random.default_rng(7))
    spec = st.FitSpec(epochs=1, lr=0.1, weight_decay=0.0, batch_size=8, seed=2, max_steps_per_epoch=1,
                      paths_per_step=len(paths))
    grads = fit_recording_grads(sn, named, train, spec, tmp_path / "fit", paths)
    x, y = next(iter(train.batches(8, shuffle=True, seed=2, epoch=0, drop_last=True)))
    want = {n: torch.zeros_like(p) for n, p in named.items()}
    on_path = set()
    sn.train()
    for p in paths:
        sn.set_subnet(p)
        sn.zero_grad(set_to_none=True)
        torch.nn.functional.cross_entropy(sn(x), y).backward()
        for n, q in named.items():
            if q.grad is not None:
                want[n] += q.grad / len(paths)
                on_path.add(n)
    assert set(grads) == on_path
    for n, w in want.items():
        torch.testing.assert_close(grads.get(n, torch.zeros_like(w)), w, rtol=1e-5, atol=1e-7, msg=n)
    # a single pass would have seen one path only: the averaged gradient differs from each path's own
    assert any(not torch.allclose(grads[n], want[n] * len(paths)) for n in grads)


def test_fair_sampling_trains_fair_paths_and_resumes_exactly(tmp_path, data_root, monkeypatch):
    from supernet.space import SearchSpace
    ref_cfg = tiny_cfg(tmp_path / "ref", data_root, "supernet.path_sampling=fair", "supernet.probe_paths=0")
    seen = train_recording_paths(ref_cfg, monkeypatch)
    space = build_supernet_space(ref_cfg)
    n = space.fair_width
    assert len(seen) == 2 * 5 * n  # 2 epochs of 5 steps, n paths a step
    for s in range(10):
        assert_fair(space, seen[s * n:(s + 1) * n])
    log = st.read_jsonl(tmp_path / "ref" / "supernet" / "log.jsonl")
    assert all(0 < r["train_acc"] <= 1 and r["loss"] > 0 for r in log)
    ref = load_file(tmp_path / "ref" / "supernet" / "adapters.safetensors")

    cfg = tiny_cfg(tmp_path / "killed", data_root, "supernet.path_sampling=fair", "supernet.probe_paths=0")
    calls = {"n": 0}
    orig_fair = SearchSpace.fair_paths

    def dying(self, rng):
        calls["n"] += 1
        if calls["n"] == 8:  # step 8 of 10: in epoch 2
            raise Killed()
        return orig_fair(self, rng)
    monkeypatch.setattr(SearchSpace, "fair_paths", dying)
    assert_resumes_to(cfg, monkeypatch, ref)
    # the uniform supernet of the same seed ends elsewhere: the option changed the training
    uni = tiny_cfg(tmp_path / "uni", data_root, "supernet.probe_paths=0")
    train_supernet(uni, progress=False)
    other = load_file(tmp_path / "uni" / "supernet" / "adapters.safetensors")
    assert any(not torch.equal(other[k], ref[k]) for k in ref)


def train_recording_paths(cfg, monkeypatch):
    """Train the supernet of cfg and return the subnets it trained, pass by pass."""
    from supernet.wrapper import GloraSupernet
    seen = []
    orig_set = GloraSupernet.set_subnet

    def record(self, subnet, freeze=False):
        if self.training:
            seen.append(subnet)
        return orig_set(self, subnet, freeze)
    monkeypatch.setattr(GloraSupernet, "set_subnet", record)
    train_supernet(cfg, progress=False)
    monkeypatch.undo()
    return seen


def build_supernet_space(cfg):
    from glora.stages.supernet import build_supernet
    return build_supernet(cfg, num_classes=16).space


def test_largest_path_takes_every_tensors_biggest_option():
    from supernet.params import layer_params
    from supernet.space import TENSORS, LayerChoice, LayerSpec, SearchSpace
    specs = [LayerSpec("qkv", 8, 24), LayerSpec("fc", 4, 2, bias=False)]
    space = SearchSpace(specs, ranks=[1, 2], choices_ab=["vector", "lora", "none"], choices_c=["none", "vector"])
    big = space.largest()
    assert space.contains(big)
    # lora_2 on an 8 -> 24 layer (2 * 32 = 64) beats lora_1 (32) and a vector (24); C vector beats none
    assert big.layers[0] == LayerChoice("lora_2", "lora_2", "vector", "vector", "vector")
    assert big.layers[1] == LayerChoice("lora_2", "lora_2", "none", "none", "none")  # no bias: C-E stay none
    # no other single-option change adds elements (checked against every option of every tensor)
    for i, (s, opts) in enumerate(zip(specs, space.options)):
        for t, o in zip(TENSORS, opts):
            for c in o:
                other = big.layers[i]._replace(**{t: c})
                assert layer_params(other, s.in_features, s.out_features) <= \
                    layer_params(big.layers[i], s.in_features, s.out_features)
    assert space.params(big) == space.param_range()[1]


def test_largest_path_breaks_a_tie_by_the_listed_order():
    """On a 1 -> 1 layer a D/E vector and a scalar both add one element: the option listed first wins."""
    from supernet.space import LayerSpec, SearchSpace
    picked = []
    for de in (["scalar", "vector", "none"], ["vector", "scalar", "none"]):
        space = SearchSpace([LayerSpec("t", 1, 1)], ranks=[1], choices_ab=["none"], choices_c=["none"],
                            choices_de=de)
        assert space.params(space.largest()) == space.param_range()[1] == 2
        picked.append((space.largest().layers[0].D, space.largest().layers[0].E))
    assert picked == [("scalar", "scalar"), ("vector", "vector")]


def test_distill_step_gradient_matches_teacher_then_students(tmp_path):
    """With ``distill`` one ``fit`` step gets (CE of the teacher path on the labels + the students' soft
    cross-entropy against the teacher's softmax) / n, computed here pass by pass with an explicit log-softmax."""
    import numpy as np
    sn, named, train = tiny_supernet_and_split()
    rng = np.random.default_rng(3)
    paths = [sn.space.largest(), sn.space.random(rng), sn.space.random(rng)]
    spec = st.FitSpec(epochs=1, lr=0.1, weight_decay=0.0, batch_size=8, seed=2, max_steps_per_epoch=1,
                      paths_per_step=len(paths), distill=True)
    grads = fit_recording_grads(sn, named, train, spec, tmp_path / "fit", paths)
    x, y = next(iter(train.batches(8, shuffle=True, seed=2, epoch=0, drop_last=True)))
    sn.train()
    sn.set_subnet(paths[0])
    with torch.no_grad():
        z = sn(x)
        teacher = torch.exp(z - z.logsumexp(-1, keepdim=True))
    total = 0.0
    for k, p in enumerate(paths):
        sn.set_subnet(p)
        logp = sn(x)
        logp = logp - logp.logsumexp(-1, keepdim=True)
        target = torch.nn.functional.one_hot(y, 5).float() if k == 0 else teacher
        total = total - (target * logp).sum(-1).mean() / len(paths)
    sn.zero_grad(set_to_none=True)
    total.backward()
    want = {n: q.grad for n, q in named.items() if q.grad is not None}
    assert set(grads) == set(want)
    for n, w in want.items():
        torch.testing.assert_close(grads[n], w, rtol=1e-5, atol=1e-7, msg=n)
    # the students learnt the teacher, not the labels: the same passes on the labels give another gradient
    grads = fit_recording_grads(sn, named, train, replace(spec, distill=False), tmp_path / "plain", paths)
    assert any(not torch.allclose(grads[n], want[n], rtol=1e-3, atol=1e-6) for n in want)
    with pytest.raises(ValueError, match="distill needs"):
        st.fit(sn, named, train, replace(spec, paths_per_step=1), tmp_path / "one", torch.device("cpu"),
               progress=False)


def test_sandwich_trains_largest_then_budget_paths_and_resumes_exactly(tmp_path, data_root, monkeypatch):
    from search.operators import sample_in_budget
    lo, hi = 4_000, 11_000
    opts = ["supernet.path_sampling=sandwich", "supernet.sandwich_paths=2", "supernet.probe_paths=0",
            f"search.min_params_m={lo / 1e6}", f"search.max_params_m={hi / 1e6}"]
    ref_cfg = tiny_cfg(tmp_path / "ref", data_root, *opts)
    space = build_supernet_space(ref_cfg)
    assert space.params(space.largest()) > hi  # the teacher lies above the band, as in the benchmark
    seen = train_recording_paths(ref_cfg, monkeypatch)
    assert len(seen) == 2 * 5 * 3  # 2 epochs of 5 steps, 3 passes a step
    students = [p for i, p in enumerate(seen) if i % 3]
    assert all(p == space.largest() for p in seen[::3])
    assert all(lo <= space.params(p) <= hi for p in students)
    assert len(set(students)) > 10  # fresh draws, not one path repeated
    log = st.read_jsonl(tmp_path / "ref" / "supernet" / "log.jsonl")
    assert all(0 < r["train_acc"] <= 1 and r["loss"] > 0 for r in log)
    ref = load_file(tmp_path / "ref" / "supernet" / "adapters.safetensors")

    cfg = tiny_cfg(tmp_path / "killed", data_root, *opts)
    import search.operators as so
    calls = {"n": 0}

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 15:  # step 8 of 10 (2 draws a step): in epoch 2
            raise Killed()
        return sample_in_budget(*a, **k)
    monkeypatch.setattr(so, "sample_in_budget", dying)
    assert_resumes_to(cfg, monkeypatch, ref)
    # budget sampling (one path a step, no teacher) ends elsewhere
    other_cfg = tiny_cfg(tmp_path / "budget", data_root, *opts[2:], "supernet.path_sampling=budget")
    train_supernet(other_cfg, progress=False)
    other = load_file(tmp_path / "budget" / "supernet" / "adapters.safetensors")
    assert any(not torch.equal(other[k], ref[k]) for k in ref)
