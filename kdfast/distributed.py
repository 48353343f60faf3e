"""torch.distributed helpers for the cache build and the trainer.

kdfast runs on PyTorch's own engine: launch with ``torchrun --nproc_per_node=K`` (multi-node:
the usual ``--nnodes/--node_rank/--rdzv_*`` flags) and the CLI initializes the process group
(gloo on CPU, nccl on CUDA). From Python, initialize it yourself; :func:`kdfast.cache.build_cache`
and :func:`kdfast.train.fit` then split their work across the ranks.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True inside an initialized process group of more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    return rank() == 0


def launched_by_torchrun() -> bool:
    """torchrun (torch.distributed.run) sets these for every worker it starts."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"))


def init_from_env(device: str | torch.device = "cpu") -> bool:
    """Initializes the default process group from torchrun's environment (backend nccl for a
    CUDA ``device``, gloo otherwise). Returns True if this call initialized it; False when not
    launched by torchrun, already initialized, or a world of one (nothing to split)."""
    if not launched_by_torchrun() or not dist.is_available() or dist.is_initialized():
        return False
    if int(os.environ["WORLD_SIZE"]) <= 1:
        return False
    device = torch.device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend=backend)
    return True


def shutdown() -> None:
    """Destroys the process group once every rank is done with it: a rank that tore down its
    gloo connections while a peer was still finishing a collective could abort that peer."""
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def broadcast_from_main(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (pickled by torch.distributed; only among our ranks)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_to_all(obj: Any) -> list:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not is_distributed():
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def run_on_main(fn, *args, **kwargs) -> Any:
    """Runs ``fn`` on rank 0 and returns its result on every rank; an exception raised there is
    raised on every rank (as RuntimeError with the same message) instead of leaving the other
    ranks waiting forever."""
    if not is_distributed():
        return fn(*args, **kwargs)
    outcome: tuple[bool, Any] = (True, None)
    error: Exception | None = None
    if is_main():
        try:
            outcome = (True, fn(*args, **kwargs))
        except Exception as exc:  # re-raised below, on every rank
            error = exc
            outcome = (False, f"{type(exc).__name__}: {exc}")
    ok, value = broadcast_from_main(outcome)
    if not ok:
        if error is not None:
            raise error
        raise RuntimeError(f"rank 0 failed: {value}")
    return value
