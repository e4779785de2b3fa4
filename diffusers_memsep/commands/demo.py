"""``memsep demo`` (``make demo``): the main job on the embedded digits, offline, on a CPU in minutes.

Trains a DiT on a small digits subset until it memorizes, prunes half of its heads with small-time head importance
(the paper), random pruning and the inverse selection (small_t_top), fine-tunes, evaluates all on the same seeds,
and writes the report, figures, variants and model cards under ``--output_dir``. ``--quick`` is a seconds-long smoke
run (tiny model, few steps) for tests.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from diffusers_memsep.commands.arguments import (
    add_pruning_arguments,
    add_quality_arguments,
    check_quality_arguments,
    pruning_config,
)
from diffusers_memsep.demo import DemoConfig, run_demo
from diffusers_memsep.hub import require_templates
from diffusers_memsep.study.settings import DEFAULT_TRAIN_TIMESTEPS, dit_num_heads


def add_arguments(parser: argparse.ArgumentParser) -> None:
    default = DemoConfig()
    parser.add_argument("--output_dir", default=default.output_dir)
    parser.add_argument("--num_train_samples", type=int, default=default.num_train_samples,
                        help="n: training images drawn from the 1,797 digits (small n memorizes).")
    parser.add_argument("--data_seed", type=int, default=default.data_seed)
    parser.add_argument("--conditional", action="store_true", help="Class-conditional model (default: unconditional).")
    parser.add_argument("--train_steps", type=int, default=default.train.max_train_steps)
    parser.add_argument("--learning_rate", type=float, default=default.train.learning_rate)
    add_pruning_arguments(parser, default.study)
    parser.add_argument("--quick", action="store_true", help="Tiny smoke run (seconds): checks the wiring only.")
    add_quality_arguments(parser)


def run(args: argparse.Namespace) -> int:
    require_templates("base_model", "pruned_variant")  # the base model's card and every variant's
    check_quality_arguments(args)
    default = DemoConfig()
    train = replace(default.train, max_train_steps=args.train_steps, learning_rate=args.learning_rate)
    config = DemoConfig(output_dir=args.output_dir, num_train_samples=args.num_train_samples,
                        data_seed=args.data_seed, conditional=args.conditional, train=train,
                        study=pruning_config(args, default.study), feature_space=args.feature_space,
                        inception_weights=args.inception_weights)
    if args.quick:
        config = quick_config(config)
    # Before training: an eta that removes no head of the demo's DiT (or a switch outside its schedule) is refused.
    config.study.check_against_model(dit_num_heads(config.model), DEFAULT_TRAIN_TIMESTEPS)
    result = run_demo(config)
    print(result.study.report_path.read_text())
    print(f"Trained in {result.train_seconds / 60:.1f} min; whole demo {result.total_seconds / 60:.1f} min.")
    print(f"Results: {result.output_dir.resolve()}  (report.md, summary.csv, runs.csv, pareto.png, "
          f"samples_nearest.png; base pipeline in base/, pruned variants in variants/)")
    return 0


def quick_config(config: DemoConfig) -> DemoConfig:
    """A seconds-long run of the same code path (tiny model, few steps, few samples): wiring, not results."""
    train = replace(config.train, max_train_steps=4, train_batch_size=16, lr_warmup_steps=0, show_progress=False)
    study = replace(config.study, seeds=config.study.seeds[:1], num_samples=16, num_inference_steps=4,
                    importance_batches=1, importance_batch_size=8,
                    finetune=replace(config.study.finetune, max_train_steps=2, train_batch_size=8))
    return replace(config, num_train_samples=min(config.num_train_samples, 32), train=train, study=study,
                   model=dict(num_layers=2, num_attention_heads=4, attention_head_dim=8))
