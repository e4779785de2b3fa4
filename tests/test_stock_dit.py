"""Stock DiT checkpoints end to end: a tiny folder laid out like the Hub's facebook/DiT-XL-2-256 (latent DiT with
learned sigma, AutoencoderKL, DDIM, id2label, legacy ``Transformer2DModel`` class name), saved with stock diffusers,
through memsep reference / memsep prune, and back through MemSepPipeline and stock DiffusionPipeline loading."""

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DDPMScheduler, DiTPipeline, DiTTransformer2DModel
from huggingface_hub import ModelCard
from PIL import Image

from diffusers_memsep import MemSepPipeline, PrunableDiTTransformer2DModel
from diffusers_memsep.cli import main
from diffusers_memsep.data import TrainingData
from diffusers_memsep.hub import render_model_card
from diffusers_memsep.latents import encode_images, latent_cache_key, latent_training_data
from diffusers_memsep.pruning import one_shot_prune, small_time_head_importance

from conftest import tiny_dit

ID2LABEL = {0: "cat", 1: "dog, puppy", 2: "bird"}
QUICK_PRUNE = ["--seeds", "0", "--finetune_steps", "1", "--finetune_batch_size", "4", "--importance_batches", "1",
               "--importance_batch_size", "4", "--num_samples", "4", "--num_inference_steps", "2"]


def latent_dit() -> DiTTransformer2DModel:
    """A stock DiT on 4x4x4 latents with learned sigma (out_channels = 2 x in_channels), 3 classes."""
    return tiny_dit(in_channels=4, sample_size=4, num_classes=len(ID2LABEL), seed=1)


def tiny_vae() -> AutoencoderKL:
    """8x8 RGB <-> 4x4 latents with 4 channels (two blocks: one 2x downsample)."""
    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, norm_num_groups=4, sample_size=8)


@pytest.fixture(scope="module")
def stock_folder(tmp_path_factory) -> Path:
    """Saved with stock diffusers, then edited to the Hub's legacy layout (id2label, Transformer2DModel)."""
    folder = tmp_path_factory.mktemp("stock") / "dit"
    DiTPipeline(transformer=latent_dit(), vae=tiny_vae(), scheduler=DDIMScheduler(), id2label=ID2LABEL
                ).save_pretrained(folder)
    model_index = json.loads((folder / "model_index.json").read_text())
    model_index["transformer"] = ["diffusers", "Transformer2DModel"]
    model_index["id2label"] = {str(k): v for k, v in ID2LABEL.items()}  # DiTPipeline itself does not save it
    (folder / "model_index.json").write_text(json.dumps(model_index))
    config = json.loads((folder / "transformer" / "config.json").read_text())
    config["_class_name"] = "Transformer2DModel"
    (folder / "transformer" / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """Eight 12x12 RGB images in two class sub-folders (resized to the pipeline's 8x8 output when loaded)."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for name in ("cat", "dog"):
        (folder / name).mkdir()
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)).save(folder / name / f"{i}.png")
    return folder


def sample(pipe, **kwargs):
    return pipe(num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt", **kwargs)


def check_flags_copies(pipe):
    """A reference holding the pipeline's own decoded samples (among other images) flags every sample as a copy."""
    samples = sample(pipe, class_labels=[0, 1]).images * 2 - 1
    others = torch.rand(6, *pipe.image_shape, generator=torch.Generator().manual_seed(1)) * 2 - 1
    pipe.attach_reference(torch.cat([others[:3], samples, others[3:]]))
    out = sample(pipe, class_labels=[0, 1])
    assert out.memorized.tolist() == [True, True] and out.nearest_index.tolist() == [3, 4]
    pipe.attach_reference(others)
    assert not sample(pipe, class_labels=[0, 1]).memorized.any()


# ---------------------------------------------------------------------------------------------- DiT parity
def test_stock_folder_loads_with_labels_and_class_names(stock_folder, tmp_path):
    pipe = MemSepPipeline.from_pretrained(stock_folder)
    assert type(pipe.transformer) is DiTTransformer2DModel and pipe.vae is not None
    assert pipe.image_shape == (3, 8, 8) and pipe.num_classes == 3
    assert pipe.labels == DiTPipeline(pipe.transformer, pipe.vae, pipe.scheduler, id2label=ID2LABEL).labels
    assert pipe.labels == {"bird": 2, "cat": 0, "dog": 1, "puppy": 1}
    assert pipe.get_label_ids(["puppy", "bird"]) == [1, 2] and pipe.get_label_ids("cat") == [0]
    with pytest.raises(ValueError, match="'zebra' is not a class name.*pipe.labels"):
        pipe.get_label_ids(["cat", "zebra"])
    by_name, by_id = sample(pipe, class_labels=["dog", "bird"]), sample(pipe, class_labels=[1, 2])
    assert torch.equal(by_name.images, by_id.images) and by_name.images.shape == (2, 3, 8, 8)
    assert sample(pipe, class_labels="cat", batch_size=3).images.shape[0] == 3
    pipe.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "model_index.json").read_text())
    assert saved["id2label"] == {"0": "cat", "1": "dog, puppy", "2": "bird"}
    assert MemSepPipeline.from_pretrained(tmp_path / "saved").labels == pipe.labels


def test_reference_on_a_stock_checkpoint_flags_copies(stock_folder):
    pipe = MemSepPipeline.from_pretrained(stock_folder)
    assert pipe.reference is None
    check_flags_copies(pipe)
    grey = torch.rand(3, 1, 16, 16) * 2 - 1  # resized to 8x8 and repeated to RGB: the pipeline's output space
    assert pipe.attach_reference(grey).sample_shape == (3, 8, 8)
    with pytest.raises(ValueError, match="2 channels but this pipeline generates 3"):
        pipe.attach_reference(torch.zeros(3, 2, 8, 8))


def test_memsep_reference_command(stock_folder, image_folder, tmp_path, capsys):
    output = tmp_path / "with_reference"
    assert main(["reference", "--pipeline", str(stock_folder), "--output_dir", str(output), "--train_data_dir",
                 str(image_folder), "--num_samples", "3", "--num_inference_steps", "2"]) == 0
    printed = capsys.readouterr().out
    assert "reference of 8 images" in printed and "of 3 samples copy a training image" in printed
    pipe = MemSepPipeline.from_pretrained(output)
    assert pipe.reference.sample_shape == (3, 8, 8) and pipe.reference.num_images == 8
    assert pipe.labels["puppy"] == 1  # the class names travel with the folder
    assert main(["reference", "--pipeline", str(stock_folder), "--output_dir", str(output), "--train_data_dir",
                 str(image_folder)]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["reference", "--pipeline", str(stock_folder), "--output_dir", str(tmp_path / "x")]) == 2
    assert "--train_data_dir" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ latents
def test_latents_are_the_scaled_mean_and_cached_by_content(tmp_path, monkeypatch):
    vae = tiny_vae()
    images = torch.rand(5, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    expected = vae.encode(images).latent_dist.mean * vae.config.scaling_factor
    torch.testing.assert_close(encode_images(vae, images, batch_size=2), expected, rtol=1e-5, atol=1e-6)

    calls = []
    import diffusers_memsep.latents as latents

    real_encode = latents.encode_images
    monkeypatch.setattr(latents, "encode_images", lambda *a, **k: calls.append(1) or real_encode(*a, **k))
    data = TrainingData(images, torch.tensor([0, 1, 2, 0, 1]), 3, "test images")
    first = latent_training_data(data, vae, tmp_path)
    second = latent_training_data(data, vae, tmp_path)
    assert len(calls) == 1 and torch.equal(first.images, second.images) and torch.equal(first.labels, data.labels)
    assert len(list(tmp_path.glob("latents-*.safetensors"))) == 1
    other_vae = tiny_vae()
    with torch.no_grad():
        other_vae.encoder.conv_in.weight.add_(0.1)
    assert latent_cache_key(images, other_vae) != latent_cache_key(images, vae)
    assert latent_cache_key(images.flip(0), vae) != latent_cache_key(images, vae)
    with pytest.raises(ValueError, match="encodes \\[n, 3, H, W\\]"):
        encode_images(vae, images[:, :1])


def test_head_scores_and_pruning_on_latents_with_learned_sigma():
    vae, dit = tiny_vae(), latent_dit()
    images = torch.rand(6, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    data = TrainingData(images, torch.tensor([0, 1, 2, 0, 1, 2]), 3, "test images")
    scheduler = DDPMScheduler()
    model = PrunableDiTTransformer2DModel.from_dit(dit)
    with pytest.raises(ValueError, match="latent_training_data"):
        small_time_head_importance(model, data, scheduler, num_batches=1, batch_size=2)
    scores = small_time_head_importance(model, latent_training_data(data, vae), scheduler, num_batches=1,
                                        batch_size=2)
    assert torch.isfinite(scores.scores).all() and (scores.raw_scores > 0).all()

    from diffusers_memsep.trainer import TrainingConfig

    finetune = TrainingConfig(max_train_steps=1, train_batch_size=2, lr_warmup_steps=0, show_progress=False)
    pruned = one_shot_prune(dit, data, scheduler, eta=0.5, method="small_t", finetune_config=finetune,
                            num_batches=1, batch_size=2, vae=vae)
    assert sum(pruned.model.heads_per_layer()) == 2 and len(pruned.finetune.losses) == 1


def test_memorization_gap_on_a_latent_dit_scores_held_out_latents(tmp_path):
    """memorization_gap on a latent DiT: the held-out images are encoded with the training images (both cached)."""
    from diffusers_memsep.data import with_held_out
    from diffusers_memsep.trainer import TrainingConfig

    vae, dit = tiny_vae(), latent_dit()
    generator = torch.Generator().manual_seed(0)
    train = TrainingData(torch.rand(6, 3, 8, 8, generator=generator) * 2 - 1, torch.tensor([0, 1, 2] * 2), 3, "t")
    held = TrainingData(torch.rand(5, 3, 8, 8, generator=generator) * 2 - 1, torch.tensor([2, 1, 0, 1, 2]), 3, "h")
    latents = latent_training_data(with_held_out(train, held), vae, tmp_path)
    assert tuple(latents.images.shape) == (6, 4, 4, 4) and tuple(latents.held_out.images.shape) == (5, 4, 4, 4)
    assert torch.equal(latents.held_out.images, encode_images(vae, held.images))
    assert len(list(tmp_path.glob("latents-*.safetensors"))) == 2
    finetune = TrainingConfig(max_train_steps=1, train_batch_size=2, lr_warmup_steps=0, show_progress=False)
    pruned = one_shot_prune(dit, with_held_out(train, held), DDPMScheduler(), eta=0.5, method="memorization_gap",
                            finetune_config=finetune, num_batches=1, batch_size=2, vae=vae)
    assert sum(pruned.model.heads_per_layer()) == 2 and torch.isfinite(pruned.importance.raw_scores).all()


# ------------------------------------------------------------------------------------------- memsep prune
@pytest.fixture(scope="module")
def pruned_dir(stock_folder, image_folder, tmp_path_factory):
    output = tmp_path_factory.mktemp("pruned")
    code = main(["prune", "--pipeline", str(stock_folder), "--output_dir", str(output), "--train_data_dir",
                 str(image_folder), "--label_column", "label", "--methods", "small_t", "ablation", "random",
                 "--etas", "0.5", *QUICK_PRUNE])
    assert code == 0
    return output


def test_prune_without_reference_or_data_flags_says_how(stock_folder, tmp_path, capsys):
    assert main(["prune", "--pipeline", str(stock_folder), "--output_dir", str(tmp_path / "out"), *QUICK_PRUNE]) == 2
    error = capsys.readouterr().err
    assert "has no training reference" in error and "--train_data_dir" in error and "memsep reference" in error
    assert not (tmp_path / "out").exists()


def test_prune_a_stock_checkpoint_without_reference(pruned_dir):
    assert len(list((pruned_dir / "latent_cache").glob("latents-*.safetensors"))) == 1  # encoded once for all
    rows = list(csv.DictReader((pruned_dir / "runs.csv").open()))
    assert [row["method"] for row in rows] == ["original", "finetune_only", "small_t", "ablation", "random"]
    # quality in features trained on the decoded (pixel) population images, not on latents
    assert all(row["feature_space"].endswith("-trained features") for row in rows)
    recipe = json.loads(next((pruned_dir / "feature_network").rglob("*.json")).read_text())
    assert "8" in json.dumps(recipe) and "latent" not in json.dumps(recipe).lower()
    for method in ("small_t", "ablation", "random"):
        folder = pruned_dir / "variants" / f"{method}-eta0.5"
        pipe = MemSepPipeline.from_pretrained(folder)
        assert isinstance(pipe.transformer, PrunableDiTTransformer2DModel) and pipe.vae is not None
        assert pipe.transformer.config.out_channels == 8 and sum(pipe.transformer.heads_per_layer()) == 2
        assert pipe.reference.sample_shape == (3, 8, 8) and pipe.reference.num_images == 8
        assert pipe.labels == {"bird": 2, "cat": 0, "dog": 1, "puppy": 1}
        check_flags_copies(pipe)


def test_variant_cards_metadata_and_usage(pruned_dir):
    folder = pruned_dir / "variants" / "small_t-eta0.5"
    card = ModelCard.load(folder / "README.md")
    data = card.data.to_dict()
    assert "base_model" not in data and "datasets" not in data  # local paths are not Hub ids
    assert "pipeline_tag" not in data and "class-conditional-image-generation" in data["tags"]
    assert data["model-index"][0]["results"][0]["dataset"]["type"] == "custom"
    assert str(folder.resolve()) in card.text and 'custom_pipeline="pipeline_memsep"' in card.text
    assert "path/to/this/folder" not in card.text and "class_labels=list(range(3))" in card.text

    hub_card = render_model_card("pruned_variant", metadata={"base_model": "facebook/DiT-XL-2-256",
                                                             "datasets": ["/local/images", "user/my-images"]},
                                 hub_model_id="me/dit-small_t", num_classes=None)
    hub_data = ModelCard(str(hub_card)).data.to_dict()
    assert hub_data["base_model"] == "facebook/DiT-XL-2-256" and hub_data["base_model_relation"] == "finetune"
    assert hub_data["datasets"] == ["user/my-images"] and hub_data["pipeline_tag"] == "unconditional-image-generation"
    assert 'from_pretrained("me/dit-small_t"' in hub_card.text


@pytest.mark.parametrize("by_repo_id", [False, True], ids=["folder", "repo_id"])
def test_saved_variant_loads_with_stock_diffusers_alone(pruned_dir, tmp_path, by_repo_id):
    """No diffusers_memsep import allowed: the folder's own code (pipeline_memsep.py + component files) is used.
    By repo id: the folder laid out as a Hub cache after a download (no network), loaded with HF_HUB_OFFLINE=1."""
    folder = pruned_dir / "variants" / "random-eta0.5"
    assert (folder / "pipeline_memsep.py").is_file()
    source = str(folder)
    if by_repo_id:
        source, revision = "someone/dit-random", "0123456789abcdef0123456789abcdef01234567"
        repo_dir = tmp_path / "hub" / "models--someone--dit-random"
        shutil.copytree(folder, repo_dir / "snapshots" / revision)
        (repo_dir / "refs").mkdir()
        (repo_dir / "refs" / "main").write_text(revision)
    script = f"""
import sys
sys.modules["diffusers_memsep"] = None  # any import of the installed package fails
import torch
from diffusers import DiffusionPipeline
pipe = DiffusionPipeline.from_pretrained({source!r}, custom_pipeline="pipeline_memsep", trust_remote_code=True)
assert type(pipe).__name__ == "MemSepPipeline", type(pipe)
assert type(pipe.transformer).__name__ == "PrunableDiTTransformer2DModel"
out = pipe(class_labels=["cat", "bird"], num_inference_steps=2, output_type="pt", memorization_score=True)
assert out.images.shape == (2, 3, 8, 8) and out.memorized.shape == (2,)
assert out.memorization_score.shape == (2,) and torch.isfinite(out.memorization_score).all()  # latent, offline
print("stock ok", sum(pipe.transformer.heads_per_layer()))
"""
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": "",
           "HF_HUB_CACHE": str(tmp_path / "hub")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "stock ok 2" in result.stdout


# ------------------------------------------------------------------------------- memsep train, pretrained start
def test_train_fine_tunes_a_stock_latent_dit_on_my_images(stock_folder, image_folder, tmp_path):
    """--pretrained_model_name_or_path: the stock weights, VAE and schedule; training in latent space; the output
    pipeline keeps the VAE and class names and judges decoded samples against the PIXEL training images."""
    out = tmp_path / "fine-tuned"
    assert main(["train", "--pretrained_model_name_or_path", str(stock_folder), "--train_data_dir", str(image_folder),
                 "--label_column", "label", "--max_train_samples", "0", "--max_train_steps", "3",
                 "--train_batch_size", "4", "--learning_rate", "1e-3", "--lr_warmup_steps", "0",
                 "--validation_num_samples", "4", "--validation_inference_steps", "2", "--checkpointing_steps", "3",
                 "--report_to", "none", "--no_progress", "--output_dir", str(out)]) == 0
    assert len(list((out / "latent_cache").glob("latents-*.safetensors"))) == 1  # encoded once
    pipe = MemSepPipeline.from_pretrained(out)
    assert pipe.vae is not None and pipe.labels["puppy"] == 1
    assert pipe.reference.sample_shape == (3, 8, 8) and pipe.reference.num_images == 8  # pixel images
    stock = DiTTransformer2DModel.from_pretrained(stock_folder, subfolder="transformer")
    tuned = pipe.transformer.state_dict()
    assert tuned["proj_out_2.weight"].shape == (2 * 2 * 8, 16)  # learned sigma kept
    assert any(not torch.equal(tuned[k], v) for k, v in stock.state_dict().items())  # it trained
    # the checkpoint opens with from_pretrained; the VAE is frozen, so it is not in the checkpoint
    assert PrunableDiTTransformer2DModel.from_pretrained(out / "checkpoint-3" / "transformer").config.in_channels == 4
    assert not (out / "checkpoint-3" / "vae").exists()
    card = ModelCard.load(out / "README.md")
    assert card.data.base_model is None and "latent DiT" in card.text  # a local folder is no Hub base_model
    check_flags_copies(pipe)


def test_train_pretrained_refuses_mismatched_flags(stock_folder, tmp_path, capsys):
    assert main(["train", "--pretrained_model_name_or_path", str(stock_folder), "--random_flip",
                 "--output_dir", str(tmp_path / "out")]) == 2
    assert "cannot flip latents" in capsys.readouterr().err
    assert main(["train", "--pretrained_model_name_or_path", str(tmp_path / "missing"),
                 "--output_dir", str(tmp_path / "out")]) == 2
    assert "is not a folder" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
