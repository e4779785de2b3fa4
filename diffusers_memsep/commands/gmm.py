"""``memsep gmm``: the approximation separation on Gaussian mixtures (Figures 2-3) and the capacity threshold.

Without ``--sweep`` it runs the whole suite (:func:`diffusers_memsep.experiments.run_gmm_suite`) and writes
``gmm_runs.csv``, ``gmm_capacity_threshold.csv``, ``gmm_summary.json`` and the PNGs ``gmm_figure2``,
``gmm_figure3a``, ``gmm_figure3b`` and ``gmm_capacity_threshold`` into ``--output_dir`` (``--replot`` redraws them
from those files without training). ``--scale default``
takes about 10 minutes on 2 CPU cores; ``--scale paper`` uses the paper's sizes (GPU, hours); ``--scale tiny``
is a seconds-long smoke run. With ``--sweep NAME=V1,V2,...`` (repeatable) it runs that grid instead and writes
``gmm_sweep.csv`` and ``gmm_sweep.png``.
"""

from __future__ import annotations

import argparse
import math

from diffusers_memsep.experiments import (
    GMMRunSpec,
    parse_sweep_argument,
    replot_gmm_suite,
    run_gmm_suite,
    run_gmm_sweep,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output_dir", default="outputs/gmm", help="Folder for the CSV, JSON and PNG outputs.")
    parser.add_argument("--scale", choices=["tiny", "default", "paper"], default="default",
                        help="Suite size: default ~10 min on 2 CPU cores (d=8, n=10..80); paper = the paper's "
                             "ranges (d=32, n=1K..100K; needs a GPU and hours); tiny = seconds (smoke test).")
    parser.add_argument("--workers", type=int, default=2, help="Processes (one torch thread each).")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the mixture, training points, init, sampling.")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (use --workers 1 on GPU).")
    parser.add_argument("--depth", type=int, default=3, help="Hidden layers of every MLP.")
    parser.add_argument("--steps", type=int, default=None, help="Override the DSM steps of every run.")
    parser.add_argument("--level", type=float, default=0.5,
                        help="Memorization ratio that defines the capacity threshold (default 0.5).")
    parser.add_argument("--sweep", action="append", default=[], metavar="NAME=V1,V2,...",
                        help="Run a custom grid instead of the suite; NAME is any run parameter (width, depth, "
                             "num_train, dim, weight_decay, steps, ...). Repeat to combine.")
    parser.add_argument("--set", action="append", default=[], metavar="NAME=VALUE", dest="fixed",
                        help="Fix a run parameter of a custom sweep, e.g. --set dim=16.")
    parser.add_argument("--replot", action="store_true",
                        help="Redraw the figures from the CSV and saved samples already in --output_dir "
                        "(no training).")
    parser.add_argument("--no_progress", action="store_true", help="Hide progress bars.")


def check_device(device: str) -> None:
    """Refuse a device this machine does not have, before any run (torch would fail inside the first worker)."""
    import torch

    try:
        parsed = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"--device {device!r} is not a torch device; use --device cpu or --device cuda.") from None
    if parsed.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("CUDA is not available; use --device cpu.")
    if parsed.type == "cuda" and parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s); use "
                         "--device cuda:0 or --device cpu.")
    if parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError("MPS is not available; use --device cpu.")


def run(args: argparse.Namespace) -> int:
    if not (math.isfinite(args.level) and 0 < args.level < 1):  # before any training, not after the whole suite
        raise ValueError(f"--level must lie in (0, 1) (the memorization ratio that counts as memorizing), got "
                         f"{args.level}.")

    check_device(args.device)
    if args.sweep and args.replot:
        raise ValueError("--replot redraws the suite's figures; drop --sweep (or --replot).")
    if args.sweep:
        grid = dict(parse_sweep_argument(text) for text in args.sweep)
        fixed = {name: values[0] for name, values in (parse_sweep_argument(text) for text in args.fixed)}
        fixed.setdefault("depth", args.depth)
        if args.steps is not None:
            fixed.setdefault("steps", args.steps)
        base = GMMRunSpec(seed=args.seed, device=args.device, **fixed)
        rows = run_gmm_sweep(args.output_dir, grid, base, workers=args.workers, progress=not args.no_progress)
        for row in rows:
            print(", ".join(f"{name}={row[name]}" for name in grid),
                  f"params={row['num_parameters']:,} memorization={row['memorization_ratio']:.3f} "
                  f"loglik={row['mean_log_likelihood']:.2f}")
        print(f"wrote {args.output_dir}/gmm_sweep.csv and gmm_sweep.png")
        return 0
    overrides = {} if args.steps is None else {"steps": args.steps}
    if args.replot:
        summary = replot_gmm_suite(args.output_dir, level=args.level)
    else:
        summary = run_gmm_suite(args.output_dir, scale=args.scale, workers=args.workers, seed=args.seed,
                                device=args.device, depth=args.depth, level=args.level,
                                progress=not args.no_progress, **overrides)
    for row in summary["figure2"]:
        print(f"figure 2: width {row['width']:>5} ({row['num_parameters']:>7,} params): memorized "
              f"{row['memorization_ratio']:.3f}, log-lik {row['mean_log_likelihood']:.2f} "
              f"(true samples: {row['true_samples_memorization_ratio']:.3f}, "
              f"{row['true_samples_mean_log_likelihood']:.2f})")
    for t in summary["thresholds"]:
        if t["threshold"] != t["threshold"]:  # nan
            print(f"capacity threshold at n={t['num_train']}: not reached at the largest width of the grid")
            continue
        print(f"capacity threshold at n={t['num_train']}: width {t['threshold']:.1f} "
              f"({t['threshold_parameters']:,.0f} parameters)"
              + (" (already above at the smallest width)" if t["censored"] else ""))
    fit, fit_parameters = summary["fit"], summary["fit_parameters"]
    if fit:
        print(f"growth fit: width ~ {fit['prefactor']:.3g} * n^{fit['exponent']:.2f} (R^2 {fit['r_squared']:.3f}, "
              f"{fit['points']} points); parameters ~ {fit_parameters['prefactor']:.3g} * "
              f"n^{fit_parameters['exponent']:.2f} (R^2 {fit_parameters['r_squared']:.3f})")
    else:
        print("growth fit: fewer than two n reached the level: no fit")
    print(f"wrote CSV, JSON and PNGs to {args.output_dir}")
    return 0
