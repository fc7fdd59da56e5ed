"""Data parallelism on ``torch.distributed``, started by ``torchrun``.

Every rank runs the same program in lockstep on the same files: the same paths (drawn from ``(seed, step)``),
the same search decisions, the same global batches. What differs per rank is only which samples of each global
batch it computes (:func:`shard_range`); gradients and evaluation counts are summed over ranks, so a run gives
the answer of one process whatever the world size (up to float reduction order for the weights, exactly for
the counts). Only rank 0 writes files, logs and progress bars.

Without ``torchrun`` (no ``WORLD_SIZE`` above 1 in the environment) no process group is created and every
helper here is a no-op: one process behaves exactly as before.
"""
from __future__ import annotations

import contextlib
import datetime
import gc
import os
from typing import Iterable, Sequence

import torch
import torch.distributed as tdist

from .errors import UserError

_state = {"backend": None, "device": torch.device("cpu")}


class PeerFailed(UserError):
    """Raised on the other ranks when rank 0 failed inside :func:`main_first` (rank 0 reports the cause)."""


def env_world_size() -> int:
    """World size as ``torchrun`` announces it (1 without ``torchrun``); valid before :func:`init`."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def env_rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


def is_initialized() -> bool:
    return tdist.is_available() and tdist.is_initialized()


def world_size() -> int:
    return tdist.get_world_size() if is_initialized() else 1


def rank() -> int:
    return tdist.get_rank() if is_initialized() else env_rank()


def is_main() -> bool:
    """Rank 0 (also before the process group exists, from ``RANK``): the one rank that writes and prints."""
    return rank() == 0


def backend() -> str | None:
    return _state["backend"] if is_initialized() else None


def local_rank() -> int:
    try:
        return int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:
        return 0


def init(device: str = "auto", batch_size: int = 0, timeout_s: float = 1800.0) -> None:
    """Join the ``torchrun`` job when there is one (``WORLD_SIZE`` > 1); nothing otherwise.

    nccl when ``device`` resolves to CUDA (each rank takes ``cuda:LOCAL_RANK``), gloo on the CPU.
    ``batch_size`` (the global training batch) must divide by the world size."""
    n = env_world_size()
    if n <= 1 or is_initialized():
        return
    if batch_size and batch_size % n:
        raise UserError(f"data.batch_size {batch_size} is not divisible by the world size {n}; "
                        f"use a multiple of {n} (data.batch_size is the global batch, split over the ranks)")
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda:
        if not torch.cuda.is_available():
            raise UserError(f"device {device!r}: CUDA is not available here; use device: cpu or auto")
        if ":" in device:
            raise UserError(f"device {device!r} names one GPU, but under torchrun each rank takes cuda:LOCAL_RANK; "
                            "use device: cuda or auto")
        if local_rank() >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local_rank()} has no GPU: this node has {torch.cuda.device_count()}; "
                            "lower --nproc_per_node")
        torch.cuda.set_device(local_rank())
        _state["device"] = torch.device("cuda", local_rank())
    be = "nccl" if cuda else "gloo"
    kwargs = {"device_id": _state["device"]} if cuda else {}
    tdist.init_process_group(backend=be, timeout=datetime.timedelta(seconds=timeout_s), **kwargs)
    _state["backend"] = be


def cleanup() -> None:
    if is_initialized():
        tdist.destroy_process_group()
        # gloo's finished work objects can sit in reference cycles with tensors; left to the collector at
        # interpreter exit they are freed while Python is half torn down, and the process aborts ("terminate
        # called without an active exception", one rerun in four on a loaded machine). Free them now.
        gc.collect()
    _state["backend"] = None
    _state["device"] = torch.device("cpu")


def comm_device() -> torch.device:
    """Where collective tensors live: the rank's GPU under nccl, the CPU under gloo."""
    return _state["device"]


def rank_device(device: torch.device) -> torch.device:
    """``device`` made rank-local: a CUDA device becomes ``cuda:LOCAL_RANK`` in a CUDA job."""
    if is_initialized() and device.type == "cuda" and _state["device"].type == "cuda":
        return _state["device"]
    return device


def barrier() -> None:
    if world_size() > 1:
        if _state["backend"] == "nccl":
            tdist.barrier(device_ids=[_state["device"].index])
        else:
            tdist.barrier()


def broadcast_object(obj):
    """Rank 0's ``obj`` on every rank."""
    if world_size() == 1:
        return obj
    box = [obj if is_main() else None]
    tdist.broadcast_object_list(box, src=0, device=comm_device() if _state["backend"] == "nccl" else None)
    return box[0]


def all_reduce_sum(values: Sequence[float], dtype: torch.dtype = torch.float64) -> list:
    """Element-wise sum of ``values`` over ranks (ints stay ints with an integer ``dtype``)."""
    if world_size() == 1:
        return list(values)
    t = torch.tensor(list(values), dtype=dtype, device=comm_device())
    tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t.tolist()


def all_reduce_grads(params: Iterable[torch.nn.Parameter]) -> None:
    """Sum the gradients of ``params`` over ranks, in place.

    A parameter that no rank gave a gradient keeps ``grad = None`` (so AdamW leaves it alone, as in one
    process); one that some rank did not reach (an empty shard) gets zeros there before the sum. The caller
    scales each rank's loss by its share of the global batch, so the sum is the one-process gradient."""
    if world_size() == 1:
        return
    params = [p for p in params if p.requires_grad]
    dev = comm_device()
    flags = torch.tensor([p.grad is not None for p in params], dtype=torch.int32, device=dev)
    tdist.all_reduce(flags, op=tdist.ReduceOp.SUM)
    used = [p for p, f in zip(params, flags.tolist()) if f > 0]
    for p in used:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    by_dtype: dict[tuple, list[torch.nn.Parameter]] = {}
    for p in used:
        by_dtype.setdefault((p.grad.dtype, p.grad.device), []).append(p)
    for group in by_dtype.values():
        flat = torch.cat([p.grad.reshape(-1) for p in group]).to(dev)
        tdist.all_reduce(flat, op=tdist.ReduceOp.SUM)
        offset = 0
        for p in group:
            n = p.grad.numel()
            p.grad.copy_(flat[offset:offset + n].view_as(p.grad))
            offset += n


def shard_range(n: int) -> tuple[int, int]:
    """This rank's contiguous part ``[lo, hi)`` of ``n`` items (parts differ by at most one item)."""
    w, r = world_size(), rank() if is_initialized() else 0
    return n * r // w, n * (r + 1) // w


def shard_indices(n: int) -> list[int]:
    """This rank's indices of a dataset of ``n`` items (every ``world_size``-th one), for streaming splits."""
    return list(range(rank() if is_initialized() else 0, n, world_size()))


@contextlib.contextmanager
def main_first():
    """The first rank of each node runs the block first (filling data folders and weight caches, which may be
    per node); the others run it once every first rank succeeded, and then find the files made. When one
    fails, every rank stops: the failing rank with the lowest number reports its error (``report_here``),
    the others raise :class:`PeerFailed` instead of waiting."""
    if world_size() == 1:
        yield
        return
    if local_rank() == 0:
        with together():
            yield
    else:
        _stop_if_a_peer_failed()
        yield


@contextlib.contextmanager
def together():
    """The block runs on every rank (checks that read files); when it fails on any rank, every rank stops: the
    failing rank with the lowest number reports its error (``report_here``), the others raise
    :class:`PeerFailed`, so no rank goes on to wait for one that stopped."""
    if world_size() == 1:
        yield
        return
    try:
        yield
    except BaseException as e:
        failed = failing_ranks(False)
        if failed and failed[0] == rank():
            e.report_here = True
        raise
    _stop_if_a_peer_failed()


def _stop_if_a_peer_failed() -> None:
    """This rank succeeded: learn whether another failed (a collective every rank enters once)."""
    failed = failing_ranks(True)
    if failed:
        raise PeerFailed(f"stopped: rank {failed[0]} failed (its message is above)")


def linger(seconds: float = 60.0) -> None:
    """On a rank that stops silently: wait (up to ``seconds``) for torchrun to end the job, so that rank 0
    prints its message before torchrun, seeing this rank exit first, stops it. torchrun's SIGTERM then ends
    this rank with exit code 2, the code of the error it stopped for."""
    if env_world_size() <= 1 or is_main():
        return
    import signal
    import time

    def _stop(signum, frame):
        raise SystemExit(2)
    signal.signal(signal.SIGTERM, _stop)
    time.sleep(seconds)


def reports(error: BaseException) -> bool:
    """Whether this rank prints ``error``: rank 0, or the rank that failed first on its own."""
    return bool(getattr(error, "report_here", False)) or is_main()


def failing_ranks(ok: bool) -> list[int]:
    """The ranks where ``ok`` is false (every rank gets the same list, so all can stop together)."""
    if world_size() == 1:
        return [] if ok else [0]
    oks = [None] * world_size()
    tdist.all_gather_object(oks, bool(ok))
    return [r for r, o in enumerate(oks) if not o]


def agree(value):
    """Rank 0's decision, on every rank (for choices read from files that must not split the ranks)."""
    return broadcast_object(value)


def on_main(fn):
    """``fn()`` run on rank 0 alone (a reading of files that decides what every rank does next), its value on
    every rank. When it raises, rank 0 raises that error and the others :class:`PeerFailed`: no rank waits."""
    if world_size() == 1:
        return fn()
    if is_main():
        try:
            value = fn()
        except BaseException:
            broadcast_object((False, None))
            raise
        return broadcast_object((True, value))[1]
    ok, value = broadcast_object(None)
    if not ok:
        raise PeerFailed("stopped: rank 0 failed (its message is above)")
    return value
