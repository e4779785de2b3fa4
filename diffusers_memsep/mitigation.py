"""The mitigation study: prune a trained pipeline by several methods and etas, fine-tune, evaluate beside the
original and the random baseline on the same seeds, and write variants, cards, report, CSV and figures.

Used by ``memsep prune`` / ``training/prune_dit.py`` (from a pipeline folder or Hub id) and by ``memsep demo``.

Seeds. For seed ``s``, the scores (random ones included) use generator seed ``s``, the fine-tuning uses
``TrainingConfig.seed = s`` and the evaluation samples with seed ``1000 * s``: the original model is sampled with
the same seeds, so each pruned row has a paired original row. Every variant of a given seed starts from the same
noise. Variant folders are saved for the first seed.

Latent DiTs (a pipeline with a VAE, e.g. a stock ``DiTPipeline`` checkpoint). The training images are encoded once
(:func:`diffusers_memsep.latents.latent_training_data`, cached in ``<output_dir>/latent_cache``) and every method,
eta and seed scores and fine-tunes on those latents; every evaluated and saved pipeline keeps the VAE, so
memorization and quality are measured on decoded images in pixel space, against the pixel-space reference.

Time-routed sampling (beyond the paper). With ``small_t_switch = s`` each pruned model also gets a row in which the
ORIGINAL model denoises steps ``t >= s`` and the pruned one only ``t < s`` (``MemSepPipeline.small_t_transformer``).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from diffusers import DDIMScheduler, DDPMScheduler
from tqdm.auto import tqdm

from .evaluate import (
    EvaluationResult,
    QualityReference,
    balanced_labels,
    evaluate_pipeline,
    feature_space_for,
    markdown_table,
    plot_memorization_vs_quality,
    plot_samples_with_nearest,
    summarize,
)
from .hub import save_model_card
from .latents import latent_training_data
from .memorization import FeatureSpace
from .pipelines import MemSepPipeline
from .pruning import METHODS, one_shot_prune
from .pruning.importance import SMALL_TIME, UNIFORM_TIME
from .trainer import TrainingConfig
from .utils import CACHE_FOLDERS, check_writable_dir, replace_path, write_csv, write_text

METHOD_TITLES = {
    "original": "original (unpruned)",
    "finetune_only": "fine-tuned only, no head removed (the control)",
    "memorization_gap": "memorization gap: small-t loss rise on training minus held-out images (beyond the paper)",
    "small_t": "small-t gradient importance (Algorithm 2, Beta(0.8, 2))",
    "uniform_t": "gradient importance, uniform t (Algorithm 2 without the small-time focus)",
    "ablation": "drop-one-head loss increase at small t",
    "random": "random pruning (baseline)",
    "small_t_top": "small-t gradient importance, MOST important heads removed (beyond the paper)",
}
SAMPLERS = ("ddpm", "ddim")
#: Everything a study writes into its output folder; overwriting an earlier study replaces exactly these.
STUDY_OUTPUTS = ("report.md", "runs.csv", "summary.csv", "memorization_vs_quality.png", "samples_nearest.png",
                 "variants")


@dataclass
class PruningStudyConfig:
    """Settings of :func:`run_pruning_study` (the flags of ``memsep prune`` have the same names)."""

    methods: tuple[str, ...] = ("small_t", "random")
    etas: tuple[float, ...] = (0.2,)
    seeds: tuple[int, ...] = (0, 1, 2)
    finetune: TrainingConfig = field(default_factory=lambda: TrainingConfig(max_train_steps=300, show_progress=False))
    importance_batches: int = 16
    importance_batch_size: int = 64
    num_samples: int = 256
    num_quality_samples: int | None = None  # samples for precision/recall, Frechet distance, KID (None: num_samples)
    num_inference_steps: int = 100
    sampler: str = "ddpm"
    small_t_switch: int | None = None
    save_variants: bool = True
    finetune_only: bool = True  # the control: the same fine-tuning with no head removed (eta 0), one row per seed

    def __post_init__(self):
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise ValueError(f"unknown pruning method(s) {unknown}; choose from {', '.join(METHODS)}.")
        for eta in self.etas:
            if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0 < eta < 1:
                raise ValueError(f"eta must lie in (0, 1), got {eta!r} (0.2 prunes 20% of the heads).")
        if not self.seeds:
            raise ValueError("give at least one seed.")
        if self.sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.sampler!r}.")
        if self.num_inference_steps < 1 or self.num_samples < 2:
            raise ValueError("num_inference_steps must be >= 1 and num_samples >= 2.")
        if self.num_quality_samples is not None and self.num_quality_samples < 4:
            raise ValueError(f"num_quality_samples must be >= 4 (precision/recall use k = 3), got "
                             f"{self.num_quality_samples}.")

    @property
    def quality_samples(self) -> int:
        return self.num_quality_samples or self.num_samples


@dataclass
class PruningStudyResult:
    rows: list[dict]
    summary: list[dict]
    report_path: Path
    variant_dirs: dict[str, Path]
    evaluations: list[EvaluationResult]


def sampling_scheduler(pipe: MemSepPipeline, sampler: str):
    """The evaluation sampler, built from the pipeline's (training) scheduler config."""
    return (DDPMScheduler if sampler == "ddpm" else DDIMScheduler).from_config(pipe.scheduler.config)


def training_scheduler(pipe: MemSepPipeline) -> DDPMScheduler:
    """The DDPM scheduler of training (same betas), whatever sampler the pipeline was saved with."""
    return DDPMScheduler.from_config(pipe.scheduler.config)


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
                             "figures and variants/ are replaced), or choose another --output_dir.")
    return output_dir


def run_pruning_study(pipe: MemSepPipeline, data, real_images: torch.Tensor | QualityReference,
                      config: PruningStudyConfig, output_dir: str | Path, base_model_name: str = "a trained DiT",
                      extra_rows: list[dict] | None = None, feature_space: FeatureSpace | None = None,
                      population_source: str = "the population", overwrite_output_dir: bool = True,
                      dataset_id: str | None = None, hub_model_id_prefix: str | None = None) -> PruningStudyResult:
    """Prune ``pipe.transformer`` by every method, eta and seed; evaluate; write everything under ``output_dir``.

    ``data`` is the training set (``images``, ``labels``, ``num_classes``): the scores and the fine-tuning use it
    and it is the memorization reference. ``real_images`` is the POPULATION the quality metrics compare with (all
    images of the data source, not the training subset), or a :class:`~diffusers_memsep.evaluate.QualityReference`
    already built from it; ``feature_space`` names the space (default: digits classifier for 8x8 grey images,
    else a small CNN trained on the population), ``population_source`` says in the report where it comes from.

    ``output_dir`` is checked first (:func:`check_study_output_dir`). With ``overwrite_output_dir`` (the default,
    so that ``memsep demo`` can be re-run into its own folder) an earlier study's outputs there are replaced: the
    files one by one, atomically, and ``variants/`` as a whole (no stale variant of an earlier run survives);
    ``memsep prune`` passes ``--overwrite_output_dir``, False by default. Nothing else in the folder is touched.

    Model cards: ``base_model_name`` and ``dataset_id`` enter the card's metadata when they are Hub ids; variant
    ``<method>-eta<eta>`` shows the repo ``<hub_model_id_prefix>-<method>-eta<eta>`` in its usage snippet (its own
    folder without a prefix).
    """
    if pipe.reference is None:
        raise ValueError("the pipeline has no training reference; add one with pipe.attach_reference(train_images) "
                         "(or `memsep reference`) so memorization can be measured.")
    output_dir = check_study_output_dir(output_dir, overwrite_output_dir)
    train_scheduler = training_scheduler(pipe)
    # A latent DiT scores and fine-tunes on the VAE latents of the training images, encoded once for every run.
    train_data = data if pipe.vae is None else latent_training_data(data, pipe.vae, output_dir / "latent_cache")

    def pipeline_like(transformer, scheduler, **components):
        """A MemSepPipeline with ``pipe``'s VAE, reference, class names and label dropout."""
        return MemSepPipeline(transformer=transformer, scheduler=scheduler, vae=pipe.vae, reference=pipe.reference,
                              label_dropout_prob=pipe.config.get("label_dropout_prob"),
                              id2label=pipe.config.get("id2label"), **components)

    eval_pipe = pipeline_like(pipe.transformer, sampling_scheduler(pipe, config.sampler))
    eval_pipe.set_progress_bar_config(disable=True)
    labels = balanced_labels(max(config.num_samples, config.quality_samples), data.num_classes)
    quality = real_images if isinstance(real_images, QualityReference) else QualityReference.build(
        feature_space or feature_space_for(real_images), real_images, data.images, population_source)
    evaluate = lambda p, name, seed: evaluate_pipeline(  # noqa: E731
        p, name, data.images, quality, num_samples=config.num_samples, num_quality_samples=config.quality_samples,
        num_inference_steps=config.num_inference_steps, seed=1000 * seed, class_labels=labels)

    rows, evaluations, variant_dirs, first_models = list(extra_rows or []), [], {}, {}
    runs = [(seed, method, eta) for seed in config.seeds for eta in config.etas for method in config.methods]
    progress = tqdm(total=len(config.seeds) * (2 if config.finetune_only else 1) + len(runs), desc="pruning study")
    for seed in config.seeds:
        result = evaluate(eval_pipe, "original", seed)
        rows.append({**result.row(), "method": "original", "eta": 0.0, "seed": seed, "pruned_heads": 0})
        if seed == config.seeds[0]:
            evaluations.append(result)
        progress.update()
        if config.finetune_only:  # the control: how much of a pruned row's change is the fine-tuning alone
            tuned = one_shot_prune(pipe.transformer, train_data, train_scheduler, eta=0.0, method="random",
                                   finetune_config=replace(config.finetune, seed=seed),
                                   generator=torch.Generator().manual_seed(seed))
            variant = pipeline_like(tuned.model, eval_pipe.scheduler)
            variant.set_progress_bar_config(disable=True)
            result = evaluate(variant, "finetune_only", seed)
            rows.append({**result.row(), "method": "finetune_only", "eta": 0.0, "seed": seed, "pruned_heads": 0})
            progress.update()
        for method, eta in [(m, e) for (s, m, e) in runs if s == seed]:
            finetune = replace(config.finetune, seed=seed)
            pruned = one_shot_prune(pipe.transformer, train_data, train_scheduler, eta=eta, method=method,
                                    finetune_config=finetune, num_batches=config.importance_batches,
                                    batch_size=config.importance_batch_size,
                                    generator=torch.Generator().manual_seed(seed))
            name = f"{method}-eta{eta:g}"
            variant = pipeline_like(pruned.model, eval_pipe.scheduler)
            variant.set_progress_bar_config(disable=True)
            result = evaluate(variant, name, seed)
            num_pruned = sum(len(h) for h in pruned.pruned_heads.values())
            rows.append({**result.row(), "method": method, "eta": eta, "seed": seed, "pruned_heads": num_pruned})
            if seed == config.seeds[0]:
                evaluations.append(result)
                first_models[(method, eta)] = pruned
            if config.small_t_switch is not None:
                routed = pipeline_like(pipe.transformer, eval_pipe.scheduler, small_t_transformer=pruned.model,
                                       small_t_switch=config.small_t_switch)
                routed.set_progress_bar_config(disable=True)
                result = evaluate(routed, f"{name}+routed", seed)
                rows.append({**result.row(), "method": f"{method}+routed(t<{config.small_t_switch})", "eta": eta,
                             "seed": seed, "pruned_heads": num_pruned})
            progress.update()
    progress.close()

    summary = summarize(rows)
    # Variants are written into a temporary folder that then replaces variants/ as a whole: an interrupted save
    # leaves the earlier variants/ as it was, and no variant of an earlier run survives beside the new ones.
    variants_dir, staging = output_dir / "variants", output_dir / ".variants.tmp"
    try:
        if config.save_variants and first_models:
            shutil.rmtree(staging, ignore_errors=True)
            for (method, eta), pruned in first_models.items():
                name = f"{method}-eta{eta:g}"
                variant = pipeline_like(pruned.model, pipe.scheduler)
                variant.save_pretrained(staging / name, safe_serialization=True)
                hub_model_id = f"{hub_model_id_prefix}-{name}" if hub_model_id_prefix else None
                write_variant_card(staging / name, method, eta, pruned, config, data, summary, base_model_name,
                                   quality, dataset_id=dataset_id, hub_model_id=hub_model_id,
                                   latent=pipe.vae is not None,
                                   conditional=pipe.config.get("label_dropout_prob") != 1,
                                   final_folder=variants_dir / name)
                variant_dirs[name] = variants_dir / name
            replace_path(staging, variants_dir)
        elif variants_dir.is_dir():
            shutil.rmtree(variants_dir)  # an earlier study's variants would not match the new report
    finally:
        shutil.rmtree(staging, ignore_errors=True)

    write_csv(rows, output_dir / "runs.csv")
    write_csv(summary, output_dir / "summary.csv")
    plot_memorization_vs_quality(summary, output_dir / "memorization_vs_quality.png",
                                 quality.feature_space.frechet_title)
    plot_samples_with_nearest(evaluations, data.images, output_dir / "samples_nearest.png")
    report_path = output_dir / "report.md"
    write_text(report_path, study_report(summary, config, data, quality, base_model_name))
    return PruningStudyResult(rows=rows, summary=summary, report_path=report_path, variant_dirs=variant_dirs,
                              evaluations=evaluations)


TABLE_COLUMNS = [("method", "method"), ("eta", "eta"), ("runs", "runs"),
                 ("memorization_ratio", "memorized (pixels)"), ("memorization_ratio_features", "memorized_features"),
                 ("precision", "precision"), ("recall", "recall"), ("frechet_distance", "Frechet distance"),
                 ("kid", "KID formula"), ("num_parameters", "parameters"), ("sampling_seconds", "sampling s")]


def study_report(summary: list[dict], config: PruningStudyConfig, data, quality: QualityReference,
                 base_model_name: str) -> str:
    """``report.md``: settings, the table (mean +- std over seeds), and the relative changes against the original."""
    original = next((row for row in summary if row["method"] == "original"), None)
    space = quality.feature_space
    provenance = ", ".join(f"{k} {v}" for k, v in space.details.items() if v is not None)
    lines = [
        "# Memorization mitigation by head pruning",
        "",
        f"Base model: {base_model_name}. Training set: {data.source} (n = {len(data)}).",
        f"Sampler: {config.sampler.upper()} with {config.num_inference_steps} steps, {config.num_samples} samples per "
        f"row and seed for memorization, {config.quality_samples} for quality, seeds {list(config.seeds)} (same "
        "noise for every row of a seed).",
        f"Pruning: eta in {list(config.etas)}; importance from {config.importance_batches} batches of "
        f"{config.importance_batch_size}; fine-tuning {config.finetune.max_train_steps} steps at lr "
        f"{config.finetune.learning_rate:g}, weight decay {config.finetune.adam_weight_decay:g}, EMA "
        f"{'on' if config.finetune.use_ema else 'off'}.",
        f"Time laws: small_t = {SMALL_TIME} and uniform_t = {UNIFORM_TIME} on normalised time (fraction of the "
        "training timesteps, 0 = no noise).",
        f"Quality: precision/recall (k = 3), {space.frechet_title} and the KID formula (unbiased MMD^2, cubic "
        f"polynomial kernel, Binkowski et al. 2018; se = standard error over 100 subsets) in {space.name}"
        f"{f' ({provenance})' if provenance else ''}, against {quality.source} (num_real_images = "
        f"{quality.num_real_images}), never against the training subset.",
        "Memorization: `memorized` is the paper's rule ||x - x_(1)||^2 <= (1/9) ||x - x_(2)||^2 against the training "
        f"set in pixel space; `memorized_features` is the same rule in {space.name} (beyond the paper).",
        "Every metric shows mean +- std over the seeds when there are several.",
        "",
        markdown_table(summary, TABLE_COLUMNS),
        "",
    ]
    if original is not None:
        lines += ["Change against the original (mean over seeds):", ""]
        for row in summary:
            if row["method"] == "original":
                continue
            memorization = _relative(row["memorization_ratio"], original["memorization_ratio"])
            frechet = _relative(row["frechet_distance"], original["frechet_distance"])
            kid = _relative(row["kid"], original["kid"])
            lines.append(f"- {row['method']} (eta={row['eta']:g}): memorization {memorization}, Frechet distance "
                         f"{frechet}, KID formula {kid}.")
        lines.append("")
    lines += ["Figures: `memorization_vs_quality.png`, `samples_nearest.png`. Per-run rows: `runs.csv`; this table: "
              "`summary.csv`.", ""]
    return "\n".join(lines)


def _relative(value: float, reference: float) -> str:
    if reference == 0:
        return f"{value:.3f} (original 0)"
    return f"{100 * (value - reference) / reference:+.1f}% ({reference:.3f} -> {value:.3f})"


def write_variant_card(folder: Path, method: str, eta: float, pruned, config: PruningStudyConfig, data,
                       summary: list[dict], base_model_name: str, quality: QualityReference,
                       dataset_id: str | None = None, hub_model_id: str | None = None, latent: bool = False,
                       conditional: bool | None = None, final_folder: Path | None = None) -> None:
    """The pruned variant's model card: settings, and the before/after table with the random baseline.

    ``final_folder`` is where the variant will live (its usage snippet names it) when ``folder`` is a staging copy.
    """
    metrics = []
    for row in summary:
        if row["method"] not in ("original", "finetune_only", "random", method):
            continue
        entry = {"model": "original" if row["method"] == "original" else f"{row['method']}-eta{row['eta']:g}",
                 "method": METHOD_TITLES.get(row["method"], row["method"]), "eta": row["eta"] or None,
                 "num_parameters": int(row["num_parameters"]) if row.get("num_parameters") else None,
                 "sampling_seconds": row.get("sampling_seconds")}
        for card_key, column in (("memorization", "memorization_ratio"),
                                 ("memorization_features", "memorization_ratio_features"),
                                 ("precision", "precision"), ("recall", "recall"), ("fd", "frechet_distance"),
                                 ("kid", "kid")):
            entry[card_key], entry[card_key + "_std"] = row.get(column), row.get(column + "_std")
        entry["kid_se"] = row.get("kid_se")
        metrics.append(entry)
    own = next(row for row in summary if row["method"] == method and row["eta"] == eta)
    model_name = f"dit-{method}-eta{eta:g}"
    time_law = {"small_t": str(SMALL_TIME), "uniform_t": str(UNIFORM_TIME), "ablation": str(SMALL_TIME),
                "small_t_top": str(SMALL_TIME)}.get(method)
    space = quality.feature_space
    save_model_card(
        folder, "pruned_variant",
        metadata={"model_name": model_name, "license": "apache-2.0", "base_model": base_model_name,
                  "datasets": [dataset_id] if dataset_id else []},
        eval_results=[{"metric_type": "memorization_ratio", "metric_name": "Memorization ratio (1/3 rule)",
                       "metric_value": round(own["memorization_ratio"], 4), "dataset_name": data.source,
                       "dataset_type": dataset_id},
                      {"metric_type": "frechet_distance", "metric_name": space.frechet_title,
                       "metric_value": round(own["frechet_distance"], 4), "dataset_name": quality.source,
                       "dataset_type": dataset_id},
                      {"metric_type": "kid", "metric_name": f"KID formula in {space.name}",
                       "metric_value": round(own["kid"], 6), "dataset_name": quality.source,
                       "dataset_type": dataset_id}],
        model_name=model_name, base_model=base_model_name, method=METHOD_TITLES.get(method, method), eta=eta,
        num_pruned_heads=sum(len(h) for h in pruned.pruned_heads.values()),
        num_heads=sum(pruned.model.heads_per_layer()) + sum(len(h) for h in pruned.pruned_heads.values()),
        pruned_heads={str(k): v for k, v in pruned.pruned_heads.items()},
        time_distribution=(f"{time_law} on t / T" if time_law else "none (random scores)"),
        finetune_steps=config.finetune.max_train_steps, num_train_images=len(data), dataset_source=data.source,
        metrics=metrics, num_seeds=len(config.seeds),
        sampler=f"{config.sampler.upper()} {config.num_inference_steps} steps",
        num_classes=(pruned.model.config.num_embeds_ada_norm
                     if (data.labels is not None if conditional is None else conditional) else None),
        hub_model_id=hub_model_id, local_folder=str(Path(final_folder or folder).resolve()),
        latent=latent,
        feature_space=space.name, frechet_title=space.frechet_title, num_real_images=quality.num_real_images,
        population_source=quality.source, num_samples=config.num_samples, num_quality_samples=config.quality_samples,
    )
