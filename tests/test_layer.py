"""The super-layer against a dense computation of (W0 + W0*A + B) x + b0 + b0*D + E + W0 @ C."""
import itertools

import numpy as np
import pytest
import torch
import torch.nn as nn

from supernet import LayerChoice, tensor_params
from supernet.layer import SuperGloraLinear
from supernet.ops import Lora, glora_linear, merged_bias, merged_weight
from supernet.space import LayerSpec, SearchSpace
from supernet.wrapper import GloraSupernet
from conftest import tiny_vit

RANKS = (2, 4)
AB = ["lora_2", "lora_4", "vector", "scalar", "none"]
C = ["lora_2", "lora_4", "vector", "none"]
DE = ["vector", "scalar", "none"]


def randomize_(layer: SuperGloraLinear, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def dense_reference(layer: SuperGloraLinear, x: torch.Tensor) -> torch.Tensor:
    """Independent dense computation of the paper's formula, tensors built from the raw storage."""
    W0 = layer.base_layer.weight.double()
    b0 = layer.base_layer.bias
    d_out, d_in = W0.shape
    ch = layer.choice

    def full_ab(t):
        c = getattr(ch, t)
        down, up = getattr(layer, f"{t}_down").double(), getattr(layer, f"{t}_up").double()
        if c == "none":
            return torch.zeros(d_out, d_in, dtype=torch.float64)
        if c == "vector":
            return down[:, 0:1].expand(d_out, d_in)
        if c == "scalar":
            return torch.full((d_out, d_in), float(down[0, 0].detach()), dtype=torch.float64)
        r = int(c.split("_")[1])
        return sum(torch.outer(down[:, k], up[k, :]) for k in range(r))

    W = W0 + W0 * full_ab("A") + full_ab("B")
    y = x.double() @ W.T
    if b0 is None:
        return y
    b0 = b0.double()
    if ch.C == "none":
        Cv = torch.zeros(d_in, dtype=torch.float64)
    elif ch.C == "vector":
        Cv = layer.C_down[:, 0].double()
    else:
        r = int(ch.C.split("_")[1])
        Cv = sum(layer.C_down[:, k].double() * layer.C_up[k, 0].double() for k in range(r))
    D = {"none": 0.0, "vector": layer.D.double(), "scalar": float(layer.D[0].detach())}[ch.D]
    E = {"none": 0.0, "vector": layer.E.double(), "scalar": float(layer.E[0].detach())}[ch.E]
    b = b0 + b0 * D + E + W0 @ Cv
    return y + b


@pytest.mark.parametrize("bias", [True, False])
def test_every_choice_matches_dense(bias):
    torch.manual_seed(0)
    base = nn.Linear(12, 7, bias=bias)
    layer = SuperGloraLinear(base, max_rank=4)
    randomize_(layer, 1)
    x = torch.randn(3, 5, 12)
    cs, ds = (C, DE) if bias else (["none"], ["none"])
    # every choice of every tensor appears; A x B fully crossed, C/D/E cycled along
    for i, (a, b) in enumerate(itertools.product(AB, AB)):
        choice = LayerChoice(a, b, cs[i % len(cs)], ds[i % len(ds)], ds[(i // 3) % len(ds)])
        layer.set_choice(choice)
        torch.testing.assert_close(layer(x).double(), dense_reference(layer, x), atol=1e-5, rtol=1e-5)
    for c, d, e in itertools.product(cs, ds, ds):
        layer.set_choice(LayerChoice("scalar", "lora_2", c, d, e))
        torch.testing.assert_close(layer(x).double(), dense_reference(layer, x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_merged_weights_match_forward(bias):
    torch.manual_seed(1)
    layer = SuperGloraLinear(nn.Linear(9, 6, bias=bias), max_rank=4)
    randomize_(layer, 2)
    space = SearchSpace([LayerSpec("l", 9, 6, bias)], ranks=RANKS)
    x = torch.randn(4, 9)
    rng = np.random.default_rng(0)
    for _ in range(30):
        layer.set_choice(space.random(rng).layers[0])
        ref = layer(x)
        merged = nn.functional.linear(x, layer.merged_weight(), layer.merged_bias())
        torch.testing.assert_close(merged, ref, atol=1e-5, rtol=1e-5)
        layer.eval()
        layer.freeze_merged()
        with torch.no_grad():
            torch.testing.assert_close(layer(x), ref, atol=1e-5, rtol=1e-5)


def test_zero_adapters_equal_base_for_every_path(vit):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = vit(x)
    sn = GloraSupernet(vit, ranks=RANKS).eval()
    for step in range(12):
        sn.sample_path(seed=3, step=step)
        with torch.no_grad():
            torch.testing.assert_close(sn(x), ref, atol=0, rtol=0)


def test_counted_params_equal_used_elements(vit):
    """Counted parameters of a path = adapter elements that receive a gradient on that path."""
    sn = GloraSupernet(vit, ranks=RANKS)
    for _, layer in sn.super_layers():
        randomize_(layer, 5)
        if layer.has_bias:  # timm zero-initialises biases, which would leave D without gradient
            with torch.no_grad():
                layer.base_layer.bias.normal_()
    # each layer's output enters the loss through its own random projection: LayerNorm downstream would
    # otherwise hide a uniform shift (E or B as scalar on proj/fc2), whose gradient is then zero
    probes = []
    for _, layer in sn.super_layers():
        layer.register_forward_hook(lambda m, i, out: probes.append((out * torch.randn_like(out)).sum()))
    x = torch.randn(2, 3, 32, 32)
    for step in range(8):
        subnet = sn.sample_path(seed=0, step=step)
        sn.zero_grad(set_to_none=True)
        probes.clear()
        sn(x)
        torch.stack(probes).sum().backward()
        used = sum(int((p.grad != 0).sum()) for p in sn.adapter_parameters() if p.grad is not None)
        assert used == sn.space.params(subnet)


def test_param_table():
    assert tensor_params("A", "lora_4", 10, 20) == 4 * 30
    assert tensor_params("C", "lora_4", 10, 20) == 4 * 11
    assert tensor_params("C", "vector", 10, 20) == 10
    assert tensor_params("D", "vector", 10, 20) == 20
    assert tensor_params("E", "scalar", 10, 20) == 1
    assert tensor_params("B", "none", 10, 20) == 0


def test_ops_match_merged_weight():
    torch.manual_seed(0)
    W, b, x = torch.randn(5, 3), torch.randn(5), torch.randn(4, 3)
    A = Lora(torch.randn(5, 2), torch.randn(2, 3))
    B = torch.randn(5)
    Cv = Lora(torch.randn(3, 2), torch.randn(2, 1))
    D, E = torch.randn(1), torch.randn(5)
    y = glora_linear(x, W, b, A, B, Cv, D, E)
    ref = x @ merged_weight(W, A, B).T + merged_bias(W, b, Cv, D, E)
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)


def test_injection_targets_and_freezing(vit):
    sn = GloraSupernet(vit, target_modules=["qkv", r"blocks\.1\.mlp\.fc\d"])
    assert sn.layer_names == ("blocks.0.attn.qkv", "blocks.1.attn.qkv", "blocks.1.mlp.fc1", "blocks.1.mlp.fc2")
    trainable = {n for n, p in vit.named_parameters() if p.requires_grad}
    assert "head.weight" in trainable and "blocks.0.attn.qkv.A_down" in trainable
    assert "blocks.0.attn.qkv.base_layer.weight" not in trainable and "patch_embed.proj.weight" not in trainable


def test_head_never_adapted_and_missing_targets(vit):
    from glora.core.errors import UserError
    with pytest.raises(UserError, match="not found"):
        GloraSupernet(vit, target_modules=["nonexistent"])
    sn = GloraSupernet(tiny_vit(), target_modules=[".*"])
    assert "head" not in sn.layer_names


def test_scales_other_than_1_need_the_scaled_parametrisation():
    from supernet.layer import support_scales
    assert support_scales("paper", 4, 3) == {}
    with pytest.raises(ValueError, match="vector_scale=3.*parametrisation='scaled'"):
        support_scales("paper", 4, 3, vector_scale=3.0)
    with pytest.raises(ValueError, match="a_lora_scale=2"):
        GloraSupernet(tiny_vit(), a_lora_scale=2.0)


@pytest.mark.parametrize("a_scale,own,v_scale", [(1.0, False, 1.0), (8.0, True, 1.0), (1.0, True, 3.0)])
def test_scaled_parametrisation_matches_dense_and_merges(a_scale, own, v_scale):
    """``scaled``: B vector/scalar count as stored / d_in, a LoRA A as stored * a_lora_scale, a vector/scalar A, C,
    D, E as stored * vector_scale; checked against the dense formula with those tensors, against the merged
    weights, and the compact layer made from it."""
    from retrain.glora import GloraLinear
    from supernet.layer import support_scales
    torch.manual_seed(2)
    d_in, d_out = 11, 6
    base = nn.Linear(d_in, d_out)
    scales = support_scales("scaled", d_in, d_out, a_lora_scale=a_scale, vector_scale=v_scale)
    layer = SuperGloraLinear(base, max_rank=4, scales=scales, own_b_vector=own)
    assert hasattr(layer, "B_vec") == own
    ref_layer = SuperGloraLinear(base, max_rank=4)  # paper parametrisation: its tensors rescaled by hand
    randomize_(layer, 3)
    x = torch.randn(4, d_in)
    for a, b in itertools.product(AB, AB):
        choice = LayerChoice(a, b, "vector", "scalar", "vector")
        layer.set_choice(choice)
        ref_layer.set_choice(choice)
        with torch.no_grad():
            for n, p in layer.named_parameters(recurse=False):
                if n != "B_vec":
                    getattr(ref_layer, n).copy_(p)
            if own and b in ("vector", "scalar"):
                ref_layer.B_down[:, 0].copy_(layer.B_vec)
                ref_layer.B_down[0, 0].copy_(layer.B_vec[0])
            if b in ("vector", "scalar"):
                ref_layer.B_down.mul_(1.0 / d_in)
            if a.startswith("lora_"):
                ref_layer.A_down.mul_(a_scale)
            if a in ("vector", "scalar"):
                ref_layer.A_down.mul_(v_scale)
            for t in (ref_layer.C_down, ref_layer.D, ref_layer.E):  # C vector, D scalar, E vector
                t.mul_(v_scale)
        out = layer(x)
        torch.testing.assert_close(out.double(), dense_reference(ref_layer, x), atol=1e-5, rtol=1e-5)
        merged = nn.functional.linear(x, layer.merged_weight(), layer.merged_bias())
        torch.testing.assert_close(merged, out, atol=1e-5, rtol=1e-5)
        compact = GloraLinear.from_super(layer, choice)
        torch.testing.assert_close(compact(x), out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(compact.merge()(x), out, atol=1e-5, rtol=1e-5)
    layer.set_choice(LayerChoice("none", "vector", "none", "none", "none"))
    stored = layer.B_vec if own else layer.B_down[:, 0]
    torch.testing.assert_close(layer(x) - base(x), x.sum(-1, keepdim=True) / d_in * stored, atol=1e-5, rtol=1e-5)
    if own:  # the vector B does not touch the storage of a LoRA B
        layer.set_choice(LayerChoice("none", "lora_4", "none", "none", "none"))
        before = layer(x)
        with torch.no_grad():
            layer.B_vec.add_(5.0)
        torch.testing.assert_close(layer(x), before)
