"""``memsep prune`` / ``training/prune_dit.py``: Algorithm 1 on a saved pipeline, beside random pruning.

Loads a ``MemSepPipeline`` (local folder or Hub id), runs the pruning-study engine on it (every ``--methods`` x
``--etas`` x ``--seeds``, fine-tuned, evaluated beside the original and the fine-tuning control on the same seeds)
and writes ``report.md``, ``runs.csv``, ``summary.csv``, figures and one pipeline folder (with model card) per method
and eta.

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

from diffusers_memsep.commands.arguments import (
    add_hub_arguments,
    add_pruning_arguments,
    add_quality_arguments,
    add_saved_model_data_arguments,
    check_quality_arguments,
    data_source,
    pruning_config,
)
from diffusers_memsep.hub import push_folder_to_hub, require_templates
from diffusers_memsep.sources import (
    load_pipeline,
    population_of,
    resolve_quality_space,
    training_data_of,
    with_held_out_images,
)
from diffusers_memsep.study import PruningStudyConfig, check_study_output_dir, prune_pipeline
from diffusers_memsep.study.engine import present_heads


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pipeline", required=True, help="A MemSepPipeline folder or Hub repo id.")
    parser.add_argument("--output_dir", required=True, help="Where the report, CSVs, figures and variants go.")
    parser.add_argument("--overwrite_output_dir", action="store_true",
                        help="Replace an earlier study in --output_dir (its report, CSVs, figures, runs/, variants/).")
    add_pruning_arguments(parser, PruningStudyConfig())
    add_quality_arguments(parser)
    data = parser.add_argument_group(
        "training data (needed for class-conditional models, and for a pipeline without a reference)")
    add_saved_model_data_arguments(data)
    data.add_argument("--population_data_dir", default=None,
                      help="Folder of the population images quality is measured against (default: every image of "
                           "the data source above, all 1,797 digits for the embedded data).")
    data.add_argument("--population_split", default="train",
                      help="Split of --dataset_name used as the population (all of its images).")
    data.add_argument("--validation_data_dir", default=None,
                      help="Held-out images of the training distribution for --methods memorization_gap (default: "
                           "the population minus the training subset, when the data flags load that subset).")
    hub = parser.add_argument_group("hub")
    add_hub_arguments(hub, "Upload every variant folder after saving it (without reference/ unless --push_reference).")
    hub.add_argument("--hub_model_id_prefix", default=None, help="Variants go to <prefix>-<method>-eta<eta>.")


def run(args: argparse.Namespace) -> int:
    require_templates("pruned_variant")  # every variant gets a card: fail now, not after the fine-tuning
    if args.push_to_hub and not args.hub_model_id_prefix:
        raise ValueError("--push_to_hub needs --hub_model_id_prefix (e.g. me/dit-digits-pruned).")
    if args.push_reference and not args.push_to_hub:
        raise ValueError("--push_reference applies to a push; add --push_to_hub (and --hub_model_id_prefix).")
    check_quality_arguments(args)
    config = pruning_config(args, PruningStudyConfig())
    # Before loading anything: a study that cannot write its results must not run for minutes first.
    check_study_output_dir(args.output_dir, args.overwrite_output_dir, pipeline_dir=args.pipeline)
    source = data_source(args)
    pipe = load_pipeline(args.pipeline)
    data = training_data_of(pipe, source, args.pipeline)
    population = population_of(source, data, pipe)
    # Before the feature space (which may train and cache a network) and any scoring: etas that remove no head of
    # this transformer, default ones included, and a switch outside its schedule are refused.
    config.check_against_model(present_heads(pipe.transformer), int(pipe.scheduler.config.num_train_timesteps))
    feature_space = resolve_quality_space(args.feature_space, population, args.output_dir, args.inception_weights)
    if "memorization_gap" in args.methods:
        data = with_held_out_images(source, data, population, pipe)

    result = prune_pipeline(pipe, data, population.images, config, args.output_dir,
                            base_model_name=str(args.pipeline), feature_space=feature_space,
                            population_source=population.source, overwrite_output_dir=args.overwrite_output_dir,
                            dataset_id=args.dataset_name, hub_model_id_prefix=args.hub_model_id_prefix)
    print(result.report_path.read_text())
    for name, folder in result.variant_dirs.items():
        print(f"variant {name}: {folder}")
        if args.push_to_hub:
            url = push_folder_to_hub(folder, f"{args.hub_model_id_prefix}-{name}", private=args.hub_private_repo,
                                     token=args.hub_token, commit_message=f"Pruned variant {name} (diffusers-memsep)",
                                     push_reference=args.push_reference)
            print(f"pushed {name}: {url}")
    print(f"report: {result.report_path}")
    return 0
