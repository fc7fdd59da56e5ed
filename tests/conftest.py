import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def tiny_vit(num_classes: int = 5, img_size: int = 32, depth: int = 2, **kw):
    """A random-weight ViT small enough for CPU tests."""
    import timm
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=num_classes, img_size=img_size,
                             patch_size=8, embed_dim=32, depth=depth, num_heads=2, **kw)


@pytest.fixture
def vit():
    torch.manual_seed(0)
    return tiny_vit().eval()


@pytest.fixture(scope="session")
def data_root(tmp_path_factory):
    """A generated dsprites_loc task in VTAB-1k layout, shared by the tests of a session."""
    root = tmp_path_factory.mktemp("vtab")
    from glora.data.offline import prepare_task
    prepare_task("dsprites_loc", root, seed=0)
    return root


@pytest.fixture
def cli(capsys):
    """Run the CLI in-process: returns (returncode, stdout, stderr) as a CompletedProcess."""
    import run_search

    def run(*args):
        code = run_search.main(list(args))
        out = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out.out, out.err)
    return run


def tiny_args(out, root, *extra):
    """CLI arguments of a seconds-long full run of configs/tiny.yaml on the generated task."""
    sets = [f"output_dir={out}", f"data.root={root}", "supernet.max_steps_per_epoch=6",
            "retrain.max_steps_per_epoch=6", "search.max_eval_batches=1", "data.eval_batch_size=100", *extra]
    args = ["--config", "tiny", "--no-progress"]
    for s in sets:
        args += ["--set", s]
    return args


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, data_root):
    """A finished tiny run (every stage), shared by the tests of a session: copy it before changing it."""
    import run_search
    out = tmp_path_factory.mktemp("run")
    assert run_search.main(tiny_args(out, data_root)) == 0
    return out
