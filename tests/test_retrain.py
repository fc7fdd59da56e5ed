"""Compact layers, merge and the retrain stage's building blocks."""
import numpy as np
import pytest
import timm
import torch

from conftest import tiny_vit
from retrain.build import adapter_parameters, apply_subnet, layer_specs, merge_and_unload
from retrain.glora import GloraLinear
from supernet.space import LayerChoice, SearchSpace
from supernet.wrapper import GloraSupernet


def randomize_adapters_(params, seed=0, scale=0.2):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.copy_(torch.randn(p.shape, generator=g) * scale)


def randomize_biases_(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("qkv_bias", [True, False])
def test_merged_equals_unmerged_and_is_plain_timm(qkv_bias):
    torch.manual_seed(0)
    model = tiny_vit(qkv_bias=qkv_bias)
    randomize_biases_(model)
    specs = layer_specs(model, ["qkv", "proj", "fc1", "fc2"])
    assert any(not s.bias for s in specs) == (not qkv_bias)
    space = SearchSpace(specs, ranks=[2, 4])
    rng = np.random.default_rng(0)
    x = torch.randn(3, 3, 32, 32)
    for trial in range(4):
        m = tiny_vit(qkv_bias=qkv_bias)
        m.load_state_dict(model.state_dict())
        subnet = space.random(rng)
        apply_subnet(m, subnet)
        randomize_adapters_(adapter_parameters(m), seed=trial)
        m.eval()
        with torch.no_grad():
            ref = m(x)
        base = tiny_vit(qkv_bias=qkv_bias).eval()
        base.load_state_dict(model.state_dict())
        with torch.no_grad():
            assert (base(x) - ref).abs().max() > 1e-3  # the adapters do change the output
        merged = merge_and_unload(m)
        assert not any(isinstance(mod, GloraLinear) for mod in merged.modules())
        fresh = tiny_vit(qkv_bias=qkv_bias).eval()
        sd = merged.state_dict()
        assert set(sd) == set(fresh.state_dict())
        fresh.load_state_dict(sd, strict=True)
        with torch.no_grad():
            torch.testing.assert_close(fresh(x), ref, atol=1e-5, rtol=1e-5)


def test_compact_params_equal_subnet_count():
    model = tiny_vit()
    space = SearchSpace(layer_specs(model, ["qkv", "proj", "fc1", "fc2"]), ranks=[2, 4])
    rng = np.random.default_rng(1)
    for _ in range(10):
        m = tiny_vit()
        subnet = space.random(rng)
        apply_subnet(m, subnet)
        trainable = [p for n, p in m.named_parameters() if p.requires_grad and not n.startswith("head.")]
        assert sum(p.numel() for p in trainable) == space.params(subnet)
        assert sum(p.numel() for p in adapter_parameters(m)) == space.params(subnet)


def test_compact_from_supernet_reproduces_the_path():
    torch.manual_seed(0)
    model = tiny_vit()
    randomize_biases_(model)
    sn = GloraSupernet(model, ranks=[2, 4])
    randomize_adapters_(sn.adapter_parameters(), seed=3)
    x = torch.randn(2, 3, 32, 32)
    subnet = sn.space.random(np.random.default_rng(5))
    sn.set_subnet(subnet)
    sn.eval()
    with torch.no_grad():
        ref = sn(x)
    apply_subnet(sn.model, subnet)
    with torch.no_grad():
        torch.testing.assert_close(sn.model(x), ref, atol=1e-6, rtol=1e-6)
    assert sum(p.numel() for p in adapter_parameters(sn.model)) == sn.space.params(subnet)


def test_uniform_largest_choice():
    model = tiny_vit(qkv_bias=False)
    space = SearchSpace(layer_specs(model, ["qkv", "fc1"]), ranks=[4])
    sub = space.uniform(LayerChoice("lora_4", "lora_4", "lora_4", "vector", "vector"))
    qkv = sub.choice("blocks.0.attn.qkv")
    assert qkv.C == qkv.D == qkv.E == "none" and qkv.A == "lora_4"
    assert sub.choice("blocks.0.mlp.fc1").E == "vector"


def test_head_only_on_cached_features_equals_training_the_whole_model(tmp_path):
    """The head-only baseline trains on features computed once; it must reach the weights that training the
    head inside the whole (frozen) model reaches, step for step."""
    from glora.core.config import load_config
    from glora.core.engine import InMemorySplit
    from glora.core.trainer import FitSpec, fit
    from glora.stages.retrain import Method, trainable_view
    from supernet.inject import freeze_all_but, head_names, head_parameters
    torch.manual_seed(0)
    data = InMemorySplit(torch.randn(40, 3, 32, 32), torch.randint(0, 5, (40,)))
    cfg = load_config("tiny", ["data.eval_batch_size=16"])
    spec = FitSpec(epochs=2, lr=1e-2, weight_decay=1e-4, warmup_epochs=0.5, batch_size=8, seed=3, head_lr_scale=2.0)
    heads = []
    for use_features in (False, True):
        torch.manual_seed(0)
        model = tiny_vit()
        freeze_all_but(model, head_parameters(model))
        net, (train,) = (trainable_view(cfg, Method("head", "head only", None, "scratch"), model, [data],
                                        torch.device("cpu"), {}) if use_features else (model, [data]))
        assert (net is model) != use_features
        named = {n: p for n, p in model.named_parameters() if p.requires_grad}
        fit(net, named, train, spec, tmp_path / str(use_features), torch.device("cpu"), progress=False,
            head_names=head_names(model))
        heads.append({k: v.detach().clone() for k, v in named.items()})
    assert set(heads[0]) == {"head.weight", "head.bias"}
    for k in heads[0]:
        torch.testing.assert_close(heads[0][k], heads[1][k], atol=1e-5, rtol=1e-4)
    torch.manual_seed(0)
    fresh = tiny_vit()
    assert (fresh.head.weight - heads[0]["head.weight"]).abs().max() > 1e-3  # training moved the head


def test_float64_merge_check_is_exact_and_catches_a_wrong_merge(monkeypatch):
    """The retrain's merge check compares in float64: an exact merge differs by rounding of 1e-13 of the logits,
    a merge that gets one layer's weight change 1% too large is caught by the default tolerance."""
    import glora.stages.retrain as stage
    torch.manual_seed(0)
    m = tiny_vit()
    randomize_biases_(m)
    space = SearchSpace(layer_specs(m, ["qkv", "proj", "fc1", "fc2"]), ranks=[2, 4])
    apply_subnet(m, space.uniform(LayerChoice(A="vector", B="lora_4", D="vector", E="vector")))
    randomize_adapters_(adapter_parameters(m), seed=5)
    m.eval()
    x = torch.randn(4, 3, 32, 32)
    exact, scale = stage.merge_error_fp64(m, x)
    with torch.no_grad():
        assert scale == pytest.approx(float(m.double()(x.double()).abs().max()), rel=1e-12)
    m.float()
    tol = stage.merge_tolerance_fp64(1e-3, scale)  # retrain.merge_atol's default
    assert tol == pytest.approx(1e-6 * max(1.0, scale)) and exact < 1e-12 * max(1.0, scale)
    true_merge = GloraLinear.merge
    calls = []

    def wrong_merge(self):
        lin = true_merge(self)
        if not calls:  # the first layer only: its weight change grows by 1%
            with torch.no_grad():
                lin.weight.add_(0.01 * (lin.weight - self.base_layer.weight))
        calls.append(1)
        return lin

    monkeypatch.setattr(GloraLinear, "merge", wrong_merge)
    wrong, _ = stage.merge_error_fp64(m, x)
    assert wrong > tol > exact
    assert any(isinstance(mod, GloraLinear) for mod in m.modules())  # the check merges copies, m stays adapted
    assert stage.merge_tolerance_fp64(1e-9, scale) == 1e-9  # a tighter retrain.merge_atol wins
