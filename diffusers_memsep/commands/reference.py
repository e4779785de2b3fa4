"""``memsep reference``: attach a training-set reference to any DiT pipeline, so its samples are checked for copies.

Loads a pipeline folder or Hub id (a ``MemSepPipeline``, or a stock ``DiTPipeline`` checkpoint such as the layout of
``facebook/DiT-XL-2-256``), loads the training images given by the data flags of ``memsep train`` at the pipeline's
output resolution (pixel space: after the VAE decode for a latent model), and saves the pipeline with that reference
as a ``MemSepPipeline`` folder in ``--output_dir``. With ``--num_samples N`` it also samples N images and reports how
many copy one of those training images (the paper's 1/3 rule).

The library call is ``pipe.attach_reference(images)`` on a ``MemSepPipeline``.
"""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from diffusers_memsep.commands.prune import add_data_arguments

    parser.add_argument("--pipeline", required=True, help="A pipeline folder or Hub repo id (MemSep or DiT).")
    parser.add_argument("--output_dir", required=True, help="Where the pipeline with its reference is saved.")
    parser.add_argument("--overwrite_output_dir", action="store_true", help="Replace a pipeline already there.")
    parser.add_argument("--num_samples", type=int, default=0, help="Sample this many images and report copies.")
    parser.add_argument("--num_inference_steps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0, help="Seed of the samples.")
    add_data_arguments(parser.add_argument_group("training data (the images to check the samples against)"))


def run(args: argparse.Namespace) -> int:
    import torch

    from diffusers_memsep.commands.prune import has_data_flags, load_pipeline, load_pipeline_data
    from diffusers_memsep.trainer import save_pipeline_folder

    if not has_data_flags(args):
        raise ValueError("pass the training images with --train_data_dir (a folder of images), --dataset_name or "
                         "--embedded_digits.")
    if args.num_samples < 0 or args.num_inference_steps < 1:
        raise ValueError("--num_samples must be >= 0 and --num_inference_steps >= 1.")
    output_dir = Path(args.output_dir)
    occupied = output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir()))
    if occupied and not args.overwrite_output_dir:
        raise FileExistsError(f"--output_dir {output_dir} is not empty; pass --overwrite_output_dir to replace the "
                              "pipeline there, or choose another folder.")
    pipe = load_pipeline(args.pipeline)
    data = load_pipeline_data(pipe, args)
    pipe.attach_reference(data.images)
    save_pipeline_folder(pipe, output_dir)
    print(f"reference of {len(data)} images ({data.source}) at {tuple(pipe.image_shape)} attached; saved to "
          f"{output_dir}")

    if args.num_samples:
        labels = None
        if pipe.config.get("label_dropout_prob") != 1 and pipe.num_classes > 1:
            labels = torch.arange(args.num_samples) % pipe.num_classes
        pipe.set_progress_bar_config(disable=True)
        output = pipe(class_labels=labels, batch_size=None if labels is not None else args.num_samples,
                      num_inference_steps=args.num_inference_steps, output_type="pt",
                      generator=torch.Generator().manual_seed(args.seed))
        copies = int(output.memorized.sum())
        print(f"{copies} of {args.num_samples} samples copy a training image (memorization ratio "
              f"{copies / args.num_samples:.3f}).")
    return 0
