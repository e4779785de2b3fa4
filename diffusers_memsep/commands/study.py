"""``memsep study``: the replicated pruning study (several base models x conditions x seeds, paired statistics).

Runs ``original``, ``finetune_only`` (the fine-tuning control), ``early_stop`` and every ``--methods`` x ``--etas`` on
``--num_base_models`` independently trained base models per setting, and writes ``report.md`` (tables, paired
95% intervals against random, finetune_only and early_stop, Holm-Bonferroni verdicts), ``runs.csv``,
``summary.csv`` and ``pareto.png`` under ``--output_dir``. Resumable: rerun the same command to continue; finished
runs are skipped. ``--quick`` is a minutes-long profile of the same code path; the default profile fits in an hour
on a 2-core CPU (budget: ``docs/study.md``). Any image folder or Hub dataset adds a setting through the data flags.
"""

from __future__ import annotations

import argparse
from dataclasses import replace

from diffusers_memsep.commands.arguments import add_data_arguments
from diffusers_memsep.pruning import METHODS
from diffusers_memsep.study import (
    BUILTIN_SETTINGS,
    StudyConfig,
    StudySetting,
    builtin_setting,
    full_config,
    quick_config,
    run_study,
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    default = StudyConfig()
    parser.add_argument("--output_dir", default=None, help="Default: outputs/study (--quick: outputs/study-quick).")
    parser.add_argument("--quick", action="store_true", help="Tiny profile (minutes): the wiring and the run costs.")
    parser.add_argument("--settings", nargs="*", default=None, choices=BUILTIN_SETTINGS,
                        help="Built-in settings (default: both; none with a data flag runs only that data).")
    parser.add_argument("--num_base_models", type=int, default=None)
    parser.add_argument("--methods", nargs="+", default=None, choices=METHODS)
    parser.add_argument("--etas", nargs="+", type=float, default=None)
    parser.add_argument("--seeds", nargs="+", type=int, default=None)
    parser.add_argument("--base_train_steps", type=int, default=None,
                        help="Training steps of every base model (default 5,000).")
    parser.add_argument("--checkpoint_every", type=int, default=None,
                        help="Validation (and checkpoint) interval of the early-stopped run.")
    parser.add_argument("--finetune_steps", type=int, default=None, help="Fine-tuning steps of every pruned row.")
    parser.add_argument("--early_stop_threshold", type=float, default=default.early_stop_threshold,
                        help="Memorization ratio above which training counts as memorizing (early_stop row).")
    remedies = parser.add_argument_group("remedies (rows beside the pruning methods)")
    remedies.add_argument("--weight_decays", nargs="*", type=float, default=None,
                          help=f"AdamW weight decays of extra base models (default {list(default.weight_decays)}; "
                               "none: --weight_decays with no value).")
    remedies.add_argument("--no_copy_free", action="store_true",
                          help="Leave out the copy-free sampling rows (original, original with the early check, "
                               "early_stop, weight decays, --copy_free_methods).")
    remedies.add_argument("--copy_free_methods", nargs="*", default=None,
                          help=f"Pruning methods whose pruned models are also sampled copy-free (default "
                               f"{list(default.copy_free_methods)}; none: the flag with no value).")
    remedies.add_argument("--max_resamples", type=int, default=None,
                          help=f"Redraws per sample of copy-free sampling (default {default.max_resamples}).")
    remedies.add_argument("--copy_check_at", type=float, default=None,
                          help=f"Early check of the (check) row, a fraction of the denoising steps (default "
                               f"{default.copy_check_at:g}).")
    parser.add_argument("--quality_metric", default=default.quality_metric,
                        help="Metric column on the y axis of pareto.png (e.g. frechet_distance, kid).")
    parser.add_argument("--max_runs", type=int, default=None, help="Stop after this many new runs (rerun continues).")
    parser.add_argument("--num_workers", type=int, default=None,
                        help="Processes that train and evaluate base models side by side (default: one per core).")
    data = parser.add_argument_group("extra setting (any image folder or Hub dataset)")
    add_data_arguments(data, resolution_help="Side of the images (default: their own size).")
    data.add_argument("--validation_data_dir", default=None,
                      help="Held-out images for memorization_gap (default: the data minus the training subset).")
    data.add_argument("--num_train_samples", type=int, default=16, help="Training images per base model.")
    data.add_argument("--setting_name", default="custom", help="Name of the extra setting in the report.")


def run(args: argparse.Namespace) -> int:
    config = quick_config() if args.quick else full_config()
    extra = bool(args.dataset_name or args.train_data_dir)
    names = args.settings if args.settings is not None else ([] if extra else [s.name for s in config.settings])
    profile = {s.name: s for s in config.settings}  # a built-in setting outside the profile gets the profile's DiT
    settings = [profile.get(name) or builtin_setting(name, config.settings[0].model) for name in names]
    model = dict(config.settings[0].model)  # the profile's DiT (digits8's) for an extra setting
    if extra:
        settings.append(StudySetting(args.setting_name, dataset_name=args.dataset_name,
                                     dataset_config_name=args.dataset_config_name, train_data_dir=args.train_data_dir,
                                     dataset_revision=args.dataset_revision,
                                     validation_data_dir=args.validation_data_dir, image_column=args.image_column,
                                     label_column=args.label_column, resolution=args.resolution,
                                     num_train_samples=args.num_train_samples, model=model))
    elif args.validation_data_dir:
        raise ValueError("--validation_data_dir belongs to an extra setting; pass --train_data_dir or --dataset_name "
                         "with it.")
    overrides = {key: (tuple(value) if isinstance(value, list) else value) for key, value in (
        ("output_dir", args.output_dir), ("num_base_models", args.num_base_models), ("methods", args.methods),
        ("etas", args.etas), ("seeds", args.seeds), ("weight_decays", args.weight_decays),
        ("max_resamples", args.max_resamples), ("copy_check_at", args.copy_check_at),
        ("copy_free_methods", args.copy_free_methods)) if value is not None}
    if args.no_copy_free:
        overrides["copy_free"] = False
    if args.base_train_steps is not None:
        overrides["base_train"] = replace(config.base_train, max_train_steps=args.base_train_steps)
        settings = [replace(s, base_train={k: v for k, v in s.base_train.items() if k != "max_train_steps"})
                    for s in settings]  # the flag sets every setting's steps
    if args.checkpoint_every is not None:
        overrides["checkpoint_every"] = args.checkpoint_every
    if args.finetune_steps is not None:
        overrides["finetune"] = replace(config.finetune, max_train_steps=args.finetune_steps)
    if args.etas is not None:
        overrides["method_etas"] = {}  # explicit etas apply to every method
    config = replace(config, settings=tuple(settings), early_stop_threshold=args.early_stop_threshold,
                     quality_metric=args.quality_metric, max_runs=args.max_runs, num_workers=args.num_workers,
                     **overrides)
    result = run_study(config)
    if result.rows:
        print(result.report_path.read_text())
    print(f"{result.executed_runs} runs executed, {result.skipped_runs} already done, {result.missing_runs} still "
          f"missing; {result.trained_base_models} base models trained; {result.seconds / 60:.1f} min. "
          f"Results: {config.output_dir}")
    return 0
