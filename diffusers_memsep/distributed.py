"""Small helpers for running the same script on N processes (``accelerate launch`` / ``torchrun``).

Everything here reads the process group that ``torch.distributed`` already has (``accelerate``'s
``PartialState()`` or ``torch.distributed.init_process_group`` create it); nothing here creates one. Without an
initialised group every helper is the one-process identity, so library code can call them unconditionally.

Work is split in contiguous shards (:func:`shard_bounds`, :func:`split_work`): process ``r`` of ``N`` takes items
``[r * n // N, (r + 1) * n // N)``, so concatenating the per-process results in rank order restores the original
order (:func:`gather_on_main`, :func:`all_gather_cat`). Where each item's randomness comes from one shared stream
(head scoring), every process draws the items before its shard and skips them.

Work that only the main process does (e.g. what follows a split sampling pass, which writes caches) runs there
with :func:`main_process_result`, which hands its result to every process.

A command that joined the group leaves it with :func:`leave_process_group` when its work is done, as Accelerate's
``end_training`` does for training.

Collectives run on the device the backend needs (CUDA for NCCL, CPU otherwise); results come back on the input's
device.
"""

from __future__ import annotations

from typing import Callable, Sequence, TypeVar

import torch
import torch.distributed as dist

__all__ = ["rank_and_world_size", "is_main_process", "all_gather_cat", "gather_on_main", "main_process_result",
           "shard_bounds", "split_work", "leave_process_group"]

T = TypeVar("T")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_world_size() -> tuple[int, int]:
    """``(rank, number of processes)``; ``(0, 1)`` when no process group is initialised."""
    return (dist.get_rank(), dist.get_world_size()) if _distributed() else (0, 1)


def is_main_process() -> bool:
    return rank_and_world_size()[0] == 0


def _communication_device() -> torch.device:
    # NCCL only moves CUDA tensors; gloo (and MPI) move CPU tensors.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def shard_bounds(num_items: int, rank: int | None = None, world_size: int | None = None) -> tuple[int, int]:
    """``(start, stop)`` of the contiguous shard of ``num_items`` items that process ``rank`` of ``world_size``
    holds (default: this process). Shards differ in size by at most one item and cover every item once."""
    if rank is None or world_size is None:
        rank, world_size = rank_and_world_size()
    if not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} is outside 0..{world_size - 1}; pass a rank below world_size.")
    return rank * num_items // world_size, (rank + 1) * num_items // world_size


def split_work(items: Sequence[T]) -> Sequence[T]:
    """This process's contiguous share of ``items`` (e.g. the sampling seeds or batch indices of an evaluation);
    gather the per-process results with :func:`gather_on_main` or :func:`all_gather_cat`, which restore the order.
    """
    start, stop = shard_bounds(len(items))
    return items[start:stop]


def _padded_rows(tensor: torch.Tensor | None) -> tuple[torch.Tensor | None, list[int], torch.Size, torch.dtype]:
    """Exchange every process's row count (and the row shape/dtype, so a process with no work may pass None)."""
    meta = None if tensor is None else (tensor.shape[0], tuple(tensor.shape[1:]), tensor.dtype)
    metas = [None] * dist.get_world_size()
    dist.all_gather_object(metas, meta)
    known = [m for m in metas if m is not None]
    if not known:
        raise ValueError("every process passed None; at least one process must contribute a tensor.")
    row_shape, dtype = known[0][1], known[0][2]
    if any(m[1] != row_shape or m[2] != dtype for m in known):
        raise ValueError(f"processes contribute tensors of different row shapes or dtypes: {known}; "
                         "gather tensors that differ only in their first dimension.")
    counts = [0 if m is None else m[0] for m in metas]
    device = _communication_device()
    padded = torch.zeros(max(counts), *row_shape, dtype=dtype, device=device)
    if tensor is not None:
        padded[: tensor.shape[0]] = tensor.to(device)
    return padded, counts, row_shape, dtype


def all_gather_cat(tensor: torch.Tensor | None) -> torch.Tensor:
    """Every process's ``tensor`` concatenated along dim 0 in rank order, returned on every process.

    Row counts may differ between processes (a process with no rows may pass None). The result is on ``tensor``'s
    device (CPU for a process that passed None).
    """
    if not _distributed():
        if tensor is None:
            raise ValueError("tensor is None outside a distributed run; pass the rows to gather.")
        return tensor
    padded, counts, _, _ = _padded_rows(tensor)
    parts = [torch.empty_like(padded) for _ in counts]
    dist.all_gather(parts, padded)
    device = tensor.device if tensor is not None else torch.device("cpu")
    return torch.cat([part[:count] for part, count in zip(parts, counts)]).to(device)


def gather_on_main(tensor: torch.Tensor | None) -> torch.Tensor | None:
    """Like :func:`all_gather_cat`, but only the main process (rank 0) receives the result; others get None.

    Only rank 0 holds all rows, so memory elsewhere stays at one share (evaluation samples can be large).
    """
    if not _distributed():
        return all_gather_cat(tensor)
    padded, counts, _, _ = _padded_rows(tensor)
    rank = dist.get_rank()
    parts = [torch.empty_like(padded) for _ in counts] if rank == 0 else None
    dist.gather(padded, parts, dst=0)
    if rank != 0:
        return None
    device = tensor.device if tensor is not None else torch.device("cpu")
    return torch.cat([part[:count] for part, count in zip(parts, counts)]).to(device)


def main_process_result(function: Callable[[], T]) -> T:
    """``function()`` run on the main process only, its result (picklable) returned on every process.

    For work that must not run N times (it writes a cache, or is cheap next to what was split): the others wait for
    it. When it raises on the main process, the main process re-raises and every other process raises a
    RuntimeError naming the error, instead of waiting for a result that never comes.
    """
    if not _distributed():
        return function()
    payload = [None]
    if dist.get_rank() == 0:
        try:
            payload = [(function(), None)]
        except Exception as error:
            dist.broadcast_object_list([(None, f"{type(error).__name__}: {error}")], src=0,
                                       device=_communication_device())
            raise
    dist.broadcast_object_list(payload, src=0, device=_communication_device())
    result, failure = payload[0]
    if failure is not None:
        raise RuntimeError(f"the main process failed ({failure}); its own error output has the traceback.")
    return result


def leave_process_group() -> None:
    """Wait for every process, then destroy the process group (no-op for one process).

    A process that exits while the group is alive can abort in the backend's threads ("terminate called without an
    active exception", SIGABRT), failing a run whose work was all done; the barrier keeps the others alive until the
    main process has written its outputs.
    """
    if _distributed():
        dist.barrier()
        dist.destroy_process_group()
