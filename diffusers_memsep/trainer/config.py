"""The trainer's settings (one dataclass; the flags of ``memsep train`` have the same names)."""

from __future__ import annotations

import math
from dataclasses import dataclass

#: The learning-rate schedules of ``diffusers.optimization.get_scheduler`` the trainer accepts.
LR_SCHEDULES = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")


@dataclass
class TrainingConfig:
    """Every setting of :func:`~diffusers_memsep.trainer.train_dit`.

    Defaults are the documented setting for the embedded digits: with the default
    :func:`~diffusers_memsep.trainer.make_dit` on 64 digits, most DDPM-1000 samples are memorized at the last step
    (measured in ``docs/results.md``, "How fast the DiT memorizes the digits"). ``train_batch_size`` is per process,
    as in diffusers' example scripts; ``max_train_steps`` counts optimizer steps (each made of
    ``gradient_accumulation_steps`` micro-batches).
    """

    max_train_steps: int = 6000  # optimizer steps of the whole run (a resumed run counts the steps before it)
    train_batch_size: int = 64  # images per micro-batch and process
    learning_rate: float = 5e-4  # AdamW peak learning rate
    lr_scheduler: str = "constant_with_warmup"  # one of LR_SCHEDULES
    lr_warmup_steps: int = 100  # optimizer steps of linear warm-up
    adam_beta1: float = 0.9  # AdamW first-moment decay
    adam_beta2: float = 0.999  # AdamW second-moment decay
    adam_weight_decay: float = 0.0  # AdamW decoupled weight decay (a remedy for memorization, Section 5)
    adam_epsilon: float = 1e-8  # AdamW denominator floor
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    max_grad_norm: float | None = 1.0  # gradient clipping by global norm; None: off
    mixed_precision: str = "no"  # "no", "fp16" or "bf16" (Accelerate)
    random_flip: bool = False  # horizontal flips drawn per image per step (never stored in the data)
    use_ema: bool = True  # keep an EMA of the weights; it is what gets saved and sampled
    ema_max_decay: float = 0.999  # upper bound of the EMA decay
    ema_min_decay: float = 0.0  # lower bound of the EMA decay
    ema_inv_gamma: float = 1.0  # EMA warm-up: decay = 1 - (1 + step / inv_gamma) ** -power
    ema_power: float = 3 / 4  # EMA warm-up exponent
    ema_update_after_step: int = 0  # optimizer steps before the EMA starts averaging
    seed: int = 0  # seeds data order, noise, timesteps and flips (per micro-step and process)
    checkpointing_steps: int | None = None  # save checkpoint-<step>/ every this many steps; None: never
    checkpoints_total_limit: int | None = None  # keep at most this many checkpoints; None: all
    validation_steps: int | None = None  # call the validation function every this many steps; None: never
    stop_at_memorization: float | None = None  # stop at the first validation whose memorization ratio exceeds it
    logging_steps: int = 10  # log loss and learning rate to the trackers every this many steps
    dataloader_num_workers: int = 0  # processes decoding streamed images ahead of the loop (streaming data only)
    max_nonfinite_steps: int = 0  # optimizer steps with a NaN/Inf loss tolerated (skipped) before stopping
    show_progress: bool = True  # tqdm progress bar on the main process

    def __post_init__(self):
        for name in ("max_train_steps", "train_batch_size", "gradient_accumulation_steps", "logging_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        for name in ("checkpointing_steps", "checkpoints_total_limit", "validation_steps"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None (off), got {value!r}.")
        for name in ("lr_warmup_steps", "ema_update_after_step", "max_nonfinite_steps", "dataloader_num_workers"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}.")
        for name in ("learning_rate", "adam_beta1", "adam_beta2", "adam_weight_decay", "adam_epsilon",
                     "ema_max_decay", "ema_min_decay", "ema_inv_gamma", "ema_power"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}.")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate!r}.")
        if not self.adam_epsilon > 0:
            raise ValueError(
                f"adam_epsilon must be > 0 (it keeps AdamW's division finite), got {self.adam_epsilon!r}."
            )
        if self.adam_weight_decay < 0:
            raise ValueError(f"adam_weight_decay must be >= 0, got {self.adam_weight_decay!r}.")
        if self.lr_scheduler not in LR_SCHEDULES:
            raise ValueError(f"lr_scheduler must be one of {LR_SCHEDULES}, got {self.lr_scheduler!r}.")
        if not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1):
            raise ValueError("adam_beta1 and adam_beta2 must lie in [0, 1).")
        if not (0 <= self.ema_min_decay <= self.ema_max_decay < 1):
            raise ValueError("EMA decays must satisfy 0 <= ema_min_decay <= ema_max_decay < 1.")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be 'no', 'fp16' or 'bf16', got {self.mixed_precision!r}.")
        if self.stop_at_memorization is not None:
            value = self.stop_at_memorization
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ValueError(f"stop_at_memorization must be a memorization ratio in [0, 1), got {value!r}; "
                                 "pass e.g. --stop_at_memorization 0.1, or leave it unset (off).")
            if not self.validation_steps:
                raise ValueError("stop_at_memorization needs validation to measure the ratio: set validation_steps "
                                 "(--validation_steps N, N > 0).")
        if self.max_grad_norm is not None and not (math.isfinite(self.max_grad_norm) and self.max_grad_norm > 0):
            raise ValueError("max_grad_norm must be a finite number > 0, or None for no clipping.")
