"""Copy-free sampling (``MemSepPipeline(..., avoid_copies=True)``): what it costs and what the early check saves.

A small DiT that memorizes (trained here on a few digits, or ``--pipeline`` a saved folder with a reference) is
sampled ``--num_samples`` times from one seed in four ways, each from the same generator:

- plain: the copy rate ``p`` (1/3 rule against the training set);
- ``avoid_copies=True`` (``--max_resamples`` redraws): the memorized fraction returned and the denoising steps per
  returned sample, against plain's ``num_inference_steps`` and the bound ``1/(1-p)`` on the expected number of
  trajectories per sample when redraws are unlimited and independent;
- ``avoid_copies=True, copy_check_at=f`` for each ``--check_at`` fraction: the same, with restarts at ``f``;
- plain with ``copy_check_at=f`` (no restart): how well the early distance ratio predicts the final flag, as the ROC
  AUC of ``-early_distance_ratio`` against ``memorized`` (1 = perfect, 0.5 = chance), and the recall and precision
  of the early flag (the 1/3 rule on the predicted clean image) against the final one.

Denoising steps are counted by a forward hook on the transformer (rows per call).

    python benchmarks/bench_copy_free_sampling.py [--n 8 --train_steps 6000 --num_samples 128 --threads 1]
    python benchmarks/bench_copy_free_sampling.py --pipeline outputs/dit-digits

Writes ``--output`` (JSON, default ``outputs/benchmarks/copy_free_sampling.json``) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import torch
from diffusers import DDIMScheduler
from sklearn.metrics import roc_auc_score

from diffusers_memsep import MemSepPipeline
from diffusers_memsep.data import load_training_data
from diffusers_memsep.trainer import TrainingConfig, build_pipeline, make_dit, make_noise_scheduler, train_dit
from diffusers_memsep.utils import write_text


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pipeline", default=None, help="A saved MemSepPipeline with a reference (else: train).")
    parser.add_argument("--n", type=int, default=8, help="Training digits of the model trained here.")
    parser.add_argument("--train_steps", type=int, default=6000)
    parser.add_argument("--learning_rate", type=float, default=3e-3)
    parser.add_argument("--num_samples", type=int, default=128)
    parser.add_argument("--num_inference_steps", type=int, default=50, help="DDIM steps.")
    parser.add_argument("--max_resamples", type=int, default=8)
    parser.add_argument("--check_at", type=float, nargs="+", default=[0.25, 0.5, 0.75, 0.9])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="Torch threads (1: fastest on a shared CPU).")
    parser.add_argument("--output", default="outputs/benchmarks/copy_free_sampling.json")
    return parser.parse_args(argv)


def memorizing_pipeline(args) -> tuple[MemSepPipeline, dict]:
    """The pipeline to sample: loaded, or a small DiT trained on ``args.n`` digits until it copies them."""
    if args.pipeline:
        pipe = MemSepPipeline.from_pretrained(args.pipeline)
        setting = {"pipeline": args.pipeline}
    else:
        data = load_training_data(max_train_samples=args.n, seed=args.seed)
        torch.manual_seed(args.seed)
        model = make_dit(sample_size=data.resolution, in_channels=data.num_channels, num_classes=None, num_layers=2,
                         num_attention_heads=2, attention_head_dim=32)
        scheduler = make_noise_scheduler()
        config = TrainingConfig(max_train_steps=args.train_steps, train_batch_size=16,
                                learning_rate=args.learning_rate, lr_warmup_steps=20, ema_max_decay=0.99,
                                seed=args.seed, show_progress=False)
        start = time.perf_counter()
        print(f"training a DiT on {args.n} digits for {args.train_steps} steps ...", flush=True)
        result = train_dit(model, data, scheduler, config)
        pipe = build_pipeline(result.sampling_model, scheduler, data)
        setting = {"n": args.n, "train_steps": args.train_steps, "learning_rate": args.learning_rate,
                   "model": "DiT 2 layers x 2 heads of 32, patch 2", "train_seconds": time.perf_counter() - start}
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe, setting


class StepCounter:
    """Denoising steps spent: the rows of every transformer call (the samples here are unconditional, unguided)."""

    def __init__(self, model):
        self.steps = 0
        model.register_forward_pre_hook(self)

    def __call__(self, module, args):
        self.steps += args[0].shape[0]


def run(pipe, counter, args, **kwargs) -> tuple[object, float]:
    print(f"sampling {args.num_samples} ({kwargs or 'plain'}) ...", flush=True)
    counter.steps = 0
    generator = torch.Generator().manual_seed(1000 * args.seed)
    output = pipe(batch_size=args.num_samples, num_inference_steps=args.num_inference_steps, generator=generator,
                  output_type="pt", **kwargs)
    return output, counter.steps / args.num_samples


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    pipe, setting = memorizing_pipeline(args)
    counter = StepCounter(pipe.transformer)
    plain, plain_steps = run(pipe, counter, args)
    p = float(plain.memorized.float().mean())
    rows = [{"sampling": "plain", "memorized_returned": p, "steps_per_sample": plain_steps,
             "mean_resamples": 0.0}]
    free, steps = run(pipe, counter, args, avoid_copies=True, max_resamples=args.max_resamples)
    rows.append({"sampling": "avoid_copies", "memorized_returned": float(free.memorized.float().mean()),
                 "steps_per_sample": steps, "mean_resamples": float(free.num_resamples.float().mean())})
    early_checks = []
    for fraction in args.check_at:
        checked, steps = run(pipe, counter, args, avoid_copies=True, max_resamples=args.max_resamples,
                             copy_check_at=fraction)
        rows.append({"sampling": f"avoid_copies, copy_check_at={fraction:g}",
                     "memorized_returned": float(checked.memorized.float().mean()), "steps_per_sample": steps,
                     "mean_resamples": float(checked.num_resamples.float().mean())})
        probe, _ = run(pipe, counter, args, copy_check_at=fraction)  # no restart: early ratio vs final flag
        final, early = probe.memorized.numpy(), probe.early_distance_ratio.numpy()
        early_flag = early <= 1 / 9
        early_checks.append({
            "copy_check_at": fraction,
            "auc": float(roc_auc_score(final, -early)) if 0 < final.sum() < len(final) else float("nan"),
            "early_flag_recall": float(early_flag[final].mean()) if final.any() else float("nan"),
            "early_flag_precision": float(final[early_flag].mean()) if early_flag.any() else float("nan"),
        })
    for row in rows:
        row["steps_vs_plain"] = row["steps_per_sample"] / plain_steps
    record = {"setting": setting, "num_samples": args.num_samples, "sampler": f"DDIM-{args.num_inference_steps}",
              "max_resamples": args.max_resamples, "seed": 1000 * args.seed, "copy_rate_plain": p,
              "bound_trajectories_per_sample": 1 / (1 - p) if p < 1 else float("inf"), "rows": rows,
              "early_checks": early_checks, "threads": args.threads, "machine": platform.processor() or "cpu"}
    write_text(args.output, json.dumps(record, indent=2) + "\n")
    print(f"copy rate of plain sampling p = {p:.3f}; bound 1/(1-p) = {record['bound_trajectories_per_sample']:.2f} "
          f"trajectories per sample ({args.num_samples} samples, DDIM-{args.num_inference_steps}, "
          f"max_resamples {args.max_resamples})\n")
    print("| sampling | memorized returned | denoising steps per sample | x plain | mean redraws |")
    print("|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['sampling']} | {row['memorized_returned']:.3f} | {row['steps_per_sample']:.1f} | "
              f"{row['steps_vs_plain']:.2f} | {row['mean_resamples']:.2f} |")
    print("\n| copy_check_at | AUC (early ratio vs final flag) | early flag recall | early flag precision |")
    print("|---|---|---|---|")
    for row in early_checks:
        print(f"| {row['copy_check_at']:g} | {row['auc']:.3f} | {row['early_flag_recall']:.3f} | "
              f"{row['early_flag_precision']:.3f} |")
    print(f"\nwrote {args.output}")
    return record


if __name__ == "__main__":
    main()
