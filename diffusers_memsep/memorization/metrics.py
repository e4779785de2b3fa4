"""Memorization ratio (the paper's 1/3 rule), precision/recall (Kynkaanniemi et al. 2019), Frechet distance and the
KID formula (Binkowski et al. 2018).

All functions take batches ``[B, ...]``: images ``[B, C, H, W]`` or vectors ``[B, d]`` (Gaussian mixtures).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from diffusers.utils import BaseOutput, logging

from .index import NearestNeighborIndex

logger = logging.get_logger(__name__)

__all__ = ["MemorizationResult", "memorization_report", "memorization_ratio", "precision_recall", "frechet_distance",
           "kernel_distance", "mmd2_unbiased"]

# The paper's rule: ||x - x_(1)|| <= (1/3) ||x - x_(2)||, i.e. squared distances within a factor 1/9.
PAPER_THRESHOLD = 1.0 / 3.0


@dataclass
class MemorizationResult(BaseOutput):
    """
    Per-sample verdict of the memorization rule.

    Args:
        memorized (`torch.BoolTensor` `[B]`): ``||x - x_(1)||^2 <= threshold^2 * ||x - x_(2)||^2``.
        distance_ratio (`torch.Tensor` `[B]`): ``||x - x_(1)||^2 / ||x - x_(2)||^2`` (squared, so the paper's cut is
            1/9); ``0`` when both distances are 0 (an exact copy of a duplicated training image).
        nearest_index (`torch.LongTensor` `[B]`): row of ``x_(1)`` in the training set, to show the copied image.
        nearest_distance (`torch.Tensor` `[B]`): ``||x - x_(1)||^2``.
        finite (`torch.BoolTensor` `[B]`): False for a sample holding NaN or infinite values (a diverged sample).
            Such a sample has no nearest neighbour: it is neither memorized nor "not memorized", so ``memorized`` is
            False, ``distance_ratio`` and ``nearest_distance`` are NaN and ``nearest_index`` is -1, and
            :attr:`ratio` leaves it out. Always look at :attr:`num_nonfinite` beside the ratio.
    """

    memorized: torch.Tensor
    distance_ratio: torch.Tensor
    nearest_index: torch.Tensor
    nearest_distance: torch.Tensor
    finite: torch.Tensor | None = None

    @property
    def num_nonfinite(self) -> int:
        """Samples with NaN or infinite values (left out of :attr:`ratio`)."""
        return 0 if self.finite is None else int((~self.finite).sum())

    @property
    def ratio(self) -> float:
        """Memorization ratio over the finite samples; NaN when no sample is finite."""
        memorized = self.memorized if self.finite is None else self.memorized[self.finite]
        return memorized.float().mean().item() if memorized.numel() else float("nan")


def _as_index(reference: NearestNeighborIndex | torch.Tensor) -> NearestNeighborIndex:
    if isinstance(reference, NearestNeighborIndex):
        return reference
    if isinstance(reference, torch.Tensor):
        return NearestNeighborIndex.from_images(reference)
    raise TypeError(
        "reference must be a NearestNeighborIndex or a tensor of training samples [n, ...], "
        f"got {type(reference).__name__}."
    )


@torch.no_grad()
def memorization_report(
    samples: torch.Tensor,
    index: NearestNeighborIndex | torch.Tensor,
    threshold: float = PAPER_THRESHOLD,
    **search_kwargs,
) -> MemorizationResult:
    r"""
    Flag generated samples that copy a training sample (Ye et al. 2025, Section 4).

    A sample ``x`` is memorized when ``||x - x_(1)||^2 <= threshold^2 ||x - x_(2)||^2`` with ``x_(k)`` its k-th
    nearest training sample in Euclidean distance; the paper uses ``threshold = 1/3``. Distances are computed in
    the space the samples and the index share (for images: the model's data range ``[-1, 1]``, pixel space).
    The comparison is ``<=``, so a sample that equals a training image that appears twice (both distances 0) counts
    as memorized.

    Args:
        samples: generated samples ``[B, *sample_shape]`` or ``[B, d]``.
        index: a :class:`NearestNeighborIndex`, or the training samples ``[n, ...]`` (an index is built on the fly).
        threshold: the distance (not squared) ratio below which a sample is a copy; in ``(0, 1]``.
        search_kwargs: passed to :meth:`NearestNeighborIndex.search` (e.g. ``backend="faiss"``).

    Samples holding NaN or infinite values get ``finite=False`` and are never counted as memorized nor as "not
    memorized" (see :class:`MemorizationResult`); a warning gives their number.
    """
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold={threshold}: use a distance ratio in (0, 1]; the paper's rule is 1/3.")
    index = _as_index(index)
    distances, indices = index.search(samples, k=2, nonfinite="skip", **search_kwargs)
    nearest, second = distances[:, 0].contiguous(), distances[:, 1].contiguous()
    finite = indices[:, 0] >= 0
    ratio = torch.where(
        second > 0, nearest / second.clamp_min(torch.finfo(second.dtype).tiny), torch.zeros_like(nearest)
    )
    ratio[~finite] = float("nan")
    if not bool(finite.all()):
        logger.warning(f"{int((~finite).sum())} of {len(finite)} samples hold NaN or infinite values: they are left "
                       "out of the memorization ratio (finite=False); the model or sampler diverged.")
    return MemorizationResult(
        memorized=(nearest <= threshold**2 * second) & finite,
        distance_ratio=ratio,
        nearest_index=indices[:, 0].contiguous(),
        nearest_distance=nearest.contiguous(),
        finite=finite,
    )


def memorization_ratio(
    samples: torch.Tensor, index: NearestNeighborIndex | torch.Tensor, threshold: float = PAPER_THRESHOLD, **kwargs
) -> float:
    """Fraction of the finite ``samples`` memorized by the paper's rule (see :func:`memorization_report`); samples
    with NaN or infinite values are left out (and counted in a warning); NaN when no sample is finite."""
    return memorization_report(samples, index, threshold, **kwargs).ratio


# --------------------------------------------------------------------------------------------- precision / recall
def _features_2d(features: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(features, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor [N, D], got {type(features).__name__}.")
    if features.ndim != 2:
        features = features.reshape(features.shape[0], -1) if features.ndim > 2 else features
    if features.ndim != 2 or features.shape[0] == 0:
        raise ValueError(f"{name} must have shape [N, D] with N >= 1, got {tuple(features.shape)}.")
    return features.to(torch.float32)


@torch.no_grad()
def _kth_neighbor_radius(features: torch.Tensor, k: int) -> torch.Tensor:
    """Squared distance of every point to its k-th nearest OTHER point of the same set (the point itself, at
    distance 0, is the 0th neighbour, as in the reference implementation of Kynkaanniemi et al.)."""
    distances, _ = NearestNeighborIndex.from_images(features).search(features, k=k + 1)
    return distances[:, k]


@torch.no_grad()
def _inside_any_ball(
    points: torch.Tensor, centers: torch.Tensor, radii: torch.Tensor, chunk: int = 2048
) -> torch.Tensor:
    """For each point: does some center c have ||point - c||^2 <= radius_c^2 ? (radii are squared already)."""
    inside = []
    for start in range(0, points.shape[0], chunk):
        d2 = torch.cdist(points[start : start + chunk], centers).square()
        inside.append((d2 <= radii[None, :]).any(1))
    return torch.cat(inside)


def precision_recall(real_features: torch.Tensor, fake_features: torch.Tensor, k: int = 3) -> tuple[float, float]:
    r"""
    Improved precision and recall of Kynkaanniemi et al. (2019), with k-NN radii.

    Each real feature vector gets a ball whose radius is the distance to its k-th nearest real neighbour; the real
    manifold is the union of these balls. Precision = fraction of fake samples inside the real manifold; recall =
    fraction of real samples inside the fake manifold (built the same way from the fakes). The paper notes that
    memorization inflates precision: copies of training images sit exactly on the real manifold.

    Args:
        real_features: ``[N, D]`` features (or raw samples, flattened) of real images.
        fake_features: ``[M, D]`` features of generated images, in the same feature space.
        k: neighbourhood size, ``1 <= k < min(N, M)``; the original paper uses 3.

    Returns:
        ``(precision, recall)`` as floats in ``[0, 1]``.

    A fake sample with NaN or infinite features (a diverged sample) lies on no manifold: it counts as outside the
    real one (it lowers precision) and adds no ball to the fake one. Real features must be finite.
    """
    real = _features_2d(real_features, "real_features")
    fake = _features_2d(fake_features, "fake_features").to(real.device)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(
            f"real features have {real.shape[1]} dimensions, fake ones {fake.shape[1]}; "
            "use the same feature extractor."
        )
    if not bool(torch.isfinite(real).all()):
        raise ValueError("real_features hold NaN or infinite values; clean the real images before measuring quality.")
    finite_fake = fake[torch.isfinite(fake).all(1)]
    nonfinite = fake.shape[0] - finite_fake.shape[0]
    if k >= 1 and real.shape[0] > k and finite_fake.shape[0] <= k and nonfinite:
        # more samples would not help: the model (or sampler) produces NaN or infinite samples
        raise ValueError(
            f"{nonfinite} of {fake.shape[0]} fake samples are NaN or infinite, leaving {finite_fake.shape[0]} finite "
            f"(k={k} needs more than {k}); the model or its sampler diverged: check the weights for NaN (retrain "
            "with a lower learning rate) rather than drawing more samples."
        )
    if k < 1 or k >= min(real.shape[0], finite_fake.shape[0]):
        raise ValueError(
            f"k={k} needs 1 <= k < min(#real, #finite fake) = {min(real.shape[0], finite_fake.shape[0])} "
            f"({fake.shape[0] - finite_fake.shape[0]} fake samples are not finite); use more samples or a smaller k."
        )
    inside_real = _inside_any_ball(finite_fake, real, _kth_neighbor_radius(real, k))
    precision = inside_real.float().sum().item() / fake.shape[0]
    recall = _inside_any_ball(real, finite_fake, _kth_neighbor_radius(finite_fake, k)).float().mean().item()
    return precision, recall


# ----------------------------------------------------------------------------------------------- Frechet distance
@torch.no_grad()
def _extract(
    samples: torch.Tensor, features: Callable[[torch.Tensor], torch.Tensor] | None, batch_size: int
) -> torch.Tensor:
    if features is None:
        return _features_2d(samples, "samples").double()
    chunks = [features(samples[start : start + batch_size]) for start in range(0, samples.shape[0], batch_size)]
    return _features_2d(torch.cat(chunks), "features(samples)").double()


def frechet_distance(
    real: torch.Tensor,
    fake: torch.Tensor,
    features: Callable[[torch.Tensor], torch.Tensor] | None = None,
    batch_size: int = 256,
) -> float:
    r"""
    Frechet distance between Gaussians fitted to two sets of feature vectors:
    ``||mu_r - mu_f||^2 + tr(S_r + S_f - 2 (S_r S_f)^{1/2})``.

    With ``features`` = Inception-v3 pool features this is the FID; with any other extractor it is a Frechet
    distance *in that feature space* and must be reported under that name (e.g. "Frechet distance in
    digits-classifier feature space", see :func:`~diffusers_memsep.memorization.load_digits_feature_extractor`).

    ``tr (S_r S_f)^{1/2}`` is computed as ``sum sqrt(eig(S_r^{1/2} S_f S_r^{1/2}))``: that matrix is symmetric
    positive semi-definite with the same eigenvalues as ``S_r S_f``, so a symmetric eigensolver in float64 gives
    the trace without the complex round-off of a general matrix square root.

    Args:
        real, fake: samples ``[N, ...]``; passed through ``features`` in batches of ``batch_size``, or used
            flattened as features when ``features`` is None. At least 2 of each.
        features: a callable mapping a batch of samples to ``[B, D]`` features.
    """
    real_f, fake_f = _extract(real, features, batch_size), _extract(fake, features, batch_size)
    if real_f.shape[1] != fake_f.shape[1]:
        raise ValueError(f"real features have {real_f.shape[1]} dimensions, fake ones {fake_f.shape[1]}.")
    if real_f.shape[0] < 2 or fake_f.shape[0] < 2:
        raise ValueError("frechet_distance needs at least 2 real and 2 fake samples to estimate covariances.")
    fake_f = fake_f.to(real_f.device)
    mu_r, mu_f = real_f.mean(0), fake_f.mean(0)
    cov_r, cov_f = torch.cov(real_f.T).reshape(real_f.shape[1], -1), torch.cov(fake_f.T).reshape(fake_f.shape[1], -1)
    sqrt_cov_r = _psd_sqrt(cov_r)
    cross = torch.linalg.eigvalsh(sqrt_cov_r @ cov_f @ sqrt_cov_r).clamp_min(0).sqrt().sum()
    value = (mu_r - mu_f).square().sum() + cov_r.trace() + cov_f.trace() - 2 * cross
    return max(value.item(), 0.0)


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    eigenvalues, eigenvectors = torch.linalg.eigh((matrix + matrix.T) / 2)
    return (eigenvectors * eigenvalues.clamp_min(0).sqrt()) @ eigenvectors.T


# --------------------------------------------------------------------------------------------------- KID formula
def _cubic_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (x @ y.T / x.shape[1] + 1).pow(3)


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> float:
    r"""Unbiased estimate of the squared MMD between the laws of ``x [m, d]`` and ``y [n, d]`` (m, n >= 2) with the
    cubic polynomial kernel ``k(a, b) = (a.b / d + 1)^3`` of KID (Binkowski et al. 2018), in float64:
    ``sum_{i!=j} k(x_i, x_j) / (m(m-1)) + sum_{i!=j} k(y_i, y_j) / (n(n-1)) - 2 sum_{i,j} k(x_i, y_j) / (mn)``."""
    x, y = x.double(), y.double()
    m, n = x.shape[0], y.shape[0]
    kxx, kyy = _cubic_kernel(x, x), _cubic_kernel(y, y)
    within_x = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    within_y = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return (within_x + within_y - 2 * _cubic_kernel(x, y).mean()).item()


def kernel_distance(real_features: torch.Tensor, fake_features: torch.Tensor, subset_size: int = 1000,
                    num_subsets: int = 100, seed: int = 0) -> tuple[float, float]:
    r"""
    The KID formula (Binkowski et al. 2018): the mean over ``num_subsets`` random subsets of
    :func:`mmd2_unbiased`, and its standard error.

    Each subset draws ``min(subset_size, #real, #fake)`` real and as many fake feature vectors without replacement
    (the subsets themselves are drawn independently, as in the reference implementation and torch-fidelity). With
    Inception-v3 features this is KID; in any other feature space report it as the KID formula *in that space*.

    Returns:
        ``(mean, standard_error)``: the standard error is the standard deviation over subsets divided by
        ``sqrt(num_subsets)``; it measures the subset draw only. The spread over sampling seeds is the other one
        to report. Unlike the Frechet distance, the estimate is unbiased in the number of samples (and may be
        slightly negative when the two laws are equal).
    """
    real = _features_2d(real_features, "real_features").double()
    fake = _features_2d(fake_features, "fake_features").double().to(real.device)
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"real features have {real.shape[1]} dimensions, fake ones {fake.shape[1]}.")
    size = min(subset_size, real.shape[0], fake.shape[0])
    if size < 2 or num_subsets < 1:
        raise ValueError("kernel_distance needs at least 2 real and 2 fake samples and num_subsets >= 1.")
    generator = torch.Generator().manual_seed(seed)
    values = torch.tensor([
        mmd2_unbiased(real[torch.randperm(real.shape[0], generator=generator)[:size].to(real.device)],
                      fake[torch.randperm(fake.shape[0], generator=generator)[:size].to(real.device)])
        for _ in range(num_subsets)], dtype=torch.float64)
    error = values.std().item() / math.sqrt(num_subsets) if num_subsets > 1 else float("nan")
    return values.mean().item(), error
