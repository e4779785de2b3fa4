"""Quality metrics against the population: the KID formula against brute force, feature spaces (population-trained
CNN, FID through a stand-in network), and copies of the training set scoring worse than held-out population images."""

import csv
import itertools
import json
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from diffusers_memsep.cli import main
from diffusers_memsep.data import load_population, load_training_data
from diffusers_memsep.evaluate import QualityReference, evaluate_pipeline
from diffusers_memsep.memorization import NearestNeighborIndex, kernel_distance, mmd2_unbiased, resolve_feature_space
from diffusers_memsep.memorization import features as feature_module
from diffusers_memsep.memorization.features import (
    FID_WEIGHTS_FILE,
    ConvFeatureExtractor,
    DigitsFeatureExtractor,
    find_inception_weights,
    inception_feature_space,
    load_digits_dataset,
    trained_feature_space,
)

FOLDER_SIZE, TRAIN_SIZE = 300, 16


def brute_force_mmd2(x: np.ndarray, y: np.ndarray) -> float:
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3, by explicit loops in float64."""
    d = x.shape[1]
    k = lambda a, b: (float(np.dot(a, b)) / d + 1.0) ** 3  # noqa: E731
    m, n = len(x), len(y)
    xx = sum(k(x[i], x[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i, j in itertools.permutations(range(n), 2)) / (n * (n - 1))
    xy = sum(k(a, b) for a in x for b in y) / (m * n)
    return xx + yy - 2 * xy


@pytest.mark.parametrize("m, n, d", [(5, 7, 3), (9, 4, 6), (2, 2, 1)])
def test_mmd2_unbiased_matches_brute_force(m, n, d):
    generator = torch.Generator().manual_seed(m * 100 + n * 10 + d)
    x, y = torch.randn(m, d, generator=generator), torch.randn(n, d, generator=generator) + 0.5
    assert mmd2_unbiased(x, y) == pytest.approx(brute_force_mmd2(x.double().numpy(), y.double().numpy()), rel=1e-10)


def test_kernel_distance_mean_and_standard_error():
    generator = torch.Generator().manual_seed(0)
    real, fake = torch.randn(12, 4, generator=generator), torch.randn(10, 4, generator=generator) + 1.0
    # subsets as large as the smaller set: every fake subset is the whole fake set, real subsets vary
    mean, error = kernel_distance(real, fake, subset_size=10, num_subsets=50, seed=3)
    values = []
    g = torch.Generator().manual_seed(3)
    for _ in range(50):
        r, f = torch.randperm(12, generator=g)[:10], torch.randperm(10, generator=g)[:10]
        values.append(brute_force_mmd2(real[r].double().numpy(), fake[f].double().numpy()))
    assert mean == pytest.approx(np.mean(values), rel=1e-9)
    assert error == pytest.approx(np.std(values, ddof=1) / np.sqrt(50), rel=1e-9)
    # the same law scores near zero, a shifted law far above it
    same = kernel_distance(torch.randn(400, 4, generator=generator), torch.randn(400, 4, generator=generator))[0]
    assert abs(same) < 0.05 < kernel_distance(real, fake)[0]


def test_digits_classifier_is_the_8x8_case_of_the_general_network():
    general = ConvFeatureExtractor(1, 8, 10)
    assert list(general.state_dict()) == list(DigitsFeatureExtractor().state_dict())
    assert ConvFeatureExtractor(3, 28).resolution == 16 and ConvFeatureExtractor(3, 64).resolution == 32
    images = torch.rand(2, 3, 20, 20) * 2 - 1
    assert ConvFeatureExtractor(3, 20)(images).shape == (2, 64)
    assert ConvFeatureExtractor(1, 4)(images[:, :1, :4, :4]).shape == (2, 64)  # smaller than 8: upsampled


def test_trained_feature_space_is_cached_and_reused(tmp_path, monkeypatch):
    images, labels = load_digits_dataset()
    images = F.interpolate(images[:200], size=16, mode="nearest")
    space = trained_feature_space(images, labels[:200], "digits16", tmp_path / "net", num_steps=30)
    recipe = json.loads((tmp_path / "net" / "recipe.json").read_text())
    assert (tmp_path / "net" / "model.safetensors").is_file()
    assert recipe["objective"] == "classification (10 classes)" and recipe["num_population_images"] == 200
    assert 0.0 <= recipe["holdout_accuracy"] <= 1.0 and recipe["num_holdout_images"] == 20
    assert space.name == "digits16-trained features" and space.frechet_title.startswith("Frechet distance in")
    features = space(images[:5])

    def no_training(*args, **kwargs):
        raise AssertionError("the cached network should have been reused")

    monkeypatch.setattr(feature_module, "train_feature_extractor", no_training)
    torch.testing.assert_close(trained_feature_space(images, labels[:200], "digits16", tmp_path / "net")(images[:5]),
                               features)
    with pytest.raises(AssertionError, match="reused"):  # another population: a new network
        trained_feature_space(images[:100], labels[:100], "digits16", tmp_path / "net")


def test_rotation_prediction_without_labels():
    images = F.interpolate(load_digits_dataset()[0][:120], size=16, mode="nearest")
    space = trained_feature_space(images, None, "unlabelled", num_steps=10)
    assert space.details["objective"] == "rotation prediction (4 classes)" and space(images).shape == (120, 64)


class StandInInception(torch.nn.Module):
    """torch-fidelity's interface (uint8 [B, 3, H, W] in, tuple of features out) with a tiny network."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, 5)

    def forward(self, pixels):
        assert pixels.dtype == torch.uint8 and pixels.shape[1] == 3
        return (self.linear(pixels.float().mean((2, 3))),)


def test_inception_space_feeds_8bit_rgb_through_the_network():
    network = StandInInception()
    space = inception_feature_space(network=network)
    assert space.key == "inception" and space.frechet_title == "FID"
    grey = torch.linspace(-1, 1, 2 * 8 * 8).reshape(2, 1, 8, 8)
    expected = network(((grey + 1) * 127.5).round().to(torch.uint8).expand(-1, 3, -1, -1))[0]
    torch.testing.assert_close(space(grey), expected)


def test_inception_weights_missing_or_library_missing_are_one_line_errors(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(FileNotFoundError, match=FID_WEIGHTS_FILE):
        find_inception_weights()
    with pytest.raises(FileNotFoundError, match="--inception_weights"):
        find_inception_weights(tmp_path / "nothing.pth")
    weights = tmp_path / FID_WEIGHTS_FILE
    torch.save({"w": torch.zeros(1)}, weights)
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # as if torch-fidelity were not installed
    with pytest.raises(ImportError, match=r"diffusers-memsep\[fid\]"):
        inception_feature_space(weights)
    # the CLI stops before training, in one line
    output = tmp_path / "demo"
    assert main(["demo", "--quick", "--output_dir", str(output), "--feature_space", "inception"]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("memsep: error")]
    assert len(errors) == 1 and FID_WEIGHTS_FILE in errors[0] and not (output / "base").exists()
    assert main(["demo", "--quick", "--output_dir", str(output), "--feature_space", "inception",
                 "--inception_weights", str(weights)]) == 2
    assert "diffusers-memsep[fid]" in capsys.readouterr().err and not (output / "base").exists()


# ------------------------------------------------------------------------------ the population, not the training set
@pytest.fixture(scope="module")
def digits_folder(tmp_path_factory):
    """300 digits upsampled to 16x16, as PNGs in one sub-folder per class."""
    folder = tmp_path_factory.mktemp("digits16")
    images, labels = load_digits_dataset()
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:FOLDER_SIZE]
    pixels = ((F.interpolate(images[order], size=16, mode="nearest") + 1) * 127.5).round().to(torch.uint8)
    for row, (image, label) in enumerate(zip(pixels, labels[order])):
        (folder / str(int(label))).mkdir(exist_ok=True)
        Image.fromarray(image[0].numpy(), mode="L").save(folder / str(int(label)) / f"{row:04d}.png")
    return folder


class FakePipeline:
    """Returns stored images instead of denoising: ``pool`` images chosen by the generator."""

    def __init__(self, pool: torch.Tensor, reference: torch.Tensor):
        self.pool, self.reference = pool, NearestNeighborIndex.from_images(reference)
        self.transformer = SimpleNamespace(num_parameters=lambda: 0)

    def __call__(self, class_labels=None, batch_size=None, generator=None, **kwargs):
        rows = torch.randint(0, len(self.pool), (batch_size,), generator=generator)
        return SimpleNamespace(images=(self.pool[rows] + 1) / 2)


def test_copies_of_the_training_set_score_worse_than_held_out_population_images(digits_folder, tmp_path):
    train = load_training_data(train_data_dir=digits_folder, max_train_samples=TRAIN_SIZE, seed=0)
    population = load_population(data_dir=digits_folder)
    assert len(population) == FOLDER_SIZE and population.num_classes == 10
    space = resolve_feature_space("auto", population, tmp_path / "net", num_steps=120)
    assert space.key == "trained" and space.name == f"{digits_folder.name}-trained features"
    held_out = population.images[[i for i in range(FOLDER_SIZE) if i not in set(train.indices)]]
    reference = QualityReference.build(space, population.images, train.images)
    results = {name: evaluate_pipeline(FakePipeline(pool, train.images), name, train.images, reference,
                                       num_samples=128, seed=1, kid_subsets=20)
               for name, pool in (("copies", train.images), ("held_out", held_out))}
    copies, fresh = results["copies"], results["held_out"]
    assert copies.num_real_images == fresh.num_real_images == FOLDER_SIZE
    assert copies.memorization_ratio == 1.0 and fresh.memorization_ratio < 0.2
    assert copies.memorization_ratio_features == 1.0 > fresh.memorization_ratio_features
    assert copies.recall < 0.5 * fresh.recall
    assert copies.kid > fresh.kid + 3 * (copies.kid_se + fresh.kid_se)
    assert copies.frechet_distance > fresh.frechet_distance


def test_prune_measures_quality_against_the_whole_folder(digits_folder, tmp_path):
    from diffusers_memsep.trainer import build_pipeline, make_dit, make_noise_scheduler

    train = load_training_data(train_data_dir=digits_folder, max_train_samples=TRAIN_SIZE, seed=0)
    pipe = build_pipeline(make_dit(sample_size=16, num_layers=2, num_attention_heads=4, attention_head_dim=8),
                          make_noise_scheduler(), train)
    pipe.save_pretrained(tmp_path / "pipe")
    output = tmp_path / "pruned"
    # a fast network, cached where `memsep prune` looks for it: the command must reuse it
    resolve_feature_space("trained", load_population(data_dir=digits_folder), output / "feature_network", num_steps=20)
    code = main(["prune", "--pipeline", str(tmp_path / "pipe"), "--output_dir", str(output), "--methods", "random",
                 "--etas", "0.5", "--seeds", "0", "--finetune_steps", "1", "--finetune_batch_size", "4",
                 "--importance_batches", "1", "--importance_batch_size", "4", "--num_samples", "8",
                 "--num_quality_samples", "12", "--num_inference_steps", "2", "--train_data_dir", str(digits_folder),
                 "--max_train_samples", str(TRAIN_SIZE)])
    assert code == 0
    rows = list(csv.DictReader((output / "runs.csv").open()))
    for row in rows:
        assert int(row["num_real_images"]) == FOLDER_SIZE and int(row["num_quality_samples"]) == 12
        assert row["feature_space"] == f"{digits_folder.name}-trained features"
        assert float(row["kid_se"]) >= 0 and row["memorization_ratio_features"] != ""
    report = (output / "report.md").read_text()
    assert f"num_real_images = {FOLDER_SIZE}" in report and "FID" not in report and "KID formula" in report
    card = (output / "variants" / "random-eta0.5" / "README.md").read_text()
    assert f"num_real_images = {FOLDER_SIZE}" in card and "memorized_features" in card


def test_prune_without_a_population_is_refused(tmp_path, capsys):
    from diffusers_memsep.data import TrainingData
    from diffusers_memsep.trainer import build_pipeline, make_dit, make_noise_scheduler

    images = torch.rand(6, 3, 16, 16) * 2 - 1
    model = make_dit(sample_size=16, in_channels=3, num_layers=1, num_attention_heads=2, attention_head_dim=8)
    pipe = build_pipeline(model, make_noise_scheduler(), TrainingData(images, None, None, "x"))
    pipe.save_pretrained(tmp_path / "pipe")
    assert main(["prune", "--pipeline", str(tmp_path / "pipe"), "--output_dir", str(tmp_path / "out")]) == 2
    assert "--population_data_dir" in capsys.readouterr().err and not (tmp_path / "out").exists()


def test_population_is_the_whole_source_or_population_data_dir(digits_folder, tmp_path):
    from diffusers_memsep.sources import DataSource, population_of

    train = load_training_data(train_data_dir=digits_folder, max_train_samples=TRAIN_SIZE, seed=0)
    pipe = SimpleNamespace(vae=None)
    whole = population_of(DataSource(train_data_dir=str(digits_folder)), train, pipe)
    assert len(whole) == FOLDER_SIZE and whole.images.shape[1:] == train.images.shape[1:]
    other = tmp_path / "other"
    other.mkdir()
    for row in range(5):
        Image.fromarray(np.full((16, 16), 40 * row, dtype=np.uint8), mode="L").save(other / f"{row}.png")
    chosen = population_of(DataSource(population_data_dir=str(other)), train, pipe)
    assert len(chosen) == 5 and chosen.labels is None
