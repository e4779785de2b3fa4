"""The frontier of a study: which conditions are worth applying, for the quality a user can afford, and what each
costs.

Per setting, over the conditions of the summary (every method at every eta, every baseline and remedy):

- **Domination, given the intervals.** Condition A dominates B when, over the (base model x seed) pairs both have,
  A's mean paired difference is no worse than B's on the memorization ratio AND on the frontier's quality metric,
  and at least one of the two paired 95% t-intervals lies entirely on A's better side. A condition no other
  dominates is on the frontier. Noise therefore keeps a condition on the frontier rather than off it: the frontier
  is the set a user should choose from, not a ranking. (Descriptive: no multiple-comparison correction; the
  verdict tables of the report carry Holm-Bonferroni.)
- **Quality budgets.** ``interval``: recall, Frechet distance and KID each no worse than the far end of the
  original's 95% interval (precision is shown, not budgeted: copies are real images and inflate it, so a remedy
  that removes copies lowers it by construction); ``fd+10%`` and ``kid+10%``: the mean Frechet distance / KID at
  most 10% above the original's mean. Per budget, the condition with the lowest mean memorization ratio among those
  within it (ties: the cheaper in denoising steps, then training steps), with its costs.
- **Costs.** ``train_steps`` (the base training a user runs: an early-stopped run stops when it first validates
  above its threshold), ``finetune_steps`` (after pruning) and ``denoising_steps_per_sample`` (sampler steps per
  returned sample, resampled trajectories included; plain sampling spends the sampler's step count).
"""

from __future__ import annotations

import math

from .statistics import HIGHER_IS_BETTER, paired_differences, t_interval

#: The quality budgets, in the report's order: name -> description.
BUDGETS = {
    "interval": "recall, FD and KID within the original's 95% interval (or better)",
    "fd+10%": "FD at most 10% above the original's",
    "kid+10%": "KID at most 10% above the original's",
}
#: The quality metrics of the ``interval`` budget.
INTERVAL_METRICS = ("recall", "frechet_distance", "kid")


def _better(difference: float, metric: str) -> float:
    """``difference`` signed so that positive is better."""
    return difference if metric in HIGHER_IS_BETTER else -difference


def dominates(rows: list[dict], a: dict, b: dict, setting: str, quality_metric: str) -> bool:
    """Whether condition ``a`` (a summary entry) dominates ``b`` on (memorization ratio, ``quality_metric``)."""
    distinguishable = False
    for metric in ("memorization_ratio", quality_metric):
        differences = paired_differences(rows, a["method"], a["eta"], b["method"], b["eta"], metric, setting)
        if len(differences) < 2:
            return False
        mean, low, high = t_interval(differences)
        if _better(mean, metric) < 0:
            return False
        better_end = -high if metric not in HIGHER_IS_BETTER else low  # the interval's worst case for a
        distinguishable = distinguishable or better_end > 0
    return distinguishable


def frontier(rows: list[dict], summary: list[dict], setting: str, quality_metric: str) -> list[dict]:
    """The summary entries of ``setting`` that no other entry dominates, in the summary's order."""
    entries = [e for e in summary if e["setting"] == setting and quality_metric in e]
    return [b for b in entries if not any(a is not b and dominates(rows, a, b, setting, quality_metric)
                                          for a in entries)]


def within_budget(entry: dict, original: dict, budget: str) -> bool:
    """Whether ``entry``'s mean quality is within ``budget`` (a key of :data:`BUDGETS`) of the original's."""
    if budget == "interval":
        for metric in INTERVAL_METRICS:  # a NaN (a diverged row, or no interval for the original) is no evidence
            if metric not in entry or math.isnan(entry[metric]) or math.isnan(original.get(f"{metric}_low", math.nan)):
                return False
            if metric in HIGHER_IS_BETTER and entry[metric] < original[f"{metric}_low"]:
                return False
            if metric not in HIGHER_IS_BETTER and entry[metric] > original[f"{metric}_high"]:
                return False
        return True
    metric = {"fd+10%": "frechet_distance", "kid+10%": "kid"}[budget]
    return metric in entry and entry[metric] <= original[metric] + 0.1 * abs(original[metric])  # False for NaN


def best_within_budgets(summary: list[dict], setting: str) -> dict[str, dict | None]:
    """Per budget of :data:`BUDGETS`, the entry of ``setting`` that copies least within it (None when none is, or
    when the setting has no ``original`` row)."""
    entries = [e for e in summary if e["setting"] == setting]
    original = next((e for e in entries if e["method"] == "original"), None)
    choices = {}
    for budget in BUDGETS:
        fitting = [e for e in entries if original is not None and within_budget(e, original, budget)]
        choices[budget] = min(fitting, key=lambda e: (e["memorization_ratio"],
                                                       e.get("denoising_steps_per_sample", 0.0),
                                                       e.get("train_steps", 0.0)), default=None)
    return choices


def _cost_cells(entry: dict, plain_steps: int) -> list[str]:
    train = entry.get("train_steps")
    denoise = entry.get("denoising_steps_per_sample", math.nan)
    return [f"{train:,.0f}" if isinstance(train, (int, float)) else "-",
            f"{entry.get('finetune_steps', 0):,.0f}",
            f"{denoise:.1f} ({denoise / plain_steps:.2f}x)" if not math.isnan(denoise) else "-"]


def _mean_cell(entry: dict, metric: str) -> str:
    low, high = entry.get(f"{metric}_low", math.nan), entry.get(f"{metric}_high", math.nan)
    if math.isnan(low):
        return f"{entry[metric]:.3f}"
    return f"{entry[metric]:.3f} [{low:.3f}, {high:.3f}]"


def frontier_lines(rows: list[dict], summary: list[dict], setting: str, quality_metric: str,
                   plain_steps: int) -> list[str]:
    """The report's section on remedies for ``setting``: every condition's effect beside its cost (frontier
    marked), then the quality budgets and the condition that copies least within each."""
    entries = [e for e in summary if e["setting"] == setting]
    on_frontier = {(e["method"], e["eta"]) for e in frontier(rows, summary, setting, quality_metric)}
    lines = ["", f"### Remedies: effect and cost (frontier on memorization x {quality_metric})", "",
             "Mean [95% t-interval] over base models x seeds; `frontier`: no other condition is at least as good on "
             f"both the memorization ratio and {quality_metric} and distinguishably better on one (paired 95% "
             "intervals). Costs: base training steps, fine-tuning steps, sampler steps per returned sample (x plain "
             "sampling).", "",
             "| condition | eta | frontier | memorization_ratio | memorization_ratio_features | precision | recall | "
             "frechet_distance | kid | train steps | fine-tune steps | denoising steps / sample |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for entry in entries:
        cells = [_mean_cell(entry, m) if m in entry else "-" for m in
                 ("memorization_ratio", "memorization_ratio_features", "precision", "recall", "frechet_distance",
                  "kid")]
        mark = "yes" if (entry["method"], entry["eta"]) in on_frontier else ""
        lines.append(f"| {entry['method']} | {entry['eta']:g} | {mark} | " + " | ".join(cells) + " | "
                     + " | ".join(_cost_cells(entry, plain_steps)) + " |")
    lines += ["", "Quality budgets: the condition that copies least within each.", "",
              "| budget | condition | eta | memorization_ratio | frechet_distance | kid | train steps | "
              "fine-tune steps | denoising steps / sample |", "|---|---|---|---|---|---|---|---|---|"]
    for budget, entry in best_within_budgets(summary, setting).items():
        if entry is None:
            lines.append(f"| {BUDGETS[budget]} | none | | | | | | | |")
            continue
        lines.append(f"| {BUDGETS[budget]} | {entry['method']} | {entry['eta']:g} | "
                     f"{_mean_cell(entry, 'memorization_ratio')} | {_mean_cell(entry, 'frechet_distance')} | "
                     f"{_mean_cell(entry, 'kid')} | " + " | ".join(_cost_cells(entry, plain_steps)) + " |")
    return lines


def frontier_record(rows: list[dict], summary: list[dict], quality_metric: str) -> list[dict]:
    """``frontier.csv``: per setting and condition, whether it is on the frontier and within each budget, and which
    condition each budget chooses."""
    records = []
    for setting in dict.fromkeys(e["setting"] for e in summary):
        on_frontier = {(e["method"], e["eta"]) for e in frontier(rows, summary, setting, quality_metric)}
        choices = best_within_budgets(summary, setting)
        original = next((e for e in summary if e["setting"] == setting and e["method"] == "original"), None)
        for entry in (e for e in summary if e["setting"] == setting):
            key = (entry["method"], entry["eta"])
            record = {"setting": setting, "method": entry["method"], "eta": entry["eta"],
                      "frontier": key in on_frontier}
            for budget in BUDGETS:
                record[f"within_{budget}"] = original is not None and within_budget(entry, original, budget)
                chosen = choices[budget]
                record[f"chosen_{budget}"] = chosen is not None and (chosen["method"], chosen["eta"]) == key
            records.append(record)
    return records
