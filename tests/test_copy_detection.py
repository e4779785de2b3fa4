"""The copy-detection space: edited copies of training images are caught, novel held-out images are not; the network
saves and reloads as safetensors with its recipe; a pretrained transformers backbone loads offline."""

import json
import shutil

import pytest
import torch

from diffusers_memsep.builtin_data import patch_grid, patches32_folder
from diffusers_memsep.memorization.copy_detection import (
    CopyDetectionNet,
    calibrate_copy_threshold,
    conformal_count,
    copy_detection_space,
    copy_report,
    pretrained_copy_space,
    promised_false_positive_rate,
    threshold_above,
    threshold_below,
    wilson_interval,
)
from diffusers_memsep.memorization.metrics import memorization_report


def shift_one_pixel(images):
    padded = torch.nn.functional.pad(images, (1, 1, 1, 1), mode="replicate")
    return padded[:, :, 2:, 1:-1]  # up by one pixel


def smooth_images(count: int, seed: int = 0) -> torch.Tensor:
    """Distinct RGB 8x8 images: random 3x3 colour fields upsampled (bicubic), plus fine detail."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.nn.functional.interpolate(torch.rand(count, 3, 3, 3, generator=generator) * 2 - 1, size=(8, 8),
                                             mode="bicubic", align_corners=False)
    return (coarse + 0.2 * torch.randn(count, 3, 8, 8, generator=generator)).clamp(-1, 1)


@pytest.fixture(scope="module")
def digits_space(tmp_path_factory):
    images = smooth_images(400)
    cache = tmp_path_factory.mktemp("copy_space")
    return images, copy_detection_space(images, cache, num_steps=150, batch_size=128), cache


def test_edited_copies_caught_novel_images_not(digits_space):
    images, space, _ = digits_space
    held = torch.tensor(space.holdout_indices)
    train_rows = sorted(set(range(len(images))) - set(space.holdout_indices))[:8]
    train = images[train_rows]
    calibration, evaluation = images[held[::2]], images[held[1::2]]
    space.threshold = calibrate_copy_threshold(space, train, calibration)
    assert copy_report(space, calibration, train).copied.float().mean() <= 0.01
    novel = copy_report(space, evaluation, train)
    assert novel.copied.float().mean() <= 0.05, novel.similarity.topk(5)
    edits = {"shift": shift_one_pixel(train), "flip": train.flip(-1), "recolour": ((train + 1) * 0.85 - 1)}
    for name, copies in edits.items():
        caught = copy_report(space, copies, train)
        assert caught.copied.float().mean() >= (1.0 if name == "flip" else 0.75), (name, caught.similarity)
        assert (caught.nearest_index[caught.copied] == torch.arange(8)[caught.copied]).all()
    # the pixel rule misses the shifted and flipped copies: the reason this space exists
    assert memorization_report(edits["shift"], train).memorized.float().mean() <= 0.25
    assert memorization_report(edits["flip"], train).memorized.float().mean() <= 0.25


def test_space_cached_as_safetensors_and_reused(digits_space):
    images, space, cache = digits_space
    recipe = json.loads((cache / "recipe.json").read_text())
    assert (cache / "diffusion_pytorch_model.safetensors").is_file() and not list(cache.glob("*.bin"))
    assert "split-conformal" in recipe["threshold_rule"]
    reloaded = copy_detection_space(images, cache, num_steps=1)  # cache hit: num_steps is not used
    assert reloaded.threshold == recipe["threshold"]  # (other tests recalibrate the fixture's space in place)
    assert torch.allclose(reloaded(images[:16]), space(images[:16]), atol=1e-6)
    assert CopyDetectionNet.from_pretrained(str(cache)).config.pool_flip is True


def test_cache_of_an_earlier_calibration_rule_is_recalibrated(digits_space, tmp_path):
    images, space, cache = digits_space
    stale = tmp_path / "stale"
    shutil.copytree(cache, stale)
    recipe = json.loads((stale / "recipe.json").read_text())
    current = recipe["threshold"]
    recipe.update(threshold=0.123, threshold_rule="1% false positives on the held-out images")  # the old rule
    (stale / "recipe.json").write_text(json.dumps(recipe))
    reloaded = copy_detection_space(images, stale, num_steps=1)
    assert reloaded.threshold == current != 0.123  # the network is reused, the threshold recalibrated
    assert torch.allclose(reloaded(images[:16]), space(images[:16]), atol=1e-6)
    assert json.loads((stale / "recipe.json").read_text())["threshold"] == current  # and the cache mended


def test_flip_invariance_is_exact():
    torch.manual_seed(0)
    model = CopyDetectionNet(in_channels=3, resolution=8, width=4).eval()
    images = torch.rand(4, 3, 8, 8) * 2 - 1
    assert torch.allclose(model(images), model(images.flip(-1)), atol=1e-5)


def test_patches32_folder(tmp_path):
    folder = patches32_folder(tmp_path)
    files = sorted(p for p in (tmp_path / "data" / "patches32").rglob("*.png"))
    assert len(files) == int((tmp_path / "data" / "patches32" / "COMPLETE").read_text()) > 1000
    assert patches32_folder(tmp_path) == folder  # built once
    flat = torch.zeros(64, 64, 3, dtype=torch.uint8).numpy()
    assert patch_grid(flat) == []  # flat patches are dropped


def test_pretrained_backbone_loads_offline(tmp_path):
    transformers = pytest.importorskip("transformers", reason="the pretrained copy space needs transformers")
    config = transformers.Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=32, image_size=14, patch_size=7)
    transformers.Dinov2Model(config).save_pretrained(tmp_path / "tiny-dinov2")
    space = pretrained_copy_space(str(tmp_path / "tiny-dinov2"), local_files_only=True)
    images = torch.rand(3, 1, 8, 8) * 2 - 1
    embeddings = space(images)
    assert embeddings.shape == (3, 16) and torch.allclose(embeddings.norm(dim=1), torch.ones(3), atol=1e-5)
    assert copy_report(space, images, images).similarity.min() > 0.999  # every image is its own copy


def test_wilson_interval():
    low, high = wilson_interval(0, 20)
    assert low == 0 and 0.1 < high < 0.2
    assert wilson_interval(10, 20)[0] < 0.5 < wilson_interval(10, 20)[1]


def test_conformal_count_keeps_its_promise_on_new_images():
    """A threshold flagging conformal_count(n) of n exchangeable held-out scores flags a NEW score with probability
    (k + 1) / (n + 1) <= rate (Monte Carlo), while the plain order statistic floor(rate * n) promises more."""
    assert [conformal_count(n) for n in (10, 98, 99, 179, 198, 199, 287, 359)] == [0, 0, 0, 0, 0, 1, 1, 2]
    assert promised_false_positive_rate(179, conformal_count(179)) == pytest.approx(1 / 180)
    assert promised_false_positive_rate(179, 1) > 0.01  # floor(1% of 179) = 1 flagged: 2/180
    assert promised_false_positive_rate(10, conformal_count(10)) == pytest.approx(1 / 11)  # too few to keep 1%
    generator = torch.Generator().manual_seed(0)
    for n, rate in ((179, 0.01), (287, 0.01), (60, 0.05)):
        trials = 8000
        calibration = torch.rand(trials, n, generator=generator)
        fresh = torch.rand(trials, generator=generator)
        flagged = torch.tensor([fresh[i] >= threshold_above(calibration[i], rate) for i in range(trials)])
        expected = promised_false_positive_rate(n, conformal_count(n, rate))
        assert expected <= rate
        assert abs(flagged.float().mean().item() - expected) < 4 * (expected / trials) ** 0.5 + 1e-3
        below = torch.tensor([-fresh[i] <= threshold_below(-calibration[i], rate) for i in range(trials)])
        assert torch.equal(below, flagged)  # the distance form is the same rule on the negated scores
