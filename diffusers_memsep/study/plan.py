"""The plan: which runs a study (or ``memsep prune`` on one pipeline) is made of, and where each run's row lives.

Per (setting, base model, seed), in this order: ``original``, ``early_stop`` (studies only), ``finetune_only`` (the
control: the same fine-tuning, no head removed), then every method at each of its etas, each followed by its
time-routed run when ``small_t_switch`` is set.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..utils import inside_output_dir

BASELINES = ("original", "early_stop", "finetune_only")  # conditions without an eta


@dataclass(frozen=True)
class Run:
    setting: str
    base: int
    condition: str  # a baseline or a method of pruning.METHODS
    eta: float
    seed: int
    small_t_switch: int | None = None  # time-routed: the pruned model only for timesteps below this

    @property
    def method(self) -> str:
        """The row's name for the condition (a routed run names its switch)."""
        return self.condition if self.small_t_switch is None else f"{self.condition}+routed(t<{self.small_t_switch})"

    @property
    def variant_name(self) -> str:
        return self.method if self.condition in BASELINES else f"{self.method}-eta{self.eta:g}"

    def path(self, output_dir: Path) -> Path:
        routed = "" if self.small_t_switch is None else f"-routed{self.small_t_switch}"
        name = f"{self.condition}{routed}-eta{self.eta:g}-seed{self.seed}.json"
        return inside_output_dir(Path(output_dir) / "runs" / self.setting / f"base-{self.base}" / name, output_dir)


def planned_runs(config, settings: list[str], num_base_models: int, early_stop: bool) -> list[Run]:
    """Every run of ``config`` (a :class:`~diffusers_memsep.study.config.PruningStudyConfig`) on each base model."""
    baselines = [b for b in BASELINES if early_stop or b != "early_stop"]
    runs = []
    for setting in settings:
        for base in range(num_base_models):
            for seed in config.seeds:
                runs += [Run(setting, base, condition, 0.0, seed) for condition in baselines]
                for method in config.methods:
                    for eta in config.etas_of(method):
                        runs.append(Run(setting, base, method, float(eta), seed))
                        if config.small_t_switch is not None:
                            runs.append(Run(setting, base, method, float(eta), seed, config.small_t_switch))
    return runs
