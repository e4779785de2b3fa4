"""Head pruning in the small-time regime: the paper's Algorithms 1 (one-shot pruning) and 2 (importance scores)."""

from .importance import (
    SMALL_TIME,
    UNIFORM_TIME,
    BetaTime,
    HeadImportance,
    ablation_head_importance,
    random_head_importance,
    small_time_head_importance,
)
from .prune import (
    METHODS,
    PruneResult,
    head_importance,
    number_of_heads_to_prune,
    one_shot_prune,
    select_heads_to_prune,
)

__all__ = [
    "BetaTime",
    "HeadImportance",
    "METHODS",
    "PruneResult",
    "SMALL_TIME",
    "UNIFORM_TIME",
    "ablation_head_importance",
    "head_importance",
    "number_of_heads_to_prune",
    "one_shot_prune",
    "random_head_importance",
    "select_heads_to_prune",
    "small_time_head_importance",
]
