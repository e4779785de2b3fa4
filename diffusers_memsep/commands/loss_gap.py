"""``memsep loss-gap``: reproduce Figure 1 (Loss-Gap_t against t for several n, with Theorem 4.3's shape).

Writes ``loss_gap.csv`` and ``loss_gap.png`` into ``--output_dir``. The defaults finish in about a minute on a
2-core CPU.
"""

from __future__ import annotations

import argparse
import os

import torch

from diffusers_memsep.theory import GaussianMixture, loss_gap_curve, plot_loss_gap_curve, time_grid, write_loss_gap_csv


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output_dir", default="outputs/loss_gap", help="Folder for loss_gap.csv and loss_gap.png.")
    parser.add_argument("--dim", type=int, default=8, help="Data dimension d.")
    parser.add_argument("--num_components", type=int, default=8, help="Mixture components K (paper: 8).")
    parser.add_argument("--mean_scale", type=float, default=2.0,
                        help="Means ~ N(0, mean_scale^2 I) (paper: 2, i.e. N(0, 4 I)); covariances are I.")
    parser.add_argument("--n_values", type=int, nargs="+", default=[100, 1000, 10000],
                        help="Training-set sizes n (nested subsets of one sample).")
    parser.add_argument("--t_min", type=float, default=0.01, help="Smallest OU time.")
    parser.add_argument("--t_max", type=float, default=2.0, help="Largest OU time.")
    parser.add_argument("--num_times", type=int, default=8, help="Times, spaced geometrically in [t_min, t_max].")
    parser.add_argument("--num_noise_samples", type=int, default=2048,
                        help="Monte-Carlo pairs (training point, noise) per (n, t) and estimator.")
    parser.add_argument("--no_fisher", action="store_true",
                        help="Skip the Fisher-divergence estimate (Prop. 4.1's other side); halves the run time.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the mixture, the training sets and the noise.")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda.")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float64", help="Computation dtype.")


def run(args: argparse.Namespace) -> int:
    if args.num_times < 2:
        raise ValueError(f"--num_times must be >= 2 (got {args.num_times}).")
    if str(args.device).startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device} was asked for but CUDA is not available; use --device cpu.")
    dtype = getattr(torch, args.dtype)
    generator = torch.Generator(device=args.device).manual_seed(args.seed)
    mixture = GaussianMixture.random(args.num_components, args.dim, mean_scale=args.mean_scale, generator=generator,
                                     dtype=dtype, device=args.device)
    times = time_grid(args.t_max, args.t_min, args.num_times - 1).flip(0).tolist()
    rows = loss_gap_curve(mixture, args.n_values, times, num_noise_samples=args.num_noise_samples,
                          with_fisher=not args.no_fisher, seed=args.seed)
    csv_path = write_loss_gap_csv(rows, os.path.join(args.output_dir, "loss_gap.csv"))
    title = (f"Gaussian mixture K={args.num_components}, d={args.dim}, means ~ N(0, {args.mean_scale**2:g} I), "
             f"cov I; {args.num_noise_samples} MC samples per point")
    png_path = plot_loss_gap_curve(rows, os.path.join(args.output_dir, "loss_gap.png"), title=title)
    print(f"{'n':>7} {'t':>8} {'Loss-Gap_t':>22} {'Fisher':>22} {'shape':>10} {'gap/shape':>9}")
    for row in rows:
        print(f"{row['n']:>7} {row['t']:>8.4f} {row['loss_gap']:>12.4g} +- {row['loss_gap_stderr']:<7.2g} "
              f"{row['fisher']:>12.4g} +- {row['fisher_stderr']:<7.2g} {row['theorem_4_3_shape']:>10.4g} "
              f"{row['loss_gap_over_shape']:>9.3f}")
    print(f"wrote {csv_path} and {png_path}")
    return 0
