"""Head importance in the small-time regime (the paper's Algorithm 2) and the baselines it is compared with.

IMPORTANCESCORE, as in Ye et al. 2025, Section 6, Algorithm 2, line by line:

1. attach a mask variable ``xi_h = 1`` to every head's output           -> ``model.set_head_mask(ones)``
2. for batches ``x ~ D`` with ``t ~ T``, compute the training loss       -> :func:`diffusers_memsep.trainer.dsm_loss`
3. back-propagate, accumulate ``S(h) += |dL/d xi_h|``                     -> one ``autograd.grad`` per batch
4. normalise within each layer, ``I(h) = S(h) / sqrt(sum_{h' in layer(h)} S(h')^2)``

Choices the paper leaves open (documented here, tested in ``tests/test_pruning.py``):

- Normalised time. ``T = Beta(0.8, 2)`` is a law on ``u in [0, 1]``; ``u`` is the fraction of the scheduler's
  training timesteps, ``k = min(floor(u * N), N - 1)`` with ``N = num_train_timesteps`` (so ``u`` near 0 is little
  noise). The map lives in :func:`diffusers_memsep.theory.timesteps_from_fraction`, with the other time conversions.
- Sampling ``u``. Inverse-CDF sampling (``scipy.special.betaincinv`` of ``torch.rand``), so one ``torch.Generator``
  makes every score reproducible (``torch.distributions.Beta`` takes no generator).
- Batches. ``num_batches`` batches of ``batch_size`` training images drawn with replacement; the noise and the
  timesteps come from the same generator. Every score reads this one seeded stream (:func:`_batches`): given the
  same generator, the ablation baseline sees the images, times and noise of Algorithm 2 (``memorization_gap``
  also draws held-out images, before the times).
- Gradients. Only the mask needs a gradient: the model's parameters are frozen during scoring (and restored
  after), which saves the parameter-gradient work.
- Pruned heads (a model pruned before) get score NaN and are never selected again.
- Several processes (``accelerate launch`` / ``torchrun``, a ``torch.distributed`` group initialised): every score
  is data-parallel. Process ``r`` scores a contiguous share of the batches
  (:func:`~diffusers_memsep.distributed.split_work`) and draws every batch before its share from its own copy of
  the generator (same seed on every process), so batch ``b`` has exactly the images, noise and times of a
  one-process run. The per-batch terms of ``S(h)`` (the loss increases, for the ablation) are gathered and added
  in batch order on every process, as one process adds them: the scores do not depend on the number of processes
  (bit for bit on the same hardware). Every process of the group must then make the call (the gather is a
  collective operation); to score on one process only, call it where no process group is initialised.
- Ablation baseline (Michel et al. 2019's "drop one head"): the increase of the same loss, on the same batches,
  noise and timesteps, when one head alone is masked. It is already on a common scale across layers (a loss
  difference), so it is not normalised per layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import scipy.special
import torch
from diffusers.utils import BaseOutput

from ..distributed import all_gather_cat, split_work
from ..models import PrunableDiTTransformer2DModel
from ..theory import timesteps_from_fraction
from ..trainer import dsm_loss


@dataclass(frozen=True)
class BetaTime:
    """A Beta(a, b) law on normalised diffusion time ``u in [0, 1]`` (fraction of the timesteps; 0 = no noise).

    ``BetaTime(0.8, 2.0)`` is the paper's small-time law (mean 0.29); ``BetaTime(1.0, 1.0)`` is uniform time.
    """

    a: float = 0.8
    b: float = 2.0

    def __post_init__(self):
        if not (self.a > 0 and self.b > 0):
            raise ValueError(f"Beta parameters must be > 0, got a={self.a}, b={self.b}.")

    def sample(self, num: int, generator: torch.Generator | None = None) -> torch.Tensor:
        uniform = torch.rand(num, generator=generator, dtype=torch.float64)
        return torch.from_numpy(scipy.special.betaincinv(self.a, self.b, uniform.numpy()))

    def __str__(self) -> str:
        return "uniform" if (self.a, self.b) == (1.0, 1.0) else f"Beta({self.a:g}, {self.b:g})"


SMALL_TIME = BetaTime(0.8, 2.0)
UNIFORM_TIME = BetaTime(1.0, 1.0)


@dataclass
class HeadImportance(BaseOutput):
    """Head scores, ``(num_layers, num_attention_heads)`` in the original head numbering (NaN: pruned already).

    Attributes:
        scores: what the ranking uses (``I(h)`` for Algorithm 2).
        raw_scores: before any per-layer normalisation (``S(h)`` for Algorithm 2; equal to ``scores`` otherwise).
        method: ``"small_t"``, ``"uniform_t"``, ``"gradient"`` (Algorithm 2 under another time law),
            ``"ablation"`` or ``"random"``.
        time_distribution: the law of normalised time used (``str``), or None for random scores.
        num_batches, batch_size: how much data was used.
    """

    scores: torch.Tensor
    raw_scores: torch.Tensor
    method: str
    time_distribution: str | None
    num_batches: int
    batch_size: int


def _present_heads(model) -> torch.Tensor:
    """Bool ``(layers, heads)``: True where the head is still in the weights."""
    present = torch.zeros(model.config.num_layers, model.config.num_attention_heads, dtype=torch.bool)
    for layer, heads in enumerate(model.kept_heads()):
        present[layer, heads] = True
    return present


def _check_model(model) -> None:
    if not isinstance(model, PrunableDiTTransformer2DModel):
        raise TypeError(
            f"head importance needs a PrunableDiTTransformer2DModel, got {type(model).__name__}; convert a stock "
            "DiT with PrunableDiTTransformer2DModel.from_dit(model)."
        )


def _batches(model, datasets, scheduler, time_distribution: BetaTime, num_batches: int, batch_size: int,
             generator: torch.Generator):
    """This process's share of the one batch stream every score reads: yields ``(sets, timesteps, noise)``, with
    ``sets`` one ``(images, labels)`` pair per data set of ``datasets`` (the training set; then the held-out set for
    ``memorization_gap``), all noised with the same times and noise.

    Per batch the generator draws, in this order: the image indices of each set, the times, the noise. Batches
    before this process's share are drawn and skipped, so the generator is in the state of a one-process run.
    """
    if num_batches < 1 or batch_size < 1:
        raise ValueError(f"num_batches and batch_size must be >= 1, got {num_batches} and {batch_size}.")
    expected = (model.config.in_channels, model.config.sample_size, model.config.sample_size)
    for data in datasets:
        if data.images.shape[0] == 0:
            raise ValueError("the data holds no images; head importance needs training images.")
        if tuple(data.images.shape[1:]) != expected:
            raise ValueError(
                f"the data hold samples of shape {tuple(data.images.shape[1:])} but the model takes {expected}; for a "
                "latent DiT encode the training images with its VAE first: diffusers_memsep.latents."
                "latent_training_data(data, vae) (one_shot_prune(..., vae=vae) does it)."
            )
    device = next(model.parameters()).device
    num_train_timesteps = scheduler.config.num_train_timesteps
    share = split_work(range(num_batches))
    for batch in range(share.stop):
        indices = [torch.randint(0, len(data.images), (batch_size,), generator=generator) for data in datasets]
        timesteps = timesteps_from_fraction(time_distribution.sample(batch_size, generator), num_train_timesteps)
        noise = torch.randn((batch_size, *expected), generator=generator)
        if batch in share:
            sets = [(data.images[index].to(device), None if data.labels is None else data.labels[index].to(device))
                    for data, index in zip(datasets, indices)]
            yield sets, timesteps.to(device), noise.to(device)


def _sum_over_batches(batch_term, model, datasets, scheduler, time_distribution, num_batches, batch_size, generator):
    """``sum_b batch_term(sets_b, timesteps_b, noise_b)`` over the stream of :func:`_batches`, in batch order.

    Each process computes the float64 ``(layers, heads)`` terms of its share; the terms of every process are
    gathered in batch order and added one by one from zero on every process, as a one-process run adds them.
    """
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    stream = _batches(model, datasets, scheduler, time_distribution, num_batches, batch_size, generator)
    terms = [batch_term(*batch).double().cpu() for batch in stream]
    total = torch.zeros(model.config.num_layers, model.config.num_attention_heads, dtype=torch.float64)
    for term in all_gather_cat(torch.stack(terms) if terms else None):
        total += term
    return total


def _loss_increases(model, scheduler, heads, images, labels, timesteps, noise) -> torch.Tensor:
    """Float64 ``(layers, heads)``: the loss with head ``h`` alone masked minus the loss of the full model."""
    model.set_head_mask(None)
    base = dsm_loss(model, scheduler, images, labels, timesteps, noise=noise).item()
    increase = torch.zeros(model.config.num_layers, model.config.num_attention_heads, dtype=torch.float64)
    for layer, head in heads:
        mask = torch.ones(increase.shape, device=noise.device)
        mask[layer, head] = 0.0
        model.set_head_mask(mask)
        increase[layer, head] = dsm_loss(model, scheduler, images, labels, timesteps, noise=noise).item() - base
    return increase


class _FrozenParameters:
    """Context manager: parameters need no gradient while scoring heads; training mode off (no label dropout)."""

    def __init__(self, model):
        self.model = model

    def __enter__(self):
        self.flags = [p.requires_grad for p in self.model.parameters()]
        self.training = self.model.training
        self.model.requires_grad_(False).eval()
        return self.model

    def __exit__(self, *exc):
        for parameter, flag in zip(self.model.parameters(), self.flags):
            parameter.requires_grad_(flag)
        self.model.train(self.training)
        self.model.set_head_mask(None)


def small_time_head_importance(
    model: PrunableDiTTransformer2DModel,
    data,
    scheduler,
    time_distribution: BetaTime = SMALL_TIME,
    num_batches: int = 16,
    batch_size: int = 64,
    generator: torch.Generator | None = None,
) -> HeadImportance:
    """Algorithm 2 of the paper: ``I(h)`` from accumulated ``|dL/d xi_h|`` at ``t ~ time_distribution``.

    Args:
        model: the DiT to score (unchanged on return; masks cleared).
        data: an object with ``images`` (``[n, C, H, W]`` in ``[-1, 1]``) and ``labels`` (``LongTensor[n]`` or None),
            e.g. :class:`diffusers_memsep.data.TrainingData`; for a latent DiT, the VAE latents of the training
            images (:func:`diffusers_memsep.latents.latent_training_data`). Learned-sigma models are scored on the
            epsilon half of their output, as ``dsm_loss`` trains them.
        scheduler: the diffusers noise scheduler the model was trained with (``add_noise``, ``prediction_type``).
        time_distribution: law of normalised time; the paper's ``Beta(0.8, 2)`` by default.
        num_batches, batch_size: the data used for the scores.
        generator: CPU ``torch.Generator`` for batches, times and noise (default: seeded with 0). With several
            processes, give every process a generator in the same state (e.g. the same seed).
    """
    _check_model(model)
    present = _present_heads(model)
    device = next(model.parameters()).device

    mask = torch.ones(present.shape, device=device, requires_grad=True)  # xi_h = 1

    def mask_gradient(sets, timesteps, noise):  # |dL/d xi_h| on one batch
        ((images, labels),) = sets
        loss = dsm_loss(model, scheduler, images, labels, timesteps, noise=noise)
        return torch.autograd.grad(loss, mask)[0].abs()

    with _FrozenParameters(model):
        model.set_head_mask(mask)
        accumulated = _sum_over_batches(mask_gradient, model, (data,), scheduler, time_distribution, num_batches,
                                        batch_size, generator)  # S(h)
    layer_norm = accumulated.where(present, 0.0).pow(2).sum(dim=1, keepdim=True).sqrt()
    scores = accumulated / layer_norm.clamp_min(torch.finfo(torch.float64).tiny)  # I(h) = S(h) / ||S(layer)||
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    method = {SMALL_TIME: "small_t", UNIFORM_TIME: "uniform_t"}.get(time_distribution, "gradient")
    return HeadImportance(scores=scores.where(present, nan), raw_scores=accumulated.where(present, nan),
                          method=method, time_distribution=str(time_distribution), num_batches=num_batches,
                          batch_size=batch_size)


def ablation_head_importance(
    model: PrunableDiTTransformer2DModel,
    data,
    scheduler,
    time_distribution: BetaTime = SMALL_TIME,
    num_batches: int = 16,
    batch_size: int = 64,
    generator: torch.Generator | None = None,
) -> HeadImportance:
    """Loss increase when each head alone is masked, on the same batches, noise and times for every head.

    Costs one forward pass per head and batch (against one forward + backward per batch for Algorithm 2);
    ``benchmarks/bench_head_importance.py`` measures both and the rank correlation between them.
    """
    _check_model(model)
    present = _present_heads(model)
    heads = present.nonzero().tolist()

    def loss_increases(sets, timesteps, noise):
        ((images, labels),) = sets
        return _loss_increases(model, scheduler, heads, images, labels, timesteps, noise)

    with _FrozenParameters(model), torch.no_grad():
        increase = _sum_over_batches(loss_increases, model, (data,), scheduler, time_distribution, num_batches,
                                     batch_size, generator)
    scores = (increase / num_batches).where(present, torch.tensor(float("nan"), dtype=torch.float64))
    return HeadImportance(scores=scores, raw_scores=scores.clone(), method="ablation",
                          time_distribution=str(time_distribution), num_batches=num_batches, batch_size=batch_size)


def random_head_importance(model: PrunableDiTTransformer2DModel, generator: torch.Generator | None = None
                           ) -> HeadImportance:
    """Uniform random scores: the random-pruning baseline of the paper's Table 1."""
    _check_model(model)
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    present = _present_heads(model)
    scores = torch.rand(present.shape, generator=generator, dtype=torch.float64)
    scores = scores.where(present, torch.tensor(float("nan"), dtype=torch.float64))
    return HeadImportance(scores=scores, raw_scores=scores.clone(), method="random", time_distribution=None,
                          num_batches=0, batch_size=0)
