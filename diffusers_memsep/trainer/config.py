"""The trainer's settings: :class:`TrainingConfig` (the run, recorded in every checkpoint) and the settings of
:func:`~diffusers_memsep.trainer.train_pipeline` around it (:class:`OutputConfig`, :class:`ValidationConfig`,
:class:`HubConfig`); the flags of ``memsep train`` have the same names."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

#: The learning-rate schedules of ``diffusers.optimization.get_scheduler`` the trainer accepts.
LR_SCHEDULES = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")
#: The trackers of ``OutputConfig.report_to`` (``--report_to``).
REPORT_TO = ("tensorboard", "wandb", "all", "none")


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


@dataclass
class OutputConfig:
    """What :func:`~diffusers_memsep.trainer.train_pipeline` does with its ``output_dir`` (flags of the same names).

    None of these is a setting of the run itself: a resume may change any of them (a checkpoint records
    :class:`TrainingConfig`, never these).
    """

    overwrite_output_dir: bool = False  # replace a previous run in output_dir (refused otherwise)
    resume_from_checkpoint: str | os.PathLike | None = None  # a checkpoint-<step> folder, "latest", or None (new run)
    report_to: str | None = "tensorboard"  # "tensorboard", "wandb", "all" or "none" (None: "none")
    logging_dir: str = "logs"  # tracker folder, relative to (and inside) output_dir

    def __post_init__(self):
        if self.report_to is not None and self.report_to not in REPORT_TO:
            raise ValueError(f"report_to must be one of {REPORT_TO}, got {self.report_to!r}; pass e.g. "
                             "--report_to none.")
        if not isinstance(self.logging_dir, (str, os.PathLike)) or not str(self.logging_dir):
            raise ValueError(f"logging_dir must be a folder name inside output_dir (e.g. 'logs'), got "
                             f"{self.logging_dir!r}; pass --logging_dir logs.")


VALIDATION_SAMPLERS = ("ddpm", "ddim")


@dataclass
class ValidationConfig:
    """What a validation samples (``memsep train --validation_*``); WHEN it runs is ``TrainingConfig``'s
    ``validation_steps`` (and always at the last step), as the training loop schedules it.

    Seeds (:data:`~diffusers_memsep.evaluate.EVALUATION_SEED_STRIDE`): batch ``b`` draws ``TrainingConfig.seed + b``;
    with ``stop_at_memorization`` (the validation then chooses the weights) ``CURVE_SEED + b``, disjoint from every
    evaluation seed.
    """

    num_samples: int = 64  # samples per validation; 0: no validation (no ratio in the card)
    inference_steps: int | None = None  # sampler steps per validation sample; None: the training schedule's length
    sampler: str = "ddpm"  # "ddpm" or "ddim" (fewer steps for the same ratio; the study validates as it evaluates)

    def __post_init__(self):
        if self.sampler not in VALIDATION_SAMPLERS:
            raise ValueError(f"validation sampler must be one of {VALIDATION_SAMPLERS}, got {self.sampler!r}; pass "
                             "--validation_sampler ddpm or ddim.")
        if isinstance(self.num_samples, bool) or not isinstance(self.num_samples, int) or self.num_samples < 0:
            raise ValueError(f"validation num_samples must be an integer >= 0, got {self.num_samples!r}; pass "
                             "--validation_num_samples N (0: off).")
        steps = self.inference_steps
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 1):
            raise ValueError(f"validation inference_steps must be a positive integer or None (the training "
                             f"schedule's length), got {steps!r}; pass --validation_inference_steps N (N >= 1).")


@dataclass
class HubConfig:
    """Where :func:`~diffusers_memsep.trainer.train_pipeline` pushes the finished folder (``--push_to_hub``,
    ``--hub_model_id``, ``--hub_private_repo``, ``--hub_token``, ``--push_reference``); the repo is checked (and
    created) before the first training step, as diffusers' training scripts do."""

    push_to_hub: bool = False  # upload the output folder at the end
    model_id: str | None = None  # repo id, e.g. "me/dit-digits"; None: the output folder's name
    private: bool = False  # create the repo as private
    token: str | None = None  # Hub token; None: the logged-in one / HF_TOKEN
    push_reference: bool = False  # also publish reference/ (the EXACT training images; left out by default)

    def __post_init__(self):
        if self.model_id is not None and (not isinstance(self.model_id, str) or not self.model_id.strip()):
            raise ValueError(f"hub model_id must be a repo id such as 'me/dit-digits' or None, got "
                             f"{self.model_id!r}; pass --hub_model_id me/dit-digits.")
