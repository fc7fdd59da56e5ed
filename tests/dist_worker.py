"""``fit`` on a tiny supernet with plain SGD, run by ``tests/test_dist.py`` in one process and under torchrun.

SGD (momentum and weight decay) is linear in the gradient, so the weights of a data-parallel run match those of
one process to float reduction order at every step; AdamW divides each gradient by its own running magnitude,
which turns rounding noise in near-zero gradient entries into differences up to the learning rate.

    python tests/dist_worker.py OUT N_TRAIN...            # one process (N_TRAIN + "f": fair paths, + "s": sandwich)
    torchrun --nproc_per_node 2 tests/dist_worker.py OUT N_TRAIN...  # same weights, written by rank 0
"""
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
for _p in (str(HERE.parent), str(HERE)):
    if _p not in sys.path:
        sys.path.insert(0, _p)


def sgd_for(named_params, lr, weight_decay, head_names=frozenset(), head_lr_scale=1.0):
    groups = [{"params": list(named_params.values()), "lr": lr, "lr_scale": 1.0, "weight_decay": weight_decay}]
    return torch.optim.SGD(groups, lr=lr, momentum=0.9)


def run(out: str, n_train: int = 44, fair: bool = False, sandwich: bool = False) -> dict:
    """``fair``: each step trains the ``fair_width`` paths of ``SearchSpace.fair_paths`` (gradients averaged);
    ``sandwich``: the largest path on the labels, then two random paths distilled from it."""
    import glora.core.trainer as trainer
    from glora.core import dist
    from glora.core.engine import InMemorySplit
    from supernet.wrapper import GloraSupernet
    from conftest import tiny_vit

    torch.manual_seed(0)
    sn = GloraSupernet(tiny_vit(num_classes=5))
    g = torch.Generator().manual_seed(1)
    train = InMemorySplit(torch.randn(n_train, 3, 32, 32, generator=g), torch.randint(0, 5, (n_train,), generator=g))
    named = {n: p for n, p in sn.model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in named.items()}
    spec = trainer.FitSpec(epochs=2, lr=0.05, weight_decay=0.1, batch_size=8, seed=3, desc="sgd",
                           paths_per_step=sn.space.fair_width if fair else 3 if sandwich else 1, distill=sandwich)
    paths = []

    def before_step(step):
        if fair:
            paths[:] = sn.space.fair_paths(np.random.default_rng([0, step]))
        elif sandwich:
            paths[:] = [sn.space.largest(), sn.space.path(0, 2 * step), sn.space.path(0, 2 * step + 1)]
        else:
            sn.sample_path(0, step)
    tag = f"{n_train}{'f' if fair else 's' if sandwich else ''}"
    original, trainer.optimizer_for = trainer.optimizer_for, sgd_for
    try:
        trainer.fit(sn, named, train, spec, Path(out) / f"fit-{tag}", torch.device("cpu"), progress=False,
                    before_step=before_step, before_pass=lambda step, k: paths and sn.set_subnet(paths[k]))
    finally:
        trainer.optimizer_for = original
    state = {n: p.detach().clone() for n, p in named.items()}
    untouched = sorted(n for n in named if torch.equal(state[n], before[n]))
    if dist.is_main():
        torch.save({"params": state, "untouched": untouched}, Path(out) / f"weights-{tag}.pt")
    return state


if __name__ == "__main__":
    from glora.core import dist
    dist.init("cpu", batch_size=8)
    try:
        for n in sys.argv[2:]:  # "44": one path a step; "44f": fair paths; "44s": sandwich with distillation
            run(sys.argv[1], int(n.rstrip("fs")), fair=n.endswith("f"), sandwich=n.endswith("s"))
    finally:
        dist.cleanup()
