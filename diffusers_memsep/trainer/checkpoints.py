"""Checkpoints: atomic ``checkpoint-<step>/`` folders that a run resumes from bit-identically."""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
from diffusers.training_utils import EMAModel
from diffusers.utils import logging as diffusers_logging
from safetensors import SafetensorError

from ..utils import data_fingerprint, read_json_object, replace_path, staging_folder
from .config import TrainingConfig

CHECKPOINT_PREFIX = "checkpoint-"
#: Written last into a checkpoint folder: its presence marks a complete checkpoint.
TRAINER_STATE = "trainer_state.json"
TRANSFORMER, TRANSFORMER_EMA = "transformer", "transformer_ema"  # sub-folders, as in diffusers' scripts


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete ``checkpoint-<step>`` folders under ``output_dir``, oldest first (temporary folders ignored)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir()
             if p.is_dir() and re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+", p.name) and (p / TRAINER_STATE).is_file()]
    return sorted(found, key=lambda p: int(p.name[len(CHECKPOINT_PREFIX):]))


def resolve_checkpoint(resume_from_checkpoint, output_dir) -> Path | None:
    """The checkpoint folder to resume from: None, ``"latest"`` (newest under ``output_dir`` or None), or a path.

    A path that does not exist or is not a checkpoint raises ValueError (before any training step).
    """
    if resume_from_checkpoint is None:
        return None
    if str(resume_from_checkpoint) == "latest":
        found = list_checkpoints(output_dir) if output_dir is not None else []
        return found[-1] if found else None
    path = Path(resume_from_checkpoint)
    if not path.exists() and output_dir is not None and (Path(output_dir) / path).exists():
        path = Path(output_dir) / path  # diffusers' scripts accept a bare "checkpoint-500" under output_dir
    if not path.is_dir():
        raise ValueError(f"resume_from_checkpoint {str(resume_from_checkpoint)!r} does not exist; pass a "
                         f"'{CHECKPOINT_PREFIX}<step>' folder, 'latest', or nothing to start a new run.")
    if not (path / TRAINER_STATE).is_file():
        raise ValueError(f"{str(path)!r} is not a training checkpoint (no {TRAINER_STATE}); pass a "
                         f"'{CHECKPOINT_PREFIX}<step>' folder written by train_dit.")
    return path


def resumes_own_checkpoint(resume_from_checkpoint, output_dir) -> bool:
    """True when ``resume_from_checkpoint`` resolves to a checkpoint INSIDE ``output_dir``: only then does the run
    continue the run already in that folder. A checkpoint of another folder starts a new run in ``output_dir``,
    which must then be empty (or ``--overwrite_output_dir`` given), like any new run."""
    checkpoint = resolve_checkpoint(resume_from_checkpoint, output_dir)
    if checkpoint is None:
        return False
    return Path(output_dir).resolve() in checkpoint.resolve().parents


def save_checkpoint(accelerator, output_dir, global_step: int, ema, config: TrainingConfig,
                    run: dict | None = None) -> Path | None:
    """Save ``checkpoint-<step>`` atomically: write ``.checkpoint-<step>.tmp``, then rename it into place.

    ``accelerator.save_state`` writes ``transformer/`` and ``transformer_ema/`` (diffusers layout, through
    :func:`register_checkpoint_hooks`), optimizer, scheduler and RNG states; ``trainer_state.json`` (the step,
    the settings and ``run``, the :func:`run_signature` a resume must match) is written last and marks a complete
    checkpoint. Old checkpoints beyond ``checkpoints_total_limit`` are removed only after the new one is in place.
    """
    output_dir = Path(output_dir)
    final = output_dir / f"{CHECKPOINT_PREFIX}{global_step}"
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        # A failed save (full disk: safetensors raises SafetensorError) removes the temporary folder and raises an
        # OSError naming it; the last complete checkpoint is untouched.
        with staging_folder(output_dir / f".{final.name}.tmp") as temporary:
            accelerator.save_state(str(temporary), safe_serialization=True)  # + transformer(_ema)/ by the hooks
            state = {"global_step": global_step, "config": asdict(config), "run": run}
            (temporary / TRAINER_STATE).write_text(json.dumps(state, indent=2))
            replace_path(temporary, final)  # re-saving a step after a resume: the old one is dropped after
        if config.checkpoints_total_limit is not None:
            for old in list_checkpoints(output_dir)[: -config.checkpoints_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def register_checkpoint_hooks(accelerator, ema) -> list:
    """Make ``accelerator.save_state`` / ``load_state`` use the diffusers layout, as diffusers' training scripts do.

    A checkpoint then holds ``transformer/`` and (with EMA) ``transformer_ema/``, each a folder that opens with
    ``PrunableDiTTransformer2DModel.from_pretrained`` (the EMA state, e.g. ``optimization_step``, rides in
    ``transformer_ema/config.json`` as ``diffusers.training_utils.EMAModel.save_pretrained`` writes it), beside
    Accelerate's optimizer, scheduler and RNG files. Weights are float32 safetensors, so a resume is bit-identical.
    Returns the hook handles; remove them when the run ends (an accelerator may serve several runs).
    """

    def save_hook(models, weights, folder):
        for model in models:
            accelerator.unwrap_model(model).save_pretrained(Path(folder) / TRANSFORMER, safe_serialization=True)
        weights.clear()  # written above; Accelerate must not write them a second time as model.safetensors
        if ema is not None:
            with _global_rng_kept():  # EMAModel.save_pretrained builds (randomly initialises) a model
                ema.save_pretrained(str(Path(folder) / TRANSFORMER_EMA))

    def load_hook(models, folder):
        for model in models:
            bare = accelerator.unwrap_model(model)
            loaded = type(bare).from_pretrained(Path(folder) / TRANSFORMER, use_safetensors=True)
            bare.load_state_dict(loaded.state_dict())
        models.clear()  # loaded above

    return [accelerator.register_save_state_pre_hook(save_hook), accelerator.register_load_state_pre_hook(load_hook)]


def load_ema(ema, folder: Path) -> None:
    """Restore the EMA (shadow weights and its step counter) from ``<checkpoint>/transformer_ema``."""
    path = Path(folder) / TRANSFORMER_EMA
    if not path.is_dir():
        raise ValueError(f"checkpoint {str(folder)!r} has no EMA weights ({TRANSFORMER_EMA}/) but use_ema is on; "
                         "resume with --no-use_ema or from a checkpoint saved with EMA.")
    verbosity = diffusers_logging.get_verbosity()
    # diffusers' EMAModel.from_pretrained passes its folder to from_config (a deprecation warning) and the EMA's own
    # fields (decay, ...) in config.json to the model (an "unexpected attributes" warning): both are expected here.
    diffusers_logging.set_verbosity_error()
    try:
        with _global_rng_kept(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="It is deprecated to pass a pretrained model name or path",
                                    category=FutureWarning)
            loaded = EMAModel.from_pretrained(str(path), model_cls=ema.model_cls, foreach=ema.foreach)
    finally:
        diffusers_logging.set_verbosity(verbosity)
    ema.load_state_dict(loaded.state_dict())


def _global_rng_kept():
    """Leave torch's global RNG as it was: building a model draws from it, and DiT's label dropout draws from it
    while training, so saving or loading a checkpoint must not move it (a run with checkpoints equals one without)."""
    return torch.random.fork_rng(devices=[torch.cuda.current_device()] if torch.cuda.is_available() else [])


def read_trainer_state(folder: Path) -> dict:
    """``trainer_state.json`` of a checkpoint; a damaged file raises a ValueError naming it."""
    return read_json_object(Path(folder) / TRAINER_STATE)


def load_checkpoint(accelerator, folder: Path, ema) -> None:
    """Load model, optimizer, scheduler, RNG and EMA state; a damaged checkpoint raises ValueError naming it."""
    try:
        accelerator.load_state(str(folder))
        if ema is not None:
            load_ema(ema, folder)
    except (RuntimeError, OSError, KeyError, SafetensorError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"checkpoint {str(folder)!r} cannot be loaded ({first_line}); it is damaged or belongs to another model. "
            f"Resume from an earlier {CHECKPOINT_PREFIX}<step> folder, or start a new run with a new --output_dir."
        ) from error


#: Settings a resume cannot apply, so a resume with other values is refused (naming them): the optimizer state
#: loaded from the checkpoint keeps its learning rate, betas, epsilon and weight decay; the schedule's state keeps
#: its base rates; the EMA state (``EMAModel.load_state_dict``) keeps its decays and warm-up. Settings a resume does
#: apply may change: ``max_train_steps`` (the schedule is rebuilt for it), ``max_grad_norm`` (read every step),
#: ``use_ema`` off (the trained weights are then saved), checkpointing, validation, logging, progress.
RESUME_FIXED_SETTINGS = ("learning_rate", "lr_scheduler", "lr_warmup_steps", "adam_beta1", "adam_beta2",
                         "adam_weight_decay", "adam_epsilon", "ema_max_decay", "ema_min_decay", "ema_inv_gamma",
                         "ema_power", "ema_update_after_step", "mixed_precision")


def run_signature(model, data, noise_scheduler, config: TrainingConfig, num_processes: int) -> dict:
    """What a resumed run must share with the run that wrote the checkpoint to continue it bit-identically.

    The data (source, subset and a SHA-256 of the image and label bytes), the seed and batch layout that fix the
    stream of batches, the number of processes, the model's architecture and the noise schedule. Settings that may
    change on resume (``max_train_steps``, logging, checkpointing, validation) are not part of it; the settings a
    resume cannot apply (:data:`RESUME_FIXED_SETTINGS`: learning rate, schedule, warm-up, AdamW, EMA decays) are.
    The data is recorded by content (:func:`~diffusers_memsep.utils.data_fingerprint`), not by path.
    """
    model_config = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    scheduler_config = {k: noise_scheduler.config.get(k) for k in ("num_train_timesteps", "beta_schedule",
                                                                    "beta_start", "beta_end", "prediction_type")}
    signature = {
        "data_source": data.source, "num_train_images": len(data), "data_sha256": data_fingerprint(data),
        "seed": config.seed, "train_batch_size": config.train_batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps, "random_flip": config.random_flip,
        "num_processes": num_processes, "model_config": model_config, "noise_scheduler": scheduler_config,
        "optimizer": {name: getattr(config, name) for name in RESUME_FIXED_SETTINGS},
    }
    return json.loads(json.dumps(signature))  # as it reads back from trainer_state.json


def check_same_run(folder: Path, run: dict) -> None:
    """Refuse to resume ``folder`` with another run's settings, naming every key that differs."""
    state = read_trainer_state(folder)
    saved = state.get("run")
    if saved is None:
        return  # written before runs were recorded: nothing to compare
    saved = dict(saved)
    if "optimizer" not in saved and isinstance(state.get("config"), dict):  # older checkpoints: from their config
        saved["optimizer"] = {k: state["config"].get(k) for k in RESUME_FIXED_SETTINGS if k in state["config"]}
        run = {**run, "optimizer": {k: v for k, v in (run.get("optimizer") or {}).items() if k in saved["optimizer"]}}
    differing = []
    for key in sorted(set(saved) | set(run)):
        if saved.get(key) != run.get(key):
            if isinstance(saved.get(key), dict) and isinstance(run.get(key), dict):
                inner = sorted(k for k in set(saved[key]) | set(run[key]) if saved[key].get(k) != run[key].get(k))
                differing += [f"{key}.{k} (checkpoint {saved[key].get(k)!r}, now {run[key].get(k)!r})" for k in inner]
            else:
                differing.append(f"{key} (checkpoint {saved.get(key)!r}, now {run.get(key)!r})")
    if differing:
        raise ValueError(
            f"checkpoint {str(folder)!r} belongs to a run with other settings: {'; '.join(differing)}. A resume "
            "continues the checkpoint's optimizer, schedule and EMA state, so these cannot take effect; resume with "
            "the checkpoint's values, or start a new run with a new --output_dir (or --overwrite_output_dir)."
        )
