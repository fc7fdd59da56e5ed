"""Small guarantees that a one-line slip would break: the schedule, the shuffle, the reseed, clipping, weight
decay groups, the head's learning rate, merge checks, the folded-weight cache and bf16 precision of A."""
import math

import pytest
import torch
import torch.nn as nn

from glora.core.engine import InMemorySplit, lr_at
from glora.core.trainer import FitSpec, fit, optimizer_for
from retrain.build import merge_and_unload
from retrain.glora import GloraLinear
from supernet.layer import SuperGloraLinear
from supernet.ops import Lora, glora_linear
from supernet.space import LayerChoice


# ------------------------------------------------------------------------------------------------ schedule
def test_warmup_starts_low_and_cosine_starts_after_it():
    base, total, warm = 1.0, 100, 10
    lrs = [lr_at(s, total, warm, base, 0.0) for s in range(total + 1)]
    assert lrs[0] == pytest.approx(0.1)                              # not the full lr at the first step
    assert all(a < b for a, b in zip(lrs[:warm], lrs[1:warm]))       # rising through the warmup
    assert lrs[warm - 1] == pytest.approx(base) and lrs[warm] == pytest.approx(base)  # cosine starts at the top
    assert lrs[warm + (total - warm) // 2] == pytest.approx(0.5)     # half way through the cosine part
    assert lrs[total] == pytest.approx(0.0)
    assert lr_at(55, 100, 10, 1.0, 0.2) == pytest.approx(0.6)        # min_lr is the floor of the cosine


def tiny_task(n=32, d=6, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return InMemorySplit(torch.randn(n, d, generator=g), torch.randint(0, k, (n,), generator=g))


class Net(nn.Module):
    """A linear body and a linear head; records a draw of the global RNG at every training forward."""

    def __init__(self, d=6, k=3):
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(d, 8)
        self.head = nn.Linear(8, k)
        self.draws = []

    def forward(self, x):
        if self.training:
            self.draws.append(float(torch.rand(())))
        return self.head(torch.relu(self.body(x)))


def run_fit(tmp_path, name, net=None, **spec_kw):
    net = net or Net()
    spec = dict(epochs=1, lr=1e-2, weight_decay=0.0, warmup_epochs=0.0, min_lr=1e-2, batch_size=8, seed=3)
    spec.update(spec_kw)
    named = dict(net.named_parameters())
    log = fit(net, named, tiny_task(), FitSpec(**spec), tmp_path / name, torch.device("cpu"), progress=False,
              head_names={"head.weight", "head.bias"})
    return net, log


def test_fit_follows_warmup_then_cosine(tmp_path):
    """4 steps an epoch, 2 warmup epochs of 4: the lr of each epoch's last step, worked out by hand."""
    _, log = run_fit(tmp_path, "sched", epochs=4, lr=1e-2, min_lr=0.0, warmup_epochs=2.0)
    expect = [1e-2 * 4 / 8, 1e-2, 1e-2 * 0.5 * (1 + math.cos(math.pi * 3 / 8)),
              1e-2 * 0.5 * (1 + math.cos(math.pi * 7 / 8))]
    assert [r["lr"] for r in log] == pytest.approx(expect)


# ------------------------------------------------------------------------------------------------ data order, RNG
def test_shuffle_depends_on_seed_and_epoch():
    split = tiny_task(n=64)

    def order(seed, epoch):
        return torch.cat([y for _, y in split.batches(8, shuffle=True, seed=seed, epoch=epoch)]).tolist(), \
            torch.cat([x[:, 0] for x, _ in split.batches(8, shuffle=True, seed=seed, epoch=epoch)]).tolist()
    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(0, 1)
    assert order(0, 0) != order(1, 0)


class Killed(Exception):
    pass


def test_each_epoch_reseeds_from_seed_and_epoch(tmp_path):
    net, _ = run_fit(tmp_path, "full", epochs=2)
    per_epoch = len(net.draws) // 2
    first = [net.draws[0], net.draws[per_epoch]]
    assert first[0] != first[1]  # epoch 2 does not replay epoch 1's dropout draws

    killed = Net()
    spec = FitSpec(epochs=2, lr=1e-2, weight_decay=0.0, min_lr=1e-2, batch_size=8, seed=3)

    def die(step):
        if step == per_epoch:
            raise Killed()
    with pytest.raises(Killed):
        fit(killed, dict(killed.named_parameters()), tiny_task(), spec, tmp_path / "killed", torch.device("cpu"),
            before_step=die, progress=False, head_names={"head.weight", "head.bias"})
    resumed = Net()
    fit(resumed, dict(resumed.named_parameters()), tiny_task(), spec, tmp_path / "killed", torch.device("cpu"),
        progress=False, head_names={"head.weight", "head.bias"})
    assert resumed.draws == net.draws[per_epoch:]  # a resumed epoch draws what the uninterrupted one drew
    for a, b in zip(resumed.parameters(), net.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------------ optimizer
def test_gradient_clipping_is_applied(tmp_path):
    start = {k: v.detach().clone() for k, v in Net().named_parameters()}

    def moved(net):
        return sum(float((p.detach() - start[k]).abs().sum()) for k, p in net.named_parameters())
    free, _ = run_fit(tmp_path, "free")
    clipped, _ = run_fit(tmp_path, "clipped", grad_clip=1e-12)  # Adam's eps then dominates the tiny gradient
    assert moved(clipped) < 0.05 * moved(free)


def test_vectors_and_biases_get_no_weight_decay():
    net = Net()
    opt = optimizer_for(dict(net.named_parameters()), 1e-3, 0.05, {"head.weight", "head.bias"}, 0.1)
    seen = 0
    for g in opt.param_groups:
        for p in g["params"]:
            seen += 1
            assert g["weight_decay"] == (0.05 if p.ndim >= 2 else 0.0)
    assert seen == 4


def test_head_lr_scale_reaches_the_head(tmp_path):
    net0 = Net()
    start = {k: v.detach().clone() for k, v in net0.named_parameters()}
    net, _ = run_fit(tmp_path, "frozen_head", head_lr_scale=0.0, epochs=2)
    for k, p in net.named_parameters():
        if k.startswith("head"):
            torch.testing.assert_close(p.detach(), start[k], rtol=0, atol=0)
        else:
            assert not torch.equal(p.detach(), start[k]), k
    opt = optimizer_for(dict(net0.named_parameters()), 1e-3, 0.0, {"head.weight", "head.bias"}, 0.25)
    for g in opt.param_groups:
        is_head = any(p is net0.head.weight or p is net0.head.bias for p in g["params"])
        assert g["lr"] == pytest.approx(2.5e-4 if is_head else 1e-3)


def test_resume_with_other_training_settings_is_refused(tmp_path):
    from glora.core.errors import UserError
    run_fit(tmp_path, "r", epochs=2, lr=1e-2)
    for change in ({"lr": 2e-2}, {"seed": 4}, {"weight_decay": 0.1}, {"epochs": 3}):
        with pytest.raises(UserError, match="other settings"):
            run_fit(tmp_path, "r", **dict({"epochs": 2, "lr": 1e-2}, **change))


# ------------------------------------------------------------------------------------------------ layers
def test_merge_refuses_non_finite_weights():
    torch.manual_seed(0)
    model = nn.Sequential(GloraLinear(nn.Linear(4, 4), LayerChoice("vector", "none", "none", "none", "none")))
    merge_and_unload(model)  # finite: fine
    bad = nn.Sequential(GloraLinear(nn.Linear(4, 4), LayerChoice("vector", "none", "none", "none", "none")))
    with torch.no_grad():
        bad[0].A[1] = float("inf")
    with pytest.raises(FloatingPointError, match="non-finite"):
        merge_and_unload(bad)


def test_set_choice_drops_the_folded_weight():
    torch.manual_seed(0)
    layer = SuperGloraLinear(nn.Linear(8, 5), max_rank=2)
    with torch.no_grad():
        for p in layer.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape) * 0.3)
    layer.eval()
    x = torch.randn(3, 8)
    layer.set_choice(LayerChoice("vector", "lora_2", "vector", "scalar", "vector"))
    layer.freeze_merged()
    with torch.no_grad():
        folded = layer(x)
        layer.set_choice(LayerChoice())  # every tensor none: the base layer
        plain = layer(x)
    torch.testing.assert_close(plain, layer.base_layer(x))
    assert (folded - plain).abs().max() > 1e-3


@pytest.mark.parametrize("B", ["none", "lora", "vector"])
def test_small_A_survives_bf16_autocast(B):
    """Under bf16 autocast a small vector/scalar A changes the output as it does in fp32 (1 + A rounded to bf16
    would be exactly 1)."""
    torch.manual_seed(0)
    x, W, b = torch.randn(16, 64), torch.randn(32, 64) / 8, torch.randn(32)
    Bs = {"none": None, "lora": Lora(torch.randn(32, 2) * 0.01, torch.randn(2, 64)),
          "vector": torch.randn(32) * 1e-3}[B]
    for A in (torch.full((32,), 1e-3), torch.full((1,), -2e-3)):
        zero = torch.zeros_like(A)
        ref = glora_linear(x, W, b, A, Bs, None, None, None) - glora_linear(x, W, b, zero, Bs, None, None, None)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = (glora_linear(x, W, b, A, Bs, None, None, None).float()
                   - glora_linear(x, W, b, zero, Bs, None, None, None).float())
        assert (got - ref).abs().max() < 0.05 * ref.abs().max(), (got - ref).abs().max()
