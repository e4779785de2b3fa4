"""Where a command's pipeline and images come from: load a saved pipeline, load the training images it was trained
on (as it sees them), reconcile them with its reference, and find their population and held-out images.

Used by ``memsep prune`` and ``memsep reference``; the data flags of the command line become a :class:`DataSource`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .data import (
    EMBEDDED_DATASET,
    TrainingData,
    held_out_from_population,
    load_population,
    load_training_data,
    with_held_out,
)
from .memorization import resolve_feature_space
from .pipelines import MemSepPipeline


@dataclass
class DataSource:
    """The training images of a saved model (the data flags of ``memsep train``; all None: not given)."""

    dataset_name: str | None = None  # Hub dataset
    dataset_config_name: str | None = None  # its config
    dataset_revision: str | None = None  # its revision (branch, tag or commit)
    train_data_dir: str | None = None  # a folder of images (sub-folders are classes)
    image_column: str = "image"  # column holding the images
    label_column: str | None = None  # column holding the class labels (class-conditional models)
    resolution: int | None = None  # side of the images (default: the pipeline's output resolution)
    center_crop: bool = False  # resize the shorter side and crop the centre
    max_train_samples: int | None = None  # the subset size the model was trained on
    data_seed: int = 0  # the seed that chose the subset
    embedded_digits: bool = False  # the embedded digits (with max_train_samples / data_seed)
    population_data_dir: str | None = None  # the population quality is measured against (default: the source)
    population_split: str = "train"  # split of dataset_name used as the population
    validation_data_dir: str | None = None  # held-out images for memorization_gap

    @property
    def given(self) -> bool:
        return bool(self.dataset_name or self.train_data_dir or self.embedded_digits)


def load_pipeline(name: str) -> MemSepPipeline:
    """``MemSepPipeline.from_pretrained`` of a local folder or Hub id, with a clear error for a missing folder."""
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1
    if looks_local and not os.path.isdir(os.path.expanduser(name)):
        raise FileNotFoundError(f"no pipeline folder at {name}; pass a folder written by `memsep train` / "
                                "`memsep demo` (e.g. outputs/demo/base), a DiTPipeline folder, or a Hub repo id "
                                "(user/name).")
    return MemSepPipeline.from_pretrained(os.path.expanduser(name))


def load_pipeline_data(pipe: MemSepPipeline, source: DataSource) -> TrainingData:
    """The training data of ``source``, as the pipeline sees images: at its output resolution and channels."""
    data = load_training_data(source.dataset_name, source.dataset_config_name, source.train_data_dir,
                              source.image_column, source.label_column, source.resolution or pipe.image_shape[-1],
                              source.center_crop, source.max_train_samples, source.data_seed,
                              revision=source.dataset_revision)
    return replace(data, images=pipe.match_image_shape(data.images))


def training_data_of(pipe: MemSepPipeline, source: DataSource, name: str) -> TrainingData:
    """The training set of ``pipe`` (named ``name`` in errors): its reference, or the images of ``source`` checked
    against it; a pipeline without a reference gets one from ``source`` (pixel space, after the VAE decode)."""
    if pipe.reference is None:
        if not source.given:
            raise ValueError(f"{name} has no training reference; pass the data flags of its training images (e.g. "
                             "--train_data_dir my_images) to build one, or add it with `memsep reference`.")
        data = load_pipeline_data(pipe, source)
        pipe.attach_reference(data.images)
        return data
    reference_images = pipe.reference.images.cpu()
    if source.given:
        data = load_pipeline_data(pipe, source)
        if data.images.shape != reference_images.shape or not torch.allclose(data.images, reference_images, atol=1e-5):
            raise ValueError("the loaded training data differs from the pipeline's reference images; pass the data "
                             "flags (and --data_seed / --max_train_samples) the model was trained with.")
        return data
    if pipe.config.get("label_dropout_prob") != 1.0:
        raise ValueError("this model is class-conditional: pass the data flags it was trained with (e.g. "
                         "--embedded_digits --label_column label --max_train_samples 64) so fine-tuning has labels.")
    return TrainingData(reference_images, None, None, f"the pipeline's reference ({len(reference_images)} images)")


def population_of(source: DataSource, data: TrainingData, pipe: MemSepPipeline) -> TrainingData:
    """The whole data source the model's training set was drawn from (or ``population_data_dir``), at the training
    images' shape."""
    common = dict(image_column=source.image_column, resolution=source.resolution or data.resolution,
                  center_crop=source.center_crop)
    if source.population_data_dir:
        population = load_population(data_dir=source.population_data_dir, **common)
    elif source.train_data_dir or source.dataset_name:
        population = load_population(source.dataset_name, source.dataset_config_name, source.train_data_dir,
                                     split=source.population_split, revision=source.dataset_revision, **common)
    elif data.source.startswith(EMBEDDED_DATASET) or tuple(data.images.shape[1:]) == (1, 8, 8):
        population = load_population(resolution=source.resolution)  # all 1,797 digits
    else:
        raise ValueError("quality is measured against the population the model was trained from: pass the data "
                         "flags it was trained with (--train_data_dir / --dataset_name) or --population_data_dir.")
    if population.images.shape[1:] != data.images.shape[1:] and pipe.vae is not None:
        population = replace(population, images=pipe.match_image_shape(population.images))  # as the training images
    if population.images.shape[1:] != data.images.shape[1:]:
        raise ValueError(f"the population images are {tuple(population.images.shape[1:])} but the model makes "
                         f"{tuple(data.images.shape[1:])}; pass --resolution (and --center_crop) as in training.")
    return population


def with_held_out_images(source: DataSource, data: TrainingData, population: TrainingData, pipe: MemSepPipeline):
    """The training data carrying the held-out images ``memorization_gap`` compares them with:
    ``validation_data_dir``, else the population minus the training subset (only when both come from the same
    source, so that the subset's indices point into the population)."""
    if source.validation_data_dir:
        held_out = load_training_data(train_data_dir=source.validation_data_dir, image_column=source.image_column,
                                      label_column=source.label_column,
                                      resolution=source.resolution or data.resolution, center_crop=source.center_crop)
        if held_out.images.shape[1:] != data.images.shape[1:] and pipe.vae is not None:
            held_out = replace(held_out, images=pipe.match_image_shape(held_out.images))
        if data.labels is not None and held_out.labels is None:
            raise ValueError("the model is class-conditional but --validation_data_dir has no labels; give it one "
                             "sub-folder per class (as the training folder) or --label_column.")
        if data.labels is None:
            held_out = replace(held_out, labels=None)
        return with_held_out(data, held_out)
    if data.indices is None or source.population_data_dir:
        raise ValueError("--methods memorization_gap compares the training images with held-out images of the same "
                         "distribution: pass --validation_data_dir, or the data flags the model was trained with "
                         "(with --max_train_samples / --data_seed) so the rest of that data set is held out.")
    return with_held_out(data, held_out_from_population(population, data))


def resolve_quality_space(feature_space: str, population: TrainingData, output_dir: str | os.PathLike,
                          inception_weights: str | None = None):
    """``feature_space`` on the population (a trained network is cached in ``<output_dir>/feature_network``); a
    missing optional library becomes a ValueError (the CLI's one-line error)."""
    try:
        return resolve_feature_space(feature_space, population, Path(output_dir) / "feature_network",
                                     inception_weights, progress=True)
    except ImportError as error:
        raise ValueError(str(error)) from error
