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
- Held-out images: by default the population minus the training subset
  (:func:`diffusers_memsep.data.held_out_from_population`), or a user's folder; they are passed as ``held_out`` or
  carried by the data (:class:`diffusers_memsep.data.TrainingDataWithHeldOut`), so
  :func:`~diffusers_memsep.pruning.one_shot_prune` needs no new argument.
- Batches: the batch stream of the other scores (data-parallel in the same way), with ``num_batches`` of
  ``batch_size`` images from each set, drawn with replacement. Per batch the generator draws, in this order,
  training indices, held-out indices, times, noise.
"""

from __future__ import annotations

import torch

from ..data import TrainingDataWithHeldOut
from ..models import PrunableDiTTransformer2DModel
from .importance import (
    SMALL_TIME,
    BetaTime,
    HeadImportance,
    _check_model,
    _FrozenParameters,
    _loss_increases,
    _present_heads,
    _sum_over_batches,
)


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
        data: the training set (``images``, ``labels``); a :class:`~diffusers_memsep.data.TrainingDataWithHeldOut`
            brings its own held-out images when ``held_out`` is None.
        scheduler: the noise scheduler of training.
        held_out: images of the same distribution not trained on (``images``, ``labels``).
        time_distribution, num_batches, batch_size, generator: as for the paper's Algorithm 2.
    """
    _check_model(model)
    if held_out is None and isinstance(data, TrainingDataWithHeldOut):
        held_out = data.held_out
    if held_out is None:
        raise ValueError("memorization_gap needs held-out images of the training distribution; pass held_out=... "
                         "or data=with_held_out(train, held_out) (memsep study and memsep demo hold them out "
                         "themselves; memsep study --validation_data_dir takes a folder).")
    present = _present_heads(model)
    heads = present.nonzero().tolist()

    def gap_terms(sets, timesteps, noise):  # (training loss increase) - (held-out loss increase), per head
        (train_images, train_labels), (held_images, held_labels) = sets
        return (_loss_increases(model, scheduler, heads, train_images, train_labels, timesteps, noise)
                - _loss_increases(model, scheduler, heads, held_images, held_labels, timesteps, noise))

    with _FrozenParameters(model), torch.no_grad():
        gap = _sum_over_batches(gap_terms, model, (data, held_out), scheduler, time_distribution, num_batches,
                                batch_size, generator)
    gap = (gap / num_batches).where(present, torch.tensor(float("nan"), dtype=torch.float64))
    return HeadImportance(scores=-gap, raw_scores=gap, method="memorization_gap",
                          time_distribution=str(time_distribution), num_batches=num_batches, batch_size=batch_size)
