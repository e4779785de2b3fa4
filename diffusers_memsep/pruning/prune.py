"""One-shot pruning (the paper's Algorithm 1): score heads, remove the floor(eta * H) least important, fine-tune.

Fine-tuning reuses :func:`diffusers_memsep.trainer.train_dit`, the loop that trains the base model: one loop,
not two. The input model is never modified: :func:`one_shot_prune` works on a copy.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import torch
from diffusers import DiTTransformer2DModel
from diffusers.utils import BaseOutput

from ..latents import latent_training_data
from ..models import PrunableDiTTransformer2DModel
from ..trainer import TrainingConfig, TrainResult, train_dit
from ..utils import check_finite_scores
from .importance import (
    SMALL_TIME,
    UNIFORM_TIME,
    BetaTime,
    HeadImportance,
    _present_heads,
    ablation_head_importance,
    random_head_importance,
    small_time_head_importance,
)
from .memorization_gap import memorization_gap_importance

METHODS = ("small_t", "uniform_t", "ablation", "random", "small_t_top", "memorization_gap")


def check_eta(eta: float, allow_zero: bool = True) -> float:
    """The one check of a pruning fraction: eta in [0, 1) (in (0, 1) with ``allow_zero=False``: a study condition
    that prunes nothing is ``finetune_only``, not a method at eta 0)."""
    number = not isinstance(eta, bool) and isinstance(eta, (int, float))
    if not number or not (0 <= eta < 1) or (eta == 0 and not allow_zero):
        interval = "[0, 1)" if allow_zero else "(0, 1)"
        raise ValueError(f"the pruning fraction eta must lie in {interval}, got {eta!r} (0.25 prunes a quarter of the "
                         "heads).")
    return float(eta)


def number_of_heads_to_prune(eta: float, num_heads: int) -> int:
    """``floor(eta * H)``, after checking that eta lies in [0, 1) and that there is a head to keep."""
    check_eta(eta)
    if num_heads < 1:
        raise ValueError("the model has no attention heads left to prune; start from a less pruned model.")
    return math.floor(eta * num_heads)  # < num_heads for eta < 1: at least one head always stays


def select_heads_to_prune(scores: torch.Tensor | HeadImportance, eta: float) -> dict[int, list[int]]:
    """The ``floor(eta * H)`` heads with the lowest score, ranked over the whole model (Algorithm 1, step 3).

    ``H`` counts the heads still present (finite scores; NaN marks heads pruned before). Ties break by (layer, head)
    so the choice is deterministic. Returns ``{layer: [head, ...]}`` in the original numbering, ready for
    :meth:`PrunableDiTTransformer2DModel.prune_heads`.
    """
    if isinstance(scores, HeadImportance):
        scores = scores.scores
    if not isinstance(scores, torch.Tensor) or scores.ndim != 2:
        raise TypeError("scores must be a (num_layers, num_attention_heads) tensor or a HeadImportance.")
    present = ~torch.isnan(scores)
    num_to_prune = number_of_heads_to_prune(eta, int(present.sum()))
    candidates = sorted((float(scores[layer, head]), layer, head) for layer, head in present.nonzero().tolist())
    selected: dict[int, list[int]] = {}
    for _, layer, head in candidates[:num_to_prune]:
        selected.setdefault(layer, []).append(head)
    return {layer: sorted(heads) for layer, heads in sorted(selected.items())}


def head_importance(method: str, model: PrunableDiTTransformer2DModel, data, scheduler, num_batches: int = 16,
                    batch_size: int = 64, generator: torch.Generator | None = None,
                    time_distribution: BetaTime | None = None) -> HeadImportance:
    """Scores by name (the selection removes the LOWEST scores):

    - ``small_t``: Algorithm 2 with Beta(0.8, 2), the paper's method; ``uniform_t``: Algorithm 2 with uniform time;
    - ``ablation``: drop-one-head loss increase at small t; ``random``: the paper's baseline;
    - ``small_t_top`` (beyond the paper): minus the Algorithm 2 scores, so the heads the small-noise loss depends on
      MOST are removed. The small-noise regime is where the empirical (memorizing) score differs from the true one
      (Loss-Gap ~ d / sigma_t^2, Theorem 4.3), so those heads are candidates for carrying the memorization.
    - ``memorization_gap`` (beyond the paper): minus (small-t loss increase on training images - the same on held-out
      images) when the head is masked; ``data`` must carry held-out images (``diffusers_memsep.data.with_held_out``).

    Every score but ``random`` reads one seeded batch stream, split across processes when a process group is
    initialised (every process must then call it; see :mod:`.importance`); ``random`` draws the same scores on every
    process.
    """
    if method not in METHODS:
        raise ValueError(f"unknown pruning method {method!r}; choose one of {', '.join(METHODS)}.")
    if method == "random":
        return random_head_importance(model, generator=generator)
    if method == "memorization_gap":
        return check_scores_of_present_heads(memorization_gap_importance(
            model, data, scheduler, time_distribution=time_distribution or SMALL_TIME, num_batches=num_batches,
            batch_size=batch_size, generator=generator), model)
    scoring = ablation_head_importance if method == "ablation" else small_time_head_importance
    default_time = UNIFORM_TIME if method == "uniform_t" else SMALL_TIME
    importance = scoring(model, data, scheduler, time_distribution=time_distribution or default_time,
                         num_batches=num_batches, batch_size=batch_size, generator=generator)
    if method == "small_t_top":
        importance.scores, importance.method = -importance.scores, "small_t_top"
    return check_scores_of_present_heads(importance, model)


def check_scores_of_present_heads(importance: HeadImportance, model: PrunableDiTTransformer2DModel) -> HeadImportance:
    """Refuse NaN or infinite scores of heads still in the model (NaN marks the heads pruned before): a model with
    NaN weights would otherwise look like a model whose heads are all pruned."""
    present = _present_heads(model).to(importance.scores.device)
    check_finite_scores(importance.scores[present], f"{importance.method} head importance scores")
    return importance


@dataclass
class PruneResult(BaseOutput):
    """What :func:`one_shot_prune` returns.

    Attributes:
        model: the pruned, fine-tuned model (EMA weights when the fine-tuning used EMA).
        pruned_heads: the heads removed in this call, ``{layer: [head, ...]}`` (original numbering).
        importance: the scores the selection used.
        finetune: the fine-tuning run (losses, steps), or None when ``finetune_config`` was None.
    """

    model: PrunableDiTTransformer2DModel
    pruned_heads: dict
    importance: HeadImportance
    finetune: TrainResult | None


def one_shot_prune(
    model: DiTTransformer2DModel,
    data,
    scheduler,
    eta: float = 0.2,
    method: str = "small_t",
    finetune_config: TrainingConfig | None = None,
    num_batches: int = 16,
    batch_size: int = 64,
    time_distribution: BetaTime | None = None,
    generator: torch.Generator | None = None,
    vae=None,
    latent_cache_dir=None,
    importance: HeadImportance | None = None,
) -> PruneResult:
    """Algorithm 1: importance scores -> remove ``floor(eta * H)`` heads globally -> fine-tune.

    Args:
        model: a trained DiT (stock ``DiTTransformer2DModel`` or prunable); it is copied, never modified.
        data: the training data (``images``, ``labels``), e.g. :class:`diffusers_memsep.data.TrainingData`; used for
            the scores and the fine-tuning.
        scheduler: the noise scheduler of the training run.
        eta: eta, the fraction of the remaining heads to remove (the paper uses 0.2).
        method: how heads are scored (see :func:`head_importance`).
        finetune_config: the fine-tuning settings (M = ``max_train_steps``); None skips fine-tuning.
        num_batches, batch_size, time_distribution: passed to the scoring.
        generator: CPU generator for the scoring (random method included).
        vae: for a latent DiT, its ``AutoencoderKL``: ``data`` then holds pixel images, encoded once
            (:func:`diffusers_memsep.latents.latent_training_data`, cached under ``latent_cache_dir`` when given)
            and the scores and the fine-tuning run on the latents. Without it ``data`` must already match the
            model's input (pixels for a pixel DiT, latents for a latent one).
        importance: scores already computed for this model (e.g. the ``importance`` of an earlier call at another
            eta: Algorithm 1 ranks the heads once, so every eta of one score prunes a nested set of heads); the
            scoring is then skipped and ``method``, ``num_batches``, ``batch_size``, ``time_distribution`` and
            ``generator`` are not used.

    Notes:
        Keyword arguments, not a settings dataclass: they are Algorithm 1's inputs one for one (the fine-tuning
        settings already are one, ``finetune_config``) and the scoring ones pass straight to
        :func:`head_importance` under its own names, so a dataclass would only repeat that signature.
    """
    pruned = prunable_copy(model)
    number_of_heads_to_prune(eta, sum(pruned.heads_per_layer()))  # bad eta fails before any scoring work
    if vae is not None:
        data = latent_training_data(data, vae, latent_cache_dir)
    if importance is None:
        importance = head_importance(method, pruned, data, scheduler, num_batches=num_batches,
                                     batch_size=batch_size, generator=generator, time_distribution=time_distribution)
    elif tuple(importance.scores.shape) != (len(pruned.heads_per_layer()), pruned.config.num_attention_heads):
        raise ValueError(f"the given importance scores have shape {tuple(importance.scores.shape)} but the model has "
                         f"{len(pruned.heads_per_layer())} layers of {pruned.config.num_attention_heads} heads; score "
                         "this model (importance=None).")
    heads = select_heads_to_prune(importance, eta)
    pruned.prune_heads(heads)
    finetune = None if finetune_config is None else train_dit(pruned, data, scheduler, finetune_config)
    return PruneResult(model=finetuned_model(finetune) if finetune else pruned.eval(), pruned_heads=heads,
                       importance=importance, finetune=finetune)


def prunable_copy(model: DiTTransformer2DModel) -> PrunableDiTTransformer2DModel:
    """A prunable copy of ``model`` (a stock DiT is converted): the input is never modified."""
    if not isinstance(model, DiTTransformer2DModel):
        raise TypeError(f"head pruning needs a DiT (diffusers DiTTransformer2DModel), got {type(model).__name__}.")
    if isinstance(model, PrunableDiTTransformer2DModel):
        return copy.deepcopy(model)
    return PrunableDiTTransformer2DModel.from_dit(model)


def finetuned_model(finetune: TrainResult) -> PrunableDiTTransformer2DModel:
    """The model a fine-tuning leaves (its EMA weights when it kept an EMA), in eval mode."""
    return (finetune.ema_model if finetune.ema_model is not None else finetune.model).eval()


def fine_tune_only(model: DiTTransformer2DModel, data, scheduler, config: TrainingConfig) -> TrainResult:
    """The control of Algorithm 1: exactly the fine-tuning of :func:`one_shot_prune` on a copy, no head removed."""
    return train_dit(prunable_copy(model), data, scheduler, config)
