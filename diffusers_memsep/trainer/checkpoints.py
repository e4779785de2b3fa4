"""Checkpoints: atomic ``checkpoint-<step>/`` folders that a run resumes from bit-identically."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from dataclasses import asdict
from pathlib import Path

from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..utils import replace_path
from .config import TrainingConfig

CHECKPOINT_PREFIX = "checkpoint-"
#: Written last into a checkpoint folder: its presence marks a complete checkpoint.
TRAINER_STATE = "trainer_state.json"
EMA_WEIGHTS = "ema_model.safetensors"


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


def save_checkpoint(accelerator, output_dir, global_step: int, ema, config: TrainingConfig,
                    run: dict | None = None) -> Path | None:
    """Save ``checkpoint-<step>`` atomically: write ``.checkpoint-<step>.tmp``, then rename it into place.

    ``accelerator.save_state`` writes model (safetensors), optimizer, scheduler and RNG states; the EMA weights go
    in ``ema_model.safetensors``; ``trainer_state.json`` (the step, the settings and ``run``, the
    :func:`run_signature` a resume must match) is written last and marks a complete checkpoint. Old
    checkpoints beyond ``checkpoints_total_limit`` are removed only after the new one is in place.
    """
    output_dir = Path(output_dir)
    final = output_dir / f"{CHECKPOINT_PREFIX}{global_step}"
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        temporary = output_dir / f".{final.name}.tmp"
        shutil.rmtree(temporary, ignore_errors=True)
        accelerator.save_state(str(temporary), safe_serialization=True)
        if ema is not None:
            save_ema(ema, temporary)
        state = {"global_step": global_step, "config": asdict(config), "run": run}
        (temporary / TRAINER_STATE).write_text(json.dumps(state, indent=2))
        replace_path(temporary, final)  # re-saving a step after a resume: the old one is dropped after
        if config.checkpoints_total_limit is not None:
            for old in list_checkpoints(output_dir)[: -config.checkpoints_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def save_ema(ema, folder: Path) -> None:
    tensors = {f"shadow.{i}": p.detach().contiguous().cpu() for i, p in enumerate(ema.shadow_params)}
    metadata = {"optimization_step": str(ema.optimization_step)}
    save_file(tensors, str(folder / EMA_WEIGHTS), metadata=metadata)


def load_ema(ema, folder: Path) -> None:
    path = folder / EMA_WEIGHTS
    if not path.is_file():
        raise ValueError(f"checkpoint {str(folder)!r} has no EMA weights ({EMA_WEIGHTS}) but use_ema is on; "
                         "resume with use_ema off or from a checkpoint saved with EMA.")
    with safe_open(str(path), framework="pt") as handle:
        step = int(handle.metadata()["optimization_step"])
        for i, shadow in enumerate(ema.shadow_params):
            shadow.copy_(handle.get_tensor(f"shadow.{i}").to(shadow.device, shadow.dtype))
    ema.optimization_step = step


def read_trainer_state(folder: Path) -> dict:
    return json.loads((folder / TRAINER_STATE).read_text())


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


def run_signature(model, data, noise_scheduler, config: TrainingConfig, num_processes: int) -> dict:
    """What a resumed run must share with the run that wrote the checkpoint to continue it bit-identically.

    The data (source, subset and a SHA-256 of the image and label bytes), the seed and batch layout that fix the
    stream of batches, the number of processes, the model's architecture and the noise schedule. Settings that may
    change on resume (``max_train_steps``, logging, checkpointing, validation) are not part of it.
    """
    digest = hashlib.sha256(data.images.detach().cpu().contiguous().numpy().tobytes())
    if data.labels is not None:
        digest.update(data.labels.detach().cpu().contiguous().numpy().tobytes())
    model_config = {k: v for k, v in dict(model.config).items() if not k.startswith("_")}
    scheduler_config = {k: noise_scheduler.config.get(k) for k in ("num_train_timesteps", "beta_schedule",
                                                                    "beta_start", "beta_end", "prediction_type")}
    signature = {
        "data_source": data.source, "num_train_images": len(data), "data_sha256": digest.hexdigest(),
        "seed": config.seed, "train_batch_size": config.train_batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps, "random_flip": config.random_flip,
        "num_processes": num_processes, "model_config": model_config, "noise_scheduler": scheduler_config,
    }
    return json.loads(json.dumps(signature))  # as it reads back from trainer_state.json


def check_same_run(folder: Path, run: dict) -> None:
    """Refuse to resume ``folder`` with another run's settings, naming every key that differs."""
    saved = read_trainer_state(folder).get("run")
    if saved is None:
        return  # written before runs were recorded: nothing to compare
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
            f"checkpoint {str(folder)!r} belongs to a run with other settings: {'; '.join(differing)}. Resume with "
            "the same settings, or start a new run with a new --output_dir (or --overwrite_output_dir)."
        )
