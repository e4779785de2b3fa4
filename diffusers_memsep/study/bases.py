"""Base models of a study: train (or reload) one, with the ``early_stop`` baseline made by the trainer's own
``stop_at_memorization`` (the flag a user applies: one code path), and its weight-decay siblings.

Per base model, three kinds of training, all from the same initial weights (seed = base index) and batch stream:

1. the early-stopped run: :func:`~diffusers_memsep.trainer.train_pipeline` with
   ``stop_at_memorization = early_stop_threshold`` and a validation every ``checkpoint_every`` steps; it stops at
   the first validation above the threshold and keeps the EMA weights of the last one at or below it (row
   ``early_stop``). Its validations are the memorization curve;
2. the full base model (row ``original``): the same training continued to the last step from the early-stopped
   run's last checkpoint. Training does not depend on validation (batches and label dropout are seeded by step) and
   a resume is bit-identical, so this is the model an uninterrupted run gives, without training its first steps
   twice;
3. one base model per ``weight_decays`` value: the full training with AdamW's decoupled weight decay (rows
   ``weight_decay=<w>``): the paper's remedy of its Gaussian-mixture experiments (Ye et al. 2025, Section 5),
   applied while training.

The threshold (``early_stop_threshold``, 0.1 by default) is an absolute memorization ratio, so every base model is
stopped at the same level of copying, just above the floor the 1/3 rule shows on a model that does not memorize
yet (the measured curves are in ``docs/study.md``). The validation samples with the evaluation's sampler
(``config.sampler``, ``config.num_inference_steps``) from :data:`~diffusers_memsep.evaluate.CURVE_SEED` (the
trainer's seed for a validation that chooses weights), a range no evaluation draws from, so the samples that choose
the early-stop weights never score them.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from ..data import TrainingData
from ..pipelines import MemSepPipeline
from ..trainer import (
    OutputConfig,
    ValidationConfig,
    list_checkpoints,
    make_dit,
    make_noise_scheduler,
    train_pipeline,
)
from ..utils import inside_output_dir, read_json_object, write_text
from .plan import weight_decay_name

#: In a base model's folder: the early-stopped run's curve and decision, the training steps and seconds of every
#: model of the base. Written last: it marks the base model (with its siblings) complete.
BASE_RECORD = "memorization_curve.json"


@dataclass
class BaseModel:
    pipeline: MemSepPipeline  # the model every run starts from (row "original")
    early_stop: MemSepPipeline | None = None  # the trainer's early-stopped weights (row "early_stop"), studies only
    curve: dict | None = None  # the early-stopped run's validations and decision, training steps and timings
    weight_decay: dict = field(default_factory=dict)  # {w: the base model trained with weight decay w}

    def pipeline_of(self, condition: str) -> MemSepPipeline:
        """The model a row of ``condition`` starts from (the base model for every pruned or fine-tuned row)."""
        if condition == "early_stop":
            return self.early_stop
        decayed = {weight_decay_name(w): pipe for w, pipe in self.weight_decay.items()}
        return decayed.get(condition, self.pipeline)

    def train_steps(self, condition: str) -> int | None:
        """The base training steps a user spends to get ``condition``'s model (None when not recorded)."""
        if self.curve is None:
            return None
        if condition == "early_stop":
            return self.curve["early_stop_train_steps"]
        return self.curve["train_steps"]


def base_dir(output_dir: Path, setting, base: int) -> Path:
    return inside_output_dir(Path(output_dir) / "bases" / setting.name / f"base-{base}", output_dir)


def base_folders(config, setting, base: int) -> tuple[Path, Path, dict]:
    """The folders of base model ``base``: the full model, its early-stopped run, ``{w: weight-decay sibling}``."""
    folder = base_dir(Path(config.output_dir), setting, base)
    return folder, sibling_dir(folder, "early_stop"), {w: sibling_dir(folder, f"weight_decay{w:g}")
                                                       for w in config.weight_decays}


def sibling_dir(folder: Path, name: str) -> Path:
    """``base-<b>-<name>``, beside base model ``folder`` (``early_stop``, ``weight_decay<w>``)."""
    return inside_output_dir(folder.with_name(f"{folder.name}-{name}"), folder.parent.parent.parent)


def prepare_base_model(config, setting, base: int, data: TrainingData) -> tuple[BaseModel, bool]:
    """Train (or reload) base model ``base`` with its early-stopped run and its ``config.weight_decays`` siblings,
    each kept as a pipeline folder. Returns the model and whether anything was trained now."""
    folder, early_dir, decay_dirs = base_folders(config, setting, base)
    record_path = folder / BASE_RECORD
    train_config = replace(config.base_train, **setting.base_train, seed=base, show_progress=config.show_progress,
                           checkpointing_steps=config.checkpoint_every, checkpoints_total_limit=None)
    if record_path.is_file():
        record = read_json_object(record_path)
        pipeline, early = _load(folder), _load(early_dir)
        trained_now = False
    else:
        start = time.perf_counter()
        early_run = _train(setting, base, data, early_dir, replace(
            train_config, stop_at_memorization=config.early_stop_threshold, validation_steps=config.checkpoint_every),
            validation=ValidationConfig(num_samples=config.curve_num_samples,
                                        inference_steps=config.num_inference_steps, sampler=config.sampler))
        early_seconds = time.perf_counter() - start
        # The full model continues the early-stopped run from its last checkpoint (a half-trained full model, killed
        # mid-run, from its own latest one).
        resume = (list_checkpoints(folder) or list_checkpoints(early_dir))[-1]
        full_run = _train(setting, base, data, folder, train_config, resume=resume)
        summary = early_run.result.early_stopping.summary()
        curve = early_run.result.early_stopping.curve
        record = {"steps": [entry["step"] for entry in curve],
                  "memorization_ratio": [entry["memorization_ratio"] for entry in curve],
                  "early_stop_step": summary["kept_step"], "stopped_step": summary["stopped_step"],
                  "note": _early_stop_note(summary), "threshold": config.early_stop_threshold,
                  "train_steps": train_config.max_train_steps,
                  "early_stop_train_steps": summary["stopped_step"] or train_config.max_train_steps,
                  "early_stop_seconds": round(early_seconds, 2),
                  "train_seconds": round(time.perf_counter() - start, 2), "weight_decays": {},
                  "training_subset": data.indices}
        pipeline, early, trained_now = full_run.pipeline, early_run.pipeline, True
    decayed = {}
    for weight_decay, path in decay_dirs.items():
        if f"{weight_decay:g}" in record["weight_decays"]:
            decayed[weight_decay] = _load(path)
            continue
        start = time.perf_counter()
        decayed[weight_decay] = _train(setting, base, data, path,
                                       replace(train_config, adam_weight_decay=weight_decay)).pipeline
        record["weight_decays"][f"{weight_decay:g}"] = {"train_steps": train_config.max_train_steps,
                                                        "train_seconds": round(time.perf_counter() - start, 2)}
        trained_now = True
    if trained_now:
        write_text(record_path, json.dumps(record, indent=1))  # last: marks the base model complete
        for checkpoint in [*list_checkpoints(folder), *list_checkpoints(early_dir),
                           *(c for path in decay_dirs.values() for c in list_checkpoints(path))]:
            shutil.rmtree(checkpoint)  # optimizer states are not needed any more (disk)
    return BaseModel(pipeline, early, record, decayed), trained_now


def _train(setting, base: int, data: TrainingData, folder: Path, train_config, validation=None, resume="latest"):
    """One training of base ``base``: initial weights from seed ``base`` (whatever ran before in the process)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(base)
        model = make_dit(sample_size=data.resolution, in_channels=data.num_channels, num_classes=data.num_classes,
                         **setting.model)
    # A half-trained run (killed mid-run) continues from its latest checkpoint.
    trained = train_pipeline(folder, data, model, make_noise_scheduler(), train_config,
                             output=OutputConfig(overwrite_output_dir=True, resume_from_checkpoint=resume,
                                                 report_to="none"),
                             validation=validation or ValidationConfig(num_samples=0))
    trained.pipeline.transformer.eval()
    return trained


def _early_stop_note(summary: dict) -> str:
    """What the report says when the trainer's decision is not 'the validation before the first one above'."""
    if summary["stopped_step"] is None:
        return "never above the threshold: the final model"
    if summary["stopped_before_first_safe_validation"]:
        return "already above the threshold at the first validation: the first validation's weights"
    return ""


def _load(folder: Path) -> MemSepPipeline:
    pipe = MemSepPipeline.from_pretrained(folder)
    pipe.transformer.eval()
    return pipe
