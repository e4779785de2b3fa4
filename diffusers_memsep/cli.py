"""The ``memsep`` command line: one sub-command per module in ``diffusers_memsep/commands/``.

Each command module defines ``add_arguments(parser)`` and ``run(args) -> int | None``; it only parses arguments and
calls the library. The scripts in ``training/`` call :func:`main` with their command name, so the command line of
``memsep train ...`` and ``accelerate launch training/train_dit.py ...`` is defined once.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# command name -> (module under diffusers_memsep.commands, one-line help)
COMMANDS = {
    "demo": ("demo", "The main job: train a DiT on the embedded digits until it memorizes, prune, compare."),
    "train": ("train", "Train a (prunable) DiT and write a MemSepPipeline folder (Accelerate)."),
    "prune": ("prune", "Algorithm 1: score heads, prune, fine-tune, evaluate against random pruning."),
    "study": ("study", "Replicated pruning study: base models x conditions x seeds, paired intervals, verdicts."),
    "push": ("push", "Upload a saved pipeline folder (trained model or pruned variant) to the Hugging Face Hub."),
    "reference": ("reference", "Attach a training-set reference to any DiT pipeline, so its samples are checked."),
    "audit": ("audit", "Audit a pipeline for copies: pixel and copy-detection rules, model-only score, gallery."),
    "loss-gap": ("loss_gap", "Figure 1: Loss-Gap_t = Fisher divergence against t for several n."),
    "gmm": ("gmm", "Figures 2-3: Gaussian-mixture capacity experiments and the capacity threshold."),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of all commands, or of one ``command`` alone (used by the ``training/`` scripts)."""
    if command is not None:
        module = _command_module(command)
        parser = argparse.ArgumentParser(prog=command, description=COMMANDS[command][1])
        module.add_arguments(parser)
        parser.set_defaults(_run=module.run)
        return parser
    parser = argparse.ArgumentParser(prog="memsep", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (_, help_text) in COMMANDS.items():
        module = _command_module(name)
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(command_parser)
        command_parser.set_defaults(_run=module.run)
    return parser


def _command_module(name: str):
    if name not in COMMANDS:
        raise SystemExit(f"memsep: unknown command {name!r}; choose one of {', '.join(COMMANDS)}")
    return importlib.import_module(f"diffusers_memsep.commands.{COMMANDS[name][0]}")


def main(argv: list[str] | None = None, command: str | None = None) -> int:
    """Entry point of ``memsep``; with ``command`` set, ``argv`` holds that command's arguments only."""
    argv = sys.argv[1:] if argv is None else argv
    if command is None and argv and argv[0] in COMMANDS:
        # Build only the parser of the requested command, so one command's imports never slow another.
        command, argv = argv[0], argv[1:]
    args = build_parser(command).parse_args(argv)
    from .hub import HubPushError  # light: the Hub client is imported only when a push happens
    from .utils import check_writable_dir

    try:
        if getattr(args, "output_dir", None):
            check_writable_dir(args.output_dir, "--output_dir")  # before any expensive work
        return int(args._run(args) or 0)
    except (ValueError, HubPushError) as error:
        # Bad input: one clear line, no traceback. Programming errors (TypeError, KeyError...) still raise.
        print(f"memsep: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except OSError as error:
        # The file system or the network refused (missing file, full disk, no permission, not cached offline).
        print(f"memsep: error: {_one_line(error)}{_os_error_fix(error)}", file=sys.stderr)
        return 2


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _os_error_fix(error: OSError) -> str:
    """The fix for the OS errors a run can meet, appended to the message (our own errors already carry one)."""
    import errno

    fixes = {errno.ENOSPC: "free disk space (or choose --output_dir on another disk) and run again",
             errno.EDQUOT: "free disk space within your quota and run again",
             errno.EACCES: "choose a folder you can write to", errno.EPERM: "choose a folder you can write to",
             errno.EROFS: "the file system is read-only; choose another --output_dir"}
    fix = fixes.get(error.errno)
    return f"; {fix}." if fix else ""


if __name__ == "__main__":
    sys.exit(main())
