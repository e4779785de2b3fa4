"""The empirical score: the exact minimiser of the denoising score-matching loss on a finite training set.

With ``P_hat = (1/n) sum_i delta(x_i)``, the noised distribution is
``P_hat_t = (1/n) sum_i N(alpha_t x_i, sigma_t^2 I)``
and (paper, section 1)

    grad log p_hat_t(x) = -(1/sigma_t^2) sum_i w_i(x) (x - alpha_t x_i),
    w_i(x) = softmax_i( -||x - alpha_t x_i||^2 / (2 sigma_t^2) ),
    E[X_0 | X_t = x] = sum_i w_i(x) x_i.

Sampling with it only reproduces training points: it is the perfectly memorizing model.
"""

from __future__ import annotations

import math

import torch

from ._checks import check_points, check_time_positive
from .time import ou_alpha_sigma


class EmpiricalScore:
    """Score, denoiser and log-density of ``P_hat_t`` for a training set, at any time ``t > 0``.

    The softmax over the ``n`` training points is computed as an online (streaming) log-sum-exp over chunks of
    ``chunk_size`` points, as in flash attention: per chunk one matrix product gives the logits, one gives the
    weighted sum of points, and running maxima rescale what was accumulated so far. Memory is therefore
    ``O(batch x chunk_size)`` whatever ``n`` is, and the work is two GEMMs of the full size, nothing more.

    The logits use ``-||x - a x_i||^2 = -||x||^2 + 2a <x, x_i> - a^2 ||x_i||^2`` and drop the ``-||x||^2`` term, which
    is constant over ``i`` and cancels in the softmax; the squared norms ``||x_i||^2`` are computed once here.
    In float32 the expansion loses about ``eps * ||x|| ||x_i|| / sigma_t^2`` in each logit: at very small ``sigma_t``
    only near-ties between training points are affected, use float64 if their exact weights matter.

    Args:
        train: ``(n, d)`` training points (any further dimensions, e.g. ``(n, C, H, W)`` images, are flattened;
            queries must then have the same trailing shape and results come back in it).
        chunk_size: training points per chunk; ``None`` (default) picks ``max(1024, 2**22 // batch)`` per call, so
            a block of logits holds about 4M numbers (16 MB in float32): large enough that both GEMMs run at full
            speed (see ``benchmarks/bench_empirical_score.py``), small enough to bound memory whatever ``n`` is.

    Queries are moved to the device and dtype of ``train``; everything works on CPU and CUDA, float32 and float64.
    Results carry no gradient (computed under ``torch.no_grad``: the streaming pass works in place); the score is
    the exact gradient of :meth:`log_prob` already, so differentiating through it is rarely needed.
    """

    def __init__(self, train: torch.Tensor, chunk_size: int | None = None):
        if isinstance(train, torch.Tensor) and train.ndim > 2:
            self.point_shape = tuple(train.shape[1:])
            train = train.reshape(train.shape[0], -1)
        else:
            self.point_shape = None
        train = check_points(train, "train")
        if chunk_size is not None and int(chunk_size) < 1:
            raise ValueError(f"chunk_size must be a positive integer or None (got {chunk_size}).")
        self.train = train.contiguous()
        self.chunk_size = None if chunk_size is None else int(chunk_size)
        self._half_sq_norms = 0.5 * self.train.pow(2).sum(1)

    @property
    def num_points(self) -> int:
        return self.train.shape[0]

    @property
    def dim(self) -> int:
        return self.train.shape[1]

    def _queries(self, x: torch.Tensor) -> torch.Tensor:
        if self.point_shape is not None and isinstance(x, torch.Tensor) and tuple(x.shape[1:]) == self.point_shape:
            x = x.reshape(x.shape[0], -1)
        x = check_points(x, "x", self.dim)
        return x.to(device=self.train.device, dtype=self.train.dtype)

    def _restore(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.point_shape is None else y.reshape(y.shape[0], *self.point_shape)

    def _stream(self, x: torch.Tensor, t: float, keep_logits: bool):
        """One pass over the chunks: running max ``m``, normaliser ``sum exp(logit - m)``, the un-normalised weighted
        sum of points, and (on request) all logits ``(B, n)``."""
        alpha, sigma = ou_alpha_sigma(t)
        scale = alpha / sigma**2
        batch = x.shape[0]
        chunk_size = self.chunk_size or max(1024, 2**22 // batch)
        chunk_size = min(chunk_size, self.num_points)
        block = x.new_empty(batch * chunk_size)  # reused logits buffer: no allocation (or page faults) per chunk
        running_max = x.new_full((batch,), -math.inf)
        normaliser = x.new_zeros(batch)
        weighted_sum = x.new_zeros(batch, self.dim)
        all_logits = x.new_empty(batch, self.num_points) if keep_logits else None
        for start in range(0, self.num_points, chunk_size):
            points = self.train[start : start + chunk_size]
            logits = block[: batch * points.shape[0]].view(batch, points.shape[0])
            # logit_i = (a <x, x_i> - a^2 ||x_i||^2 / 2) / sigma^2 = -||x - a x_i||^2 / (2 sigma^2) + const(x)
            torch.addmm(self._half_sq_norms[start : start + chunk_size], x, points.T,
                        beta=-alpha * scale, alpha=scale, out=logits)
            if keep_logits:
                all_logits[:, start : start + points.shape[0]] = logits
            new_max = torch.maximum(running_max, torch.amax(logits, dim=1))
            correction = torch.exp(running_max - new_max)  # rescales what earlier chunks accumulated; 0 at start
            probabilities = logits.sub_(new_max[:, None]).exp_()
            normaliser = normaliser * correction + probabilities.sum(1)
            weighted_sum.mul_(correction[:, None]).addmm_(probabilities, points)
            running_max = new_max
        return running_max, normaliser, weighted_sum, all_logits

    @torch.no_grad()
    def denoise(self, x: torch.Tensor, t: float, return_weights: bool = False):
        """Tweedie's denoiser ``E[X_0 | X_t = x] = sum_i w_i(x) x_i`` ``(B, d)``; with ``return_weights`` also the
        softmax weights ``(B, n)`` (row ``b`` says which training points query ``b`` is copying; this costs
        ``O(B n)`` memory)."""
        t = check_time_positive(t)
        x = self._queries(x)
        running_max, normaliser, weighted_sum, logits = self._stream(x, t, keep_logits=return_weights)
        mean = self._restore(weighted_sum / normaliser[:, None])
        if not return_weights:
            return mean
        weights = torch.exp(logits - running_max[:, None]) / normaliser[:, None]
        return mean, weights

    @torch.no_grad()
    def score(self, x: torch.Tensor, t: float) -> torch.Tensor:
        """``grad log p_hat_t(x) = -(x - alpha_t E[X_0 | X_t = x]) / sigma_t^2`` ``(B, d)``."""
        t = check_time_positive(t)
        x = self._queries(x)
        alpha, sigma = ou_alpha_sigma(t)
        _, normaliser, weighted_sum, _ = self._stream(x, t, keep_logits=False)
        return self._restore(-(x - alpha * weighted_sum / normaliser[:, None]) / sigma**2)

    def __call__(self, x: torch.Tensor, t: float) -> torch.Tensor:
        return self.score(x, t)

    @torch.no_grad()
    def log_prob(self, x: torch.Tensor, t: float) -> torch.Tensor:
        """``log p_hat_t(x) = log (1/n) sum_i N(x; alpha_t x_i, sigma_t^2 I)`` ``(B,)``, same streaming pass."""
        t = check_time_positive(t)
        x = self._queries(x)
        _, sigma = ou_alpha_sigma(t)
        running_max, normaliser, _, _ = self._stream(x, t, keep_logits=False)
        return (running_max + torch.log(normaliser) - x.pow(2).sum(1) / (2 * sigma**2) - math.log(self.num_points)
                - 0.5 * self.dim * math.log(2 * math.pi * sigma**2))

    def __repr__(self) -> str:
        return f"EmpiricalScore(num_points={self.num_points}, dim={self.dim}, dtype={self.train.dtype})"
