"""Supernet training: save/load of adapter weights and exact resume after an interruption."""
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
    with pytest.raises(Killed):
        train_supernet(cfg, progress=False)
    monkeypatch.undo()
    train_supernet(cfg, progress=False)  # the same command again
    got = load_file(tmp_path / "killed" / "supernet" / "adapters.safetensors")
    assert set(got) == set(ref)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=0, rtol=0)
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
    from supernet.wrapper import GloraSupernet
    seen = []
    orig = GloraSupernet.set_subnet

    def record(self, subnet, freeze=False):
        if self.training:
            seen.append(self.space.params(subnet))
        return orig(self, subnet, freeze)
    monkeypatch.setattr(GloraSupernet, "set_subnet", record)
    lo, hi = 6000, 9000
    cfg = tiny_cfg(tmp_path / "run", data_root, f"supernet.path_sampling={sampling}", "supernet.epochs=1",
                   "supernet.probe_paths=0", f"search.min_params_m={lo / 1e6}", f"search.max_params_m={hi / 1e6}")
    train_supernet(cfg, progress=False)
    assert len(seen) == 5 and len(set(seen)) > 1
    inside = [lo <= p <= hi for p in seen]
    assert all(inside) if sampling == "budget" else not all(inside)
