"""``memsep prune`` / ``training/prune_dit.py``: Algorithm 1 on a saved pipeline, beside random pruning.

Loads a ``MemSepPipeline`` (local folder or Hub id), prunes its transformer by every ``--methods`` x ``--etas`` x
``--seeds``, fine-tunes, evaluates every variant and the original on the same seeds, and writes ``report.md``,
``runs.csv``, ``summary.csv``, figures and one pipeline folder (with model card) per method and eta.

Training data. The pipeline's ``reference`` holds exactly the training images, which is all an unconditional model
needs. A class-conditional model also needs the labels: pass the data flags of ``memsep train`` (the images they load
must equal the reference). Quality is measured against ``--real_data`` (default: all 1,797 digits for the
embedded data set, the training images otherwise).
"""

from __future__ import annotations

import argparse
import os


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from diffusers_memsep.mitigation import SAMPLERS, PruningStudyConfig
    from diffusers_memsep.pruning import METHODS
    from diffusers_memsep.training import TrainingConfig

    study, finetune = PruningStudyConfig(), TrainingConfig()
    parser.add_argument("--pipeline", required=True, help="A MemSepPipeline folder or Hub repo id.")
    parser.add_argument("--output_dir", required=True, help="Where the report, CSVs, figures and variants go.")
    parser.add_argument("--overwrite_output_dir", action="store_true",
                        help="Replace an earlier study in --output_dir (its report, CSVs, figures, variants/ only).")
    parser.add_argument("--methods", nargs="+", default=list(study.methods), choices=METHODS,
                        help="Head scores: small_t (Algorithm 2), uniform_t, ablation, random (baseline).")
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
    parser.add_argument("--routed_switch", type=int, default=None,
                        help="Also evaluate time-routed sampling: the pruned model only for timesteps < this.")
    data = parser.add_argument_group("training data (needed for class-conditional models)")
    data.add_argument("--dataset_name", default=None)
    data.add_argument("--dataset_config_name", default=None)
    data.add_argument("--train_data_dir", default=None)
    data.add_argument("--image_column", default="image")
    data.add_argument("--label_column", default=None)
    data.add_argument("--resolution", type=int, default=None)
    data.add_argument("--center_crop", action="store_true")
    data.add_argument("--max_train_samples", type=int, default=None)
    data.add_argument("--data_seed", type=int, default=0, help="The --seed the model was trained with.")
    data.add_argument("--embedded_digits", action="store_true",
                      help="Reload the embedded digits subset (with --max_train_samples/--data_seed).")
    hub = parser.add_argument_group("hub")
    hub.add_argument("--push_to_hub", action="store_true", help="Upload every variant folder after saving it.")
    hub.add_argument("--hub_model_id_prefix", default=None, help="Variants go to <prefix>-<method>-eta<eta>.")
    hub.add_argument("--hub_private_repo", action="store_true")
    hub.add_argument("--hub_token", default=None)


def run(args: argparse.Namespace) -> int:
    import torch

    from diffusers_memsep.data import TrainingData, load_training_data
    from diffusers_memsep.hub import push_folder_to_hub, require_templates
    from diffusers_memsep.mitigation import PruningStudyConfig, check_study_output_dir, run_pruning_study
    from diffusers_memsep.pipelines import MemSepPipeline
    from diffusers_memsep.training import TrainingConfig

    require_templates("pruned_variant")  # every variant gets a card: fail now, not after the fine-tuning
    if args.push_to_hub and not args.hub_model_id_prefix:
        raise ValueError("--push_to_hub needs --hub_model_id_prefix (e.g. me/dit-digits-pruned).")
    finetune = TrainingConfig(max_train_steps=args.finetune_steps, learning_rate=args.finetune_lr,
                              train_batch_size=args.finetune_batch_size, adam_weight_decay=args.weight_decay,
                              use_ema=args.finetune_ema, lr_warmup_steps=0, show_progress=False)
    config = PruningStudyConfig(methods=tuple(args.methods), etas=tuple(args.etas), seeds=tuple(args.seeds),
                                finetune=finetune, importance_batches=args.importance_batches,
                                importance_batch_size=args.importance_batch_size, num_samples=args.num_samples,
                                num_inference_steps=args.num_inference_steps, sampler=args.sampler,
                                routed_switch=args.routed_switch)
    looks_local = args.pipeline.startswith((".", "/", "~")) or args.pipeline.count("/") > 1
    if looks_local and not os.path.isdir(os.path.expanduser(args.pipeline)):
        raise FileNotFoundError(f"no pipeline folder at {args.pipeline}; pass a folder written by `memsep train` / "
                                "`memsep demo` (e.g. outputs/demo/base) or a Hub repo id (user/name).")
    # Before loading anything: a study that cannot write its results must not run for minutes first.
    check_study_output_dir(args.output_dir, args.overwrite_output_dir, pipeline_dir=args.pipeline)
    pipe = MemSepPipeline.from_pretrained(os.path.expanduser(args.pipeline))  # safetensors only
    if pipe.reference is None:
        raise ValueError(f"{args.pipeline} has no training reference; add one with pipe.register_modules(reference="
                         "NearestNeighborIndex.from_images(train_images)) and save it, so memorization can be "
                         "measured.")
    conditional = pipe.config.get("label_dropout_prob") != 1.0
    reference_images = pipe.reference.images.cpu()
    if args.dataset_name or args.train_data_dir or args.embedded_digits:
        data = load_training_data(args.dataset_name, args.dataset_config_name, args.train_data_dir,
                                  args.image_column, args.label_column, args.resolution, args.center_crop,
                                  args.max_train_samples, args.data_seed)
        if data.images.shape != reference_images.shape or not torch.allclose(data.images, reference_images, atol=1e-5):
            raise ValueError("the loaded training data differs from the pipeline's reference images; pass the data "
                             "flags (and --data_seed / --max_train_samples) the model was trained with.")
    elif conditional:
        raise ValueError("this model is class-conditional: pass the data flags it was trained with (e.g. "
                         "--embedded_digits --label_column label --max_train_samples 64) so fine-tuning has labels.")
    else:
        data = TrainingData(reference_images, None, None, f"the pipeline's reference ({len(reference_images)} images)")
    is_digits = tuple(data.images.shape[1:]) == (1, 8, 8) and not (args.dataset_name or args.train_data_dir)
    real_images = load_training_data().images if is_digits else data.images

    result = run_pruning_study(pipe, data, real_images, config, args.output_dir, base_model_name=str(args.pipeline),
                               overwrite_output_dir=args.overwrite_output_dir)
    print(result.report_path.read_text())
    for name, folder in result.variant_dirs.items():
        print(f"variant {name}: {folder}")
        if args.push_to_hub:
            url = push_folder_to_hub(folder, f"{args.hub_model_id_prefix}-{name}", private=args.hub_private_repo,
                                     token=args.hub_token, commit_message=f"Pruned variant {name} (diffusers-memsep)")
            print(f"pushed {name}: {url}")
    print(f"report: {result.report_path}")
    return 0
