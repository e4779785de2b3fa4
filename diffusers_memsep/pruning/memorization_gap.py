"""The memorization-gap head score (beyond the paper): which heads does the TRAINING set need that unseen images of
the same distribution do not?

A model that generalizes denoises a held-out image about as well as a training image; a memorizing model denoises
its training images better, at small noise above all (the empirical score points at the nearest training image,
Ye et al. 2025, Theorem 4.3). A head that carries the memorization is one whose removal raises the small-time
denoising loss on the training images much more than on held-out images. For every head ``h``::

    gap(h) = E[ L_train(xi_h = 0) - L_train ] - E[ L_heldout(xi_h = 0) - L_heldout ]

with ``L`` the denoising loss of :func:`diffusers_memsep.trainer.dsm_loss` at ``t ~ Beta(0.8, 2)`` (the paper's
small-time law), the training and held-out batches drawn with the SAME noise and the SAME times.

:func:`~diffusers_memsep.pruning.select_heads_to_prune` removes the LOWEST scores, so ``scores = -gap``: the heads
the training set relies on most, relative to the held-out set, go first (``raw_scores`` keep ``gap`` itself).

Choices the paper leaves open:

- Measured loss change, not gradients. Algorithm 2's ``|dL/d xi_h|`` drops the sign, and the sign is the point
  here: a head that lowers the training loss and RAISES the held-out loss (it pushes every input towards a training
  image) is the clearest memorizing head, yet ``|g_train| - |g_heldout|`` would count its held-out harm as help.
  Masking is also exact where the first-order expansion behind the gradient is not (xi moves from 1 to 0, not by
  an infinitesimal). Cost: one forward pass per head, batch and set (no backward), as the ``ablation`` baseline.
- No per-layer normalisation: a loss difference is already on a common scale across layers (as for ``ablation``).
- Held-out images: by default the population minus the training subset (:func:`held_out_from_population`), or
  a user's folder; they are passed as ``held_out`` or carried by the data (:class:`TrainingDataWithHeldOut`), so
  :func:`~diffusers_memsep.pruning.one_shot_prune` needs no new argument.
- Batches: ``num_batches`` of ``batch_size`` images from each set, drawn with replacement. Per batch the
  generator draws, in this order, training indices, held-out indices, times, noise.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..data import TrainingData
from ..models import PrunableDiTTransformer2DModel
from ..theory import timesteps_from_fraction
from ..trainer import dsm_loss
from .importance import SMALL_TIME, BetaTime, HeadImportance, _check_model, _FrozenParameters, _present_heads


@dataclass
class TrainingDataWithHeldOut(TrainingData):
    """Training data that also carries held-out images of the same distribution (for ``memorization_gap``).

    It IS the training set everywhere else (fine-tuning, memorization reference): ``held_out`` is only read by
    :func:`memorization_gap_importance`.
    """

    held_out: TrainingData | None = None


def held_out_from_population(population: TrainingData, train: TrainingData) -> TrainingData:
    """The images of ``population`` that are not in ``train`` (by ``train.indices`` into the same full split)."""
    if train.indices is None:
        raise ValueError("the training data does not record its subset indices; pass held-out images explicitly "
                         "(e.g. --validation_data_dir).")
    if population.indices is not None and len(population) != len(population.indices):
        raise ValueError("population and indices disagree; load the population with max_train_samples=None.")
    keep = torch.ones(len(population), dtype=torch.bool)
    keep[torch.as_tensor(train.indices, dtype=torch.long)] = False
    if not keep.any():
        raise ValueError("the training subset is the whole population: no held-out images are left; train on a "
                         "subset (max_train_samples) or pass --validation_data_dir.")
    index = keep.nonzero().squeeze(1)
    # An unconditional model is scored without labels, even when the population carries some.
    labels = None if population.labels is None or train.labels is None else population.labels[index]
    return TrainingData(population.images[index], labels, train.num_classes,
                        f"held out from {population.source}: {len(index)} images", index.tolist())


def with_held_out(train: TrainingData, held_out: TrainingData) -> TrainingDataWithHeldOut:
    """``train`` carrying ``held_out`` (checked to have the same image shape)."""
    if tuple(held_out.images.shape[1:]) != tuple(train.images.shape[1:]):
        raise ValueError(f"held-out images are {tuple(held_out.images.shape[1:])} but training images are "
                         f"{tuple(train.images.shape[1:])}; give held-out images of the training resolution/channels.")
    return TrainingDataWithHeldOut(train.images, train.labels, train.num_classes, train.source, train.indices,
                                   held_out=held_out)


def memorization_gap_importance(
    model: PrunableDiTTransformer2DModel,
    data,
    scheduler,
    held_out=None,
    time_distribution: BetaTime = SMALL_TIME,
    num_batches: int = 16,
    batch_size: int = 64,
    generator: torch.Generator | None = None,
) -> HeadImportance:
    """``scores = -gap(h)`` (see the module docstring): the lowest score is the head the training set needs most.

    Args:
        model: the DiT to score (unchanged on return; masks cleared).
        data: the training set (``images``, ``labels``); its ``held_out`` attribute is used when ``held_out`` is None.
        scheduler: the noise scheduler of training.
        held_out: images of the same distribution not trained on (``images``, ``labels``).
        time_distribution, num_batches, batch_size, generator: as for the paper's Algorithm 2.
    """
    _check_model(model)
    held_out = held_out if held_out is not None else getattr(data, "held_out", None)
    if held_out is None:
        raise ValueError("memorization_gap needs held-out images of the training distribution; pass held_out=... "
                         "or data=with_held_out(train, held_out) (memsep study and memsep demo hold them out "
                         "themselves; memsep study --validation_data_dir takes a folder).")
    if num_batches < 1 or batch_size < 1:
        raise ValueError(f"num_batches and batch_size must be >= 1, got {num_batches} and {batch_size}.")
    if len(data.images) == 0 or len(held_out.images) == 0:
        raise ValueError("memorization_gap needs at least one training and one held-out image.")
    if tuple(held_out.images.shape[1:]) != tuple(data.images.shape[1:]):
        raise ValueError("held-out images must have the training images' shape.")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    present = _present_heads(model)
    heads = present.nonzero().tolist()
    device = next(model.parameters()).device
    num_train_timesteps = scheduler.config.num_train_timesteps
    gap = torch.zeros(present.shape, dtype=torch.float64)
    with _FrozenParameters(model), torch.no_grad():
        for _ in range(num_batches):
            batches = []
            for source in (data, held_out):
                index = torch.randint(0, source.images.shape[0], (batch_size,), generator=generator)
                labels = None if source.labels is None else source.labels[index].to(device)
                batches.append((source.images[index].to(device), labels))
            timesteps = timesteps_from_fraction(time_distribution.sample(batch_size, generator), num_train_timesteps)
            timesteps = timesteps.to(device)
            noise = torch.randn((batch_size, *data.images.shape[1:]), generator=generator).to(device)

            def losses():  # (training loss, held-out loss) under the current mask, same noise and times
                return [dsm_loss(model, scheduler, images, labels, timesteps, noise=noise).item()
                        for images, labels in batches]

            model.set_head_mask(None)
            base_train, base_held_out = losses()
            for layer, head in heads:
                mask = torch.ones(present.shape, device=device)
                mask[layer, head] = 0.0
                model.set_head_mask(mask)
                train_loss, held_out_loss = losses()
                gap[layer, head] += (train_loss - base_train) - (held_out_loss - base_held_out)
    nan = torch.tensor(float("nan"), dtype=torch.float64)
    gap = (gap / num_batches).where(present, nan)
    return HeadImportance(scores=-gap, raw_scores=gap, method="memorization_gap",
                          time_distribution=str(time_distribution), num_batches=num_batches, batch_size=batch_size)
