"""``memsep audit`` offline on a tiny stock DiTPipeline folder (latent DiT with learned sigma, as on the Hub)."""

import json

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel
from PIL import Image

from diffusers_memsep.cli import main
from diffusers_memsep.data import load_training_data


@pytest.fixture(scope="module")
def stock_folder(tmp_path_factory):
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=4, sample_size=8)
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                num_layers=2, sample_size=4, patch_size=2, num_embeds_ada_norm=2, norm_num_groups=1)
    folder = tmp_path_factory.mktemp("stock") / "dit"
    DiTPipeline(transformer=dit, vae=vae, scheduler=DDIMScheduler()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(12):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    return folder


def test_audit_with_training_images(stock_folder, image_folder, tmp_path):
    out = tmp_path / "audit"
    code = main(["audit", "--pipeline", str(stock_folder), "--output_dir", str(out), "--train_data_dir",
                 str(image_folder), "--max_train_samples", "6", "--num_samples", "6", "--num_inference_steps", "2",
                 "--copy_steps", "5", "--gallery_size", "3", "--no_quality"])
    assert code == 0
    numbers = json.loads((out / "audit.json").read_text())
    assert numbers["training_images"] == 6
    assert numbers["pixel"]["memorized"]["total"] == 6
    assert 0 <= numbers["copy_space"]["copied"]["low"] <= numbers["copy_space"]["copied"]["high"] <= 1
    # the population is the whole folder: the images the copy network never saw (its recipe's held-out rows), minus
    # the training images, measure the copy rule's false positives; too few (< 20) to calibrate: the recipe's threshold
    recipe = json.loads((out / "feature_network" / "copy_space" / "recipe.json").read_text())
    training_rows = load_training_data(train_data_dir=str(image_folder), max_train_samples=6, seed=0).indices
    unseen = set(recipe["holdout_indices"]) - set(training_rows)
    assert numbers["copy_space"].get("held_out_false_positives", {"total": 0})["total"] == len(unseen)
    assert numbers["copy_space"]["threshold"] == pytest.approx(recipe["threshold"])
    assert "recipe" in numbers["copy_space"]["threshold_source"]
    assert len(numbers["copies_per_training_image"]) == 6
    assert len(numbers["model_score"]["scores"]) == 6
    report = (out / "report.md").read_text()
    assert "paper's 1/3 rule" in report and "Which training images leak" in report
    assert (out / "gallery.png").stat().st_size > 0
    assert (out / "feature_network" / "copy_space" / "recipe.json").is_file()
    assert not list(out.glob(".*tmp*"))  # atomic writes leave no temporary file


def test_audit_without_training_images(stock_folder, tmp_path):
    out = tmp_path / "audit"
    assert main(["audit", "--pipeline", str(stock_folder), "--output_dir", str(out), "--num_samples", "4",
                 "--num_inference_steps", "2", "--gallery_size", "2"]) == 0
    numbers = json.loads((out / "audit.json").read_text())
    assert numbers["training_images"] is None and "pixel" not in numbers
    assert numbers["model_score"]["flagged"]["total"] == 4
    assert "only the model-only score" in (out / "report.md").read_text()


def test_audit_bad_input(stock_folder, tmp_path, capsys):
    assert main(["audit", "--pipeline", str(stock_folder), "--output_dir", str(tmp_path / "a"),
                 "--num_samples", "2"]) == 2
    assert "--num_samples must be >= 4" in capsys.readouterr().err
