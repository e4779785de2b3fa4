"""Groups of command-line flags defined once, each turned into the library's dataclass: the data flags
(:class:`~diffusers_memsep.sources.DataSource`), the quality flags, the pruning-study flags
(:class:`~diffusers_memsep.study.PruningStudyConfig`), and the trainer's output, validation and Hub flags
(:class:`~diffusers_memsep.trainer.OutputConfig`, :class:`~diffusers_memsep.trainer.ValidationConfig`,
:class:`~diffusers_memsep.trainer.HubConfig`)."""

from __future__ import annotations

import argparse
from dataclasses import fields, replace

from diffusers_memsep.memorization import FEATURE_SPACES
from diffusers_memsep.pruning import METHODS
from diffusers_memsep.sources import DataSource
from diffusers_memsep.study import SAMPLERS, PruningStudyConfig
from diffusers_memsep.trainer import REPORT_TO, HubConfig, OutputConfig, ValidationConfig
from diffusers_memsep.trainer.config import VALIDATION_SAMPLERS


def add_data_arguments(group, resolution_help: str = "Default: the pipeline's output resolution.") -> None:
    """The data flags every command shares (``memsep train``, ``prune``, ``reference``, ``study``)."""
    group.add_argument("--dataset_name", default=None,
                       help="Hub dataset name (datasets.load_dataset). Default: the embedded digits (offline).")
    group.add_argument("--dataset_config_name", default=None, help="Config of --dataset_name.")
    group.add_argument("--dataset_revision", default=None,
                       help="Revision of --dataset_name (branch, tag or commit), recorded on the model card.")
    group.add_argument("--train_data_dir", default=None,
                       help="Local folder of images (imagefolder; sub-folders are classes, column 'label').")
    group.add_argument("--image_column", default="image", help="Column holding the images.")
    group.add_argument("--label_column", default=None,
                       help="Column holding class labels (class-conditional model); unset: unconditional.")
    group.add_argument("--resolution", type=int, default=None, help=resolution_help)


def add_saved_model_data_arguments(group) -> None:
    """The data flags of a saved model's training images (``memsep prune``, ``memsep reference``)."""
    add_data_arguments(group)
    group.add_argument("--center_crop", action="store_true")
    group.add_argument("--max_train_samples", type=int, default=None)
    group.add_argument("--data_seed", type=int, default=0, help="The --seed the model was trained with.")
    group.add_argument("--embedded_digits", action="store_true",
                       help="Reload the embedded digits subset (with --max_train_samples/--data_seed).")


def data_source(args: argparse.Namespace) -> DataSource:
    """The data flags present in ``args`` as a :class:`DataSource`."""
    return DataSource(**{f.name: getattr(args, f.name) for f in fields(DataSource) if hasattr(args, f.name)})


def add_hub_arguments(group, push_help: str | None = None, model_id_help: str | None = None) -> None:
    """The Hub flags (``memsep push``; with ``push_help`` also ``--push_to_hub``, for ``memsep prune`` and ``memsep
    train``; with ``model_id_help`` also ``--hub_model_id``, for ``memsep train``, whose flags
    :func:`hub_config` turns into a :class:`~diffusers_memsep.trainer.HubConfig`): every push goes through
    :func:`~diffusers_memsep.hub.push_folder_to_hub`, which leaves ``reference/`` out unless ``--push_reference``."""
    if push_help is not None:
        group.add_argument("--push_to_hub", action="store_true", help=push_help)
    if model_id_help is not None:
        group.add_argument("--hub_model_id", default=None, help=model_id_help)
    group.add_argument("--hub_private_repo", action="store_true", help="Create the Hub repo(s) as private.")
    group.add_argument("--hub_token", default=None, help="Hub token (default: the logged-in one / HF_TOKEN).")
    group.add_argument("--push_reference", action="store_true",
                       help="Also publish reference/ (the EXACT TRAINING IMAGES; left out of every push by default). "
                            "Without it, users rebuild the reference locally with memsep reference (see the card).")


def add_quality_arguments(parser: argparse.ArgumentParser) -> None:
    """The quality flags (``memsep prune``, ``memsep demo``)."""
    group = parser.add_argument_group("quality metrics")
    group.add_argument("--feature_space", default="auto", choices=FEATURE_SPACES,
                       help="Space of precision/recall, Frechet distance and KID: auto (digits classifier for the "
                            "embedded digits, else 'trained'), digits, trained (small CNN trained on the population, "
                            "cached in <output_dir>/feature_network), inception (FID), pixels.")
    group.add_argument("--inception_weights", default=None,
                       help="FID weights file (weights-inception-2015-12-05-6726825d.pth) for --feature_space "
                            "inception; default: torch's hub cache.")
    group.add_argument("--num_quality_samples", type=int, default=None,
                       help="Samples per row and seed for the quality metrics (default: --num_samples).")


def check_quality_arguments(args: argparse.Namespace) -> None:
    if args.inception_weights is not None and args.feature_space != "inception":
        raise ValueError("--inception_weights is only read with --feature_space inception; add it or drop the path.")


def add_pruning_arguments(parser: argparse.ArgumentParser, default: PruningStudyConfig) -> None:
    """The flags of :class:`PruningStudyConfig` (``memsep prune``, ``memsep demo``), with ``default``'s values."""
    finetune = default.finetune
    parser.add_argument("--methods", nargs="+", default=list(default.methods), choices=METHODS,
                        help="Head scores: small_t (Algorithm 2), uniform_t, ablation, random (baseline), "
                             "small_t_top, memorization_gap (needs held-out images).")
    parser.add_argument("--etas", nargs="+", type=float, default=list(default.etas),
                        help="Fractions of heads to prune.")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(default.seeds), help="Repetitions.")
    parser.add_argument("--finetune_steps", type=int, default=finetune.max_train_steps, help="M of Algorithm 1.")
    parser.add_argument("--finetune_lr", type=float, default=finetune.learning_rate)
    parser.add_argument("--finetune_batch_size", type=int, default=finetune.train_batch_size)
    parser.add_argument("--weight_decay", type=float, default=finetune.adam_weight_decay,
                        help="AdamW weight decay while fine-tuning (a remedy of Section 5).")
    parser.add_argument("--finetune_ema", action=argparse.BooleanOptionalAction, default=finetune.use_ema)
    parser.add_argument("--importance_batches", type=int, default=default.importance_batches)
    parser.add_argument("--importance_batch_size", type=int, default=default.importance_batch_size)
    parser.add_argument("--num_samples", type=int, default=default.num_samples, help="Samples per row and seed.")
    parser.add_argument("--num_inference_steps", type=int, default=default.num_inference_steps)
    parser.add_argument("--sampler", default=default.sampler, choices=SAMPLERS)
    parser.add_argument("--small_t_switch", type=int, default=default.small_t_switch,
                        help="Also evaluate time-routed sampling: the pruned model only for timesteps < this.")


def pruning_config(args: argparse.Namespace, default: PruningStudyConfig) -> PruningStudyConfig:
    """The flags of :func:`add_pruning_arguments` (and ``--num_quality_samples``) over ``default``."""
    finetune = replace(default.finetune, max_train_steps=args.finetune_steps, learning_rate=args.finetune_lr,
                       train_batch_size=args.finetune_batch_size, adam_weight_decay=args.weight_decay,
                       use_ema=args.finetune_ema)
    return replace(default, methods=tuple(args.methods), etas=tuple(args.etas), seeds=tuple(args.seeds),
                   finetune=finetune, importance_batches=args.importance_batches,
                   importance_batch_size=args.importance_batch_size, num_samples=args.num_samples,
                   num_inference_steps=args.num_inference_steps, sampler=args.sampler,
                   small_t_switch=args.small_t_switch, num_quality_samples=args.num_quality_samples)


def add_output_arguments(group) -> None:
    """The flags of :class:`~diffusers_memsep.trainer.OutputConfig` (``memsep train``), with its defaults."""
    d = OutputConfig()
    group.add_argument("--overwrite_output_dir", action="store_true",
                       help="Replace a previous run in --output_dir (refused otherwise).")
    group.add_argument("--resume_from_checkpoint", default=d.resume_from_checkpoint,
                       help="A checkpoint-<step> folder or 'latest'.")
    group.add_argument("--logging_dir", default=d.logging_dir, help="TensorBoard folder, inside --output_dir.")
    group.add_argument("--report_to", default=d.report_to, choices=list(REPORT_TO))


def output_config(args: argparse.Namespace) -> OutputConfig:
    """The flags of :func:`add_output_arguments` as an :class:`~diffusers_memsep.trainer.OutputConfig`."""
    return OutputConfig(overwrite_output_dir=args.overwrite_output_dir,
                        resume_from_checkpoint=args.resume_from_checkpoint, report_to=args.report_to,
                        logging_dir=args.logging_dir)


def add_validation_arguments(group) -> None:
    """The flags of :class:`~diffusers_memsep.trainer.ValidationConfig` (``memsep train``), with its defaults."""
    d = ValidationConfig()
    group.add_argument("--validation_num_samples", type=int, default=d.num_samples,
                       help="Samples per validation (0: no validation, no ratio in the card).")
    group.add_argument("--validation_inference_steps", type=int, default=d.inference_steps,
                       help="Sampler steps per validation (default: --ddpm_num_steps).")
    group.add_argument("--validation_sampler", choices=VALIDATION_SAMPLERS, default=d.sampler,
                       help="The validation's sampler: ddpm (default) or ddim (fewer steps).")


def validation_config(args: argparse.Namespace) -> ValidationConfig:
    """The flags of :func:`add_validation_arguments` as a :class:`~diffusers_memsep.trainer.ValidationConfig`."""
    return ValidationConfig(num_samples=args.validation_num_samples, inference_steps=args.validation_inference_steps,
                            sampler=args.validation_sampler)


def hub_config(args: argparse.Namespace) -> HubConfig:
    """The flags of :func:`add_hub_arguments` as a :class:`~diffusers_memsep.trainer.HubConfig`."""
    return HubConfig(push_to_hub=args.push_to_hub, model_id=args.hub_model_id, private=args.hub_private_repo,
                     token=args.hub_token, push_reference=args.push_reference)
