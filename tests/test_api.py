"""The public API: the README's library example runs as written; targets and heads of any model."""
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from glora.core.errors import UserError

ROOT = Path(__file__).resolve().parent.parent


def readme_block(heading: str) -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    m = re.search(r"```python\n(.*?)```", section, re.S)
    assert m, f"no python block under '## {heading}'"
    return m.group(1)


def test_readme_library_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = readme_block("Use it as a library")
    exec(compile(code, "README.md", "exec"), {"__name__": "readme_example"})
    out = capsys.readouterr().out
    diff = float(re.search(r"max \|merged - adapted\| logit: (\S+)", out).group(1))
    acc = float(re.search(r"val accuracy: (\S+)", out).group(1))
    assert diff < 1e-4 and acc > 0.6, out
    assert (tmp_path / "supernet_adapters.safetensors").is_file() and (tmp_path / "subnet.yaml").is_file()


def test_public_names():
    import supernet
    from supernet import (GloraSupernet, SearchSpace, Subnet, apply_subnet, merge_and_unload,  # noqa: F401
                          search_subnet)
    import inspect
    for name in supernet.__all__:
        obj = getattr(supernet, name)
        if callable(obj) and getattr(obj, "__module__", "").split(".")[0] in ("supernet", "retrain", "search"):
            assert obj.__doc__, f"{name} has no docstring"
    for cls in (GloraSupernet, SearchSpace, Subnet):
        for name, fn in inspect.getmembers(cls, callable):
            if not name.startswith("_") and fn.__qualname__.startswith(cls.__name__ + "."):
                assert fn.__doc__, f"{cls.__name__}.{name} has no docstring"
    with pytest.raises(AttributeError):
        supernet.not_a_name


class Conv1D(nn.Module):
    """Stands for GPT-2's Conv1D: a weight matrix, but not an nn.Linear."""

    def __init__(self, nx, nf):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        return x @ self.weight + self.bias


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_attn, self.proj, self.norm = Conv1D(8, 8), nn.Linear(8, 8), nn.LayerNorm(8)


def test_non_linear_and_quantized_targets_name_the_layer():
    from supernet.inject import find_targets
    model = nn.Sequential(Block(), Block())
    with pytest.raises(UserError, match=r"0\.c_attn.*Conv1D, not an nn\.Linear"):
        find_targets(model, ["c_attn"])
    # containers and norms whose names match are not targets; only the linear layers are
    assert find_targets(model, [r"0\..*"]) == ["0.proj"]
    assert find_targets(model, ["proj", "norm"]) == ["0.proj", "1.proj"]
    model[1].proj.weight = nn.Parameter(torch.zeros(8, 8, dtype=torch.int8), requires_grad=False)
    with pytest.raises(UserError, match=r"1\.proj is a quantized or wrapped linear layer "
                                        r"\(Linear, weight Parameter of torch\.int8\)"):
        find_targets(model, ["proj"])


def test_vit_patch_embed_conv_is_left_out(vit):
    from supernet.inject import find_targets
    names = find_targets(vit, ["proj"])
    assert names and all(n.endswith("attn.proj") for n in names)


class TinyLM(nn.Module):
    """An embedding and an output head tied to it (Hugging Face style ``get_output_embeddings``)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.fc = nn.Linear(8, 8, bias=False)
        self.lm_head = nn.Linear(8, 20, bias=False)
        self.lm_head.weight = self.embed.weight

    def get_output_embeddings(self):
        return self.lm_head

    def forward(self, ids):
        return self.lm_head(self.fc(self.embed(ids)))


def test_tied_head_is_neither_target_nor_trained():
    from supernet import GloraSupernet
    from supernet.inject import classifier_names, find_targets, head_parameters
    m = TinyLM()
    assert classifier_names(m) == {"lm_head"}
    assert find_targets(m, r".*") == ["fc"]           # the regex matches the head and the embedding too
    assert head_parameters(m) == []
    sn = GloraSupernet(m, target_modules=[r".*"])
    assert not m.embed.weight.requires_grad
    assert set(sn.trainable_state_dict()) == {f"fc.{p}" for p in ("A_down", "A_up", "B_down", "B_up")}
    assert sn.space.options[0][2:] == (("none",),) * 3  # no bias: C, D, E stay none
