"""Figure 1 of the paper: Loss-Gap_t against t for several training-set sizes n, with the Theorem 4.3 shape.

The library side of ``memsep loss-gap``: compute the rows, write them as CSV, draw the PNG (files are written to a
temporary name first and then moved into place, so a crash never leaves half a file).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import torch
from tqdm.auto import tqdm

from ..utils import save_figure, write_csv
from .empirical import EmpiricalScore
from .loss_gap import fisher_divergence, loss_gap, theorem_4_3_lower_bound
from .mixture import GaussianMixture
from .time import ou_alpha_sigma

CSV_COLUMNS = (
    "n", "t", "sigma_t", "loss_gap", "loss_gap_stderr", "fisher", "fisher_stderr", "theorem_4_3_shape",
    "loss_gap_over_shape",
)


def loss_gap_curve(
    mixture: GaussianMixture,
    n_values: Sequence[int],
    times: Sequence[float],
    num_noise_samples: int = 2048,
    with_fisher: bool = True,
    seed: int = 0,
    chunk_size: int | None = None,
    progress: bool = True,
) -> list[dict]:
    """One row per ``(n, t)``: Loss-Gap_t (and, with ``with_fisher``, the Fisher divergence, an independent
    estimate of the same number by Proposition 4.1), each with its standard error, and Theorem 4.3's shape.

    The training sets are nested: the set of size ``n`` is the first ``n`` points of one sample of size
    ``max(n_values)`` (seeded by ``seed``), so curves for different ``n`` differ only by the added points.
    """
    n_values = sorted({int(n) for n in n_values})
    times = sorted(float(t) for t in times)
    if not n_values or n_values[0] < 1:
        raise ValueError(f"n_values must hold positive training-set sizes (got {n_values}).")
    if not times or times[0] <= 0:
        raise ValueError(f"times must be OU times > 0 (got {times}); the gap diverges like d / t as t -> 0.")
    device = mixture.means.device
    generator = torch.Generator(device=device).manual_seed(seed)
    pool = mixture.sample(n_values[-1], generator=generator)
    jobs = [(n, t) for n in n_values for t in times]
    if progress:
        jobs = tqdm(jobs, desc="Loss-Gap_t")
    rows, empirical = [], {}
    for n, t in jobs:
        train = pool[:n]
        empirical.setdefault(n, EmpiricalScore(train, chunk_size=chunk_size))
        kwargs = dict(num_noise_samples=num_noise_samples, generator=generator, empirical_score=empirical[n])
        gap = loss_gap(train, mixture.score, t, **kwargs)
        fisher = fisher_divergence(train, mixture.score, t, **kwargs) if with_fisher else None
        shape = float(theorem_4_3_lower_bound(mixture, t))
        rows.append({
            "n": n, "t": t, "sigma_t": ou_alpha_sigma(t)[1],
            "loss_gap": gap.value, "loss_gap_stderr": gap.stderr,
            "fisher": fisher.value if fisher else float("nan"),
            "fisher_stderr": fisher.stderr if fisher else float("nan"),
            "theorem_4_3_shape": shape, "loss_gap_over_shape": gap.value / shape,
        })
    return rows


def write_loss_gap_csv(rows: Iterable[dict], path: str) -> str:
    """Write the rows of :func:`loss_gap_curve` to ``path`` atomically; returns ``path``."""
    write_csv([{key: row[key] for key in CSV_COLUMNS} for row in rows], path, columns=CSV_COLUMNS)
    return path


def plot_loss_gap_curve(rows: Sequence[dict], path: str, title: str | None = None) -> str:
    """Figure 1 as a PNG at ``path`` (atomically). Left: Loss-Gap_t against t (log-log) per n with +-2 standard
    error bars and the shape ``d/sigma_t^2 + tr(Sigma)`` of Theorem 4.3 (dashed; no constants are given, so only
    its slope is comparable). Right: the measured gap divided by that shape."""
    import matplotlib  # here: pyplot comes after choosing the file-only Agg backend, and only to draw

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_values = sorted({row["n"] for row in rows})
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 4), dpi=110)
    for n in n_values:
        part = sorted((row for row in rows if row["n"] == n), key=lambda row: row["t"])
        times = [row["t"] for row in part]
        left.errorbar(times, [row["loss_gap"] for row in part], yerr=[2 * row["loss_gap_stderr"] for row in part],
                      marker="o", markersize=3, capsize=2, label=f"n = {n:,}")
        right.plot(times, [row["loss_gap_over_shape"] for row in part], marker="o", markersize=3, label=f"n = {n:,}")
    shape_rows = sorted({(row["t"], row["theorem_4_3_shape"]) for row in rows})
    left.plot([t for t, _ in shape_rows], [s for _, s in shape_rows], "k--",
              label=r"$d/\sigma_t^2 + \mathrm{tr}\,\Sigma$")
    left.set(xscale="log", yscale="log", xlabel="OU time t", ylabel=r"Loss-Gap$_t$ = Fisher$(\hat P_t, P_t)$")
    left.legend(fontsize=8)
    right.set(xscale="log", xlabel="OU time t", ylabel="Loss-Gap$_t$ / Theorem 4.3 shape", ylim=(0, None))
    right.axhline(1.0, color="k", linewidth=0.5)
    right.legend(fontsize=8)
    if title:
        figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    save_figure(figure, path, dpi=110, bbox_inches=None)
    return path
