"""Peak memory of a training-set reference kept as on-disk shards, against one in-memory index.

    python benchmarks/bench_reference_shards.py [--num_train 40000] [--dim 3072] [--shard 2000] [--queries 200]

Each measurement runs in a fresh process and reports the growth of its peak resident memory (``ru_maxrss``) over
the process right after ``import torch``: (1) building the shards from chunks generated one at a time (as a streamed
data set yields them), (2) searching them (one shard in memory at a time), (3) building and searching one
``NearestNeighborIndex`` over all rows (the whole set in memory). It checks that (2) returns the same neighbours as
(3) and prints the times. It never asserts a number.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

CHILD = r"""
import json, resource, sys, time
import torch
torch.set_num_threads(2)
mode, folder, n, d, shard, q = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:7])
def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
def chunk(i, size):
    return torch.randn(size, d, generator=torch.Generator().manual_seed(i))
base = peak_mb()
queries = torch.randn(q, d, generator=torch.Generator().manual_seed(10**6))
start = time.perf_counter()
from diffusers_memsep.memorization import NearestNeighborIndex
from diffusers_memsep.memorization.shards import ShardedReference, save_reference_shards
base = max(base, peak_mb())
if mode == "build":
    save_reference_shards((chunk(i, min(shard, n - s)) for i, s in enumerate(range(0, n, shard))), folder)
    out = None
elif mode == "search":
    out = ShardedReference(folder).search(queries, k=2)[1]
else:
    full = torch.cat([chunk(i, min(shard, n - s)) for i, s in enumerate(range(0, n, shard))])
    out = NearestNeighborIndex(full).search(queries, k=2)[1]
seconds = time.perf_counter() - start
if out is not None:
    torch.save(out, folder + f"/{mode}.pt")
print(json.dumps({"peak_growth_mb": peak_mb() - base, "seconds": seconds}))
"""


def run(mode: str, folder: str, args) -> dict:
    done = subprocess.run([sys.executable, "-c", CHILD, mode, folder, str(args.num_train), str(args.dim),
                           str(args.shard), str(args.queries)], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_train", type=int, default=40000)
    parser.add_argument("--dim", type=int, default=3072)
    parser.add_argument("--shard", type=int, default=2000)
    parser.add_argument("--queries", type=int, default=200)
    args = parser.parse_args()
    import torch

    data_mb = args.num_train * args.dim * 4 / 2**20
    shard_mb = args.shard * args.dim * 4 / 2**20
    print(f"training set {args.num_train} x {args.dim} float32 = {data_mb:.0f} MB; shards of {args.shard} rows = "
          f"{shard_mb:.1f} MB; {args.queries} queries, top-2; load average "
          f"{open('/proc/loadavg').read().split()[0]}")
    with tempfile.TemporaryDirectory() as folder:
        results = {mode: run(mode, folder, args) for mode in ("build", "search", "in_memory")}
        same = torch.equal(torch.load(f"{folder}/search.pt"), torch.load(f"{folder}/in_memory.pt"))
    print(f"{'measured':<34} {'peak memory growth MB':>22} {'x data':>8} {'seconds':>9}")
    for mode, title in (("build", "build shards from chunks"), ("search", "search the shards"),
                        ("in_memory", "one in-memory index: build + search")):
        growth = results[mode]["peak_growth_mb"]
        print(f"{title:<34} {growth:>22.0f} {growth / data_mb:>8.2f} {results[mode]['seconds']:>9.1f}")
    print(f"same neighbours as the in-memory index: {same}")
    print("peak growth = ru_maxrss of a fresh process minus its value right after importing torch and the library")


if __name__ == "__main__":
    main()
