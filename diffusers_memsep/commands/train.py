"""``memsep train`` = ``accelerate launch training/train_dit.py``: train a DiT, leave a ``MemSepPipeline`` folder.

The flags follow diffusers' ``examples/unconditional_image_generation/train_unconditional.py``. With no data flag
the embedded digits are used (offline); the defaults are the documented memorizing setting (``docs/results.md``,
"How fast the DiT memorizes the digits"): 64 digits, a 4-layer DiT with 4 heads of 32, AdamW 5e-4, 6,000 steps,
after which most DDPM-1000 samples copy a training image.
"""

from __future__ import annotations

import argparse
import os
import shlex
from dataclasses import replace
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDPMScheduler

from diffusers_memsep.commands.arguments import (
    add_data_arguments,
    add_hub_arguments,
    add_output_arguments,
    add_validation_arguments,
    hub_config,
    output_config,
    validation_config,
)
from diffusers_memsep.data import TrainingData, all_images, load_population, load_training_data
from diffusers_memsep.evaluate import QualityReference
from diffusers_memsep.hub import require_templates
from diffusers_memsep.memorization import resolve_feature_space
from diffusers_memsep.models import PrunableDiTTransformer2DModel
from diffusers_memsep.pipelines import MemSepPipeline
from diffusers_memsep.trainer import (
    TrainingConfig,
    check_output_dir,
    load_dit_config,
    make_dit,
    make_noise_scheduler,
    resolve_checkpoint,
    train_pipeline,
)

#: n of the documented default run on the embedded digits
#: (``docs/results.md``, "How fast the DiT memorizes the digits").
EMBEDDED_DEFAULT_N = 64


#: A pipeline checks its samples against its training images with the 1/3 rule (nearest vs second-nearest), which
#: needs 2 images; a 1-image run would save a pipeline without a reference while its card promises the check.
ONE_IMAGE = ("{what}: the pipeline checks every sample against its training images (nearest vs second-nearest), "
             "which needs at least 2; train on 2 or more images.")


def _num_train_images(args) -> int | None:
    if args.max_train_samples is None:
        return None if (args.dataset_name or args.train_data_dir) else EMBEDDED_DEFAULT_N
    return args.max_train_samples or None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = TrainingConfig()
    data = parser.add_argument_group("data")
    add_data_arguments(data, resolution_help="Side of the square training images (default: the data's own size, 8 "
                                             "for digits).")
    data.add_argument("--cache_dir", default=None, help="Where datasets are cached.")
    data.add_argument("--center_crop", action="store_true",
                      help="Resize the shorter side and crop the centre (default: resize to a square).")
    data.add_argument("--random_flip", action="store_true", help="Random horizontal flips while training.")
    data.add_argument("--streaming", action="store_true",
                      help="Decode images on the fly in DataLoader workers instead of holding the training set in "
                           "memory (image folders and Hub datasets).")
    data.add_argument("--dataloader_num_workers", type=int, default=d.dataloader_num_workers,
                      help="Worker processes decoding streamed images (with --streaming).")
    data.add_argument("--max_train_samples", type=int, default=None,
                      help="Train on this many images, chosen by --seed (n, the variable of memorization). "
                           f"Default: {EMBEDDED_DEFAULT_N} for the embedded digits, all images otherwise; 0 = all.")

    model = parser.add_argument_group("model")
    model.add_argument("--pretrained_model_name_or_path", default=None,
                       help="Start from this pipeline folder or Hub id (a MemSepPipeline, or a stock DiTPipeline such "
                            "as facebook/DiT-XL-2-256): its transformer weights, its VAE (latent training) and its "
                            "noise schedule; the size and diffusion flags are then ignored.")
    model.add_argument("--revision", default=None, help="Revision of --pretrained_model_name_or_path on the Hub.")
    model.add_argument("--variant", default=None, help="Weights variant to load, e.g. fp16.")
    model.add_argument("--pretrained_vae_model_name_or_path", default=None,
                       help="A VAE (folder, its pipeline folder, or Hub id) to train in its latent space instead of "
                            "the pretrained pipeline's own VAE.")
    model.add_argument("--model_config_name_or_path", default=None,
                       help="A DiT config (config.json, its folder, or a pipeline folder); overrides the size flags.")
    model.add_argument("--num_layers", type=int, default=4, help="Transformer blocks.")
    model.add_argument("--num_attention_heads", type=int, default=4, help="Heads per block.")
    model.add_argument("--attention_head_dim", type=int, default=32, help="Width of each head.")
    model.add_argument("--patch_size", type=int, default=2, help="Patch side (must divide the resolution).")

    diffusion = parser.add_argument_group("diffusion")
    diffusion.add_argument("--ddpm_num_steps", type=int, default=1000, help="DDPM training timesteps.")
    diffusion.add_argument("--ddpm_beta_schedule", default="linear", help="DDPM beta schedule.")
    diffusion.add_argument("--prediction_type", default="epsilon", choices=["epsilon", "v_prediction", "sample"])

    opt = parser.add_argument_group("optimisation")
    opt.add_argument("--max_train_steps", type=int, default=d.max_train_steps, help="Optimizer steps.")
    opt.add_argument("--train_batch_size", type=int, default=d.train_batch_size, help="Batch size per device.")
    opt.add_argument("--learning_rate", type=float, default=d.learning_rate, help="AdamW learning rate.")
    opt.add_argument("--lr_scheduler", default=d.lr_scheduler,
                     choices=["linear", "cosine", "cosine_with_restarts", "polynomial", "constant",
                              "constant_with_warmup"])
    opt.add_argument("--lr_warmup_steps", type=int, default=d.lr_warmup_steps, help="Warm-up steps.")
    opt.add_argument("--adam_beta1", type=float, default=d.adam_beta1)
    opt.add_argument("--adam_beta2", type=float, default=d.adam_beta2)
    opt.add_argument("--adam_weight_decay", "--weight_decay", dest="adam_weight_decay", type=float,
                     default=d.adam_weight_decay, help="AdamW weight decay (a remedy the paper studies).")
    opt.add_argument("--adam_epsilon", type=float, default=d.adam_epsilon)
    opt.add_argument("--gradient_accumulation_steps", type=int, default=d.gradient_accumulation_steps)
    opt.add_argument("--max_grad_norm", type=float, default=d.max_grad_norm, help="Gradient clipping (0: off).")
    opt.add_argument("--mixed_precision", default=d.mixed_precision, choices=["no", "fp16", "bf16"])
    opt.add_argument("--use_ema", action=argparse.BooleanOptionalAction, default=d.use_ema,
                     help="Keep an EMA of the weights and save/sample it (default on).")
    opt.add_argument("--ema_max_decay", type=float, default=d.ema_max_decay)
    opt.add_argument("--ema_min_decay", type=float, default=d.ema_min_decay)
    opt.add_argument("--ema_inv_gamma", type=float, default=d.ema_inv_gamma)
    opt.add_argument("--ema_power", type=float, default=d.ema_power)
    opt.add_argument("--max_nonfinite_steps", type=int, default=d.max_nonfinite_steps,
                     help="Steps with a NaN/Inf loss skipped before training stops with an error (default 0).")
    opt.add_argument("--seed", type=int, default=d.seed, help="Seed of the subset, the weights and the noise.")

    run = parser.add_argument_group("checkpoints, logging, output")
    run.add_argument("--output_dir", default="outputs/dit-digits", help="Where the pipeline folder is written.")
    add_output_arguments(run)
    run.add_argument("--checkpointing_steps", type=int, default=500, help="Save a checkpoint every N steps (0: off).")
    run.add_argument("--checkpoints_total_limit", type=int, default=2, help="Keep at most N checkpoints.")
    run.add_argument("--validation_steps", type=int, default=2000,
                     help="Sample a grid and measure the memorization ratio every N steps (always at the end).")
    run.add_argument("--stop_at_memorization", type=float, default=None, metavar="R",
                     help="Stop at the first validation whose memorization ratio exceeds R (0 <= R < 1) and save the "
                          "weights of the last validation at or below R; writes memorization_curve.json/.png "
                          "(default: off).")
    add_validation_arguments(run)
    run.add_argument("--feature_space", default="none", choices=["none", "auto", "digits", "trained", "pixels",
                                                                    "inception"],
                     help="Also measure precision/recall, Frechet distance and KID at every validation, against ALL "
                          "images of the data source, in this space (as memsep prune does; default: none).")
    run.add_argument("--inception_weights", default=None, help="FID weights file for --feature_space inception.")
    add_hub_arguments(run, "Upload the output folder to the Hub at the end (the repo is created before training).",
                      "Repo id (default: the output folder's name).")
    run.add_argument("--no_progress", action="store_true", help="Hide the progress bar.")


def reference_card_fields(args: argparse.Namespace, data) -> dict:
    """Card fields that let anyone rebuild ``reference/`` (left out of Hub pushes by default) exactly: the
    ``memsep reference`` command with this run's data flags, the Hub data set's id and revision, the subset's
    positions."""

    where = args.hub_model_id or args.output_dir
    flags = ["memsep", "reference", "--pipeline", str(where),
             "--output_dir", f"{Path(args.output_dir).name}-with-reference"]
    if args.dataset_name:
        flags += ["--dataset_name", args.dataset_name]
        if args.dataset_config_name:
            flags += ["--dataset_config_name", args.dataset_config_name]
        if args.dataset_revision:
            flags += ["--dataset_revision", args.dataset_revision]
    elif args.train_data_dir:  # the folder's name only: a pushed card never carries a local path
        flags += ["--train_data_dir", Path(args.train_data_dir).name]
    else:
        flags += ["--embedded_digits"]
    if args.image_column != "image":
        flags += ["--image_column", args.image_column]
    if args.label_column:
        flags += ["--label_column", args.label_column]
    if args.resolution:
        flags += ["--resolution", str(args.resolution)]
    if args.center_crop:
        flags += ["--center_crop"]
    count = _num_train_images(args)
    if count:
        flags += ["--max_train_samples", str(count)]
    flags += ["--data_seed", str(args.seed)]
    indices = getattr(data, "indices", None)
    return {"reference_rebuild": " ".join(shlex.quote(flag) for flag in flags), "dataset_id": args.dataset_name,
            "dataset_revision": args.dataset_revision,
            "dataset_indices": list(indices) if indices is not None and len(indices) <= 10000 else None}


def load_pretrained(args: argparse.Namespace):
    """The pipeline of ``--pretrained_model_name_or_path`` (safetensors only) and the VAE to train with, if any."""
    name = args.pretrained_model_name_or_path
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1
    if looks_local and not Path(name).expanduser().is_dir():
        raise ValueError(f"--pretrained_model_name_or_path {name!r} is not a folder; pass a pipeline folder (e.g. "
                         "one written by memsep train) or a Hub id such as facebook/DiT-XL-2-256.")
    pipe = MemSepPipeline.from_pretrained(os.path.expanduser(name), revision=args.revision, variant=args.variant)
    vae = pipe.vae
    if args.pretrained_vae_model_name_or_path:
        path = Path(args.pretrained_vae_model_name_or_path).expanduser()
        subfolder = "vae" if (path / "vae" / "config.json").is_file() else None
        try:
            vae = AutoencoderKL.from_pretrained(str(path) if path.exists() else args.pretrained_vae_model_name_or_path,
                                                subfolder=subfolder, use_safetensors=True)
        except OSError as error:
            raise ValueError(f"cannot load a VAE from {args.pretrained_vae_model_name_or_path!r} "
                             f"({str(error).splitlines()[0]}); pass an AutoencoderKL folder, a pipeline folder "
                             "with vae/, or a Hub id in the local cache.") from None
        pipe.register_modules(vae=vae)
    return pipe, vae


def validation_quality_reference(args: argparse.Namespace, data):
    """The population (every image of the data source, not the training subset) in ``--feature_space``."""
    population = load_population(args.dataset_name, args.dataset_config_name, args.train_data_dir, args.image_column,
                                 resolution=data.resolution, center_crop=args.center_crop, cache_dir=args.cache_dir,
                                 revision=args.dataset_revision)
    try:
        space = resolve_feature_space(args.feature_space, population, Path(args.output_dir) / "feature_network",
                                      args.inception_weights, progress=True)
    except ImportError as error:
        raise ValueError(str(error)) from error
    images = all_images(data)
    if population.images.shape[1:] != images.shape[1:]:
        raise ValueError(f"the population images are {tuple(population.images.shape[1:])} but the training images "
                         f"{tuple(images.shape[1:])}; pass --resolution.")
    return QualityReference.build(space, population.images, images, population.source)


def run(args: argparse.Namespace) -> int:
    # Cheap checks first, so bad input fails before data loading and long before any training step.
    require_templates("base_model")
    output, validation, hub = output_config(args), validation_config(args), hub_config(args)
    check_output_dir(args.output_dir, output.overwrite_output_dir, output.resume_from_checkpoint, output.logging_dir)
    resolve_checkpoint(output.resume_from_checkpoint, args.output_dir)
    if args.max_train_samples == 1:
        raise ValueError(ONE_IMAGE.format(what="--max_train_samples 1 trains on 1 image"))
    noise_scheduler = make_noise_scheduler(args.ddpm_num_steps, args.ddpm_beta_schedule, args.prediction_type)
    config = TrainingConfig(
        max_train_steps=args.max_train_steps, train_batch_size=args.train_batch_size,
        learning_rate=args.learning_rate, lr_scheduler=args.lr_scheduler, lr_warmup_steps=args.lr_warmup_steps,
        adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2, adam_weight_decay=args.adam_weight_decay,
        adam_epsilon=args.adam_epsilon, gradient_accumulation_steps=args.gradient_accumulation_steps,
        max_grad_norm=args.max_grad_norm or None, mixed_precision=args.mixed_precision,
        random_flip=args.random_flip, use_ema=args.use_ema, ema_max_decay=args.ema_max_decay,
        ema_min_decay=args.ema_min_decay, ema_inv_gamma=args.ema_inv_gamma, ema_power=args.ema_power,
        seed=args.seed, checkpointing_steps=args.checkpointing_steps or None,
        checkpoints_total_limit=args.checkpoints_total_limit or None,
        validation_steps=args.validation_steps or None, stop_at_memorization=args.stop_at_memorization,
        max_nonfinite_steps=args.max_nonfinite_steps,
        dataloader_num_workers=args.dataloader_num_workers,
        show_progress=not args.no_progress,
    )
    if args.pretrained_model_name_or_path and args.model_config_name_or_path:
        raise ValueError("pass either --pretrained_model_name_or_path (weights) or --model_config_name_or_path "
                         "(a fresh model of that shape), not both.")
    if args.pretrained_vae_model_name_or_path and not args.pretrained_model_name_or_path:
        raise ValueError("--pretrained_vae_model_name_or_path needs --pretrained_model_name_or_path (the latent "
                         "transformer to train).")
    pretrained = vae = None
    if args.pretrained_model_name_or_path:
        pretrained, vae = load_pretrained(args)
        noise_scheduler = DDPMScheduler.from_config(pretrained.scheduler.config)  # the schedule it was trained with
        if vae is not None and (args.streaming or args.random_flip):
            raise ValueError("latent training encodes every image once and cannot flip latents; drop --streaming "
                             "and --random_flip.")
    model_config = load_dit_config(args.model_config_name_or_path) if args.model_config_name_or_path else None
    if model_config is None and pretrained is None:  # fail on a bad patch size before loading any data
        resolution = args.resolution or (8 if not (args.dataset_name or args.train_data_dir) else None)
        if resolution and resolution % args.patch_size:
            make_dit(sample_size=resolution, patch_size=args.patch_size)  # raises the explanatory ValueError

    data = load_training_data(
        dataset_name=args.dataset_name, dataset_config_name=args.dataset_config_name,
        train_data_dir=args.train_data_dir, image_column=args.image_column, label_column=args.label_column,
        resolution=args.resolution or (pretrained.image_shape[-1] if pretrained is not None else None),
        center_crop=args.center_crop, max_train_samples=_num_train_images(args), seed=args.seed,
        cache_dir=args.cache_dir, streaming=args.streaming, revision=args.dataset_revision,
    )
    if len(data) < 2:
        raise ValueError(ONE_IMAGE.format(what=f"the training set {data.source} holds {len(data)} image"))
    torch.manual_seed(args.seed)  # the initial weights
    if pretrained is not None:
        model = pretrained.transformer
        if not isinstance(model, PrunableDiTTransformer2DModel):
            model = PrunableDiTTransformer2DModel.from_dit(model)
        if isinstance(data, TrainingData):  # grey images become RGB for an RGB model or VAE
            data = replace(data, images=pretrained.match_image_shape(data.images))
    elif model_config is not None:
        model = PrunableDiTTransformer2DModel.from_config(model_config)
    else:
        model = make_dit(sample_size=data.resolution, in_channels=data.num_channels, num_classes=data.num_classes,
                         num_layers=args.num_layers, num_attention_heads=args.num_attention_heads,
                         attention_head_dim=args.attention_head_dim, patch_size=args.patch_size)
    quality_reference = None
    if args.feature_space != "none":
        quality_reference = validation_quality_reference(args, data)
    trained = train_pipeline(
        args.output_dir, data, model, noise_scheduler, config, output=output, validation=validation, hub=hub,
        vae=vae, id2label=pretrained.config.get("id2label") if pretrained else None,
        quality_reference=quality_reference, base_model=args.pretrained_model_name_or_path,
        dataset_id=args.dataset_name, card_fields=reference_card_fields(args, data),
    )
    if not trained.is_main_process:
        return 0  # the main process reports for the whole data-parallel run
    ratio = trained.metrics.get("memorization_ratio")
    print(f"Saved a MemSepPipeline to {trained.output_dir} ({trained.result.steps} steps, "
          f"{trained.images_per_second:.0f} images/s"
          + (f", memorization ratio {100 * ratio:.1f}%" if ratio is not None else "") + ").")
    if trained.hub_url:
        print(f"Pushed to {trained.hub_url}")
    return 0
