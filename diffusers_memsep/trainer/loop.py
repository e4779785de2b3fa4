"""THE training loop (Accelerate, EMA, deterministic batches), as NVlabs/edm's ``training/training_loop.py``.

One loop serves both ``memsep train`` (train a DiT from scratch) and the fine-tuning after head pruning
(Ye et al. 2025, Section 6, Algorithm 1, step 4: "fine-tune the pruned model for M steps with the ordinary training
loss"), so a pruned model is fine-tuned with exactly the loss, optimiser and EMA it was trained with.

Choices the paper leaves open, made here:
- Time sampling: the diffusers DDPM discretisation, timestep index ``k`` uniform on ``{0, ..., K-1}``; the paper's
  integral over ``t in [t_0, T]`` becomes this average, with ``t_0 = -log(alphas_cumprod[0])`` as early stopping.
- Loss weighting: epsilon prediction with plain mean squared error (Ho et al. 2020), i.e. the paper's ``l_t`` times
  ``sigma_t^2`` (see :func:`~diffusers_memsep.trainer.loss.dsm_loss`): the usual choice, which keeps every time's
  loss of order one.
- Unconditional models are class-conditional DiTs that only ever see the null label (``num_embeds_ada_norm``).
  For class-conditional training, DiT's own label dropout (10%, in ``LabelEmbedding``) also trains the null label,
  so classifier-free guidance works.
- Data order, noise, timesteps and flips come from generators seeded by ``(seed, micro-step, process)``, not from
  global RNG state: a run resumed from a checkpoint draws exactly what the uninterrupted run draws. DiT's label
  dropout draws from the global RNG, so it runs with that RNG seeded the same way (:func:`_label_dropout_rng`).
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import broadcast
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from ..data import StreamingTrainingData, TrainingData
from .checkpoints import (
    check_same_run,
    load_checkpoint,
    read_trainer_state,
    register_checkpoint_hooks,
    resolve_checkpoint,
    run_signature,
    save_checkpoint,
)
from .config import TrainingConfig
from .early_stopping import EarlyStopping
from .loss import dsm_loss, model_config


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
        early_stopping: with ``config.stop_at_memorization``, the curve of validations and the decision
            (:class:`~diffusers_memsep.trainer.early_stopping.EarlyStopping`); else None.
        kept_model: with ``config.stop_at_memorization``, a copy holding the weights (EMA weights when on) of the
            last validation at or below the threshold; else None.
    """

    model: torch.nn.Module
    ema_model: torch.nn.Module | None
    losses: list[float] = field(default_factory=list)
    steps: int = 0
    train_seconds: float = 0.0
    images_per_second: float = 0.0
    early_stopping: EarlyStopping | None = None
    kept_model: torch.nn.Module | None = None

    @property
    def sampling_model(self) -> torch.nn.Module:
        """The model to save and sample: the early-stopped weights, else the EMA weights, else the trained ones."""
        for model in (self.kept_model, self.ema_model):
            if model is not None:
                return model
        return self.model


ValidationFn = Callable[[torch.nn.Module, int], "dict[str, float] | None"]


def train_dit(
    model,
    data: TrainingData | StreamingTrainingData,
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
        validation_fn: called on the main process every ``config.validation_steps`` (and at the last step) as
            ``fn(model, step)``, with the EMA weights loaded in ``model`` when ``use_ema``; the dict it returns is
            logged. With ``config.stop_at_memorization`` it must return ``"memorization_ratio"``: training stops at
            the first validation whose ratio exceeds the threshold, every process at the same step, and
            ``TrainResult.kept_model`` holds the weights of the last validation at or below it (see
            :mod:`~diffusers_memsep.trainer.early_stopping`; the state rides in the checkpoints).

    Raises ValueError before any step for data the model cannot take (size, channels, labels out of range), for
    a ``resume_from_checkpoint`` that is not a checkpoint, is damaged, or was written by a run with other data,
    seed, batch layout, model or noise schedule (:func:`~diffusers_memsep.trainer.checkpoints.check_same_run`);
    :class:`NonFiniteLossError` (a ValueError) when the loss stops being finite (``config.max_nonfinite_steps``).
    """
    config = config or TrainingConfig()
    check_model_and_data(model, data)
    if resume_from_checkpoint is not None and output_dir is None and str(resume_from_checkpoint) == "latest":
        raise ValueError("resume_from_checkpoint='latest' needs output_dir (where the checkpoints are).")
    checkpoint = resolve_checkpoint(resume_from_checkpoint, output_dir)
    if config.checkpointing_steps and output_dir is None:
        raise ValueError("checkpointing_steps is set but output_dir is None; pass output_dir to save checkpoints.")
    if config.stop_at_memorization is not None and validation_fn is None:
        raise ValueError("stop_at_memorization needs a validation_fn returning 'memorization_ratio' (memsep train "
                         "builds one; pass --validation_num_samples > 0).")

    if accelerator is None:
        accelerator = Accelerator(mixed_precision=config.mixed_precision)
    device = accelerator.device
    run_config = None  # hashes every image (a full decode of a streamed set): only where a checkpoint needs it
    if checkpoint is not None or config.checkpointing_steps:
        run_config = run_signature(model, data, noise_scheduler, config, accelerator.num_processes)
    if checkpoint is not None:
        check_same_run(checkpoint, run_config)

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
                       inv_gamma=config.ema_inv_gamma, power=config.ema_power, foreach=True,
                       model_cls=type(bare_model), model_config=bare_model.config)
        ema.to(device)

    early_stopping = EarlyStopping(config.stop_at_memorization) if config.stop_at_memorization is not None else None
    hooks = register_checkpoint_hooks(accelerator, ema) if output_dir is not None else []
    if early_stopping is not None and output_dir is not None:
        hooks += early_stopping.register_checkpoint_hooks(accelerator)  # its state rides in every checkpoint
    try:
        return _run(accelerator, model, bare_model, optimizer, lr_scheduler, ema, data, noise_scheduler, config,
                    checkpoint, output_dir, run_config, validation_fn, early_stopping)
    finally:
        for handle in hooks:
            handle.remove()


def _run(accelerator, model, bare_model, optimizer, lr_scheduler, ema, data, noise_scheduler, config, checkpoint,
         output_dir, run_config, validation_fn, early_stopping) -> TrainResult:
    """The steps of :func:`train_dit` once everything is built and checked."""
    device = accelerator.device
    global_step = 0
    if checkpoint is not None:
        accelerator.print(f"Resuming from checkpoint {checkpoint}")
        load_checkpoint(accelerator, checkpoint, ema)
        global_step = read_trainer_state(checkpoint)["global_step"]

    accumulation = config.gradient_accumulation_steps
    batches = _BatchStream(data, config, device, accelerator.process_index, accelerator.num_processes,
                           first_micro_step=global_step * accumulation)
    losses: list[float] = []
    progress = tqdm(total=config.max_train_steps, initial=global_step, desc="Steps",
                    disable=not (config.show_progress and accelerator.is_local_main_process))
    model.train()
    train_seconds = 0.0
    nonfinite_steps = 0
    while global_step < config.max_train_steps and not (early_stopping is not None and early_stopping.stopped):
        step_start = time.perf_counter()
        # 1. Accumulate: gradients of the micro-batches of this optimizer step.
        step_loss = 0.0
        for micro in range(accumulation):
            clean, labels, timesteps, noise = batches.get(global_step * accumulation + micro,
                                                           noise_scheduler.config.num_train_timesteps)
            # Only the last micro-batch all-reduces gradients (DDP); the others accumulate locally.
            sync = accelerator.no_sync(model) if micro < accumulation - 1 else nullcontext()
            with sync, _label_dropout_rng(config.seed, global_step * accumulation + micro, accelerator):
                loss = dsm_loss(model, noise_scheduler, clean, labels, timesteps, noise)
                accelerator.backward(loss / accumulation)
            step_loss += loss.detach().item() / accumulation
        grad_norm = None
        if config.max_grad_norm is not None:
            grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        # 2. Update, unless the loss or the gradients are not finite (every process takes the same decision).
        if _step_is_finite(accelerator, step_loss, grad_norm, config.mixed_precision):
            optimizer.step()
            lr_scheduler.step()  # the schedule counts applied updates: a skipped step does not advance it
            if ema is not None:  # 3. EMA of the updated weights
                ema.step(bare_model.parameters())
        else:
            nonfinite_steps += 1
            if nonfinite_steps > config.max_nonfinite_steps:
                raise NonFiniteLossError(
                    f"training diverged: the loss is {step_loss} at step {global_step + 1} (non-finite steps: "
                    f"{nonfinite_steps}, allowed: {config.max_nonfinite_steps}); nothing was saved from this step "
                    "on. Lower --learning_rate, keep --max_grad_norm on, or raise --adam_epsilon."
                )
        optimizer.zero_grad(set_to_none=True)
        global_step += 1
        losses.append(step_loss)
        train_seconds += time.perf_counter() - step_start

        # 4. Log, checkpoint, validate.
        logs = {"loss": step_loss, "lr": lr_scheduler.get_last_lr()[0], "step": global_step}
        if ema is not None:
            logs["ema_decay"] = ema.cur_decay_value
        progress.update(1)
        progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{logs['lr']:.2e}")
        if global_step % config.logging_steps == 0 or global_step == config.max_train_steps:
            accelerator.log(logs, step=global_step)

        # Validation comes before the checkpoint of the same step, so the checkpoint holds its early-stopping state.
        if validation_fn is not None and config.validation_steps and (
                global_step % config.validation_steps == 0 or global_step == config.max_train_steps):
            metrics = None
            if accelerator.is_main_process:
                metrics = _validate(bare_model, ema, validation_fn, global_step)
                if metrics:
                    accelerator.log(metrics, step=global_step)
                    progress.write(f"step {global_step}: " + ", ".join(
                        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()))
            if early_stopping is not None:
                ratio = _shared_memorization_ratio(accelerator, metrics)
                if early_stopping.observe(global_step, ratio, metrics or {}, _sampling_state(bare_model, ema)):
                    progress.write(f"step {global_step}: memorization ratio {ratio:.4g} > stop_at_memorization "
                                   f"{early_stopping.threshold:g}; stopping, keeping the weights of step "
                                   f"{early_stopping.kept_step}.")
            model.train()
        if config.checkpointing_steps and global_step % config.checkpointing_steps == 0:
            save_checkpoint(accelerator, output_dir, global_step, ema, config, run_config)
    progress.close()
    accelerator.wait_for_everyone()

    bare_model.eval()
    ema_model = None
    if ema is not None:
        ema_model = copy.deepcopy(bare_model)
        ema.copy_to(ema_model.parameters())
        ema_model.eval()
    kept_model = early_stopping.kept_model(bare_model) if early_stopping is not None else None
    images = len(losses) * config.train_batch_size * accumulation * accelerator.num_processes
    return TrainResult(model=bare_model, ema_model=ema_model, losses=losses, steps=global_step,
                       train_seconds=train_seconds, images_per_second=images / train_seconds if train_seconds else 0.0,
                       early_stopping=early_stopping, kept_model=kept_model)


class NonFiniteLossError(ValueError):
    """Training produced a NaN/Inf loss (or gradient) more often than ``TrainingConfig.max_nonfinite_steps``."""


def _step_is_finite(accelerator, step_loss: float, grad_norm, mixed_precision: str) -> bool:
    """Whether every process saw a finite loss (and, outside fp16, a finite gradient norm) in this step.

    Under fp16 the gradient scaler itself skips steps whose scaled gradients overflow, so an infinite norm there is
    the scaler's business, not divergence. The decision is all-reduced so that no process steps alone.
    """
    finite = math.isfinite(step_loss)
    if grad_norm is not None and mixed_precision != "fp16":
        finite = finite and math.isfinite(float(grad_norm))
    if accelerator.num_processes > 1:
        flag = torch.tensor([0.0 if finite else 1.0], device=accelerator.device)
        finite = float(accelerator.reduce(flag, reduction="sum")) == 0.0
    return finite


def check_model_and_data(model, data: TrainingData | StreamingTrainingData) -> None:
    """Raise ValueError (naming the fix) when ``model`` cannot be trained on ``data``."""
    if not isinstance(data, (TrainingData, StreamingTrainingData)):
        raise TypeError(f"data must be a TrainingData (load_training_data), got {type(data).__name__}.")
    config = model_config(model)
    if len(data) == 0:
        raise ValueError("the training set is empty.")
    channels, height, width = data.num_channels, data.resolution, data.resolution
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
    """Deterministic batches: micro-step ``m`` is a pure function of ``(seed, m)``, split across processes.

    The data are read as an endless stream of permutations (epoch ``e`` is permutation ``e`` drawn from
    ``(seed, e)``); micro-step ``m`` takes the next ``batch x processes`` positions (the global batch), and the noise,
    timesteps and flips of that whole global batch come from a generator seeded by ``(seed, m)``; process ``r``
    keeps slice ``r``. So N processes of batch B train on exactly the images and noise of one process of batch N*B
    (tested), every image is seen once per epoch, and a resumed run continues exactly where the uninterrupted run
    would be. Images come from ``data.load``: a tensor lookup in memory, or for :class:`StreamingTrainingData` a
    ``DataLoader`` whose workers decode the same positions ahead of the loop (same order, so the same batches).
    """

    def __init__(self, data, config: TrainingConfig, device, rank: int, world: int, first_micro_step: int = 0):
        self.data = data
        self.labels = data.labels.to(device) if data.labels is not None else None
        self.n = len(data)
        self.batch, self.seed, self.flip = config.train_batch_size, int(config.seed), config.random_flip
        self.rank, self.world, self.device = rank, world, device
        self._perms: dict[int, torch.Tensor] = {}
        if isinstance(data, TrainingData):
            self.images = data.images.to(device)
            self._loaded = None
        else:  # streaming: workers decode this process's positions from the resume point on, in order
            self.images = None
            self._next = first_micro_step
            self._loaded = iter(torch.utils.data.DataLoader(
                _Positions(data), sampler=_PositionBatches(self, first_micro_step), batch_size=None,
                num_workers=config.dataloader_num_workers, pin_memory=str(device).startswith("cuda")))

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.pop(min(self._perms))
            rng = np.random.default_rng([self.seed, epoch])
            self._perms[epoch] = torch.from_numpy(rng.permutation(self.n))
        return self._perms[epoch]

    def positions(self, micro_step: int) -> torch.Tensor:
        """Rows of the training set that this process trains on at ``micro_step``."""
        start = (micro_step * self.world + self.rank) * self.batch  # this process's slice of the global batch
        first, last = start // self.n, (start + self.batch - 1) // self.n
        if first == last:
            offset = start - first * self.n
            return self._perm(first)[offset: offset + self.batch]
        return torch.stack([self._perm(p // self.n)[p % self.n] for p in range(start, start + self.batch)])

    def get(self, micro_step: int, num_train_timesteps: int):
        index = self.positions(micro_step)
        if self._loaded is None:
            clean = self.images[index.to(self.device)]
        else:
            if micro_step != self._next:
                raise RuntimeError(f"streaming batches are read in order; expected micro-step {self._next}, "
                                   f"got {micro_step}.")
            self._next += 1
            clean = next(self._loaded).to(self.device, non_blocking=True)
        labels = self.labels[index.to(self.device)] if self.labels is not None else None
        global_batch = self.batch * self.world
        seed = int(np.random.SeedSequence([self.seed, micro_step]).generate_state(1)[0])
        generator = torch.Generator(device=self.device).manual_seed(seed)
        mine = slice(self.rank * self.batch, (self.rank + 1) * self.batch)
        timesteps = torch.randint(0, num_train_timesteps, (global_batch,), generator=generator, device=self.device)
        noise = torch.randn((global_batch, *clean.shape[1:]), generator=generator, device=self.device,
                            dtype=clean.dtype)
        timesteps, noise = timesteps[mine], noise[mine]
        if self.flip:
            flip = (torch.rand(global_batch, generator=generator, device=self.device) < 0.5)[mine]
            clean = torch.where(flip[:, None, None, None], clean.flip(-1), clean)
        return clean, labels, timesteps, noise


@contextmanager
def _label_dropout_rng(seed: int, micro_step: int, accelerator):
    """DiT's label dropout (``LabelEmbedding.token_drop``) draws from the GLOBAL torch RNG; inside this context that
    RNG is seeded by ``(seed, micro-step, process)`` and restored afterwards, so which labels are dropped is a pure
    function of the step (two runs with one seed fine-tune identically, whatever ran before them in the process) and
    the caller's RNG stream is left untouched."""
    device = accelerator.device
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(int(np.random.SeedSequence([int(seed), micro_step, accelerator.process_index, 1])
                              .generate_state(1)[0]))
        yield


class _Positions(torch.utils.data.Dataset):
    """``dataset[positions]`` -> the decoded batch (a DataLoader with ``batch_size=None`` passes whole batches)."""

    def __init__(self, data):
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, positions: torch.Tensor) -> torch.Tensor:
        return self.data.load(positions)


class _PositionBatches(torch.utils.data.Sampler):
    """The endless, deterministic sequence of this process's batch positions from ``first_micro_step`` on."""

    def __init__(self, stream: _BatchStream, first_micro_step: int):
        self.stream, self.first = stream, first_micro_step

    def __iter__(self):
        micro_step = self.first
        while True:
            yield self.stream.positions(micro_step)
            micro_step += 1


@contextmanager
def _sampling_weights(bare_model, ema):
    """Inside: ``bare_model`` in eval mode with the weights that get sampled (the EMA's when on); restored after."""
    was_training = bare_model.training
    bare_model.eval()
    if ema is not None:  # sample with the EMA weights, then put the training weights back
        ema.store(bare_model.parameters())
        ema.copy_to(bare_model.parameters())
    try:
        with torch.no_grad():
            yield bare_model
    finally:
        if ema is not None:
            ema.restore(bare_model.parameters())
        bare_model.train(was_training)


def _validate(bare_model, ema, validation_fn: ValidationFn, step: int):
    with _sampling_weights(bare_model, ema) as model:
        return validation_fn(model, step)


def _sampling_state(bare_model, ema) -> dict[str, torch.Tensor]:
    """A CPU copy of the weights that get sampled (what early stopping keeps)."""
    with _sampling_weights(bare_model, ema) as model:
        return {name: value.detach().to("cpu", copy=True) for name, value in model.state_dict().items()}


#: Broadcast in place of a ratio when the validation function returned none (every process then raises).
_MISSING_RATIO = -1.0


def _shared_memorization_ratio(accelerator, metrics: dict | None) -> float:
    """The main process's validation ratio, on every process (validation runs on the main process only)."""
    value = _MISSING_RATIO
    if metrics is not None:
        value = float(metrics.get("memorization_ratio", _MISSING_RATIO))
    shared = torch.tensor([value], dtype=torch.float64, device=accelerator.device)
    if accelerator.num_processes > 1:
        shared = broadcast(shared, from_process=0)
    value = float(shared[0])
    if value == _MISSING_RATIO:
        raise ValueError("stop_at_memorization needs a validation_fn whose dict holds 'memorization_ratio'; the "
                         "validation returned none (memsep train's validation needs at least 2 training images).")
    return value

