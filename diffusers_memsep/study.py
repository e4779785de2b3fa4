"""The replicated pruning study (``memsep study``): does head pruning beat its controls, beyond seed noise?

One seed of one trained model cannot separate pruning methods: their differences sit inside seed noise. This study
replicates everything that varies: per setting (data set), several INDEPENDENTLY trained base models (base ``b``
trains on the subset chosen with seed ``b``, with training seed ``b``), and per base model every condition on
several seeds:

- ``original``: the base model, unpruned and not fine-tuned;
- ``finetune_only`` (eta 0): exactly the fine-tuning every pruned row gets, with no head removed (the control for
  the fine-tuning itself: :func:`~diffusers_memsep.pruning.one_shot_prune` with ratio 0, same code path);
- the head scores of :data:`~diffusers_memsep.pruning.METHODS` (``small_t`` is the paper's Algorithm 2), each at
  every eta: score, remove ``floor(eta * H)`` heads, fine-tune (Ye et al. 2025, Section 6, Algorithm 1);
- ``early_stop``: the base model's own checkpoint from just before its memorization ratio first exceeds
  ``early_stop_threshold`` (the zero-cost baseline: stop training before memorization starts).

Seeds: for seed ``s`` the scores and the fine-tuning use seed ``s`` and the evaluation samples with seed
``1000 * s`` (same labels, same noise for every condition), so every row has a paired row in each other condition
with the same (setting, base model, seed). Statistics (:func:`compare`): the paired differences against ``random``
(same eta) and against ``finetune_only``, with 95% t-intervals.

Resumable: each finished run is one JSON file under ``<output_dir>/runs/`` written atomically; a rerun skips
finished runs, reuses trained base models (``<output_dir>/bases/``) and only runs what is missing. The settings that
decide what a finished run means (data, models, training, fine-tuning, evaluation) are kept in ``study.json``; a
rerun with other ones is refused. Methods, etas, seeds and the number of base models may change between runs
(more of them adds runs; fewer reports fewer).

Choices the paper leaves open:

- Early-stopping threshold: 0.1 by default, an absolute memorization ratio (not relative to the final model), so
  every base model is stopped at the same level of copying. The 1/3 rule flags few samples of a model that does
  not memorize (the first checkpoints of the digits base models measure 0 to 5%), and the memorizing regime
  measures 40 to 60%, so 0.1 is just above the rule's floor: "before memorization starts". The ratio per
  checkpoint is measured with the evaluation sampler on ``curve_num_samples`` samples; the chosen checkpoint is
  the one just BEFORE the first checkpoint above the threshold (if the very first one is above it, the first is
  used and the report says so; if none is, the final model is used).
- Confidence intervals: Student t on the paired differences, ``mean +- t_{0.975, n-1} * sd / sqrt(n)`` over the
  n = (base models x seeds) pairs. The seeds of one base model share that model, so the pairs are not fully
  independent; the interval is therefore somewhat optimistic, and the base-model count is the first thing to
  raise for a firmer verdict. Verdict on each axis: "better" / "worse" when the whole interval lies on one side of 0
  (in the metric's good direction), else "not distinguishable".
- Metric directions: ``precision`` and ``recall`` are better high; every other metric column (memorization
  ratio, Frechet distance, KID, ...) is better low.
- Settings are analysed separately (quality metrics live in different feature spaces).
- One torch thread per process by default (``num_threads=1``): the study's DiTs are tiny, and on a loaded CPU two
  intra-op threads spin against each other (measured on the shared 2-core machine: 30 training steps of the
  quick model took 4.3 s with one thread and 65 s with two).

Budget of the full profile (the defaults of :class:`StudyConfig`, ``memsep study`` without flags): 2 settings x 4
base models x 5,000 steps, and per base model and seed ``original``, ``early_stop``, ``finetune_only`` and all six
methods at etas 0.25, 0.5 and 0.75 (21 runs; 504 in all). Measured on the idle 2-core CPU, one torch thread per
process, two processes side by side: a base model trains 5,000 steps in 289-311 s (about 0.06 s per step on
either setting, as both DiTs see 16 tokens) and measures its 10 checkpoints in 12-13 s; a run takes 1.2-1.3 s without
fine-tuning (64 samples, DDIM-25) and 3.0-4.0 s with score + 40 fine-tuning steps (memorization_gap and ablation
6-8 s with their scores; a score is computed once per (method, seed) and reused at the three etas). Arithmetic,
two workers::

    base models: 8 x 300 s / 2                                              = 1,200 s
    runs: 24 (base model, seed) x (2 x 1.3 s + 19 x 3.6 s + 4 extra score s) / 2  =   900 s
    total about 35 min; measured for the whole run: 37.0 min

What was cut to fit the hour (against what one would run with more time): 40 fine-tuning steps (the demo uses
300); 64 samples with DDIM-25 per run (the demo: 128 with DDIM-50); head scores from 4 batches of 32; one
evaluation seed per run (the seeds vary the scores, the fine-tuning and the sampling together).

Workers: the (setting, base model) units are independent, so :func:`run_study` runs them in ``num_workers``
spawned processes (default: one per core at one torch thread each). Each unit seeds its own initial weights,
fine-tuning and sampling, so its rows are bit-identical to a one-process run (tested); only wall time changes.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

from .data import TrainingData, held_out_from_population, load_training_data, with_held_out
from .evaluate import QualityReference, balanced_labels, evaluate_pipeline
from .memorization import resolve_feature_space
from .mitigation import sampling_scheduler, training_scheduler
from .pipelines import MemSepPipeline
from .pruning import METHODS, one_shot_prune
from .trainer import (
    TrainingConfig,
    build_pipeline,
    list_checkpoints,
    make_dit,
    make_noise_scheduler,
    sample_and_measure,
    train_pipeline,
)
from .utils import check_writable_dir, save_figure, write_csv, write_text

BASELINES = ("original", "early_stop", "finetune_only")  # conditions without an eta
HIGHER_IS_BETTER = {"precision", "recall"}
#: Numeric row fields that are bookkeeping, not metrics.
NOT_METRICS = {"eta", "seed", "base", "sampling_seconds", "pruned_heads", "run_seconds", "step"}
BUILTIN_SETTINGS = ("digits8", "colour16")


@dataclass
class StudySetting:
    """One data set of the study: where its images come from, how many train a base model, the DiT to train.

    ``builtin="colour16"`` builds the second offline setting: the embedded digits upsampled to 16x16 RGB, each
    image tinted with a fixed random colour, written as an image folder under the output folder. Otherwise the
    data flags of ``memsep train`` (``dataset_name``, ``train_data_dir``, ...) choose the images; with none of them,
    the embedded 8x8 digits. ``validation_data_dir``: held-out images for ``memorization_gap`` (default: the
    population minus the training subset).
    """

    name: str
    builtin: str | None = None
    dataset_name: str | None = None
    dataset_config_name: str | None = None
    train_data_dir: str | None = None
    validation_data_dir: str | None = None
    image_column: str = "image"
    label_column: str | None = None
    resolution: int | None = None
    num_train_samples: int = 16
    model: dict = field(default_factory=dict)  # keyword arguments of make_dit
    base_train: dict = field(default_factory=dict)  # this setting's changes to StudyConfig.base_train (e.g. the lr)

    def data_kwargs(self, output_dir: Path) -> dict:
        folder = colour_digits_folder(output_dir) if self.builtin == "colour16" else self.train_data_dir
        return dict(dataset_name=self.dataset_name, dataset_config_name=self.dataset_config_name,
                    train_data_dir=folder, image_column=self.image_column, label_column=self.label_column,
                    resolution=self.resolution)


def builtin_setting(name: str, model: dict | None = None) -> StudySetting:
    if name == "digits8":
        return StudySetting("digits8", model=dict(model or {}))
    if name == "colour16":
        # 16x16x3 = 768 numbers per image against 64. Measured with one base model (seed 0, 64 DDIM-25 samples):
        # the digits' recipe (16 images, lr 1e-3) copies 0% at 5,000 steps, also with lr 2e-3 or nearest upsampling;
        # 8 images at lr 2e-3 copy 3-17% at 5,000; 4 images at lr 2e-3 copy 11% at 3,000 and 50% at 4,000 steps,
        # the memorizing regime the study needs within the hour.
        return StudySetting("colour16", builtin="colour16", model=dict(model or {}, patch_size=4),
                            num_train_samples=4, base_train={"learning_rate": 2e-3})
    raise ValueError(f"unknown built-in setting {name!r}; choose from {', '.join(BUILTIN_SETTINGS)}.")


@dataclass
class StudyConfig:
    """Everything :func:`run_study` does. ``method_etas`` restricts a method to some etas (default: all ``etas``)."""

    output_dir: str = "outputs/study"
    settings: tuple = field(default_factory=lambda: (builtin_setting("digits8"), builtin_setting("colour16")))
    num_base_models: int = 4
    methods: tuple = METHODS
    etas: tuple = (0.25, 0.5, 0.75)
    method_etas: dict = field(default_factory=dict)
    seeds: tuple = (0, 1, 2)
    base_train: TrainingConfig = field(default_factory=lambda: TrainingConfig(
        max_train_steps=5000, train_batch_size=16, learning_rate=1e-3, lr_warmup_steps=100, ema_max_decay=0.995,
        show_progress=False))
    checkpoint_every: int = 500
    early_stop_threshold: float = 0.1
    curve_num_samples: int = 64
    finetune: TrainingConfig = field(default_factory=lambda: TrainingConfig(
        max_train_steps=40, train_batch_size=16, lr_warmup_steps=0, show_progress=False))
    importance_batches: int = 4
    importance_batch_size: int = 32
    num_samples: int = 64
    num_inference_steps: int = 25
    sampler: str = "ddim"
    quality_metric: str = "frechet_distance"
    max_runs: int | None = None  # stop after this many new runs (continue later: the study resumes)
    num_threads: int | None = 1  # torch intra-op threads (None: leave torch's choice); see the module docstring
    # Processes that run (setting, base model) units side by side; None: one per num_threads available cores.
    # Not part of the signature: a unit's rows do not depend on where it runs.
    num_workers: int | None = None
    show_progress: bool = True

    def __post_init__(self):
        unknown = [m for m in (*self.methods, *self.method_etas) if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method(s) {unknown}; choose from {', '.join(METHODS)}.")
        for eta in (*self.etas, *(e for etas in self.method_etas.values() for e in etas)):
            if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0 < eta < 1:
                raise ValueError(f"eta must lie in (0, 1), got {eta!r} (0.25 prunes a quarter of the heads).")
        if not self.settings or not self.seeds or self.num_base_models < 1:
            raise ValueError("give at least one setting, one seed and num_base_models >= 1.")
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
        if self.num_samples < 2 or self.curve_num_samples < 1 or self.num_inference_steps < 1:
            raise ValueError("num_samples must be >= 2, curve_num_samples and num_inference_steps >= 1.")
        if self.num_workers is not None and self.num_workers < 1:
            raise ValueError(f"num_workers must be >= 1 or None (one per core), got {self.num_workers}.")
        if self.max_runs is not None and self.max_runs < 0:
            raise ValueError(f"max_runs must be >= 0 or None, got {self.max_runs}.")

    def etas_of(self, method: str) -> tuple:
        return tuple(self.method_etas.get(method, self.etas))

    def signature(self) -> dict:
        """What a finished run depends on (a rerun with another signature is refused)."""
        keep = ("settings", "base_train", "checkpoint_every", "early_stop_threshold", "curve_num_samples", "finetune",
                "importance_batches", "importance_batch_size", "num_samples", "num_inference_steps", "sampler")
        return json.loads(json.dumps({k: v for k, v in asdict(self).items() if k in keep}, default=str))


def quick_config(output_dir: str = "outputs/study-quick", **overrides) -> StudyConfig:
    """A ~2-3 minute end-to-end run of the same code path: tiny models, 2 base models, 2 seeds, few samples.

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
    """The default profile (under an hour on an idle 2-core CPU; the arithmetic is in the module docstring)."""
    return replace(StudyConfig(output_dir=output_dir), **overrides)


# ---------------------------------------------------------------------------------------------------- data
def colour_digits_folder(output_dir: Path) -> str:
    """Write (once) the 1,797 digits as 16x16 RGB PNGs, image ``i`` tinted by colour ``i`` of a seed-0 draw."""
    from PIL import Image
    from sklearn.datasets import load_digits

    folder = Path(output_dir) / "data" / "colour16-digits"
    pixels = load_digits().images  # [1797, 8, 8], 0..16
    if folder.is_dir() and len(list(folder.glob("*.png"))) == len(pixels):
        return str(folder)
    colours = 0.25 + 0.75 * torch.rand(len(pixels), 3, generator=torch.Generator().manual_seed(0))
    temporary = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    for index, (grey, colour) in enumerate(zip(pixels, colours)):
        large = Image.fromarray((grey / 16 * 255).round().astype("uint8"), mode="L").resize(
            (16, 16), Image.Resampling.BILINEAR)
        rgb = torch.from_numpy(np.array(large)).float()[..., None] * colour
        Image.fromarray(rgb.round().clamp(0, 255).to(torch.uint8).numpy(), mode="RGB").save(
            temporary / f"{index:04d}.png")
    shutil.rmtree(folder, ignore_errors=True)
    temporary.rename(folder)
    return str(folder)


@dataclass
class SettingData:
    population: TrainingData  # every image of the setting: the quality reference
    held_out_dir: TrainingData | None  # the user's held-out folder, if any
    feature_space: object  # the quality metrics' feature space, resolved once per setting


def load_setting(setting: StudySetting, output_dir: Path) -> SettingData:
    kwargs = setting.data_kwargs(output_dir)
    population = load_training_data(**kwargs)
    if setting.num_train_samples >= len(population):
        raise ValueError(f"setting {setting.name!r}: num_train_samples={setting.num_train_samples} leaves no "
                         f"held-out image of the {len(population)}; train on fewer images.")
    held_out = None
    if setting.validation_data_dir:
        held_out = load_training_data(**{**kwargs, "dataset_name": None,
                                         "train_data_dir": setting.validation_data_dir})
    # "auto": the digits classifier for the embedded digits, else a small CNN trained once on the population and
    # cached under the output folder (reused by every run and every rerun).
    feature_space = resolve_feature_space("auto", population, output_dir / "feature_networks" / setting.name)
    return SettingData(population, held_out, feature_space)


def base_training_data(setting: StudySetting, output_dir: Path, base: int, setting_data: SettingData):
    """The training subset of base model ``base`` (subset seed = ``base``), carrying its held-out images."""
    train = load_training_data(**setting.data_kwargs(output_dir), max_train_samples=setting.num_train_samples,
                               seed=base)
    held_out = setting_data.held_out_dir or held_out_from_population(setting_data.population, train)
    return with_held_out(train, held_out)


# ------------------------------------------------------------------------------------------- base models
@dataclass
class BaseModel:
    pipeline: MemSepPipeline  # the final model (row "original")
    early_stop: MemSepPipeline  # the checkpoint before memorization (row "early_stop")
    curve: dict  # steps, ratios, chosen step, timings


def base_dir(output_dir: Path, setting: StudySetting, base: int) -> Path:
    return output_dir / "bases" / setting.name / f"base-{base}"


def prepare_base_model(config: StudyConfig, setting: StudySetting, base: int,
                       data: TrainingData) -> tuple[BaseModel, bool]:
    """Train (or reload) base model ``base``: checkpoints every ``checkpoint_every`` steps, its memorization curve
    and the early-stop checkpoint, kept as pipeline folders. Returns the model and whether it was trained now."""
    folder = base_dir(Path(config.output_dir), setting, base)
    curve_path, early_dir = folder / "memorization_curve.json", folder.with_name(folder.name + "-early_stop")
    if curve_path.is_file() and (early_dir / "model_index.json").is_file() and (folder / "model_index.json").is_file():
        return BaseModel(_load(folder), _load(early_dir), json.loads(curve_path.read_text())), False

    scheduler = make_noise_scheduler()
    with torch.random.fork_rng(devices=[]):  # initial weights from seed ``base``, whatever ran before in the process
        torch.manual_seed(base)
        model = make_dit(sample_size=data.resolution, in_channels=data.num_channels, num_classes=data.num_classes,
                         **setting.model)
    train_config = replace(config.base_train, **setting.base_train, seed=base,
                           checkpointing_steps=config.checkpoint_every, checkpoints_total_limit=None)
    start = time.perf_counter()
    # A half-trained base model (killed mid-run) continues from its latest checkpoint.
    trained = train_pipeline(folder, data, model, scheduler, train_config, overwrite_output_dir=True,
                             resume_from_checkpoint="latest", report_to="none", validation_num_samples=0)
    train_seconds = time.perf_counter() - start

    start, steps, ratios = time.perf_counter(), [], []
    eval_scheduler = sampling_scheduler(trained.pipeline, config.sampler)
    for checkpoint in list_checkpoints(folder):
        steps.append(int(checkpoint.name.split("-")[-1]))
        pipe = _checkpoint_pipeline(checkpoint, scheduler, data)
        pipe.set_progress_bar_config(disable=True)
        ratios.append(sample_and_measure(pipe, config.curve_num_samples, config.num_inference_steps,
                                         data.num_classes, seed=0, scheduler=eval_scheduler)[1])
    chosen, note = early_stop_choice(steps, ratios, config.early_stop_threshold)
    early = _checkpoint_pipeline(folder / f"checkpoint-{chosen}", scheduler, data)
    early.save_pretrained(early_dir, safe_serialization=True)
    curve = {"steps": steps, "memorization_ratio": ratios, "early_stop_step": chosen, "note": note,
             "threshold": config.early_stop_threshold, "train_seconds": round(train_seconds, 2),
             "curve_seconds": round(time.perf_counter() - start, 2), "training_subset": data.indices}
    write_text(curve_path, json.dumps(curve, indent=1))  # last: marks the base model complete
    for checkpoint in list_checkpoints(folder):  # optimizer states are not needed any more (disk)
        shutil.rmtree(checkpoint)
    return BaseModel(trained.pipeline, _load(early_dir), curve), True


def early_stop_choice(steps: list[int], ratios: list[float], threshold: float) -> tuple[int, str]:
    """The checkpoint just before the ratio first exceeds ``threshold`` (see the module docstring)."""
    first_above = next((i for i, ratio in enumerate(ratios) if ratio > threshold), None)
    if first_above is None:
        return steps[-1], "never above the threshold: the final model"
    if first_above == 0:
        return steps[0], "already above the threshold at the first checkpoint: the first checkpoint"
    return steps[first_above - 1], ""


def _checkpoint_pipeline(checkpoint: Path, scheduler, data) -> MemSepPipeline:
    from diffusers.utils import logging as diffusers_logging

    from .models import PrunableDiTTransformer2DModel

    sub = "transformer_ema" if (checkpoint / "transformer_ema").is_dir() else "transformer"
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # the EMA's own fields (decay, ...) in its config.json are not the model's
    try:
        model = PrunableDiTTransformer2DModel.from_pretrained(checkpoint / sub, use_safetensors=True).eval()
    finally:
        diffusers_logging.set_verbosity(verbosity)
    return build_pipeline(model, scheduler, data)


def _load(folder: Path) -> MemSepPipeline:
    pipe = MemSepPipeline.from_pretrained(folder)
    pipe.transformer.eval()
    return pipe


# --------------------------------------------------------------------------------------------------- runs
@dataclass(frozen=True)
class Run:
    setting: str
    base: int
    condition: str
    eta: float
    seed: int

    def path(self, output_dir: Path) -> Path:
        name = f"{self.condition}-eta{self.eta:g}-seed{self.seed}.json"
        return output_dir / "runs" / self.setting / f"base-{self.base}" / name


def planned_runs(config: StudyConfig) -> list[Run]:
    runs = []
    for setting in config.settings:
        for base in range(config.num_base_models):
            for seed in config.seeds:
                runs += [Run(setting.name, base, condition, 0.0, seed) for condition in BASELINES]
                runs += [Run(setting.name, base, method, float(eta), seed)
                         for method in config.methods for eta in config.etas_of(method)]
    return runs


@dataclass
class StudyResult:
    rows: list[dict]
    summary: list[dict]
    executed_runs: int
    skipped_runs: int
    missing_runs: int
    trained_base_models: int
    report_path: Path
    seconds: float


def run_study(config: StudyConfig) -> StudyResult:
    """Run (or continue) the study and write ``runs.csv``, ``summary.csv``, ``pareto.png`` and ``report.md``."""
    threads = torch.get_num_threads()
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    try:
        return _run_study(config)
    finally:
        torch.set_num_threads(threads)


def number_of_workers(config: StudyConfig, num_units: int) -> int:
    """``config.num_workers``, or by default one process per ``num_threads`` cores available, at most one per unit."""
    if config.num_workers is not None:
        return max(1, min(config.num_workers, num_units))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores // (config.num_threads or cores), num_units))


def _run_study(config: StudyConfig) -> StudyResult:
    from tqdm.auto import tqdm

    start = time.perf_counter()
    output_dir = check_writable_dir(config.output_dir)
    _check_signature(config, output_dir)
    runs = planned_runs(config)
    pending = [run for run in runs if not run.path(output_dir).is_file()]
    todo = pending if config.max_runs is None else pending[: config.max_runs]
    progress = tqdm(total=len(runs), initial=len(runs) - len(pending), desc="study runs",
                    disable=not config.show_progress)
    # Every data set is read (and the colour16 folder written, the feature networks trained and cached) here, before
    # the first training step and before any worker starts: a bad path fails now, not after an hour, and workers
    # only read caches.
    loaded = {s.name: load_setting(s, output_dir) for s in config.settings if any(r.setting == s.name for r in todo)}
    write_text(output_dir / "study.json", json.dumps(config.signature(), indent=1))
    units = [(setting, base) for setting in config.settings
             for base in sorted({run.base for run in todo if run.setting == setting.name})]
    workers = number_of_workers(config, len(units))
    if workers == 1:
        executed, trained_bases = 0, 0
        for setting, base in units:
            unit_runs = [r for r in todo if r.setting == setting.name and r.base == base]
            done, trained = run_unit(config, setting, base, unit_runs, loaded[setting.name], progress)
            executed, trained_bases = executed + done, trained_bases + trained
    else:
        executed, trained_bases = _run_units_in_workers(config, units, todo, workers, progress)
    progress.close()

    rows = [json.loads(run.path(output_dir).read_text()) for run in runs if run.path(output_dir).is_file()]
    summary = compare(rows) if rows else []
    report_path = output_dir / "report.md"
    if rows and config.quality_metric not in metric_columns(rows):
        raise ValueError(f"quality_metric {config.quality_metric!r} is not a metric column of the runs "
                         f"({', '.join(metric_columns(rows))}); rerun with one of them (finished runs are kept).")
    if rows:
        write_csv(rows, output_dir / "runs.csv")
        write_csv(summary, output_dir / "summary.csv")
        plot_pareto(summary, output_dir / "pareto.png", config.quality_metric)
        write_text(report_path, study_report(config, rows, summary, len(runs)))
    return StudyResult(rows, summary, executed, len(runs) - len(pending), len(runs) - len(rows), trained_bases,
                       report_path, time.perf_counter() - start)


def run_unit(config: StudyConfig, setting: StudySetting, base: int, unit_runs: list[Run], setting_data: SettingData,
             progress=None) -> tuple[int, bool]:
    """One unit of work: train (or reload) base model ``base`` of ``setting`` and execute ``unit_runs`` on it, each
    written as one atomic JSON file as soon as it is finished. Returns (runs executed, whether the base was trained).

    A head score does not depend on eta (Algorithm 1 ranks the heads once and removes the lowest ``floor(eta * H)``),
    so the scores of one (method, seed) are computed once and reused at every eta: the etas of one score prune
    nested sets of heads, and a resumed study recomputes exactly the same scores (same model, same seeded generator).
    """
    output_dir = Path(config.output_dir)
    data = base_training_data(setting, output_dir, base, setting_data)
    if progress is not None:
        progress.set_postfix_str(f"{setting.name} base {base}: training")
    model, trained = prepare_base_model(config, setting, base, data)
    quality = QualityReference.build(setting_data.feature_space, setting_data.population.images, data.images,
                                     setting_data.population.source)  # population features: once per base model
    scores: dict = {}
    for run in unit_runs:
        if progress is not None:
            progress.set_postfix_str(f"{setting.name} base {base}: {run.condition} eta {run.eta:g} seed {run.seed}")
        row = execute_run(config, run, model, data, quality, scores)
        write_text(run.path(output_dir), json.dumps(row, indent=1))  # one atomic file per finished run
        if progress is not None:
            progress.update()
    return len(unit_runs), trained


_WORKER_SETTINGS: dict = {}  # per worker process: the settings it has loaded (from the main process's caches)


def _run_unit_in_worker(config: StudyConfig, setting_name: str, base: int, unit_runs: list[Run]) -> tuple[int, bool]:
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    setting = next(s for s in config.settings if s.name == setting_name)
    if setting_name not in _WORKER_SETTINGS:
        _WORKER_SETTINGS[setting_name] = load_setting(setting, Path(config.output_dir))
    return run_unit(config, setting, base, unit_runs, _WORKER_SETTINGS[setting_name])


def _run_units_in_workers(config: StudyConfig, units, todo: list[Run], workers: int, progress) -> tuple[int, int]:
    """The units in ``workers`` spawned processes (one torch thread each by default). Every unit is independent and
    seeded on its own, so the rows are the same as in one process; progress counts the finished run files."""
    import multiprocessing
    from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait

    output_dir = Path(config.output_dir)
    quiet = replace(config, show_progress=False)
    progress.set_postfix_str(f"{len(units)} base models on {workers} worker processes")
    before = progress.n
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_run_unit_in_worker, quiet, setting.name, base,
                               [r for r in todo if r.setting == setting.name and r.base == base])
                   for setting, base in units]
        pending = set(futures)
        while pending:
            _, pending = wait(pending, timeout=5, return_when=FIRST_EXCEPTION)
            progress.n = before + sum(run.path(output_dir).is_file() for run in todo)
            progress.refresh()
            failed = [f for f in futures if f.done() and f.exception() is not None]
            if failed:
                for future in pending:
                    future.cancel()
                raise failed[0].exception()  # the finished runs are on disk: a rerun continues from them
    results = [future.result() for future in futures]
    return sum(done for done, _ in results), sum(trained for _, trained in results)


def execute_run(config: StudyConfig, run: Run, model: BaseModel, data, real_images,
                scores: dict | None = None) -> dict:
    """One row: prune/fine-tune as the condition says, then evaluate with evaluation seed ``1000 * seed``.

    ``scores``: a cache of head scores by (method, seed) for this base model (:func:`run_unit`), filled here."""
    start = time.perf_counter()
    pipe = model.early_stop if run.condition == "early_stop" else model.pipeline
    transformer, pruned_heads = pipe.transformer, 0
    if run.condition not in ("original", "early_stop"):
        method = "random" if run.condition == "finetune_only" else run.condition  # ratio 0: no head is removed
        scores = {} if scores is None else scores
        pruned = one_shot_prune(pipe.transformer, data, training_scheduler(pipe), eta=run.eta, method=method,
                                finetune_config=replace(config.finetune, seed=run.seed),
                                num_batches=config.importance_batches, batch_size=config.importance_batch_size,
                                generator=torch.Generator().manual_seed(run.seed),
                                importance=scores.get((method, run.seed)))
        scores[(method, run.seed)] = pruned.importance
        transformer, pruned_heads = pruned.model, sum(len(h) for h in pruned.pruned_heads.values())
    variant = MemSepPipeline(transformer=transformer, scheduler=sampling_scheduler(pipe, config.sampler),
                             reference=pipe.reference, label_dropout_prob=pipe.config.get("label_dropout_prob"))
    variant.set_progress_bar_config(disable=True)
    result = evaluate_pipeline(variant, run.condition, data.images, real_images, num_samples=config.num_samples,
                               num_inference_steps=config.num_inference_steps, seed=1000 * run.seed,
                               class_labels=balanced_labels(config.num_samples, data.num_classes))
    row = {"setting": run.setting, "base": run.base, "method": run.condition, "eta": run.eta, "seed": run.seed,
           **result.row(), "pruned_heads": pruned_heads, "run_seconds": round(time.perf_counter() - start, 3)}
    if run.condition == "early_stop":
        row["step"] = model.curve["early_stop_step"]
    return row


def _check_signature(config: StudyConfig, output_dir: Path) -> None:
    path = output_dir / "study.json"
    signature = config.signature()
    if path.is_file():
        stored = json.loads(path.read_text())
        if stored != signature:
            changed = sorted(k for k in set(stored) | set(signature) if stored.get(k) != signature.get(k))
            raise ValueError(f"{str(output_dir)!r} holds a study with other settings ({', '.join(changed)}); rerun "
                             "with the same settings to continue it, or choose another --output_dir.")


# --------------------------------------------------------------------------------------------- statistics
def t_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """``(mean, low, high)``: Student t interval of the mean (NaN bounds for fewer than 2 values)."""
    from scipy.stats import t as student_t

    n = len(values)
    if n == 0:
        return math.nan, math.nan, math.nan
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan, math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(student_t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def verdict(low: float, high: float, metric: str) -> str:
    """``better`` / ``worse`` when the interval of (method - control) excludes 0, else ``not distinguishable``."""
    if math.isnan(low) or math.isnan(high) or low <= 0 <= high:
        return "not distinguishable"
    lower = high < 0
    return "better" if lower != (metric in HIGHER_IS_BETTER) else "worse"


def metric_columns(rows: list[dict]) -> list[str]:
    """Every numeric column present in all rows that is not bookkeeping (new metrics are picked up as they come)."""
    # Counts (num_*) and standard errors (*_se) describe a measurement; they are not one.
    columns = [k for k in rows[0] if k not in NOT_METRICS and not k.startswith("num_") and not k.endswith("_se")]
    return [k for k in columns if all(isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool)
                                      for r in rows)]


def paired_differences(rows: list[dict], method: str, eta: float, control: str, control_eta: float, metric: str,
                       setting: str) -> list[float]:
    """``method - control`` for every (base model, seed) that both conditions have, in ``setting``."""
    def index(name, value):
        return {(r["base"], r["seed"]): float(r[metric]) for r in rows
                if r["setting"] == setting and r["method"] == name and float(r["eta"]) == value}

    own, other = index(method, eta), index(control, control_eta)
    return [own[key] - other[key] for key in sorted(own) if key in other]


def compare(rows: list[dict]) -> list[dict]:
    """One row per (setting, method, eta): mean and 95% t-interval of every metric, and the paired differences
    against ``random`` (same eta), ``finetune_only`` (the fine-tuning control) and ``early_stop`` (the free
    baseline every mitigation must beat), each with its interval and verdict."""
    metrics = metric_columns(rows)
    groups = list(dict.fromkeys((r["setting"], r["method"], float(r["eta"])) for r in rows))
    summary = []
    for setting, method, eta in groups:
        members = [r for r in rows if (r["setting"], r["method"], float(r["eta"])) == (setting, method, eta)]
        entry = {"setting": setting, "method": method, "eta": eta, "runs": len(members)}
        for metric in metrics:
            entry[metric], entry[f"{metric}_low"], entry[f"{metric}_high"] = t_interval([float(m[metric])
                                                                                        for m in members])
        controls = [("finetune_only", "finetune_only", 0.0), ("early_stop", "early_stop", 0.0)]
        if method not in BASELINES and method != "random":
            controls.insert(0, ("random", "random", eta))
        for label, control, control_eta in controls:
            if method == control:
                continue
            for metric in metrics:
                differences = paired_differences(rows, method, eta, control, control_eta, metric, setting)
                if not differences:  # the control was not run (yet): no comparison
                    continue
                mean, low, high = t_interval(differences)
                entry[f"vs_{label}_{metric}"] = mean
                entry[f"vs_{label}_{metric}_low"], entry[f"vs_{label}_{metric}_high"] = low, high
                entry[f"vs_{label}_{metric}_pairs"] = len(differences)
                entry[f"vs_{label}_{metric}_verdict"] = verdict(low, high, metric)
        summary.append(entry)
    return summary


# ------------------------------------------------------------------------------------------ figure, report
def plot_pareto(summary: list[dict], path, quality_metric: str = "frechet_distance") -> None:
    """Per setting: memorization ratio (x) against quality (y), each method a curve over eta with 95% interval
    bars; ``original``, ``finetune_only`` and ``early_stop`` as single points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = list(dict.fromkeys(row["setting"] for row in summary))
    figure, axes = plt.subplots(1, len(settings), figsize=(6.2 * len(settings), 4.8), squeeze=False)
    markers = {"original": "*", "finetune_only": "s", "early_stop": "D"}
    for axis, setting in zip(axes[0], settings):
        rows = [r for r in summary if r["setting"] == setting and quality_metric in r]
        for method in dict.fromkeys(r["method"] for r in rows):
            curve = sorted((r for r in rows if r["method"] == method), key=lambda r: r["eta"])
            x = [r["memorization_ratio"] for r in curve]
            y = [r[quality_metric] for r in curve]
            xerr = _error_bars(curve, "memorization_ratio")
            yerr = _error_bars(curve, quality_metric)
            style = dict(fmt=markers.get(method, "o") + ("" if method in markers else "-"), capsize=3,
                         markersize=9 if method in markers else 5, label=method)
            axis.errorbar(x, y, xerr=xerr, yerr=yerr, **style)
            if method not in markers:
                for r in curve:
                    axis.annotate(f"{r['eta']:g}", (r["memorization_ratio"], r[quality_metric]), fontsize=7,
                                  xytext=(3, 3), textcoords="offset points")
        axis.set_xlabel("memorization ratio (lower: less copying)")
        axis.set_ylabel(f"{quality_metric} (lower is better)" if quality_metric not in HIGHER_IS_BETTER
                        else f"{quality_metric} (higher is better)")
        axis.set_title(f"{setting}: mean and 95% t-interval over base models x seeds; labels: eta", fontsize=9)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    save_figure(figure, path)


def _error_bars(rows, metric):
    lows = [0.0 if math.isnan(r[f"{metric}_low"]) else r[metric] - r[f"{metric}_low"] for r in rows]
    highs = [0.0 if math.isnan(r[f"{metric}_high"]) else r[f"{metric}_high"] - r[metric] for r in rows]
    return [lows, highs]


def _interval(entry, key, sign: str = "+") -> str:
    """``mean [low, high]`` (signed for differences: ``sign="+"``; plain for means: ``sign=""``)."""
    low, high = entry.get(key + "_low", math.nan), entry.get(key + "_high", math.nan)
    if math.isnan(low):
        return f"{entry[key]:{sign}.3f} (n < 2)"
    return f"{entry[key]:{sign}.3f} [{low:{sign}.3f}, {high:{sign}.3f}]"


def study_report(config: StudyConfig, rows: list[dict], summary: list[dict], planned: int) -> str:
    metrics = metric_columns(rows)
    lines = ["# Replicated pruning study", "",
             f"{len(rows)} of {planned} planned runs finished. Settings: "
             f"{', '.join(s.name for s in config.settings)}; {config.num_base_models} base models per setting "
             f"(subset seed = training seed = base index), seeds {list(config.seeds)} per condition.",
             f"Base training: {config.base_train.max_train_steps} steps, batch {config.base_train.train_batch_size}, "
             f"lr {config.base_train.learning_rate:g} (unless a setting says otherwise); checkpoint and memorization "
             "measured every "
             f"{config.checkpoint_every} steps ({config.curve_num_samples} samples); early-stop threshold "
             f"{config.early_stop_threshold:g}.",
             f"Fine-tuning (every pruned row and finetune_only): {config.finetune.max_train_steps} steps, batch "
             f"{config.finetune.train_batch_size}, lr {config.finetune.learning_rate:g}. Scores from "
             f"{config.importance_batches} batches of {config.importance_batch_size}. Evaluation: "
             f"{config.num_samples} samples, {config.sampler.upper()} {config.num_inference_steps} steps.",
             "Intervals: 95% Student t on the mean (tables of means) and on the paired differences over "
             "(base model x seed) pairs (comparisons); pairs of one base model share it, so the intervals are "
             "somewhat optimistic.", ""]
    output_dir = Path(config.output_dir)
    for setting in config.settings:
        setting_rows = [r for r in summary if r["setting"] == setting.name]
        if not setting_rows:
            continue
        train = replace(config.base_train, **setting.base_train)
        lines += [f"## {setting.name}", "",
                  f"{setting.num_train_samples} training images per base model; base training {train.max_train_steps} "
                  f"steps, lr {train.learning_rate:g}.", "",
                  "Base models (memorization ratio per checkpoint; early-stop step):", ""]
        for base in range(config.num_base_models):
            curve_path = base_dir(output_dir, setting, base) / "memorization_curve.json"
            if curve_path.is_file():
                curve = json.loads(curve_path.read_text())
                points = ", ".join(f"{s}: {r:.2f}" for s, r in zip(curve["steps"], curve["memorization_ratio"]))
                note = f" ({curve['note']})" if curve.get("note") else ""
                lines.append(f"- base {base}: {points}; early stop at step {curve['early_stop_step']}{note}; trained "
                             f"in {curve['train_seconds']:.0f} s.")
        lines += ["", "| method | eta | runs | " + " | ".join(metrics) + " |", "|---|---|---|" + "---|" * len(metrics)]
        for entry in setting_rows:
            cells = [_interval(entry, m, sign="") for m in metrics]
            lines.append(f"| {entry['method']} | {entry['eta']:g} | {entry['runs']} | " + " | ".join(cells) + " |")
        for label in ("random", "finetune_only", "early_stop"):
            compared = [e for e in setting_rows if f"vs_{label}_memorization_ratio" in e]
            if not compared:
                continue
            lines += ["", f"Paired difference (method - {label}), mean [95% t-interval], verdict:", "",
                      "| method | eta | pairs | " + " | ".join(metrics) + " |",
                      "|---|---|---|" + "---|" * len(metrics)]
            for entry in compared:
                cells = [f"{_interval(entry, f'vs_{label}_{m}')} {entry[f'vs_{label}_{m}_verdict']}" for m in metrics]
                lines.append(f"| {entry['method']} | {entry['eta']:g} | "
                             f"{entry[f'vs_{label}_memorization_ratio_pairs']} | " + " | ".join(cells) + " |")
        lines += ["", "Verdicts (against random at the same eta; against finetune_only; against early_stop):", ""]
        for entry in setting_rows:
            parts = []
            for label in ("random", "finetune_only", "early_stop"):
                if f"vs_{label}_memorization_ratio" in entry:
                    axes = "; ".join(f"{m} {entry[f'vs_{label}_{m}_verdict']}" for m in metrics)
                    parts.append(f"vs {label}: {axes}")
            if parts:
                lines.append(f"- {entry['method']} (eta {entry['eta']:g}): " + " | ".join(parts))
        lines.append("")
    lines += ["Figure: `pareto.png`. Per-run rows: `runs.csv` (one JSON per run under `runs/`); this analysis: "
              "`summary.csv`.", ""]
    return "\n".join(lines)
