"""The trainer, split by job as NVlabs/edm splits its ``training/`` package.

- :mod:`.loss`: the denoising score-matching loss of the paper, line by line (:func:`dsm_loss`);
- :mod:`.config`: :class:`TrainingConfig`, every setting of the run with its meaning, and the settings around it
  (:class:`OutputConfig`, :class:`ValidationConfig`, :class:`HubConfig`);
- :mod:`.loop`: THE training loop, :func:`train_dit` (Accelerate, EMA, deterministic batches, divergence check);
- :mod:`.checkpoints`: atomic ``checkpoint-<step>/`` folders, resume checks;
- :mod:`.early_stopping`: :class:`EarlyStopping`, stop at the first validation above a memorization ratio;
- :mod:`.output`: from a run to a ``MemSepPipeline`` folder, validation, model card and Hub (:func:`train_pipeline`);
- :mod:`.factories`: :func:`make_dit`, :func:`make_noise_scheduler`, :func:`load_dit_config`.

One loop serves ``memsep train`` and the fine-tuning after head pruning (Ye et al. 2025, Section 6, Algorithm 1).
"""

from .checkpoints import CHECKPOINT_PREFIX, list_checkpoints, resolve_checkpoint, save_checkpoint
from .config import LR_SCHEDULES, REPORT_TO, HubConfig, OutputConfig, TrainingConfig, ValidationConfig
from .early_stopping import EarlyStopping
from .factories import BETA_SCHEDULES, load_dit_config, make_dit, make_noise_scheduler
from .loop import NonFiniteLossError, TrainResult, check_model_and_data, train_dit
from .loss import dsm_loss, null_class_labels
from .output import (
    DIT_LABEL_DROPOUT,
    TrainedPipeline,
    base_model_card_fields,
    build_pipeline,
    check_output_dir,
    check_process_setup,
    make_validation_fn,
    sample_and_measure,
    save_pipeline_folder,
    train_pipeline,
)

__all__ = ["BETA_SCHEDULES", "CHECKPOINT_PREFIX", "DIT_LABEL_DROPOUT", "EarlyStopping", "HubConfig", "LR_SCHEDULES",
           "NonFiniteLossError", "OutputConfig", "REPORT_TO", "TrainResult", "TrainedPipeline", "TrainingConfig",
           "ValidationConfig", "base_model_card_fields",
           "build_pipeline", "check_model_and_data", "check_output_dir", "check_process_setup", "dsm_loss",
           "list_checkpoints", "load_dit_config", "make_dit", "make_noise_scheduler", "make_validation_fn",
           "null_class_labels", "resolve_checkpoint", "sample_and_measure", "save_checkpoint", "save_pipeline_folder",
           "train_dit", "train_pipeline"]
