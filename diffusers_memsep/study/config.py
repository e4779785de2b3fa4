"""The engine's settings: :class:`PruningStudyConfig` (what every run does: ``memsep prune``, ``memsep demo``) and
:class:`StudyConfig` (adds base models, replication and the early-stop baseline: ``memsep study``), and the two
profiles of ``memsep study`` (:func:`quick_config`, :func:`full_config`). Measured costs are in ``docs/study.md``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace

from ..evaluate import METRIC_COLUMNS, evaluation_seed
from ..pruning import METHODS
from ..pruning.prune import check_eta
from ..trainer import TrainingConfig
from ..utils import check_etas_remove_heads, check_time_switch
from .settings import DEFAULT_TRAIN_TIMESTEPS, builtin_setting, setting_num_heads

SAMPLERS = ("ddpm", "ddim")


@dataclass
class PruningStudyConfig:
    """What the runs of one base model are; its command-line flags are ``commands/arguments.py``'s
    ``add_pruning_arguments`` (``memsep prune``, ``memsep demo``). Checked on creation."""

    methods: tuple = ("small_t", "random")  # head scores of pruning.METHODS, each run at every eta
    etas: tuple = (0.2,)  # fractions of the heads removed, each in (0, 1)
    method_etas: dict = field(default_factory=dict)  # a method's own etas (default: all etas)
    seeds: tuple = (0, 1, 2)  # run seeds: scores, fine-tuning and evaluation (evaluate.evaluation_seed)
    finetune: TrainingConfig = field(default_factory=lambda: TrainingConfig(max_train_steps=300, lr_warmup_steps=0,
                                                                            show_progress=False))
    importance_batches: int = 16  # batches of the head scores (Algorithm 2)
    importance_batch_size: int = 64  # images per scoring batch
    num_samples: int = 256  # samples per run for the memorization ratios
    num_quality_samples: int | None = None  # samples for precision/recall, Frechet distance, KID (None: num_samples)
    num_inference_steps: int = 100  # steps of the evaluation sampler
    sampler: str = "ddpm"  # the evaluation sampler, one of SAMPLERS
    small_t_switch: int | None = None  # also run each pruned model time-routed: pruned for timesteps < this
    save_variants: bool = True  # save every method-eta variant of the first seed, with its model card
    show_progress: bool = True  # tqdm bars for the runs (and the base models of a study)

    def __post_init__(self):
        unknown = [m for m in (*self.methods, *self.method_etas) if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"unknown pruning method(s) {unknown}; choose from {', '.join(METHODS)}.")
        for eta in (*self.etas, *(e for etas in self.method_etas.values() for e in etas)):
            check_eta(eta, allow_zero=False)  # eta 0 is the finetune_only condition, run anyway
        if not self.seeds:
            raise ValueError("give at least one seed.")
        for seed in self.seeds:
            evaluation_seed(seed)
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}.")
        if self.num_inference_steps < 1 or self.num_samples < 2:
            raise ValueError("num_inference_steps must be >= 1 and num_samples >= 2.")
        if self.num_quality_samples is not None and self.num_quality_samples < 4:
            raise ValueError(f"num_quality_samples must be >= 4 (precision/recall use k = 3), got "
                             f"{self.num_quality_samples}.")

    @property
    def quality_samples(self) -> int:
        return self.num_quality_samples or self.num_samples

    def etas_of(self, method: str) -> tuple:
        return tuple(self.method_etas.get(method, self.etas))

    def all_etas(self) -> list[float]:
        """Every eta some method runs at, each once."""
        return list(dict.fromkeys(eta for method in self.methods for eta in self.etas_of(method)))

    def check_against_model(self, num_heads: int, num_train_timesteps: int) -> None:
        """Refuse, before any scoring, values that make a method a no-op on a model with ``num_heads`` heads present
        and ``num_train_timesteps`` training timesteps: an eta that removes no head (default etas included: a
        method that pruned nothing must not be reported as run) and a ``small_t_switch`` outside the schedule."""
        check_etas_remove_heads(self.all_etas(), num_heads, "--etas")
        check_time_switch(self.small_t_switch, num_train_timesteps)


@dataclass
class StudyConfig(PruningStudyConfig):
    """Everything :func:`~diffusers_memsep.study.run_study` does: the runs of :class:`PruningStudyConfig` on
    ``num_base_models`` base models per setting, plus the ``early_stop`` baseline and the remedies a user applies
    with one flag (weight decay while training, copy-free sampling). Defaults: the full profile, whose budget and
    what it cuts are in ``docs/study.md``."""

    output_dir: str = "outputs/study"  # the study folder (resumable: rerun to continue)
    settings: tuple = field(default_factory=lambda: (builtin_setting("digits8"), builtin_setting("colour16")))
    num_base_models: int = 3  # independently trained base models per setting (subset seed = training seed = index)
    methods: tuple = ("small_t", "random", "memorization_gap")  # the paper's method, its control, the best other
    etas: tuple = (0.25, 0.5)
    base_train: TrainingConfig = field(default_factory=lambda: TrainingConfig(
        max_train_steps=5000, train_batch_size=16, learning_rate=1e-3, lr_warmup_steps=100, ema_max_decay=0.995,
        show_progress=False))  # the base models' training (a setting may change some fields)
    checkpoint_every: int = 500  # steps between the validations (and checkpoints) of the early-stopped run
    early_stop_threshold: float = 0.1  # its stop_at_memorization: the ratio above which a validation memorizes
    curve_num_samples: int = 64  # samples per validation of the early-stopped run (seeds from evaluate.CURVE_SEED)
    weight_decays: tuple = (1.0, 3.0)  # AdamW weight decays of the extra base models (rows weight_decay=<w>)
    copy_free: bool = True  # copy-free rows: original (with and without the early check), early_stop, weight decays
    # and the pruned models of these of `methods` at every eta (rows <method>+copy_free): the pruning that copies least
    copy_free_methods: tuple = ("memorization_gap",)
    max_resamples: int = 20  # redraws per sample of copy-free sampling (MemSepPipeline's max_resamples)
    copy_check_at: float = 0.75  # the early check of the original+copy_free(check) row (MemSepPipeline's)
    finetune: TrainingConfig = field(default_factory=lambda: TrainingConfig(
        max_train_steps=40, train_batch_size=16, lr_warmup_steps=0, show_progress=False))
    importance_batches: int = 4
    importance_batch_size: int = 32
    num_samples: int = 256  # enough that 1% memorized is resolvable (2-3 copies per run)
    num_inference_steps: int = 25
    sampler: str = "ddim"
    save_variants: bool = False  # a study keeps rows, not models
    quality_metric: str = "frechet_distance"  # the y axis of pareto.png
    max_runs: int | None = None  # stop after this many new runs (continue later: the study resumes)
    num_threads: int | None = 1  # torch intra-op threads per process (None: torch's choice); see docs/study.md
    # Processes that run (setting, base model) units side by side; None: one per num_threads available cores.
    # Not part of the signature: a unit's rows do not depend on where it runs.
    num_workers: int | None = None

    def __post_init__(self):
        super().__post_init__()
        if not self.settings or self.num_base_models < 1:
            raise ValueError("give at least one setting and num_base_models >= 1.")
        names = [s.name for s in self.settings]
        if len(set(names)) != len(names):
            raise ValueError(f"setting names must be distinct, got {names}.")
        for setting in self.settings:
            steps = setting.base_train.get("max_train_steps", self.base_train.max_train_steps)
            if self.checkpoint_every < 1 or self.checkpoint_every > steps:
                raise ValueError(f"checkpoint_every must lie in [1, base training steps = {steps}] ({setting.name}), "
                                 f"got {self.checkpoint_every}.")
        if not 0 <= self.early_stop_threshold < 1:
            raise ValueError(f"early_stop_threshold is a memorization ratio in [0, 1), got "
                             f"{self.early_stop_threshold}.")
        if self.curve_num_samples < 1:
            raise ValueError(f"curve_num_samples must be >= 1, got {self.curve_num_samples}.")
        if any(isinstance(w, bool) or not isinstance(w, (int, float)) or not 0 < w for w in self.weight_decays) or \
                len(set(self.weight_decays)) != len(self.weight_decays):
            raise ValueError(f"weight_decays must be distinct AdamW weight decays > 0 (0 is the original model), "
                             f"got {list(self.weight_decays)}; e.g. --weight_decays 0.1 1.")
        unknown = [m for m in self.copy_free_methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown pruning method(s) {unknown} in copy_free_methods; choose from "
                             f"{', '.join(METHODS)} (rows exist for those also in methods).")
        if isinstance(self.max_resamples, bool) or not isinstance(self.max_resamples, int) or self.max_resamples < 0:
            raise ValueError(f"max_resamples must be an integer >= 0, got {self.max_resamples!r}.")
        if not 0 < self.copy_check_at < 1:
            raise ValueError(f"copy_check_at is a fraction of the denoising steps in (0, 1), got "
                             f"{self.copy_check_at!r}; e.g. --copy_check_at 0.75.")
        if self.num_workers is not None and self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1 or None (one per core), got {self.num_workers}.")
        if self.max_runs is not None and self.max_runs < 0:
            raise ValueError(f"max_runs must be >= 0 or None, got {self.max_runs}.")
        if self.quality_metric not in METRIC_COLUMNS:
            raise ValueError(f"--quality_metric {self.quality_metric!r} is not a metric of the runs; choose one of "
                             f"{', '.join(METRIC_COLUMNS)} (e.g. frechet_distance).")
        for setting in self.settings:  # before the first base model trains: its DiT is fixed by the setting
            try:
                self.check_against_model(setting_num_heads(setting), DEFAULT_TRAIN_TIMESTEPS)
            except ValueError as error:
                raise ValueError(f"setting {setting.name!r}: {error}") from None

    def signature(self) -> dict:
        """What a finished run depends on (a rerun with another signature is refused)."""
        keep = ("settings", "base_train", "checkpoint_every", "early_stop_threshold", "curve_num_samples", "finetune",
                "importance_batches", "importance_batch_size", "num_samples", "num_inference_steps", "sampler",
                "max_resamples", "copy_check_at")
        return json.loads(json.dumps({k: v for k, v in asdict(self).items() if k in keep}, default=str))


def quick_config(output_dir: str = "outputs/study-quick", **overrides) -> StudyConfig:
    """A minutes-long end-to-end run of the same code path: tiny models, 2 base models, 2 seeds, few samples.

    Numbers from it show the machinery and the per-run costs, not the answer (the bases barely memorize).
    """
    tiny = dict(num_layers=2, num_attention_heads=4, attention_head_dim=8)
    config = StudyConfig(
        output_dir=output_dir, settings=(builtin_setting("digits8", tiny), builtin_setting("colour16", tiny)),
        num_base_models=2, methods=("small_t", "random", "memorization_gap"), etas=(0.5,), seeds=(0, 1),
        base_train=TrainingConfig(max_train_steps=200, train_batch_size=16, learning_rate=2e-3, lr_warmup_steps=0,
                                  ema_max_decay=0.99, show_progress=False),
        checkpoint_every=50, curve_num_samples=16,
        finetune=TrainingConfig(max_train_steps=20, train_batch_size=16, lr_warmup_steps=0, show_progress=False),
        importance_batches=2, importance_batch_size=16, num_samples=32, num_inference_steps=10)
    return replace(config, **overrides)


def full_config(output_dir: str = "outputs/study", **overrides) -> StudyConfig:
    """The default profile (its budget and measured time: ``docs/study.md``)."""
    return replace(StudyConfig(output_dir=output_dir), **overrides)
