"""Training speed against torch threads, idle and beside one busy process, side by side in one run.

``python benchmarks/bench_threads.py [--seconds 5] [--rounds 3] [--images 16] [--batch 16]
[--out benchmarks/results/bench_threads.json]``

What it measures: optimizer steps per second of the main job's training step (``memsep demo``'s base model by
default: the default ``make_dit`` DiT, 4 layers with 4 heads of 32, on 16 embedded 8x8 digits, batch 16, AdamW,
the trainer's ``dsm_loss``; ``--images 64 --batch 64`` is ``memsep train``'s default), for torch intra-op threads
1, 2 and the command line's default (``diffusers_memsep.cli.set_num_threads(None)``, OMP_NUM_THREADS unset), each
(a) with nothing else started by the benchmark ("idle") and (b) beside one busy process (a spinning Python process
this script starts and stops itself). Each measurement runs in a fresh process (threads are fixed at start): 5
warm-up steps, then as many steps as fit in ``--seconds`` of wall time. The conditions are interleaved over
``--rounds`` rounds and the median is reported, so a change in the machine's load hits all of them alike. The load
average at the start of each measurement is printed and saved: on a shared machine "idle" means "nothing started
by this benchmark", not an idle CPU.

OMP_NUM_THREADS is removed from the children's environment (that is what is measured). Results go to ``--out``
(JSON) and are printed as a table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, sys, time
import torch
from diffusers_memsep.cli import set_num_threads
threads = json.loads(sys.argv[1]); seconds = float(sys.argv[2]); count = int(sys.argv[3]); batch = int(sys.argv[4])
chosen = set_num_threads(threads)  # None -> the command line's default
from diffusers_memsep.data import load_training_data
from diffusers_memsep.trainer import dsm_loss, make_dit, make_noise_scheduler
torch.manual_seed(0)
data = load_training_data(max_train_samples=count, seed=0)
model = make_dit(sample_size=data.resolution, in_channels=data.num_channels)
scheduler = make_noise_scheduler(1000)
optimizer = torch.optim.AdamW(model.parameters(), lr=5e-4)
generator = torch.Generator().manual_seed(0)
images = data.images[:batch]

def step():
    timesteps = torch.randint(0, 1000, (images.shape[0],), generator=generator)
    noise = torch.randn(images.shape, generator=generator)
    loss = dsm_loss(model, scheduler, images, None, timesteps, noise)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()

for _ in range(5):
    step()
steps, start = 0, time.perf_counter()
while time.perf_counter() - start < seconds:
    step()
    steps += 1
elapsed = time.perf_counter() - start
print(json.dumps({"threads_set": chosen, "torch_threads": torch.get_num_threads(), "steps": steps,
                  "seconds": elapsed, "steps_per_second": steps / elapsed}))
"""


def measure(threads: int | None, seconds: float, images: int, batch: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("HF_HUB_OFFLINE", "1")
    load = os.getloadavg()[0]
    done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(threads), str(seconds), str(images),
                           str(batch)], env=env,
                          capture_output=True, text=True, timeout=600 + 20 * seconds)
    if done.returncode:
        raise SystemExit(done.stderr[-2000:])
    row = json.loads(done.stdout.strip().splitlines()[-1])
    row["load_average_at_start"] = load
    return row


def main() -> None:
    import statistics

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="Wall time of each measurement.")
    parser.add_argument("--rounds", type=int, default=3, help="Interleaved rounds (median reported).")
    parser.add_argument("--images", type=int, default=16, help="Training images (memsep demo: 16).")
    parser.add_argument("--batch", type=int, default=16, help="Batch size (memsep demo: 16).")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_threads.json"))
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(f"{cores} cores available; {args.rounds} rounds of {args.seconds:.0f} s per measurement; "
          f"{args.images} images, batch {args.batch}; load average at start {os.getloadavg()[0]:.2f}", flush=True)
    measurements = []
    for round_index in range(args.rounds):
        for condition in ("idle", "one busy process"):
            spinner = None
            if condition != "idle":
                spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
                time.sleep(2.0)  # let it take its core
            try:
                for threads in (1, 2, None):
                    row = measure(threads, args.seconds, args.images, args.batch)
                    row.update(condition=condition, threads=threads if threads is not None else "default",
                               round=round_index)
                    measurements.append(row)
                    print(f"round {round_index} | {condition:>16} | threads {str(row['threads']):>7} (torch "
                          f"{row['torch_threads']}) | {row['steps_per_second']:7.2f} steps/s ({row['steps']} steps "
                          f"in {row['seconds']:.1f} s) | load {row['load_average_at_start']:.2f}", flush=True)
            finally:
                if spinner is not None:
                    spinner.terminate()
                    spinner.wait()
    rows = []
    for condition in ("idle", "one busy process"):
        for threads in (1, 2, "default"):
            runs = [m for m in measurements if m["condition"] == condition and m["threads"] == threads]
            rows.append({"condition": condition, "threads": threads, "torch_threads": runs[0]["torch_threads"],
                         "steps_per_second_median": statistics.median(r["steps_per_second"] for r in runs),
                         "steps_per_second_runs": [r["steps_per_second"] for r in runs],
                         "load_average_at_start": [r["load_average_at_start"] for r in runs]})
    idle = {r["threads"]: r["steps_per_second_median"] for r in rows if r["condition"] == "idle"}
    fastest_idle = max(idle.values())
    for row in rows:
        row["fraction_of_idle_same_threads"] = row["steps_per_second_median"] / idle[row["threads"]]
        row["fraction_of_fastest_idle"] = row["steps_per_second_median"] / fastest_idle
    result = {"benchmark": "bench_threads", "cores": cores, "seconds_per_measurement": args.seconds,
              "rounds": args.rounds, "images": args.images, "batch": args.batch,
              "model": "make_dit() defaults: 4 layers x 4 heads x 32, 8x8 digits, AdamW", "rows": rows,
              "measurements": measurements,
              "note": "idle = nothing started by the benchmark; the machine may be shared (see load averages)"}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{'condition':>16} | {'threads':>7} | median steps/s | of idle (same threads) | of the fastest idle")
    for row in rows:
        print(f"{row['condition']:>16} | {str(row['threads']):>7} | {row['steps_per_second_median']:14.2f} | "
              f"{row['fraction_of_idle_same_threads']:22.0%} | {row['fraction_of_fastest_idle']:19.0%}")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
