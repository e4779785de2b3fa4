"""One loader for every training set: a Hub dataset, a local ``imagefolder``, or the embedded default (digits).

The memorization metric compares generated samples with *exactly* the images the model was trained on, so the
loader returns the training set itself as one tensor (``TrainingData.images``), already resized, cropped and scaled
to ``[-1, 1]``, and never augmented: random flips are applied in the training loop, on the fly, and never stored.

The embedded default is scikit-learn's ``load_digits`` (1,797 grey 8x8 images of the digits 0-9, bundled with
scikit-learn, so it works offline): small enough that a DiT memorizes a subset of it in minutes on a laptop CPU.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

#: Name used in ``TrainingData.source`` for the embedded data set.
EMBEDDED_DATASET = "sklearn-digits"

# Extensions the ``imagefolder`` builder of ``datasets`` reads; used only to give a clear error on an empty folder.
_IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
_GREY_MODES = {"1", "L", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}
# Grey modes deeper than 8 bits: ``convert("L")`` would clip them to 0..255 instead of scaling them.
_DEEP_GREY_MODES = _GREY_MODES - {"1", "L"}


@dataclass
class TrainingData:
    """The training set as tensors: exactly the images a model is trained on.

    Attributes:
        images: float tensor ``[n, C, H, W]`` in ``[-1, 1]``, unaugmented. This is the memorization reference.
        labels: ``LongTensor[n]`` of class indices in ``[0, num_classes)``, or ``None`` (unconditional).
        num_classes: number of classes when ``labels`` is set, else ``None``.
        source: where the images came from and which subset, e.g. ``"sklearn-digits (64 of 1797, seed 0)"``.
        indices: positions of the chosen images in the full split, in increasing order.
    """

    images: torch.Tensor
    labels: torch.Tensor | None
    num_classes: int | None
    source: str
    indices: list[int] | None = None

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def resolution(self) -> int:
        return self.images.shape[-1]

    @property
    def num_channels(self) -> int:
        return self.images.shape[1]

    def load(self, positions: torch.Tensor) -> torch.Tensor:
        """The images at ``positions`` (rows of this training set), ``[b, C, H, W]`` in ``[-1, 1]``."""
        return self.images[positions.to(self.images.device)]

    def iter_chunks(self, chunk_size: int = 1024):
        """All images in order, ``chunk_size`` at a time (the same interface as a streamed set)."""
        yield from self.images.split(chunk_size)


@dataclass
class StreamingTrainingData:
    """A training set decoded on the fly (``load_training_data(..., streaming=True)``): for data too large to hold.

    Same attributes as :class:`TrainingData` but no ``images`` tensor: the trainer reads batches with :meth:`load`
    through a ``DataLoader`` (workers decode, the order stays the deterministic one of the in-memory path, so a
    resumed run is still bit-identical, and each process decodes only its own slice of every global batch). The
    records stay in the memory-mapped Arrow table of ``datasets``.

    Choice: the colour mode (grey or RGB) and, without ``resolution``, the size are taken from the FIRST image
    (the in-memory path looks at all of them, which a stream cannot do); other images are converted and resized to
    match, so ``num_channels`` and ``resolution`` are known before training starts.
    """

    dataset: object  # datasets.Dataset holding only the chosen rows, image column not decoded
    image_column: str
    labels: torch.Tensor | None
    num_classes: int | None
    source: str
    indices: list[int]
    resolution: int
    num_channels: int
    center_crop: bool = False

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, positions: torch.Tensor) -> torch.Tensor:
        rows = [int(i) for i in positions]
        records = self.dataset[rows][self.image_column] if rows else []
        pil_images = [_open_image(record, self.indices[row]) for row, record in zip(rows, records)]
        return _to_tensor(pil_images, self.resolution, self.center_crop, self.source,
                          mode="L" if self.num_channels == 1 else "RGB")

    def iter_chunks(self, chunk_size: int = 1024):
        """All images in order, ``chunk_size`` at a time (to build a reference without a second copy in flight)."""
        for start in range(0, len(self), chunk_size):
            yield self.load(torch.arange(start, min(start + chunk_size, len(self))))


@dataclass
class TrainingDataWithHeldOut(TrainingData):
    """Training data that also carries held-out images of the same distribution (for the ``memorization_gap`` score).

    It IS the training set everywhere else (fine-tuning, memorization reference): ``held_out`` is only read by
    :func:`diffusers_memsep.pruning.memorization_gap.memorization_gap_importance` (and encoded beside the training
    images by :func:`diffusers_memsep.latents.latent_training_data`).
    """

    held_out: TrainingData | None = None


def held_out_from_population(population: TrainingData, train: TrainingData) -> TrainingData:
    """The images of ``population`` that are not in ``train`` (by ``train.indices`` into the same full split)."""
    if train.indices is None:
        raise ValueError("the training data does not record its subset indices; pass held-out images explicitly "
                         "(e.g. --validation_data_dir).")
    if population.indices is not None and len(population) != len(population.indices):
        raise ValueError("population and indices disagree; load the population with max_train_samples=None.")
    keep = torch.ones(len(population), dtype=torch.bool)
    keep[torch.as_tensor(train.indices, dtype=torch.long)] = False
    if not keep.any():
        raise ValueError("the training subset is the whole population: no held-out images are left; train on a "
                         "subset (max_train_samples) or pass --validation_data_dir.")
    index = keep.nonzero().squeeze(1)
    # An unconditional model is scored without labels, even when the population carries some.
    labels = None if population.labels is None or train.labels is None else population.labels[index]
    return TrainingData(population.images[index], labels, train.num_classes,
                        f"held out from {population.source}: {len(index)} images", index.tolist())


def with_held_out(train: TrainingData, held_out: TrainingData) -> TrainingDataWithHeldOut:
    """``train`` carrying ``held_out`` (checked to have the same image shape)."""
    if tuple(held_out.images.shape[1:]) != tuple(train.images.shape[1:]):
        raise ValueError(f"held-out images are {tuple(held_out.images.shape[1:])} but training images are "
                         f"{tuple(train.images.shape[1:])}; give held-out images of the training resolution/channels.")
    return TrainingDataWithHeldOut(train.images, train.labels, train.num_classes, train.source, train.indices,
                                   held_out=held_out)


def all_images(data: TrainingData | StreamingTrainingData) -> torch.Tensor:
    """Every training image as one tensor: the memorization reference (a streamed set is decoded chunk by chunk)."""
    return data.images if isinstance(data, TrainingData) else torch.cat(list(data.iter_chunks()))


def load_training_data(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_data_dir: str | os.PathLike | None = None,
    image_column: str = "image",
    label_column: str | None = None,
    resolution: int | None = None,
    center_crop: bool = False,
    max_train_samples: int | None = None,
    seed: int = 0,
    cache_dir: str | None = None,
    split: str = "train",
    streaming: bool = False,
    revision: str | None = None,
) -> TrainingData | StreamingTrainingData:
    """Load a training set as one tensor in ``[-1, 1]``.

    Args:
        dataset_name: a Hub dataset (``datasets.load_dataset(dataset_name, dataset_config_name)``), or
            ``"imagefolder"`` together with ``train_data_dir``.
        train_data_dir: a local folder of images, read with the ``imagefolder`` builder of ``datasets`` (class
            labels come from sub-folder names, column ``"label"``). With neither argument: the embedded digits.
        image_column: column holding the images.
        label_column: column holding class labels; ``None`` trains an unconditional model (labels ignored).
            Integer labels are used as they are (``num_classes`` from a ``ClassLabel`` feature, else max + 1);
            string labels are numbered in sorted order.
        resolution: side of the square training images; ``None`` keeps the data's own size (all images must then
            share it). Without ``center_crop`` images are resized to ``resolution x resolution`` (aspect ratio
            not kept); with it the shorter side is resized to ``resolution`` and the centre cropped. There is no
            random crop: the stored images must be exactly the images trained on.
        revision: the Hub dataset's revision (a branch, tag or commit; ``datasets.load_dataset(revision=...)``), so a
            training set can be rebuilt exactly; ignored for ``train_data_dir`` and the embedded digits.
        max_train_samples: keep this many images, chosen uniformly without replacement by ``seed``
            (``torch.randperm``), in their original order. ``n`` is the variable of every memorization study.
        seed: seed of the subset choice (same seed, same subset, on every machine).
        split: dataset split to read.
        streaming: return a :class:`StreamingTrainingData` that decodes batches on the fly instead of one tensor
            (Hub datasets and image folders; the embedded digits are always held in memory).

    Grey images (PIL modes ``L``, ``1``, ``I;16``, ``I``, ``F``) give one channel when every chosen image is grey;
    otherwise images are converted to RGB.

    Choices the loader makes: 16-bit grey images (modes ``I;16*``, and ``I``, which Pillow also uses for 16-bit
    PNG, TIFF and PGM files) are scaled by their 16-bit range (``v / 65535``), so no precision is lost before the
    resize; ``I`` images with values outside ``0..65535`` are refused. ``F`` (float) images are read on Pillow's
    8-bit scale ``0..255`` (as ``convert("L")`` does) and refused outside it.
    """
    if dataset_name is None and train_data_dir is None:
        return _load_digits(label_column, resolution, center_crop, max_train_samples, seed)
    if resolution is not None and (not isinstance(resolution, int) or resolution < 1):
        raise ValueError(f"resolution must be a positive integer, got {resolution!r}; pass e.g. resolution=32.")

    import datasets  # here: the embedded digits need no datasets, which takes a second to import

    if train_data_dir is not None:
        folder = Path(train_data_dir)
        if not folder.is_dir():
            raise FileNotFoundError(f"train_data_dir {str(folder)!r} is not a directory; pass a folder of images.")
        found = [p for p in folder.rglob("*") if p.suffix.lower() in _IMAGE_EXTENSIONS]
        if not found:
            raise ValueError(
                f"train_data_dir {str(folder)!r} holds no image files ({', '.join(sorted(_IMAGE_EXTENSIONS))}); "
                "put the training images there (sub-folders name classes)."
            )
        dataset = datasets.load_dataset("imagefolder", data_dir=str(folder), cache_dir=cache_dir, split=split)
        name = str(folder)
    else:
        dataset = datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir, split=split,
                                        revision=revision)
        name = dataset_name + (f"/{dataset_config_name}" if dataset_config_name else "")

    columns = list(dataset.column_names)
    if image_column not in columns:
        raise ValueError(f"image column {image_column!r} not in the dataset's columns {columns}; set image_column.")
    if label_column is not None and label_column not in columns:
        raise ValueError(
            f"label column {label_column!r} not in the dataset's columns {columns}; set label_column to one of "
            "them, or leave it unset for an unconditional model."
        )

    total = len(dataset)
    indices = _choose_subset(total, max_train_samples, seed)
    dataset = dataset.select(indices)
    # Decode ourselves so that an unreadable file is reported by name, not deep inside a datasets worker.
    dataset = dataset.cast_column(image_column, datasets.Image(decode=False))
    labels = num_classes = None
    if label_column is not None:
        labels, num_classes = _labels(dataset, label_column)
    source = _source(name, len(indices), total, max_train_samples, seed)
    if streaming:
        first = _to_tensor([_open_image(dataset[0][image_column], indices[0])], resolution, center_crop, name)
        return StreamingTrainingData(dataset.select_columns([image_column]), image_column, labels, num_classes,
                                     source, indices, resolution=first.shape[-1], num_channels=first.shape[1],
                                     center_crop=center_crop)
    pil_images = [_open_image(record, row) for row, record in zip(indices, dataset[image_column])]
    images = _to_tensor(pil_images, resolution, center_crop, name)
    return TrainingData(images, labels, num_classes, source, indices)


def _load_digits(label_column, resolution, center_crop, max_train_samples, seed) -> TrainingData:
    from sklearn.datasets import load_digits  # here: scikit-learn takes seconds to import

    digits = load_digits()
    if label_column not in (None, "label"):
        raise ValueError(
            f"the embedded digits have the columns ['image', 'label'], not {label_column!r}; pass "
            "label_column='label' (class-conditional) or None (unconditional)."
        )
    total = len(digits.target)
    indices = _choose_subset(total, max_train_samples, seed)
    pixels = torch.from_numpy(digits.images[indices]).float()  # [n, 8, 8], integers 0..16
    if resolution is None or resolution == 8:
        images = (pixels / 16.0 * 2.0 - 1.0).unsqueeze(1)  # exact: no 8-bit rounding
    else:
        as_uint8 = (pixels / 16.0 * 255.0).round().to(torch.uint8).numpy()
        images = _to_tensor([Image.fromarray(a, mode="L") for a in as_uint8], resolution, center_crop,
                            EMBEDDED_DATASET)
    labels = num_classes = None
    if label_column == "label":
        labels, num_classes = torch.from_numpy(digits.target[indices]).long(), 10
    return TrainingData(images, labels, num_classes,
                        _source(EMBEDDED_DATASET, len(indices), total, max_train_samples, seed), indices)


def _choose_subset(total: int, max_train_samples: int | None, seed: int) -> list[int]:
    if total == 0:
        raise ValueError("the dataset is empty; point dataset_name or train_data_dir at a non-empty image set.")
    if max_train_samples is None:
        return list(range(total))
    if not isinstance(max_train_samples, int) or max_train_samples < 1:
        raise ValueError(f"max_train_samples must be a positive integer, got {max_train_samples!r}.")
    if max_train_samples > total:
        raise ValueError(
            f"max_train_samples={max_train_samples} is larger than the data ({total} images); "
            f"pass at most {total}, or leave it unset to use every image."
        )
    generator = torch.Generator().manual_seed(int(seed))
    return sorted(torch.randperm(total, generator=generator)[:max_train_samples].tolist())


def _source(name: str, n: int, total: int, max_train_samples: int | None, seed: int) -> str:
    if max_train_samples is None:
        return f"{name} (all {total} images)"
    return f"{name} ({n} of {total} images, chosen with seed {seed})"


def _open_image(record, row: int):
    """Decode one ``datasets.Image(decode=False)`` record (``{"path", "bytes"}``) or a PIL image."""
    if isinstance(record, Image.Image):
        return record
    path, data = record.get("path"), record.get("bytes")
    try:
        image = Image.open(io.BytesIO(data)) if data is not None else Image.open(path)
        image.load()
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as error:
        where = path or f"row {row}"
        raise ValueError(f"cannot read image {where!r} ({error}); remove or replace the file.") from error
    return image


def _to_tensor(pil_images, resolution: int | None, center_crop: bool, name: str, mode: str | None = None
               ) -> torch.Tensor:
    if mode is None:
        mode = "L" if all(image.mode in _GREY_MODES for image in pil_images) else "RGB"
    arrays = []
    for image in pil_images:
        if image.mode in _DEEP_GREY_MODES:
            image = _deep_grey_as_float(image, name)  # mode F on the 0..255 scale, not rounded
        image = image.convert(mode) if image.mode != "F" or mode == "RGB" else image
        if resolution is not None:
            if center_crop:
                width, height = image.size
                scale = resolution / min(width, height)
                new_size = (max(resolution, round(width * scale)), max(resolution, round(height * scale)))
                image = image.resize(new_size, Image.Resampling.BILINEAR)
                left, top = (new_size[0] - resolution) // 2, (new_size[1] - resolution) // 2
                image = image.crop((left, top, left + resolution, top + resolution))
            elif image.size != (resolution, resolution):
                image = image.resize((resolution, resolution), Image.Resampling.BILINEAR)
        arrays.append(np.asarray(image, dtype=np.float32))
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        first = arrays[0].shape
        odd = [_file_name(image, i) for i, (image, a) in enumerate(zip(pil_images, arrays)) if a.shape != first][:2]
        raise ValueError(
            f"images of {name} have different sizes {sorted(shapes)[:4]} (e.g. {', '.join(odd)} differ from "
            f"{_file_name(pil_images[0], 0)}); pass --resolution N (resolution=N) to resize them all to N x N."
        )
    if arrays and arrays[0].shape[0] != arrays[0].shape[1]:
        height, width = arrays[0].shape[:2]
        raise ValueError(
            f"images of {name} are {width}x{height} (e.g. {_file_name(pil_images[0], 0)}), not square; pass "
            f"--resolution N (resolution=N) to resize them to N x N, with --center_crop to crop instead of stretch."
        )
    stacked = torch.from_numpy(np.stack(arrays)).float()
    if stacked.ndim == 3:
        stacked = stacked.unsqueeze(-1)
    return (stacked.permute(0, 3, 1, 2) / 255.0 * 2.0 - 1.0).contiguous()


def _file_name(image, position: int) -> str:
    """The file an image was read from, for messages (else its position in the set)."""
    filename = getattr(image, "filename", "") or ""
    return repr(os.path.basename(filename)) if filename else f"image #{position}"


def _deep_grey_as_float(image, name: str):
    """A grey image of more than 8 bits as a mode ``F`` image on the 8-bit scale 0..255, scaled by its bit depth
    (see "Choices" in :func:`load_training_data`)."""
    values = np.asarray(image).astype(np.float64)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if image.mode == "F":
        top = 255.0
    else:  # I;16* and I: 16-bit
        top = 65535.0
    if low < 0 or high > top:
        raise ValueError(
            f"an image of {name} (mode {image.mode}) holds values in [{low:g}, {high:g}], outside the {top:g} range "
            f"its mode is read with; save the images as 8- or 16-bit PNG."
        )
    return Image.fromarray((values * (255.0 / top)).astype(np.float32))


def _labels(dataset, label_column: str) -> tuple[torch.Tensor, int]:
    import datasets  # as in load_training_data

    feature = dataset.features[label_column]
    values = dataset[label_column]
    if isinstance(feature, datasets.ClassLabel):
        return torch.tensor(values, dtype=torch.long), feature.num_classes
    if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in values):
        labels = torch.tensor(values, dtype=torch.long)
        if labels.min() < 0:
            raise ValueError(f"label column {label_column!r} holds negative labels; class indices start at 0.")
        return labels, int(labels.max()) + 1
    if all(isinstance(v, str) for v in values):
        names = sorted(set(values))
        return torch.tensor([names.index(v) for v in values], dtype=torch.long), len(names)
    raise ValueError(
        f"label column {label_column!r} holds {type(values[0]).__name__} values; it must hold integers or strings."
    )


def load_population(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    data_dir: str | os.PathLike | None = None,
    image_column: str = "image",
    label_column: str | None = None,
    resolution: int | None = None,
    center_crop: bool = False,
    split: str = "train",
    cache_dir: str | None = None,
    revision: str | None = None,
) -> TrainingData:
    """Every image of a data source (all of a folder, all of a dataset split, all 1,797 embedded digits): the
    population that quality metrics compare samples with, never a training subset.

    Same arguments as :func:`load_training_data` (``data_dir`` is its ``train_data_dir``), without a subset. When
    ``label_column`` is None the column ``"label"`` is read if the source has one (the sub-folder names of an image
    folder, the digit of the embedded digits): a population-trained feature network then learns the classes.
    """
    load = lambda column: load_training_data(  # noqa: E731
        dataset_name, dataset_config_name, data_dir, image_column, column, resolution, center_crop,
        max_train_samples=None, cache_dir=cache_dir, split=split, revision=revision)
    if label_column is not None:
        return load(label_column)
    try:
        return load("label")
    except ValueError as error:
        if "label column 'label' not in" not in str(error):
            raise
    return load(None)
