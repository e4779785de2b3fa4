"""``memsep audit``: does a model copy its training images, which ones, and how badly?

Loads a pipeline folder or Hub id (a ``MemSepPipeline`` or a stock ``DiTPipeline``), samples it and writes
``report.md``, ``audit.json`` and ``gallery.png`` into ``--output_dir``: memorization by the paper's pixel rule and
in the copy-detection space (with 95% intervals), the model-only score, copies per training image, the worst copies
beside their training images, and quality against the population. The training images come from the data flags of
``memsep train`` (or the pipeline's own reference); without any, only the model-only score is reported. The library
call is :func:`diffusers_memsep.audit.audit_pipeline`.

Data-parallel: ``ACCELERATE_USE_CPU=true torchrun --nproc_per_node N -m diffusers_memsep.cli audit ...`` (CPU) or
``accelerate launch -m diffusers_memsep.cli audit ...`` (GPUs) splits the sampling batches and their model-only
scores across the N processes; the main process alone measures the rest and writes the files, with the numbers of
one process.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from diffusers_memsep.audit import audit_pipeline, write_audit
from diffusers_memsep.commands.arguments import (
    add_quality_arguments,
    add_saved_model_data_arguments,
    check_quality_arguments,
    data_source,
)
from diffusers_memsep.distributed import is_main_process, leave_process_group
from diffusers_memsep.memorization.model_score import METHODS, check_method_options
from diffusers_memsep.sources import load_pipeline, load_pipeline_data, population_of, resolve_quality_space


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pipeline", required=True, help="A pipeline folder or Hub repo id (MemSep or DiT).")
    parser.add_argument("--output_dir", required=True, help="Where report.md, audit.json and gallery.png go.")
    parser.add_argument("--num_samples", type=int, default=64)
    parser.add_argument("--num_inference_steps", type=int, default=25)
    parser.add_argument("--seed", type=int, default=0, help="Seed of the samples.")
    parser.add_argument("--batch_size", type=int, default=64,
                        help="Samples per pipeline call; batch b is seeded seed + b, so the numbers "
                             "depend on it (not on the number of processes, which share the batches).")
    parser.add_argument("--score_method", default="renoise", choices=METHODS,
                        help="Model-only score (renoise: stability under re-noising; extraction: the paper's 1/3 "
                             "rule against training images extracted from the model, after sampling and scoring 256 "
                             "images, see docs/results.md for where it is better and where it fails; cond_gap needs "
                             "a conditional model).")
    parser.add_argument("--score_repeats", type=int, default=None,
                        help="Re-noising draws of the score (renoise methods and extraction; default 16 for "
                             "extraction, 4 for renoise).")
    parser.add_argument("--copy_model", default=None,
                        help="A transformers AutoModel folder or Hub id (e.g. facebook/dinov2-small) as the copy "
                             "space; default: a contrastive network trained on the population, cached in "
                             "<output_dir>/feature_network/copy_space.")
    parser.add_argument("--copy_steps", type=int, default=1500, help="InfoNCE steps of the copy-detection network.")
    parser.add_argument("--gallery_size", type=int, default=8)
    parser.add_argument("--no_quality", action="store_true", help="Skip the quality metrics.")
    add_quality_arguments(parser)
    data = parser.add_argument_group("training data (optional: the images to check the samples against)")
    add_saved_model_data_arguments(data)
    data.add_argument("--population_data_dir", default=None,
                      help="Folder of the population (default: every image of the data source above).")
    data.add_argument("--population_split", default="train")


def run(args: argparse.Namespace) -> int:
    if (args.num_samples < 4 or args.num_inference_steps < 1 or args.gallery_size < 0 or args.copy_steps < 1
            or args.batch_size < 1 or (args.score_repeats is not None and args.score_repeats < 1)):
        raise ValueError("--num_samples must be >= 4, --num_inference_steps >= 1, --gallery_size >= 0, "
                         "--copy_steps >= 1, --batch_size >= 1 and --score_repeats >= 1.")
    if args.score_repeats is not None:
        check_method_options(args.score_method, {"repeats": args.score_repeats})  # e.g. fixed_point has draws
    check_quality_arguments(args)
    source = data_source(args)
    device = join_processes()
    pipe = load_pipeline(args.pipeline)
    if device is not None and device.type != "cpu":  # each GPU process on its own device; CPU pipelines stay as loaded
        pipe.to(device)
    train_images = population = quality_space = None
    if source.given:
        data = load_pipeline_data(pipe, source)
        train_images = data.images
        population_data = population_of(source, data, pipe)
        population = population_data.images
        if not args.no_quality:
            quality_space = resolve_quality_space(args.feature_space, population_data, args.output_dir,
                                                  args.inception_weights)
    elif args.population_data_dir:
        raise ValueError("--population_data_dir needs the training images too (--train_data_dir, --dataset_name or "
                         "--embedded_digits): the population's other images calibrate the copy rule.")
    result = audit_pipeline(pipe, train_images, population, args.num_samples, args.num_inference_steps, args.seed,
                            args.score_method, args.copy_model,
                            Path(args.output_dir) / "feature_network" / "copy_space", quality_space,
                            args.gallery_size, batch_size=args.batch_size, copy_steps=args.copy_steps,
                            score_options={} if args.score_repeats is None else {"repeats": args.score_repeats})
    report = write_audit(result, args.output_dir, args.pipeline)
    if is_main_process():
        print(report.read_text())
    leave_process_group()
    return 0


def join_processes():
    """Under ``torchrun`` / ``accelerate launch`` (``WORLD_SIZE`` > 1): join the process group through Accelerate
    and return this process's device; None for one process.

    Processes that cannot form one group (``torchrun`` on a CPU-only machine without ``ACCELERATE_USE_CPU=true``)
    are refused: each would audit alone and write the same files.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world_size == 1:
        return None
    from accelerate import PartialState  # only data-parallel runs need it
    from accelerate.utils import parse_flag_from_env

    state = PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))  # the flag Accelerator reads (gloo on CPU)
    if state.num_processes != world_size:
        raise ValueError(f"{world_size} processes were started (WORLD_SIZE={world_size}) but Accelerate joined "
                         f"{state.num_processes}: each would audit alone and write the same files. On CPU run "
                         f"`ACCELERATE_USE_CPU=true torchrun --nproc_per_node {world_size} -m diffusers_memsep.cli "
                         "audit ...`; on GPUs use `accelerate launch -m diffusers_memsep.cli audit ...`.")
    return state.device
