"""training/train_dit.py (= memsep train): accelerate launch, the output pipeline, imagefolder data, bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_memsep.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--num_layers", "1", "--num_attention_heads", "2", "--attention_head_dim", "8", "--train_batch_size", "8",
        "--validation_num_samples", "4", "--validation_inference_steps", "4", "--no_progress", "--report_to", "none"]


def train(*argv):
    return main([*TINY, *map(str, argv)], command="train")


def test_accelerate_launch_tiny_run_output_loads_and_samples(tmp_path):
    """The real command line: accelerate launch; the output folder loads with MemSepPipeline and samples."""
    out = tmp_path / "run"
    accelerate = Path(sys.executable).with_name("accelerate")
    command = [str(accelerate), "launch", "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
               "--dynamo_backend", "no", "--cpu", str(ROOT / "training" / "train_dit.py"),
               *[a for a in TINY if a not in ("none", "--report_to")], "--output_dir", str(out),
               "--max_train_samples", "16", "--max_train_steps", "4", "--checkpointing_steps", "2",
               "--validation_steps", "2"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Saved a MemSepPipeline to" in done.stdout

    assert (out / "model_index.json").is_file() and (out / "README.md").is_file()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert sorted(p.name for p in (out / "samples").iterdir()) == ["step-000002.png", "step-000004.png"]
    assert list((out / "logs").rglob("events.out.tfevents*"))
    assert not list(out.glob(".*tmp"))
    card = (out / "README.md").read_text()
    assert "model-index" in card and "memorization_ratio" in card and "16 images" in card

    from diffusers_memsep import MemSepPipeline

    pipe = MemSepPipeline.from_pretrained(out)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.reference.num_images == 16 and pipe.config.label_dropout_prob == 1.0
    from diffusers_memsep.data import load_training_data

    assert torch.equal(pipe.reference.images, load_training_data(max_train_samples=16, seed=0).images)
    output = pipe(batch_size=3, num_inference_steps=3, output_type="pt", generator=torch.Generator().manual_seed(0))
    assert output.images.shape == (3, 1, 8, 8) and output.memorized.shape == (3,)
    assert output.nearest_index.max() < 16


def test_offline_push_fails_before_training_in_one_line(tmp_path, monkeypatch, capsys):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    out = tmp_path / "run"
    assert train("--output_dir", out, "--max_train_samples", "8", "--max_train_steps", "1",
                 "--checkpointing_steps", "0", "--push_to_hub", "--hub_model_id", "someone/tiny-dit") == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and error.startswith("memsep: error: cannot push to someone/tiny-dit")
    assert "HF_HUB_OFFLINE" in error
    assert not (out / "model_index.json").exists()  # refused before the first training step


def test_offline_push_after_training_keeps_the_folder(tmp_path, monkeypatch):
    from diffusers_memsep.hub import HubPushError, push_folder_to_hub

    out = tmp_path / "run"
    assert train("--output_dir", out, "--max_train_samples", "8", "--max_train_steps", "1",
                 "--checkpointing_steps", "0") == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubPushError, match="memsep push"):
        push_folder_to_hub(out, "someone/tiny-dit")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    from diffusers_memsep import MemSepPipeline

    assert MemSepPipeline.from_pretrained(out).reference.num_images == 8


def _pngs(folder, classes=("zero", "one"), per_class=4, size=8):
    rng = np.random.default_rng(0)
    for name in classes:
        (folder / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / name / f"{i}.png")


def test_train_data_dir_class_conditional_and_resume_latest(tmp_path):
    _pngs(tmp_path / "images")
    out = tmp_path / "run"
    common = ["--train_data_dir", tmp_path / "images", "--label_column", "label", "--output_dir", out,
              "--max_train_samples", "0", "--checkpointing_steps", "2", "--validation_steps", "0"]
    assert train(*common, "--max_train_steps", "2") == 0
    config = json.loads((out / "transformer" / "config.json").read_text())
    assert config["in_channels"] == 3 and config["num_embeds_ada_norm"] == 2 and config["sample_size"] == 8
    assert json.loads((out / "model_index.json").read_text())["label_dropout_prob"] == 0.1
    # continue the same run: allowed without --overwrite_output_dir because it resumes
    assert train(*common, "--max_train_steps", "4", "--resume_from_checkpoint", "latest") == 0
    state = json.loads((out / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["global_step"] == 4


def _snapshot(folder: Path):
    return {str(p.relative_to(folder)): p.stat().st_mtime_ns for p in folder.rglob("*")} if folder.exists() else {}


@pytest.mark.parametrize("case", ["empty_dir", "unreadable", "patch", "label_column", "labels_beyond_classes",
                                  "too_many_samples", "resume_nothing", "occupied_output"])
def test_bad_input_fails_before_training_and_writes_nothing(tmp_path, case, capsys):
    out = tmp_path / "run"
    argv = ["--output_dir", out, "--max_train_steps", "2"]
    if case == "empty_dir":
        (tmp_path / "empty").mkdir()
        argv += ["--train_data_dir", tmp_path / "empty"]
        expected = "no image files"
    elif case == "unreadable":
        _pngs(tmp_path / "images", classes=("a",), per_class=2)
        (tmp_path / "images" / "a" / "broken.png").write_bytes(b"\x89PNG not really")
        argv += ["--train_data_dir", tmp_path / "images"]
        expected = "broken.png"
    elif case == "patch":
        argv += ["--resolution", "9", "--patch_size", "2"]
        expected = "patch size 2 does not divide the resolution 9"
    elif case == "label_column":
        _pngs(tmp_path / "images")
        argv += ["--train_data_dir", tmp_path / "images", "--label_column", "digit"]
        expected = "label column 'digit' not in"
    elif case == "labels_beyond_classes":
        config = tmp_path / "dit.json"
        config.write_text(json.dumps({"_class_name": "PrunableDiTTransformer2DModel", "num_attention_heads": 2,
                                      "attention_head_dim": 8, "in_channels": 1, "num_layers": 1, "sample_size": 8,
                                      "patch_size": 2, "num_embeds_ada_norm": 5}))
        argv += ["--label_column", "label", "--model_config_name_or_path", config]
        expected = "model has 5 classes"
    elif case == "too_many_samples":
        argv += ["--max_train_samples", "5000"]
        expected = "larger than the data"
    elif case == "resume_nothing":
        argv += ["--resume_from_checkpoint", tmp_path / "checkpoint-123"]
        expected = "does not exist"
    else:
        out.mkdir()
        (out / "model_index.json").write_text("{}")
        expected = "already holds another run"
    before = _snapshot(out)
    assert train(*argv) == 2
    message = capsys.readouterr().err
    errors = [line for line in message.splitlines() if line.startswith("memsep: error:")]
    assert len(errors) == 1 and expected in errors[0] and "Traceback" not in message, message
    assert _snapshot(out) == before  # nothing written, nothing overwritten


def test_overwrite_output_dir_replaces_another_run(tmp_path):
    out = tmp_path / "run"
    (out / "checkpoint-7").mkdir(parents=True)
    (out / "checkpoint-7" / "trainer_state.json").write_text('{"global_step": 7}')
    assert train("--output_dir", out, "--max_train_steps", "1", "--max_train_samples", "8",
                 "--checkpointing_steps", "0", "--overwrite_output_dir") == 0
    assert not (out / "checkpoint-7").exists() and (out / "model_index.json").is_file()


def test_validation_measures_quality_against_the_population(tmp_path):
    """--feature_space: precision, recall, Frechet distance and KID at validation, against all 1,797 digits."""
    from diffusers_memsep.data import load_population, load_training_data
    from diffusers_memsep.evaluate import QualityReference
    from diffusers_memsep.memorization import resolve_feature_space
    from diffusers_memsep.trainer import (
        OutputConfig,
        TrainingConfig,
        ValidationConfig,
        make_dit,
        make_noise_scheduler,
        train_pipeline,
    )

    data = load_training_data(max_train_samples=8)
    population = load_population()
    reference = QualityReference.build(resolve_feature_space("pixels", population), population.images, data.images)
    trained = train_pipeline(tmp_path / "run", data, make_dit(num_layers=1, num_attention_heads=2,
                                                               attention_head_dim=8),
                             make_noise_scheduler(20), TrainingConfig(max_train_steps=2, train_batch_size=4,
                                                                      show_progress=False),
                             output=OutputConfig(report_to="none"), validation=ValidationConfig(num_samples=8),
                             quality_reference=reference)
    assert {"memorization_ratio", "precision", "recall", "frechet_distance", "kid", "kid_se"} <= set(trained.metrics)
    assert reference.num_real_images == 1797 and trained.metrics["frechet_distance"] > 0
    assert train("--output_dir", tmp_path / "cli", "--max_train_samples", "8", "--max_train_steps", "1",
                 "--checkpointing_steps", "0", "--feature_space", "pixels") == 0
