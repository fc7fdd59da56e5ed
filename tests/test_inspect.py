"""``inspect``: tables and pictures of a finished search (tiny synthetic search, no model)."""
import pytest
import yaml

from glora.core.errors import UserError
from search.evolution import EvolutionSearcher
from search.inspect import inspect_main
from supernet.space import LayerSpec, SearchSpace

SPECS = [LayerSpec(f"blocks.{b}.{m}", i, o, bias=(b + k) % 3 != 0)
         for b in range(2) for k, (m, i, o) in enumerate([("attn.qkv", 16, 48), ("attn.proj", 16, 16),
                                                         ("mlp.fc1", 16, 64), ("mlp.fc2", 64, 16)])]


@pytest.fixture
def run_dir(tmp_path):
    space = SearchSpace(SPECS, ranks=(2, 4))
    score = lambda s: float(sum(len(c) for lc in s.layers for c in lc)) / 10  # noqa: E731
    EvolutionSearcher(space, score, min_params=200, max_params=900, generations=3, population=8, select=3,
                      mutation=3, mutation_prob=0.3, crossover=3, seed=0, out_dir=tmp_path / "search",
                      model_name="toy_vit", progress=False).run()
    return tmp_path


def test_inspect_run_dir(run_dir, capsys):
    assert inspect_main(str(run_dir)) == 0
    out = capsys.readouterr().out
    for s in ("blocks.0.attn.qkv", "blocks.1.mlp.fc2", "adapter params", "qkv", "fc1", "choices taken", "toy_vit"):
        assert s in out, s
    data = yaml.safe_load((run_dir / "search" / "subnet.yaml").read_text())
    assert f"{data['params']:,}" in out
    for name in ("subnet_heatmap.png", "search_progress.png"):
        p = run_dir / "search" / name
        assert p.is_file() and p.stat().st_size > 1000, name


def test_inspect_bare_subnet_yaml(run_dir, tmp_path, capsys):
    bare = tmp_path / "bare" / "my_subnet.yaml"
    bare.parent.mkdir()
    bare.write_text((run_dir / "search" / "subnet.yaml").read_text())
    out_dir = tmp_path / "pics"
    assert inspect_main(str(bare), str(out_dir)) == 0
    assert "blocks.1.attn.proj" in capsys.readouterr().out
    assert (out_dir / "subnet_heatmap.png").stat().st_size > 1000
    assert not (out_dir / "search_progress.png").exists()      # no history beside it


def test_inspect_without_matplotlib(run_dir, capsys, monkeypatch):
    import builtins
    real_import = builtins.__import__

    def no_mpl(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *a, **k)
    monkeypatch.setattr(builtins, "__import__", no_mpl)
    (run_dir / "search" / "subnet_heatmap.png").unlink(missing_ok=True)
    assert inspect_main(str(run_dir / "search" / "subnet.yaml")) == 0
    out = capsys.readouterr().out
    assert "pip install -e .[plot]" in out and "blocks.0.mlp.fc1" in out
    assert not (run_dir / "search" / "subnet_heatmap.png").exists()


def test_inspect_missing_path(tmp_path):
    with pytest.raises(UserError, match="not found"):
        inspect_main(str(tmp_path / "nope"))
    with pytest.raises(UserError, match="no subnet.yaml"):
        inspect_main(str(tmp_path))
