"""Measure the model-only memorization scores against the paper's exact 1/3-rule labels.

    python scripts/measure_model_score.py --output_dir outputs/model_score

For every setting (digits8 unconditional and class-conditional, colour16, patches32) a small DiT is trained in
memory on a few images until it memorizes; at several training lengths its EMA weights sample ``--num_samples``
images (DDIM), each labelled memorized or not by the paper's rule against the training images, and scored by every
method of :mod:`diffusers_memsep.memorization.model_score` without them. Reported per checkpoint: the memorized
share, ROC AUC and TPR at 1% FPR with 95% bootstrap intervals, and the flags of the documented threshold
(TPR/FPR). Writes ``report.md`` and ``model_score.json`` atomically (after every setting).

``--variants`` scores some columns only; ``--update JSON`` retrains an earlier run's models, checks that they sample
its exact labels and replaces only the rescored columns (``--keep_as SUFFIX`` keeps the earlier values beside);
``--render`` and ``--summarize`` measure nothing and write one report of several runs, or the table of every run.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from diffusers import DDIMScheduler
from sklearn.metrics import roc_auc_score

from diffusers_memsep.builtin_data import colour_digits_folder, patches32_folder
from diffusers_memsep.data import load_training_data
from diffusers_memsep.memorization.model_score import THRESHOLDS, extract_training_images, memorization_score
from diffusers_memsep.trainer import TrainingConfig, build_pipeline, make_dit, make_noise_scheduler, train_dit
from diffusers_memsep.utils import write_text

SMALL = dict(num_layers=2, num_attention_heads=4, attention_head_dim=16)
SETTINGS = {
    "digits8": dict(data={}, model=dict(SMALL, patch_size=2), n=8, steps=[1000, 2000, 3000, 4000]),
    "digits8-conditional": dict(data={"label_column": "label"}, model=dict(SMALL, patch_size=2), n=10,
                                steps=[500, 1000, 1500, 2000]),
    # with 4 images and this DiT, neither copied by the 1/3 rule within 4,000 steps: 2 images, wider heads, lr 3e-3
    "colour16": dict(data={"builtin": "colour16"}, model=dict(SMALL, patch_size=4, attention_head_dim=32), n=2,
                     steps=[1500, 3000, 4500, 6000], lr=3e-3),
    # two random patches never copied by the 1/3 rule (4 of heads 32, 2 of heads 32 or 64, up to 6,000 steps): the
    # samples took the structure of one training patch at about the mean brightness of the two (a flat patch's
    # brightness barely survives the DiT's layer norms), so the pair is the most different two of 64 patches whose
    # mean brightness differs by less than 0.1 (on the [-1, 1] scale)
    "patches32": dict(data={"builtin": "patches32"}, model=dict(SMALL, patch_size=4, attention_head_dim=32), n=2,
                      steps=[1000, 2000, 3000, 4000], lr=1e-3, pair_of=64),
}
METHOD_VARIANTS = {
    "renoise (t=0.4T)": ("renoise", {"level": 0.4}),
    "renoise (t=0.2T)": ("renoise", {"level": 0.2}),
    "renoise_spread (t=0.4T)": ("renoise_spread", {"level": 0.4}),
    "renoise_spread (t=0.2T)": ("renoise_spread", {"level": 0.2}),
    "denoise_loss": ("denoise_loss", {}),
    "cond_gap": ("cond_gap", {}),
    # chosen on a development run (seed 1: other training images, initialisation and noise), not on these numbers
    "renoise (t=0.2T, 32 draws)": ("renoise", {"repeats": 32}),
    "renoise_levels": ("renoise_levels", {}),
    "fixed_point": ("fixed_point", {}),
    # chosen on the development run among the iterated re-noising variants below (same cost as 32 draws)
    "renoise (t=0.2T, 16 draws, 2 iterations)": ("renoise", {"repeats": 16, "iterations": 2}),
    # the 1/3 rule against training images extracted from the model (falls back to renoise, 16 draws, when none are)
    "extraction": ("extraction", {}),
    # the same bank clustered without the rescue of stable samples left alone (the design before it)
    "extraction (without rescue)": ("extraction", {"rescue": False}),
}


#: The variants compared on the development run (``--seed 1 --development_variants``), from which the columns above
#: were chosen: more draws at 0.2 T, re-noising combined over levels, the one-step fixed-point residual at levels.
DEVELOPMENT_VARIANTS = {
    "renoise (t=0.2T, 8 draws)": ("renoise", {"repeats": 8}),
    "renoise (t=0.2T, 16 draws)": ("renoise", {"repeats": 16}),
    "renoise (t=0.2T, 8 draws, 5 steps)": ("renoise", {"repeats": 8, "steps": 5}),
    "renoise (t=0.2T, 8 draws, 20 steps)": ("renoise", {"repeats": 8, "steps": 20}),
    "renoise (t=0.25T, 8 draws)": ("renoise", {"repeats": 8, "level": 0.25}),
    "renoise_levels (0.1T, 0.2T, 0.3T; 4 draws)": ("renoise_levels", {"levels": (0.1, 0.2, 0.3), "repeats": 4}),
    "renoise_levels (0.15T, 0.2T, 0.3T; 8 draws)": ("renoise_levels", {"levels": (0.15, 0.2, 0.3), "repeats": 8}),
    "renoise_levels (0.2T, 0.25T; 8 draws)": ("renoise_levels", {"levels": (0.2, 0.25), "repeats": 8}),
    "fixed_point (t=0.2T, 8 draws)": ("fixed_point", {"draws": 8}),
    "fixed_point (t=0.15T)": ("fixed_point", {"levels": (0.15,)}),
    "fixed_point (t=0.25T)": ("fixed_point", {"levels": (0.25,)}),
    "fixed_point (t=0.3T)": ("fixed_point", {"levels": (0.3,)}),
    "fixed_point (0.1T, 0.2T, 0.3T; 8 draws)": ("fixed_point", {"levels": (0.1, 0.2, 0.3), "draws": 8}),
    # the re-noise-and-denoise map applied several times: a near copy is carried onto its training image
    "renoise (t=0.2T, 8 draws, 2 iterations)": ("renoise", {"repeats": 8, "iterations": 2}),
    "renoise (t=0.2T, 8 draws, 4 iterations)": ("renoise", {"repeats": 8, "iterations": 4}),
}
TPR_COLUMNS = ("renoise (t=0.2T)", "renoise (t=0.2T, 32 draws)", "extraction")


def training_data(spec: dict, output_dir: Path, n: int, seed: int = 0):
    builtin = spec["data"].get("builtin")
    kwargs = {k: v for k, v in spec["data"].items() if k != "builtin"}
    if builtin == "colour16":

        kwargs["train_data_dir"] = colour_digits_folder(output_dir)
    elif builtin == "patches32":
        kwargs["train_data_dir"] = patches32_folder(output_dir)
    if kwargs.get("label_column"):  # one image per class: a balanced conditional training set
        population = load_training_data(**kwargs)
        rows = [int((population.labels == c).nonzero()[seed]) for c in range(population.num_classes)][:n]
        return replace(population, images=population.images[rows], labels=population.labels[rows],
                       indices=rows, source=f"{population.source}: "
                       + (f"image {seed} of each class" if seed else "first image of each class"))
    if spec.get("pair_of"):
        return equal_brightness_pair(load_training_data(**kwargs, max_train_samples=spec["pair_of"], seed=seed))
    return load_training_data(**kwargs, max_train_samples=n, seed=seed)


def equal_brightness_pair(data, tolerance: float = 0.1):
    """The two most distant images of ``data`` among the pairs whose mean brightness differs by less than
    ``tolerance``."""
    flat = data.images.flatten(1)
    means = flat.mean(1)
    distance = torch.cdist(flat, flat) * ((means[:, None] - means[None]).abs() < tolerance)
    first, second = divmod(int(distance.argmax()), len(flat))
    rows = sorted([first, second])
    return replace(data, images=data.images[rows], labels=None if data.labels is None else data.labels[rows],
                   indices=None if data.indices is None else [data.indices[r] for r in rows],
                   source=f"{data.source}: the most different 2 of {len(flat)} with mean brightness within "
                          f"{tolerance:g}")


def tpr_at_fpr(scores, labels, fpr=0.01):
    negatives, positives = np.sort(scores[~labels]), scores[labels]
    allowed = int(np.floor(fpr * len(negatives)))
    cut = negatives[len(negatives) - allowed - 1]
    return float((positives > cut).mean())


def bootstrap(scores, labels, function, rounds=500, seed=0):
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(rounds):
        pick = rng.integers(0, len(scores), len(scores))
        if labels[pick].all() or not labels[pick].any():
            continue
        values.append(function(scores[pick], labels[pick]))
    return [float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))] if values else [None, None]


def evaluate(pipe, data, num_samples, seed, variants=None):
    labels = None
    if data.labels is not None:
        labels = data.labels[torch.arange(num_samples) % len(data)]
    output = pipe(class_labels=labels, batch_size=None if labels is not None else num_samples,
                  num_inference_steps=25, output_type="pt", generator=torch.Generator().manual_seed(seed))
    truth = output.memorized.numpy().astype(bool)
    row = {"memorized_share": float(truth.mean()), "num_samples": num_samples, "memorized": truth.tolist(),
           "methods": {}}
    if truth.any() and (~truth).any():  # the ceiling of a score that sees only the nearest training image
        nearest = torch.cdist(output.images.flatten(1) * 2 - 1, data.images.flatten(1)).min(1).values
        row["nearest_distance_auc"] = float(roc_auc_score(truth, -nearest.numpy()))
    bank = None  # the extraction variants differ after the bank: it is sampled and scored once per checkpoint
    for variant, (method, kwargs) in METHOD_VARIANTS.items():
        if (method == "cond_gap" and labels is None) or (variants and variant not in variants):
            continue
        start = time.perf_counter()
        if method == "extraction":
            extracted = extract_training_images(pipe, from_extraction=bank, **kwargs)
            bank = extracted if bank is None else bank
            kwargs = {"extracted": extracted}
        result = memorization_score(pipe, output.images, class_labels=labels, method=method, **kwargs)
        scores = result.score.numpy().astype(np.float64)
        entry = {"seconds": round(time.perf_counter() - start, 2), "scored_by": result.method,
                 "num_extracted": result.num_extracted, "score_memorized_mean":
                 float(scores[truth].mean()) if truth.any() else None,
                 "score_novel_mean": float(scores[~truth].mean()) if (~truth).any() else None,
                 "scores": scores.tolist()}
        if truth.any() and (~truth).any():
            entry.update(auc=float(roc_auc_score(truth, scores)),
                         auc_ci=bootstrap(scores, truth, lambda s, t: roc_auc_score(t, s)),
                         tpr_at_1pct_fpr=tpr_at_fpr(scores, truth),
                         tpr_ci=bootstrap(scores, truth, tpr_at_fpr))
        if method in THRESHOLDS and "t=0.4T" not in variant:  # the default settings of each method
            flags = result.memorized.numpy()
            entry.update(threshold=result.threshold,
                         threshold_tpr=float(flags[truth].mean()) if truth.any() else None,
                         threshold_fpr=float(flags[~truth].mean()) if (~truth).any() else None)
        row["methods"][variant] = entry
    return row


def measure_setting(name: str, output_dir: Path, steps: list[int] | None, num_samples: int,
                    seed: int = 0, variants: list[str] | None = None) -> dict:
    spec = SETTINGS[name]
    steps = sorted(steps or spec["steps"])
    if any(step % steps[0] for step in steps):
        raise SystemExit("every --steps value must be a multiple of the smallest one (the snapshot interval).")
    data = training_data(spec, output_dir, spec["n"], seed)
    torch.manual_seed(seed)
    model = make_dit(sample_size=data.resolution, in_channels=data.num_channels,
                     num_classes=data.num_classes, **spec["model"])
    scheduler = make_noise_scheduler()
    snapshots = {}

    def snapshot(trained, step):
        if step in steps:
            snapshots[step] = copy.deepcopy(trained).eval()
        return None

    config = TrainingConfig(max_train_steps=max(steps), train_batch_size=16, learning_rate=spec.get("lr", 2e-3),
                            lr_warmup_steps=0,
                            ema_max_decay=0.995, validation_steps=min(steps), show_progress=False, seed=seed)
    start = time.perf_counter()
    train_dit(model, data, scheduler, config, validation_fn=snapshot)
    train_seconds = time.perf_counter() - start
    rows = []
    for step in steps:
        pipe = build_pipeline(snapshots[step], scheduler, data)
        pipe.scheduler = DDIMScheduler.from_config(scheduler.config)
        pipe.set_progress_bar_config(disable=True)
        rows.append({"step": step, **evaluate(pipe, data, num_samples, seed=step + 100_000 * seed,
                                              variants=variants)})
        print(f"{name} step {step}: memorized {rows[-1]['memorized_share']:.2f}", file=sys.stderr)
    # the data folder relative to --output_dir: the run's files name no path of the machine that measured them
    source = data.source.replace(str(output_dir), "OUTPUT_DIR")
    return {"setting": name, "num_train": len(data), "source": source, "model": spec["model"],
            "conditional": data.labels is not None, "train_seconds": round(train_seconds, 1), "checkpoints": rows}


def merged_into(earlier: dict, result: dict, keep_as: str | None = None) -> dict:
    """``result``'s columns written over the same setting's in ``earlier`` (a model_score.json), checkpoint by
    checkpoint (with ``keep_as``, each replaced column stays as ``"VARIANT (keep_as)"``); refused unless the
    checkpoints and their exact labels are the earlier run's (same models)."""
    previous = next((r for r in earlier["results"] if r["setting"] == result["setting"]), None)
    if previous is None:
        raise SystemExit(f"--update: the earlier run has no setting {result['setting']!r}; measure it without "
                         "--update.")
    rows = {row["step"]: row for row in previous["checkpoints"]}
    merged = copy.deepcopy(previous)
    targets = {row["step"]: row for row in merged["checkpoints"]}
    for row in result["checkpoints"]:
        if row["step"] not in rows or rows[row["step"]]["memorized"] != row["memorized"]:
            raise SystemExit(f"--update: {result['setting']} at step {row['step']} does not sample the earlier run's "
                             "labels (another seed, settings or library version); measure without --update.")
        methods = targets[row["step"]]["methods"]
        if keep_as:
            methods.update({f"{v} ({keep_as})": methods[v] for v in row["methods"] if v in methods})
        methods.update(row["methods"])
    return merged


def _interval(value, interval) -> str:
    if value is None:
        return "n/a"
    low, high = interval
    return f"{value:.3f} [{low:.3f}, {high:.3f}]" if low is not None else f"{value:.3f}"


def compact_table(results: list[dict]) -> list[str]:
    """One row per setting and training length: ROC AUC [95% bootstrap] of every method, TPR at 1% FPR of the
    default (renoise at 0.2 T, 4 draws) and of the development run's choice (32 draws)."""
    variants = [v for v in METHOD_VARIANTS if any(v in row["methods"] for r in results for row in r["checkpoints"])]
    lines = ["| setting | step | memorized | " + " | ".join(f"AUC {v}" for v in variants)
             + " | " + " | ".join(f"TPR@1%FPR {v}" for v in TPR_COLUMNS) + " |",
             "|---|---|---|" + "---|" * (len(variants) + len(TPR_COLUMNS))]
    for result in results:
        for row in result["checkpoints"]:
            cells = []
            for variant in variants:
                entry = row["methods"].get(variant)
                cells.append("-" if entry is None else _interval(entry.get("auc"), entry.get("auc_ci", (None, None))))
            for variant in TPR_COLUMNS:
                entry = row["methods"].get(variant)
                cells.append("-" if entry is None else _interval(entry.get("tpr_at_1pct_fpr"),
                                                                 entry.get("tpr_ci", (None, None))))
            copies = round(row["memorized_share"] * row["num_samples"])
            name = (f"{result['setting']} (n={result['num_train']}"
                    + (f" of equal brightness, patch {result['model']['patch_size']}" if "brightness" in
                       result.get("source", "") else "") + f", heads of {result['model']['attention_head_dim']})")
            lines.append(f"| {name} | {row['step']} | {copies}/{row['num_samples']} | "
                         + " | ".join(cells) + " |")
    return lines


SUMMARY_VARIANTS = ("renoise (t=0.2T)", "renoise (t=0.2T, 32 draws)", "renoise (t=0.2T, 16 draws, 2 iterations)",
                    "extraction (first design)", "extraction (without rescue)", "extraction")


def runs_summary(runs: list[dict]) -> str:
    """Per run (its seed) and method: the lowest and mean ROC AUC over the checkpoints that copy (some samples
    copies, some not), how many reach 0.95, and the ones that do not."""
    lines = ["| seed | method | checkpoints that copy | lowest AUC | mean AUC | AUC >= 0.95 | below 0.95 |",
             "|---|---|---|---|---|---|---|"]
    for run in runs:
        arguments = run["arguments"]
        seed = arguments.get("seed", arguments.get("updated", {}).get("seed"))
        if seed is None:  # a rendered run: the seed of its first part
            seed = arguments["runs"][0].get("seed", 0)
        for variant in SUMMARY_VARIANTS:
            cells = [(f"{result['setting']} {row['step']}", row["methods"][variant]["auc"])
                     for result in run["results"] for row in result["checkpoints"]
                     if "auc" in row["methods"].get(variant, {})]
            if not cells:
                continue
            values = [auc for _, auc in cells]
            below = ", ".join(f"{name} ({auc:.3f})" for name, auc in cells if auc < 0.95) or "-"
            lines.append(f"| {seed} | {variant} | {len(cells)} | {min(values):.3f} | {np.mean(values):.3f} | "
                         f"{sum(auc >= 0.95 for auc in values)} of {len(values)} | {below} |")
    return "\n".join(lines) + "\n"


def report(results: list[dict], arguments: dict) -> str:
    lines = ["# Model-only memorization scores against the exact 1/3-rule labels", "",
             *compact_table(results), "",
             f"Written by `python scripts/measure_model_score.py` with {arguments}. Each cell: ROC AUC / TPR at 1% "
             "FPR, with 95% bootstrap intervals (500 resamples of the samples); `thr` = TPR / FPR of the documented "
             "threshold. AUC is undefined (n/a) where the samples are all copies or all novel.", ""]
    for result in results:
        order = list(METHOD_VARIANTS)  # then columns kept by --keep_as, by name
        variants = sorted({v for row in result["checkpoints"] for v in row["methods"]},
                          key=lambda v: (order.index(v), "") if v in order else (len(order), v))
        lines += [f"## {result['setting']} ({'conditional' if result['conditional'] else 'unconditional'}, "
                  f"{result['num_train']} training images, {result['train_seconds']} s of training)", "",
                  "| step | memorized | " + " | ".join(variants) + " |", "|---|---|" + "---|" * len(variants)]
        for row in result["checkpoints"]:
            cells = []
            for variant in variants:
                entry = row["methods"][variant]
                cell = (f"AUC {_interval(entry.get('auc'), entry.get('auc_ci', (None, None)))}; TPR@1% "
                        f"{_interval(entry.get('tpr_at_1pct_fpr'), entry.get('tpr_ci', (None, None)))}")
                if "threshold" in entry:
                    tpr, fpr = entry["threshold_tpr"], entry["threshold_fpr"]
                    tpr, fpr = ("n/a" if v is None else f"{v:.2f}" for v in (tpr, fpr))
                    cell += f"; thr {tpr} / {fpr}"
                cells.append(cell)
            lines.append(f"| {row['step']} | {row['memorized_share']:.3f} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--steps", nargs="+", type=int, default=None,
                        help="Training lengths to measure (default: each setting's own, from first copies on).")
    parser.add_argument("--num_samples", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0,
                        help="Seeds the training subset (image SEED of each class when conditional), the "
                             "initialisation, the training noise and the sampling noise; 0 gives the reported run, "
                             "another seed a development run on which to choose methods.")
    parser.add_argument("--render", nargs="+", default=None, metavar="JSON",
                        help="Measure nothing: write one report.md from model_score.json files of earlier runs.")
    parser.add_argument("--development_variants", action="store_true",
                        help="Also score the variants of DEVELOPMENT_VARIANTS (with --seed 1: the development run).")
    parser.add_argument("--variants", nargs="+", default=None, metavar="VARIANT",
                        help=f"Score only these columns (default: all): {', '.join(METHOD_VARIANTS)}.")
    parser.add_argument("--update", default=None, metavar="JSON",
                        help="Rescore into an earlier run's model_score.json (same --seed and settings): the measured "
                             "columns replace its, every other column stays; refused unless the retrained models "
                             "sample exactly the earlier labels.")
    parser.add_argument("--keep_as", default=None, metavar="SUFFIX",
                        help="With --update: keep the earlier run's values of each rescored column as a column "
                             "'VARIANT (SUFFIX)', e.g. to compare two versions of a method on the same samples.")
    parser.add_argument("--summarize", nargs="+", default=None, metavar="JSON",
                        help="Measure nothing: write runs.md, the lowest and mean AUC of each run (model_score.json "
                             "files, one per seed) over its checkpoints that copy.")
    args = parser.parse_args(argv)
    if args.summarize:
        summary = runs_summary([json.loads(Path(path).read_text()) for path in args.summarize])
        write_text(Path(args.output_dir) / "runs.md", "# Model-only scores: every run, the checkpoints that copy\n\n"
                   + summary + f"\nWritten by `python scripts/measure_model_score.py --summarize` on "
                   f"{', '.join(args.summarize)}.\n")
        print(summary)
        return 0
    if args.development_variants:
        METHOD_VARIANTS.update(DEVELOPMENT_VARIANTS)
    if args.variants:
        unknown = sorted(set(args.variants) - set(METHOD_VARIANTS))
        if unknown:
            raise SystemExit(f"unknown --variants {unknown}: choose among {list(METHOD_VARIANTS)}.")
    if args.keep_as and not args.update:
        raise SystemExit("--keep_as keeps the columns of the run given by --update; pass --update JSON too.")
    earlier = json.loads(Path(args.update).read_text()) if args.update else None
    if args.render:
        loaded = [json.loads(Path(path).read_text()) for path in args.render]
        results = [result for run in loaded for result in run["results"]]
        arguments = {"runs": [run["arguments"] for run in loaded]}
        write_text(Path(args.output_dir) / "model_score.json",
                   json.dumps({"arguments": arguments, "results": results}, indent=2) + "\n")
        write_text(Path(args.output_dir) / "report.md", report(results, arguments))
        print(report(results, arguments))
        return 0
    torch.set_num_threads(1)
    output_dir = Path(args.output_dir)
    arguments = {k: v for k, v in vars(args).items() if k != "output_dir"}
    results = []
    if earlier is not None:
        arguments = {**earlier["arguments"], "updated": arguments}
    for name in args.settings:
        results.append(measure_setting(name, output_dir, args.steps, args.num_samples, args.seed, args.variants))
        written = results
        if earlier is not None:  # in place of the earlier run's first result of the setting, the others kept
            results[-1] = merged_into(earlier, results[-1], args.keep_as)
            written = list(earlier["results"])
            for result in results:
                written[next(i for i, e in enumerate(written) if e["setting"] == result["setting"])] = result
        write_text(output_dir / "model_score.json", json.dumps({"arguments": arguments, "results": written},
                                                               indent=2) + "\n")
        write_text(output_dir / "report.md", report(written, arguments))
    results = written
    print(report(results, arguments))
    return 0


if __name__ == "__main__":
    sys.exit(main())
