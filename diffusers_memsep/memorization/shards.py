"""A training-set reference larger than memory: safetensors shards on disk, searched one shard at a time.

:func:`save_reference_shards` writes the training images chunk by chunk (e.g. from
``StreamingTrainingData.iter_chunks``) as ``reference-<i>.safetensors`` files plus ``shards.json``;
:class:`ShardedReference` answers the same exact top-k queries as one :class:`NearestNeighborIndex` over all rows,
loading one shard at a time through safetensors' memory map, so building and searching need memory for one shard,
not for the whole set (measured in ``benchmarks/bench_reference_shards.py``). Shards spread over processes instead
with :func:`~diffusers_memsep.memorization.sharded_search`.
"""

from __future__ import annotations

import ctypes
import json
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors.torch import load, save_file

from ..utils import atomic_path, write_text
from .index import NearestNeighborIndex, merge_candidates

SHARD_INDEX = "shards.json"


def save_reference_shards(chunks: Iterable[torch.Tensor], folder: str | os.PathLike) -> Path:
    """Write every chunk of training images (``[m, ...]``, in order) as one shard; ``shards.json`` comes last.

    Only one chunk is in memory at a time. Each shard is written atomically; a folder with ``shards.json`` is
    complete. Raises ValueError for chunks of different sample shapes or non-finite values.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shards, offset, sample_shape = [], 0, None
    for number, chunk in enumerate(chunks):
        chunk = chunk.detach().to("cpu", torch.float32).contiguous()
        if sample_shape is None:
            sample_shape = list(chunk.shape[1:])
        if list(chunk.shape[1:]) != sample_shape or chunk.shape[0] == 0:
            raise ValueError(f"chunk {number} holds samples of shape {tuple(chunk.shape)}; every chunk must hold "
                             f"at least one sample of shape {tuple(sample_shape)}.")
        if not torch.isfinite(chunk).all():
            raise ValueError(f"chunk {number} holds NaN or infinite values; a reference holds real training images.")
        name = f"reference-{number:05d}.safetensors"
        with atomic_path(folder / name) as temporary:
            save_file({"images": chunk}, str(temporary))
        shards.append({"file": name, "offset": offset, "num_images": chunk.shape[0]})
        offset += chunk.shape[0]
        del chunk
        _release_freed_memory()
    if offset < 2:
        raise ValueError("a reference needs at least 2 training images.")
    write_text(folder / SHARD_INDEX, json.dumps({"num_images": offset, "sample_shape": sample_shape,
                                                  "shards": shards}, indent=1))
    return folder


class ShardedReference:
    """Exact k-nearest-neighbour search over the shards written by :func:`save_reference_shards`."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        index = self.folder / SHARD_INDEX
        if not index.is_file():
            raise ValueError(f"{str(self.folder)!r} holds no {SHARD_INDEX}; write it with save_reference_shards.")
        layout = json.loads(index.read_text())
        self.num_images, self.sample_shape = int(layout["num_images"]), tuple(layout["sample_shape"])
        self.shards = [(self.folder / s["file"], int(s["offset"])) for s in layout["shards"]]

    def search(self, queries: torch.Tensor, k: int = 2, **search_kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """``(squared_distances, global_indices)`` ``[B, k]``, equal to one index over every row (ties to the
        smaller global index); ``search_kwargs`` go to :meth:`NearestNeighborIndex.search`."""
        candidate_distances, candidate_indices = [], []
        for path, offset in self.shards:
            images = load(path.read_bytes())["images"]  # this shard only; a plain read, freed before the next
            if images.shape[0] == 1:  # an index needs two rows: a one-row shard is its own exact answer
                flat = queries.reshape(queries.shape[0], -1).double()
                distances = (flat - images.reshape(1, -1).double()).square().sum(dim=1, keepdim=True).float()
                indices = torch.zeros_like(distances, dtype=torch.long)
            else:
                distances, indices = NearestNeighborIndex(images).search(queries, k=min(k, images.shape[0]),
                                                                         **search_kwargs)
            candidate_distances.append(distances.cpu())
            candidate_indices.append(indices.cpu() + offset)
            del images
            _release_freed_memory()
        return merge_candidates(torch.cat(candidate_distances, dim=1), torch.cat(candidate_indices, dim=1), k)


def _release_freed_memory() -> None:
    """Hand the freed shard buffers back to the system now (glibc keeps freed heap pages otherwise, and the peak
    memory of a search would then grow with the number of shards instead of staying one shard's worth)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, Windows, musl): nothing to do
        pass
