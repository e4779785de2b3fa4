"""What a study writes for people: ``report.md`` (settings, tables of means, paired differences with verdicts),
``pareto.png`` (memorization against quality), ``samples_nearest.png`` and the model card of each saved variant."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # figures are files; never open a window (a worker process has no display)
import matplotlib.pyplot as plt  # noqa: E402

from ..hub import save_model_card  # noqa: E402
from ..pruning.importance import SMALL_TIME, UNIFORM_TIME  # noqa: E402
from ..utils import save_figure  # noqa: E402
from .plan import weight_decay_name  # noqa: E402
from .statistics import CONTROLS, HIGHER_IS_BETTER, metric_columns, table_size  # noqa: E402

METHOD_TITLES = {
    "original": "original (unpruned)",
    "finetune_only": "fine-tuned only, no head removed (the control)",
    "early_stop": "the base model's checkpoint before memorization starts (the free baseline)",
    "memorization_gap": "memorization gap: small-t loss rise on training minus held-out images (beyond the paper)",
    "small_t": "small-t gradient importance (Algorithm 2, Beta(0.8, 2))",
    "uniform_t": "gradient importance, uniform t (Algorithm 2 without the small-time focus)",
    "ablation": "drop-one-head loss increase at small t",
    "random": "random pruning (baseline)",
    "small_t_top": "small-t gradient importance, MOST important heads removed (beyond the paper)",
}


def settings_lines(config, data_line: str) -> list[str]:
    """The report's header: what every run of the table did."""
    finetune = config.finetune
    return [
        data_line,
        f"Runs per base model: original, finetune_only{_remedy_names(config)} and every method at its etas "
        f"({', '.join(config.methods)}; eta in {list(config.etas)}), seeds {list(config.seeds)} (run seed s "
        "evaluates from sampling seed 1000 s: the same noise and labels for every condition of a seed).",
        f"Pruning: importance from {config.importance_batches} batches of {config.importance_batch_size} (small_t = "
        f"{SMALL_TIME}, uniform_t = {UNIFORM_TIME} on normalised time); fine-tuning {finetune.max_train_steps} steps, "
        f"batch {finetune.train_batch_size}, lr {finetune.learning_rate:g}, weight decay "
        f"{finetune.adam_weight_decay:g}, EMA {'on' if finetune.use_ema else 'off'}.",
        f"Evaluation: {config.sampler.upper()} {config.num_inference_steps} steps, {config.num_samples} samples for "
        f"memorization and {config.quality_samples} for quality per run. `memorization_ratio`: the paper's rule "
        "||x - x_(1)||^2 <= (1/9) ||x - x_(2)||^2 against the training set in pixel space; "
        "`memorization_ratio_features`: the same rule in the quality feature space (beyond the paper); non-finite "
        "samples are neither copies nor non-copies (left out, counted in `num_nonfinite` of runs.csv).",
        "Intervals: 95% Student t on the means and on the paired differences over (base model x seed) pairs; pairs "
        "of one base model share it, so the intervals are somewhat optimistic. Verdicts: Holm-Bonferroni over the K "
        "comparisons of each table (family-wise level 5%); a higher precision where the row also copies more reads "
        "\"higher, with more copies\" (copies inflate precision).",
    ]


def _remedy_names(config) -> str:
    """``, early_stop, weight_decay=1, ...`` for a study (its baseline and remedies); empty for ``memsep prune``."""
    if not hasattr(config, "weight_decays"):
        return ""
    names = ["early_stop", *(weight_decay_name(w) for w in config.weight_decays)]
    if config.copy_free:
        names += ["original+copy_free", "original+copy_free(check)", "early_stop+copy_free",
                  *(f"{weight_decay_name(w)}+copy_free" for w in config.weight_decays),
                  *(f"{m}+copy_free" for m in config.methods if m in config.copy_free_methods)]
    return ", " + ", ".join(names)


def _interval(entry, key, sign: str = "+") -> str:
    """``mean [low, high]`` (signed for differences: ``sign="+"``; plain for means: ``sign=""``)."""
    low, high = entry.get(key + "_low", math.nan), entry.get(key + "_high", math.nan)
    if math.isnan(low):
        return f"{entry[key]:{sign}.3f} (n < 2)"
    return f"{entry[key]:{sign}.3f} [{low:{sign}.3f}, {high:{sign}.3f}]"


def study_report(title: str, header: list[str], rows: list[dict], summary: list[dict],
                 setting_lines: dict[str, list[str]], footer: str,
                 setting_footers: dict[str, list[str]] | None = None) -> str:
    """``report.md``: ``header``; per setting its ``setting_lines``, the table of means, one table of paired
    differences per control (with K, the number of its comparisons), the verdicts and its ``setting_footers``
    (a study's remedies and frontier)."""
    metrics = metric_columns(rows)
    means = sum(not math.isnan(entry[f"{m}_low"]) for entry in summary for m in metrics)
    paired = sum(table_size(summary, setting, control) for setting in dict.fromkeys(r["setting"] for r in summary)
                 for control in CONTROLS)
    lines = [f"# {title}", "", *header,
             f"This report shows {means + paired} intervals: {means} of means (no verdict) and {paired} of paired "
             "differences (verdicts, Holm-Bonferroni within each table; K per table below).", ""]
    for setting in dict.fromkeys(r["setting"] for r in summary):
        setting_rows = [r for r in summary if r["setting"] == setting]
        lines += [f"## {setting}", "", *setting_lines.get(setting, []), "",
                  "| method | eta | runs | " + " | ".join(metrics) + " |", "|---|---|---|" + "---|" * len(metrics)]
        for entry in setting_rows:
            cells = [_interval(entry, m, sign="") for m in metrics]
            lines.append(f"| {entry['method']} | {entry['eta']:g} | {entry['runs']} | " + " | ".join(cells) + " |")
        for control in CONTROLS:
            compared = [e for e in setting_rows if f"vs_{control}_memorization_ratio" in e]
            if not compared:
                continue
            lines += ["", f"Paired difference (method - {control}), mean [95% t-interval], verdict (Holm-Bonferroni "
                      f"over the K = {table_size(summary, setting, control)} comparisons of this table):", "",
                      "| method | eta | pairs | " + " | ".join(metrics) + " |",
                      "|---|---|---|" + "---|" * len(metrics)]
            for entry in compared:
                cells = [f"{_interval(entry, f'vs_{control}_{m}')} {entry[f'vs_{control}_{m}_verdict']}"
                         for m in metrics]
                lines.append(f"| {entry['method']} | {entry['eta']:g} | "
                             f"{entry[f'vs_{control}_memorization_ratio_pairs']} | " + " | ".join(cells) + " |")
        lines += ["", "Verdicts (against random at the same eta; against finetune_only; against early_stop):", ""]
        for entry in setting_rows:
            parts = [f"vs {control}: " + "; ".join(f"{m} {entry[f'vs_{control}_{m}_verdict']}" for m in metrics)
                     for control in CONTROLS if f"vs_{control}_memorization_ratio" in entry]
            if parts:
                lines.append(f"- {entry['method']} (eta {entry['eta']:g}): " + " | ".join(parts))
        lines += [*(setting_footers or {}).get(setting, []), ""]
    return "\n".join([*lines, footer, ""])


def plot_pareto(summary: list[dict], path, quality_metric: str = "frechet_distance",
                frontier: set | None = None) -> None:
    """Per setting: memorization ratio (x) against quality (y), each method a curve over eta with 95% interval
    bars; every condition without an eta (baselines, remedies) a single point; the ``frontier`` entries
    ``(setting, method, eta)`` ringed."""
    settings = list(dict.fromkeys(row["setting"] for row in summary))
    figure, axes = plt.subplots(1, len(settings), figsize=(6.2 * len(settings), 4.8), squeeze=False)
    single = ["*", "s", "D", "P", "X", "v", "^", "<", ">", "h", "p"]
    points = list(dict.fromkeys(r["method"] for r in summary if not r["eta"]))
    markers = {method: single[i % len(single)] for i, method in enumerate(points)}
    for axis, setting in zip(axes[0], settings):
        rows = [r for r in summary if r["setting"] == setting and quality_metric in r]
        for method in dict.fromkeys(r["method"] for r in rows):
            curve = sorted((r for r in rows if r["method"] == method), key=lambda r: r["eta"])
            x = [r["memorization_ratio"] for r in curve]
            y = [r[quality_metric] for r in curve]
            style = dict(fmt=markers.get(method, "o") + ("" if method in markers else "-"), capsize=3,
                         markersize=9 if method in markers else 5, label=method)
            axis.errorbar(x, y, xerr=_error_bars(curve, "memorization_ratio"),
                          yerr=_error_bars(curve, quality_metric), **style)
            if method not in markers:
                for r in curve:
                    axis.annotate(f"{r['eta']:g}", (r["memorization_ratio"], r[quality_metric]), fontsize=7,
                                  xytext=(3, 3), textcoords="offset points")
        ringed = [r for r in rows if frontier and (setting, r["method"], r["eta"]) in frontier]
        if ringed:
            axis.scatter([r["memorization_ratio"] for r in ringed], [r[quality_metric] for r in ringed], s=220,
                         facecolors="none", edgecolors="black", linewidths=1.2, label="frontier", zorder=5)
        axis.set_xlabel("memorization ratio (lower: less copying)")
        direction = "higher" if quality_metric in HIGHER_IS_BETTER else "lower"
        values = [r[quality_metric] for r in rows if r[quality_metric] > 0]
        log = bool(values) and max(values) > 5 * min(values)  # one far-off condition must not flatten the rest
        if log:
            axis.set_yscale("log")
        axis.set_ylabel(f"{quality_metric} ({direction} is better{', log scale' if log else ''})")
        axis.set_title(f"{setting}: mean and 95% t-interval over base models x seeds; labels: eta", fontsize=9)
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    save_figure(figure, path)


def _error_bars(rows, metric):
    lows = [0.0 if math.isnan(r[f"{metric}_low"]) else r[metric] - r[f"{metric}_low"] for r in rows]
    highs = [0.0 if math.isnan(r[f"{metric}_high"]) else r[f"{metric}_high"] - r[metric] for r in rows]
    return [lows, highs]


def write_variant_card(folder: Path, name: str, pruned, config, data, summary: list[dict], base_model_name: str,
                       quality, dataset_id: str | None = None, hub_model_id: str | None = None, latent: bool = False,
                       conditional: bool | None = None, final_folder: Path | None = None) -> None:
    """The pruned variant's model card: settings, and the before/after table with the controls and random pruning.

    ``final_folder`` is where the variant will live (its usage snippet names it) when ``folder`` is a staging copy.
    """
    method, eta = name.rsplit("-eta", 1)[0], float(name.rsplit("-eta", 1)[1])
    metrics = []
    for row in summary:
        if row["method"] not in ("original", "finetune_only", "random", method):
            continue
        entry = {"model": row["method"] if row["method"] in METHOD_TITLES and not row["eta"]
                 else f"{row['method']}-eta{row['eta']:g}",
                 "method": METHOD_TITLES.get(row["method"], row["method"]), "eta": row["eta"] or None,
                 "num_parameters": int(row["num_parameters"]) if row.get("num_parameters") else None,
                 "sampling_seconds": row.get("sampling_seconds")}
        for card_key, column in (("memorization", "memorization_ratio"),
                                 ("memorization_features", "memorization_ratio_features"),
                                 ("precision", "precision"), ("recall", "recall"), ("fd", "frechet_distance"),
                                 ("kid", "kid")):
            entry[card_key], entry[card_key + "_std"] = row.get(column), row.get(column + "_std")
        metrics.append(entry)
    own = next(row for row in summary if row["method"] == method and row["eta"] == eta)
    model_name = f"dit-{name}"
    time_law = {"small_t": str(SMALL_TIME), "uniform_t": str(UNIFORM_TIME), "ablation": str(SMALL_TIME),
                "small_t_top": str(SMALL_TIME), "memorization_gap": str(SMALL_TIME)}.get(method)
    space = quality.feature_space
    num_pruned = sum(len(h) for h in pruned.pruned_heads.values())
    result = {"dataset_type": dataset_id}
    save_model_card(
        folder, "pruned_variant",
        metadata={"model_name": model_name, "license": "apache-2.0", "base_model": base_model_name,
                  "datasets": [dataset_id] if dataset_id else []},
        eval_results=[{"metric_type": "memorization_ratio", "metric_name": "Memorization ratio (1/3 rule)",
                       "metric_value": round(own["memorization_ratio"], 4), "dataset_name": data.source, **result},
                      {"metric_type": "frechet_distance", "metric_name": space.frechet_title,
                       "metric_value": round(own["frechet_distance"], 4), "dataset_name": quality.source, **result},
                      {"metric_type": "kid", "metric_name": f"KID formula in {space.name}",
                       "metric_value": round(own["kid"], 6), "dataset_name": quality.source, **result}],
        model_name=model_name, base_model=base_model_name, method=METHOD_TITLES.get(method, method), eta=eta,
        num_pruned_heads=num_pruned, num_heads=sum(pruned.model.heads_per_layer()) + num_pruned,
        pruned_heads={str(k): v for k, v in pruned.pruned_heads.items()},
        time_distribution=(f"{time_law} on t / T" if time_law else "none (random scores)"),
        finetune_steps=config.finetune.max_train_steps, num_train_images=len(data), dataset_source=data.source,
        metrics=metrics, num_seeds=len(config.seeds),
        sampler=f"{config.sampler.upper()} {config.num_inference_steps} steps",
        num_classes=(pruned.model.config.num_embeds_ada_norm
                     if (data.labels is not None if conditional is None else conditional) else None),
        hub_model_id=hub_model_id, local_folder=str(Path(final_folder or folder).resolve()), latent=latent,
        feature_space=space.name, frechet_title=space.frechet_title, num_real_images=quality.num_real_images,
        population_source=quality.source, num_samples=config.num_samples, num_quality_samples=config.quality_samples,
    )
