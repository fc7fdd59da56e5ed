"""Config system: defaults, task deltas, --set overrides and every error case (message + exit code 2)."""
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from glora.core.config import load_config, load_defaults
from glora.core.errors import UserError

ROOT = Path(__file__).resolve().parent.parent


def real_cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "run_search.py"), *args], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)


def test_real_process_exit_code_and_message(tmp_path):
    r = real_cli("--set", "supernet.lrr=0.1", "--set", f"output_dir={tmp_path / 'o'}")
    assert r.returncode == 2 and r.stderr.strip() == "error: unknown config key 'supernet.lrr'; nearest valid: " \
        "supernet.lr, supernet.min_lr, supernet"


def test_every_default_key_has_a_comment():
    text = (ROOT / "configs" / "default.yaml").read_text()
    for line in text.splitlines():
        s = line.strip()
        if s and not s.startswith("#") and s.endswith(":") is False and ":" in s:
            assert "#" in s, f"no comment on: {line}"


def test_task_configs_only_hold_known_keys():
    for p in sorted((ROOT / "configs").glob("*.yaml")):
        load_config(str(p))


def test_overrides_keep_types_and_reach_free_form_mappings():
    cfg = load_config("tiny", ["supernet.lr=1", "model.kwargs.drop_path_rate=0.1", "glora.ranks=[4, 8]"])
    assert cfg.supernet.lr == 1.0 and isinstance(cfg.supernet.lr, float)
    assert cfg.model.kwargs["drop_path_rate"] == 0.1 and cfg.model.kwargs["img_size"] == 32
    assert cfg.glora.ranks == [4, 8]
    assert cfg.search.population == 8  # from the task file
    assert cfg.supernet.weight_decay == load_defaults()["supernet"]["weight_decay"]  # from the defaults


@pytest.mark.parametrize("override,fragment", [
    ("supernet.lrr=0.1", "unknown config key 'supernet.lrr'; nearest valid: supernet.lr"),
    ("supernet.lr=fast", "supernet.lr: expected float, got 'fast'"),
    ("search.population=2.5", "search.population: expected int"),
    ("precision=fp16", "precision: 'fp16' is not one of auto, fp32, bf16"),
    ("retrain.init=warm", "retrain.init: 'warm' is not one of supernet, scratch"),
    ("glora.ranks=[0]", "glora.ranks"),
    ("glora.vector_scale=0", "glora.vector_scale: must be a positive number, got 0"),
    ("retrain.refit_guard=0.5", "retrain.refit_guard: must be 0 (off) or a finite number >= 1"),
    ("retrain.refit_guard=-1", "retrain.refit_guard: must be 0 (off) or a finite number >= 1"),
    ("glora.vector_scale=3", "glora.vector_scale: 3.0 has no effect with glora.parametrisation 'paper'"),
    ("search.min_params_m=5", "is above search.max_params_m"),
    ("retrain.lr_grid=[1e-3, 3e-3, 0.0010001]", "retrain.lr_grid: 0.001 and 0.0010001 name the same run folder"),
    ("retrain.lr_grid=[3e-3, 3e-3]", "retrain.lr_grid: 0.003 and 0.003 name the same run folder"),
    ("supernet", "expected section.key=value"),
    ("modle.name=x", "unknown config key 'modle'"),
])
def test_config_errors_exit_2_with_one_line(cli, tmp_path, override, fragment):
    r = cli("--set", override, "--set", f"output_dir={tmp_path / 'o'}")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "o").exists()


def test_unknown_key_in_task_file_and_missing_config(cli, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"supernet": {"epochz": 3}}))
    r = cli("--config", str(bad))
    assert r.returncode == 2 and "unknown config key 'supernet.epochz'; nearest valid: supernet.epochs" in r.stderr
    r = cli("--config", "no_such_task")
    assert r.returncode == 2 and "config 'no_such_task' not found" in r.stderr and "demo" not in r.stdout


def test_config_found_by_name_and_resolved_config_written(cli, tmp_path):
    r = cli("--config", "tiny", "--set", f"output_dir={tmp_path}", "--print-config")
    assert r.returncode == 0, r.stderr
    cfg = yaml.safe_load(r.stdout)
    assert cfg["model"]["name"] == "vit_tiny_patch16_224" and cfg["supernet"]["lr"] == 1e-3


def test_load_config_raises_user_error():
    with pytest.raises(UserError, match="nearest valid: data.batch_size"):
        load_config(None, ["data.batchsize=3"])
