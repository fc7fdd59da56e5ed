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
    ("retrain.drop_path_rate=1", "retrain.drop_path_rate: must be null (the model's own) or a number in [0, 1)"),
    ("retrain.drop_path_rate=true", "retrain.drop_path_rate: must be null (the model's own) or a number in [0, 1)"),
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


def test_retrain_drop_path_rate_values():
    assert load_config("tiny", []).retrain.drop_path_rate is None
    assert load_config("tiny", ["retrain.drop_path_rate=0"]).retrain.drop_path_rate == 0
    assert load_config("tiny", ["retrain.drop_path_rate=0.25"]).retrain.drop_path_rate == 0.25
    for bad in ("-0.1", "nan", "'0.1'"):
        with pytest.raises(UserError, match=r"retrain.drop_path_rate: must be null"):
            load_config("tiny", [f"retrain.drop_path_rate={bad}"])
    with pytest.raises(UserError, match=r"retrain.drop_path_rate: 0.1 works on timm models only"):
        load_config("tiny", ["model.source=hf", "retrain.drop_path_rate=0.1"])


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


def test_base_config_chain_resolves_outermost_first_and_looks_beside_the_file(tmp_path):
    (tmp_path / "parent.yaml").write_text("base: tiny\nsupernet: {lr: 0.5, epochs: 7}\n")
    (tmp_path / "child.yaml").write_text("base: parent\nsupernet: {epochs: 3}\nsearch: {population: 5}\n")
    cfg = load_config(str(tmp_path / "child.yaml"), ["search.population=6"])
    assert cfg.supernet.lr == 0.5 and cfg.supernet.epochs == 3  # the parent's lr, the child's epochs
    assert cfg.search.population == 6  # --set over every file
    assert cfg.model.name == "vit_tiny_patch16_224"  # from configs/tiny.yaml at the root of the chain
    assert cfg.supernet.weight_decay == load_defaults()["supernet"]["weight_decay"]
    # a base file beside the config wins over configs/ of the same name
    (tmp_path / "tiny.yaml").write_text("model: {name: resnet18}\n")
    assert load_config(str(tmp_path / "child.yaml")).model.name == "resnet18"


def test_base_named_like_the_file_is_the_shipped_one_and_free_form_mappings_merge(tmp_path):
    """A user's own ``accuracy.yaml`` with ``base: accuracy`` starts from configs/accuracy.yaml, not from
    itself; ``model.kwargs`` gains the file's entries and keeps the base's."""
    (tmp_path / "accuracy.yaml").write_text("base: ' accuracy '\nmodel: {kwargs: {drop_path_rate: 0.1}}\n")
    cfg = load_config(str(tmp_path / "accuracy.yaml"))
    assert cfg.model.kwargs == {"img_size": 56, "drop_path_rate": 0.1}
    assert cfg.model.name == load_config("accuracy").model.name


def test_shipped_variants_equal_their_base_with_the_listed_changes():
    """Each accuracy variant resolves to configs/accuracy.yaml plus the changes its header describes."""
    def plain(name, sets=()):
        d = load_config(name, list(sets)).to_dict()
        d.pop("output_dir")
        return d
    assert plain("accuracy_sandwich") == plain("accuracy", ["supernet.path_sampling=sandwich",
                                                            "retrain.init=supernet", "retrain.epochs_grid=[5, 10]"])
    assert plain("accuracy_112") == plain("accuracy", ["model.kwargs.img_size=112", "retrain.top_k=1"])
    assert plain("accuracy_gpu") == plain("accuracy", [
        "threads=0", "model.kwargs.img_size=224", "data.num_workers=8", "supernet.epochs=20",
        "supernet.warmup_epochs=1.0", "retrain.epochs=10", "retrain.warmup_epochs=1.0"])
    assert plain("accuracy_sandwich") != plain("accuracy")


@pytest.mark.parametrize("files,fragment", [
    ({"a.yaml": "base: b\n", "b.yaml": "base: a\n"}, "base configs loop back to"),
    ({"a.yaml": "base: b\n", "b.yaml": "base: a\n"}, "(a.yaml -> b.yaml -> a.yaml)"),
    ({"a.yaml": "base: a.yaml\n"}, "base 'a.yaml' names this file itself"),
    ({"a.yaml": "base: no_such_base\n"}, "base config 'no_such_base' not found"),
    ({"a.yaml": "base: 3\n"}, "base must name a config"),
    ({"a.yaml": "base: [tiny]\n"}, "base must name a config"),
    ({"a.yaml": "base: b\n", "b.yaml": "supernet: {epochz: 1}\n"}, "b.yaml: unknown config key 'supernet.epochz'"),
    ({"a.yaml": "base: b\n", "b.yaml": "threads: many\n"}, "b.yaml: config key threads: expected int"),
    ({"a.yaml": "base: b\n", "b.yaml": "- 1\n"}, "b.yaml: expected a mapping at top level"),
    ({"a.yaml": "model: {base: tiny}\n"}, "unknown config key 'model.base'"),
    ({f"c{i}.yaml": f"base: c{i + 1}\n" for i in range(20)} | {"a.yaml": "base: c0\n"}, "more than 16 files"),
])
def test_bad_base_config_exits_2_with_one_line(cli, tmp_path, files, fragment):
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    r = cli("--config", str(tmp_path / "a.yaml"), "--set", f"output_dir={tmp_path / 'o'}")
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and fragment in lines[0], r.stderr
    assert not (tmp_path / "o").exists()


def test_base_on_the_command_line_says_where_it_belongs(cli, tmp_path):
    r = cli("--set", "base=tiny", "--set", f"output_dir={tmp_path / 'o'}")
    assert r.returncode == 2 and "read only at the top level of a config file" in r.stderr
    assert "--config NAME" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_keys_left_out_at_default_are_the_defaults_and_leave_the_fingerprints():
    """A key added to the stage fingerprints later counts only away from its default, so a run folder made before
    it existed keeps its fingerprint: the listed defaults must be the config's own."""
    from glora.preflight import LEFT_OUT_AT_DEFAULT, stage_fingerprint
    defaults = load_defaults()
    for key, value in LEFT_OUT_AT_DEFAULT.items():
        sec, name = key.split(".")
        assert defaults[sec][name] == value, key
    cfg = load_config("tiny", ["retrain.init=supernet"])
    for stage in ("supernet", "search", "retrain"):
        assert not set(LEFT_OUT_AT_DEFAULT) & set(stage_fingerprint(cfg, stage)), stage
    assert "retrain.drop_path_rate" not in stage_fingerprint(cfg, "retrain")  # added later than the others
    moved = load_config("tiny", ["retrain.drop_path_rate=0.1"])
    assert stage_fingerprint(moved, "retrain")["retrain.drop_path_rate"] == 0.1
    assert stage_fingerprint(moved, "supernet") == stage_fingerprint(cfg, "supernet")  # the retrain's own setting
    other_data = load_config("tiny", ["data.seed=2"])
    for stage in ("supernet", "search", "retrain"):
        assert stage_fingerprint(other_data, stage)["data.seed"] == 2, stage
    from glora.stages.retrain import Method
    assert "data_seed" not in Method("lora", "LoRA", None, "scratch").fingerprint(cfg)
    assert Method("lora", "LoRA", None, "scratch").fingerprint(other_data)["data_seed"] == 2
    split = load_config("tiny", ["glora.choices_d=[none]"])
    assert stage_fingerprint(split, "supernet")["glora.choices_d"] == ["none"]


def test_choices_d_and_e_reach_the_supernet_space():
    from glora.stages.supernet import glora_options
    from supernet.wrapper import GloraSupernet
    import timm
    cfg = load_config("tiny", ["glora.choices_de=[vector,scalar,none]", "glora.choices_d=[none]",
                               "glora.choices_e=[scalar]"])
    net = GloraSupernet(timm.create_model(cfg.model.name, num_classes=3, **cfg.model.kwargs), **glora_options(cfg.glora))
    assert net.space.tensor_options["D"] == ("none",) and net.space.tensor_options["E"] == ("scalar",)


def test_a_key_given_twice_is_refused_but_yaml_merge_keys_still_override(tmp_path):
    """A key twice in one mapping would run with the last one unseen: refused with both lines. A YAML merge
    (``<<: *anchor``) followed by the same key is an override on purpose and stays allowed."""
    twice = tmp_path / "twice.yaml"
    twice.write_text("base: tiny\nretrain:\n  lr: 1.0e-3\n  epochs: 2\n  lr: 3.0e-3\n")
    with pytest.raises(UserError, match=r"key 'lr' is given twice \(lines 3 and 5\)"):
        load_config(str(twice))
    merged = tmp_path / "merged.yaml"
    merged.write_text("base: tiny\nsupernet: &common {lr: 2.0e-3, epochs: 3}\nretrain:\n  <<: *common\n  lr: 4.0e-3\n")
    cfg = load_config(str(merged))
    assert (cfg.supernet.lr, cfg.supernet.epochs) == (2e-3, 3)
    assert (cfg.retrain.lr, cfg.retrain.epochs) == (4e-3, 3)
