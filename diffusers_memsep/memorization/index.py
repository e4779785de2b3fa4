"""Exact Euclidean k-nearest-neighbour search over a training set: the reference every memorization check needs.

The paper's memorization rule (Ye et al. 2025, Section 4) compares a generated sample with its nearest and
second-nearest training points, so the index must be *exact*: an approximate index that misses the true nearest
neighbour would silently under-count copies.

Search is a chunked matrix product. For a query ``a`` and a training point ``b``,
``||a - b||^2 = ||a||^2 - 2 a.b + ||b||^2``; ``||a||^2`` is the same for every ``b``, so ranking needs only
``||b||^2 - 2 a.b`` (one ``addmm`` per chunk of training points into a reused buffer, with the norms ``||b||^2``
computed once). Each chunk's best candidates are picked through group minima (one vectorised pass, then ``topk``
over a small fraction of the entries), so the selection costs little next to the matrix product. The expansion
loses precision to cancellation in float32, so each query keeps a few spare candidates; the candidates that a
float32 rounding-error bound cannot rule out get their distances recomputed directly as ``sum((a - b)^2)`` and
re-sorted, and a query whose candidate list cannot be proven (by the same bound) to contain its true k nearest is
searched again in float64. Results are therefore the exact nearest neighbours, not approximate ones.
"""

from __future__ import annotations

import json
import math
import os
from typing import Literal, Sequence

import torch
from diffusers import ConfigMixin, ModelMixin
from safetensors.torch import load_file, save_file

from ..distributed import all_gather_cat, rank_and_world_size
from ..utils import atomic_path

# `ModelMixin` must stay a name of this module: DiffusionPipeline.from_pretrained finds a component's load method by
# looking up `ModelMixin` in the module recorded in model_index.json (see diffusers pipeline_loading_utils).
__all__ = ["NearestNeighborIndex", "ModelMixin", "sharded_search"]

# float32 unit roundoff; the cancellation bound below is a multiple of it.
_FLOAT32_EPS = 2.0**-24


class NearestNeighborIndex(ModelMixin, ConfigMixin):
    r"""
    Exact k-nearest-neighbour index (squared Euclidean distance) over a fixed set of training samples.

    It is a diffusers model component: inside a :class:`~diffusers_memsep.MemSepPipeline` it is saved by
    ``save_pretrained`` in its own sub-folder (``config.json`` + ``diffusion_pytorch_model.safetensors``, the samples
    being a persistent buffer) and re-loaded by ``from_pretrained``; ``pipe.to(device)`` moves it. On its own, use
    :meth:`save` / :meth:`load` (one safetensors file).

    Args:
        images (`torch.Tensor`, *optional*):
            The training samples, ``[n, C, H, W]`` images (in the model's data space, e.g. ``[-1, 1]``) or ``[n, d]``
            vectors (Gaussian-mixture experiments). Any ``[n, ...]`` shape works: samples are flattened for search
            and ``sample_shape`` remembers the rest. Stored in float32.
        num_images (`int`, *optional*):
            With ``sample_shape`` and no ``images``: allocate an all-zero index to be filled by loading weights (this
            is how ``from_config``/``from_pretrained`` build it).
        sample_shape (`Sequence[int]`, *optional*):
            The shape of one sample, e.g. ``(1, 8, 8)``.
    """

    config_name = "config.json"

    def __init__(
        self,
        images: torch.Tensor | None = None,
        num_images: int | None = None,
        sample_shape: Sequence[int] | None = None,
    ):
        super().__init__()
        if images is not None:
            images = _as_samples(images, "images")
            if num_images is not None and num_images != images.shape[0]:
                raise ValueError(f"num_images={num_images} but images holds {images.shape[0]}; pass only images.")
            if sample_shape is not None and tuple(sample_shape) != tuple(images.shape[1:]):
                raise ValueError(
                    f"sample_shape={tuple(sample_shape)} but images have shape {tuple(images.shape[1:])}; "
                    "pass only images."
                )
            if not _all_finite(images):
                raise ValueError("images hold NaN or infinite values; clean the training data before indexing it.")
            num_images, sample_shape = images.shape[0], tuple(images.shape[1:])
            images = images.detach().to(torch.float32).clone()
        elif num_images is None or sample_shape is None:
            raise ValueError(
                "NearestNeighborIndex needs `images` (a tensor [n, ...]) or both num_images and sample_shape."
            )
        else:
            images = torch.zeros(int(num_images), *[int(s) for s in sample_shape])
        if num_images < 2:
            raise ValueError(
                f"The reference holds {num_images} image(s); the memorization rule compares the nearest and the "
                "second-nearest training image, so build it from at least 2 training images."
            )
        # Registered by hand (not with @register_to_config): the tensor argument must not enter config.json.
        self.register_to_config(num_images=int(num_images), sample_shape=[int(s) for s in sample_shape])
        self.register_buffer("images", images, persistent=True)
        # ||b||^2 of every training sample, derived data: recomputed on demand, never saved.
        self.register_buffer("_squared_norms", None, persistent=False)
        self._faiss_index = None

    @classmethod
    def from_images(cls, images: torch.Tensor) -> "NearestNeighborIndex":
        """Build the index from training samples ``[n, ...]`` (images ``[n, C, H, W]`` or vectors ``[n, d]``)."""
        return cls(images=images)

    @property
    def num_images(self) -> int:
        return int(self.images.shape[0])

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.images.shape[1:])

    @property
    def dim(self) -> int:
        return math.prod(self.sample_shape)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._squared_norms, self._faiss_index = None, None  # new samples: drop the derived data

    def _apply(self, fn, recurse=True):
        self._squared_norms = None  # recomputed on the new device/dtype at the next search
        return super()._apply(fn, recurse)

    # ----------------------------------------------------------------------------------------------------- search
    @torch.no_grad()
    def search(
        self,
        queries: torch.Tensor,
        k: int = 2,
        *,
        backend: Literal["torch", "faiss"] = "torch",
        chunk_size: int = 4096,
        query_chunk_size: int = 4096,
        spare_candidates: int = 8,
        nonfinite: Literal["raise", "skip"] = "raise",
    ) -> tuple[torch.Tensor, torch.Tensor]:
        r"""
        The ``k`` nearest training samples of every query, exactly.

        Args:
            queries (`torch.Tensor`): ``[B, *sample_shape]`` or already flattened ``[B, d]``; any dtype/device
                (moved to the index's device, computed in float32).
            k (`int`, defaults to 2): neighbours per query; ``2 <= k <= num_images`` (the memorization rule needs
                the first and the second nearest).
            backend (`str`): ``"torch"`` (chunked matmul, CPU or GPU) or ``"faiss"`` (``faiss.IndexFlatL2``, when
                installed; its candidates get the same exact re-ranking).
            chunk_size (`int`): training samples per matmul block; bounds peak memory to about
                ``query_chunk_size * chunk_size`` floats.
            query_chunk_size (`int`): queries per block.
            spare_candidates (`int`): extra candidates kept per query for the exact re-ranking.
            nonfinite (`str`, defaults to ``"raise"``): what to do with a query holding NaN or infinite values (a
                diverged sample), which has no nearest neighbour: ``"raise"`` a ValueError, or ``"skip"`` it, giving
                its row distances NaN and indices -1 (the other queries are searched as usual).

        Returns:
            ``(squared_distances, indices)``: float32 ``[B, k]`` sorted ascending, and int64 ``[B, k]`` rows of the
            training set (NaN and -1 on skipped rows).
        """
        if k < 2:
            raise ValueError(
                f"k={k}: the memorization rule compares the nearest and second-nearest samples, use k >= 2."
            )
        if k > self.num_images:
            raise ValueError(
                f"k={k} but the reference holds only {self.num_images} images; use k <= {self.num_images}."
            )
        if chunk_size < 1 or query_chunk_size < 1 or spare_candidates < 0:
            raise ValueError("chunk_size and query_chunk_size must be >= 1 and spare_candidates >= 0.")
        if nonfinite not in ("raise", "skip"):
            raise ValueError(f"nonfinite={nonfinite!r}; choose 'raise' or 'skip'.")
        queries = self.flatten_queries(queries)
        self.check_scale(queries)
        finite = torch.isfinite(queries).all(1)
        if not bool(finite.all()):
            if nonfinite == "raise":
                raise ValueError(
                    f"{int((~finite).sum())} of {queries.shape[0]} queries hold NaN or infinite values and have no "
                    "nearest neighbour; pass nonfinite='skip' to leave them out (distances NaN, indices -1)."
                )
            distances = queries.new_full((queries.shape[0], k), float("nan"))
            indices = torch.full((queries.shape[0], k), -1, dtype=torch.long, device=queries.device)
            if bool(finite.any()):
                kept = finite.nonzero().squeeze(1)
                distances[kept], indices[kept] = self.search(
                    queries[kept], k, backend=backend, chunk_size=chunk_size, query_chunk_size=query_chunk_size,
                    spare_candidates=spare_candidates)
            return distances, indices
        self.last_search_fallbacks = 0  # queries re-searched in float64 (diagnostics for tests and benchmarks)
        num_candidates = min(self.num_images, k + spare_candidates)
        # Distances are always computed in float32, even if the pipeline was loaded in half precision.
        database = self.images.reshape(self.num_images, -1).float()
        if backend == "faiss":
            candidates = self._faiss_candidates(queries, num_candidates)
            return self._rerank(queries, candidates, k, database, verify=None)
        if backend != "torch":
            raise ValueError(f"backend={backend!r}; choose 'torch' or 'faiss'.")
        if self._squared_norms is None:
            # row by row in blocks: database.square() would allocate a second copy of the whole training set
            self._squared_norms = torch.cat([block.square().sum(1) for block in database.split(chunk_size)])
        distances, indices = [], []
        for start in range(0, queries.shape[0], query_chunk_size):
            block = queries[start : start + query_chunk_size]
            scores, candidates = self._partial_scores_topk(block, database, num_candidates, chunk_size)
            # re-rank 256 queries at a time: the gathered candidates take 256 x num_candidates x d floats
            for part in range(0, block.shape[0], 256):
                d, i = self._rerank(
                    block[part : part + 256], candidates[part : part + 256], k, database, scores[part : part + 256]
                )
                distances.append(d)
                indices.append(i)
        return torch.cat(distances), torch.cat(indices)

    def value_range(self) -> tuple[float, float, float]:
        """``(min, max, share of negative values)`` of the training samples (cached until they change)."""
        images = self.images
        key = (images.data_ptr(), images._version, tuple(images.shape))
        cached = self.__dict__.get("_value_range")
        if cached is None or cached[0] != key:
            low, high = float(images.min()), float(images.max())
            negative = float((images < 0).float().mean())
            cached = (key, (low, high, negative))
            self.__dict__["_value_range"] = cached
        return cached[1]

    def check_scale(self, queries: torch.Tensor) -> None:
        """Refuse image queries on another scale than the reference (images only: ``[C, H, W]`` samples).

        The distances of the memorization rule are only meaningful in the reference's space: exact copies on the
        ``[0, 1]`` or ``0..255`` scale searched against ``[-1, 1]`` training images are never found (0% memorized,
        silently). Two signs are refused: values more than 10 ranges beyond the reference's range (``0..255`` against
        ``[-1, 1]``; an unclamped sample a little outside the range passes),
        and no negative value at all when at least a quarter of the reference's values are negative (``[0, 1]``
        against ``[-1, 1]``: a model of ``[-1, 1]`` images draws negative values).
        """
        if len(self.sample_shape) != 3:
            return  # feature vectors or other spaces: no image scale to check
        finite = queries[torch.isfinite(queries)]
        if finite.numel() == 0:
            return
        low, high, negative = self.value_range()
        span = max(high - low, 1e-6)
        q_low, q_high = float(finite.min()), float(finite.max())
        expected = f"[{low:.3g}, {high:.3g}]"
        hint = " (x * 2 - 1 for [0, 1] images, x / 127.5 - 1 for 0..255)" if low < -0.5 and high <= 1.01 else ""
        if q_high > high + 10 * span or q_low < low - 10 * span:  # far beyond any sample of a diverging model
            raise ValueError(f"the samples' values span [{q_low:.3g}, {q_high:.3g}] but the reference's training "
                             f"images lie in {expected}; put the samples on the reference's scale{hint} before "
                             "checking them for copies.")
        if negative >= 0.25 and q_low >= 0 and low < -0.5 and q_high <= max(high, 1.0) + 1e-3:
            raise ValueError(f"the samples have no negative value ([{q_low:.3g}, {q_high:.3g}]) but the reference's "
                             f"training images lie in {expected}: they look like [0, 1] images; put them on the "
                             f"reference's scale{hint} before checking them for copies.")

    def flatten_queries(self, queries: torch.Tensor) -> torch.Tensor:
        """Queries as float32 ``[B, d]`` on the index's device; raises when their shape does not match the samples."""
        if not isinstance(queries, torch.Tensor):
            raise TypeError(f"queries must be a torch.Tensor, got {type(queries).__name__}.")
        if queries.ndim == 0:
            raise ValueError("queries must have a batch dimension: [B, *sample_shape] or [B, d].")
        batch_shape = tuple(queries.shape[1:])
        if batch_shape != self.sample_shape and batch_shape != (self.dim,):
            raise ValueError(
                f"queries have sample shape {batch_shape} but the reference holds samples of shape {self.sample_shape}"
                f" ({self.dim} values); compare samples in the same space and resolution as the training images."
            )
        if queries.shape[0] == 0:
            raise ValueError("queries are empty; pass at least one sample.")
        return queries.reshape(queries.shape[0], -1).to(device=self.images.device, dtype=torch.float32)

    def _partial_scores_topk(self, queries, database, num_candidates, chunk_size):
        """Smallest ``||b||^2 - 2 a.b`` (the squared distance minus ``||a||^2``) over all training samples.

        One ``addmm`` per chunk of training samples writes the chunk's scores into a reused buffer (no allocation,
        no page faults per chunk); the running ``num_candidates`` best are merged with each chunk's best, picked by
        :func:`_smallest_columns` at a small fraction of the matrix product's cost.
        """
        num_queries = queries.shape[0]
        buffer = queries.new_empty(num_queries * min(chunk_size, database.shape[0]))
        best_scores = best_indices = None
        for start in range(0, database.shape[0], chunk_size):
            block = database[start : start + chunk_size]
            scores = buffer[: num_queries * block.shape[0]].view(num_queries, block.shape[0])
            # addmm fuses the bias ||b||^2 into the matrix product: one pass over the [B, chunk] scores.
            torch.addmm(self._squared_norms[start : start + chunk_size], queries, block.T, alpha=-2.0, out=scores)
            scores, indices = _smallest_columns(scores, min(num_candidates, block.shape[0]))
            indices += start
            if best_scores is not None:
                scores, indices = torch.cat([best_scores, scores], 1), torch.cat([best_indices, indices], 1)
                scores, order = scores.topk(min(num_candidates, scores.shape[1]), dim=1, largest=False, sorted=False)
                indices = indices.gather(1, order)
            best_scores, best_indices = scores, indices
        return best_scores, best_indices

    def _rerank(self, queries, candidates, k, database, verify):
        """Exact distances of the candidates, sorted; queries whose candidates may miss a true neighbour are redone
        in float64 over the whole set.

        ``verify``: the candidates' float32 scores (``||b||^2 - 2 a.b``), or None (faiss: re-rank every candidate).
        """
        query_norms = queries.square().sum(1)
        if verify is not None:
            # err bounds the float32 expansion's rounding error on a score (each way). A candidate scored more than
            # 2 err above the k-th smallest score is truly farther than the k best-scored candidates (its true
            # score > k-th score + err >= theirs), so only the candidates below that line need exact distances:
            # usually k or a few more, instead of every spare candidate.
            err = self._rounding_bound(query_norms, database.shape[1])
            verify, order = verify.sort(dim=1)
            candidates = candidates.gather(1, order)
            needed = int((verify <= verify[:, k - 1 : k] + 2 * err[:, None]).sum(1).max())
            ranked = candidates[:, :needed]
        else:
            ranked = candidates
        # Direct differences (no expansion, so no cancellation); cdist's non-matmul mode computes them in one pass.
        gathered = database.index_select(0, ranked.reshape(-1)).view(*ranked.shape, -1)
        exact = torch.cdist(queries[:, None, :], gathered, compute_mode="donot_use_mm_for_euclid_dist")
        exact, order = exact.squeeze(1).square().sort(dim=1)
        distances, indices = exact[:, :k], ranked.gather(1, order[:, :k])
        if verify is None or candidates.shape[1] == database.shape[0]:
            return distances, indices
        # Every excluded sample scored >= the worst kept score s_max in float32; its true score is at least
        # s_max - err. If that already exceeds the k-th exact score (distance - ||a||^2), no excluded sample can be
        # nearer than the k-th found one.
        unsure = verify[:, -1] - err <= distances[:, -1] - query_norms + err
        self.last_search_fallbacks += int(unsure.sum())
        if unsure.any():
            redo = unsure.nonzero().squeeze(1)
            distances[redo], indices[redo] = _float64_topk(queries[redo], database, k, chunk_size=4096)
        return distances, indices

    def _rounding_bound(self, query_norms, dim):
        """Per query, a bound on the float32 rounding error of a score ``||b||^2 - 2 a.b`` against any sample b."""
        max_norm = self._squared_norms.max().sqrt()
        return 2 * dim * _FLOAT32_EPS * (query_norms.sqrt() + max_norm).square()

    def _faiss_candidates(self, queries, num_candidates):
        try:
            import faiss
        except ImportError as error:
            raise ImportError("backend='faiss' needs faiss: `pip install faiss-cpu` (or faiss-gpu).") from error
        if self._faiss_index is None:
            self._faiss_index = faiss.IndexFlatL2(self.dim)
            self._faiss_index.add(self.images.reshape(self.num_images, -1).float().cpu().numpy())
        _, indices = self._faiss_index.search(queries.cpu().numpy(), num_candidates)
        return torch.from_numpy(indices).to(queries.device)

    # ------------------------------------------------------------------------------------------- stand-alone files
    def save(self, path: str | os.PathLike) -> None:
        """Write the index to one safetensors file (atomically: a temporary file, then ``os.replace``)."""
        metadata = {"format": "pt", "sample_shape": json.dumps(list(self.sample_shape))}
        with atomic_path(path) as temporary:
            save_file({"images": self.images.detach().cpu().contiguous()}, str(temporary), metadata=metadata)

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> "NearestNeighborIndex":
        """Read an index written by :meth:`save`."""
        if not os.path.isfile(path):
            raise FileNotFoundError(f"No index file at {path}; write one with NearestNeighborIndex.save(path).")
        tensors = load_file(os.fspath(path), device=str(device))
        if "images" not in tensors:
            raise ValueError(f"{path} holds no 'images' tensor; it was not written by NearestNeighborIndex.save.")
        return cls(images=tensors["images"])

    def extra_repr(self) -> str:
        return f"num_images={self.num_images}, sample_shape={self.sample_shape}"


@torch.no_grad()
def sharded_search(shard: NearestNeighborIndex, offset: int, queries: torch.Tensor, k: int = 2, **search_kwargs
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    r"""
    Exact k nearest neighbours over a training set split across processes, each holding one contiguous shard.

    Every process calls this with the same ``queries`` and its own ``shard`` (the training rows
    ``[offset, offset + shard.num_images)``, e.g. ``shard_bounds(n)`` of :mod:`diffusers_memsep.distributed`). Each
    searches its shard exactly, the ``k`` best ``(distance, global index)`` of every process are gathered, and the
    ``k`` smallest of those are the ``k`` nearest of the whole set: the same answer as one index over all rows.
    Without a process group it is ``shard.search`` with indices shifted by ``offset``.

    Choices left open by the single-index case: exact distance ties between shards go to the smaller global index.

    Args:
        shard: this process's :class:`NearestNeighborIndex` (at least 2 rows, like every index).
        offset: global row number of the shard's first row.
        queries, k, search_kwargs: as for :meth:`NearestNeighborIndex.search` (identical on every process).

    Returns:
        ``(squared_distances, global_indices)``, ``[B, k]`` each, on every process.
    """

    if offset < 0:
        raise ValueError(f"offset={offset}: a shard's global offset is its first row number, >= 0.")
    distances, indices = shard.search(queries, k=min(k, shard.num_images), **search_kwargs)
    indices = indices + offset
    if rank_and_world_size()[1] == 1:
        return distances, indices
    # [world * B, k'] in rank order -> [B, world * k'] candidates per query
    num_queries = distances.shape[0]
    gathered_distances = all_gather_cat(distances).view(-1, num_queries, distances.shape[1])
    gathered_indices = all_gather_cat(indices).view(-1, num_queries, indices.shape[1])
    candidate_distances = gathered_distances.permute(1, 0, 2).reshape(num_queries, -1)
    candidate_indices = gathered_indices.permute(1, 0, 2).reshape(num_queries, -1)
    return merge_candidates(candidate_distances, candidate_indices, k)


def merge_candidates(distances: torch.Tensor, indices: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` smallest of per-shard candidates ``[B, c]`` (squared distances, global indices), sorted; exact
    distance ties go to the smaller global index, so the answer does not depend on how the rows were sharded."""
    if k > indices.shape[1]:
        raise ValueError(f"k={k} but the shards hold only {indices.shape[1]} images; use a smaller k.")
    # sort by index, then stably by distance: equal distances keep the smaller global index first
    by_index = indices.argsort(dim=1)
    distances, indices = distances.gather(1, by_index), indices.gather(1, by_index)
    order = distances.argsort(dim=1, stable=True)[:, :k]
    return distances.gather(1, order), indices.gather(1, order)


def _smallest_columns(scores: torch.Tensor, num: int, group: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``num`` smallest entries of each row of ``scores`` ``[B, c]`` and their columns (unsorted).

    ``topk`` over a whole row costs far more per entry than an element-wise minimum, so the ``c`` columns are
    split into ``c / group`` groups of ``group`` columns ``j, j + c/group, j + 2c/group, ...`` (strided, so the
    group minima are an element-wise ``amin`` over ``group`` contiguous slices: one vectorised pass), ``topk``
    picks the ``num`` groups with the smallest minima, and a last ``topk`` runs over the ``num * group`` entries
    of the picked groups. Exact: an entry outside the picked groups lies in a group whose minimum is >= every
    picked group's minimum, so ``num`` entries (one per picked group) are <= it, and the ``num`` returned entries
    are the row's ``num`` smallest values. In particular every entry not returned is >= every returned one, which
    the float32 rounding bound of :meth:`NearestNeighborIndex._rerank` relies on.
    """
    rows, columns = scores.shape
    if columns % group or columns < 8 * num * group:  # too few groups to gain anything: plain topk
        return scores.topk(num, dim=1, largest=False, sorted=False)
    stride = columns // group
    grouped = scores.view(rows, group, stride)  # grouped[r, i, j] = scores[r, i * stride + j]; group j
    picked = grouped.amin(1).topk(num, dim=1, largest=False, sorted=False).indices  # [B, num] group numbers
    members = grouped.gather(2, picked[:, None, :].expand(rows, group, num)).view(rows, group * num)
    values, position = members.topk(num, dim=1, largest=False, sorted=False)  # position = i * num + n
    return values, (position // num) * stride + picked.gather(1, position % num)


def _float64_topk(queries: torch.Tensor, database: torch.Tensor, k: int, chunk_size: int):
    """Brute-force k nearest in float64, block by block (never a float64 copy of the whole training set)."""
    queries = queries.double()
    best_distances = queries.new_empty(queries.shape[0], 0)
    best_indices = torch.empty(queries.shape[0], 0, dtype=torch.long, device=queries.device)
    for start in range(0, database.shape[0], chunk_size):
        block = database[start : start + chunk_size].double()
        rows = torch.arange(start, start + block.shape[0], device=queries.device).expand(queries.shape[0], -1)
        distances = torch.cat([best_distances, torch.cdist(queries, block).square()], 1)
        indices = torch.cat([best_indices, rows], 1)
        best_distances, order = distances.topk(min(k, distances.shape[1]), dim=1, largest=False)
        best_indices = indices.gather(1, order)
    return best_distances.float(), best_indices


def _all_finite(samples: torch.Tensor, chunk: int = 1024) -> bool:
    """NaN/inf check block by block: no full-size temporary (``isfinite`` on everything would allocate one)."""
    if not samples.is_floating_point():
        return True
    return all(bool(torch.isfinite(block).all()) for block in samples.reshape(samples.shape[0], -1).split(chunk))


def _as_samples(samples, name: str) -> torch.Tensor:
    if not isinstance(samples, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape [n, ...], got {type(samples).__name__}.")
    if samples.ndim < 2:
        raise ValueError(f"{name} must have shape [n, d] or [n, C, H, W], got {tuple(samples.shape)}.")
    if samples.shape[0] == 0:
        raise ValueError(f"{name} is empty (0 samples); the reference needs at least 2 training images.")
    if samples.is_complex() or not (
        samples.is_floating_point() or samples.dtype in (torch.uint8, torch.int64, torch.int32)
    ):
        raise TypeError(f"{name} must hold real numbers, got dtype {samples.dtype}.")
    return samples
