"""The Gaussian-mixture suite: Figure 2, Figure 3a/3b and the capacity threshold, as CSV + PNG (``memsep gmm``).

Every figure is a set of :class:`~diffusers_memsep.experiments.gmm.GMMRunSpec`; the suite collects them, runs each
distinct spec once (Figures 3a and 3b share runs) over the worker processes, then draws from the rows. Scales:

- ``"tiny"``: seconds, for tests and smoke runs (numbers are not meaningful);
- ``"default"``: about 10 minutes on 2 CPU cores. The paper's d = 32 and n = 1K..100K are scaled down to
  ``d = 8`` and ``n = 10..80`` so that networks of 3K..530K parameters can reach every regime in 2,000 steps;
- ``"paper"``: the paper's ranges read off its figures (d = 32, n = 1K..100K, d from 8 to 64, widths giving 24K to
  ~40M parameters, n = 3.2K and 10K for Figure 3b). The paper gives neither steps nor sampler, so the step count
  here (20,000) is our choice; this scale needs a GPU (``--device cuda``) and many hours.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from typing import Any, Sequence

import matplotlib
import torch
from matplotlib.ticker import NullFormatter, ScalarFormatter
from safetensors.torch import load_file, save_file

from ..utils import atomic_path, save_figure, write_csv, write_text
from .gmm import (
    SPEC_FIELDS,
    GMMRunResult,
    GMMRunSpec,
    GMMScoreMLP,
    capacity_thresholds,
    fit_threshold_growth,
    make_mixture,
    run_gmm_experiment,
    run_sweep,
)

SCALES = {
    "tiny": {
        "common": dict(steps=30, batch_size=32, num_samples=64, sample_steps=10),
        "figure2": dict(num_train=8, widths=[4, 32]),
        "dim": 4, "num_train": [8, 16], "widths": [8, 32], "dims": [2, 4], "weight_decays": [0.0, 1.0],
        "width_fixed": 32, "pair": [8, 16],
    },
    "default": {
        "common": dict(steps=2000, batch_size=128, num_samples=500, sample_steps=100),
        "figure2": dict(num_train=10, widths=[4, 16, 64, 256], steps=3000),
        "dim": 8, "num_train": [10, 20, 40, 80], "widths": [32, 64, 128, 256, 512], "dims": [4, 8, 16],
        "weight_decays": [0.0, 0.1, 1.0, 3.0], "width_fixed": 256, "pair": [20, 80],
    },
    "paper": {
        "common": dict(steps=20000, batch_size=512, num_samples=2000, sample_steps=200),
        "figure2": dict(num_train=20, widths=[4, 16, 64, 256, 1024], steps=20000),
        "dim": 32, "num_train": [1000, 3200, 10000, 32000, 100000], "widths": [128, 256, 512, 1024, 2048, 3840],
        "dims": [8, 16, 32, 64], "weight_decays": [0.0, 0.01, 0.1, 1.0], "width_fixed": 2048, "pair": [3200, 10000],
    },
}


def suite_specs(scale: str = "default", seed: int = 0, device: str = "cpu", depth: int = 3,
                **overrides: Any) -> dict[str, list[GMMRunSpec]]:
    """The specs of every figure at ``scale``; ``overrides`` (any :class:`GMMRunSpec` field, e.g. ``steps``)
    replace the scale's values in every run."""
    if scale not in SCALES:
        raise ValueError(f"unknown scale {scale!r}; choose one of {', '.join(SCALES)}.")
    unknown = [name for name in overrides if name not in SPEC_FIELDS]
    if unknown:
        raise ValueError(f"unknown run parameter(s) {unknown}; choose among {', '.join(SPEC_FIELDS)}.")
    s = SCALES[scale]
    common = {**s["common"], "seed": seed, "device": device, "depth": depth}
    fig2 = dict(s["figure2"])
    widths2 = fig2.pop("widths")
    base2 = GMMRunSpec(dim=2, num_components=4, layout="square", **{**common, **fig2, **overrides})
    base = GMMRunSpec(dim=s["dim"], num_components=8, **{**common, **overrides})
    grid = [dataclasses.replace(base, num_train=n, width=w) for n in s["num_train"] for w in s["widths"]]
    fixed = dataclasses.replace(base, width=s["width_fixed"])
    return {
        "figure2": [dataclasses.replace(base2, width=w) for w in widths2],
        "size_by_n": grid,  # Figure 3a left, Figure 3b left (the two n of "pair"), capacity threshold
        "dim_by_n": [dataclasses.replace(fixed, num_train=n, dim=d) for n in s["pair"] for d in s["dims"]],
        "weight_decay_by_n": [dataclasses.replace(fixed, num_train=n, weight_decay=wd)
                              for n in s["pair"] for wd in s["weight_decays"]],
    }


# ---------------------------------------------------------------------------------------------------------------
# Atomic outputs
# ---------------------------------------------------------------------------------------------------------------


def _write_json(data: Any, path: str) -> None:
    write_text(path, json.dumps(data, indent=2, default=float))


# ---------------------------------------------------------------------------------------------------------------
# Figures
# ---------------------------------------------------------------------------------------------------------------


def _pyplot():
    matplotlib.use("Agg")  # file output only; pyplot is imported after the backend is chosen, and only to draw
    import matplotlib.pyplot as plt

    return plt


def plot_figure2(results: Sequence[GMMRunResult], path: str) -> None:
    """Figure 2: samples of networks of growing size over the d = 2 mixture; memorized samples in red, training
    points as black crosses, the true density as contours."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(3.2 * len(results), 3.4), squeeze=False)
    spec = results[0].row
    mixture = make_mixture(2, spec["num_components"], spec["mean_scale"], spec["layout"], spec["seed"])
    extent = float(mixture.means.abs().max()) + 3.5
    grid = torch.linspace(-extent, extent, 120)
    gx, gy = torch.meshgrid(grid, grid, indexing="xy")
    density = mixture.log_prob(torch.stack([gx.reshape(-1), gy.reshape(-1)], 1), 0.0).exp().reshape(gx.shape)
    for ax, result in zip(axes[0], results):
        ax.contour(gx, gy, density, levels=6, colors="0.75", linewidths=0.6)
        samples, memorized = result.samples, result.memorized
        ax.scatter(*samples[~memorized].T, s=4, c="tab:blue", alpha=0.5, label="generated")
        ax.scatter(*samples[memorized].T, s=4, c="tab:red", alpha=0.6, label="memorized")
        ax.scatter(*result.train.T, s=30, c="black", marker="x", label="training point")
        row = result.row
        ax.set_title(f"width {row['width']} ({row['num_parameters']:,} params)\n"
                     f"memorized {100 * row['memorization_ratio']:.0f}%, "
                     f"log-lik {row['mean_log_likelihood']:.1f}", fontsize=8)
        ax.set_xlim(-extent, extent)
        ax.set_ylim(-extent, extent)
        ax.set_aspect("equal")
        ax.tick_params(labelsize=6)
    axes[0][0].legend(fontsize=6, loc="lower left", markerscale=2)
    fig.suptitle(f"Figure 2: d=2, K={spec['num_components']}, n={spec['num_train']}, depth {spec['depth']}, "
                 f"{spec['steps']} DSM steps", fontsize=9)
    save_figure(fig, path)


def _curves(ax, rows, x_key, line_key, log_x=True, x_label=None, line_label=None):
    """Solid: memorization ratio (left axis); dashed: mean log-likelihood (right axis); one colour per line."""
    twin = ax.twinx()
    lines = sorted({row[line_key] for row in rows})
    colours = _pyplot().cm.viridis([0.1 + 0.8 * i / max(1, len(lines) - 1) for i in range(len(lines))])
    for colour, value in zip(colours, lines):
        group = sorted((row for row in rows if row[line_key] == value), key=lambda row: row[x_key])
        xs = [row[x_key] if row[x_key] > 0 or not log_x else _zero_stand_in(rows, x_key) for row in group]
        ax.plot(xs, [row["memorization_ratio"] for row in group], "-o", color=colour, ms=3,
                label=f"{line_label or line_key}={value}")
        twin.plot(xs, [row["mean_log_likelihood"] for row in group], "--", color=colour, lw=1)
    if log_x and x_key in ("width", "dim", "num_train", "depth", "steps"):
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(ScalarFormatter())
    elif log_x:
        ax.set_xscale("log")
        ax.xaxis.set_minor_formatter(NullFormatter())  # minor labels of short log ranges overlap
    ax.set_ylim(-0.03, 1.03)
    ax.set_xlabel(x_label or x_key, fontsize=8)
    ax.set_ylabel("memorization ratio (solid)", fontsize=8)
    twin.set_ylabel("mean log-likelihood (dashed; very low values clipped)", fontsize=7)
    # Underfit networks scatter samples far out; clip so the generalizing / memorizing range stays readable.
    values = sorted(row["mean_log_likelihood"] for row in rows)
    top = values[-1]
    twin.set_ylim(max(values[0], top - 4 * max(1.0, top - values[len(values) // 2])) - 1, top + 1)
    ax.tick_params(labelsize=7)
    twin.tick_params(labelsize=7)
    ax.legend(fontsize=6, loc="best")


def _zero_stand_in(rows, key):
    positive = [row[key] for row in rows if row[key] > 0]
    return min(positive) / 10 if positive else 1e-3


def plot_figure3(size_rows, dim_rows, wd_rows, pair: Sequence[int], path_a: str, path_b: str) -> None:
    """Figure 3a (left: vs parameters for several n; right: vs d for several n) and 3b (left: vs width for the two
    n of ``pair``; right: vs weight decay, weight decay 0 drawn at a tenth of the smallest positive value)."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    _curves(left, size_rows, "num_parameters", "num_train", x_label="network parameters", line_label="n")
    left.set_title(f"3a left: d={size_rows[0]['dim']}, K=8, depth {size_rows[0]['depth']}", fontsize=9)
    _curves(right, dim_rows, "dim", "num_train", log_x=False, x_label="dimension d", line_label="n")
    right.set_title(f"3a right: width {dim_rows[0]['width']}", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path_a)
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    _curves(left, [row for row in size_rows if row["num_train"] in pair], "width", "num_train", x_label="width",
            line_label="n")
    left.set_title(f"3b left: depth {size_rows[0]['depth']}, d={size_rows[0]['dim']}", fontsize=9)
    _curves(right, wd_rows, "weight_decay", "num_train", x_label="AdamW weight decay (0 drawn at left end)",
            line_label="n")
    right.set_title(f"3b right: width {wd_rows[0]['width']}", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path_b)


def plot_capacity_threshold(size_rows, thresholds, fit, path: str, level: float = 0.5) -> None:
    """Left: memorization ratio against width for every n with the level line; right: the threshold width against
    n (log-log) with the fitted power law and the linear reference of Theorem 5.1."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for n in sorted({row["num_train"] for row in size_rows}):
        group = sorted((row for row in size_rows if row["num_train"] == n), key=lambda row: row["width"])
        left.plot([row["width"] for row in group], [row["memorization_ratio"] for row in group], "-o", ms=3,
                  label=f"n={n}")
    left.axhline(level, color="0.5", ls=":", lw=1)
    left.set_xscale("log", base=2)
    left.xaxis.set_major_formatter(ScalarFormatter())
    left.set_xlabel("width", fontsize=8)
    left.set_ylabel("memorization ratio", fontsize=8)
    left.legend(fontsize=7)
    left.set_title(f"memorization ratio vs width (level {level:.0%})", fontsize=9)
    reached = [t for t in thresholds if math.isfinite(t["threshold"])]
    ns = [t["num_train"] for t in reached]
    right.plot(ns, [t["threshold"] for t in reached], "o", color="tab:red", label="measured threshold width")
    not_reached = [t["num_train"] for t in thresholds if not math.isfinite(t["threshold"])]
    max_width = max(row["width"] for row in size_rows)
    if not_reached:
        right.plot(not_reached, [max_width] * len(not_reached), "^", color="0.5", label=f"not reached (> {max_width})")
    if fit is not None:
        span = torch.logspace(math.log10(min(ns)), math.log10(max(t["num_train"] for t in thresholds)), 50)
        right.plot(span, fit.prefactor * span**fit.exponent, "-", color="tab:red", lw=1,
                   label=f"fit: width ~ {fit.prefactor:.3g} n^{fit.exponent:.2f}")
        right.plot(span, reached[0]["threshold"] * span / ns[0], ":", color="0.3", lw=1, label="linear (Thm 5.1)")
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("training points n", fontsize=8)
    right.set_ylabel("smallest width reaching the level", fontsize=8)
    right.legend(fontsize=7)
    right.set_title("capacity threshold", fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)


def plot_sweep(rows: Sequence[dict[str, Any]], x_key: str, line_key: str | None, path: str) -> None:
    """A custom sweep: memorization ratio (solid) and mean log-likelihood (dashed) against ``x_key``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.8))
    rows = [dict(row, _line=row[line_key] if line_key else "all") for row in rows]
    numeric = all(isinstance(row[x_key], (int, float)) for row in rows)
    positive = numeric and all(row[x_key] >= 0 for row in rows) and max(row[x_key] for row in rows) > 0
    _curves(ax, rows, x_key, "_line", log_x=positive, line_label=line_key or "runs")
    fixed = {key: rows[0][key] for key in ("dim", "num_train", "width", "depth", "steps", "weight_decay")
             if key not in (x_key, line_key)}
    ax.set_title(", ".join(f"{key}={value}" for key, value in fixed.items()), fontsize=8)
    save_figure(fig, path)


# ---------------------------------------------------------------------------------------------------------------
# The suite
# ---------------------------------------------------------------------------------------------------------------


def run_gmm_suite(output_dir: str, scale: str = "default", workers: int = 2, seed: int = 0, device: str = "cpu",
                  depth: int = 3, level: float = 0.5, progress: bool = True, **overrides: Any) -> dict[str, Any]:
    """Run every figure's specs (each distinct spec once), write ``gmm_runs.csv``, ``gmm_capacity_threshold.csv``,
    ``gmm_summary.json``, ``gmm_figure2_samples.safetensors`` (for :func:`replot_gmm_suite`) and
    ``gmm_figure2.png``, ``gmm_figure3a.png``, ``gmm_figure3b.png``, ``gmm_capacity_threshold.png`` to
    ``output_dir``; returns the summary."""
    figures = suite_specs(scale, seed=seed, device=device, depth=depth, **overrides)
    os.makedirs(output_dir, exist_ok=True)
    unique: list[GMMRunSpec] = []
    for specs in figures.values():
        unique.extend(spec for spec in specs if spec not in unique)
    results = run_sweep(unique, workers=workers, progress=progress, desc=f"gmm suite ({scale})",
                        run_fn=run_gmm_experiment)
    by_spec = {json.dumps(dataclasses.asdict(spec), sort_keys=True): result for spec, result in zip(unique, results)}

    def rows_of(name):
        return [by_spec[json.dumps(dataclasses.asdict(spec), sort_keys=True)].row for spec in figures[name]]

    all_rows = []
    for name in figures:
        all_rows.extend({"figure": name, **row} for row in rows_of(name))
    write_csv(all_rows, os.path.join(output_dir, "gmm_runs.csv"))
    figure2 = [by_spec[json.dumps(dataclasses.asdict(spec), sort_keys=True)] for spec in figures["figure2"]]
    _save_figure2_samples(figure2, os.path.join(output_dir, FIGURE2_SAMPLES))
    return draw_gmm_suite(output_dir, all_rows, figure2, level=level, scale=scale)


FIGURE2_SAMPLES = "gmm_figure2_samples.safetensors"


def _save_figure2_samples(results: Sequence[GMMRunResult], path: str) -> None:
    tensors = {}
    for i, result in enumerate(results):
        tensors[f"{i}.samples"] = result.samples.contiguous()
        tensors[f"{i}.train"] = result.train.contiguous()
        tensors[f"{i}.memorized"] = result.memorized.to(torch.uint8).contiguous()
    with atomic_path(path) as temporary:
        widths = json.dumps([result.row["width"] for result in results])
        save_file(tensors, str(temporary), metadata={"widths": widths})


def _parse(value: str) -> Any:
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return {"True": True, "False": False}.get(value, value)


def replot_gmm_suite(output_dir: str, level: float = 0.5) -> dict[str, Any]:
    """Redraw every figure (and the threshold CSV / summary) from ``gmm_runs.csv`` and the saved Figure 2 samples
    of an earlier :func:`run_gmm_suite` in ``output_dir``, without training anything."""
    runs_path, samples_path = os.path.join(output_dir, "gmm_runs.csv"), os.path.join(output_dir, FIGURE2_SAMPLES)
    for path in (runs_path, samples_path):
        if not os.path.exists(path):
            raise FileNotFoundError(f"{path} not found; run `memsep gmm --output_dir {output_dir}` first.")
    with open(runs_path, newline="") as handle:
        rows = [{key: _parse(value) for key, value in row.items()} for row in csv.DictReader(handle)]
    tensors = load_file(samples_path)
    figure2_rows = [row for row in rows if row["figure"] == "figure2"]
    figure2 = [GMMRunResult(row, tensors[f"{i}.samples"], tensors[f"{i}.train"], tensors[f"{i}.memorized"].bool())
               for i, row in enumerate(figure2_rows)]
    summary_path = os.path.join(output_dir, "gmm_summary.json")
    scale = json.load(open(summary_path))["scale"] if os.path.exists(summary_path) else "unknown"
    return draw_gmm_suite(output_dir, rows, figure2, level=level, scale=scale)


def draw_gmm_suite(output_dir: str, rows: Sequence[dict[str, Any]], figure2: Sequence[GMMRunResult],
                   level: float = 0.5, scale: str = "default") -> dict[str, Any]:
    """From the suite's rows (with a ``figure`` column) and Figure 2's results: the capacity thresholds and their
    growth fit (``gmm_capacity_threshold.csv``), the four PNGs and ``gmm_summary.json``; returns the summary."""
    def rows_of(name):
        return [row for row in rows if row["figure"] == name]

    size_rows = rows_of("size_by_n")
    thresholds = capacity_thresholds(size_rows, level=level)
    dim, depth = size_rows[0]["dim"], size_rows[0]["depth"]
    for t in thresholds:
        # the same threshold as a parameter count (the formula is smooth in the width, so it takes the fraction)
        t["threshold_parameters"] = GMMScoreMLP.parameter_count(dim, t["threshold"], depth)
    uncensored = [t for t in thresholds if not t["censored"]]
    try:
        fit = fit_threshold_growth([t["num_train"] for t in uncensored], [t["threshold"] for t in uncensored])
        fit_parameters = fit_threshold_growth([t["num_train"] for t in uncensored],
                                              [t["threshold_parameters"] for t in uncensored])
    except ValueError:
        fit = fit_parameters = None  # fewer than two n reached the level: figure and summary say so, no fit
    write_csv(thresholds, os.path.join(output_dir, "gmm_capacity_threshold.csv"))
    plot_figure2(figure2, os.path.join(output_dir, "gmm_figure2.png"))
    wd_rows = rows_of("weight_decay_by_n")
    pair = sorted({row["num_train"] for row in wd_rows})
    plot_figure3(size_rows, rows_of("dim_by_n"), wd_rows, pair,
                 os.path.join(output_dir, "gmm_figure3a.png"), os.path.join(output_dir, "gmm_figure3b.png"))
    plot_capacity_threshold(size_rows, thresholds, fit, os.path.join(output_dir, "gmm_capacity_threshold.png"), level)
    summary = {
        "scale": scale,
        "runs": len({json.dumps({k: v for k, v in row.items() if k != "figure"}, sort_keys=True) for row in rows}),
        "level": level,
        "thresholds": thresholds,
        "fit": dataclasses.asdict(fit) if fit is not None else None,
        "fit_parameters": dataclasses.asdict(fit_parameters) if fit_parameters is not None else None,
        "figure2": [{k: row[k] for k in ("width", "num_parameters", "memorization_ratio", "mean_log_likelihood",
                                          "true_samples_memorization_ratio", "true_samples_mean_log_likelihood")}
                    for row in (result.row for result in figure2)],
    }
    _write_json(summary, os.path.join(output_dir, "gmm_summary.json"))
    return summary


def run_gmm_sweep(output_dir: str, grid: dict[str, Sequence[Any]], base: GMMRunSpec | None = None,
                  workers: int = 2, progress: bool = True) -> list[dict[str, Any]]:
    """A custom sweep (``memsep gmm --sweep width=32,64 --sweep num_train=10,40``): the cartesian product of
    ``grid`` over ``base``; writes ``gmm_sweep.csv`` and ``gmm_sweep.png`` (against the first parameter, one line
    per value of the second) and, when the grid varies ``width`` and ``num_train``, the capacity threshold CSV."""
    if not grid:
        raise ValueError("a sweep needs at least one parameter, e.g. --sweep width=32,64,128.")
    rows = run_sweep(base or GMMRunSpec(), grid, workers=workers, progress=progress)
    os.makedirs(output_dir, exist_ok=True)
    write_csv(rows, os.path.join(output_dir, "gmm_sweep.csv"))
    names = list(grid)
    plot_sweep(rows, names[0], names[1] if len(names) > 1 else None, os.path.join(output_dir, "gmm_sweep.png"))
    if {"width", "num_train"} <= set(names):
        write_csv(capacity_thresholds(rows), os.path.join(output_dir, "gmm_capacity_threshold.csv"))
    return rows
