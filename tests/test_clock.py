"""A killed and resumed stage reports the seconds of both sessions: the clock files hold the time up to the last
checkpoint, and the rerun adds its own. Time is faked so every figure is exact."""
import json
import types

import pytest

import glora.core.clock as clock_mod
import glora.core.trainer as trainer
from glora import pipeline
from glora.core.clock import read_seconds, running_clock, save_clocks
from glora.core.config import load_config

REAL_SAVE = trainer.save_checkpoint


class Killed(Exception):
    pass


@pytest.fixture
def fake_time(monkeypatch):
    """The clocks' time: it stands still unless a test moves it."""
    now = [1_000_000.0]
    monkeypatch.setattr(clock_mod, "time", types.SimpleNamespace(time=lambda: now[0]))
    return now


def checkpoints_take(monkeypatch, now, seconds, kill_at=None):
    """Every checkpoint the trainer saves takes ``seconds`` of fake time; the ``kill_at``-th dies before writing."""
    calls = [0]

    def save(path, state):
        calls[0] += 1
        now[0] += seconds
        if calls[0] == kill_at:
            raise Killed()
        REAL_SAVE(path, state)
    monkeypatch.setattr(trainer, "save_checkpoint", save)
    return calls


def test_clock_files_add_up(tmp_path, fake_time):
    path = tmp_path / "t.json"
    with pytest.raises(Killed):
        with running_clock(path, resume=False) as c:
            fake_time[0] += 30
            save_clocks()
            fake_time[0] += 1000  # lost: killed before the next save
            raise Killed()
    assert read_seconds(path) == 30
    with running_clock(path, resume=True) as c:
        fake_time[0] += 5
    assert c.seconds() == 35 and read_seconds(path) == 35
    with running_clock(path, resume=False) as c:  # a fresh start ignores what the file held
        fake_time[0] += 2
    assert read_seconds(path) == 2
    for bad in ('{"time_s": -4}', '{"time_s": "x"}', "[1]", "not json"):
        path.write_text(bad)
        assert read_seconds(path) == 0


def test_a_killed_supernet_reports_both_sessions(tmp_path, data_root, monkeypatch, fake_time):
    cfg = load_config("tiny", [f"output_dir={tmp_path / 'run'}", f"data.root={data_root}",
                               "supernet.max_steps_per_epoch=2", "supernet.epochs=3"])
    calls = checkpoints_take(monkeypatch, fake_time, 500, kill_at=2)
    with pytest.raises(Killed):
        pipeline.run_stages(cfg, ["supernet"], progress=False)
    assert calls[0] == 2
    folder = tmp_path / "run" / "supernet"
    assert read_seconds(folder / pipeline.STAGE_TIME) == 500  # epoch 1 kept; the killed epoch's time is not

    checkpoints_take(monkeypatch, fake_time, 7)
    pipeline.run_stages(cfg, ["supernet"], progress=False)  # resumes at epoch 2: two more checkpoints
    result = json.loads((folder / pipeline.RESULT).read_text())
    assert result["resumed"] is True
    assert result["time_s"] == 500 + 2 * 7


def test_a_killed_grid_point_keeps_its_first_session(tmp_path, data_root, monkeypatch, fake_time):
    """The retrain's lr grid: a point killed after one of its two epochs, resumed, keeps both sessions' seconds in
    its val.json, and the method's selection time is the sum over its points."""
    cfg = load_config("tiny", [f"output_dir={tmp_path / 'run'}", f"data.root={data_root}",
                               "supernet.max_steps_per_epoch=2", "retrain.max_steps_per_epoch=2",
                               "search.max_eval_batches=1", "data.eval_batch_size=100",
                               "retrain.lr_grid=[1.0e-3, 3.0e-3]", "retrain.baselines=[]", "retrain.top_k=1"])
    pipeline.run_stages(cfg, ["supernet", "search"], progress=False)
    calls = checkpoints_take(monkeypatch, fake_time, 100, kill_at=2)  # the first point's second epoch
    with pytest.raises(Killed):
        pipeline.run_stages(cfg, ["retrain"], progress=False)
    assert calls[0] == 2
    checkpoints_take(monkeypatch, fake_time, 1)
    pipeline.run_stages(cfg, ["retrain"], progress=False)
    retrain = tmp_path / "run" / "retrain"
    points = sorted((retrain / "select").glob("*/val.json"))
    assert len(points) == 2
    times = sorted(json.loads(p.read_text())["time_s"] for p in points)
    assert times == [2, 100 + 1]  # the other point: two epochs of this session; the killed one: both sessions
    metrics = json.loads((retrain / "metrics.json").read_text())
    assert metrics["select_time_s"] == sum(times)
    assert json.loads((retrain / pipeline.RESULT).read_text())["time_s"] == 100 + 1 + 2 + 2  # and the refit's two

    # a deleted merged model: the retrain runs again on its finished points and refit, which take no time here
    (retrain / "model_merged.safetensors").unlink()
    pipeline.run_stages(cfg, ["retrain"], progress=False)
    again = json.loads((retrain / "metrics.json").read_text())
    assert again["select_time_s"] == sum(times)  # the points' kept seconds, not the zero this session spent
    assert again["train_time_s"] >= 2  # the refit's kept seconds (plus this session's real seconds)
    assert json.loads((retrain / pipeline.RESULT).read_text())["time_s"] == 105
