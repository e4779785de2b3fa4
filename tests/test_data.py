"""load_training_data: embedded digits, local imagefolder, subsets by seed, and clear errors on bad input."""

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_memsep.data import TrainingData, load_training_data


def _write_pngs(folder, classes=("cat", "dog"), per_class=3, size=(12, 10), mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    written = []
    for name in classes:
        (folder / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            shape = (size[1], size[0], 3) if mode == "RGB" else (size[1], size[0])
            array = rng.integers(0, 256, shape, dtype=np.uint8)
            Image.fromarray(array, mode=mode).save(folder / name / f"{i}.png")
            written.append(array)
    return written


def test_embedded_digits_default_is_exact_and_in_range():
    from sklearn.datasets import load_digits

    data = load_training_data()
    assert isinstance(data, TrainingData)
    assert data.images.shape == (1797, 1, 8, 8) and data.labels is None and data.num_classes is None
    assert data.images.min() == -1 and data.images.max() == 1
    # exactly the digits, linearly mapped 0..16 -> -1..1 (no 8-bit rounding)
    expected = torch.from_numpy(load_digits().images).float() / 16 * 2 - 1
    assert torch.equal(data.images[:, 0], expected)
    assert "sklearn-digits" in data.source


def test_subset_is_deterministic_by_seed_and_reported():
    a = load_training_data(max_train_samples=64, seed=3, label_column="label")
    b = load_training_data(max_train_samples=64, seed=3, label_column="label")
    c = load_training_data(max_train_samples=64, seed=4, label_column="label")
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert a.indices == b.indices and a.indices != c.indices
    assert a.indices == sorted(set(a.indices)) and len(a) == 64
    assert a.num_classes == 10 and "64 of 1797" in a.source and "seed 3" in a.source
    full = load_training_data(label_column="label")
    assert torch.equal(full.images[a.indices], a.images) and torch.equal(full.labels[a.indices], a.labels)


def test_digits_resized():
    data = load_training_data(resolution=16, max_train_samples=5)
    assert data.images.shape == (5, 1, 16, 16)
    assert data.images.min() >= -1 and data.images.max() <= 1


def test_imagefolder_labels_channels_and_resolution(tmp_path):
    _write_pngs(tmp_path, size=(12, 10))
    data = load_training_data(train_data_dir=tmp_path, label_column="label", resolution=8, center_crop=True)
    assert data.images.shape == (6, 3, 8, 8)
    assert data.labels.tolist() == [0, 0, 0, 1, 1, 1] and data.num_classes == 2
    assert data.images.min() >= -1 and data.images.max() <= 1
    unconditional = load_training_data(train_data_dir=tmp_path, resolution=8)
    assert unconditional.labels is None


def test_imagefolder_native_size_is_exact(tmp_path):
    arrays = _write_pngs(tmp_path, classes=("a",), per_class=2, size=(8, 8), mode="L")
    data = load_training_data(train_data_dir=tmp_path)
    assert data.images.shape == (2, 1, 8, 8)
    expected = torch.from_numpy(np.stack(arrays)).float() / 255 * 2 - 1
    assert torch.allclose(data.images[:, 0], expected)


def test_empty_folder_and_unreadable_file_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no image files"):
        load_training_data(train_data_dir=tmp_path / "empty")
    _write_pngs(tmp_path / "broken", classes=("a",), per_class=2)
    (tmp_path / "broken" / "a" / "bad.png").write_bytes(b"this is not a png")
    with pytest.raises(ValueError, match="bad.png"):
        load_training_data(train_data_dir=tmp_path / "broken", resolution=8)
    with pytest.raises(FileNotFoundError, match="not a directory"):
        load_training_data(train_data_dir=tmp_path / "missing")


def test_bad_columns_and_sizes(tmp_path):
    _write_pngs(tmp_path, size=(12, 10))
    with pytest.raises(ValueError, match="label column 'species' not in"):
        load_training_data(train_data_dir=tmp_path, label_column="species", resolution=8)
    with pytest.raises(ValueError, match="image column"):
        load_training_data(train_data_dir=tmp_path, image_column="picture", resolution=8)
    with pytest.raises(ValueError, match="larger than the data"):
        load_training_data(train_data_dir=tmp_path, max_train_samples=7, resolution=8)
    with pytest.raises(ValueError, match="larger than the data"):
        load_training_data(max_train_samples=5000)
    with pytest.raises(ValueError, match="columns"):
        load_training_data(label_column="digit")


def test_mixed_sizes_need_a_resolution(tmp_path):
    _write_pngs(tmp_path / "a", classes=("x",), per_class=1, size=(8, 8))
    _write_pngs(tmp_path / "a", classes=("y",), per_class=1, size=(10, 10))
    with pytest.raises(ValueError, match="resolution"):
        load_training_data(train_data_dir=tmp_path / "a")


def test_a_hub_dataset_revision_reaches_load_dataset_and_the_rebuild_command(monkeypatch):
    """The revision of a Hub data set is passed to ``datasets.load_dataset`` and written into the card's command
    that rebuilds ``reference/``, so the exact training set can be loaded again."""
    import argparse

    import datasets
    from PIL import Image

    from diffusers_memsep.commands.train import reference_card_fields

    calls = []
    images = [Image.fromarray(np.full((8, 8), 40 * i, dtype=np.uint8)) for i in range(4)]

    def fake_load_dataset(name, config=None, **kwargs):
        calls.append((name, config, kwargs.get("revision")))
        return datasets.Dataset.from_dict({"image": images})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    data = load_training_data(dataset_name="someone/digits", revision="0123abcd", max_train_samples=2)
    assert calls == [("someone/digits", None, "0123abcd")] and len(data) == 2
    args = argparse.Namespace(hub_model_id=None, output_dir="out/run", dataset_name="someone/digits",
                              dataset_config_name=None, dataset_revision="0123abcd", train_data_dir=None,
                              image_column="image", label_column=None, resolution=None, center_crop=False,
                              max_train_samples=2, seed=0)
    fields = reference_card_fields(args, data)
    assert "--dataset_revision 0123abcd" in fields["reference_rebuild"]
    assert fields["dataset_revision"] == "0123abcd" and fields["dataset_indices"] == list(data.indices)


def test_the_rebuild_command_names_a_local_folder_without_its_path():
    """The card (pushed to the Hub) names the training folder, never the user's local path to it."""
    import argparse

    from diffusers_memsep.commands.train import reference_card_fields

    args = argparse.Namespace(hub_model_id="me/model", output_dir="out/run", dataset_name=None,
                              dataset_config_name=None, dataset_revision=None,
                              train_data_dir="/home/someone/private/faces", image_column="image", label_column=None,
                              resolution=None, center_crop=False, max_train_samples=None, seed=0)
    data = TrainingData(torch.zeros(2, 1, 8, 8), None, None, "faces")
    command = reference_card_fields(args, data)["reference_rebuild"]
    assert "--train_data_dir faces" in command and "/home/someone" not in command
