"""The main job (``memsep demo`` / ``make demo``): memorization appears, is measured, and is pruned away.

On the embedded digits (scikit-learn, offline): train a DiT on a small subset until it memorizes, save it as a
``MemSepPipeline`` folder that knows its training set, then run the pruning-study engine on it
(:func:`diffusers_memsep.study.prune_pipeline`): at eta = 0.5, small-time head pruning (the paper's Algorithm 1-2),
random pruning (its baseline) and the inverse selection ``small_t_top`` (the heads most important at small noise),
each fine-tuned and evaluated on the same seeds as the original and the fine-tuning control. Everything lands under
one output folder: ``base/`` (pipeline + card), ``variants/<method>-eta<eta>/`` (pipelines + cards), ``report.md``,
``runs.csv``, ``summary.csv``, ``runs/`` and the figures.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .data import held_out_from_population, load_population, load_training_data, with_held_out
from .memorization import resolve_feature_space
from .study import PruningStudyConfig, StudyResult, prune_pipeline
from .trainer import OutputConfig, TrainingConfig, ValidationConfig, make_dit, make_noise_scheduler, train_pipeline


@dataclass
class DemoConfig:
    """Settings of the main job; the defaults are the documented embedded benchmark (``docs/results.md``,
    "The main job")."""

    output_dir: str = "outputs/demo"  # base/, variants/, report and figures
    num_train_samples: int = 16  # n: digits drawn for training (small n memorizes)
    data_seed: int = 0  # seed of the training subset
    conditional: bool = False  # class-conditional model (default: unconditional)
    train: TrainingConfig = field(default_factory=lambda: TrainingConfig(
        max_train_steps=5000, train_batch_size=16, learning_rate=1e-3, ema_max_decay=0.995, show_progress=True))
    model: dict = field(default_factory=dict)  # keyword arguments of trainer.make_dit
    # Quality space (see diffusers_memsep.memorization.resolve_feature_space): "auto" is the shipped digits classifier.
    feature_space: str = "auto"
    inception_weights: str | None = None  # FID weights file for feature_space="inception"
    # The paper's selection (small_t), its baseline (random) and the inverse selection (small_t_top) at eta = 0.5,
    # the selections compared in docs/results.md; fine-tuning: 300 steps, the TrainingConfig defaults otherwise.
    study: PruningStudyConfig = field(default_factory=lambda: PruningStudyConfig(
        methods=("small_t", "random", "small_t_top"), etas=(0.5,), num_samples=128, sampler="ddim",
        num_inference_steps=50,
        finetune=TrainingConfig(max_train_steps=300, train_batch_size=16, lr_warmup_steps=0, show_progress=False)))


@dataclass
class DemoResult:
    output_dir: Path
    base_dir: Path
    study: StudyResult
    train_seconds: float
    total_seconds: float


def run_demo(config: DemoConfig) -> DemoResult:
    start = time.perf_counter()
    output_dir = Path(config.output_dir)
    label_column = "label" if config.conditional else None
    data = load_training_data(label_column=label_column, max_train_samples=config.num_train_samples,
                              seed=config.data_seed)
    population = load_population()  # all 1,797 digits: the quality reference
    try:  # resolved before training, so that a missing FID library or weights file stops the demo at once
        feature_space = resolve_feature_space(config.feature_space, population, output_dir / "feature_network",
                                              config.inception_weights, progress=True)
    except ImportError as error:
        raise ValueError(str(error)) from error
    data = with_held_out(data, held_out_from_population(population, data))  # for --methods memorization_gap

    torch.manual_seed(config.train.seed)  # the initial weights: torch's own starting seed differs per process
    model = make_dit(sample_size=data.resolution, in_channels=data.num_channels, num_classes=data.num_classes,
                     **config.model)
    base_dir = output_dir / "base"
    # The demo is re-runnable: its own earlier base folder is replaced (atomically, entry by entry).
    trained = train_pipeline(base_dir, data, model, make_noise_scheduler(), config.train,
                             output=OutputConfig(overwrite_output_dir=True),
                             validation=ValidationConfig(inference_steps=config.study.num_inference_steps))
    base_model_name = f"the demo DiT trained {config.train.max_train_steps} steps on {data.source}"
    study = prune_pipeline(trained.pipeline, data, population.images, config.study, output_dir,
                           base_model_name=base_model_name, feature_space=feature_space,
                           population_source=population.source,
                           overwrite_output_dir=True)  # the demo replaces its own earlier study
    return DemoResult(output_dir=output_dir, base_dir=base_dir, study=study, train_seconds=trained.train_seconds,
                      total_seconds=time.perf_counter() - start)
