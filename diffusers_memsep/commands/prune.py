"""``memsep prune`` / ``training/prune_dit.py``: Algorithm 1 on a saved pipeline, beside random pruning.

Loads a ``MemSepPipeline`` (local folder or Hub id), prunes its transformer by every ``--methods`` x ``--etas`` x
``--seeds``, fine-tunes, evaluates every variant and the original on the same seeds, and writes ``report.md``,
``runs.csv``, ``summary.csv``, figures and one pipeline folder (with model card) per method and eta.

Training data. The pipeline's ``reference`` holds exactly the training images, which is all an unconditional model
needs. A class-conditional model also needs the labels: pass the data flags of ``memsep train`` (the images they load
must equal the reference). A pipeline without a reference (e.g. a stock ``DiTPipeline`` checkpoint) gets one built
from the data flags, as ``memsep reference`` does: the images are loaded at the pipeline's output resolution (pixel
space, after the VAE decode).

Quality is measured against the POPULATION, never the training subset: every image of the data source the data
flags name (all of ``--train_data_dir``, all of ``--dataset_name``'s ``--population_split``; all 1,797 digits for the
embedded data), or ``--population_data_dir``. The feature space is ``--feature_space`` (``auto``: the shipped digits
classifier for the embedded digits, else a small CNN trained on the population and cached in
``<output_dir>/feature_network``; ``inception``: FID, needs ``pip install diffusers-memsep[fid]`` and the weights).
"""

from __future__ import annotations

import argparse
import os


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from diffusers_memsep.mitigation import SAMPLERS, PruningStudyConfig
    from diffusers_memsep.pruning import METHODS
    from diffusers_memsep.trainer import TrainingConfig

    study, finetune = PruningStudyConfig(), TrainingConfig()
    parser.add_argument("--pipeline", required=True, help="A MemSepPipeline folder or Hub repo id.")
    parser.add_argument("--output_dir", required=True, help="Where the report, CSVs, figures and variants go.")
    parser.add_argument("--overwrite_output_dir", action="store_true",
                        help="Replace an earlier study in --output_dir (its report, CSVs, figures, variants/ only).")
    parser.add_argument("--methods", nargs="+", default=list(study.methods), choices=METHODS,
                        help="Head scores: small_t (Algorithm 2), uniform_t, ablation, random (baseline), "
                             "small_t_top, memorization_gap (needs held-out images: --validation_data_dir).")
    parser.add_argument("--etas", nargs="+", type=float, default=list(study.etas), help="Fractions of heads to prune.")
    parser.add_argument("--seeds", nargs="+", type=int, default=list(study.seeds), help="Repetitions (mean +- std).")
    parser.add_argument("--finetune_steps", type=int, default=study.finetune.max_train_steps, help="M of Algorithm 1.")
    parser.add_argument("--finetune_lr", type=float, default=finetune.learning_rate)
    parser.add_argument("--finetune_batch_size", type=int, default=finetune.train_batch_size)
    parser.add_argument("--weight_decay", type=float, default=0.0, help="AdamW weight decay while fine-tuning.")
    parser.add_argument("--finetune_ema", action=argparse.BooleanOptionalAction, default=study.finetune.use_ema)
    parser.add_argument("--importance_batches", type=int, default=study.importance_batches)
    parser.add_argument("--importance_batch_size", type=int, default=study.importance_batch_size)
    parser.add_argument("--num_samples", type=int, default=study.num_samples, help="Samples per row and seed.")
    parser.add_argument("--num_inference_steps", type=int, default=study.num_inference_steps)
    parser.add_argument("--sampler", default=study.sampler, choices=SAMPLERS)
    parser.add_argument("--small_t_switch", type=int, default=None,
                        help="Also evaluate time-routed sampling: the pruned model only for timesteps < this.")
    add_quality_arguments(parser)
    data = parser.add_argument_group(
        "training data (needed for class-conditional models, and for a pipeline without a reference)")
    add_data_arguments(data)
    data.add_argument("--population_data_dir", default=None,
                      help="Folder of the population images quality is measured against (default: every image of "
                           "the data source above, all 1,797 digits for the embedded data).")
    data.add_argument("--population_split", default="train",
                      help="Split of --dataset_name used as the population (all of its images).")
    data.add_argument("--validation_data_dir", default=None,
                      help="Held-out images of the training distribution for --methods memorization_gap (default: "
                           "the population minus the training subset, when the data flags load that subset).")
    hub = parser.add_argument_group("hub")
    hub.add_argument("--push_to_hub", action="store_true", help="Upload every variant folder after saving it.")
    hub.add_argument("--hub_model_id_prefix", default=None, help="Variants go to <prefix>-<method>-eta<eta>.")
    hub.add_argument("--hub_private_repo", action="store_true")
    hub.add_argument("--hub_token", default=None)


def add_data_arguments(group) -> None:
    """The data flags of ``memsep train``, shared by ``memsep prune`` and ``memsep reference``."""
    group.add_argument("--dataset_name", default=None)
    group.add_argument("--dataset_config_name", default=None)
    group.add_argument("--train_data_dir", default=None)
    group.add_argument("--image_column", default="image")
    group.add_argument("--label_column", default=None)
    group.add_argument("--resolution", type=int, default=None,
                       help="Default: the pipeline's output resolution (images are resized to it).")
    group.add_argument("--center_crop", action="store_true")
    group.add_argument("--max_train_samples", type=int, default=None)
    group.add_argument("--data_seed", type=int, default=0, help="The --seed the model was trained with.")
    group.add_argument("--embedded_digits", action="store_true",
                       help="Reload the embedded digits subset (with --max_train_samples/--data_seed).")


def has_data_flags(args: argparse.Namespace) -> bool:
    return bool(args.dataset_name or args.train_data_dir or args.embedded_digits)


def load_pipeline_data(pipe, args: argparse.Namespace):
    """The training data of the data flags, as the pipeline sees images: at its output resolution and channels."""
    from dataclasses import replace

    from diffusers_memsep.data import load_training_data

    data = load_training_data(args.dataset_name, args.dataset_config_name, args.train_data_dir, args.image_column,
                              args.label_column, args.resolution or pipe.image_shape[-1], args.center_crop,
                              args.max_train_samples, args.data_seed)
    return replace(data, images=pipe.match_image_shape(data.images))


def load_pipeline(name: str):
    """``MemSepPipeline.from_pretrained`` of a local folder or Hub id, with a clear error for a missing folder."""
    from diffusers_memsep.pipelines import MemSepPipeline

    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1
    if looks_local and not os.path.isdir(os.path.expanduser(name)):
        raise FileNotFoundError(f"no pipeline folder at {name}; pass a folder written by `memsep train` / "
                                "`memsep demo` (e.g. outputs/demo/base), a DiTPipeline folder, or a Hub repo id "
                                "(user/name).")
    return MemSepPipeline.from_pretrained(os.path.expanduser(name))


def add_quality_arguments(parser: argparse.ArgumentParser) -> None:
    """The quality flags shared by ``memsep prune`` and ``memsep demo``."""
    from diffusers_memsep.memorization import FEATURE_SPACES

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
    if args.num_quality_samples is not None and args.num_quality_samples < 4:
        raise ValueError(f"--num_quality_samples must be >= 4 (precision/recall use k = 3), got "
                         f"{args.num_quality_samples}.")


def resolve_quality_space(args: argparse.Namespace, population):
    """``--feature_space`` on the population (the trained network cached in ``<output_dir>/feature_network``); a
    missing optional library becomes the CLI's one-line error."""
    from pathlib import Path

    from diffusers_memsep.memorization import resolve_feature_space

    try:
        return resolve_feature_space(args.feature_space, population, Path(args.output_dir) / "feature_network",
                                     args.inception_weights, progress=True)
    except ImportError as error:
        raise ValueError(str(error)) from error


def run(args: argparse.Namespace) -> int:
    from dataclasses import replace

    import torch

    from diffusers_memsep.data import TrainingData, load_population
    from diffusers_memsep.hub import push_folder_to_hub, require_templates
    from diffusers_memsep.mitigation import PruningStudyConfig, check_study_output_dir, run_pruning_study
    from diffusers_memsep.trainer import TrainingConfig

    require_templates("pruned_variant")  # every variant gets a card: fail now, not after the fine-tuning
    if args.push_to_hub and not args.hub_model_id_prefix:
        raise ValueError("--push_to_hub needs --hub_model_id_prefix (e.g. me/dit-digits-pruned).")
    check_quality_arguments(args)
    finetune = TrainingConfig(max_train_steps=args.finetune_steps, learning_rate=args.finetune_lr,
                              train_batch_size=args.finetune_batch_size, adam_weight_decay=args.weight_decay,
                              use_ema=args.finetune_ema, lr_warmup_steps=0, show_progress=False)
    config = PruningStudyConfig(methods=tuple(args.methods), etas=tuple(args.etas), seeds=tuple(args.seeds),
                                finetune=finetune, importance_batches=args.importance_batches,
                                importance_batch_size=args.importance_batch_size, num_samples=args.num_samples,
                                num_inference_steps=args.num_inference_steps, sampler=args.sampler,
                                small_t_switch=args.small_t_switch, num_quality_samples=args.num_quality_samples)
    # Before loading anything: a study that cannot write its results must not run for minutes first.
    check_study_output_dir(args.output_dir, args.overwrite_output_dir, pipeline_dir=args.pipeline)
    pipe = load_pipeline(args.pipeline)
    conditional = pipe.config.get("label_dropout_prob") != 1.0
    if pipe.reference is None:
        if not has_data_flags(args):
            raise ValueError(f"{args.pipeline} has no training reference; pass the data flags of its training images "
                             "(e.g. --train_data_dir my_images) to build one, or add it with `memsep reference`.")
        data = load_pipeline_data(pipe, args)
        pipe.attach_reference(data.images)
    elif has_data_flags(args):
        data = load_pipeline_data(pipe, args)
        reference_images = pipe.reference.images.cpu()
        if data.images.shape != reference_images.shape or not torch.allclose(data.images, reference_images, atol=1e-5):
            raise ValueError("the loaded training data differs from the pipeline's reference images; pass the data "
                             "flags (and --data_seed / --max_train_samples) the model was trained with.")
    elif conditional:
        raise ValueError("this model is class-conditional: pass the data flags it was trained with (e.g. "
                         "--embedded_digits --label_column label --max_train_samples 64) so fine-tuning has labels.")
    else:
        reference_images = pipe.reference.images.cpu()
        data = TrainingData(reference_images, None, None, f"the pipeline's reference ({len(reference_images)} images)")
    population = load_population_of(args, data, load_population)
    if population.images.shape[1:] != data.images.shape[1:] and pipe.vae is not None:
        population = replace(population, images=pipe.match_image_shape(population.images))  # as the training images
    if population.images.shape[1:] != data.images.shape[1:]:
        raise ValueError(f"the population images are {tuple(population.images.shape[1:])} but the model makes "
                         f"{tuple(data.images.shape[1:])}; pass --resolution (and --center_crop) as in training.")
    feature_space = resolve_quality_space(args, population)
    if "memorization_gap" in args.methods:
        data = with_held_out_images(args, data, population, pipe)

    result = run_pruning_study(pipe, data, population.images, config, args.output_dir,
                               base_model_name=str(args.pipeline), feature_space=feature_space,
                               population_source=population.source, overwrite_output_dir=args.overwrite_output_dir,
                               dataset_id=args.dataset_name, hub_model_id_prefix=args.hub_model_id_prefix)
    print(result.report_path.read_text())
    for name, folder in result.variant_dirs.items():
        print(f"variant {name}: {folder}")
        if args.push_to_hub:
            url = push_folder_to_hub(folder, f"{args.hub_model_id_prefix}-{name}", private=args.hub_private_repo,
                                     token=args.hub_token, commit_message=f"Pruned variant {name} (diffusers-memsep)")
            print(f"pushed {name}: {url}")
    print(f"report: {result.report_path}")
    return 0


def with_held_out_images(args: argparse.Namespace, data, population, pipe):
    """The training data carrying the held-out images ``memorization_gap`` compares them with:
    ``--validation_data_dir``, else the population minus the training subset (only when both come from the same
    source, so that the subset's indices point into the population)."""
    from dataclasses import replace

    from diffusers_memsep.data import held_out_from_population, load_training_data, with_held_out

    if args.validation_data_dir:
        held_out = load_training_data(train_data_dir=args.validation_data_dir, image_column=args.image_column,
                                      label_column=args.label_column, resolution=args.resolution or data.resolution,
                                      center_crop=args.center_crop)
        if held_out.images.shape[1:] != data.images.shape[1:] and pipe.vae is not None:
            held_out = replace(held_out, images=pipe.match_image_shape(held_out.images))
        if data.labels is not None and held_out.labels is None:
            raise ValueError("the model is class-conditional but --validation_data_dir has no labels; give it one "
                             "sub-folder per class (as the training folder) or --label_column.")
        if data.labels is None:
            held_out = replace(held_out, labels=None)
        return with_held_out(data, held_out)
    if data.indices is None or args.population_data_dir:
        raise ValueError("--methods memorization_gap compares the training images with held-out images of the same "
                         "distribution: pass --validation_data_dir, or the data flags the model was trained with "
                         "(with --max_train_samples / --data_seed) so the rest of that data set is held out.")
    return with_held_out(data, held_out_from_population(population, data))


def load_population_of(args: argparse.Namespace, data, load_population):
    """The whole data source the model's training set was drawn from (or ``--population_data_dir``)."""
    from diffusers_memsep.data import EMBEDDED_DATASET

    common = dict(image_column=args.image_column, resolution=args.resolution or data.resolution,
                  center_crop=args.center_crop)
    if args.population_data_dir:
        return load_population(data_dir=args.population_data_dir, **common)
    if args.train_data_dir or args.dataset_name:
        return load_population(args.dataset_name, args.dataset_config_name, args.train_data_dir,
                               split=args.population_split, **common)
    if data.source.startswith(EMBEDDED_DATASET) or tuple(data.images.shape[1:]) == (1, 8, 8):
        return load_population(resolution=args.resolution)  # all 1,797 digits
    raise ValueError("quality is measured against the population the model was trained from: pass the data flags "
                     "it was trained with (--train_data_dir / --dataset_name) or --population_data_dir.")
