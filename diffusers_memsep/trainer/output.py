"""From a training run to a ``MemSepPipeline`` folder: validation, the folder, its model card, the Hub.

Used by ``memsep train`` / ``training/train_dit.py`` and the demo. Every check that can run before the first
training step runs there (output folder, data, checkpoint, template, processes, Hub repo); under several processes
only the main process writes.
"""

from __future__ import annotations

import math
import os
import shutil
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from diffusers import DDIMScheduler, DDPMScheduler
from diffusers.utils import make_image_grid

from ..data import TrainingData, all_images
from ..evaluate import QualityReference, balanced_labels, quality_metrics, sample_pipeline, validation_seed
from ..hub import check_hub_repo, hub_repo_id, push_folder_to_hub, require_templates, save_model_card
from ..latents import latent_training_data
from ..memorization import MemorizationResult, NearestNeighborIndex, memorization_report
from ..pipelines import MemSepPipeline
from ..utils import CACHE_FOLDERS, WRITE_CHECK_PREFIX, atomic_path, check_writable_dir, replace_path, staging_folder
from .checkpoints import list_checkpoints, resolve_checkpoint, resumes_own_checkpoint
from .config import HubConfig, OutputConfig, TrainingConfig, ValidationConfig
from .early_stopping import CURVE_JSON, CURVE_PNG
from .loop import TrainResult, check_model_and_data, train_dit
from .loss import model_config

#: DiT's label dropout (``CombinedTimestepLabelEmbeddings(class_dropout_prob=0.1)``): the share of labels replaced
#: by the null class while training a class-conditional model. Unconditional models see only the null class (1.0).
DIT_LABEL_DROPOUT = 0.1


def build_pipeline(model, noise_scheduler, data: TrainingData, reference: NearestNeighborIndex | None = None,
                   vae=None, id2label: dict | None = None):
    """A ``MemSepPipeline`` of ``model`` (with ``vae`` for a latent DiT) whose reference is exactly the training
    images of ``data`` (PIXEL images: samples are judged after the VAE decode)."""
    if reference is None and len(data) >= 2:
        reference = NearestNeighborIndex.from_images(all_images(data))
    return MemSepPipeline(transformer=model, scheduler=noise_scheduler, vae=vae, reference=reference,
                          label_dropout_prob=DIT_LABEL_DROPOUT if data.labels is not None else 1.0,
                          id2label=id2label)


def sample_and_measure(pipeline, num_samples: int, num_inference_steps: int, num_classes: int | None = None,
                       seed: int = 0, scheduler=None,
                       split_across_processes: bool = True) -> tuple[torch.Tensor, MemorizationResult | None]:
    """Samples in ``[-1, 1]`` from the evaluation's sampler (:func:`~diffusers_memsep.evaluate.sample_pipeline`:
    labels of :func:`~diffusers_memsep.evaluate.balanced_labels`, batch ``b`` seeded ``seed + b``) and their
    memorization verdicts against the pipeline's reference (None without one). A non-finite sample is neither a
    copy nor a non-copy: ``report.ratio`` leaves it out and ``report.num_nonfinite`` counts it.
    ``split_across_processes=False``: sampled on the calling process alone (see ``sample_pipeline``)."""
    samples = sample_pipeline(pipeline, num_samples, balanced_labels(num_samples, num_classes), num_inference_steps,
                              seed, scheduler=scheduler, split_across_processes=split_across_processes).images
    return samples, None if pipeline.reference is None else memorization_report(samples, pipeline.reference)


def make_validation_fn(noise_scheduler, data: TrainingData, samples_dir: str | os.PathLike | None = None,
                       num_samples: int = 64, num_inference_steps: int = 1000, seed: int = 0, accelerator=None,
                       reference: NearestNeighborIndex | None = None, vae=None,
                       quality_reference: QualityReference | None = None, sampler: str = "ddpm"):
    """A ``validation_fn`` for :func:`train_dit`: sample a grid, save it, return the memorization ratio.

    Samples come from the model being trained (EMA weights when on) with a DDPM (or, ``sampler="ddim"``, DDIM)
    sampler of ``num_inference_steps`` steps built from the training scheduler's config, drawn by
    :func:`sample_and_measure` (the evaluation's sampler) always from the same noise (``seed``), so grids of
    successive steps are comparable.
    The grid goes to ``<samples_dir>/step-<step>.png`` (atomically) and, when the accelerator logs to TensorBoard,
    to TensorBoard. With ``vae`` (a latent DiT) samples are decoded and judged against ``data``'s pixel images. With
    ``quality_reference`` (the population in a feature space, :class:`~diffusers_memsep.evaluate.QualityReference`)
    the same samples also give precision, recall, the Frechet distance and the KID formula.
    """
    validation_scheduler = (DDIMScheduler if sampler == "ddim" else DDPMScheduler).from_config(noise_scheduler.config)
    reference = reference if reference is not None else NearestNeighborIndex.from_images(all_images(data))
    label_dropout = DIT_LABEL_DROPOUT if data.labels is not None else 1.0

    def validation_fn(model, step: int) -> dict[str, float]:
        pipeline = MemSepPipeline(transformer=model, scheduler=validation_scheduler, vae=vae,
                                  reference=reference.to(model.device), label_dropout_prob=label_dropout)
        pipeline.set_progress_bar_config(disable=True)
        # train_dit validates on the main process alone: its samples must not wait for the other processes.
        samples, report = sample_and_measure(pipeline, num_samples, num_inference_steps, data.num_classes, seed,
                                             split_across_processes=False)
        images01 = ((samples + 1) / 2).nan_to_num(0.0)
        if samples_dir is not None:
            rows = max(1, int(math.sqrt(num_samples)))
            images = pipeline.numpy_to_pil(images01.permute(0, 2, 3, 1).numpy())
            grid = make_image_grid(images[: rows * (num_samples // rows)], rows=rows, cols=num_samples // rows)
            zoom = max(1, 64 // data.resolution)  # 8x8 digits are unreadable at their own size
            grid = grid.resize((grid.width * zoom, grid.height * zoom), resample=0)  # 0 = nearest: keep pixels
            with atomic_path(Path(samples_dir) / f"step-{step:06d}.png") as temporary:
                grid.save(temporary, format="PNG")
        if accelerator is not None:
            for tracker in accelerator.trackers:
                if tracker.name == "tensorboard":
                    tracker.writer.add_images("samples", images01.numpy(), step)
        metrics = {"memorization_ratio": report.ratio, "memorized_samples": int(report.memorized.sum()),
                   "nonfinite_samples": report.num_nonfinite}
        if quality_reference is not None:
            quality = quality_metrics(samples, quality_reference, seed=seed)
            metrics.update({k: quality[k] for k in ("precision", "recall", "frechet_distance", "kid", "kid_se")})
        return metrics

    return validation_fn


def check_output_dir(output_dir: str | os.PathLike, overwrite_output_dir: bool = False,
                     resume_from_checkpoint=None, logging_dir: str = "logs") -> None:
    """Refuse an output folder that already holds something, unless overwriting or resuming a checkpoint of it.

    ``resume_from_checkpoint="latest"`` resumes only when a checkpoint exists; otherwise the folder is judged as
    for a new run, so a finished run without checkpoints is never retrained over. ``logging_dir`` must lie inside
    the output folder (``--overwrite_output_dir`` clears it, and nothing outside ``output_dir`` is ever deleted).
    """
    folder = Path(output_dir)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"output_dir {str(folder)!r} is a file; pass a folder.")
    logs = (folder / logging_dir).resolve()
    if Path(logging_dir).is_absolute() or logs == folder.resolve() or folder.resolve() not in logs.parents:
        raise ValueError(f"logging_dir {logging_dir!r} must be a sub-folder inside output_dir (e.g. 'logs'); it is "
                         "relative to --output_dir.")
    resuming = resume_from_checkpoint is not None and resumes_own_checkpoint(resume_from_checkpoint, folder)
    if resuming or overwrite_output_dir or not folder.is_dir():
        return
    contents = sorted(p.name for p in folder.iterdir()
                      if not p.name.startswith(WRITE_CHECK_PREFIX) and p.name not in CACHE_FOLDERS)
    if contents:
        shown = ", ".join(contents[:5]) + (", ..." if len(contents) > 5 else "")
        fix = ("it holds no checkpoint to resume (a finished run keeps none unless --checkpointing_steps is on); "
               if resume_from_checkpoint is not None else "")
        if resume_from_checkpoint is not None and resolve_checkpoint(resume_from_checkpoint, folder) is not None:
            fix = (f"the checkpoint {str(resume_from_checkpoint)!r} lies outside it, so its run would be written over "
                   "this one; ")
        raise ValueError(
            f"output_dir {str(folder)!r} already holds another run ({shown}); {fix}pass --overwrite_output_dir to "
            "replace it, --resume_from_checkpoint latest to continue it from a checkpoint, or choose another "
            "--output_dir."
        )


def save_pipeline_folder(pipeline, output_dir: str | os.PathLike) -> Path:
    """``pipeline.save_pretrained`` into a temporary folder, then move each entry into ``output_dir``.

    Every file and sub-folder is swapped in with ``os.replace``; ``model_index.json`` comes last, so a folder
    with a ``model_index.json`` always holds a complete pipeline. Other content (checkpoints, logs) is kept.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with staging_folder(output_dir / ".pipeline.tmp") as temporary:  # removed if the save fails (full disk)
        pipeline.save_pretrained(str(temporary), safe_serialization=True)
    entries = sorted(temporary.iterdir(), key=lambda p: p.name == "model_index.json")
    for entry in entries:
        replace_path(entry, output_dir / entry.name)
    shutil.rmtree(temporary, ignore_errors=True)
    return output_dir


@dataclass
class TrainedPipeline:
    """What :func:`train_pipeline` returns: the saved pipeline, the raw run, its last metrics and timings."""

    pipeline: object
    output_dir: Path
    result: TrainResult
    metrics: dict = field(default_factory=dict)
    train_seconds: float = 0.0
    images_per_second: float = 0.0
    hub_url: str | None = None
    is_main_process: bool = True  # False on the other processes of a data-parallel run (they wrote nothing)


def train_pipeline(
    output_dir: str | os.PathLike,
    data: TrainingData,
    model,
    noise_scheduler,
    config: TrainingConfig | None = None,
    *,
    output: OutputConfig | None = None,
    validation: ValidationConfig | None = None,
    hub: HubConfig | None = None,
    vae=None,
    id2label: dict | None = None,
    quality_reference: QualityReference | None = None,
    base_model: str | None = None,
    dataset_id: str | None = None,
    card_fields: dict | None = None,
) -> TrainedPipeline:
    """Train ``model`` with :func:`train_dit` and leave a ``MemSepPipeline`` folder in ``output_dir``.

    The folder holds the transformer (EMA weights when ``use_ema``, else the trained ones; safetensors), the DDPM
    scheduler, the training-set reference (exactly ``data.images``), a model card (``README.md`` from the
    ``base_model`` template), sample grids (``samples/``), TensorBoard logs (``logs/``) and checkpoints.
    The memorization ratio is measured every ``config.validation_steps`` and always at the last step
    (``validation.num_samples`` samples of ``validation.inference_steps`` steps of ``validation.sampler``, default
    the training schedule's length; fixed seeds, see :class:`ValidationConfig`; 0 samples: off).

    The settings come in groups, each a dataclass with defaults (None: all defaults): ``config``
    (:class:`TrainingConfig`, the run: recorded in checkpoints, checked on resume), ``output``
    (:class:`OutputConfig`: overwrite, resume, trackers and their folder), ``validation`` (:class:`ValidationConfig`)
    and ``hub`` (:class:`HubConfig`). The objects (data, model, scheduler, VAE, class names, quality reference) and
    the model card's extras (``base_model``, ``dataset_id``, ``card_fields``) are arguments.

    Everything that can be checked is checked before the first step: the output folder (refused when it holds
    another run, unless ``output.overwrite_output_dir`` or resuming a checkpoint of it; must be writable), model vs
    data, the checkpoint and its run settings, the tracker, the model-card template, the process set-up, and with
    ``hub.push_to_hub`` the token and the Hub repo (created then, as diffusers' training scripts do). Under several
    processes only the main process writes files. A failed push raises ``HubPushError`` with the folder intact.

    Latent training (``vae`` given, e.g. fine-tuning a pretrained DiT-XL/2 on one's own images): ``data`` holds the
    PIXEL images (at the VAE's resolution and channels); they are encoded once to the VAE's latent means times
    ``scaling_factor`` (:func:`~diffusers_memsep.latents.latent_training_data`, cached in
    ``<output_dir>/latent_cache``), the transformer trains on those latents, the VAE stays frozen and is saved in
    the pipeline, and memorization is judged on decoded samples against the pixel images. ``id2label`` (class
    names) is kept in the pipeline; ``base_model`` and ``dataset_id`` enter the card when they are Hub ids.
    ``quality_reference`` adds the quality metrics of :func:`~diffusers_memsep.evaluate.quality_metrics` to every
    validation (``memsep train --feature_space``). With ``config.stop_at_memorization`` the folder gets the weights of
    the last validation at or below it, and ``memorization_curve.json`` / ``.png``
    (:mod:`~diffusers_memsep.trainer.early_stopping`).
    """
    config = config or TrainingConfig()
    output, validation, hub = output or OutputConfig(), validation or ValidationConfig(), hub or HubConfig()
    output_dir, logging_dir = Path(output_dir), output.logging_dir
    check_output_dir(output_dir, output.overwrite_output_dir, output.resume_from_checkpoint, logging_dir)
    if vae is None:
        check_model_and_data(model, data)
    else:
        check_latent_setup(model, vae, data, config)
    checkpoint = resolve_checkpoint(output.resume_from_checkpoint, output_dir)
    log_with = _trackers(output.report_to)
    num_train_timesteps = int(noise_scheduler.config.num_train_timesteps)
    validation_num_samples = validation.num_samples
    validation_inference_steps = validation.inference_steps or num_train_timesteps
    if quality_reference is not None and 0 < validation_num_samples < 4:
        raise ValueError("quality metrics at validation need --validation_num_samples >= 4 (k = 3 neighbours).")
    if config.stop_at_memorization is not None and (validation_num_samples == 0 or len(data) < 2):
        raise ValueError("--stop_at_memorization measures the memorization ratio of validation samples: pass "
                         "--validation_num_samples > 0 and at least 2 training images.")
    if validation_num_samples and validation_inference_steps > num_train_timesteps:
        raise ValueError(f"validation_inference_steps {validation_inference_steps} exceeds the {num_train_timesteps} "
                         f"training timesteps; pass --validation_inference_steps <= {num_train_timesteps}.")
    require_templates("base_model")
    repo_id = None
    if hub.push_to_hub:
        repo_id = hub.model_id or output_dir.resolve().name
        check_hub_repo(repo_id, private=hub.private, token=hub.token)  # fails now, not after training

    accelerator = Accelerator(mixed_precision=config.mixed_precision, log_with=log_with,
                              project_config=ProjectConfiguration(project_dir=str(output_dir),
                                                                  logging_dir=str(output_dir / logging_dir)))
    check_process_setup(accelerator)
    if accelerator.is_main_process:
        check_writable_dir(output_dir)
        if output.overwrite_output_dir and (checkpoint is None or not resumes_own_checkpoint(checkpoint, output_dir)):
            for old in list_checkpoints(output_dir):  # another run's checkpoints must never be resumed as ours
                shutil.rmtree(old)
            for old in (output_dir / "samples", output_dir / logging_dir):  # nor its grids and curves shown as ours
                shutil.rmtree(old, ignore_errors=True)
            for old in (output_dir / CURVE_JSON, output_dir / CURVE_PNG):
                old.unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    train_data = data
    if vae is not None:  # encode once (cached); the frozen VAE is never prepared, trained or checkpointed
        vae.requires_grad_(False).eval().to(accelerator.device)
        train_data = latent_training_data(data, vae, output_dir / "latent_cache")
        check_model_and_data(model, train_data)
    if log_with:
        accelerator.init_trackers("train_dit", config=_flat_config(config, model, data))

    validation_fn = None
    metrics: dict = {}
    reference = NearestNeighborIndex.from_images(all_images(data)) if len(data) >= 2 else None
    seed = validation_seed(config.seed, config.stop_at_memorization is not None)
    if validation_num_samples > 0:
        measure = make_validation_fn(noise_scheduler, data, output_dir / "samples", validation_num_samples,
                                     validation_inference_steps, seed=seed, accelerator=accelerator,
                                     reference=reference, vae=vae, quality_reference=quality_reference,
                                     sampler=validation.sampler)

        def validation_fn(model_with_ema, step):
            metrics.clear()
            metrics.update(measure(model_with_ema, step))
            return metrics

    if not config.validation_steps:
        config = replace(config, validation_steps=config.max_train_steps)  # measure at the end at least
    result = train_dit(model, train_data, noise_scheduler, config, accelerator=accelerator, output_dir=output_dir,
                       resume_from_checkpoint=checkpoint, validation_fn=validation_fn)
    train_seconds, images_per_second = result.train_seconds, result.images_per_second

    final_model = result.sampling_model  # the early-stopped weights, else the EMA's, else the trained ones
    early_stopping = result.early_stopping
    if early_stopping is not None and early_stopping.kept_step is not None:
        metrics.clear()
        metrics.update(early_stopping.kept_metrics)  # the card reports the weights it ships
    if validation_fn is not None and not metrics and accelerator.is_main_process:
        # A resume that starts at the last step runs no step, hence no validation: measure the final model here.
        with torch.no_grad():
            validation_fn(final_model, result.steps)
    pipeline = build_pipeline(final_model, noise_scheduler, data, reference, vae=vae, id2label=id2label)
    hub_url = None
    if accelerator.is_main_process:
        save_pipeline_folder(pipeline, output_dir)
        if early_stopping is not None:
            early_stopping.write_curve(output_dir, seed)
        fields = base_model_card_fields(final_model, noise_scheduler, data, config, metrics, train_seconds,
                                        images_per_second, validation_num_samples, validation_inference_steps,
                                        hub.model_id, latent=vae is not None, base_model=base_model,
                                        dataset_id=dataset_id, local_folder=str(output_dir.resolve()),
                                        early_stopping=early_stopping.summary() if early_stopping else None,
                                        validation_sampler=validation.sampler)
        fields.update(card_fields or {})
        metadata, eval_results = fields.pop("metadata"), fields.pop("eval_results")
        save_model_card(output_dir, "base_model", metadata=metadata, eval_results=eval_results, **fields)
    accelerator.end_training()
    if hub.push_to_hub and accelerator.is_main_process:
        hub_url = push_folder_to_hub(output_dir, repo_id, private=hub.private, token=hub.token,
                                     commit_message=f"Train DiT: {result.steps} steps",
                                     push_reference=hub.push_reference)
    return TrainedPipeline(pipeline, output_dir, result, dict(metrics), train_seconds, images_per_second, hub_url,
                           is_main_process=accelerator.is_main_process)


def check_latent_setup(model, vae, data, config: TrainingConfig) -> None:
    """Refuse, before any work, a latent run whose pixel images, VAE and transformer do not fit together."""
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    expected = (vae.config.in_channels, model_config(model).sample_size * scale)
    if (data.num_channels, data.resolution) != expected:
        raise ValueError(
            f"the images are {data.num_channels}x{data.resolution}x{data.resolution} but this VAE and transformer "
            f"take {expected[0]}x{expected[1]}x{expected[1]} pixel images; pass --resolution {expected[1]} (grey "
            "images are repeated to RGB by memsep train)."
        )
    if model_config(model).in_channels != vae.config.latent_channels:
        raise ValueError(f"the transformer takes {model_config(model).in_channels} channels but the VAE makes "
                         f"{vae.config.latent_channels}-channel latents; pair the transformer with its own VAE.")
    if config.random_flip:
        raise ValueError("random_flip is refused for latent training: flipping a latent only approximates flipping "
                         "the image. Train without --random_flip.")


def check_process_setup(accelerator) -> None:
    """Refuse several processes that do not form one data-parallel run (they would race on one output folder).

    ``torchrun --nproc_per_node N`` on a CPU-only machine without ``ACCELERATE_USE_CPU=true`` starts N processes
    that each train alone; ``WORLD_SIZE`` says how many were started, Accelerate how many it joined.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world_size > 1 and accelerator.num_processes != world_size:
        raise ValueError(
            f"{world_size} processes were started (WORLD_SIZE={world_size}) but Accelerate joined "
            f"{accelerator.num_processes}: each would train alone and write the same folder. On CPU run "
            f"`ACCELERATE_USE_CPU=true torchrun --nproc_per_node {world_size} ...`; on GPUs use `accelerate launch`."
        )


def base_model_card_fields(model, noise_scheduler, data: TrainingData, config: TrainingConfig, metrics: dict,
                           train_seconds: float, images_per_second: float, num_samples: int, inference_steps: int,
                           hub_model_id: str | None = None, latent: bool = False, base_model: str | None = None,
                           dataset_id: str | None = None, local_folder: str | None = None,
                           early_stopping: dict | None = None, validation_sampler: str = "ddpm") -> dict:
    """The variables of ``model_cards/base_model.md`` (plus ``metadata`` and ``eval_results`` for the header).

    ``early_stopping`` is :meth:`~diffusers_memsep.trainer.early_stopping.EarlyStopping.summary` of a run with
    ``stop_at_memorization`` (``metrics`` are then those of the kept step).

    Only Hub ids enter the metadata (``datasets``, ``base_model``): a local path there would be a broken link.
    """
    model_name = (hub_model_id or "dit-memsep").split("/")[-1]
    dataset_tag = hub_repo_id(dataset_id) or "custom"
    eval_results = []
    memorization = []
    if "memorization_ratio" in metrics:
        sampler = f"{validation_sampler.upper()}-{inference_steps}"
        memorization.append({"sampler": sampler, "ratio": metrics["memorization_ratio"], "num_samples": num_samples})
        eval_results.append({"metric_type": "memorization_ratio",
                             "metric_value": round(metrics["memorization_ratio"], 4),
                             "metric_name": f"Memorization ratio (1/3 rule, {sampler}, {num_samples} samples)",
                             "dataset_name": data.source, "dataset_type": dataset_tag})
    model_config = dict(model.config)
    return {
        "metadata": {"model_name": model_name, "license": "apache-2.0",
                     **({"datasets": [dataset_tag]} if hub_repo_id(dataset_id) else {}),
                     **({"base_model": hub_repo_id(base_model)} if hub_repo_id(base_model) else {}),
                     **({"num_classes": data.num_classes} if data.num_classes else {})},
        "eval_results": eval_results,
        "model_name": model_name,
        "hub_model_id": hub_model_id,
        "local_folder": local_folder,
        "latent": latent,
        "dataset_source": data.source,
        "num_train_images": len(data),
        "resolution": data.resolution,
        "num_channels": data.num_channels,
        "num_classes": data.num_classes,
        "model_config": model_config,
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "training_config": asdict(config),
        "noise_scheduler": dict(noise_scheduler.config),
        "memorization": memorization,
        "train_minutes": train_seconds / 60 if train_seconds else None,
        "images_per_second": images_per_second or None,
        "early_stopping": early_stopping,
        "curve_files": [CURVE_JSON, CURVE_PNG] if early_stopping else None,
        "command": " ".join(["memsep train"] + [a for a in _command_line()]) if _command_line() else None,
    }


def _command_line() -> list[str]:
    argv = sys.argv[1:]
    return argv[1:] if argv and argv[0] == "train" else argv


def _trackers(report_to: str | None):
    if report_to in (None, "none", ""):
        return None
    choices = {"tensorboard", "wandb", "all"}
    if report_to not in choices:
        raise ValueError(f"report_to must be one of {sorted(choices | {'none'})}, got {report_to!r}.")
    if report_to in ("wandb", "all"):
        try:
            import wandb  # noqa: F401
        except ImportError:
            if report_to == "wandb":
                raise ValueError("report_to='wandb' needs wandb: pip install wandb (or use tensorboard).") from None
            return "tensorboard"
    return report_to


def _flat_config(config: TrainingConfig, model, data: TrainingData) -> dict:
    """Hyper-parameters for the trackers (scalars only: TensorBoard's hparams reject None and dicts)."""
    values = {k: v for k, v in asdict(config).items() if isinstance(v, (int, float, str, bool))}
    values.update({f"model_{k}": v for k, v in dict(model.config).items() if isinstance(v, (int, float, str, bool))})
    values.update({"num_train_images": len(data), "dataset": data.source})
    return values

