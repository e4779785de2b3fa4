"""``memsep push``: upload a saved pipeline folder (a trained model or a pruned variant) to the Hugging Face Hub.

The same upload as ``--push_to_hub`` at the end of ``memsep train`` / ``memsep prune``, for a folder that is already
complete on disk (for example after a push that failed offline): checkpoints, logs and temporary files stay local.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from diffusers_memsep.hub import push_folder_to_hub


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("folder", help="A saved pipeline folder (holds model_index.json).")
    parser.add_argument("--hub_model_id", required=True, help="Repo id, e.g. me/dit-digits.")
    parser.add_argument("--hub_private_repo", action="store_true", help="Create the Hub repo as private.")
    parser.add_argument("--hub_token", default=None, help="Hub token (default: the logged-in one / HF_TOKEN).")
    parser.add_argument("--commit_message", default="Upload MemSepPipeline (diffusers-memsep)")


def run(args: argparse.Namespace) -> int:
    if not (Path(args.folder) / "model_index.json").is_file():
        raise ValueError(f"{args.folder!r} holds no model_index.json; pass a folder written by memsep train or "
                         "memsep prune (a variant under variants/).")
    url = push_folder_to_hub(args.folder, args.hub_model_id, private=args.hub_private_repo, token=args.hub_token,
                             commit_message=args.commit_message)
    print(f"Pushed {args.folder} to {url}")
    return 0
