"""EmpiricalScore throughput against torch.mm, and against a straightforward full-distance-matrix implementation.

What: the empirical score grad log p_hat_t(x) of 256 queries against n = 50,000 training points of d = 3072
(CIFAR-10 size), float32, on this machine's CPU, at t = 0.1. It is two GEMMs of shape (256 x 3072) @ (3072 x n) and
(256 x n) @ (n x 3072), i.e. 4 * 256 * n * d FLOPs, plus O(256 n) elementwise work.
Against what, side by side in one run (variants called round robin, so load drifts from other processes on the
shared CPU hit all alike; minimum and median over the repetitions):
  1. torch.mm alone on the same two matrix shapes: the GFLOP/s ceiling (no softmax, nothing else);
  2. EmpiricalScore (chunked online log-sum-exp) for several chunk sizes;
  3. a straightforward implementation: the full (256 x n) squared-distance matrix with torch.cdist, softmax,
     one matmul (no chunking).
Reported: GFLOP/s of each (counting the 4 * B * n * d GEMM FLOPs for all), the fraction of torch.mm's, the speed
ratio to the straightforward version, and the extra peak resident memory of one call (Linux VmHWM, reset before
each call via /proc/self/clear_refs). No wall time is asserted anywhere.

    python benchmarks/bench_empirical_score.py [--n 50000] [--dim 3072] [--batch 256] [--repeats 5]
"""

import argparse
import math
import multiprocessing
import statistics
import time

import torch

from diffusers_memsep.theory import EmpiricalScore, ou_alpha_sigma


def straightforward_score(train: torch.Tensor, x: torch.Tensor, t: float) -> torch.Tensor:
    """The textbook formula in four lines: all B x n distances at once, softmax, weighted mean."""
    alpha, sigma = ou_alpha_sigma(t)
    squared = (alpha * torch.cdist(x / alpha, train)) ** 2  # ||x - a x_i||^2 = a^2 ||x / a - x_i||^2, no copy of train
    weights = torch.softmax(-squared / (2 * sigma**2), dim=1)
    return -(x - alpha * (weights @ train)) / sigma**2


def mm_only(train: torch.Tensor, x: torch.Tensor, probabilities: torch.Tensor) -> torch.Tensor:
    torch.mm(x, train.T)
    return torch.mm(probabilities, train)


def peak_extra_memory_mb(function) -> float:
    """Extra peak resident memory (MB) of one call, from Linux's VmHWM (reset to the current RSS first)."""

    def read(key):
        with open("/proc/self/status") as status:
            return next(int(line.split()[1]) for line in status if line.startswith(key)) / 1024

    try:
        with open("/proc/self/clear_refs", "w") as clear:
            clear.write("5")  # resets VmHWM to the current RSS
    except OSError:
        return math.nan
    before = read("VmRSS")
    result = function()
    peak = read("VmHWM")
    del result
    return peak - before


def build(args):
    """Data and variants, identical in every process (seeded)."""
    generator = torch.Generator().manual_seed(0)
    train = torch.rand(args.n, args.dim, generator=generator) * 2 - 1  # CIFAR-like pixels in [-1, 1]
    alpha, sigma = ou_alpha_sigma(args.t)
    x = alpha * train[: args.batch] + sigma * torch.randn(args.batch, args.dim, generator=generator)
    probabilities = torch.softmax(torch.randn(args.batch, args.n, generator=generator), dim=1)
    variants = {"torch.mm (2 GEMMs, ceiling)": lambda: mm_only(train, x, probabilities)}
    for chunk in args.chunk_sizes:  # 0 = the default (None: chosen from the batch size)
        empirical = EmpiricalScore(train, chunk_size=chunk or None)
        label = f"chunk={chunk}" if chunk else f"default chunk={max(1024, 2**22 // args.batch)}"
        variants[f"EmpiricalScore {label}"] = (lambda e=empirical: e.score(x, args.t))
    variants["straightforward (full cdist)"] = lambda: straightforward_score(train, x, args.t)
    return train, x, variants


def measure_memory_in_child(args, name) -> float:
    torch.set_num_threads(args.threads)
    _, _, variants = build(args)
    return peak_extra_memory_mb(variants[name])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=50_000)
    parser.add_argument("--dim", type=int, default=3072)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--t", type=float, default=0.1)
    parser.add_argument("--chunk_sizes", type=int, nargs="+", default=[0, 4096, 16384])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    train, x, variants = build(args)
    flops = 4.0 * args.batch * args.n * args.dim

    reference = straightforward_score(train.double(), x.double(), args.t)
    for name, function in variants.items():
        if name.startswith("EmpiricalScore"):
            error = (function().double() - reference).norm() / reference.norm()
            print(f"{name}: relative error vs float64 = {error:.2e}")

    # Peak memory: each variant in a fresh process, so that no allocator cache from another variant hides its peak.
    context = multiprocessing.get_context("spawn")
    with context.Pool(1, maxtasksperchild=1) as pool:
        memory = {name: pool.apply(measure_memory_in_child, (args, name)) for name in variants}
    times = {name: [] for name in variants}
    with torch.inference_mode():
        for _ in range(args.repeats):
            for name, function in variants.items():
                start = time.perf_counter()
                function()
                times[name].append(time.perf_counter() - start)

    ceiling = flops / min(times["torch.mm (2 GEMMs, ceiling)"]) / 1e9
    naive = min(times["straightforward (full cdist)"])
    print(f"\nB={args.batch} queries, n={args.n:,} points, d={args.dim}, float32, t={args.t}, "
          f"{torch.get_num_threads()} threads, {args.repeats} round-robin repeats; {flops / 1e9:.1f} GFLOP per call")
    print(f"{'variant':<32} {'min s':>7} {'median s':>9} {'GFLOP/s':>8} {'of mm':>6} {'vs naive':>9} {'peak +MB':>9}")
    for name, samples in times.items():
        best = min(samples)
        gflops = flops / best / 1e9
        print(f"{name:<32} {best:>7.3f} {statistics.median(samples):>9.3f} {gflops:>8.1f} {gflops / ceiling:>6.0%} "
              f"{naive / best:>8.2f}x {memory[name]:>9.1f}")


if __name__ == "__main__":
    main()
