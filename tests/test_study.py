"""The replicated study: statistics against hand-computed values, early-stop choice, resume, bad input."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from scipy.stats import t as student_t
from scipy.stats import ttest_rel

import diffusers_memsep.commands.study as study_command
import diffusers_memsep.trainer.output as trainer_output
from diffusers_memsep.builtin_data import colour_digits_folder
from diffusers_memsep.cli import main
from diffusers_memsep.data import load_training_data
from diffusers_memsep.models import PrunableDiTTransformer2DModel
from diffusers_memsep.study import StudyConfig, builtin_setting, run_study
from diffusers_memsep.study.bases import prepare_base_model
from diffusers_memsep.study.frontier import best_within_budgets, dominates, frontier, within_budget
from diffusers_memsep.study.plan import planned_runs
from diffusers_memsep.study.settings import base_training_data, load_setting
from diffusers_memsep.study.statistics import compare, holm_bonferroni, metric_columns, t_interval, verdict
from diffusers_memsep.trainer import (
    OutputConfig,
    TrainingConfig,
    ValidationConfig,
    make_dit,
    make_noise_scheduler,
    train_pipeline,
)


def test_t_interval_by_hand():
    values = [0.1, 0.3, 0.2, 0.6]
    mean, low, high = t_interval(values)
    sd = math.sqrt(((0.1 - 0.3) ** 2 + 0 + (0.2 - 0.3) ** 2 + (0.6 - 0.3) ** 2) / 3)
    half = student_t.ppf(0.975, 3) * sd / 2
    assert mean == pytest.approx(0.3)
    assert (low, high) == pytest.approx((0.3 - half, 0.3 + half))
    assert half == pytest.approx(3.182446305 * 0.2160246899 / 2)
    assert t_interval([0.4])[0] == 0.4 and math.isnan(t_interval([0.4])[1])


def test_verdict_directions():
    assert verdict(-0.2, 0.01, "memorization_ratio") == "better"
    assert verdict(0.2, 0.01, "kid") == "worse"
    assert verdict(0.2, 0.01, "recall") == "better"
    assert verdict(-0.2, 0.06, "frechet_distance") == "not distinguishable"  # adjusted p above 5%
    assert verdict(-0.2, math.nan, "frechet_distance") == "not distinguishable"


def test_holm_bonferroni_by_hand():
    # sorted: 0.005 * 4 = 0.02, 0.01 * 3 = 0.03, 0.03 * 2 = 0.06, 0.04 * 1 = 0.04 -> running max 0.06
    assert holm_bonferroni([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    adjusted = holm_bonferroni([0.2, math.nan, 0.5])  # NaN: no test, not in the family (K = 2)
    assert adjusted[0] == pytest.approx(0.4) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.5)
    assert holm_bonferroni([0.6, 0.7]) == [1.0, 1.0]


def _row(method, eta, base, seed, memorization, kid, precision=0.5):
    return {"setting": "s", "base": base, "method": method, "eta": eta, "seed": seed, "name": method,
            "memorization_ratio": memorization, "kid": kid, "precision": precision, "feature_space": "pixel space",
            "num_samples": 8, "sampling_seconds": 1.0, "run_seconds": 2.0, "pruned_heads": 2}


def test_paired_comparison_by_hand():
    pairs = [(0, 0), (0, 1), (1, 0), (1, 1)]
    small_t = [0.10, 0.20, 0.15, 0.05]
    random = [0.30, 0.35, 0.20, 0.25]
    finetune = [0.12, 0.18, 0.20, 0.02]
    rows = []
    for (base, seed), a, b, c in zip(pairs, small_t, random, finetune):
        rows += [_row("small_t", 0.5, base, seed, a, kid=1.0 + a), _row("random", 0.5, base, seed, b, kid=1.0 + a),
                 _row("finetune_only", 0.0, base, seed, c, kid=1.0)]
    rows.append(_row("random", 0.25, 0, 0, 0.9, kid=3.0))  # another eta: never paired with small_t at 0.5
    assert metric_columns(rows) == ["memorization_ratio", "kid", "precision"]
    summary = {(e["method"], e["eta"]): e for e in compare(rows)}
    entry = summary[("small_t", 0.5)]
    differences = [a - b for a, b in zip(small_t, random)]  # -0.20, -0.15, -0.05, -0.20
    mean = sum(differences) / 4
    sd = math.sqrt(sum((d - mean) ** 2 for d in differences) / 3)
    half = student_t.ppf(0.975, 3) * sd / 2
    assert entry["vs_random_memorization_ratio"] == pytest.approx(mean)
    assert entry["vs_random_memorization_ratio_low"] == pytest.approx(mean - half)
    assert entry["vs_random_memorization_ratio_high"] == pytest.approx(mean + half)
    assert entry["vs_random_memorization_ratio_pairs"] == 4
    assert mean + half < 0  # the 95% interval alone excludes 0 ...
    p = ttest_rel(small_t, random).pvalue
    assert entry["vs_random_memorization_ratio_p"] == pytest.approx(p)
    # ... but the table vs random holds K = 3 tests (small_t at 0.5: memorization, kid, precision; the two others
    # have p = 1): Holm multiplies the smallest p by 3, above 5%, so no verdict
    assert entry["vs_random_memorization_ratio_p_holm"] == pytest.approx(3 * p) and 0.05 < 3 * p
    assert entry["vs_random_memorization_ratio_verdict"] == "not distinguishable"
    assert entry["vs_random_kid"] == pytest.approx(0) and entry["vs_random_kid_verdict"] == "not distinguishable"
    ft = [a - c for a, c in zip(small_t, finetune)]  # -0.02, 0.02, -0.05, 0.03: straddles 0
    assert entry["vs_finetune_only_memorization_ratio"] == pytest.approx(sum(ft) / 4)
    assert entry["vs_finetune_only_memorization_ratio_verdict"] == "not distinguishable"
    # kid 1 + a > 1 on every pair, p about 0.03, but 6 tests in the finetune_only table: Holm gives no verdict
    assert entry["vs_finetune_only_kid_p"] < 0.05 and entry["vs_finetune_only_kid_verdict"] == "not distinguishable"
    assert "vs_random_memorization_ratio" not in summary[("finetune_only", 0.0)]
    assert summary[("random", 0.25)]["runs"] == 1
    assert entry["memorization_ratio"] == pytest.approx(0.125)
    assert "vs_early_stop_memorization_ratio" not in entry  # no early_stop rows: no comparison, not a NaN one
    early = [0.05, 0.10, 0.05, 0.00]
    rows += [_row("early_stop", 0.0, base, seed, e, kid=2.0) for (base, seed), e in zip(pairs, early)]
    entry = {(e["method"], e["eta"]): e for e in compare(rows)}[("small_t", 0.5)]
    assert entry["vs_early_stop_memorization_ratio"] == pytest.approx(sum(a - e for a, e in zip(small_t, early)) / 4)
    assert entry["vs_early_stop_memorization_ratio_pairs"] == 4
    assert entry["vs_early_stop_kid_verdict"] == "better"  # kid 1 + a < 2 on every pair: p ~ 0, survives Holm


def test_precision_is_not_called_better_where_the_row_copies_more():
    pairs = [(0, 0), (0, 1), (1, 0), (1, 1)]
    rows = []
    for (base, seed), offset in zip(pairs, (0.0, 0.01, 0.02, 0.03)):
        rows += [_row("small_t", 0.5, base, seed, 0.6 + offset, kid=1.0, precision=0.9 + offset),
                 _row("random", 0.5, base, seed, 0.2, kid=1.0, precision=0.5)]
    entry = {(e["method"], e["eta"]): e for e in compare(rows)}[("small_t", 0.5)]
    assert entry["vs_random_memorization_ratio_verdict"] == "worse"
    assert entry["vs_random_precision_verdict"] == "higher, with more copies"


def tiny_config(output_dir, **overrides):
    tiny = dict(num_layers=1, num_attention_heads=2, attention_head_dim=8)
    config = StudyConfig(
        output_dir=str(output_dir), settings=(builtin_setting("digits8", tiny),), num_base_models=1,
        methods=("random", "memorization_gap"), etas=(0.5,), seeds=(0, 1),
        base_train=TrainingConfig(max_train_steps=4, train_batch_size=8, lr_warmup_steps=0, show_progress=False),
        checkpoint_every=2, curve_num_samples=4,
        finetune=TrainingConfig(max_train_steps=1, train_batch_size=4, lr_warmup_steps=0, show_progress=False),
        importance_batches=1, importance_batch_size=4, num_samples=4, num_inference_steps=2, show_progress=False,
        weight_decays=(), copy_free=False)  # the remedies' rows: test_study_remedies_*
    return StudyConfig(**{**config.__dict__, **overrides})


def _weights(pipe):
    return {k: v.clone() for k, v in pipe.transformer.state_dict().items()}


def _scripted_validation(ratios):
    """A stand-in for the trainer's validation whose memorization ratio follows ``ratios`` (step -> ratio)."""
    def make_validation_fn(*args, **kwargs):
        return lambda model, step: {"memorization_ratio": ratios(step)}
    return make_validation_fn


def test_early_stop_base_is_the_trainer_flag_and_the_original_an_uninterrupted_run(tmp_path, monkeypatch):
    """One code path: the early_stop row's weights are those `memsep train --stop_at_memorization` keeps (the EMA of
    the last validation at or below the threshold), and the original continues that run bit-identically."""
    monkeypatch.setattr(trainer_output, "make_validation_fn", _scripted_validation(lambda step: 0.5 * (step > 4)))
    config = tiny_config(tmp_path / "study", base_train=TrainingConfig(max_train_steps=10, train_batch_size=8,
                                                                       lr_warmup_steps=0, show_progress=False),
                         early_stop_threshold=0.1, weight_decays=(1.0,))
    setting = config.settings[0]
    data = base_training_data(setting, tmp_path / "study", 0, load_setting(setting, tmp_path / "study"))
    model, trained = prepare_base_model(config, setting, 0, data)
    assert trained and model.curve["steps"] == [2, 4, 6] and model.curve["early_stop_step"] == 4
    assert model.curve["stopped_step"] == 6 and model.train_steps("early_stop") == 6
    assert model.train_steps("original") == model.train_steps("weight_decay=1") == 10

    def straight(folder, **changes):  # the same base trained in one go, checkpoints every 2 steps
        torch.manual_seed(0)
        dit = make_dit(sample_size=data.resolution, in_channels=data.num_channels, num_classes=data.num_classes,
                       **setting.model)
        run = TrainingConfig(**{**config.base_train.__dict__, "seed": 0, "checkpointing_steps": 2,
                                "checkpoints_total_limit": None, **changes})
        return train_pipeline(folder, data, dit, make_noise_scheduler(), run, output=OutputConfig(report_to="none"),
                              validation=ValidationConfig(num_samples=0))

    uninterrupted = straight(tmp_path / "straight")
    for name, value in _weights(uninterrupted.pipeline).items():
        assert torch.equal(value, _weights(model.pipeline)[name]), name
    ema_folder = tmp_path / "straight" / "checkpoint-4" / "transformer_ema"
    ema_at_4 = PrunableDiTTransformer2DModel.from_pretrained(ema_folder,
                                                             use_safetensors=True)
    for name, value in ema_at_4.state_dict().items():
        assert torch.equal(value, _weights(model.early_stop)[name]), name
    decayed = straight(tmp_path / "decayed", adam_weight_decay=1.0)
    assert all(torch.equal(v, _weights(model.weight_decay[1.0])[k]) for k, v in _weights(decayed.pipeline).items())
    assert not all(torch.equal(v, _weights(model.pipeline)[k]) for k, v in _weights(decayed.pipeline).items())
    again, trained_again = prepare_base_model(config, setting, 0, data)  # reloaded, not retrained
    assert not trained_again and all(torch.equal(v, _weights(again.early_stop)[k])
                                     for k, v in _weights(model.early_stop).items())


def test_study_resumes_only_the_missing_runs(tmp_path):
    config = tiny_config(tmp_path)
    # 1 base x 2 seeds x (original, early_stop, finetune_only, 2 methods); no remedies
    assert len(planned_runs(config, ["digits8"], 1, early_stop=True)) == 10
    first = run_study(StudyConfig(**{**config.__dict__, "max_runs": 3}))
    assert (first.executed_runs, first.skipped_runs, first.missing_runs, first.trained_base_models) == (3, 0, 7, 1)
    assert len(list((tmp_path / "runs").rglob("*.json"))) == 3
    weights = tmp_path / "bases" / "digits8" / "base-0" / "transformer" / "diffusion_pytorch_model.safetensors"
    stamp = weights.stat().st_mtime_ns
    second = run_study(config)
    assert (second.executed_runs, second.skipped_runs, second.missing_runs, second.trained_base_models) == (7, 3, 0, 0)
    assert weights.stat().st_mtime_ns == stamp  # the base model was reused, not retrained
    third = run_study(config)
    assert (third.executed_runs, third.skipped_runs) == (0, 10)
    for name in ("report.md", "runs.csv", "summary.csv", "pareto.png"):
        assert (tmp_path / name).stat().st_size > 0
    report = (tmp_path / "report.md").read_text()
    assert "vs random" in report and "early stop at step" in report
    curve = json.loads((tmp_path / "bases" / "digits8" / "base-0" / "memorization_curve.json").read_text())
    assert curve["steps"] == [2, 4] and curve["early_stop_step"] in (2, 4)
    assert not list((tmp_path / "bases" / "digits8" / "base-0").glob("checkpoint-*"))
    finetune_only = [r for r in second.rows if r["method"] == "finetune_only"]
    assert finetune_only and all(r["pruned_heads"] == 0 for r in finetune_only)
    assert all(r["pruned_heads"] == 1 for r in second.rows if r["method"] == "memorization_gap")
    with pytest.raises(ValueError, match="other settings"):
        run_study(tiny_config(tmp_path, finetune=TrainingConfig(max_train_steps=2, show_progress=False)))


def test_colour_setting_is_16x16_rgb(tmp_path):
    from diffusers_memsep.data import load_training_data

    data = load_training_data(train_data_dir=colour_digits_folder(tmp_path), max_train_samples=4, seed=0)
    assert tuple(data.images.shape) == (4, 3, 16, 16)
    assert data.images.amin() >= -1 and (data.images[:, 0] != data.images[:, 1]).any()  # tinted, not grey


@pytest.mark.parametrize("argv, message", [
    (["--etas", "1.5"], "eta must lie in"),
    (["--methods", "small_t", "--early_stop_threshold", "2"], "early_stop_threshold"),
    (["--validation_data_dir", "x"], "--validation_data_dir belongs"),
    (["--weight_decays", "0"], "weight_decays must be distinct AdamW weight decays > 0"),
    (["--weight_decays", "1", "1"], "weight_decays must be distinct"),
    (["--copy_check_at", "1.5"], "--copy_check_at 0.75"),
    (["--max_resamples", "-1"], "max_resamples must be an integer >= 0"),
    (["--copy_free_methods", "nope"], "unknown pruning method(s) ['nope'] in copy_free_methods"),
])
def test_study_command_bad_input(tmp_path, argv, message, capsys):
    assert main(["study", "--output_dir", str(tmp_path / "out"), *argv]) == 2
    error = capsys.readouterr().err
    assert error.startswith("memsep: error:") and message in error
    assert not (tmp_path / "out").exists()


def test_study_command_refuses_a_missing_folder_before_training(tmp_path, capsys):
    argv = ["study", "--quick", "--output_dir", str(tmp_path / "out"), "--train_data_dir", str(tmp_path / "none")]
    assert main(argv) == 2
    assert "is not a directory" in capsys.readouterr().err
    assert not (tmp_path / "out" / "bases").exists() and not (tmp_path / "out" / "study.json").exists()


def test_worker_processes_give_the_rows_of_one_process(tmp_path):
    """Units (setting, base model) in two spawned workers: the same rows, bit for bit, as in this process; the
    scores of one (method, seed) serve every eta (nested head sets)."""
    four_heads = dict(num_layers=1, num_attention_heads=4, attention_head_dim=8)  # 0.25 x 4 heads removes one
    kwargs = dict(num_base_models=2, methods=("small_t",), etas=(0.25, 0.5), seeds=(0,),
                  settings=(builtin_setting("digits8", four_heads),))
    serial = run_study(tiny_config(tmp_path / "serial", num_workers=1, **kwargs))
    parallel = run_study(tiny_config(tmp_path / "parallel", num_workers=2, **kwargs))
    timing = {"run_seconds", "sampling_seconds"}

    def strip(rows):
        return sorted((sorted((k, v) for k, v in r.items() if k not in timing) for r in rows), key=str)

    assert len(serial.rows) == len(parallel.rows) == 2 * 5
    assert strip(serial.rows) == strip(parallel.rows)
    assert (parallel.executed_runs, parallel.trained_base_models) == (10, 2)
    with pytest.raises(ValueError, match="num_workers"):
        tiny_config(tmp_path, num_workers=0)


def _random_images(folder, count=12, seed=0):
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, size=(count, 8, 8), dtype=np.uint8)
    for index, image in enumerate(pixels):
        Image.fromarray(image).save(folder / f"{index:02d}.png")
    return folder


def test_study_over_replaced_images_is_refused(tmp_path):
    """Same file names, same count, other pixels: the finished runs and the base model come from the old images."""
    from diffusers_memsep.study import StudySetting

    images = _random_images(tmp_path / "images")
    setting = StudySetting("folder", train_data_dir=str(images), num_train_samples=4,
                           model=dict(num_layers=1, num_attention_heads=2, attention_head_dim=8))
    config = tiny_config(tmp_path / "out", settings=(setting,), methods=("random",), seeds=(0,), max_runs=1)
    run_study(config)
    recorded = json.loads((tmp_path / "out" / "study.json").read_text())["data_fingerprints"]
    assert set(recorded) == {"folder"} and len(recorded["folder"]) == 64
    run_study(config)  # the same images: the study continues
    _random_images(images, seed=1)
    runs = sorted((tmp_path / "out" / "runs").rglob("*.json"))
    with pytest.raises(ValueError, match="the images of setting folder changed since this study started"):
        run_study(config)
    assert sorted((tmp_path / "out" / "runs").rglob("*.json")) == runs  # nothing ran on the new images


@pytest.mark.parametrize("kwargs, message", [
    (dict(etas=(0.25,)), "setting 'digits8': --etas 0.25 removes no head of the 2 heads it ranks"),
    (dict(small_t_switch=1000), "--small_t_switch 1000 lies outside the schedule"),
    (dict(quality_metric="fid"), "--quality_metric 'fid' is not a metric of the runs"),
])
def test_study_config_refuses_a_no_op_before_any_training(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tiny_config(tmp_path, **kwargs)
    assert not any(tmp_path.iterdir())


def test_setting_name_must_be_a_plain_name():
    from diffusers_memsep.study import StudySetting

    for name in ("../x", "a/b", ".."):
        with pytest.raises(ValueError, match="--setting_name .* is not a plain name"):
            StudySetting(name=name)


def test_patches32_is_a_builtin_setting_outside_the_default_profile(tmp_path):
    """``patches32`` loads the natural-image patches as a study setting (32x32 RGB), is accepted by the study's
    checks, and stays out of the default settings."""
    setting = builtin_setting("patches32")
    assert "patches32" not in [s.name for s in StudyConfig().settings]
    StudyConfig(output_dir=str(tmp_path), settings=(setting,))  # etas and the time switch checked against its DiT
    data = load_training_data(**setting.data_kwargs(tmp_path), max_train_samples=setting.num_train_samples)
    assert tuple(data.images.shape) == (4, 3, 32, 32)
    assert data.images.min() >= -1 and data.images.max() <= 1


def test_study_remedies_rows_and_their_costs(tmp_path):
    """Every remedy a user applies with one flag is a row of the study, on the same seeds, with its costs."""
    config = tiny_config(tmp_path, weight_decays=(1.0,), copy_free=True, seeds=(0,), max_resamples=3,
                         copy_check_at=0.5)
    result = run_study(config)
    rows = {row["method"]: row for row in result.rows}
    assert set(rows) == {"original", "early_stop", "finetune_only", "weight_decay=1", "original+copy_free",
                         "original+copy_free(check)", "early_stop+copy_free", "weight_decay=1+copy_free", "random",
                         "memorization_gap", "memorization_gap+copy_free"}
    assert rows["original"]["train_steps"] == rows["weight_decay=1"]["train_steps"] == 4
    assert rows["weight_decay=1+copy_free"]["train_steps"] == 4
    assert rows["early_stop"]["train_steps"] == rows["early_stop+copy_free"]["train_steps"] <= 4
    assert rows["random"]["finetune_steps"] == rows["finetune_only"]["finetune_steps"] == 1
    assert rows["original+copy_free"]["finetune_steps"] == 0
    assert rows["original"]["denoising_steps_per_sample"] == 2  # plain sampling: the sampler's step count
    pruned, pruned_free = rows["memorization_gap"], rows["memorization_gap+copy_free"]  # the same pruned model
    assert pruned_free["pruned_heads"] == pruned["pruned_heads"] > 0 and pruned_free["finetune_steps"] == 1
    for name in ("original+copy_free", "original+copy_free(check)", "early_stop+copy_free",
                 "weight_decay=1+copy_free", "memorization_gap+copy_free"):
        assert 1 <= rows[name]["denoising_steps_per_sample"] <= 2 * (1 + 3)
        assert rows[name]["memorization_ratio"] <= rows[name.split("+")[0]]["memorization_ratio"]
    frontier = (tmp_path / "frontier.csv").read_text()
    assert "within_interval" in frontier and "chosen_fd+10%" in frontier
    assert "### Remedies: effect and cost" in result.report_path.read_text()


def _pair_rows(method, memorization, fd, pairs=4):
    return [{"setting": "s", "method": method, "eta": 0.0, "base": i, "seed": 0, "memorization_ratio": m,
             "frechet_distance": f, "recall": 0.5, "kid": 1.0} for i, (m, f) in enumerate(zip(memorization, fd))]


def test_frontier_and_budgets_by_hand():
    rows = (_pair_rows("original", [0.5, 0.6, 0.55, 0.5], [100, 101, 99, 100])
            + _pair_rows("a", [0.0, 0.01, 0.0, 0.0], [100, 101, 99, 100])  # fewer copies, same quality
            + _pair_rows("b", [0.1, 0.2, 0.1, 0.15], [130, 140, 135, 131])  # dominated by a
            + _pair_rows("c", [0.0, 0.0, 0.0, 0.0], [300, 320, 310, 305]))  # copies least, far worse quality
    summary = compare(rows)
    entry = {e["method"]: e for e in summary}
    assert dominates(rows, entry["a"], entry["original"], "s", "frechet_distance")
    assert dominates(rows, entry["a"], entry["b"], "s", "frechet_distance")
    assert not dominates(rows, entry["a"], entry["c"], "s", "frechet_distance")  # c copies less (0 vs 0.0025)
    assert not dominates(rows, entry["b"], entry["a"], "s", "frechet_distance")
    assert [e["method"] for e in frontier(rows, summary, "s", "frechet_distance")] == ["a", "c"]
    choices = best_within_budgets(summary, "s")
    assert choices["fd+10%"]["method"] == "a" and choices["interval"]["method"] == "a"
    assert choices["kid+10%"]["method"] == "c"  # KID is equal everywhere: the one that copies least
    diverged = dict(entry["a"], frechet_distance=math.nan)
    assert not within_budget(diverged, entry["original"], "interval")
    assert not within_budget(diverged, entry["original"], "fd+10%")


def test_study_command_remedy_flags_change_the_plan(monkeypatch, capsys):
    """--weight_decays (none) and --no_copy_free drop the remedy rows; by default the quick profile has them."""
    planned = []

    def record(config):
        planned.append(len(planned_runs(config, [s.name for s in config.settings], config.num_base_models, True)))
        return SimpleNamespace(rows=[], executed_runs=0, skipped_runs=0, missing_runs=planned[-1],
                               trained_base_models=0, seconds=0.0)

    monkeypatch.setattr(study_command, "run_study", record)
    # 2 settings x 2 bases x 2 seeds x (3 baselines + weight decays + 3 copy-free rows + one per weight decay + 3
    # methods + memorization_gap copy-free)
    for extra, runs in (([], 112), (["--weight_decays", "--no_copy_free"], 48), (["--weight_decays", "2"], 96),
                        (["--copy_free_methods"], 104), (["--copy_free_methods", "random", "small_t"], 120)):
        assert main(["study", "--quick", *extra]) == 0
        assert planned[-1] == runs and f"{runs} still missing" in capsys.readouterr().out
