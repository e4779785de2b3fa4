#!/usr/bin/env python
"""Cost of head scoring (Algorithm 2) and of physical pruning at the paper's real model size, DiT-XL/2.

    python benchmarks/bench_dit_xl_cost.py [--batch_sizes 1 2 4] [--device cpu|cuda] [--eta 0.2]

What: a ``PrunableDiTTransformer2DModel`` the size of DiT-XL/2 (28 layers, 16 heads of 72, patch 2, latent
32x32x4, 1000 classes, learned sigma: 8 output channels) with random weights (cost does not depend on the values),
float32. diffusers' DiT gives every block its own timestep/class embedding, so this layout has 750M parameters
(the original DiT-XL/2, with one shared embedding, has 675M).
Measured, each in a fresh subprocess (so one measurement's allocations cannot hide another's):

- one Algorithm-2 batch: ``small_time_head_importance(num_batches=1, batch_size=b)`` (forward, backward to the
  head mask, accumulation) for each ``b`` of ``--batch_sizes``;
- one physical pruning: ``prune_heads`` removing ``--eta`` of the heads (the lowest of random scores).

Seconds are wall time of one call (after the model is built; on CUDA with ``synchronize``). Memory is the growth of
the peak during the call: on CPU the process's peak resident set (Linux ``VmHWM``, reset before the call), on CUDA
``torch.cuda.max_memory_allocated`` (reset before the call). The model's own size is printed separately.
The cost of the paper's scoring run (16 batches of 64) is an EXTRAPOLATION from the largest measured batch:
time linear in the number of images, peak memory linear in the batch size (fit through the two largest batches).
Results are printed as markdown. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch
from _memory import status_mb  # noqa: E402  (benchmarks/ is on sys.path when run as a script)

XL_CONFIG = dict(num_layers=28, num_attention_heads=16, attention_head_dim=72, patch_size=2, sample_size=32,
                 in_channels=4, out_channels=8, num_embeds_ada_norm=1000)



def _reset_peak(device: torch.device) -> float:
    """Reset the peak-memory counter; return the current memory in MB (the baseline of the measurement)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20
    with open("/proc/self/clear_refs", "w") as clear_refs:  # Linux: 5 resets VmHWM to the current RSS
        clear_refs.write("5")
    return status_mb("VmRSS")


def _peak(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    return status_mb("VmHWM")


def measure(task: str, batch_size: int, eta: float, device: torch.device) -> dict:
    """Run in a fresh process: build the model, then time one call and the growth of peak memory during it."""
    from diffusers_memsep import PrunableDiTTransformer2DModel
    from diffusers_memsep.data import TrainingData
    from diffusers_memsep.pruning import random_head_importance, select_heads_to_prune, small_time_head_importance
    from diffusers_memsep.trainer import make_noise_scheduler

    before_model = _reset_peak(device)
    torch.manual_seed(0)
    model = PrunableDiTTransformer2DModel(**XL_CONFIG).to(device).eval()
    model_mb = _peak(device) - before_model
    result = {"task": task, "batch_size": batch_size, "parameters": model.num_parameters(), "model_mb": model_mb}
    if task == "score":
        generator = torch.Generator().manual_seed(0)
        data = TrainingData(images=torch.randn(64, 4, 32, 32, generator=generator).clamp(-1, 1),
                            labels=torch.randint(0, 1000, (64,), generator=generator), num_classes=1000,
                            source="random latents")
        scheduler = make_noise_scheduler()
        baseline = _reset_peak(device)
        start = time.perf_counter()
        small_time_head_importance(model, data, scheduler, num_batches=1, batch_size=batch_size)
    else:
        heads = select_heads_to_prune(random_head_importance(model), eta)
        result["pruned_heads"] = sum(len(h) for h in heads.values())
        baseline = _reset_peak(device)
        start = time.perf_counter()
        model.prune_heads(heads)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    result["seconds"] = time.perf_counter() - start
    result["peak_growth_mb"] = _peak(device) - baseline
    return result


def run_child(task: str, batch_size: int, eta: float, device: str) -> dict:
    command = [sys.executable, __file__, "--_child", task, str(batch_size), str(eta), device]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"measurement {task} (batch {batch_size}) failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def extrapolate(scores: list[dict], num_batches: int, batch_size: int) -> tuple[float, float]:
    """(seconds, peak MB) of ``num_batches`` batches of ``batch_size`` from the measured batches."""
    scores = sorted(scores, key=lambda r: r["batch_size"])
    largest = scores[-1]
    seconds = num_batches * batch_size * largest["seconds"] / largest["batch_size"]
    if len(scores) >= 2:
        small = scores[-2]
        growth = largest["peak_growth_mb"] - small["peak_growth_mb"]
        per_image = growth / (largest["batch_size"] - small["batch_size"])
    else:
        per_image = largest["peak_growth_mb"] / largest["batch_size"]
    peak = largest["peak_growth_mb"] + per_image * (batch_size - largest["batch_size"])
    return seconds, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--eta", type=float, default=0.2)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--_child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        task, batch_size, eta, device = args._child
        print(json.dumps(measure(task, int(batch_size), float(eta), torch.device(device))))
        return
    if not all(b >= 1 for b in args.batch_sizes):
        parser.error(f"--batch_sizes must be >= 1, got {args.batch_sizes}")
    if not 0 < args.eta < 1:
        parser.error(f"--eta must be in (0, 1), got {args.eta}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available; use --device cpu")

    scores = [run_child("score", b, args.eta, args.device) for b in args.batch_sizes]
    prune = run_child("prune", 0, args.eta, args.device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else (
        f"CPU, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads")
    memory = "torch.cuda.max_memory_allocated" if device.type == "cuda" else "peak RSS (VmHWM)"
    print(f"## DiT-XL/2-sized model: head scoring and pruning cost ({where})\n")
    print(f"Random-weight `PrunableDiTTransformer2DModel` (28 layers x 16 heads of 72, latent 32x32x4, patch 2, "
          f"1000 classes, learned sigma), {scores[0]['parameters'] / 1e6:.0f}M parameters, float32, "
          f"torch {torch.__version__}; the model itself takes {scores[0]['model_mb']:.0f} MB. "
          f"One call per row, each in a fresh process; memory = growth of {memory} during the call.")
    if hasattr(os, "getloadavg") and device.type == "cpu":
        print(f"Load average at the end: {os.getloadavg()[0]:.1f} (other jobs shared this CPU).")
    print("\n| measured | seconds | peak memory growth (MB) |\n|---|---:|---:|")
    for row in scores:
        print(f"| one Algorithm-2 batch, batch size {row['batch_size']} | {row['seconds']:.1f} | "
              f"{row['peak_growth_mb']:.0f} |")
    print(f"| physical pruning of {prune['pruned_heads']} of 448 heads ({args.eta:.0%}) | "
          f"{prune['seconds']:.2f} | {prune['peak_growth_mb']:.0f} |")
    seconds, peak = extrapolate(scores, 16, 64)
    print(f"\n**Extrapolation, not measured**: the paper's scoring run, 16 batches of 64, would take about "
          f"{seconds / 60:.0f} min ({seconds / 3600:.1f} h) here (time linear in the number of images, from batch "
          f"size {max(args.batch_sizes)}) and about {peak / 1024:.1f} GB of peak memory growth for one batch of 64 "
          f"(linear in the batch size through the two largest measured batches), on top of the model.")


if __name__ == "__main__":
    main()
