"""The two entry points of the one engine.

- :func:`prune_pipeline` (``memsep prune``, and ``memsep demo`` after training): the runs of one given pipeline;
  saves the variants of the first seed with their model cards.
- :func:`run_study` (``memsep study``): the same runs on several independently trained base models per setting,
  plus the ``early_stop`` baseline; resumable.

Both plan the runs (:mod:`.plan`), execute each (:mod:`.run`) writing one JSON per run under ``runs/``, compare
(:mod:`.statistics`) and write ``runs.csv``, ``summary.csv``, ``pareto.png`` and ``report.md`` (:mod:`.report`).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..evaluate import QualityReference, feature_space_for, plot_samples_with_nearest
from ..latents import latent_training_data
from ..memorization import FeatureSpace
from ..pipelines import MemSepPipeline
from ..utils import (
    CACHE_FOLDERS,
    check_writable_dir,
    data_fingerprint,
    read_json_object,
    replace_path,
    write_csv,
    write_text,
)
from .bases import BaseModel, base_dir
from .config import PruningStudyConfig, StudyConfig
from .frontier import frontier_lines, frontier_record
from .plan import planned_runs
from .report import plot_pareto, settings_lines, study_report, write_variant_card
from .run import BaseContext, save_variants
from .settings import load_setting
from .statistics import compare, metric_columns
from .workers import number_of_workers, run_runs, run_unit, run_units_in_workers

#: Everything a study writes into its output folder; overwriting an earlier study replaces exactly these.
STUDY_OUTPUTS = ("report.md", "runs.csv", "summary.csv", "frontier.csv", "pareto.png", "samples_nearest.png",
                 "variants", "runs", "prune.json")
#: What :func:`prune_pipeline` records of its input (the content fingerprint of the training set).
PRUNE_RECORD = "prune.json"
#: The key of ``study.json`` holding each setting's content fingerprint (``settings.setting_fingerprint``).
FINGERPRINTS_KEY = "data_fingerprints"
#: The setting name of the rows of :func:`prune_pipeline` (one given pipeline, base model 0).
PIPELINE_SETTING = "pipeline"


@dataclass
class StudyResult:
    rows: list[dict]
    summary: list[dict]
    report_path: Path
    executed_runs: int
    skipped_runs: int = 0
    missing_runs: int = 0
    trained_base_models: int = 0
    seconds: float = 0.0
    variant_dirs: dict | None = None  # prune_pipeline: {variant name: folder}
    evaluations: list | None = None  # prune_pipeline: the first seed's evaluations (samples, nearest images)


def check_study_output_dir(output_dir: str | os.PathLike, overwrite_output_dir: bool = False,
                           pipeline_dir: str | os.PathLike | None = None) -> Path:
    """Refuse, before any work, an output folder a study must not write into (raises ValueError naming the fix).

    Refused: a path that is (or lies under) a file or cannot be written; the input pipeline folder ``pipeline_dir``
    or a folder inside it; a folder whose ``variants/`` holds the input pipeline (a study replaces ``variants/``);
    and, unless ``overwrite_output_dir``, a folder that already holds anything. With ``overwrite_output_dir`` only
    the study's own outputs (:data:`STUDY_OUTPUTS`) are replaced; other content (e.g. ``base/`` of ``memsep demo``)
    is kept.
    """
    output_dir = check_writable_dir(output_dir, "output_dir")
    if pipeline_dir is not None and os.path.isdir(os.path.expanduser(pipeline_dir)):
        pipeline, target = Path(pipeline_dir).expanduser().resolve(), output_dir.resolve()
        if target == pipeline or pipeline in target.parents:
            raise ValueError(f"output_dir {str(output_dir)!r} is the input pipeline folder or inside it; the study "
                             f"would mix its files into the model. Choose another --output_dir (e.g. "
                             f"{str(pipeline.parent / (pipeline.name + '-pruned'))!r}).")
        if target / "variants" in (pipeline, *pipeline.parents):
            raise ValueError(f"the input pipeline {str(pipeline_dir)!r} lies in {str(output_dir / 'variants')!r}, "
                             "which the study replaces; copy the pipeline elsewhere or choose another --output_dir.")
    if output_dir.is_dir() and not overwrite_output_dir:
        contents = sorted(p.name for p in output_dir.iterdir() if p.name not in CACHE_FOLDERS)
        if contents:
            shown = ", ".join(contents[:5]) + (", ..." if len(contents) > 5 else "")
            raise ValueError(f"output_dir {str(output_dir)!r} already holds files ({shown}); pass "
                             "--overwrite_output_dir to replace an earlier study there (only its report, CSVs, "
                             "figures, runs/ and variants/ are replaced), or choose another --output_dir.")
    return output_dir


def prune_pipeline(pipe: MemSepPipeline, data, real_images: torch.Tensor | QualityReference,
                   config: PruningStudyConfig, output_dir: str | Path, base_model_name: str = "a trained DiT",
                   feature_space: FeatureSpace | None = None, population_source: str = "the population",
                   overwrite_output_dir: bool = True, dataset_id: str | None = None,
                   hub_model_id_prefix: str | None = None) -> StudyResult:
    """Every run of ``config`` on ``pipe``: original, finetune_only, each method at each eta (and time-routed with
    ``small_t_switch``), for every seed; then the statistics, report, figures and the first seed's variants.

    ``data`` is the training set (``images``, ``labels``, ``num_classes``): the scores and the fine-tuning use it
    and it is the memorization reference. ``real_images`` is the POPULATION the quality metrics compare with (all
    images of the data source, not the training subset), or a :class:`~diffusers_memsep.evaluate.QualityReference`
    already built from it; ``feature_space`` names the space (default: digits classifier for 8x8 grey images,
    else a small CNN trained on the population), ``population_source`` says in the report where it comes from.

    ``output_dir`` is checked first (:func:`check_study_output_dir`); ``prune.json`` there records the content
    fingerprint of ``data``, and without ``overwrite_output_dir`` a folder holding a prune of other images is
    refused. With ``overwrite_output_dir`` (the default, so that ``memsep demo`` can be re-run into its own folder) an
    earlier study's outputs there are replaced: the files one by one, atomically, and ``runs/`` and ``variants/`` as a
    whole. Nothing else in the folder is touched. Etas that remove no head of the pipeline's transformer and a
    ``small_t_switch`` outside its schedule are refused before any scoring
    (:meth:`~diffusers_memsep.study.config.PruningStudyConfig.check_against_model`).

    Latent DiTs (a pipeline with a VAE): the training images are encoded once (cached in
    ``<output_dir>/latent_cache``) for the scores and the fine-tuning; every evaluated and saved pipeline keeps the
    VAE, so memorization and quality are measured on decoded images in pixel space.

    Model cards: ``base_model_name`` and ``dataset_id`` enter the card's metadata when they are Hub ids; variant
    ``<method>-eta<eta>`` shows the repo ``<hub_model_id_prefix>-<method>-eta<eta>`` in its usage snippet.
    """
    if pipe.reference is None:
        raise ValueError("the pipeline has no training reference; add one with pipe.attach_reference(train_images) "
                         "(or `memsep reference`) so memorization can be measured.")
    fingerprint = check_prune_record(Path(output_dir).expanduser(), data, overwrite_output_dir)
    output_dir = check_study_output_dir(output_dir, overwrite_output_dir)
    config.check_against_model(present_heads(pipe.transformer), int(pipe.scheduler.config.num_train_timesteps))
    train_data = data if pipe.vae is None else latent_training_data(data, pipe.vae, output_dir / "latent_cache")
    quality = real_images if isinstance(real_images, QualityReference) else QualityReference.build(
        feature_space or feature_space_for(real_images), real_images, data.images, population_source)
    context = BaseContext(PIPELINE_SETTING, 0, BaseModel(pipe), data, train_data, quality)
    runs = planned_runs(config, [PIPELINE_SETTING], 1, early_stop=False)
    first_seed, evaluations, variants = config.seeds[0], [], {}

    def keep(run, output):
        if run.seed == first_seed and run.small_t_switch is None and run.condition != "finetune_only":
            evaluations.append(output.evaluation)
            if output.pruned is not None:
                variants[run.variant_name] = output.pruned

    # The runs are written into a staging folder that replaces runs/ only once the variants are saved: an earlier
    # study there stays whole until the new one is complete (a pipeline's runs never resume another's).
    staging = output_dir / ".runs.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        with tqdm(total=len(runs), desc="pruning study runs", disable=not config.show_progress) as progress:
            run_runs(config, context, runs, staging, progress, on_output=keep)
        rows = [read_json_object(run.path(staging), "run file") for run in runs]
        summary = compare(rows)

        def card(folder, name, pruned, final_folder):
            write_variant_card(folder, name, pruned, config, data, summary, base_model_name, quality,
                               dataset_id=dataset_id, latent=pipe.vae is not None,
                               hub_model_id=f"{hub_model_id_prefix}-{name}" if hub_model_id_prefix else None,
                               conditional=pipe.config.get("label_dropout_prob") != 1, final_folder=final_folder)

        variant_dirs = save_variants(pipe, variants if config.save_variants else {}, output_dir, card)
        replace_path(staging / "runs", output_dir / "runs")
        write_text(output_dir / PRUNE_RECORD, json.dumps({"data_fingerprint": fingerprint, "data": data.source,
                                                          "base_model": base_model_name}, indent=1))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    plot_samples_with_nearest(evaluations, data.images, output_dir / "samples_nearest.png")
    space = quality.feature_space
    provenance = ", ".join(f"{k} {v}" for k, v in space.details.items() if v is not None)
    header = settings_lines(config, f"Base model: {base_model_name}. Training set: {data.source} (n = {len(data)}). "
                                    f"Quality: precision/recall (k = 3), {space.frechet_title} and the KID formula "
                                    f"in {space.name}{f' ({provenance})' if provenance else ''}, against "
                                    f"{quality.source} (num_real_images = {quality.num_real_images}), never the "
                                    "training set.")
    report_path = _write_outputs(output_dir, rows, summary, "frechet_distance", study_report(
        "Memorization mitigation by head pruning", header, rows, summary, {},
        "Figures: `pareto.png`, `samples_nearest.png`. Per-run rows: `runs.csv` (one JSON per run under `runs/`); "
        "this analysis: `summary.csv`; variants of the first seed: `variants/`."))
    return StudyResult(rows, summary, report_path, executed_runs=len(runs), variant_dirs=variant_dirs,
                       evaluations=evaluations)


def present_heads(transformer) -> int:
    """The attention heads still in ``transformer`` (a prunable DiT counts its pruned heads out)."""
    if hasattr(transformer, "heads_per_layer"):
        return sum(transformer.heads_per_layer())
    return int(transformer.config.num_layers) * int(transformer.config.num_attention_heads)


def check_prune_record(output_dir: Path, data, overwrite_output_dir: bool) -> str:
    """The content fingerprint of ``data``; refuses (without ``overwrite_output_dir``) a folder whose ``prune.json``
    records a prune of other training images."""
    fingerprint = data_fingerprint(data)
    path = output_dir / PRUNE_RECORD
    if path.is_file() and not overwrite_output_dir:
        stored = read_json_object(path).get("data_fingerprint")
        if stored != fingerprint:
            raise ValueError(f"{str(output_dir)!r} holds a prune of other training images (fingerprint "
                             f"{str(stored)[:12]}... in {str(path)!r}, these are {fingerprint[:12]}...); pass "
                             "--overwrite_output_dir to replace it, or choose another --output_dir.")
    return fingerprint


def run_study(config: StudyConfig) -> StudyResult:
    """Run (or continue) the study and write ``runs.csv``, ``summary.csv``, ``pareto.png`` and ``report.md``.

    Resumable: each finished run is one JSON file under ``<output_dir>/runs/``; a rerun skips finished runs, reuses
    trained base models (``<output_dir>/bases/``) and only runs what is missing. The settings that decide what a
    finished run means are kept in ``study.json``, with the content fingerprint of each setting's images; a rerun
    with other settings, or over images replaced since (same names, other pixels), is refused. Methods, etas, seeds
    and the number of base models may change between runs (more of them adds runs; fewer reports fewer).
    """
    threads = torch.get_num_threads()
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    try:
        return _run_study(config)
    finally:
        torch.set_num_threads(threads)


def _run_study(config: StudyConfig) -> StudyResult:
    start = time.perf_counter()
    output_dir = check_writable_dir(config.output_dir)
    _check_signature(config, output_dir)
    _check_base_dirs(config, output_dir)
    runs = planned_runs(config, [s.name for s in config.settings], config.num_base_models, early_stop=True)
    pending = [run for run in runs if not run.path(output_dir).is_file()]
    todo = pending if config.max_runs is None else pending[: config.max_runs]
    progress = tqdm(total=len(runs), initial=len(runs) - len(pending), desc="study runs",
                    disable=not config.show_progress)
    # Every data set is read (and the colour16 folder written, the feature networks trained and cached) here, before
    # the first training step and before any worker starts: a bad path fails now, not after an hour, and workers
    # only read caches.
    # Images replaced since the study started (same names, other pixels) are refused before anything is trained.
    fingerprints = _recorded_fingerprints(output_dir)
    loaded = {s.name: load_setting(s, output_dir, fingerprints.get(s.name)) for s in config.settings
              if any(r.setting == s.name for r in todo)}
    fingerprints.update({name: setting_data.fingerprint for name, setting_data in loaded.items()})
    write_text(output_dir / "study.json", json.dumps({**config.signature(), FINGERPRINTS_KEY: fingerprints},
                                                     indent=1))
    units = [(setting, base) for setting in config.settings
             for base in sorted({run.base for run in todo if run.setting == setting.name})]
    workers = number_of_workers(config, len(units))
    if workers == 1:
        executed, trained_bases = 0, 0
        for setting, base in units:
            unit_runs = [r for r in todo if r.setting == setting.name and r.base == base]
            done, trained = run_unit(config, setting, base, unit_runs, loaded[setting.name], progress)
            executed, trained_bases = executed + done, trained_bases + trained
    else:
        executed, trained_bases = run_units_in_workers(config, units, todo, workers, progress)
    progress.close()

    rows = [read_json_object(run.path(output_dir), "run file") for run in runs if run.path(output_dir).is_file()]
    summary = compare(rows) if rows else []
    report_path = output_dir / "report.md"
    if rows:
        header = settings_lines(config, f"{len(rows)} of {len(runs)} planned runs finished. Settings: "
                                        f"{', '.join(s.name for s in config.settings)}; {config.num_base_models} base "
                                        "models per setting (subset seed = training seed = base index).")
        header.append(f"Base training: {config.base_train.max_train_steps} steps, batch "
                      f"{config.base_train.train_batch_size}, lr {config.base_train.learning_rate:g} (unless a "
                      f"setting says otherwise). early_stop: `memsep train --stop_at_memorization "
                      f"{config.early_stop_threshold:g}` validating every {config.checkpoint_every} steps "
                      f"({config.curve_num_samples} samples from seeds disjoint from every evaluation); the original "
                      "continues that run to the last step. Remedies: "
                      + ", ".join([f"weight decay {w:g} while training" for w in config.weight_decays]
                                  + ([f"copy-free sampling (`avoid_copies=True, max_resamples="
                                      f"{config.max_resamples}`; `(check)`: `copy_check_at={config.copy_check_at:g}`)"]
                                     if config.copy_free else [])) + ".")
        remedies = {setting.name: frontier_lines(rows, summary, setting.name, config.quality_metric,
                                                 config.num_inference_steps) for setting in config.settings}
        _write_outputs(output_dir, rows, summary, config.quality_metric, study_report(
            "Replicated pruning study and remedies", header, rows, summary, _setting_lines(config, output_dir),
            "Figure: `pareto.png` (frontier conditions ringed). Per-run rows: `runs.csv` (one JSON per run under "
            "`runs/`); this analysis: `summary.csv`; the frontier and budgets: `frontier.csv`.", remedies),
            frontier=True)
    return StudyResult(rows, summary, report_path, executed, len(runs) - len(pending), len(runs) - len(rows),
                       trained_bases, time.perf_counter() - start)


def _write_outputs(output_dir: Path, rows: list[dict], summary: list[dict], quality_metric: str, report: str,
                   frontier: bool = False) -> Path:
    if quality_metric not in metric_columns(rows):
        raise ValueError(f"quality_metric {quality_metric!r} is not a metric column of the runs "
                         f"({', '.join(metric_columns(rows))}); rerun with one of them (finished runs are kept).")
    write_csv(rows, output_dir / "runs.csv")
    write_csv(summary, output_dir / "summary.csv")
    marked = None
    if frontier:
        records = frontier_record(rows, summary, quality_metric)
        write_csv(records, output_dir / "frontier.csv")
        marked = {(r["setting"], r["method"], r["eta"]) for r in records if r["frontier"]}
    plot_pareto(summary, output_dir / "pareto.png", quality_metric, frontier=marked)
    return write_text(output_dir / "report.md", report)


def _setting_lines(config: StudyConfig, output_dir: Path) -> dict[str, list[str]]:
    """Per setting: its training recipe and each base model's early-stopped run (its validations, the kept step and
    the step it stopped at) and training times."""
    lines = {}
    for setting in config.settings:
        train = {**{"max_train_steps": config.base_train.max_train_steps,
                    "learning_rate": config.base_train.learning_rate}, **setting.base_train}
        lines[setting.name] = [f"{setting.num_train_samples} training images per base model; base training "
                               f"{train['max_train_steps']} steps, lr {train['learning_rate']:g}.", "",
                               "Base models (memorization ratio at each validation of the early-stopped run; the "
                               "step whose weights it kept; where it stopped):", ""]
        for base in range(config.num_base_models):
            curve_path = base_dir(output_dir, setting, base) / "memorization_curve.json"
            if curve_path.is_file():
                curve = read_json_object(curve_path)
                points = ", ".join(f"{s}: {r:.2f}" for s, r in zip(curve["steps"], curve["memorization_ratio"]))
                note = f" ({curve['note']})" if curve.get("note") else ""
                stopped = f", stopped at step {curve['stopped_step']}" if curve.get("stopped_step") else ""
                decays = "; ".join(f"weight decay {w}: {d['train_seconds']:.0f} s"
                                   for w, d in curve.get("weight_decays", {}).items())
                lines[setting.name].append(
                    f"- base {base}: {points}; early stop at step {curve['early_stop_step']}{stopped}{note}; "
                    f"trained in {curve['train_seconds']:.0f} s (early-stopped run and its continuation)"
                    + (f"; {decays}" if decays else "") + ".")
    return lines


def _check_signature(config: StudyConfig, output_dir: Path) -> None:
    path = output_dir / "study.json"
    signature = config.signature()
    if path.is_file():
        stored = read_json_object(path)
        stored.pop(FINGERPRINTS_KEY, None)  # compared while the data is loaded (settings.load_setting)
        if stored != signature:
            changed = sorted(k for k in set(stored) | set(signature) if stored.get(k) != signature.get(k))
            raise ValueError(f"{str(output_dir)!r} holds a study with other settings ({', '.join(changed)}); rerun "
                             "with the same settings to continue it, or choose another --output_dir.")



def _check_base_dirs(config: StudyConfig, output_dir: Path) -> None:
    """Every base model folder lies inside ``output_dir`` (``bases/`` linked elsewhere is refused before any work;
    the run files are checked as the plan looks for them)."""
    for setting in config.settings:
        for base in range(config.num_base_models):
            base_dir(output_dir, setting, base)


def _recorded_fingerprints(output_dir: Path) -> dict[str, str]:
    """The content fingerprint of each setting recorded in ``study.json`` (none before the first run)."""
    path = output_dir / "study.json"
    recorded = read_json_object(path).get(FINGERPRINTS_KEY) if path.is_file() else None
    return dict(recorded) if isinstance(recorded, dict) else {}
