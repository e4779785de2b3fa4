"""The denoising score-matching loss and THE training loop (Accelerate, EMA, atomic checkpoints).

One loop serves both ``training/train_dit.py`` (train a DiT from scratch) and the fine-tuning after head pruning
(Algorithm 1, step 4: "fine-tune the pruned model for M steps with the ordinary training loss"), so a pruned model is
fine-tuned with exactly the loss, optimiser and EMA it was trained with.

Choices the paper leaves open, made here:
- Time sampling: the diffusers DDPM discretisation, timestep index ``k`` uniform on ``{0, ..., K-1}``; the paper's
  integral over ``t in [t_0, T]`` becomes this average, with ``t_0 = -log(alphas_cumprod[0])`` as early stopping.
- Loss weighting: epsilon prediction with plain mean squared error (Ho et al. 2020), i.e. the paper's ``l_t`` times
  ``sigma_t^2`` (see :func:`dsm_loss`): the usual choice, which keeps every time's loss of order one.
- Unconditional models are class-conditional DiTs that only ever see the null label (``num_embeds_ada_norm``).
  For class-conditional training, DiT's own label dropout (10%, in ``LabelEmbedding``) also trains the null label,
  so classifier-free guidance works.
- Data order, noise, timesteps and flips come from generators seeded by ``(seed, micro-step, process)``, not from
  global RNG state: a run resumed from a checkpoint draws exactly what the uninterrupted run draws.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .data import TrainingData
from .utils import atomic_path, replace_path

CHECKPOINT_PREFIX = "checkpoint-"
_TRAINER_STATE = "trainer_state.json"
_EMA_WEIGHTS = "ema_model.safetensors"
_LR_SCHEDULES = ("linear", "cosine", "cosine_with_restarts", "polynomial", "constant", "constant_with_warmup")


# --------------------------------------------------------------------------------------------------------------
# Model and scheduler factories
# --------------------------------------------------------------------------------------------------------------
def make_dit(
    sample_size: int = 8,
    in_channels: int = 1,
    num_classes: int | None = None,
    num_layers: int = 4,
    num_attention_heads: int = 4,
    attention_head_dim: int = 32,
    patch_size: int = 2,
    learn_sigma: bool = False,
):
    """A ``PrunableDiTTransformer2DModel`` for ``sample_size x sample_size`` images with ``in_channels`` channels.

    The defaults are the documented setting for the embedded 8x8 digits (4 layers, 4 heads of 32, patch 2,
    1.42M parameters): see the README, section "How fast it memorizes" for how fast it memorizes. ``num_classes=None`` builds an
    unconditional model: one placeholder class (index 0, never used) and the null label 1, the only one trained.
    ``learn_sigma=True`` doubles the output channels as DiT does; only the first ``in_channels`` are trained by
    :func:`dsm_loss` (DDPM with fixed variances does not use the rest).
    """
    from .models import PrunableDiTTransformer2DModel

    for name, value in (("sample_size", sample_size), ("in_channels", in_channels), ("num_layers", num_layers),
                        ("num_attention_heads", num_attention_heads), ("attention_head_dim", attention_head_dim),
                        ("patch_size", patch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    if sample_size % patch_size:
        raise ValueError(
            f"patch size {patch_size} does not divide the resolution {sample_size}; choose a patch size that "
            f"divides it (e.g. {', '.join(str(p) for p in range(1, sample_size + 1) if sample_size % p == 0)}) "
            "or change the resolution."
        )
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
        raise ValueError(f"num_classes must be a positive integer or None (unconditional), got {num_classes!r}.")
    return PrunableDiTTransformer2DModel(
        num_attention_heads=num_attention_heads,
        attention_head_dim=attention_head_dim,
        in_channels=in_channels,
        out_channels=2 * in_channels if learn_sigma else in_channels,
        num_layers=num_layers,
        sample_size=sample_size,
        patch_size=patch_size,
        num_embeds_ada_norm=num_classes if num_classes is not None else 1,
    )


def make_noise_scheduler(num_train_timesteps: int = 1000, beta_schedule: str = "linear",
                         prediction_type: str = "epsilon"):
    """The DDPM training scheduler (``diffusers.DDPMScheduler``) with the given discretisation."""
    from diffusers import DDPMScheduler

    if prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(f"prediction_type must be 'epsilon', 'v_prediction' or 'sample', got {prediction_type!r}.")
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
                         prediction_type=prediction_type)


# --------------------------------------------------------------------------------------------------------------
# The loss
# --------------------------------------------------------------------------------------------------------------
def null_class_labels(model, batch_size: int, device) -> torch.Tensor:
    """The null label ``num_embeds_ada_norm`` (DiT's ``LabelEmbedding`` reserves that row for it)."""
    return torch.full((batch_size,), int(_config(model).num_embeds_ada_norm), dtype=torch.long, device=device)


def dsm_loss(model, noise_scheduler, clean_images: torch.Tensor, class_labels: torch.Tensor | None,
             timesteps: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
    """The ordinary denoising loss at the given timesteps (mean over batch and pixels).

    The paper (Section 1 of ``PAPER.md``) writes, for a training image ``x_i`` and time ``t``::

        l_t(x_i, s) = E_{X_t | X_0 = x_i} || -(X_t - alpha_t x_i) / sigma_t^2 - s(X_t, t) ||^2

    Line by line, as computed below (``alpha_t^2 = alphas_cumprod[t]``, ``sigma_t^2 = 1 - alpha_t^2``):

    - ``X_t = alpha_t x_i + sigma_t eps``, ``eps ~ N(0, I)``                ->  ``noise_scheduler.add_noise``
    - the regression target ``-(X_t - alpha_t x_i) / sigma_t^2 = -eps / sigma_t``
    - the score is parameterised by a noise predictor, ``s(X_t, t) = -eps_theta(X_t, t) / sigma_t``, so
      ``l_t = || eps - eps_theta(X_t, t) ||^2 / sigma_t^2``, and the returned epsilon loss
      ``mean || eps - eps_theta ||^2`` is ``sigma_t^2 l_t / d`` (d = pixels): the paper's loss re-weighted by
      ``sigma_t^2`` (Ho et al.'s "simple" weighting), with the same minimiser at every t.
    - ``prediction_type="v_prediction"``: target ``v = alpha_t eps - sigma_t x_i`` (``get_velocity``);
      ``"sample"``: target ``x_i`` (the denoiser ``E[X_0 | X_t]``). Both are again affine reparameterisations of
      the same score, so the minimiser (the empirical score when trained to optimality) is unchanged.

    Args:
        model: a DiT (``DiTTransformer2DModel`` or subclass). With learned sigma (``out_channels = 2 in_channels``)
            only the first ``in_channels`` output channels (the mean) enter the loss.
        noise_scheduler: a diffusers scheduler with ``add_noise`` (and ``get_velocity`` for v-prediction); its
            ``config.prediction_type`` selects the target.
        clean_images: ``[b, C, H, W]`` in ``[-1, 1]``.
        class_labels: ``LongTensor[b]`` or None, meaning the null label ``model.config.num_embeds_ada_norm``.
        timesteps: ``LongTensor[b]`` of scheduler indices (passed in, so callers choose t: Algorithm 2 of the paper
            evaluates this loss at small t).
        noise: the ``eps`` to use (default fresh ``randn_like``).
    """
    if noise is None:
        noise = torch.randn_like(clean_images)
    if class_labels is None:
        class_labels = null_class_labels(model, clean_images.shape[0], clean_images.device)
    timesteps = timesteps.to(clean_images.device)
    noisy_images = noise_scheduler.add_noise(clean_images, noise, timesteps)
    prediction = model(noisy_images, timestep=timesteps, class_labels=class_labels, return_dict=False)[0]
    prediction = prediction[:, : clean_images.shape[1]]  # learned sigma: the mean channels only
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(clean_images, noise, timesteps)
    elif prediction_type == "sample":
        target = clean_images
    else:
        raise ValueError(f"unsupported prediction_type {prediction_type!r}; use epsilon, v_prediction or sample.")
    return F.mse_loss(prediction.float(), target.float())


# --------------------------------------------------------------------------------------------------------------
# The loop
# --------------------------------------------------------------------------------------------------------------
@dataclass
class TrainingConfig:
    """Every setting of :func:`train_dit`; the flags of ``training/train_dit.py`` have the same names.

    Defaults are the documented setting for the embedded digits (the README, section "How fast it memorizes"): with the default
    :func:`make_dit` on 64 digits, about 85% of DDPM-1000 samples are memorized after 6,000 steps (~8 min on a
    2-core CPU); a 4x higher learning rate did not memorize any sooner within 2,000 steps.
    ``train_batch_size`` is per process, as in diffusers' example scripts; ``max_train_steps`` counts optimizer
    steps (each made of ``gradient_accumulation_steps`` micro-batches).
    """

    max_train_steps: int = 6000
    train_batch_size: int = 64
    learning_rate: float = 5e-4
    lr_scheduler: str = "constant_with_warmup"
    lr_warmup_steps: int = 100
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 0.0
    adam_epsilon: float = 1e-8
    gradient_accumulation_steps: int = 1
    max_grad_norm: float | None = 1.0
    mixed_precision: str = "no"
    random_flip: bool = False
    use_ema: bool = True
    ema_max_decay: float = 0.999
    ema_min_decay: float = 0.0
    ema_inv_gamma: float = 1.0
    ema_power: float = 3 / 4
    ema_update_after_step: int = 0
    seed: int = 0
    checkpointing_steps: int | None = None
    checkpoints_total_limit: int | None = None
    validation_steps: int | None = None
    logging_steps: int = 10
    show_progress: bool = True

    def __post_init__(self):
        for name in ("max_train_steps", "train_batch_size", "gradient_accumulation_steps", "logging_steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}.")
        for name in ("checkpointing_steps", "checkpoints_total_limit", "validation_steps"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive integer or None (off), got {value!r}.")
        if not self.learning_rate > 0:
            raise ValueError(f"learning_rate must be > 0, got {self.learning_rate!r}.")
        if self.lr_warmup_steps < 0 or self.adam_weight_decay < 0:
            raise ValueError("lr_warmup_steps and adam_weight_decay must be >= 0.")
        if self.lr_scheduler not in _LR_SCHEDULES:
            raise ValueError(f"lr_scheduler must be one of {_LR_SCHEDULES}, got {self.lr_scheduler!r}.")
        if not (0 <= self.adam_beta1 < 1 and 0 <= self.adam_beta2 < 1):
            raise ValueError("adam_beta1 and adam_beta2 must lie in [0, 1).")
        if not (0 <= self.ema_min_decay <= self.ema_max_decay < 1):
            raise ValueError("EMA decays must satisfy 0 <= ema_min_decay <= ema_max_decay < 1.")
        if self.mixed_precision not in ("no", "fp16", "bf16"):
            raise ValueError(f"mixed_precision must be 'no', 'fp16' or 'bf16', got {self.mixed_precision!r}.")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError("max_grad_norm must be > 0, or None for no clipping.")


@dataclass
class TrainResult:
    """What :func:`train_dit` returns.

    Attributes:
        model: the trained model (unwrapped from Accelerate, the same object that was passed in, in eval mode).
        ema_model: a copy holding the EMA weights, or None without ``use_ema``. Sample from this one.
        losses: the training loss of every optimizer step run in this call (process-local mean).
        steps: the global optimizer step reached (counting steps before a resume).
        train_seconds: wall time of the optimizer steps of this call (without checkpoints and validation).
        images_per_second: training images processed per second in those steps (all processes).
    """

    model: torch.nn.Module
    ema_model: torch.nn.Module | None
    losses: list[float] = field(default_factory=list)
    steps: int = 0
    train_seconds: float = 0.0
    images_per_second: float = 0.0


ValidationFn = Callable[[torch.nn.Module, int], "dict[str, float] | None"]


def train_dit(
    model,
    data: TrainingData,
    noise_scheduler,
    config: TrainingConfig | None = None,
    accelerator=None,
    output_dir: str | os.PathLike | None = None,
    resume_from_checkpoint: str | os.PathLike | None = None,
    validation_fn: ValidationFn | None = None,
) -> TrainResult:
    """Train ``model`` on ``data`` with :func:`dsm_loss` for ``config.max_train_steps`` optimizer steps.

    Works in memory (``output_dir=None``: no checkpoints, as the fine-tuning after pruning does) or with
    checkpoints under ``output_dir`` every ``config.checkpointing_steps`` (``checkpoint-<step>/``, written to a
    temporary folder and renamed, so a kill during a save never damages the last good checkpoint).

    Args:
        model: a DiT; trained in place (also an already pruned ``PrunableDiTTransformer2DModel``).
        data: the training set (:func:`diffusers_memsep.data.load_training_data`).
        noise_scheduler: the DDPM training scheduler.
        config: settings (default :class:`TrainingConfig()`).
        accelerator: an ``accelerate.Accelerator`` (the script passes one with its trackers); default a new one
            with ``config.mixed_precision``.
        resume_from_checkpoint: a ``checkpoint-<step>`` folder, or ``"latest"`` (the newest under
            ``output_dir``; starts fresh if there is none).
        validation_fn: called on the main process every ``config.validation_steps`` as ``fn(model, step)``, with
            the EMA weights loaded in ``model`` when ``use_ema``; the dict it returns is logged.

    Raises ValueError before any step for data the model cannot take (size, channels, labels out of range) and
    for a ``resume_from_checkpoint`` that is not a checkpoint.
    """
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from tqdm.auto import tqdm

    config = config or TrainingConfig()
    check_model_and_data(model, data)
    if resume_from_checkpoint is not None and output_dir is None and str(resume_from_checkpoint) == "latest":
        raise ValueError("resume_from_checkpoint='latest' needs output_dir (where the checkpoints are).")
    checkpoint = resolve_checkpoint(resume_from_checkpoint, output_dir)
    if config.checkpointing_steps and output_dir is None:
        raise ValueError("checkpointing_steps is set but output_dir is None; pass output_dir to save checkpoints.")

    if accelerator is None:
        accelerator = Accelerator(mixed_precision=config.mixed_precision)
    device = accelerator.device

    optimizer = torch.optim.AdamW(model.parameters(), lr=config.learning_rate,
                                  betas=(config.adam_beta1, config.adam_beta2),
                                  weight_decay=config.adam_weight_decay, eps=config.adam_epsilon)
    # The prepared scheduler steps once per process per optimizer step (diffusers' example scripts do the same).
    lr_scheduler = get_scheduler(config.lr_scheduler, optimizer,
                                 num_warmup_steps=config.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=config.max_train_steps * accelerator.num_processes)
    model, optimizer, lr_scheduler = accelerator.prepare(model, optimizer, lr_scheduler)
    bare_model = accelerator.unwrap_model(model)

    ema = None
    if config.use_ema:
        ema = EMAModel(bare_model.parameters(), decay=config.ema_max_decay, min_decay=config.ema_min_decay,
                       update_after_step=config.ema_update_after_step, use_ema_warmup=True,
                       inv_gamma=config.ema_inv_gamma, power=config.ema_power, foreach=True)
        ema.to(device)

    global_step = 0
    if checkpoint is not None:
        accelerator.print(f"Resuming from checkpoint {checkpoint}")
        accelerator.load_state(str(checkpoint))
        global_step = _read_trainer_state(checkpoint)["global_step"]
        if ema is not None:
            _load_ema(ema, checkpoint)

    batches = _BatchStream(data, config, device, accelerator.process_index, accelerator.num_processes)
    losses: list[float] = []
    progress = tqdm(total=config.max_train_steps, initial=global_step, desc="Steps",
                    disable=not (config.show_progress and accelerator.is_local_main_process))
    accumulation = config.gradient_accumulation_steps
    model.train()
    train_seconds = 0.0
    while global_step < config.max_train_steps:
        step_start = time.perf_counter()
        step_loss = 0.0
        for micro in range(accumulation):
            clean, labels, timesteps, noise = batches.get(global_step * accumulation + micro,
                                                           noise_scheduler.config.num_train_timesteps)
            # Only the last micro-batch all-reduces gradients (DDP); the others accumulate locally.
            sync = accelerator.no_sync(model) if micro < accumulation - 1 else nullcontext()
            with sync:
                loss = dsm_loss(model, noise_scheduler, clean, labels, timesteps, noise)
                accelerator.backward(loss / accumulation)
            step_loss += loss.detach().item() / accumulation
        if config.max_grad_norm is not None:
            accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.step(bare_model.parameters())
        global_step += 1
        losses.append(step_loss)
        train_seconds += time.perf_counter() - step_start

        logs = {"loss": step_loss, "lr": lr_scheduler.get_last_lr()[0], "step": global_step}
        if ema is not None:
            logs["ema_decay"] = ema.cur_decay_value
        progress.update(1)
        progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{logs['lr']:.2e}")
        if global_step % config.logging_steps == 0 or global_step == config.max_train_steps:
            accelerator.log(logs, step=global_step)

        if config.checkpointing_steps and global_step % config.checkpointing_steps == 0:
            save_checkpoint(accelerator, output_dir, global_step, ema, config)
        if validation_fn is not None and config.validation_steps and (
                global_step % config.validation_steps == 0 or global_step == config.max_train_steps):
            if accelerator.is_main_process:
                metrics = _validate(bare_model, ema, validation_fn, global_step)
                if metrics:
                    accelerator.log(metrics, step=global_step)
                    progress.write(f"step {global_step}: " + ", ".join(
                        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
            model.train()
    progress.close()
    accelerator.wait_for_everyone()

    bare_model.eval()
    ema_model = None
    if ema is not None:
        ema_model = copy.deepcopy(bare_model)
        ema.copy_to(ema_model.parameters())
        ema_model.eval()
    images = len(losses) * config.train_batch_size * accumulation * accelerator.num_processes
    return TrainResult(model=bare_model, ema_model=ema_model, losses=losses, steps=global_step,
                       train_seconds=train_seconds, images_per_second=images / train_seconds if train_seconds else 0.0)


def check_model_and_data(model, data: TrainingData) -> None:
    """Raise ValueError (naming the fix) when ``model`` cannot be trained on ``data``."""
    if not isinstance(data, TrainingData):
        raise TypeError(f"data must be a TrainingData (load_training_data), got {type(data).__name__}.")
    config = _config(model)
    if len(data) == 0:
        raise ValueError("the training set is empty.")
    _, channels, height, width = data.images.shape
    if config.patch_size and height % config.patch_size:
        raise ValueError(
            f"patch size {config.patch_size} does not divide the resolution {height}; pick a resolution that is a "
            f"multiple of {config.patch_size} or a model with a patch size that divides {height}."
        )
    if (height, width) != (config.sample_size, config.sample_size):
        raise ValueError(
            f"the images are {height}x{width} but the model's sample_size is {config.sample_size}; set the "
            f"resolution to {config.sample_size} or build the model with sample_size={height}."
        )
    if channels != config.in_channels:
        raise ValueError(f"the images have {channels} channels but the model takes {config.in_channels}; build the "
                         f"model with in_channels={channels}.")
    if data.labels is not None:
        num_classes = int(config.num_embeds_ada_norm)
        if data.labels.shape[0] != len(data):
            raise ValueError("data.labels must hold one label per image.")
        if int(data.labels.min()) < 0 or int(data.labels.max()) >= num_classes:
            raise ValueError(
                f"labels span [{int(data.labels.min())}, {int(data.labels.max())}] but the model has {num_classes} "
                f"classes (num_embeds_ada_norm); build it with num_classes >= {int(data.labels.max()) + 1}."
            )


class _BatchStream:
    """Deterministic batches: micro-step ``m`` is a pure function of ``(seed, m, process)``.

    The data are read as an endless stream of permutations (epoch ``e`` is permutation ``e`` drawn from
    ``(seed, e)``); micro-step ``m`` takes the next ``batch x processes`` positions and process ``r`` its slice, so
    every image is seen once per epoch. Noise, timesteps and flips come from a generator seeded by
    ``(seed, m, r)``. A resumed run therefore continues exactly where the uninterrupted run would be.
    """

    def __init__(self, data: TrainingData, config: TrainingConfig, device, rank: int, world: int):
        self.images = data.images.to(device)
        self.labels = data.labels.to(device) if data.labels is not None else None
        self.n = len(data)
        self.batch, self.seed, self.flip = config.train_batch_size, int(config.seed), config.random_flip
        self.rank, self.world, self.device = rank, world, device
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.pop(min(self._perms))
            rng = np.random.default_rng([self.seed, epoch])
            self._perms[epoch] = torch.from_numpy(rng.permutation(self.n)).to(self.device)
        return self._perms[epoch]

    def get(self, micro_step: int, num_train_timesteps: int):
        start = (micro_step * self.world + self.rank) * self.batch
        positions = range(start, start + self.batch)
        first, last = start // self.n, (start + self.batch - 1) // self.n
        if first == last:
            offset = start - first * self.n
            index = self._perm(first)[offset: offset + self.batch]
        else:
            index = torch.stack([self._perm(p // self.n)[p % self.n] for p in positions])
        clean = self.images[index]
        labels = self.labels[index] if self.labels is not None else None
        seed = int(np.random.SeedSequence([self.seed, micro_step, self.rank]).generate_state(1)[0])
        generator = torch.Generator(device=self.device).manual_seed(seed)
        timesteps = torch.randint(0, num_train_timesteps, (self.batch,), generator=generator, device=self.device)
        noise = torch.randn(clean.shape, generator=generator, device=self.device, dtype=clean.dtype)
        if self.flip:
            flip = torch.rand(self.batch, generator=generator, device=self.device) < 0.5
            clean = torch.where(flip[:, None, None, None], clean.flip(-1), clean)
        return clean, labels, timesteps, noise


def _validate(bare_model, ema, validation_fn: ValidationFn, step: int):
    was_training = bare_model.training
    bare_model.eval()
    if ema is not None:  # sample with the EMA weights, then put the training weights back
        ema.store(bare_model.parameters())
        ema.copy_to(bare_model.parameters())
    try:
        with torch.no_grad():
            return validation_fn(bare_model, step)
    finally:
        if ema is not None:
            ema.restore(bare_model.parameters())
        bare_model.train(was_training)


# --------------------------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------------------------
def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete ``checkpoint-<step>`` folders under ``output_dir``, oldest first (temporary folders ignored)."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [p for p in folder.iterdir()
             if p.is_dir() and re.fullmatch(rf"{CHECKPOINT_PREFIX}\d+", p.name) and (p / _TRAINER_STATE).is_file()]
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
    if not (path / _TRAINER_STATE).is_file():
        raise ValueError(f"{str(path)!r} is not a training checkpoint (no {_TRAINER_STATE}); pass a "
                         f"'{CHECKPOINT_PREFIX}<step>' folder written by train_dit.")
    return path


def save_checkpoint(accelerator, output_dir, global_step: int, ema, config: TrainingConfig) -> Path | None:
    """Save ``checkpoint-<step>`` atomically: write ``.checkpoint-<step>.tmp``, then rename it into place.

    ``accelerator.save_state`` writes model (safetensors), optimizer, scheduler and RNG states; the EMA weights go
    in ``ema_model.safetensors``; ``trainer_state.json`` is written last and marks a complete checkpoint. Old
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
            _save_ema(ema, temporary)
        state = {"global_step": global_step, "config": asdict(config)}
        (temporary / _TRAINER_STATE).write_text(json.dumps(state, indent=2))
        replace_path(temporary, final)  # re-saving a step after a resume: the old one is dropped after
        if config.checkpoints_total_limit is not None:
            for old in list_checkpoints(output_dir)[: -config.checkpoints_total_limit]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def _save_ema(ema, folder: Path) -> None:
    from safetensors.torch import save_file

    tensors = {f"shadow.{i}": p.detach().contiguous().cpu() for i, p in enumerate(ema.shadow_params)}
    metadata = {"optimization_step": str(ema.optimization_step)}
    save_file(tensors, str(folder / _EMA_WEIGHTS), metadata=metadata)


def _load_ema(ema, folder: Path) -> None:
    from safetensors import safe_open

    path = folder / _EMA_WEIGHTS
    if not path.is_file():
        raise ValueError(f"checkpoint {str(folder)!r} has no EMA weights ({_EMA_WEIGHTS}) but use_ema is on; "
                         "resume with use_ema off or from a checkpoint saved with EMA.")
    with safe_open(str(path), framework="pt") as handle:
        step = int(handle.metadata()["optimization_step"])
        for i, shadow in enumerate(ema.shadow_params):
            shadow.copy_(handle.get_tensor(f"shadow.{i}").to(shadow.device, shadow.dtype))
    ema.optimization_step = step


def _read_trainer_state(folder: Path) -> dict:
    return json.loads((folder / _TRAINER_STATE).read_text())


def _config(model):
    return getattr(model, "config", None) or getattr(getattr(model, "module", None), "config")


# --------------------------------------------------------------------------------------------------------------
# From a training run to a MemSepPipeline folder (used by `memsep train` / training/train_dit.py and the demo)
# --------------------------------------------------------------------------------------------------------------
#: DiT's label dropout (``CombinedTimestepLabelEmbeddings(class_dropout_prob=0.1)``): the share of labels replaced
#: by the null class while training a class-conditional model. Unconditional models see only the null class (1.0).
DIT_LABEL_DROPOUT = 0.1


def build_pipeline(model, noise_scheduler, data: TrainingData):
    """A ``MemSepPipeline`` of ``model`` whose reference is exactly the training images of ``data``."""
    from .memorization import NearestNeighborIndex
    from .pipelines import MemSepPipeline

    reference = NearestNeighborIndex.from_images(data.images) if len(data) >= 2 else None
    return MemSepPipeline(transformer=model, scheduler=noise_scheduler, reference=reference,
                          label_dropout_prob=DIT_LABEL_DROPOUT if data.labels is not None else 1.0)


def sample_and_measure(pipeline, num_samples: int, num_inference_steps: int, num_classes: int | None = None,
                       seed: int = 0, scheduler=None):
    """Sample ``num_samples`` images (labels cycling over the classes when conditional) with a fixed seed.

    ``scheduler`` (default: the pipeline's) is used for this call only. Returns the pipeline output
    (``images`` as a ``[B, C, H, W]`` tensor in ``[0, 1]``, ``memorized``...) and the memorization ratio.
    """
    original = pipeline.scheduler
    if scheduler is not None:
        pipeline.scheduler = scheduler
    try:
        labels = [i % num_classes for i in range(num_samples)] if num_classes else None
        generator = torch.Generator().manual_seed(int(seed))
        output = pipeline(class_labels=labels, batch_size=None if labels else num_samples,
                          num_inference_steps=num_inference_steps, generator=generator, output_type="pt")
    finally:
        pipeline.scheduler = original
    ratio = float(output.memorized.float().mean()) if output.memorized is not None else float("nan")
    return output, ratio


def make_validation_fn(noise_scheduler, data: TrainingData, samples_dir: str | os.PathLike | None = None,
                       num_samples: int = 64, num_inference_steps: int = 1000, seed: int = 0, accelerator=None):
    """A ``validation_fn`` for :func:`train_dit`: sample a grid, save it, return the memorization ratio.

    Samples come from the model being trained (EMA weights when on) with a DDPM sampler of
    ``num_inference_steps`` steps built from the training scheduler's config, always from the same noise
    (``seed``), so grids of successive steps are comparable. The grid goes to
    ``<samples_dir>/step-<step>.png`` (atomically) and, when the accelerator logs to TensorBoard, to TensorBoard.
    """
    from diffusers import DDPMScheduler
    from diffusers.utils import make_image_grid

    from .memorization import NearestNeighborIndex
    from .pipelines import MemSepPipeline

    sampler = DDPMScheduler.from_config(noise_scheduler.config)
    reference = NearestNeighborIndex.from_images(data.images)
    label_dropout = DIT_LABEL_DROPOUT if data.labels is not None else 1.0

    def validation_fn(model, step: int) -> dict[str, float]:
        pipeline = MemSepPipeline(transformer=model, scheduler=sampler, reference=reference.to(model.device),
                                  label_dropout_prob=label_dropout)
        pipeline.set_progress_bar_config(disable=True)
        output, ratio = sample_and_measure(pipeline, num_samples, num_inference_steps, data.num_classes, seed)
        if samples_dir is not None:
            rows = max(1, int(math.sqrt(num_samples)))
            images = pipeline.numpy_to_pil(output.images.cpu().permute(0, 2, 3, 1).numpy())
            grid = make_image_grid(images[: rows * (num_samples // rows)], rows=rows, cols=num_samples // rows)
            zoom = max(1, 64 // data.resolution)  # 8x8 digits are unreadable at their own size
            grid = grid.resize((grid.width * zoom, grid.height * zoom), resample=0)  # 0 = nearest: keep pixels
            with atomic_path(Path(samples_dir) / f"step-{step:06d}.png") as temporary:
                grid.save(temporary, format="PNG")
        if accelerator is not None:
            for tracker in accelerator.trackers:
                if tracker.name == "tensorboard":
                    tracker.writer.add_images("samples", output.images.cpu().numpy(), step)
        return {"memorization_ratio": ratio, "memorized_samples": int(output.memorized.sum())}

    return validation_fn


def check_output_dir(output_dir: str | os.PathLike, overwrite_output_dir: bool = False,
                     resume_from_checkpoint=None) -> None:
    """Refuse an output folder that already holds something, unless overwriting or resuming that run."""
    folder = Path(output_dir)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"output_dir {str(folder)!r} is a file; pass a folder.")
    if resume_from_checkpoint is not None or overwrite_output_dir or not folder.is_dir():
        return
    contents = sorted(p.name for p in folder.iterdir())
    if contents:
        shown = ", ".join(contents[:5]) + (", ..." if len(contents) > 5 else "")
        raise ValueError(
            f"output_dir {str(folder)!r} already holds another run ({shown}); pass --overwrite_output_dir to replace "
            "it, --resume_from_checkpoint latest to continue it, or choose another --output_dir."
        )


def save_pipeline_folder(pipeline, output_dir: str | os.PathLike) -> Path:
    """``pipeline.save_pretrained`` into a temporary folder, then move each entry into ``output_dir``.

    Every file and sub-folder is swapped in with ``os.replace``; ``model_index.json`` comes last, so a folder
    with a ``model_index.json`` always holds a complete pipeline. Other content (checkpoints, logs) is kept.
    """
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    temporary = output_dir / ".pipeline.tmp"
    shutil.rmtree(temporary, ignore_errors=True)
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


def train_pipeline(
    output_dir: str | os.PathLike,
    data: TrainingData,
    model,
    noise_scheduler,
    config: TrainingConfig | None = None,
    overwrite_output_dir: bool = False,
    resume_from_checkpoint: str | os.PathLike | None = None,
    report_to: str = "tensorboard",
    logging_dir: str = "logs",
    validation_num_samples: int = 64,
    validation_inference_steps: int = 1000,
    push_to_hub: bool = False,
    hub_model_id: str | None = None,
    hub_private_repo: bool = False,
    hub_token: str | None = None,
    card_fields: dict | None = None,
) -> TrainedPipeline:
    """Train ``model`` with :func:`train_dit` and leave a ``MemSepPipeline`` folder in ``output_dir``.

    The folder holds the transformer (EMA weights when ``use_ema``, else the trained ones; safetensors), the DDPM
    scheduler, the training-set reference (exactly ``data.images``), a model card (``README.md`` from
    ``model_cards/base_model.md``), sample grids (``samples/``), TensorBoard logs (``logs/``) and checkpoints.
    The memorization ratio is measured every ``config.validation_steps`` and always at the last step
    (``validation_num_samples`` DDPM samples of ``validation_inference_steps`` steps, fixed seed; 0 samples: off).

    Everything that can be checked is checked before the first step: the output folder (refused when it holds
    another run, unless ``overwrite_output_dir`` or resuming), model vs data, the checkpoint, the tracker.
    ``push_to_hub`` uploads the saved folder (checkpoints and logs excluded) through
    :func:`diffusers_memsep.hub.push_folder_to_hub`; a failed push raises ``HubPushError`` with the folder intact.
    """
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    from .hub import push_folder_to_hub, save_model_card

    config = config or TrainingConfig()
    output_dir = Path(output_dir)
    check_output_dir(output_dir, overwrite_output_dir, resume_from_checkpoint)
    check_model_and_data(model, data)
    resolve_checkpoint(resume_from_checkpoint, output_dir)
    log_with = _trackers(report_to)
    if validation_num_samples < 0 or validation_inference_steps < 1:
        raise ValueError("validation_num_samples must be >= 0 and validation_inference_steps >= 1.")
    if push_to_hub and not (hub_model_id or output_dir.name):
        raise ValueError("push_to_hub needs --hub_model_id (e.g. me/dit-digits).")
    if overwrite_output_dir and resume_from_checkpoint is None:
        for old in list_checkpoints(output_dir):  # another run's checkpoints must never be resumed as ours
            shutil.rmtree(old)
        for old in (output_dir / "samples", output_dir / logging_dir):  # nor its grids and curves shown as ours
            shutil.rmtree(old, ignore_errors=True)

    output_dir.mkdir(parents=True, exist_ok=True)
    accelerator = Accelerator(mixed_precision=config.mixed_precision, log_with=log_with,
                              project_config=ProjectConfiguration(project_dir=str(output_dir),
                                                                  logging_dir=str(output_dir / logging_dir)))
    if log_with:
        accelerator.init_trackers("train_dit", config=_flat_config(config, model, data))

    validation_fn = None
    metrics: dict = {}
    if validation_num_samples > 0:
        measure = make_validation_fn(noise_scheduler, data, output_dir / "samples", validation_num_samples,
                                     validation_inference_steps, seed=config.seed, accelerator=accelerator)

        def validation_fn(model_with_ema, step):
            metrics.clear()
            metrics.update(measure(model_with_ema, step))
            return metrics

    if not config.validation_steps:
        config = replace(config, validation_steps=config.max_train_steps)  # measure at the end at least
    result = train_dit(model, data, noise_scheduler, config, accelerator=accelerator, output_dir=output_dir,
                       resume_from_checkpoint=resume_from_checkpoint, validation_fn=validation_fn)
    train_seconds, images_per_second = result.train_seconds, result.images_per_second

    final_model = result.ema_model if result.ema_model is not None else result.model
    pipeline = build_pipeline(final_model, noise_scheduler, data)
    hub_url = None
    if accelerator.is_main_process:
        save_pipeline_folder(pipeline, output_dir)
        fields = base_model_card_fields(final_model, noise_scheduler, data, config, metrics, train_seconds,
                                        images_per_second, validation_num_samples, validation_inference_steps,
                                        hub_model_id)
        fields.update(card_fields or {})
        metadata, eval_results = fields.pop("metadata"), fields.pop("eval_results")
        save_model_card(output_dir, "base_model", metadata=metadata, eval_results=eval_results, **fields)
    accelerator.end_training()
    if push_to_hub and accelerator.is_main_process:
        hub_url = push_folder_to_hub(output_dir, hub_model_id or output_dir.name, private=hub_private_repo,
                                     token=hub_token, commit_message=f"Train DiT: {result.steps} steps")
    return TrainedPipeline(pipeline, output_dir, result, dict(metrics), train_seconds, images_per_second, hub_url)


def base_model_card_fields(model, noise_scheduler, data: TrainingData, config: TrainingConfig, metrics: dict,
                           train_seconds: float, images_per_second: float, num_samples: int, inference_steps: int,
                           hub_model_id: str | None = None) -> dict:
    """The variables of ``model_cards/base_model.md`` (plus ``metadata`` and ``eval_results`` for the header)."""
    model_name = (hub_model_id or "dit-memsep").split("/")[-1]
    dataset_tag = data.source.split(" ")[0]
    eval_results = []
    memorization = []
    if "memorization_ratio" in metrics:
        sampler = f"DDPM-{inference_steps}"
        memorization.append({"sampler": sampler, "ratio": metrics["memorization_ratio"], "num_samples": num_samples})
        eval_results.append({"metric_type": "memorization_ratio", "metric_value": round(metrics["memorization_ratio"], 4),
                             "metric_name": f"Memorization ratio (1/3 rule, {sampler}, {num_samples} samples)",
                             "dataset_name": data.source, "dataset_type": dataset_tag})
    model_config = dict(model.config)
    return {
        "metadata": {"model_name": model_name, "datasets": [dataset_tag], "license": "apache-2.0"},
        "eval_results": eval_results,
        "model_name": model_name,
        "hub_model_id": hub_model_id,
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
        "command": " ".join(["memsep train"] + [a for a in _command_line()]) if _command_line() else None,
    }


def _command_line() -> list[str]:
    import sys

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


def load_dit_config(name_or_path: str | os.PathLike) -> dict:
    """A DiT config from ``config.json``, its folder, a pipeline folder (``transformer/``), or a Hub id."""
    from .models import PrunableDiTTransformer2DModel

    path = Path(name_or_path)
    if path.is_file():
        return json.loads(path.read_text())
    if path.is_dir() and (path / "transformer" / "config.json").is_file():
        return PrunableDiTTransformer2DModel.load_config(str(path), subfolder="transformer")
    if path.is_dir() and not (path / "config.json").is_file():
        raise ValueError(f"{str(path)!r} holds no config.json (nor transformer/config.json); pass a DiT config.")
    return PrunableDiTTransformer2DModel.load_config(str(name_or_path))


__all__ = ["TrainingConfig", "TrainResult", "TrainedPipeline", "dsm_loss", "null_class_labels", "make_dit",
           "make_noise_scheduler", "train_dit", "train_pipeline", "check_model_and_data", "check_output_dir",
           "save_checkpoint", "resolve_checkpoint", "list_checkpoints", "build_pipeline", "sample_and_measure",
           "make_validation_fn", "save_pipeline_folder", "base_model_card_fields", "load_dit_config"]
