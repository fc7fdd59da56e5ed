"""The whole pipeline from the CLI on a tiny random-weight ViT and a generated task."""
import json
import re
import shutil

import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file

import run_search
from glora.core.build import stream_batches
from glora.core.config import load_config
from glora.core.engine import evaluate
from conftest import tiny_args
from supernet.space import Subnet

TINY_KW = "{img_size: 32, patch_size: 8, embed_dim: 32, depth: 2, num_heads: 2}"


@pytest.fixture(scope="module")
def tiny_run(finished_run):
    return finished_run


def copy_searched(run, out):
    """The supernet and search of a finished run, copied to ``out`` for a retrain with other settings."""
    shutil.copytree(run / "supernet", out / "supernet")
    shutil.copytree(run / "search", out / "search")


def test_every_file_is_written(tiny_run):
    for f in ["config.yaml", "summary.json", "supernet/checkpoint.safetensors", "supernet/adapters.safetensors",
              "supernet/log.jsonl", "search/history.jsonl", "search/subnet.yaml", "search/topk.yaml",
              "search/state.json", "retrain/model_merged.safetensors", "retrain/metrics.json",
              "retrain/adapters.safetensors", "retrain/subnet.yaml"]:
        assert (tiny_run / f).is_file(), f
    metrics = json.loads((tiny_run / "retrain" / "metrics.json").read_text())
    for k in ["test_acc", "num_classes", "adapter_params", "head_params", "merge_max_abs_diff"]:
        assert k in metrics
    sub = yaml.safe_load((tiny_run / "search" / "subnet.yaml").read_text())
    assert metrics["adapter_params"] == sub["params"] > 0
    assert metrics["merge_max_abs_diff"] < 1e-4 and metrics["merge_max_abs_diff_fp64"] < 1e-9
    assert metrics["head_params"] == 32 * 16 + 16
    resolved = yaml.safe_load((tiny_run / "config.yaml").read_text())
    assert resolved["model"]["name"] == "vit_tiny_patch16_224" and resolved["output_dir"] == str(tiny_run)


def test_merged_model_loads_strictly_in_plain_timm(tiny_run, data_root):
    metrics = json.loads((tiny_run / "retrain" / "metrics.json").read_text())
    sd = load_file(tiny_run / "retrain" / "model_merged.safetensors")
    model = timm.create_model("vit_tiny_patch16_224", num_classes=metrics["num_classes"], img_size=32, patch_size=8,
                              embed_dim=32, depth=2, num_heads=2)
    model.load_state_dict(sd, strict=True)
    cfg = load_config(str(tiny_run / "config.yaml"))
    from glora.core.build import load_split
    test = load_split(cfg, model, "test", in_memory=False)
    acc = evaluate(model, stream_batches(cfg, test), torch.device("cpu"))
    assert acc == pytest.approx(metrics["test_acc"], abs=1e-9)


def test_rerun_skips_finished_stages(tiny_run, data_root, capsys):
    before = (tiny_run / "retrain" / "metrics.json").stat().st_mtime_ns
    assert run_search.main(tiny_args(tiny_run, data_root)) == 0
    out = capsys.readouterr().out
    assert out.count("already complete") == 3 and "GLoRA (searched)" in out
    assert (tiny_run / "retrain" / "metrics.json").stat().st_mtime_ns == before


def test_retrain_hand_edited_subnet(tiny_run, data_root, tmp_path, capsys):
    data = yaml.safe_load((tiny_run / "search" / "subnet.yaml").read_text())
    data["layers"][0].update({"A": "LoRA_4", "B": "constant", "C": "lora_2", "D": "vector", "E": "none"})
    data["layers"][1].update({"A": "none", "B": "none", "C": "none", "D": "none", "E": "none"})
    edited = tmp_path / "edited.yaml"
    edited.write_text(yaml.safe_dump(data))
    args = tiny_args(tiny_run, data_root, "retrain.dir=retrain-edited", "retrain.baselines=[]")
    assert run_search.main(args + ["--stage", "retrain", "--subnet", str(edited)]) == 0
    assert "retrain-edited/, summary.json}" in capsys.readouterr().out  # the summary names the folder written
    metrics = json.loads((tiny_run / "retrain-edited" / "metrics.json").read_text())
    subnet = Subnet.from_yaml(edited)
    assert subnet.layers[0].A == "lora_4" and subnet.layers[0].B == "scalar"
    written = yaml.safe_load((tiny_run / "retrain-edited" / "subnet.yaml").read_text())
    assert written["layers"][0]["A"] == "lora_4" and written["layers"][0]["B"] == "scalar"
    assert metrics["adapter_params"] == written["params"]  # counted (yaml) == numel of the compact model


@pytest.mark.parametrize("edit,fragment", [
    ({"name": "blocks.9.attn.qkv"}, "is not an adapted layer"),
    ({"A": "lora_x"}, "unknown choice 'lora_x'"),
    ({"C": "scalar"}, "not valid for tensor C"),
    ({"A": "lora_64"}, "exceeds the rank the supernet holds"),
])
def test_bad_subnet_is_a_one_line_error(tiny_run, data_root, tmp_path, capsys, edit, fragment):
    data = yaml.safe_load((tiny_run / "search" / "subnet.yaml").read_text())
    data["layers"][0].update(edit)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(data))
    args = tiny_args(tiny_run, data_root, "retrain.dir=retrain-bad")
    assert run_search.main(args + ["--stage", "retrain", "--subnet", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and fragment in err[0]
    assert not (tiny_run / "retrain-bad" / "metrics.json").exists()


def test_interrupted_full_run_resumes(tmp_path, data_root, monkeypatch, tiny_run):
    import search.evolution as ev

    class Killed(Exception):
        pass

    calls = {"n": 0}
    orig = ev.EvolutionSearcher.__init__

    def dying_init(self, space, score_fn, **kw):
        def dying_score(subnet):
            calls["n"] += 1
            if calls["n"] == 5:
                raise Killed()
            return score_fn(subnet)
        orig(self, space, dying_score, **kw)
    monkeypatch.setattr(ev.EvolutionSearcher, "__init__", dying_init)
    out = tmp_path / "run"
    with pytest.raises(Killed):
        run_search.main(tiny_args(out, data_root))
    monkeypatch.undo()
    assert (out / "supernet" / "adapters.safetensors").is_file() and not (out / "retrain").exists()
    assert run_search.main(tiny_args(out, data_root)) == 0
    a = yaml.safe_load((out / "search" / "subnet.yaml").read_text())
    b = yaml.safe_load((tiny_run / "search" / "subnet.yaml").read_text())
    assert a["layers"] == b["layers"] and a["val_acc"] == b["val_acc"]
    m1 = json.loads((out / "retrain" / "metrics.json").read_text())
    m2 = json.loads((tiny_run / "retrain" / "metrics.json").read_text())
    assert m1["test_acc"] == m2["test_acc"] and m1["adapter_params"] == m2["adapter_params"]


def test_vtab_config_runs_shrunk(tmp_path, data_root):
    """configs/vtab.yaml (the paper's setting) with sizes shrunk by overrides on a tiny generated task."""
    out = tmp_path / "vtab"
    args = ["--config", "vtab", "--no-progress"]
    for s in [f"output_dir={out}", f"data.root={data_root}", "data.task=dsprites_loc", "model.name=vit_tiny_patch16_224",
              "model.checkpoint=''", "model.pretrained=false", f"model.kwargs={TINY_KW}", "supernet.epochs=1",
              "supernet.max_steps_per_epoch=3", "search.generations=2", "search.population=6", "search.select=3",
              "search.mutation=2", "search.crossover=2", "search.max_eval_batches=1", "search.max_params_m=0.05",
              "retrain.epochs=1", "retrain.max_steps_per_epoch=3", "retrain.baselines=[]",
              "data.batch_size=16", "data.eval_batch_size=100", "data.image_size=32", "data.num_workers=0"]:
        args += ["--set", s]
    assert run_search.main(args) == 0
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["supernet"]["lr"] == 1e-4 and cfg["search"]["mutation_prob"] == 0.2
    assert (out / "retrain" / "model_merged.safetensors").is_file()


def test_lora_baseline_takes_the_largest_rank_in_budget():
    from conftest import tiny_vit
    from retrain.build import layer_specs
    from glora.stages.retrain import lora_baseline
    from supernet.params import tensor_params
    from supernet.space import SearchSpace
    specs = layer_specs(tiny_vit(), ["qkv", "proj", "fc1", "fc2"])
    space = SearchSpace(specs, ranks=[4])
    per_rank = sum(tensor_params("B", "lora_1", s.in_features, s.out_features) for s in specs)  # r=1 cost
    for budget, rank in [(per_rank * 3, 3), (per_rank * 3 + per_rank - 1, 3), (per_rank * 4, 4), (10, 1)]:
        sub, r = lora_baseline(space, budget)
        assert r == rank
        assert all(lc.B == f"lora_{rank}" and lc.A == lc.C == lc.D == lc.E == "none" for lc in sub.layers)
        assert space.params(sub) == rank * per_rank


def test_lora_baseline_above_glora_params_is_labelled(tmp_path, data_root, tiny_run, capsys):
    """A LoRA baseline with more adapter params than the searched subnet (an explicit retrain.lora_rank here; the
    automatic rank when even r=1 is above the budget) is not a comparison at equal budget: every label says so."""
    out = tmp_path / "over"
    copy_searched(tiny_run, out)
    args = tiny_args(out, data_root, "retrain.lora_rank=32", "retrain.baselines=[lora]", "retrain.epochs=1")
    assert run_search.main(args + ["--stage", "retrain"]) == 0
    m = json.loads((out / "retrain" / "metrics.json").read_text())
    lora = m["baselines"]["lora"]
    assert lora["adapter_params"] > m["adapter_params"]  # what this test is about
    assert lora["label"] == "LoRA r=32 (above GLoRA's params)"
    printed = capsys.readouterr().out
    assert "LoRA r=32 (above GLoRA's params)" in printed
    table = [ln for ln in printed.splitlines() if ln.startswith("  method") or ln.startswith("  GLoRA (searched)")
             or ln.startswith("  LoRA r=32")]
    assert len(table) == 3 and len({len(ln) for ln in table}) == 1, table  # the columns stay in line
    assert "WARNING LoRA baseline: r=32 has" in (out / "run.log").read_text()
    # within the budget (the automatic rank) the label is the plain one
    out2 = tmp_path / "within"
    copy_searched(tiny_run, out2)
    args = tiny_args(out2, data_root, "retrain.baselines=[lora]", "retrain.epochs=1")
    assert run_search.main(args + ["--stage", "retrain"]) == 0
    m = json.loads((out2 / "retrain" / "metrics.json").read_text())
    assert m["baselines"]["lora"]["adapter_params"] <= m["adapter_params"]
    assert m["baselines"]["lora"]["label"] == f"LoRA r={m['baselines']['lora']['rank']}"


def test_lr_chosen_on_val200_for_glora_and_each_baseline(tmp_path, data_root, tiny_run, capsys):
    """retrain.lr_grid: every method trains on train800 per lr, keeps the best val200 score, then trains on
    train800val200; the summary shows GLoRA beside LoRA and head-only."""
    out = tmp_path / "grid"
    copy_searched(tiny_run, out)
    args = tiny_args(out, data_root, "retrain.lr_grid=[1e-4, 3e-2]", "retrain.baselines=[lora, head]")
    assert run_search.main(args + ["--stage", "retrain"]) == 0
    printed = capsys.readouterr().out
    m = json.loads((out / "retrain" / "metrics.json").read_text())
    assert set(m["baselines"]) == {"lora", "head"}
    for info in [m] + list(m["baselines"].values()):
        scores = info["val_acc_by_lr"]
        assert set(scores) == {"0.0001", "0.03"}
        best = max(scores.values())
        assert scores[repr(info["lr"])] == best
        if scores["0.0001"] == scores["0.03"]:
            assert info["lr"] == 1e-4  # the smaller lr on a tie
    for key in ("glora", "lora", "head"):
        for lr in ("0.0001", "0.03"):
            rec = json.loads((out / "retrain" / "select" / f"{key}_lr{float(lr):.3g}" / "val.json").read_text())
            assert rec["fingerprint"]["split"] == "train800"
    lora = m["baselines"]["lora"]
    assert lora["adapter_params"] <= m["adapter_params"] or lora["rank"] == 1
    assert m["baselines"]["head"]["adapter_params"] == 0
    assert m["head_only_test_acc"] == m["baselines"]["head"]["test_acc"]
    for label in ("GLoRA (searched)", f"LoRA r={lora['rank']}", "head only"):
        assert label in printed
    # a rerun reuses every grid point (nothing retrained): metrics unchanged
    before = (out / "retrain" / "metrics.json").read_text()
    shutil.rmtree(out / "retrain" / "lora")
    (out / "retrain" / "metrics.json").unlink()
    assert run_search.main(args + ["--stage", "retrain"]) == 0
    assert json.loads((out / "retrain" / "metrics.json").read_text())["test_acc"] == json.loads(before)["test_acc"]


def test_epochs_grid_is_chosen_on_val200_beside_the_lr(tmp_path, data_root, tiny_run, capsys, monkeypatch):
    """retrain.epochs_grid: every method trains on train800 at each (lr, epochs) pair, each for its own number of
    epochs, and the pair with the best val200 score is retrained on train800val200 for that many epochs. The val200
    scores are rigged so that the winner is neither the first point nor the tie-break's (lr 3e-2, 1 epoch)."""
    import glora.stages.retrain as rt
    real_fit, real_eval = rt.fit, rt.evaluate_with_loss
    last = {}

    def recording_fit(model, named, train, spec, out_dir, *a, **kw):
        last.update(lr=spec.lr, epochs=spec.epochs)
        return real_fit(model, named, train, spec, out_dir, *a, **kw)

    def rigged_eval(*a, **kw):
        acc, loss = real_eval(*a, **kw)
        best = last["lr"] == 3e-2 and last["epochs"] == 1
        return (0.9 if best else 0.1), loss

    monkeypatch.setattr(rt, "fit", recording_fit)
    monkeypatch.setattr(rt, "evaluate_with_loss", rigged_eval)
    out = tmp_path / "epochs"
    copy_searched(tiny_run, out)
    args = tiny_args(out, data_root, "retrain.lr_grid=[1e-4, 3e-2]", "retrain.epochs_grid=[2, 1]",
                     "retrain.baselines=[lora, head]")
    assert load_config("tiny", []).retrain.epochs == 2  # so 2 epochs keep the folder names of a run without the grid
    assert run_search.main(args + ["--stage", "retrain"]) == 0
    printed = capsys.readouterr().out
    m = json.loads((out / "retrain" / "metrics.json").read_text())
    assert m["epochs_grid"] == [2, 1]
    for key, info in [("glora", m)] + [(k, m["baselines"][k]) for k in ("lora", "head")]:
        assert set(info["val_acc_by_lr"]) == {"0.0001@2ep", "0.0001@1ep", "0.03@2ep", "0.03@1ep"}
        assert (info["lr"], info["epochs"], info["val_acc"]) == (3e-2, 1, 0.9)
        for lr, ep, folder in [(1e-4, 2, "lr0.0001"), (1e-4, 1, "lr0.0001_e1"), (3e-2, 2, "lr0.03"),
                               (3e-2, 1, "lr0.03_e1")]:
            d = out / "retrain" / "select" / f"{key}_{folder}"
            rec = json.loads((d / "val.json").read_text())
            assert (rec["lr"], rec["epochs"], rec["fingerprint"]["epochs"]) == (lr, ep, ep)
            assert [r["epoch"] for r in read_log(d)] == list(range(1, ep + 1))  # trained for its own epochs
        refit = out / "retrain" / {"glora": ".", "lora": "lora", "head": "head_only"}[key]
        assert [r["epoch"] for r in read_log(refit)] == [1]  # the chosen point's epochs, not retrain.epochs
        assert info["refits"] == [dict(info["refits"][0], lr=3e-2, epochs=1, diverged=False)]
    assert "lr and epochs chosen on val200" in printed
    header = next(line for line in printed.splitlines() if line.strip().startswith("method"))
    assert header.split() == ["method", "adapter", "params", "lr", "epochs", "val200", "test", "top-1", "time"]
    row = next(line for line in printed.splitlines() if line.strip().startswith("GLoRA (searched)"))
    assert row.split()[3:6] == ["3e-02", "1", "0.9000"]
    from glora.suite import task_row
    row = task_row("dsprites_loc", json.loads((out / "summary.json").read_text()))
    assert (row["glora_epochs"], row["lora_epochs"], row["head_epochs"]) == (1, 1, 1)
    # a point at retrain.epochs trained without the grid (another retrain.dir), put in place of the grid's: its
    # finished checkpoint reloads without training and val200 is scored again
    plain = tiny_args(out, data_root, "retrain.lr_grid=[1e-4, 3e-2]", "retrain.baselines=[lora]",
                      "retrain.dir=plain")
    assert run_search.main(plain + ["--stage", "retrain"]) == 0
    grid = out / "retrain" / "select" / "lora_lr0.0001"
    shutil.rmtree(grid)
    shutil.copytree(out / "plain" / "select" / "lora_lr0.0001", grid)
    assert "epochs" not in json.loads((grid / "val.json").read_text())["fingerprint"]
    ckpt = (grid / "checkpoint.safetensors").read_bytes()
    (out / "retrain" / "metrics.json").unlink()
    assert run_search.main(args + ["--stage", "retrain"]) == 0
    assert json.loads((grid / "val.json").read_text())["fingerprint"]["epochs"] == 2
    assert (grid / "checkpoint.safetensors").read_bytes() == ckpt


def test_retrain_drop_path_rate_trains_every_adapted_model_with_stochastic_depth(tmp_path, data_root, tiny_run,
                                                                                   capsys, monkeypatch):
    """retrain.drop_path_rate: GLoRA's model (from the supernet) and LoRA's train with timm's stochastic depth, the
    head alone on the frozen features without it; the supernet and search folders stay valid (the setting is the
    retrain's), another value for the same retrain folder is refused, and the merged file records the model's own
    kwargs."""
    import glora.stages.retrain as rt
    from safetensors import safe_open
    real_fit = rt.fit
    seen = []

    def recording_fit(model, named, train, spec, out_dir, *a, **kw):
        seen.append(sorted(m.drop_prob for m in model.modules() if isinstance(m, timm.layers.DropPath)))
        return real_fit(model, named, train, spec, out_dir, *a, **kw)

    monkeypatch.setattr(rt, "fit", recording_fit)
    out = tmp_path / "dp"
    copy_searched(tiny_run, out)
    args = tiny_args(out, data_root, "retrain.baselines=[lora, head]")
    assert run_search.main(args + ["--set", "retrain.drop_path_rate=0.2", "--stage", "retrain"]) == 0
    # depth 2: timm's rule gives the blocks 0 and 0.2; the second block's two residual branches drop at 0.2
    dp = pytest.approx([0.2, 0.2])
    assert seen == [dp, dp, []]  # GLoRA, LoRA, the head alone
    m = json.loads((out / "retrain" / "metrics.json").read_text())
    assert m["merge_max_abs_diff_fp64"] < 1e-9  # the merge check runs in eval mode: no branch is dropped
    assert m["drop_path_rate"] == 0.2 and "retrained with stochastic depth 0.2" in capsys.readouterr().out
    with safe_open(str(out / "retrain" / "model_merged.safetensors"), "pt") as f:
        assert "drop_path_rate" not in json.loads(f.metadata()["kwargs"])
    seen.clear()
    assert run_search.main(args + ["--stage", "retrain"]) == 2  # the same folder without it: made otherwise
    err = capsys.readouterr().err
    assert "retrain.drop_path_rate: 0.2 -> None" in err and seen == []
    assert run_search.main(args + ["--set", "retrain.dir=plain", "--stage", "retrain"]) == 0
    assert seen == [[], [], []]
    assert json.loads((out / "plain" / "metrics.json").read_text())["drop_path_rate"] is None
    assert "stochastic depth" not in capsys.readouterr().out


def test_grid_points_tie_break_and_fallback_order():
    """On equal val200 scores the smaller lr wins, then the fewer epochs; the refit fallbacks follow the same
    order. Without an epochs grid the keys and folder names are those of the lr alone."""
    from glora.stages.retrain import grid_points, point_key, point_rank, point_tag
    cfg = load_config("tiny", ["retrain.lr_grid=[1e-2, 1e-3]", "retrain.epochs_grid=[2, '1']"])
    grid = grid_points(cfg)
    assert grid == [(1e-2, 2), (1e-2, 1), (1e-3, 2), (1e-3, 1)]
    assert [point_tag(cfg, p) for p in grid] == ["lr0.01", "lr0.01_e1", "lr0.001", "lr0.001_e1"]

    def ranked(scores):
        keyed = {point_key(cfg, p): v for p, v in zip(grid, scores)}
        return sorted(grid, key=lambda p: point_rank(cfg, p, keyed, {}), reverse=True)
    assert ranked([0.5] * 4) == [(1e-3, 1), (1e-3, 2), (1e-2, 1), (1e-2, 2)]
    assert ranked([0.5, 0.4, 0.5, 0.4]) == [(1e-3, 2), (1e-2, 2), (1e-3, 1), (1e-2, 1)]
    assert ranked([0.9, 0.5, 0.5, 0.1])[:2] == [(1e-2, 2), (1e-3, 2)]
    plain = load_config("tiny", ["retrain.lr_grid=[1e-2, 1e-3]"])
    assert grid_points(plain) == [(1e-2, 2), (1e-3, 2)] and grid_points(load_config("tiny", [])) == []
    assert [point_key(plain, p) for p in grid_points(plain)] == ["0.01", "0.001"]
    assert [point_tag(plain, p) for p in grid_points(plain)] == ["lr0.01", "lr0.001"]


def read_log(folder):
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines() if line.strip()]


def test_select_by_loss_picks_the_lowest_val_loss_and_rescores_old_grid_points(tmp_path, data_root, tiny_run):
    """retrain.select_by=loss: every method (and the top-k subnet) is chosen by val200 cross-entropy; a grid point
    recorded without a loss is scored again from its finished checkpoint, without training."""
    out = tmp_path / "by-loss"
    copy_searched(tiny_run, out)
    args = tiny_args(out, data_root, "retrain.lr_grid=[1e-4, 3e-2]", "retrain.baselines=[lora, head]",
                     "retrain.select_by=loss", "retrain.top_k=2")
    assert run_search.main(args + ["--stage", "retrain"]) == 0
    m = json.loads((out / "retrain" / "metrics.json").read_text())
    assert m["select_by"] == "loss"
    for info in [m] + list(m["baselines"].values()):
        losses = info["val_loss_by_lr"]
        assert set(losses) == {"0.0001", "0.03"} and all(0 < v < 50 for v in losses.values())
        assert losses[repr(info["lr"])] == min(losses.values())
    if len(m["candidates"]) > 1:
        chosen = min(m["candidates"], key=lambda c: (c["val_loss"], c["rank"]))
        assert m["search_rank"] == chosen["rank"]
    # an older record without val_loss: re-scored from the checkpoint, the same loss, the checkpoint untouched
    grid = out / "retrain" / "select" / "lora_lr0.03"
    rec = json.loads((grid / "val.json").read_text())
    old_loss = rec.pop("val_loss")
    (grid / "val.json").write_text(json.dumps(rec))
    ckpt = (grid / "checkpoint.safetensors").read_bytes()
    (out / "retrain" / "metrics.json").unlink()
    assert run_search.main(args + ["--stage", "retrain"]) == 0
    again = json.loads((grid / "val.json").read_text())
    assert again["val_loss"] == pytest.approx(old_loss, rel=1e-6) and again["val_acc"] == rec["val_acc"]
    assert (grid / "checkpoint.safetensors").read_bytes() == ckpt


def test_refit_diverged_compares_with_the_train800_loss_at_the_same_lr():
    from glora.stages.retrain import refit_diverged
    assert refit_diverged(2.38, 0.26, 2.0)  # a refit that fell back to chance while train800 converged
    assert not refit_diverged(0.32, 0.18, 2.0) and not refit_diverged(1.12, 0.85, 2.0)
    assert not refit_diverged(0.003, 0.0001, 2.0)  # tiny losses: the slack absorbs the ratio
    assert refit_diverged(None, 0.3, 2.0) and refit_diverged(None, None, 2.0)  # a non-finite refit loss
    assert not refit_diverged(5.0, None, 2.0)  # a finite one with nothing to compare with: no verdict
    assert not refit_diverged(5.0, 0.1, 0.0) and not refit_diverged(None, 0.1, 0.0)  # refit_guard 0: off


def test_a_diverged_refit_is_trained_again_at_the_next_lr(tmp_path, data_root, tiny_run, capsys, monkeypatch):
    """retrain.refit_guard: when the train800val200 refit of a method ends far above its train800 loss at the same
    lr, that method is trained again at the next lr of the grid by val200 (under refit/), the others untouched;
    metrics.json lists the attempts, the summary flags it, and a rerun resumes to the same answer."""
    import glora.stages.retrain as rt
    real_fit = rt.fit

    def fit_that_diverges_for_lora(model, named, train, spec, out_dir, *a, **kw):
        log = real_fit(model, named, train, spec, out_dir, *a, **kw)
        if spec.desc == "lora (train800val200)" and (out_dir.parent.name != "refit" or every[0]):
            log[-1]["loss"] = 50.0 if out_dir.parent.name != "refit" else 30.0  # a collapsed run's log
            (out_dir / "log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
        return log

    every = [False]

    monkeypatch.setattr(rt, "fit", fit_that_diverges_for_lora)
    out = tmp_path / "guard"
    copy_searched(tiny_run, out)
    args = tiny_args(out, data_root, "retrain.lr_grid=[1e-4, 3e-2]", "retrain.baselines=[lora, head]")
    assert run_search.main(args + ["--stage", "retrain"]) == 0
    printed = capsys.readouterr().out
    m = json.loads((out / "retrain" / "metrics.json").read_text())
    lora = m["baselines"]["lora"]
    first, second = lora["refits"]
    chosen = max(lora["val_acc_by_lr"], key=lambda k: (lora["val_acc_by_lr"][k], -float(k)))
    assert first["lr"] == float(chosen) and first["diverged"] and first["train_loss"] == 50.0
    assert first["train800_loss"] == lora["train800_loss_by_lr"][chosen] < 10
    assert second["lr"] != first["lr"] and not second["diverged"] and lora["lr"] == second["lr"]
    assert (out / "retrain" / "lora" / "refit" / f"lr{second['lr']:.3g}" / "checkpoint.safetensors").is_file()
    for info in (m, m["baselines"]["head"]):
        assert len(info["refits"]) == 1 and not info["refits"][0]["diverged"]
        assert info["refits"][0]["lr"] == info["lr"]
    assert f"! LoRA r={lora['rank']}: the train800val200 refit diverged at lr {first['lr']:.0e}" in printed
    # resumed: every training reloads its finished checkpoint; the same attempts and the same test score
    (out / "retrain" / "metrics.json").unlink()
    assert run_search.main(args + ["--stage", "retrain"]) == 0
    again = json.loads((out / "retrain" / "metrics.json").read_text())["baselines"]["lora"]
    assert again["refits"] == lora["refits"] and again["test_acc"] == lora["test_acc"]
    # every lr diverges: the attempt closest to its train800 loss is kept (both reload their checkpoints)
    every[0] = True
    (out / "retrain" / "metrics.json").unlink()
    assert run_search.main(args + ["--stage", "retrain"]) == 0
    assert "every lr diverged" in capsys.readouterr().out
    lora = json.loads((out / "retrain" / "metrics.json").read_text())["baselines"]["lora"]
    assert [a["diverged"] for a in lora["refits"]] == [True, True]
    kept = min(lora["refits"], key=lambda a: a["train_loss"] / a["train800_loss"])
    assert kept.get("kept") and lora["lr"] == kept["lr"] and sum("kept" in a for a in lora["refits"]) == 1


def test_a_diverged_grid_point_is_never_chosen_by_loss():
    from glora.stages.retrain import selection_key
    keys = {lr: selection_key("loss", 0.5, loss) for lr, loss in [(3e-2, float("nan")), (1e-2, None), (1e-3, 0.9)]}
    assert max(keys, key=keys.get) == 1e-3
    assert max([3e-2, 1e-3], key=lambda lr: keys[lr]) == 1e-3 and max([1e-3, 3e-2], key=lambda lr: keys[lr]) == 1e-3
    assert selection_key("top1", 0.7, float("nan")) == 0.7


def test_evaluate_with_loss_matches_cross_entropy():
    import torch.nn.functional as F
    from glora.core.engine import evaluate_with_loss
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 4)
    xs, ys = torch.randn(3, 5, 6), torch.randint(0, 4, (3, 5))
    grad_on = []
    model.register_forward_hook(lambda *_: grad_on.append(torch.is_grad_enabled()))
    acc, loss = evaluate_with_loss(model, zip(xs, ys), torch.device("cpu"))
    assert grad_on == [False] * 3 and isinstance(loss, float)  # no graph kept across the split
    logits = model(xs.reshape(-1, 6))
    assert loss == pytest.approx(float(F.cross_entropy(logits, ys.reshape(-1)).detach()), rel=1e-6)
    assert acc == pytest.approx(float((logits.argmax(-1) == ys.reshape(-1)).float().mean()))


def test_suite_runs_each_task_and_writes_the_table(tmp_path, data_root, capsys):
    import csv
    out = tmp_path / "suite"
    prep = ["prepare", "--task", "dsprites_ori", "--root", str(data_root)]
    if not (data_root / "dsprites_ori").exists():
        assert run_search.main(prep) == 0
    args = ["suite", "--config", "tiny", "--no-progress", "--tasks", "dsprites_loc,dsprites_ori"]
    for s in [f"output_dir={out}", f"data.root={data_root}", "supernet.epochs=1", "supernet.max_steps_per_epoch=2",
              "retrain.epochs=1", "retrain.max_steps_per_epoch=2", "search.generations=1",
              "search.max_eval_batches=1", "data.eval_batch_size=100", "retrain.baselines=[lora]"]:
        args += ["--set", s]
    assert run_search.main(args) == 0
    rows = list(csv.DictReader((out / "suite.csv").open()))
    assert [r["task"] for r in rows] == ["dsprites_loc", "dsprites_ori"]
    for r in rows:
        m = json.loads((out / r["task"] / "retrain" / "metrics.json").read_text())
        assert float(r["glora_test"]) == m["test_acc"]
        assert float(r["lora_test"]) == m["baselines"]["lora"]["test_acc"]
        assert r["group"] == "Structured"
    md = (out / "suite.md").read_text()
    mean = (float(rows[0]["glora_test"]) + float(rows[1]["glora_test"])) / 2
    assert f"| **mean** (2) | {100 * mean:.1f} |" in md and "**Structured** (2)" in md
    # a rerun skips every finished stage of every task
    capsys.readouterr()
    assert run_search.main(args) == 0
    assert capsys.readouterr().out.count("already complete") == 6
    assert run_search.main(["suite", "--tasks", " , "]) == 2



def test_suite_over_seeds_runs_each_seed_and_pairs_glora_with_lora(tmp_path, data_root):
    import csv
    out = tmp_path / "seeds"
    args = ["suite", "--config", "tiny", "--no-progress", "--tasks", "dsprites_loc", "--seeds", "0,3"]
    for s in [f"output_dir={out}", f"data.root={data_root}", "supernet.epochs=1", "supernet.max_steps_per_epoch=2",
              "retrain.epochs=1", "retrain.max_steps_per_epoch=2", "search.generations=1",
              "search.max_eval_batches=1", "data.eval_batch_size=100", "retrain.baselines=[lora]"]:
        args += ["--set", s]
    assert run_search.main(args) == 0
    rows = list(csv.DictReader((out / "suite.csv").open()))
    assert [(r["task"], r["seed"]) for r in rows] == [("dsprites_loc", "0"), ("dsprites_loc", "3")]
    g, lo = [], []
    for r in rows:
        run = out / "dsprites_loc" / f"seed{r['seed']}"
        assert yaml.safe_load((run / "config.yaml").read_text())["seed"] == int(r["seed"])
        m = json.loads((run / "retrain" / "metrics.json").read_text())
        g.append(100 * m["test_acc"])
        lo.append(100 * m["baselines"]["lora"]["test_acc"])
    md = (out / "suite.md").read_text()
    d = [a - b for a, b in zip(g, lo)]
    mean_d, sd_d = sum(d) / 2, abs(d[0] - d[1]) / 2 ** 0.5  # sample std of two values
    sd_g = abs(g[0] - g[1]) / 2 ** 0.5
    line = next(ln for ln in md.splitlines() if ln.startswith("| dsprites_loc | 2 |"))
    assert f"| {sum(g) / 2:.1f} ± {sd_g:.1f} |" in line
    # the table's figures, to their printed rounding (a mean on a .xx5 boundary may print either way)
    cells = re.search(r"\| ([+-]\d+\.\d\d) ± (\d+\.\d\d) \| (\d) of 2 \|", line)
    assert cells, line
    assert abs(float(cells[1]) - mean_d) <= 0.0051 and abs(float(cells[2]) - sd_d) <= 0.0051, (line, mean_d, sd_d)
    assert int(cells[3]) == sum(x >= 0 for x in d)
    overall = re.search(r"GLoRA minus LoRA, mean over 1 task of the per-task mean over seeds: ([+-]\d+\.\d\d) points", md)
    assert overall and abs(float(overall[1]) - mean_d) <= 0.0051, md
    # the pooled interval over both task-seeds: t with 1 degree of freedom is 12.706
    iv = re.search(r"Pooled over the 2 task-seeds .*?: GLoRA minus LoRA ([+-]\d+\.\d\d) points \(sample sd "
                   r"(\d+\.\d\d); 95% confidence interval of the mean difference ([+-]\d+\.\d\d) to "
                   r"([+-]\d+\.\d\d), Student's t with 1 degree of freedom: (includes zero|above zero|below zero)\)", md)
    assert iv or (sd_d < 1e-9 and "no spread, so no interval" in md), md
    half = 12.706 * sd_d / 2 ** 0.5
    for got, want in zip(iv.groups()[:4] if iv else (), (mean_d, sd_d, mean_d - half, mean_d + half)):
        assert abs(float(got) - want) <= 0.0051, (iv[0], mean_d, sd_d)
    assert not iv or iv[5] == ("above zero" if mean_d - half > 0 else "below zero" if mean_d + half < 0 else "includes zero")
    assert run_search.main(["suite", "--tasks", "mnist", "--seeds", "1,1"]) == 2
    assert run_search.main(["suite", "--tasks", "mnist", "--seeds", "x"]) == 2

def test_top_k_subnets_chosen_on_val200(tmp_path, data_root, tiny_run):
    out = tmp_path / "topk"
    copy_searched(tiny_run, out)
    args = tiny_args(out, data_root, "retrain.top_k=3", "retrain.baselines=[lora]")
    assert run_search.main(args + ["--stage", "retrain"]) == 0
    m = json.loads((out / "retrain" / "metrics.json").read_text())
    topk = yaml.safe_load((out / "search" / "topk.yaml").read_text())["topk"]
    assert [c["rank"] for c in m["candidates"]] == [1, 2, 3]
    assert [c["params"] for c in m["candidates"]] == [e["params"] for e in topk[:3]]
    best = max(m["candidates"], key=lambda c: (c["val_acc"], -c["rank"]))
    assert m["search_rank"] == best["rank"]
    chosen = yaml.safe_load((out / "retrain" / "subnet.yaml").read_text())
    assert [[lc[t] for t in "ABCDE"] for lc in chosen["layers"]] == topk[best["rank"] - 1]["layers"]
    assert m["adapter_params"] == best["params"] == chosen["params"]
    assert m["val_acc"] == best["val_acc"]  # no lr grid: the chosen candidate's score at retrain.lr
    assert m["baselines"]["lora"]["adapter_params"] <= m["adapter_params"] or m["baselines"]["lora"]["rank"] == 1


def test_comparison_rows_put_lora_before_the_head_whatever_the_file_order():
    """A rerun reads summary.json, whose keys are sorted (head before lora): the table keeps LoRA second."""
    from glora.pipeline import comparison_rows
    b = {"adapter_params": 0, "test_acc": 0.5, "lr": 1e-3, "val_acc_by_lr": {"0.001": 0.4}}
    summary = {"supernet": {"time_s": 1.0}, "search": {"time_s": 2.0},
               "retrain": {"adapter_params": 10, "test_acc": 0.6, "lr": 1e-3, "select_time_s": 3.0,
                           "train_time_s": 4.0, "baselines": {"head": dict(b, label="head only"),
                                                              "lora": dict(b, label="LoRA r=4", adapter_params=12)}}}
    rows = comparison_rows(summary)
    assert [r["method"] for r in rows] == ["GLoRA (searched)", "LoRA r=4", "head only"]
    assert rows[0]["time_s"] == 10.0 and rows[1]["val_acc"] == 0.4


def test_budget_trained_supernet_is_tied_to_its_budget(cli, tmp_path, data_root):
    """With path_sampling budget (or sandwich) the supernet's paths come from the search budget: another budget
    must not reuse it. Uniform paths do not depend on it. A folder recorded before the budget joined the
    fingerprint is read by the config it ran with."""
    import json

    def supernet(out, *extra):
        return cli(*tiny_args(out, data_root, *extra), "--stage", "supernet")
    sampling, lo, hi = "supernet.path_sampling=budget", "search.min_params_m=0.004", "search.max_params_m=0.011"
    budget = [sampling, lo, hi]
    assert supernet(tmp_path / "b", *budget).returncode == 0
    r = supernet(tmp_path / "b", sampling, "search.min_params_m=0.003", hi)
    assert r.returncode == 2 and "search.min_params_m: 0.004 -> 0.003" in r.stderr, r.stderr
    assert supernet(tmp_path / "b", *budget).returncode == 0  # the same budget: finished, nothing to redo
    sandwich = ["supernet.path_sampling=sandwich", lo, hi]
    assert supernet(tmp_path / "s", *sandwich).returncode == 0
    r = supernet(tmp_path / "s", *sandwich[:2], "search.max_params_m=0.01")
    assert r.returncode == 2 and "search.max_params_m: 0.011 -> 0.01" in r.stderr, r.stderr

    settings = tmp_path / "b" / "supernet" / "settings.json"
    rec = json.loads(settings.read_text())
    for k in ("search.min_params_m", "search.max_params_m"):  # as an older version recorded it
        del rec["fingerprint"][k]
    assert "supernet.sandwich_paths" not in rec["fingerprint"]  # counts only for sandwich sampling
    del rec["config"]["supernet"]["sandwich_paths"]  # older versions had no such key
    settings.write_text(json.dumps(rec))
    assert supernet(tmp_path / "b", *budget).returncode == 0
    r = supernet(tmp_path / "b", sampling, lo, "search.max_params_m=0.01")
    assert r.returncode == 2 and "search.max_params_m: 0.011 -> 0.01" in r.stderr, r.stderr

    assert supernet(tmp_path / "u", lo, hi).returncode == 0
    assert supernet(tmp_path / "u", "search.min_params_m=0.003", hi).returncode == 0
