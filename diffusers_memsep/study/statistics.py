"""Statistics of the study: means with 95% Student t intervals, paired differences against the controls, and
verdicts with the Holm-Bonferroni correction over every comparison of one table.

Choices the paper leaves open:

- Intervals: Student t, ``mean +- t_{0.975, n-1} * sd / sqrt(n)``, on the means of the runs and on the paired
  differences over the n (base model x seed) pairs that both conditions have. The seeds of one base model share that
  model, so the pairs are not fully independent: the intervals are somewhat optimistic, and the base-model count is
  the first thing to raise for a firmer verdict.
- Many comparisons: one table of paired differences (one setting, one control) holds K intervals (methods x etas x
  metrics). Each interval is shown at 95%; the VERDICTS control the family-wise error rate over the K with
  Holm-Bonferroni: the paired t-test p-values of the table, sorted ``p_(1) <= ... <= p_(K)``, are adjusted to
  ``max_{j <= i} min(1, (K - j + 1) p_(j))``, and a difference is "better" / "worse" only when its adjusted p-value
  is below 0.05 (else "not distinguishable"). Comparisons with fewer than 2 pairs get no p-value and do not count in
  K. The report says K for every table.
- Metric directions: ``precision`` and ``recall`` are better high; every other metric column (memorization ratio,
  Frechet distance, KID, ...) is better low.
- Precision and copies: a copy of a training image lies on the data manifold, so copying raises precision (the
  paper notes that copies inflate it). A higher precision is therefore called better only when the row does not
  also copy more than its control; otherwise the verdict reads "higher, with more copies".
- Settings are analysed separately (quality metrics live in different feature spaces).
"""

from __future__ import annotations

import math
import statistics

from scipy.stats import t as student_t

from .plan import BASELINES

HIGHER_IS_BETTER = {"precision", "recall"}
#: Numeric row fields that are bookkeeping, not metrics.
#: What a row's remedy costs (study.run.run_costs and the sampler's steps): averaged per condition, never compared.
COST_COLUMNS = ("train_steps", "finetune_steps", "denoising_steps_per_sample")
NOT_METRICS = {"eta", "seed", "base", "sampling_seconds", "pruned_heads", "run_seconds", "step", *COST_COLUMNS}
#: The controls every row is compared with, in the report's order; ``random`` at the row's own eta.
CONTROLS = ("random", "finetune_only", "early_stop")
FAMILY_WISE_LEVEL = 0.05


def t_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float, float]:
    """``(mean, low, high)``: Student t interval of the mean (NaN bounds for fewer than 2 values)."""
    n = len(values)
    if n == 0:
        return math.nan, math.nan, math.nan
    mean = sum(values) / n
    if n < 2:
        return mean, math.nan, math.nan
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = float(student_t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
    return mean, mean - half, mean + half


def paired_p_value(values: list[float]) -> float:
    """Two-sided p-value of the paired t-test ``mean = 0`` (NaN for fewer than 2 values)."""
    n = len(values)
    if n < 2:
        return math.nan
    mean, sd = sum(values) / n, statistics.stdev(values)
    if sd == 0:
        return 1.0 if mean == 0 else 0.0
    return float(2 * student_t.sf(abs(mean) / (sd / math.sqrt(n)), n - 1))


def holm_bonferroni(p_values: list[float]) -> list[float]:
    """Holm-adjusted p-values, in the input order; NaN entries stay NaN and do not count in the family."""
    order = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    adjusted, running = [math.nan] * len(p_values), 0.0
    for rank, (p, index) in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * p))
        adjusted[index] = running
    return adjusted


def verdict(mean: float, p_adjusted: float, metric: str) -> str:
    """``better`` / ``worse`` when the adjusted p-value is below the family-wise level, in the metric's direction."""
    if math.isnan(p_adjusted) or p_adjusted >= FAMILY_WISE_LEVEL or mean == 0:
        return "not distinguishable"
    return "better" if (mean < 0) != (metric in HIGHER_IS_BETTER) else "worse"


def metric_columns(rows: list[dict]) -> list[str]:
    """Every numeric column present in all rows that is not bookkeeping (new metrics are picked up as they come)."""
    # Counts (num_*) and standard errors (*_se) describe a measurement; they are not one.
    columns = [k for k in rows[0] if k not in NOT_METRICS and not k.startswith("num_") and not k.endswith("_se")]
    return [k for k in columns if all(isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool)
                                      for r in rows)]


def paired_differences(rows: list[dict], method: str, eta: float, control: str, control_eta: float, metric: str,
                       setting: str) -> list[float]:
    """``method - control`` for every (base model, seed) that both conditions have, in ``setting``."""
    def index(name, value):
        return {(r["base"], r["seed"]): float(r[metric]) for r in rows
                if r["setting"] == setting and r["method"] == name and float(r["eta"]) == value}

    own, other = index(method, eta), index(control, control_eta)
    return [own[key] - other[key] for key in sorted(own) if key in other]


def compare(rows: list[dict]) -> list[dict]:
    """One row per (setting, method, eta): mean, sample std and 95% t-interval of every metric, and the paired
    differences against each control of :data:`CONTROLS` with interval, p-value, Holm-adjusted p-value and verdict."""
    metrics = metric_columns(rows)
    groups = list(dict.fromkeys((r["setting"], r["method"], float(r["eta"])) for r in rows))
    summary = []
    for setting, method, eta in groups:
        members = [r for r in rows if (r["setting"], r["method"], float(r["eta"])) == (setting, method, eta)]
        entry = {"setting": setting, "method": method, "eta": eta, "runs": len(members)}
        for column in ("num_parameters", "sampling_seconds", *COST_COLUMNS):  # descriptions of the runs, not compared
            if all(isinstance(m.get(column), (int, float)) for m in members):
                entry[column] = sum(m[column] for m in members) / len(members)
        for metric in metrics:
            values = [float(m[metric]) for m in members]
            entry[metric], entry[f"{metric}_low"], entry[f"{metric}_high"] = t_interval(values)
            entry[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        for control in CONTROLS:
            if method == control or (control == "random" and eta == 0):  # random is a pruning control
                continue
            if control == "finetune_only" and eta == 0 and method not in BASELINES:  # a remedy: no fine-tuning
                continue
            for metric in metrics:
                differences = paired_differences(rows, method, eta, control, eta if control == "random" else 0.0,
                                                 metric, setting)
                if not differences:  # the control was not run (yet): no comparison
                    continue
                key = f"vs_{control}_{metric}"
                entry[key], entry[f"{key}_low"], entry[f"{key}_high"] = t_interval(differences)
                entry[f"{key}_pairs"], entry[f"{key}_p"] = len(differences), paired_p_value(differences)
        summary.append(entry)
    for setting in dict.fromkeys(setting for setting, _, _ in groups):
        for control in CONTROLS:
            _holm_table([e for e in summary if e["setting"] == setting], control, metrics)
    return summary


def _holm_table(entries: list[dict], control: str, metrics: list[str]) -> None:
    """Holm-adjust the p-values of one table (one setting, one control) and write each verdict."""
    keys = [(entry, f"vs_{control}_{metric}", metric) for entry in entries for metric in metrics
            if f"vs_{control}_{metric}" in entry]
    adjusted = holm_bonferroni([entry[f"{key}_p"] for entry, key, _ in keys])
    for (entry, key, metric), p in zip(keys, adjusted):
        entry[f"{key}_p_holm"] = p
        entry[f"{key}_verdict"] = verdict(entry[key], p, metric)
        copies_more = entry.get(f"vs_{control}_memorization_ratio", 0.0) > 0
        if metric == "precision" and entry[f"{key}_verdict"] == "better" and copies_more:
            entry[f"{key}_verdict"] = "higher, with more copies"


def table_size(summary: list[dict], setting: str, control: str) -> int:
    """K: the comparisons with a p-value in one table, the family Holm-Bonferroni controls."""
    return sum(1 for entry in summary if entry["setting"] == setting for key, value in entry.items()
               if key.startswith(f"vs_{control}_") and key.endswith("_p_holm") and not math.isnan(value))
