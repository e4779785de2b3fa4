"""One run: build the condition's model (as is, early-stopped, trained with weight decay, fine-tuned only, or pruned
and fine-tuned; Ye et al. 2025, Section 6, Algorithm 1), evaluate it with evaluation seed ``1000 * seed`` (copy-free
for the copy-free rows), and return its row with its costs.

Every variant is a :class:`~diffusers_memsep.pipelines.MemSepPipeline` made by :func:`variant_pipeline`: it keeps
the base pipeline's VAE (so a latent DiT is judged on decoded images), reference, class names and label dropout.
Variants of the first seed are saved with their model cards by :func:`save_variants`, swapped in atomically.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMScheduler

from ..evaluate import EvaluationResult, QualityReference, balanced_labels, evaluate_pipeline, evaluation_seed
from ..pipelines import MemSepPipeline
from ..pruning import PruneResult, one_shot_prune
from ..pruning.prune import fine_tune_only, finetuned_model
from ..utils import inside_output_dir, replace_path


def sampling_scheduler(pipe: MemSepPipeline, sampler: str):
    """The evaluation sampler, built from the pipeline's (training) scheduler config."""
    return (DDPMScheduler if sampler == "ddpm" else DDIMScheduler).from_config(pipe.scheduler.config)


def training_scheduler(pipe: MemSepPipeline) -> DDPMScheduler:
    """The DDPM scheduler of training (same betas), whatever sampler the pipeline was saved with."""
    return DDPMScheduler.from_config(pipe.scheduler.config)


def variant_pipeline(pipe: MemSepPipeline, transformer, scheduler, **components) -> MemSepPipeline:
    """A MemSepPipeline of ``transformer`` with ``pipe``'s VAE, reference, class names and label dropout."""
    return MemSepPipeline(transformer=transformer, scheduler=scheduler, vae=pipe.vae, reference=pipe.reference,
                          label_dropout_prob=pipe.config.get("label_dropout_prob"),
                          id2label=pipe.config.get("id2label"), **components)


@dataclass
class BaseContext:
    """What the runs of one base model share."""

    setting: str
    base: int
    model: object  # bases.BaseModel
    data: object  # the PIXEL training set: memorization reference, model cards
    train_data: object  # what the scores and the fine-tuning see (VAE latents of ``data`` for a latent DiT)
    quality: QualityReference
    scores: dict = field(default_factory=dict)  # head scores by (method, seed): one score serves every eta
    pruned: dict = field(default_factory=dict)  # pruned models by (method, eta, seed), for their routed runs


@dataclass
class RunOutput:
    row: dict
    evaluation: EvaluationResult
    pruned: PruneResult | None = None  # the pruned model of a method run (None for baselines and routed runs)


def execute_run(config, run, context: BaseContext) -> RunOutput:
    """One row: make the condition's model, then evaluate it from evaluation seed ``1000 * run.seed``."""
    start = time.perf_counter()
    base = context.model
    pipe = base.pipeline_of(run.condition)
    finetune = replace(config.finetune, seed=run.seed)
    pruned, components, pruned_heads = None, {}, 0
    transformer = pipe.transformer
    if run.condition == "finetune_only":
        transformer = finetuned_model(fine_tune_only(pipe.transformer, context.train_data, training_scheduler(pipe),
                                                     finetune))
    elif run.is_pruned:
        key = (run.condition, run.eta, run.seed)
        pruned = None if run.small_t_switch is None else context.pruned.pop(key, None)
        if pruned is None:
            pruned = one_shot_prune(pipe.transformer, context.train_data, training_scheduler(pipe), eta=run.eta,
                                    method=run.condition, finetune_config=finetune,
                                    num_batches=config.importance_batches, batch_size=config.importance_batch_size,
                                    generator=torch.Generator().manual_seed(run.seed),
                                    importance=context.scores.get((run.condition, run.seed)))
            context.scores[(run.condition, run.seed)] = pruned.importance
            if config.small_t_switch is not None and run.small_t_switch is None:
                context.pruned[key] = pruned  # for its routed run, planned next
        pruned_heads = sum(len(h) for h in pruned.pruned_heads.values())
        transformer = pruned.model
        if run.small_t_switch is not None:  # the ORIGINAL model denoises t >= switch, the pruned one t < switch
            transformer, components = pipe.transformer, dict(small_t_transformer=pruned.model,
                                                             small_t_switch=run.small_t_switch)
    variant = variant_pipeline(pipe, transformer, sampling_scheduler(pipe, config.sampler), **components)
    variant.set_progress_bar_config(disable=True)
    data = context.data
    sampling = {}
    if run.sampling != "plain":  # copy-free: every sample the reference flags is drawn again (MemSepPipeline)
        sampling = dict(avoid_copies=True, max_resamples=config.max_resamples,
                        copy_check_at=config.copy_check_at if run.sampling == "copy_free_check" else None)
    result = evaluate_pipeline(
        variant, run.variant_name, data.images, context.quality, num_samples=config.num_samples,
        num_quality_samples=config.quality_samples, num_inference_steps=config.num_inference_steps,
        seed=evaluation_seed(run.seed),
        class_labels=balanced_labels(max(config.num_samples, config.quality_samples), data.num_classes), **sampling)
    row = {"setting": run.setting, "base": run.base, "method": run.method, "eta": run.eta, "seed": run.seed,
           **result.row(), "pruned_heads": pruned_heads, **run_costs(config, run, base),
           "run_seconds": round(time.perf_counter() - start, 3)}
    if run.condition == "early_stop":
        row["step"] = base.curve["early_stop_step"]
    return RunOutput(row, result, pruned if run.small_t_switch is None else None)


def run_costs(config, run, base) -> dict:
    """What a row's remedy costs the user, beside what it does: the base training steps spent to get its model
    (an early-stopped run stops when it first validates above the threshold), the fine-tuning steps after it, and
    (in the row already) the sampler steps per returned sample, ``denoising_steps_per_sample``. Without a recorded
    training (``memsep prune`` on a given pipeline) only the fine-tuning steps are known."""
    train_steps = base.train_steps(run.condition)
    finetuned = run.condition == "finetune_only" or run.is_pruned
    costs = {"finetune_steps": config.finetune.max_train_steps if finetuned else 0}
    if train_steps is not None:
        costs["train_steps"] = train_steps
    return costs


def save_variants(pipe: MemSepPipeline, pruned: dict, output_dir: Path, write_card) -> dict[str, Path]:
    """Save ``pruned`` (``{variant name: PruneResult}``) as pipeline folders under ``output_dir/variants``, each
    with the card ``write_card(folder, name, pruned_result, final_folder)`` writes.

    The variants are written into a temporary folder that then replaces ``variants/`` as a whole: an interrupted save
    leaves the earlier ``variants/`` as it was, and no variant of an earlier run survives beside the new ones.
    """
    variants_dir, staging = output_dir / "variants", output_dir / ".variants.tmp"
    folders = {}
    try:
        if pruned:
            shutil.rmtree(staging, ignore_errors=True)
            for name, result in pruned.items():
                folder = inside_output_dir(staging / name, staging)  # a variant name never leaves variants/
                variant_pipeline(pipe, result.model, pipe.scheduler).save_pretrained(folder, safe_serialization=True)
                write_card(folder, name, result, variants_dir / name)
                folders[name] = variants_dir / name
            replace_path(staging, variants_dir)
        elif variants_dir.is_dir():
            shutil.rmtree(variants_dir)  # an earlier study's variants would not match the new report
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folders
