"""The ``memsep`` command line: one sub-command per module in ``diffusers_memsep/commands/``.

Each command module defines ``add_arguments(parser)`` and ``run(args) -> int | None``; it only parses arguments and
calls the library. The scripts in ``training/`` call :func:`main` with their command name, so the command line of
``memsep train ...`` and ``accelerate launch training/train_dit.py ...`` is defined once.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import sys
from pathlib import Path

from .hub import HubPushError
from .utils import (
    OutputLock,
    as_write_error,
    check_output_outside_inputs,
    check_pipeline_json,
    check_writable_dir,
    is_write_error,
)

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


#: Commands that write a run into --output_dir: one process at a time (a lock beside the folder).
LOCKED_COMMANDS = {"train", "prune", "study", "demo", "reference"}

#: Flags naming input folders an --output_dir must not be (or lie inside): flag attribute -> what it holds.
INPUT_FOLDERS = {"train_data_dir": "training images folder", "validation_data_dir": "validation images folder",
                 "population_data_dir": "population images folder", "pipeline": "input pipeline folder",
                 "pretrained_model_name_or_path": "input pipeline folder",
                 "pretrained_vae_model_name_or_path": "input VAE folder"}

#: Largest --resolution accepted: beyond it a DiT's tokens (and the memory of one step) grow past what any
#: supported setting uses (DiT-XL/2-512 works at 512); refused before any image is loaded.
MAX_RESOLUTION = 1024


class _Parser(argparse.ArgumentParser):
    """argparse with one fix to its messages: ``--learning_rate -1e-3`` is read as a missing value (argparse takes
    ``-1e-3`` for an option), so the error says to write ``--learning_rate=-1e-3``."""

    def error(self, message):
        import re

        found = re.match(r"argument (--[\w-]+)(?:/[^:]*)?: expected (?:one|at least one) argument", message)
        if found:
            flag = found.group(1)
            message += (f" (a negative value such as -1e-3 or -inf reads as an option: write {flag}=-1e-3, with "
                        "'=')")
        super().error(message)


def _add_common_arguments(parser: argparse.ArgumentParser) -> None:
    if not any("--num_threads" in action.option_strings for action in parser._actions):
        parser.add_argument("--num_threads", type=int, default=None,
                            help="torch intra-op threads (default: 1 unless OMP_NUM_THREADS is set; see "
                                 "docs/benchmarks.md, 'Threads under load').")


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of all commands, or of one ``command`` alone (used by the ``training/`` scripts)."""
    if command is not None:
        module = _command_module(command)
        parser = _Parser(prog=command, description=COMMANDS[command][1])
        module.add_arguments(parser)
        _add_common_arguments(parser)
        parser.set_defaults(_run=module.run, _command=command)
        return parser
    parser = _Parser(prog="memsep", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)
    for name, (_, help_text) in COMMANDS.items():
        module = _command_module(name)
        command_parser = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(command_parser)
        _add_common_arguments(command_parser)
        command_parser.set_defaults(_run=module.run, _command=name)
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
    lock = None
    try:
        check_flags(args)
        set_num_threads(args.num_threads)
        if getattr(args, "output_dir", None):
            check_writable_dir(args.output_dir, "--output_dir")  # before any expensive work
            check_output_outside_inputs(args.output_dir, {
                f"--{name}": (what, getattr(args, name, None)) for name, what in INPUT_FOLDERS.items()})
            for name in ("pipeline", "pretrained_model_name_or_path"):
                if getattr(args, name, None) and Path(getattr(args, name)).expanduser().is_dir():
                    check_pipeline_json(Path(getattr(args, name)).expanduser())
            check_flags_against_pipeline(args, explicit=_given_flags(argv))
            if args._command == "demo":
                check_demo_output_dir(args.output_dir, getattr(args, "overwrite_output_dir", False))
            if args._command in LOCKED_COMMANDS and _is_main_rank():
                lock = OutputLock(args.output_dir, f"memsep {args._command}").acquire()
        return int(args._run(args) or 0)
    except (ValueError, HubPushError) as error:
        # Bad input: one clear line, no traceback. Programming errors (TypeError, KeyError...) still raise.
        print(f"memsep: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except OSError as error:
        # The file system or the network refused (missing file, full disk, no permission, not cached offline).
        print(f"memsep: error: {_one_line(error)}{_os_error_fix(error)}", file=sys.stderr)
        return 2
    except Exception as error:
        if not is_write_error(error):
            raise
        if "deserializ" in str(error).lower():  # safetensors could not READ a file: it is damaged
            print(f"memsep: error: a safetensors file cannot be read ({_one_line(error)}); it is damaged or "
                  "truncated: restore it or save the model again.", file=sys.stderr)
            return 2
        error = as_write_error(error, getattr(args, "output_dir", None) or ".")  # e.g. SafetensorError: disk full
        print(f"memsep: error: {_one_line(error)}{_os_error_fix(error)}", file=sys.stderr)
        return 2
    finally:
        if lock is not None:
            lock.release()


def _is_main_rank() -> bool:
    """Under torchrun / accelerate every process runs this command line; only rank 0 takes the output lock."""
    import os

    return all(os.environ.get(name, "0") in ("", "0") for name in ("RANK", "LOCAL_RANK"))


def check_flags(args: argparse.Namespace) -> None:
    """Checks of flags shared by several commands, before any expensive work (the commands check their own)."""
    import math

    from .utils import check_plain_name, check_positive_limit, check_seed, check_unique

    for name in ("seed", "data_seed"):
        check_seed(getattr(args, name, None), f"--{name}")
    for name in ("seeds", "etas", "methods", "settings"):
        check_unique(getattr(args, name, None), f"--{name}")
    for seed in getattr(args, "seeds", None) or []:
        check_seed(seed, "--seeds")
    for eta in getattr(args, "etas", None) or []:
        if not (isinstance(eta, float) and math.isfinite(eta) and 0 < eta < 1):
            raise ValueError(f"--etas: eta must lie in (0, 1) (a fraction of the heads of a layer), got {eta}.")
    if getattr(args, "setting_name", None) is not None:
        check_plain_name(args.setting_name, "--setting_name")
    resolution = getattr(args, "resolution", None)
    if resolution is not None and not 1 <= resolution <= MAX_RESOLUTION:
        raise ValueError(f"--resolution {resolution} is outside [1, {MAX_RESOLUTION}]; pass the side of the square "
                         f"training images, at most {MAX_RESOLUTION} (e.g. --resolution 256).")
    samples = getattr(args, "num_train_samples", None)
    if samples is not None and 0 < samples < 2:
        raise ValueError(f"--num_train_samples {samples}: memorization is judged against at least 2 training images "
                         "(the 1/3 rule compares the nearest and the second-nearest); pass --num_train_samples >= 2.")
    for name in ("max_runs", "num_base_models"):  # a limit of 0 would run nothing and report an empty study
        check_positive_limit(getattr(args, name, None), f"--{name}")
    threads = getattr(args, "num_threads", None)
    if threads is not None and threads < 1:
        raise ValueError(f"--num_threads must be >= 1, got {threads}.")


def check_demo_output_dir(output_dir, overwrite_output_dir: bool = False) -> None:
    """``memsep demo`` replaces its own earlier results (a folder with ``base/model_index.json``), never another run:
    a non-empty folder without them is refused unless ``--overwrite_output_dir`` (when the demo has that flag)."""
    from .utils import CACHE_FOLDERS, WRITE_CHECK_PREFIX

    folder = Path(output_dir).expanduser()
    if overwrite_output_dir or not folder.is_dir() or (folder / "base" / "model_index.json").is_file():
        return
    contents = sorted(p.name for p in folder.iterdir()
                      if not p.name.startswith(WRITE_CHECK_PREFIX) and p.name not in CACHE_FOLDERS)
    if contents:
        shown = ", ".join(contents[:5]) + (", ..." if len(contents) > 5 else "")
        raise ValueError(f"--output_dir {str(output_dir)!r} already holds another run ({shown}), not an earlier demo "
                         "(no base/model_index.json); choose another --output_dir.")


def _given_flags(argv: list[str]) -> set[str]:
    return {str(token).split("=", 1)[0] for token in argv if str(token).startswith("--")}


def check_flags_against_pipeline(args: argparse.Namespace, explicit: set[str] | None = None) -> None:
    """Flags that would make a method a no-op on the given local pipeline folder, checked before loading it:
    an eta that removes no head (``floor(eta * H) == 0``, H the heads still in the model, ranked over the whole
    model as :func:`~diffusers_memsep.pruning.select_heads_to_prune` does) and a ``--small_t_switch`` outside the
    schedule (the routed sampler would never switch). Hub ids are checked by the library once loaded. Only etas
    given on the command line (``explicit``) are checked here, so that the default list does not hide the errors of
    a damaged folder; the default ones are checked too, once the model is loaded
    (:meth:`~diffusers_memsep.study.config.PruningStudyConfig.check_against_model`, before any scoring)."""
    from .utils import check_etas_remove_heads, check_time_switch, read_json_object

    folder = Path(getattr(args, "pipeline", None) or "").expanduser()
    if not getattr(args, "pipeline", None) or not folder.is_dir():
        return
    schedule_file = folder / "scheduler" / "scheduler_config.json"
    if schedule_file.is_file():  # a string in an integer field fails late, deep inside diffusers
        import inspect

        from diffusers import DDIMScheduler, DDPMScheduler

        from .utils import check_config_types

        schedule = read_json_object(schedule_file)
        scheduler_class = DDIMScheduler if schedule.get("_class_name") == "DDIMScheduler" else DDPMScheduler
        defaults = {name: p.default for name, p in inspect.signature(scheduler_class.__init__).parameters.items()
                    if p.default is not inspect.Parameter.empty}
        check_config_types(schedule, defaults, schedule_file)
    config_file = folder / "transformer" / "config.json"
    if getattr(args, "etas", None) and config_file.is_file() and (explicit is None or "--etas" in explicit):
        config = read_json_object(config_file)
        layers, heads = config.get("num_layers"), config.get("num_attention_heads")
        if isinstance(layers, int) and isinstance(heads, int):
            pruned = config.get("pruned_heads") or {}
            present = layers * heads - sum(len(v) for v in pruned.values() if isinstance(v, list))
            if present > 0:
                check_etas_remove_heads(args.etas, present, "--etas")
    if getattr(args, "small_t_switch", None) is not None and schedule_file.is_file():
        steps = read_json_object(schedule_file).get("num_train_timesteps")
        if isinstance(steps, int):
            check_time_switch(args.small_t_switch, steps, "--small_t_switch")


def set_num_threads(num_threads: int | None) -> int | None:
    """Choose torch's intra-op threads for this process. An explicit ``--num_threads`` wins; then a user's
    ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` (left to torch); otherwise 1 thread.

    Why 1: the models of this project are small (a few million parameters at most on CPU), and torch's default
    (one thread per core) collapses beside any other busy process: OpenMP threads wait for each other at every
    operation, so 2 threads on 2 cores with one other busy process ran ~50x slower, while 1 thread keeps most of
    its idle speed (``benchmarks/bench_threads.py``, docs/benchmarks.md). Returns the number set, or None.
    """
    import os

    if num_threads is None and any(os.environ.get(name) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")):
        return None  # the user's setting; torch read it at import
    import torch

    threads = num_threads or 1
    torch.set_num_threads(threads)
    return threads


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def _os_error_fix(error: OSError) -> str:
    """The fix for the OS errors a run can meet, appended to the message (our own errors already carry one)."""
    fixes = {errno.ENOSPC: "free disk space (or choose --output_dir on another disk) and run again",
             errno.EDQUOT: "free disk space within your quota and run again",
             errno.EACCES: "choose a folder you can write to", errno.EPERM: "choose a folder you can write to",
             errno.EROFS: "the file system is read-only; choose another --output_dir"}
    fix = fixes.get(error.errno)
    return f"; {fix}." if fix else ""


if __name__ == "__main__":
    sys.exit(main())
