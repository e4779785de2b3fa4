#!/usr/bin/env python
"""Exact top-2 nearest-neighbour search: NearestNeighborIndex vs faiss-cpu IndexFlatL2 vs torch.cdist + topk.

    .venv/bin/pip install faiss-cpu   # optional; the faiss row is skipped without it
    .venv/bin/python benchmarks/bench_nearest_neighbors.py            # 10,000 training images (a few minutes)
    .venv/bin/python benchmarks/bench_nearest_neighbors.py --cifar    # CIFAR-10 size: 50,000 training images

What is measured, how, against what:
- data: ``num_train`` synthetic CIFAR-size images (3x32x32 = 3072 float32 values in [-1, 1]: smooth random colour
  fields, i.e. 3x8x8 Gaussian noise upsampled bilinearly to 32x32, plus fine noise, squashed by tanh, so neighbours
  are neither trivially far nor tied) and ``num_queries`` queries, half near copies of training images (noise
  sd 0.05, what a memorizing model produces) and half fresh fields;
- speed: each method searches all queries for k = 2; methods run interleaved (ours, faiss, cdist, ours, ...) for
  ``--repeats`` rounds in one process, so they share the same CPU load; the report gives the median and best
  queries/s and the ratio of medians;
- the hardware limit: the search is at least one matrix product ``[queries, d] x [d, train]``
  (``2 * queries * train * d`` floating-point operations), so ``torch.mm`` of exactly those shapes (into a
  preallocated output) runs in the same rounds; every method's GFLOP/s counts those operations, and
  "of torch.mm" is its median GFLOP/s over torch.mm's median GFLOP/s;
- peak memory: each method runs once more in a fresh subprocess; the number is the growth of the process's peak
  resident set (Linux ``VmHWM``, reset before each phase) during index build and during search;
- correctness: every method's neighbours are compared with an exact float64 brute force (chunked).
Nothing is asserted; the numbers are printed.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F
from _memory import status_mb  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

from diffusers_memsep.memorization import NearestNeighborIndex


def make_data(num_train: int, num_queries: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    generator = torch.Generator().manual_seed(seed)

    def fields(n):
        out = []
        for start in range(0, n, 5000):
            m = min(5000, n - start)
            coarse = torch.randn(m, 3, 8, 8, generator=generator)
            fine = F.interpolate(coarse, size=32, mode="bilinear", align_corners=False)
            out.append(torch.tanh(fine + 0.1 * torch.randn(m, 3, 32, 32, generator=generator)).reshape(m, -1))
        return torch.cat(out)

    train = fields(num_train)
    half = num_queries // 2
    copies = train[torch.randint(0, num_train, (half,), generator=generator)]
    copies = copies + 0.05 * torch.randn(copies.shape, generator=generator)
    queries = torch.cat([copies, fields(num_queries - half)])
    return train.numpy(), queries.numpy()


# ------------------------------------------------------------------------------------------------------- methods
def build(method: str, train: np.ndarray):
    if method == "ours":
        return NearestNeighborIndex(torch.from_numpy(train))
    if method == "faiss":
        import faiss

        index = faiss.IndexFlatL2(train.shape[1])
        index.add(train)
        return index
    if method == "cdist":
        return torch.from_numpy(train)
    if method == "mm":
        return {"train": torch.from_numpy(train), "output": None}  # output allocated once, at the first search
    raise ValueError(method)


def search(method: str, index, queries: np.ndarray) -> np.ndarray:
    if method == "mm":  # the matrix product alone: the limit, not a search
        if index["output"] is None:
            index["output"] = torch.empty(queries.shape[0], index["train"].shape[0])
        return torch.mm(torch.from_numpy(queries), index["train"].T, out=index["output"])
    if method == "ours":
        return index.search(torch.from_numpy(queries), k=2)[1].numpy()
    if method == "faiss":
        return index.search(queries, 2)[1]
    if method == "cdist":
        return torch.cdist(torch.from_numpy(queries), index).topk(2, dim=1, largest=False).indices.numpy()
    raise ValueError(method)


def exact_neighbors(train: np.ndarray, queries: np.ndarray, chunk: int = 5000) -> np.ndarray:
    """Float64 brute force, the ground truth."""
    q = torch.from_numpy(queries).double()
    best_d = best_i = None
    for start in range(0, train.shape[0], chunk):
        block = torch.from_numpy(train[start : start + chunk]).double()
        d = torch.cdist(q, block).square()
        d, i = d.topk(2, dim=1, largest=False)
        i += start
        if best_d is not None:
            d, i = torch.cat([best_d, d], 1), torch.cat([best_i, i], 1)
            d, order = d.topk(2, dim=1, largest=False)
            i = i.gather(1, order)
        best_d, best_i = d, i
    return best_i.numpy()



def _reset_peak_rss() -> None:
    """Linux: writing 5 to clear_refs resets the peak resident set (VmHWM) to the current one."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def memory_child(method: str, data_file: str) -> None:
    """Run in a fresh process: peak-RSS growth of build and of search, each above the resident set before it."""
    data = np.load(data_file)
    train, queries = np.ascontiguousarray(data["train"]), np.ascontiguousarray(data["queries"])
    growth = {}
    index = None
    for phase in ("build", "search"):
        before = status_mb("VmRSS")
        _reset_peak_rss()
        if phase == "build":
            index = build(method, train)
        else:
            search(method, index, queries)
        growth[phase + "_mb"] = status_mb("VmHWM") - before
    print(json.dumps(growth))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_train", type=int, default=10_000)
    parser.add_argument("--cifar", action="store_true", help="CIFAR-10 size: --num_train 50000")
    parser.add_argument("--num_queries", type=int, default=1_000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="default: torch's thread count")
    parser.add_argument("--skip_memory", action="store_true")
    parser.add_argument("--_memory_child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.cifar:
        args.num_train = 50_000
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    try:
        import faiss

        faiss.omp_set_num_threads(threads)
        methods = ["ours", "faiss", "cdist"]
    except ImportError:
        print("faiss not installed: `pip install faiss-cpu` for the faiss row")
        methods = ["ours", "cdist"]
    if args._memory_child:
        memory_child(*args._memory_child)
        return

    print(f"machine: {os.cpu_count()} CPUs, {threads} threads for torch and faiss; torch {torch.__version__}")
    if hasattr(os, "getloadavg"):
        print(f"load average before the run: {os.getloadavg()[0]:.1f} (other jobs share this CPU)")
    train, queries = make_data(args.num_train, args.num_queries)
    print(f"data: {train.shape[0]} training x {train.shape[1]} float32, {queries.shape[0]} queries, top-2")

    truth = exact_neighbors(train, queries)
    indexes, build_seconds = {}, {}
    timed = methods + ["mm"]
    for method in timed:
        start = time.perf_counter()
        indexes[method] = build(method, train)
        build_seconds[method] = time.perf_counter() - start
    times = {m: [] for m in timed}
    results = {}
    for _ in range(args.repeats):
        for method in timed:
            start = time.perf_counter()
            results[method] = search(method, indexes[method], queries)
            times[method].append(time.perf_counter() - start)

    memory = {}
    if not args.skip_memory:
        with tempfile.TemporaryDirectory() as tmp:
            data_file = os.path.join(tmp, "data.npz")
            np.savez(data_file, train=train, queries=queries)
            for method in methods:
                out = subprocess.run(
                    [sys.executable, __file__, "--threads", str(threads), "--_memory_child", method, data_file],
                    capture_output=True, text=True, check=True,
                )  # fmt: skip
                memory[method] = json.loads(out.stdout.strip().splitlines()[-1])

    print()
    flop = 2 * args.num_queries * train.shape[0] * train.shape[1]
    gflops = {m: flop / statistics.median(times[m]) / 1e9 for m in timed}
    print(f"torch.mm [{args.num_queries}, {train.shape[1]}] x [{train.shape[1]}, {train.shape[0]}] (the limit): "
          f"median {gflops['mm']:.0f} GFLOP/s, best {flop / min(times['mm']) / 1e9:.0f} GFLOP/s\n")
    header = f"{'method':<34}{'build s':>9}{'median q/s':>12}{'best q/s':>10}{'GFLOP/s':>9}{'of mm':>7}"
    header += f"{'x faiss':>9}{'x cdist':>9}"
    header += f"{'build MB':>10}{'search MB':>11}  {'top-2 = exact':>14}"
    print(header)
    names = {
        "ours": "NearestNeighborIndex (torch)",
        "faiss": "faiss-cpu IndexFlatL2",
        "cdist": "torch.cdist + topk",
    }
    median_qps = {m: args.num_queries / statistics.median(times[m]) for m in methods}
    for method in methods:
        best = args.num_queries / min(times[method])
        vs_faiss = f"{median_qps[method] / median_qps['faiss']:.2f}" if "faiss" in methods else "-"
        vs_cdist = f"{median_qps[method] / median_qps['cdist']:.2f}"
        mem = memory.get(method, {})
        same = int((results[method] == truth).all(1).sum())
        print(
            f"{names[method]:<34}{build_seconds[method]:>9.2f}{median_qps[method]:>12.0f}{best:>10.0f}"
            f"{gflops[method]:>9.0f}{gflops[method] / gflops['mm']:>7.0%}{vs_faiss:>9}"
            f"{vs_cdist:>9}{mem.get('build_mb', float('nan')):>10.0f}{mem.get('search_mb', float('nan')):>11.0f}"
            f"  {same:>6}/{args.num_queries}"
        )
    if "ours" in methods:
        fallbacks = indexes["ours"].last_search_fallbacks
        print(f"NearestNeighborIndex: {fallbacks} of {args.num_queries} queries needed the "
              "float64 fallback in the last round")
    print("\nq/s = queries per second over all queries (median and best of the rounds); x = ratio of medians;")
    print("GFLOP/s = 2 x queries x train x d over the median time; of mm = that over torch.mm's median GFLOP/s;")
    print("MB = growth of peak RSS in a fresh process (build: the index's own copy of the data; search: workspace);")
    print("top-2 = exact: queries whose two neighbours equal a float64 brute force (order included).")


if __name__ == "__main__":
    main()
