"""Approximation separation on Gaussian mixtures: time-conditioned MLP score networks trained by denoising score
matching, the memorization / likelihood metrics, sweeps, and the measured capacity threshold (paper Figures 2-3,
Theorem 5.1).

Theorem 5.1 says that a network needs a size growing with the number of training points n to represent the
EMPIRICAL (memorizing) score, but not to represent the TRUE score. The experiments here make that measurable: train
score networks of several sizes on n samples of a Gaussian mixture, sample from them, and count how many samples copy
a training point (the paper's 1/9 squared-distance rule) and how likely the samples are under the true mixture.

Choices the paper leaves open (Ye et al. 2025, Section 5, give neither architecture, optimiser, steps nor sampler):

- Network (:class:`GMMScoreMLP`): a plain MLP, ``depth`` hidden layers of ``width`` units with SiLU, that takes the
  noisy point scaled to unit variance and sinusoidal features of ``log t``, and predicts the noise ``epsilon``;
  the score is ``-epsilon_hat / sigma_t``. Width and depth are the capacity knobs the theorem talks about; the
  parameter count is ``(d + 2F) w + w + (depth - 1)(w^2 + w) + w d + d`` with ``F`` time frequencies.
- Loss (:func:`gmm_dsm_loss`): the paper's per-sample DSM loss ``l_t`` mirrored line by line, weighted by
  ``lambda(t) = sigma_t^2`` (which turns it into the usual noise-prediction loss ``||eps_hat - eps||^2``); the
  unweighted integral of the paper blows up like ``1 / sigma_t^2`` as ``t -> t_0`` and is not trainable with SGD.
- Times: ``t`` log-uniform on ``[t_min, t_max]`` (default ``[1e-3, 10]``): memorization is decided at small t
  (small noise), so small times get as much weight as large ones.
- Optimiser: AdamW (``weight_decay`` is a sweep knob, the paper's remedy) with a cosine learning-rate schedule
  from diffusers, minibatches drawn with replacement from the training points, a fixed number of steps. No EMA.
- Sampler: the theory toolkit's reverse OU SDE (ancestral, geometric time grid; or the probability-flow ODE) from
  ``t_max`` to ``t_min`` started at ``N(0, I)``, returning Tweedie's denoised ``D(x, t_min)``, so a memorizing
  network lands on its training points rather than ``sigma_{t_min}`` away from them.
- Metrics (:func:`evaluate_samples`): the memorization ratio of the ``memorization`` module against the training
  points, and the mean exact log-density of the samples under the true (clean) mixture; a non-finite sample is
  neither a copy nor a non-copy (left out of both, counted in ``num_nonfinite``), the rule of every ratio.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import multiprocessing
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.optimization import get_cosine_schedule_with_warmup
from torch import nn
from tqdm.auto import tqdm

from ..memorization import memorization_report
from ..theory import GaussianMixture, ou_alpha_sigma, probability_flow_ode_sample, reverse_sde_sample


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}; pass an int >= 1.")


def _check_positive_float(name: str, value: Any) -> None:
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")


# ---------------------------------------------------------------------------------------------------------------
# The score network
# ---------------------------------------------------------------------------------------------------------------


class GMMScoreMLP(ModelMixin, ConfigMixin):
    """Time-conditioned MLP that predicts the noise of an OU-noised point; ``score(x, t) = -forward(x, t) / sigma_t``.

    Args:
        dim: data dimension ``d``.
        width: units per hidden layer (the capacity knob of Theorem 5.1).
        depth: number of hidden layers (>= 1).
        num_time_frequencies: ``F``; the time enters as ``sin`` / ``cos`` of ``log t`` times ``F`` frequencies
            ``2^k * pi / 10`` (``k < F``), which resolve the whole range ``log t in [-7, 2.3]`` from coarse to fine.
        data_std: per-coordinate standard deviation of the data; the input ``x_t`` is divided by its standard
            deviation ``sqrt(alpha_t^2 data_std^2 + sigma_t^2)`` (EDM's ``c_in``) so every time sees unit-scale
            inputs.
    """

    @register_to_config
    def __init__(self, dim: int, width: int = 128, depth: int = 3, num_time_frequencies: int = 8,
                 data_std: float = 1.0):
        super().__init__()
        checked = {"dim": dim, "width": width, "depth": depth, "num_time_frequencies": num_time_frequencies}
        for name, value in checked.items():
            _check_positive_int(name, value)
        _check_positive_float("data_std", data_std)
        frequencies = (2.0 ** torch.arange(num_time_frequencies, dtype=torch.float32)) * math.pi / 10.0
        self.register_buffer("time_frequencies", frequencies, persistent=False)
        sizes = [dim + 2 * num_time_frequencies] + [width] * depth
        self.hidden = nn.ModuleList(nn.Linear(fan_in, fan_out) for fan_in, fan_out in zip(sizes[:-1], sizes[1:]))
        self.out = nn.Linear(width, dim)
        # Start as the zero-noise predictor: the first steps fit the bulk instead of undoing a random output.
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    @staticmethod
    def parameter_count(dim: int, width: int, depth: int, num_time_frequencies: int = 8) -> int:
        """Number of parameters of ``GMMScoreMLP(dim, width, depth, num_time_frequencies)`` without building it."""
        first = (dim + 2 * num_time_frequencies) * width + width
        return first + (depth - 1) * (width * width + width) + width * dim + dim

    def _times(self, t: float | torch.Tensor, batch: int, like: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=like.dtype, device=like.device).reshape(-1)
        if t.numel() == 1:
            t = t.expand(batch)
        if t.numel() != batch:
            raise ValueError(f"got {t.numel()} times for {batch} points; pass one float or a tensor of shape "
                             f"[{batch}].")
        if not bool((t > 0).all()):
            raise ValueError(
                "diffusion times must be > 0 (the score is singular at t = 0); use t >= t_min, e.g. 1e-3."
            )
        return t

    def _noise_and_sigma(self, x: torch.Tensor, t: float | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if x.ndim != 2 or x.shape[1] != self.config.dim:
            raise ValueError(f"expected points of shape [B, {self.config.dim}], got {tuple(x.shape)}; the network was "
                             f"built for d = {self.config.dim}.")
        t = self._times(t, x.shape[0], x)
        alpha, sigma = ou_alpha_sigma(t)
        c_in = torch.rsqrt(alpha**2 * self.config.data_std**2 + sigma**2)
        phase = torch.log(t)[:, None] * self.time_frequencies.to(x.dtype)
        h = torch.cat([x * c_in[:, None], torch.sin(phase), torch.cos(phase)], dim=1)
        for layer in self.hidden:
            h = torch.nn.functional.silu(layer(h))
        return self.out(h), sigma

    def forward(self, x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        """Predicted noise ``eps_hat(x_t, t)`` for points ``x`` ``[B, d]`` at times ``t`` (float or ``[B]``)."""
        return self._noise_and_sigma(x, t)[0]

    def score(self, x: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
        """The score ``grad log p_t(x) ~ -eps_hat(x, t) / sigma_t`` (the noise-prediction parametrisation)."""
        eps, sigma = self._noise_and_sigma(x, t)
        return -eps / sigma[:, None]


# ---------------------------------------------------------------------------------------------------------------
# Denoising score matching
# ---------------------------------------------------------------------------------------------------------------


def sample_diffusion_times(num: int, t_min: float, t_max: float, generator: torch.Generator | None = None,
                           device: str | torch.device = "cpu") -> torch.Tensor:
    """``num`` times log-uniform on ``[t_min, t_max]``: as much training signal at small noise as at large."""
    _check_positive_int("num", num)
    _check_positive_float("t_min", t_min)
    if not t_max > t_min:
        raise ValueError(f"need t_max > t_min, got t_min={t_min}, t_max={t_max}.")
    u = torch.rand(num, generator=generator, device=device)
    return torch.exp(math.log(t_min) + u * (math.log(t_max) - math.log(t_min)))


def gmm_dsm_loss(model: GMMScoreMLP, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``sigma_t^2 * l_t(x0, s)``, the paper's DSM loss weighted by ``lambda(t) = sigma_t^2``.

    ``l_t(x, s) = || -(X_t - alpha_t x)/sigma_t^2 - s(X_t, t) ||^2`` with ``X_t = alpha_t x + sigma_t noise``
    (Ye et al. 2025, Section 2), one noise draw per row. With ``s = -eps_hat/sigma_t`` this equals
    ``||eps_hat - noise||^2``.
    """
    alpha, sigma = ou_alpha_sigma(t)
    x_t = alpha[:, None] * x0 + sigma[:, None] * noise
    target_score = -(x_t - alpha[:, None] * x0) / sigma[:, None] ** 2
    l_t = (target_score - model.score(x_t, t)).pow(2).sum(dim=1)
    return (sigma**2 * l_t).mean()


@dataclass
class GMMTrainConfig:
    """How :func:`train_score_mlp` trains (the paper gives none of this; see the module docstring)."""

    steps: int = 2000
    batch_size: int = 128
    learning_rate: float = 2e-3
    weight_decay: float = 0.0
    t_min: float = 1e-3
    t_max: float = 10.0
    warmup_steps: int = 50
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "batch_size"):
            _check_positive_int(name, getattr(self, name))
        for name in ("learning_rate", "t_min", "t_max"):
            _check_positive_float(name, getattr(self, name))
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be >= 0, got {self.weight_decay}.")
        if not self.t_max > self.t_min:
            raise ValueError(f"need t_max > t_min, got t_min={self.t_min}, t_max={self.t_max}.")


def train_score_mlp(model: GMMScoreMLP, train: torch.Tensor, config: GMMTrainConfig = GMMTrainConfig(),
                    progress: bool = False) -> list[float]:
    """Train ``model`` in place by DSM on the points ``train`` ``[n, d]``; returns the loss of every step.

    Each step draws ``batch_size`` training points with replacement, one log-uniform time and one noise per row.
    """
    if train.ndim != 2 or train.shape[0] == 0:
        raise ValueError(f"train must be a non-empty [n, d] tensor, got shape {tuple(train.shape)}.")
    if train.shape[1] != model.config.dim:
        raise ValueError(f"train has d = {train.shape[1]} but the model was built for d = {model.config.dim}; "
                         f"build GMMScoreMLP(dim={train.shape[1]}, ...).")
    device = next(model.parameters()).device
    train = train.to(device=device, dtype=next(model.parameters()).dtype)
    generator = torch.Generator(device=device).manual_seed(config.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay,
                                  foreach=True)
    scheduler = get_cosine_schedule_with_warmup(optimizer, min(config.warmup_steps, config.steps // 10), config.steps)
    model.train()
    losses = []
    for _ in tqdm(range(config.steps), disable=not progress, desc="DSM", leave=False):
        index = torch.randint(train.shape[0], (config.batch_size,), generator=generator, device=device)
        t = sample_diffusion_times(config.batch_size, config.t_min, config.t_max, generator, device)
        noise = torch.randn(config.batch_size, train.shape[1], generator=generator, device=device, dtype=train.dtype)
        loss = gmm_dsm_loss(model, train[index], t.to(train.dtype), noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
    model.eval()
    return losses


# ---------------------------------------------------------------------------------------------------------------
# Sampling and metrics
# ---------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def generate_samples(model: GMMScoreMLP, num_samples: int, t_max: float = 10.0, t_min: float = 1e-3,
                     num_steps: int = 100, sampler: str = "sde", generator: torch.Generator | None = None,
                     denoise: bool = True) -> torch.Tensor:
    """Samples of the learned model: reverse OU SDE (``sampler="sde"``) or probability-flow ODE (``"ode"``) from
    ``x_T ~ N(0, I)`` at ``t_max`` down to ``t_min``, then (``denoise``) one Tweedie step to ``t = 0``."""
    _check_positive_int("num_samples", num_samples)
    _check_positive_int("num_steps", num_steps)
    if sampler not in ("sde", "ode"):
        raise ValueError(f"unknown sampler {sampler!r}; use 'sde' (reverse OU SDE) or 'ode' (probability flow).")
    parameter = next(model.parameters())
    x_T = torch.randn(num_samples, model.config.dim, generator=generator, device=parameter.device,
                      dtype=parameter.dtype)
    if sampler == "sde":
        return reverse_sde_sample(model.score, x_T, t_max, t_min, num_steps, generator=generator,
                                  return_denoised=denoise)
    return probability_flow_ode_sample(model.score, x_T, t_max, t_min, num_steps, return_denoised=denoise)


@torch.no_grad()
def evaluate_samples(samples: torch.Tensor, train: torch.Tensor, mixture: GaussianMixture) -> dict[str, Any]:
    """The two metrics of Figure 3 for ``samples`` ``[B, d]``: ``memorization_ratio`` (1/9 rule against ``train``),
    ``mean_log_likelihood`` (exact log-density under the clean mixture, averaged), the per-sample ``memorized``
    mask (for Figure 2's red points) and ``num_nonfinite``. A non-finite (diverged) sample is neither a copy nor a
    non-copy: it is left out of the ratio and the likelihood and counted (the rule of ``memorization_report``)."""
    if samples.ndim != 2 or train.ndim != 2 or samples.shape[1] != train.shape[1]:
        raise ValueError(f"samples {tuple(samples.shape)} and train {tuple(train.shape)} must both be [*, d] with "
                         f"the same d.")
    report = memorization_report(samples, train)
    log_prob = mixture.log_prob(samples[report.finite].to(mixture.means.dtype), 0.0)
    return {
        "memorization_ratio": report.ratio,
        "mean_log_likelihood": log_prob.mean().item() if log_prob.numel() else float("nan"),
        "memorized": report.memorized.bool().reshape(-1),
        "num_nonfinite": report.num_nonfinite,
    }


# ---------------------------------------------------------------------------------------------------------------
# One experiment, sweeps
# ---------------------------------------------------------------------------------------------------------------

MIXTURE_LAYOUTS = ("random", "square")


def make_mixture(dim: int, num_components: int, mean_scale: float = 2.0, layout: str = "random",
                 seed: int = 0) -> GaussianMixture:
    """The mixtures of section 5: ``(1/K) sum_k N(mu_k, I_d)``.

    ``layout="random"``: ``mu_k ~ N(0, mean_scale^2 I)`` i.i.d. (Figure 3 uses ``mean_scale = 2``, i.e. ``N(0, 4 I)``).
    ``layout="square"`` (``dim = 2``, ``K = 4``, Figure 2's "well-separated means"): the corners ``(+-s, +-s)``
    with ``s = 2 * mean_scale``, so neighbouring components are ``4 * mean_scale`` standard deviations apart.
    """
    _check_positive_int("dim", dim)
    _check_positive_int("num_components", num_components)
    _check_positive_float("mean_scale", mean_scale)
    if layout == "random":
        return GaussianMixture.random(num_components, dim, mean_scale=mean_scale,
                                      generator=torch.Generator().manual_seed(seed))
    if layout == "square":
        if dim != 2 or num_components != 4:
            raise ValueError(f"layout='square' is the d = 2, K = 4 mixture of Figure 2; got d = {dim}, "
                             f"K = {num_components}. Use layout='random' for other sizes.")
        s = 2.0 * mean_scale
        return GaussianMixture(torch.tensor([[-s, -s], [-s, s], [s, -s], [s, s]]))
    raise ValueError(f"unknown mixture layout {layout!r}; choose one of {MIXTURE_LAYOUTS}.")


@dataclass
class GMMRunSpec:
    """Everything that defines one point of a sweep: the mixture, the training set, the network, training, sampling.
    Defaults are one run of the default suite (d = 8, K = 8, n = 20, width 256, 2,000 steps, 500 samples).

    The mixture depends on ``(dim, num_components, mean_scale, layout, seed)`` only, so a sweep over width, n or
    weight decay compares networks on the same mixture; the training points are drawn from it with seed ``seed+1``.
    """

    dim: int = 8
    num_components: int = 8
    mean_scale: float = 2.0
    layout: str = "random"
    num_train: int = 20
    width: int = 256
    depth: int = 3
    weight_decay: float = 0.0
    steps: int = 2000
    batch_size: int = 128
    learning_rate: float = 2e-3
    t_min: float = 1e-3
    t_max: float = 10.0
    num_samples: int = 500
    sample_steps: int = 100
    sampler: str = "sde"
    seed: int = 0
    device: str = "cpu"

    def __post_init__(self):
        for name in ("dim", "num_components", "num_train", "width", "depth", "steps", "batch_size", "num_samples",
                     "sample_steps"):
            _check_positive_int(name, getattr(self, name))
        _check_positive_float("mean_scale", self.mean_scale)
        if self.num_train < 2:
            raise ValueError(f"num_train must be >= 2 (the 1/9 rule needs a second nearest point), got "
                             f"{self.num_train}.")
        if self.layout not in MIXTURE_LAYOUTS:
            raise ValueError(f"unknown mixture layout {self.layout!r}; choose one of {MIXTURE_LAYOUTS}.")
        if self.sampler not in ("sde", "ode"):
            raise ValueError(f"unknown sampler {self.sampler!r}; use 'sde' or 'ode'.")
        GMMTrainConfig(self.steps, self.batch_size, self.learning_rate, self.weight_decay, self.t_min, self.t_max)

    def train_config(self) -> GMMTrainConfig:
        return GMMTrainConfig(steps=self.steps, batch_size=self.batch_size, learning_rate=self.learning_rate,
                           weight_decay=self.weight_decay, t_min=self.t_min, t_max=self.t_max, seed=self.seed + 2)


SPEC_FIELDS = tuple(f.name for f in dataclasses.fields(GMMRunSpec))


@dataclass
class GMMRunResult:
    """One trained network: ``row`` (spec + metrics, what goes in the CSV), the samples, training points and mask."""

    row: dict[str, Any]
    samples: torch.Tensor
    train: torch.Tensor
    memorized: torch.Tensor
    losses: list[float] = field(repr=False, default_factory=list)


def run_gmm_experiment(spec: GMMRunSpec, progress: bool = False) -> GMMRunResult:
    """Train one :class:`GMMScoreMLP` on ``spec.num_train`` mixture samples, sample, and measure both metrics."""
    mixture = make_mixture(spec.dim, spec.num_components, spec.mean_scale, spec.layout, spec.seed)
    train = mixture.sample(spec.num_train, generator=torch.Generator().manual_seed(spec.seed + 1)).float()
    torch.manual_seed(spec.seed + 3)  # network initialisation
    model = GMMScoreMLP(spec.dim, spec.width, spec.depth, data_std=float(train.std(dim=0).mean().clamp_min(1e-3)))
    model.to(spec.device)
    losses = train_score_mlp(model, train, spec.train_config(), progress=progress)
    generator = torch.Generator(device=spec.device).manual_seed(spec.seed + 4)
    samples = generate_samples(model, spec.num_samples, spec.t_max, spec.t_min, spec.sample_steps, spec.sampler,
                               generator).cpu()
    metrics = evaluate_samples(samples, train, mixture)
    # Chance level of the 1/9 rule: fresh samples of the TRUE mixture (a perfect generalizer) measured the same way.
    fresh = mixture.sample(spec.num_samples, generator=torch.Generator().manual_seed(spec.seed + 5)).float()
    reference = evaluate_samples(fresh, train, mixture)
    tail = losses[-max(1, len(losses) // 10):]
    row = {**dataclasses.asdict(spec), "num_parameters": model.num_parameters(),
           "memorization_ratio": metrics["memorization_ratio"],
           "mean_log_likelihood": metrics["mean_log_likelihood"], "num_nonfinite": metrics["num_nonfinite"],
           "true_samples_memorization_ratio": reference["memorization_ratio"],
           "true_samples_mean_log_likelihood": reference["mean_log_likelihood"],
           "final_loss": sum(tail) / len(tail)}
    return GMMRunResult(row, samples, train, metrics["memorized"], losses)


def _init_worker() -> None:
    # One intra-op thread per process: two processes on two cores beat one process with two threads for these
    # small matrices, and they do not oversubscribe a CPU shared with other jobs.
    torch.set_num_threads(1)


def _run_row(spec: GMMRunSpec) -> dict[str, Any]:
    return run_gmm_experiment(spec).row


def sweep_specs(base: GMMRunSpec, grid: dict[str, Sequence[Any]]) -> list[GMMRunSpec]:
    """The cartesian product of ``grid`` (``{spec field: values}``) applied to ``base``, in grid order."""
    unknown = [name for name in grid if name not in SPEC_FIELDS]
    if unknown:
        raise ValueError(f"unknown sweep parameter(s) {unknown}; a sweep can vary any GMMRunSpec field: "
                         f"{', '.join(SPEC_FIELDS)}.")
    for name, values in grid.items():
        if isinstance(values, (str, bytes)) or not isinstance(values, Iterable) or len(list(values)) == 0:
            raise ValueError(f"sweep parameter {name!r} needs a non-empty list of values, got {values!r}.")
    names = list(grid)
    return [dataclasses.replace(base, **dict(zip(names, combo))) for combo in itertools.product(*grid.values())]


def run_sweep(specs: GMMRunSpec | Sequence[GMMRunSpec], grid: dict[str, Sequence[Any]] | None = None,
              workers: int = 1, progress: bool = True, desc: str = "gmm sweep",
              run_fn: Callable[[GMMRunSpec], Any] = _run_row) -> list[Any]:
    """Run many experiments, in ``workers`` processes (one torch thread each) when ``workers > 1``.

    ``specs`` is a list of :class:`GMMRunSpec`, or one base spec expanded over ``grid`` (see :func:`sweep_specs`).
    Returns ``run_fn(spec)`` for every spec in order (default: the CSV row of :func:`run_gmm_experiment`).
    Processes are started with ``spawn``: forking a process whose OpenMP pool is live can deadlock.
    """
    if isinstance(specs, GMMRunSpec):
        specs = sweep_specs(specs, grid or {})
    elif grid:
        raise ValueError("pass either a list of specs, or one base spec and a grid, not a list and a grid.")
    specs = list(specs)
    _check_positive_int("workers", workers)
    workers = min(workers, len(specs)) if specs else 1
    if workers == 1:
        return [run_fn(spec) for spec in tqdm(specs, desc=desc, disable=not progress)]
    # Longest jobs first (cost ~ steps * parameters) so the two workers finish together; results keep spec order.
    order = sorted(range(len(specs)), key=lambda i: -_estimated_cost(specs[i]))
    results: list[Any] = [None] * len(specs)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context, initializer=_init_worker) as pool:
        futures = {pool.submit(run_fn, specs[i]): i for i in order}
        for future in tqdm(as_completed(futures), total=len(specs), desc=desc, disable=not progress):
            results[futures[future]] = future.result()
    return results


def _estimated_cost(spec: GMMRunSpec) -> float:
    parameters = GMMScoreMLP.parameter_count(spec.dim, spec.width, spec.depth)
    return spec.steps * spec.batch_size * (parameters + 2000) + spec.num_samples * spec.sample_steps * parameters


# ---------------------------------------------------------------------------------------------------------------
# Capacity threshold
# ---------------------------------------------------------------------------------------------------------------


def capacity_thresholds(rows: Sequence[dict[str, Any]], level: float = 0.5, size_key: str = "width",
                        group_key: str = "num_train") -> list[dict[str, Any]]:
    """For each ``group_key`` value (n), the smallest ``size_key`` (width) at which the memorization ratio reaches
    ``level``.

    The crossing is interpolated linearly in ``log(width)`` between the last grid width below ``level`` and the first
    at or above it (``threshold``), and the first grid width at or above it is reported too (``first_width_above``).
    A group that never reaches ``level`` gets ``nan`` (not reached in the grid: report it, do not extrapolate); one
    that is above ``level`` already at the smallest width gets that width with ``censored = True``.
    """
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}.")
    groups: dict[Any, list[tuple[float, float]]] = {}
    for row in rows:
        for key in (size_key, group_key, "memorization_ratio"):
            if key not in row:
                raise ValueError(f"row {row} has no {key!r}; pass the rows of run_sweep over {size_key} and "
                                 f"{group_key}.")
        groups.setdefault(row[group_key], []).append((float(row[size_key]), float(row["memorization_ratio"])))
    out = []
    for n in sorted(groups):
        curve = sorted(groups[n])
        threshold, first, censored = float("nan"), float("nan"), False
        for i, (size, ratio) in enumerate(curve):
            if ratio >= level:
                first = size
                if i == 0:
                    threshold, censored = size, True
                else:
                    (s0, r0), (s1, r1) = curve[i - 1], (size, ratio)
                    frac = (level - r0) / (r1 - r0)
                    threshold = math.exp(math.log(s0) + frac * (math.log(s1) - math.log(s0)))
                break
        out.append({group_key: n, "threshold": threshold, "first_width_above": first, "censored": censored})
    return out


@dataclass
class ThresholdFit:
    """``threshold ~ prefactor * n^exponent`` fitted by least squares in log-log; ``r_squared`` of that fit;
    ``points`` how many (n, threshold) pairs entered (uncensored, reached)."""

    exponent: float
    prefactor: float
    r_squared: float
    points: int


def fit_threshold_growth(num_train: Sequence[float], thresholds: Sequence[float]) -> ThresholdFit:
    """Power-law fit of the capacity threshold against n (Theorem 5.1: width ~ n, exponent 1, for the empirical
    score). Pairs with a non-finite threshold are dropped; at least two must remain."""
    pairs = [(float(n), float(w)) for n, w in zip(num_train, thresholds) if math.isfinite(w) and w > 0 and n > 0]
    if len(pairs) < 2:
        raise ValueError(f"need at least two n with a finite threshold to fit a growth law, got {len(pairs)}; widen "
                         f"the width grid so memorization passes the level for more n.")
    x = torch.tensor([math.log(n) for n, _ in pairs], dtype=torch.float64)
    y = torch.tensor([math.log(w) for _, w in pairs], dtype=torch.float64)
    design = torch.stack([torch.ones_like(x), x], dim=1)
    coef = torch.linalg.lstsq(design, y[:, None]).solution[:, 0]
    residual = y - design @ coef
    total = ((y - y.mean()) ** 2).sum()
    r_squared = float(1 - (residual**2).sum() / total) if total > 0 else float("nan")
    return ThresholdFit(exponent=float(coef[1]), prefactor=float(math.exp(coef[0])), r_squared=r_squared,
                        points=len(pairs))


def parse_sweep_argument(text: str) -> tuple[str, list[Any]]:
    """``"width=32,64,128"`` -> ``("width", [32, 64, 128])``, values cast to the :class:`GMMRunSpec` field's type."""
    name, sep, values = text.partition("=")
    name = name.strip()
    if not sep or not values.strip():
        raise ValueError(f"sweep {text!r} is not NAME=V1,V2,...; e.g. --sweep width=32,64,128.")
    if name not in SPEC_FIELDS:
        raise ValueError(f"unknown sweep parameter {name!r}; a sweep can vary any of {', '.join(SPEC_FIELDS)}.")
    kind = {f.name: f.type for f in dataclasses.fields(GMMRunSpec)}[name]
    cast = {"int": int, "float": float, "str": str}[kind if isinstance(kind, str) else kind.__name__]
    try:
        return name, [cast(value.strip()) for value in values.split(",") if value.strip()]
    except ValueError:
        raise ValueError(f"sweep {text!r}: {name} takes {cast.__name__} values, e.g. {name}=1,2,3.") from None
