"""The plan: which runs a study (or ``memsep prune`` on one pipeline) is made of, and where each run's row lives.

Per (setting, base model, seed), in this order: ``original``, ``early_stop`` (studies only), ``finetune_only`` (the
control: the same fine-tuning, no head removed); in a study, the remedies a user applies with one flag:
``weight_decay=<w>`` (a base model trained with that weight decay), copy-free sampling of the original
(``original+copy_free``, and with the early check ``original+copy_free(check)``), of the early-stopped model
(``early_stop+copy_free``) and of each weight-decay base (``weight_decay=<w>+copy_free``); then every method at
each of its etas, each followed by its time-routed run when ``small_t_switch`` is set and, for the methods of
``copy_free_methods``, by its copy-free run (``<method>+copy_free``, the same pruned model sampled copy-free).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..utils import inside_output_dir

BASELINES = ("original", "early_stop", "finetune_only")  # conditions without an eta
#: How a run samples: plainly, copy-free (``avoid_copies=True``) or copy-free with the early check (``copy_check_at``).
SAMPLINGS = ("plain", "copy_free", "copy_free_check")


#: The conditions (rows) of the base models trained with weight decay: ``weight_decay=<w>``.
WEIGHT_DECAY_PREFIX = "weight_decay="


def weight_decay_name(weight_decay: float) -> str:
    """The condition (row) of the base model trained with AdamW weight decay ``weight_decay``."""
    return f"{WEIGHT_DECAY_PREFIX}{weight_decay:g}"


@dataclass(frozen=True)
class Run:
    setting: str
    base: int
    condition: str  # a baseline or a method of pruning.METHODS
    eta: float
    seed: int
    small_t_switch: int | None = None  # time-routed: the pruned model only for timesteps below this
    sampling: str = "plain"  # one of SAMPLINGS

    @property
    def method(self) -> str:
        """The row's name for the condition (a routed run names its switch, a copy-free run its sampling)."""
        name = self.condition if self.small_t_switch is None else f"{self.condition}+routed(t<{self.small_t_switch})"
        return name + {"plain": "", "copy_free": "+copy_free", "copy_free_check": "+copy_free(check)"}[self.sampling]

    @property
    def is_pruned(self) -> bool:
        return self.condition not in BASELINES and not self.condition.startswith(WEIGHT_DECAY_PREFIX)

    @property
    def variant_name(self) -> str:
        return f"{self.method}-eta{self.eta:g}" if self.is_pruned else self.method

    def path(self, output_dir: Path) -> Path:
        routed = "" if self.small_t_switch is None else f"-routed{self.small_t_switch}"
        sampling = "" if self.sampling == "plain" else f"-{self.sampling}"
        name = f"{self.condition}{routed}{sampling}-eta{self.eta:g}-seed{self.seed}.json"
        return inside_output_dir(Path(output_dir) / "runs" / self.setting / f"base-{self.base}" / name, output_dir)


def planned_runs(config, settings: list[str], num_base_models: int, early_stop: bool) -> list[Run]:
    """Every run of ``config`` (a :class:`~diffusers_memsep.study.config.PruningStudyConfig`) on each base model;
    ``early_stop`` (a study) adds the early-stop baseline and the remedies of a
    :class:`~diffusers_memsep.study.config.StudyConfig` (its ``weight_decays`` and ``copy_free``)."""
    baselines = [b for b in BASELINES if early_stop or b != "early_stop"]
    remedies = []
    if early_stop:
        remedies = [(weight_decay_name(w), "plain") for w in config.weight_decays]
        if config.copy_free:
            remedies += [("original", "copy_free"), ("original", "copy_free_check"), ("early_stop", "copy_free")]
            remedies += [(weight_decay_name(w), "copy_free") for w in config.weight_decays]
    runs = []
    for setting in settings:
        for base in range(num_base_models):
            for seed in config.seeds:
                runs += [Run(setting, base, condition, 0.0, seed) for condition in baselines]
                runs += [Run(setting, base, condition, 0.0, seed, sampling=sampling)
                         for condition, sampling in remedies]
                for method in config.methods:
                    for eta in config.etas_of(method):
                        runs.append(Run(setting, base, method, float(eta), seed))
                        if config.small_t_switch is not None:
                            runs.append(Run(setting, base, method, float(eta), seed, config.small_t_switch))
                        if early_stop and config.copy_free and method in config.copy_free_methods:
                            runs.append(Run(setting, base, method, float(eta), seed, sampling="copy_free"))
    return runs
