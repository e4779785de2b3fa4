"""Early stopping by memorization: the decision, the kept weights, the curve files, the card, resume, 2 processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import diffusers_memsep.trainer.output
from diffusers_memsep.data import load_training_data
from diffusers_memsep.evaluate import (
    CURVE_SEED,
    EVALUATION_SEED_STRIDE,
    MAX_RUN_SEED,
    evaluation_seed,
    validation_seed,
)
from diffusers_memsep.trainer import (
    OutputConfig,
    TrainingConfig,
    ValidationConfig,
    make_dit,
    make_noise_scheduler,
    train_dit,
    train_pipeline,
)
from diffusers_memsep.trainer.early_stopping import CURVE_JSON, CURVE_PNG, EarlyStopping

ROOT = Path(__file__).resolve().parents[1]
#: A run built to cross the threshold: 3 digits, a small DiT at a high learning rate; its validation ratio climbs
#: from 0 to most samples within about a thousand steps.
CROSSING = dict(max_train_steps=2000, train_batch_size=8, learning_rate=3e-3, lr_warmup_steps=5, ema_max_decay=0.9,
                validation_steps=100, stop_at_memorization=0.1, show_progress=False, seed=0)
CROSSING_VALIDATION = ValidationConfig(num_samples=16, inference_steps=50)
CROSSING_MODEL = dict(num_layers=2, num_attention_heads=2, attention_head_dim=16)


def small_dit():
    torch.manual_seed(0)
    return make_dit(num_classes=None, **CROSSING_MODEL)


@pytest.fixture(scope="module")
def three_digits():
    return load_training_data(max_train_samples=3, seed=0)


def scripted(ratios: dict):
    """A validation function that reports the given ratio at each step (the decision logic, without sampling)."""
    return lambda model, step: {"memorization_ratio": ratios[step]}


def tiny_run(data, ratios, **config):
    torch.manual_seed(0)
    model = make_dit(num_classes=None, num_layers=1, num_attention_heads=2, attention_head_dim=8)
    settings = dict(max_train_steps=8, train_batch_size=4, lr_warmup_steps=1, validation_steps=2, show_progress=False,
                    stop_at_memorization=0.2, **config)
    return train_dit(model, data, make_noise_scheduler(), TrainingConfig(**settings), validation_fn=scripted(ratios))


def uninterrupted_weights(data, steps, **config):
    """The weights a run without early stopping has after ``steps`` steps (EMA ones when EMA is on)."""
    torch.manual_seed(0)
    model = make_dit(num_classes=None, num_layers=1, num_attention_heads=2, attention_head_dim=8)
    settings = dict(max_train_steps=steps, train_batch_size=4, lr_warmup_steps=1, show_progress=False, **config)
    result = train_dit(model, data, make_noise_scheduler(), TrainingConfig(**settings))
    return (result.ema_model or result.model).state_dict()


@pytest.mark.parametrize("use_ema", [True, False])
def test_keeps_the_weights_of_the_last_validation_at_or_below_the_threshold(three_digits, use_ema):
    result = tiny_run(three_digits, {2: 0.0, 4: 0.2, 6: 0.5, 8: 0.0}, use_ema=use_ema)
    stop = result.early_stopping
    assert result.steps == 6 and stop.stopped_step == 6 and stop.kept_step == 4
    assert [row["step"] for row in stop.curve] == [2, 4, 6]  # nothing after the stop
    assert not stop.stopped_before_first_safe_validation
    # the kept weights are the ones a run of 4 steps ends with (the default schedule is constant after warm-up)
    expected = uninterrupted_weights(three_digits, 4, use_ema=use_ema)
    for name, value in result.kept_model.state_dict().items():
        assert torch.equal(value, expected[name]), name
    assert result.sampling_model is result.kept_model and not result.kept_model.training


def test_first_validation_above_the_threshold_is_flagged(three_digits):
    result = tiny_run(three_digits, {2: 0.9})
    stop = result.early_stopping
    assert result.steps == 2 and stop.kept_step == 2 and stop.stopped_step == 2
    assert stop.stopped_before_first_safe_validation and stop.summary()["stopped_before_first_safe_validation"]


def test_a_run_that_never_crosses_ends_at_the_last_step_and_nan_counts_as_crossing(three_digits):
    result = tiny_run(three_digits, {2: 0.0, 4: 0.1, 6: 0.1, 8: 0.2})
    assert result.steps == 8 and not result.early_stopping.stopped and result.early_stopping.kept_step == 8
    for name, value in result.kept_model.state_dict().items():
        assert torch.equal(value, result.ema_model.state_dict()[name]), name
    diverged = tiny_run(three_digits, {2: 0.0, 4: float("nan")})
    assert diverged.steps == 4 and diverged.early_stopping.kept_step == 2


def test_bad_settings_name_the_flag(three_digits, tmp_path):
    for value in (-0.1, 1.0, 1.5, True, "0.1", float("nan")):
        with pytest.raises(ValueError, match="stop_at_memorization must be a memorization ratio in"):
            TrainingConfig(stop_at_memorization=value, validation_steps=10)
    with pytest.raises(ValueError, match=r"needs validation.*--validation_steps"):
        TrainingConfig(stop_at_memorization=0.1)
    assert TrainingConfig(stop_at_memorization=0.0, validation_steps=5).stop_at_memorization == 0.0
    config = TrainingConfig(max_train_steps=2, stop_at_memorization=0.1, validation_steps=1, show_progress=False)
    with pytest.raises(ValueError, match="needs a validation_fn"):
        train_dit(small_dit(), three_digits, make_noise_scheduler(), config)
    with pytest.raises(ValueError, match="holds 'memorization_ratio'"):
        train_dit(small_dit(), three_digits, make_noise_scheduler(), config, validation_fn=lambda m, s: {"x": 1.0})
    with pytest.raises(ValueError, match="--validation_num_samples > 0"):
        train_pipeline(tmp_path / "out", three_digits, small_dit(), make_noise_scheduler(), config,
                       validation=ValidationConfig(num_samples=0), output=OutputConfig(report_to="none"))
    assert not (tmp_path / "out").exists()


def test_validation_seed_never_collides_with_evaluation_seeds():
    assert validation_seed(3, chooses_weights=False) == 3  # plain validation: unchanged
    assert validation_seed(3, chooses_weights=True) == CURVE_SEED  # the curve range, as the study's curve
    assert evaluation_seed(MAX_RUN_SEED - 1) + EVALUATION_SEED_STRIDE - 1 < CURVE_SEED  # above every 1000 * s + b


def test_the_validation_seeds_of_an_early_stopping_run_are_no_evaluation_seeds(tmp_path, three_digits, monkeypatch):
    """Record every batch seed the trainer's validation samples from, with and without early stopping."""
    original, drawn = diffusers_memsep.trainer.output.sample_pipeline, []

    def recording(pipe, num_samples, class_labels, num_inference_steps, seed, batch_size=256, **kwargs):
        drawn.extend(seed + b for b in range(-(-num_samples // batch_size)))
        return original(pipe, num_samples, class_labels, num_inference_steps, seed, batch_size, **kwargs)

    monkeypatch.setattr(diffusers_memsep.trainer.output, "sample_pipeline", recording)
    common = dict(max_train_steps=2, train_batch_size=3, validation_steps=1, show_progress=False, seed=7)
    for name, stop in (("early", 0.99), ("plain", None)):
        drawn.clear()
        train_pipeline(tmp_path / name, three_digits, small_dit(), make_noise_scheduler(20),
                       TrainingConfig(**common, stop_at_memorization=stop), output=OutputConfig(report_to="none"),
                       validation=ValidationConfig(num_samples=4, inference_steps=2))
        assert len(drawn) == 2  # one batch per validation, at steps 1 and 2
        if stop is not None:  # disjoint from every evaluation seed 1000 * s + b (s < MAX_RUN_SEED, b < 1000)
            evaluation_seeds = range(evaluation_seed(MAX_RUN_SEED - 1) + EVALUATION_SEED_STRIDE)
            assert set(drawn) == {CURVE_SEED} and all(seed not in evaluation_seeds for seed in drawn)
        else:
            assert set(drawn) == {7}  # plain validation: the run seed, as documented


# ----------------------------------------------------------------------------------------- a real crossing run
def crossing_run(output_dir, data, **kwargs):
    return train_pipeline(output_dir, data, small_dit(), make_noise_scheduler(),
                          TrainingConfig(**{**CROSSING, "checkpointing_steps": 100}),
                          output=OutputConfig(report_to="none", **kwargs), validation=CROSSING_VALIDATION)


@pytest.fixture(scope="module")
def crossing(tmp_path_factory, three_digits):
    output_dir = tmp_path_factory.mktemp("crossing") / "run"
    return crossing_run(output_dir, three_digits)


def test_a_crossing_run_writes_the_last_safe_weights_the_curve_and_the_card(crossing):
    stop = crossing.result.early_stopping
    assert stop.stopped and stop.kept_step is not None and stop.kept_step < stop.stopped_step < CROSSING[
        "max_train_steps"]
    assert crossing.result.steps == stop.stopped_step
    ratios = {row["step"]: row["memorization_ratio"] for row in stop.curve}
    assert ratios[stop.kept_step] <= 0.1 < ratios[stop.stopped_step]
    # the pipeline's weights are the EMA weights saved at the kept step
    folder = crossing.output_dir
    saved = load_file(str(folder / "transformer" / "diffusion_pytorch_model.safetensors"))
    at_kept_step = load_file(str(folder / f"checkpoint-{stop.kept_step}" / "transformer_ema" /
                                 "diffusion_pytorch_model.safetensors"))
    assert saved.keys() == at_kept_step.keys()
    for name in saved:
        assert torch.equal(saved[name], at_kept_step[name]), name
    curve = json.loads((folder / CURVE_JSON).read_text())
    assert curve["kept_step"] == stop.kept_step and curve["stopped_step"] == stop.stopped_step
    assert [row["step"] for row in curve["curve"]] == list(range(100, stop.stopped_step + 1, 100))
    assert curve["validation_seed"] == CURVE_SEED
    assert (folder / CURVE_PNG).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    card = (folder / "README.md").read_text()
    assert f"stopped at step {stop.stopped_step}" in card and f"weights of step {stop.kept_step}" in card
    assert f"## Memorization of the saved weights (step {stop.kept_step})" in card
    assert crossing.metrics["memorization_ratio"] == ratios[stop.kept_step]  # the card reports the kept weights


def test_resume_ends_bit_identical_to_the_uninterrupted_run(crossing, three_digits, tmp_path):
    stop = crossing.result.early_stopping
    expected = load_file(str(crossing.output_dir / "transformer" / "diffusion_pytorch_model.safetensors"))
    curve = json.loads((crossing.output_dir / CURVE_JSON).read_text())
    # from the checkpoint of a validation below the threshold, and from the checkpoint of the stop itself
    for step in (stop.kept_step, stop.stopped_step):
        resumed = crossing_run(tmp_path / f"from-{step}", three_digits,
                               resume_from_checkpoint=crossing.output_dir / f"checkpoint-{step}")
        assert resumed.result.steps == stop.stopped_step
        weights = load_file(str(resumed.output_dir / "transformer" / "diffusion_pytorch_model.safetensors"))
        for name in expected:
            assert torch.equal(weights[name], expected[name]), name
        assert json.loads((resumed.output_dir / CURVE_JSON).read_text())["curve"] == curve["curve"]
    kept_checkpoint = crossing.output_dir / f"checkpoint-{stop.kept_step}"
    with pytest.raises(ValueError, match="resume with --stop_at_memorization 0.1"):
        train_pipeline(tmp_path / "other", three_digits, small_dit(), make_noise_scheduler(),
                       TrainingConfig(**{**CROSSING, "stop_at_memorization": 0.5}), validation=CROSSING_VALIDATION,
                       output=OutputConfig(report_to="none", resume_from_checkpoint=kept_checkpoint))


def test_two_processes_stop_at_the_step_of_one_process(tmp_path):
    """A real gloo run of 2 processes x batch 4 against 1 process x batch 8 (the same global batches)."""
    common = ["--max_train_samples", "3", "--num_layers", "2", "--num_attention_heads", "2", "--attention_head_dim",
              "16", "--learning_rate", "3e-3", "--lr_warmup_steps", "5", "--ema_max_decay", "0.9",
              "--max_train_steps", "2000", "--validation_steps", "100", "--stop_at_memorization", "0.1",
              "--validation_num_samples", "16", "--validation_inference_steps", "50", "--checkpointing_steps", "0",
              "--report_to", "none", "--no_progress"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    script = str(ROOT / "training" / "train_dit.py")
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          "29533", script, *common, "--train_batch_size", "4", "--output_dir", str(tmp_path / "two")],
                         env=env, capture_output=True, text=True, timeout=900)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, script, *common, "--train_batch_size", "8", "--output_dir",
                          str(tmp_path / "one")], env=env, capture_output=True, text=True, timeout=900)
    assert one.returncode == 0, one.stderr[-3000:]
    curves = [json.loads((tmp_path / run / CURVE_JSON).read_text()) for run in ("one", "two")]
    assert curves[0]["stopped_step"] is not None
    for key in ("kept_step", "stopped_step"):
        assert curves[1][key] == curves[0][key], key


@pytest.mark.parametrize("argv, phrase", [
    (["--stop_at_memorization", "1.0"], "stop_at_memorization must be a memorization ratio in [0, 1)"),
    (["--stop_at_memorization", "0.1", "--validation_steps", "0"], "--validation_steps N"),
    (["--stop_at_memorization", "0.1", "--validation_num_samples", "0"], "--validation_num_samples > 0"),
])
def test_memsep_train_refuses_bad_early_stopping_flags(tmp_path, capsys, argv, phrase):
    from diffusers_memsep.cli import main

    code = main(["--max_train_samples", "3", "--num_layers", "1", "--max_train_steps", "2", "--report_to", "none",
                 "--no_progress", "--output_dir", str(tmp_path / "run"), *argv], command="train")
    error = capsys.readouterr().err
    assert code == 2 and error.startswith("memsep: error:") and phrase in error, error
    assert not (tmp_path / "run" / "model_index.json").exists()


def test_curve_files_hold_the_quality_metrics(tmp_path):
    stop = EarlyStopping(0.25)
    for step, ratio in ((10, 0.0), (20, 0.2), (30, 0.5)):
        stop.observe(step, ratio, {"precision": 0.5 + ratio, "recall": 0.4, "frechet_distance": 9.0}, {})
    json_path, png_path = stop.write_curve(tmp_path, validation_seed=CURVE_SEED)
    record = json.loads(json_path.read_text())
    assert record["kept_step"] == 20 and record["stopped_step"] == 30 and record["num_validations"] == 3
    assert record["curve"][1] == {"precision": 0.7, "recall": 0.4, "frechet_distance": 9.0, "step": 20,
                                  "memorization_ratio": 0.2}
    assert png_path.stat().st_size > 1000 and not list(tmp_path.glob(".*tmp*"))  # atomic: no temporary left


def test_the_validation_samples_with_the_configured_sampler(tmp_path, three_digits, monkeypatch):
    """``ValidationConfig.sampler``: DDIM when asked (the study validates as it evaluates), named in the card."""
    original, schedulers = diffusers_memsep.trainer.output.sample_pipeline, []

    def recording(pipe, *args, **kwargs):
        schedulers.append(type(kwargs.get("scheduler") or pipe.scheduler).__name__)
        return original(pipe, *args, **kwargs)

    monkeypatch.setattr(diffusers_memsep.trainer.output, "sample_pipeline", recording)
    for sampler, name in (("ddim", "DDIMScheduler"), ("ddpm", "DDPMScheduler")):
        schedulers.clear()
        folder = tmp_path / sampler
        train_pipeline(folder, three_digits, small_dit(), make_noise_scheduler(20),
                       TrainingConfig(max_train_steps=2, train_batch_size=3, validation_steps=1, show_progress=False),
                       output=OutputConfig(report_to="none"),
                       validation=ValidationConfig(num_samples=4, inference_steps=2, sampler=sampler))
        assert set(schedulers) == {name}
        assert f"{sampler.upper()}-2" in (folder / "README.md").read_text()
    with pytest.raises(ValueError, match="--validation_sampler"):
        ValidationConfig(sampler="euler")
