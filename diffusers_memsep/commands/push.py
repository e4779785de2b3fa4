"""``memsep push``: upload a saved pipeline folder (a trained model or a pruned variant) to the Hugging Face Hub.

The same upload as ``--push_to_hub`` at the end of ``memsep train`` / ``memsep prune``, for a folder that is already
complete on disk (for example after a push that failed offline): checkpoints, logs and temporary files stay local,
and so does ``reference/`` (the exact training images) unless ``--push_reference``: private by default. The card
says how to rebuild the reference locally (``memsep reference`` with the data flags of the training run).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from diffusers_memsep.commands.arguments import add_hub_arguments
from diffusers_memsep.hub import push_folder_to_hub


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", help="A saved pipeline folder (holds model_index.json).")
    parser.add_argument("--hub_model_id", required=True, help="Repo id, e.g. me/dit-digits.")
    parser.add_argument("--commit_message", default="Upload MemSepPipeline (diffusers-memsep)")
    add_hub_arguments(parser)


def run(args: argparse.Namespace) -> int:
    if not (Path(args.folder) / "model_index.json").is_file():
        raise ValueError(f"{args.folder!r} holds no model_index.json; pass a folder written by memsep train or "
                         "memsep prune (a variant under variants/).")
    reference = (Path(args.folder) / "reference").is_dir()
    url = push_folder_to_hub(args.folder, args.hub_model_id, private=args.hub_private_repo, token=args.hub_token,
                             commit_message=args.commit_message, push_reference=args.push_reference)
    if not reference:
        kept = ""
    elif args.push_reference:
        kept = " (with reference/: the training images are now published)"
    else:
        kept = (" (without reference/, the training images, which stay local; pass --push_reference to publish "
                "them)")
    print(f"Pushed {args.folder} to {url}{kept}")
    return 0
