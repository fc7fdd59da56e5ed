"""The layering of the packages and their names in site-packages."""
import ast
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
UPPER = ("supernet", "search", "retrain", "run_search", "glora.stages", "glora.pipeline", "glora.suite",
         "glora.preflight")
ORCHESTRATION = ("run_search", "glora.pipeline", "glora.suite", "glora.preflight")


def _imports(path: Path, root: Path = ROOT) -> set[str]:
    """Absolute names of the modules ``path`` imports, relative imports resolved, and ``from a import b`` also
    as ``a.b`` (``b`` may be a module)."""
    package = list(path.relative_to(root).with_suffix("").parts[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            out.add(module)
            out.update(f"{module}.{a.name}" for a in node.names)
    return out


def test_imports_resolves_relative_and_from_imports(tmp_path):
    f = tmp_path / "glora" / "core" / "probe.py"
    f.parent.mkdir(parents=True)
    f.write_text("from ..stages import retrain\nfrom glora import pipeline\nfrom . import io\n")
    assert {"glora.stages.retrain", "glora.pipeline", "glora.core.io"} <= _imports(f, tmp_path)


def test_ground_layer_imports_nothing_above_it():
    """glora.core (config, files, training loop) and glora.data import neither the stages nor the orchestration."""
    files = list((ROOT / "glora" / "core").glob("*.py")) + list((ROOT / "glora" / "data").glob("*.py"))
    assert len(files) > 10
    bad = [(f.name, m) for f in files for m in _imports(f)
           if m.split(".")[0] in UPPER[:4] or any(m == u or m.startswith(u + ".") for u in UPPER[4:])]
    assert not bad, bad


def _library_files():
    return [f for pkg in ("supernet", "search", "retrain") for f in (ROOT / pkg).glob("*.py")]


def test_library_takes_plain_arguments_not_the_run_config():
    """supernet/, search/ and retrain/ are the library: they never see the run's Config, its folder helpers or the
    stages; everything that reads the config lives in glora.stages."""
    files = _library_files()
    assert len(files) > 10
    banned = ("glora.core.config", "glora.core.build", "glora.stages", *ORCHESTRATION)
    bad = [(f"{f.parent.name}/{f.name}", m) for f in files for m in _imports(f)
           if any(m == b or m.startswith(b + ".") for b in banned)]
    assert not bad, bad
    takes_cfg = [(f.name, node.name) for f in files for node in ast.walk(ast.parse(f.read_text()))
                 if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
                 and any(a.arg == "cfg" for a in node.args.args + node.args.kwonlyargs)]
    assert not takes_cfg, takes_cfg


def test_stages_sit_below_the_orchestration():
    files = list((ROOT / "glora" / "stages").glob("*.py"))
    assert {f.stem for f in files} >= {"supernet", "search", "retrain"}
    bad = [(f.name, m) for f in files for m in _imports(f) if any(m == o or m.startswith(o + ".") for o in ORCHESTRATION)]
    assert not bad, bad


def test_no_top_level_common_or_data_package():
    assert not (ROOT / "common").exists() and not (ROOT / "data").exists()
    cfg = (ROOT / "setup.cfg").read_text()
    assert "common*" not in cfg and "data*" not in cfg and "glora*" in cfg


def test_installed_package_is_not_shadowed_by_a_users_data_or_common_folder(tmp_path):
    """A user's working folder with its own data/ and common/ packages: ours still import, theirs stay theirs."""
    for name in ("data", "common"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "__init__.py").write_text(f"MINE = {name!r}\n")
    code = ("import data, common, glora.core.config, glora.data.vtab, supernet, search.evolution, retrain.build, glora.stages.retrain, "
            "run_search; assert data.MINE == 'data' and common.MINE == 'common'; "
            "import glora; print(glora.__file__)")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # the installed package (make venv)
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert Path(r.stdout.strip()).resolve().is_relative_to(ROOT / "glora")
