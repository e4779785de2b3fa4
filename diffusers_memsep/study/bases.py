"""Base models of a study: train (or reload) one, measure its memorization curve over checkpoints, and keep the
checkpoint just before memorization starts (the ``early_stop`` baseline).

The threshold (``early_stop_threshold``, 0.1 by default) is an absolute memorization ratio, so every base model is
stopped at the same level of copying, just above the floor the 1/3 rule shows on a model that does not memorize
yet (the measured curves are in ``docs/study.md``). The curve samples with the evaluation's sampler
(:func:`~diffusers_memsep.trainer.sample_and_measure`) from :data:`~diffusers_memsep.evaluate.CURVE_SEED`, a seed
range no evaluation draws from, so the samples that choose the early-stop checkpoint never score it.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from diffusers.utils import logging as diffusers_logging
from tqdm.auto import tqdm

from ..data import TrainingData
from ..evaluate import CURVE_SEED
from ..models import PrunableDiTTransformer2DModel
from ..pipelines import MemSepPipeline
from ..trainer import (
    OutputConfig,
    ValidationConfig,
    build_pipeline,
    list_checkpoints,
    make_dit,
    make_noise_scheduler,
    sample_and_measure,
    train_pipeline,
)
from ..utils import inside_output_dir, read_json_object, write_text
from .run import sampling_scheduler


@dataclass
class BaseModel:
    pipeline: MemSepPipeline  # the model every run starts from (row "original")
    early_stop: MemSepPipeline | None = None  # the checkpoint before memorization (row "early_stop"), studies only
    curve: dict | None = None  # steps, ratios, chosen step, timings


def base_dir(output_dir: Path, setting, base: int) -> Path:
    return inside_output_dir(Path(output_dir) / "bases" / setting.name / f"base-{base}", output_dir)


def prepare_base_model(config, setting, base: int, data: TrainingData) -> tuple[BaseModel, bool]:
    """Train (or reload) base model ``base``: checkpoints every ``checkpoint_every`` steps, its memorization curve
    and the early-stop checkpoint, kept as pipeline folders. Returns the model and whether it was trained now."""
    folder = base_dir(Path(config.output_dir), setting, base)
    curve_path, early_dir = folder / "memorization_curve.json", folder.with_name(folder.name + "-early_stop")
    if curve_path.is_file() and (early_dir / "model_index.json").is_file() and (folder / "model_index.json").is_file():
        return BaseModel(_load(folder), _load(early_dir), read_json_object(curve_path)), False

    scheduler = make_noise_scheduler()
    with torch.random.fork_rng(devices=[]):  # initial weights from seed ``base``, whatever ran before in the process
        torch.manual_seed(base)
        model = make_dit(sample_size=data.resolution, in_channels=data.num_channels, num_classes=data.num_classes,
                         **setting.model)
    train_config = replace(config.base_train, **setting.base_train, seed=base, show_progress=config.show_progress,
                           checkpointing_steps=config.checkpoint_every, checkpoints_total_limit=None)
    start = time.perf_counter()
    # A half-trained base model (killed mid-run) continues from its latest checkpoint.
    trained = train_pipeline(folder, data, model, scheduler, train_config,
                             output=OutputConfig(overwrite_output_dir=True, resume_from_checkpoint="latest",
                                                 report_to="none"), validation=ValidationConfig(num_samples=0))
    train_seconds = time.perf_counter() - start

    start, steps, ratios = time.perf_counter(), [], []
    eval_scheduler = sampling_scheduler(trained.pipeline, config.sampler)
    for checkpoint in tqdm(list_checkpoints(folder), desc=f"{setting.name} base {base}: memorization curve",
                           disable=not config.show_progress, leave=False):
        steps.append(int(checkpoint.name.split("-")[-1]))
        pipe = _checkpoint_pipeline(checkpoint, scheduler, data)
        pipe.set_progress_bar_config(disable=True)
        report = sample_and_measure(pipe, config.curve_num_samples, config.num_inference_steps, data.num_classes,
                                    seed=CURVE_SEED, scheduler=eval_scheduler)[1]
        ratios.append(report.ratio)
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
    """The checkpoint just BEFORE the ratio first exceeds ``threshold``; the first checkpoint when already the first
    is above it; the final model when none is (the report says which)."""
    first_above = next((i for i, ratio in enumerate(ratios) if ratio > threshold), None)
    if first_above is None:
        return steps[-1], "never above the threshold: the final model"
    if first_above == 0:
        return steps[0], "already above the threshold at the first checkpoint: the first checkpoint"
    return steps[first_above - 1], ""


def _checkpoint_pipeline(checkpoint: Path, scheduler, data) -> MemSepPipeline:
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
