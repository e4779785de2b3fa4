"""Units of work: one (setting, base model) and its runs, in this process or in spawned worker processes.

Each unit seeds its own initial weights, fine-tuning and sampling, so its rows are bit-identical wherever it runs;
only wall time changes. Every finished run is one JSON file written atomically (a rerun skips it).
"""

from __future__ import annotations

import json
import multiprocessing
import os
from concurrent.futures import FIRST_EXCEPTION, ProcessPoolExecutor, wait
from dataclasses import replace
from pathlib import Path

import torch

from ..evaluate import QualityReference
from ..trainer import list_checkpoints
from ..utils import write_text
from .bases import BASE_RECORD, base_folders, prepare_base_model
from .run import BaseContext, execute_run
from .settings import SettingData, base_training_data, load_setting


def run_runs(config, context: BaseContext, runs: list, output_dir: Path, progress=None, on_output=None) -> int:
    """Execute ``runs`` on one base model, each written to its JSON file as soon as it is finished; ``on_output``
    (if given) sees every :class:`~diffusers_memsep.study.run.RunOutput`. Returns the number of runs executed.

    A head score does not depend on eta (Algorithm 1 ranks the heads once and removes the lowest ``floor(eta * H)``),
    so the scores of one (method, seed) are computed once and reused at every eta: the etas of one score prune
    nested sets of heads, and a resumed study recomputes exactly the same scores (same model, same seeded generator).
    """
    for run in runs:
        if progress is not None:
            progress.set_postfix_str(f"{run.setting} base {run.base}: {run.method} eta {run.eta:g} seed {run.seed}")
        output = execute_run(config, run, context)
        write_text(run.path(output_dir), json.dumps(output.row, indent=1))  # one atomic file per finished run
        if on_output is not None:
            on_output(run, output)
        if progress is not None:
            progress.update()
    return len(runs)


def run_unit(config, setting, base: int, unit_runs: list, setting_data: SettingData,
             progress=None) -> tuple[int, bool]:
    """Train (or reload) base model ``base`` of ``setting`` and execute ``unit_runs`` on it. Returns (runs executed,
    whether the base model was trained now)."""
    output_dir = Path(config.output_dir)
    data = base_training_data(setting, output_dir, base, setting_data)
    if progress is not None:
        progress.set_postfix_str(f"{setting.name} base {base}: training")
    model, trained = prepare_base_model(config, setting, base, data)
    quality = QualityReference.build(setting_data.feature_space, setting_data.population.images, data.images,
                                     setting_data.population.source)  # population features: once per base model
    context = BaseContext(setting.name, base, model, data, data, quality)
    return run_runs(config, context, unit_runs, output_dir, progress), trained


def number_of_workers(config, num_units: int) -> int:
    """``config.num_workers``, or by default one process per ``num_threads`` cores available, at most one per unit."""
    if config.num_workers is not None:
        return max(1, min(config.num_workers, num_units))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cores // (config.num_threads or cores), num_units))


def unit_state(config, setting, base: int, todo: list) -> str:
    """``digits8 base 0: training 2500 + 1500 + 0 + 0 (/5000 each)`` (from the checkpoints of its early-stopped run,
    its full model and its weight-decay siblings) or ``... runs 4/21``."""
    folder, early_dir, decay_dirs = base_folders(config, setting, base)
    runs = [r for r in todo if r.setting == setting.name and r.base == base]
    done = sum(r.path(Path(config.output_dir)).is_file() for r in runs)
    if (folder / BASE_RECORD).is_file() or done:
        return f"{setting.name} base {base}: runs {done}/{len(runs)}"
    total = setting.base_train.get("max_train_steps", config.base_train.max_train_steps)
    # The early-stopped run first, then the full model continuing it, then each weight-decay base model.
    folders = [early_dir, folder, *decay_dirs.values()]
    trained = [max((int(c.name.split("-")[-1]) for c in list_checkpoints(f)), default=0) if f.is_dir() else 0
               for f in folders]
    return f"{setting.name} base {base}: training " + " + ".join(f"{steps}" for steps in trained) + f" (/{total} each)"


_WORKER_SETTINGS: dict = {}  # per worker process: the settings it has loaded (from the main process's caches)


def _run_unit_in_worker(config, setting_name: str, base: int, unit_runs: list) -> tuple[int, bool]:
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    setting = next(s for s in config.settings if s.name == setting_name)
    if setting_name not in _WORKER_SETTINGS:
        _WORKER_SETTINGS[setting_name] = load_setting(setting, Path(config.output_dir))
    return run_unit(config, setting, base, unit_runs, _WORKER_SETTINGS[setting_name])


def run_units_in_workers(config, units, todo: list, workers: int, progress) -> tuple[int, int]:
    """The units in ``workers`` spawned processes (one torch thread each by default); progress counts the finished
    run files and its postfix the state of every unit read from disk (workers show no bars of their own: they would
    overwrite each other's lines)."""
    output_dir = Path(config.output_dir)
    quiet = replace(config, show_progress=False)
    before = progress.n
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(_run_unit_in_worker, quiet, setting.name, base,
                               [r for r in todo if r.setting == setting.name and r.base == base])
                   for setting, base in units]
        pending = set(futures)
        while pending:
            _, pending = wait(pending, timeout=5, return_when=FIRST_EXCEPTION)
            progress.n = before + sum(run.path(output_dir).is_file() for run in todo)
            progress.set_postfix_str("; ".join(unit_state(config, setting, base, todo) for setting, base in units))
            failed = [f for f in futures if f.done() and f.exception() is not None]
            if failed:
                for future in pending:
                    future.cancel()
                raise failed[0].exception()  # the finished runs are on disk: a rerun continues from them
    results = [future.result() for future in futures]
    return sum(done for done, _ in results), sum(trained for _, trained in results)
