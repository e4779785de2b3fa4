"""The data sets of ``memsep study``: built-in settings (``digits8``, ``colour16``) or any image folder / Hub
dataset, their population (the quality reference) and the training subset of each base model."""

from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass, field
from pathlib import Path

from ..builtin_data import BUILTIN_FOLDERS
from ..data import TrainingData, held_out_from_population, load_training_data, with_held_out
from ..memorization import resolve_feature_space
from ..trainer import make_dit, make_noise_scheduler
from ..utils import check_plain_name, data_fingerprint, inside_output_dir

BUILTIN_SETTINGS = ("digits8", "colour16", "patches32")
#: The training timesteps of the base models of a study and of the demo (``make_noise_scheduler``'s default).
DEFAULT_TRAIN_TIMESTEPS = inspect.signature(make_noise_scheduler).parameters["num_train_timesteps"].default


@dataclass
class StudySetting:
    """One data set of the study: where its images come from, how many train a base model, the DiT to train.

    ``builtin="colour16"`` builds the second offline setting: the embedded digits upsampled to 16x16 RGB, each
    image tinted with a fixed random colour; ``builtin="patches32"`` the natural-image patches
    (:mod:`diffusers_memsep.builtin_data`); both are written once as image folders under the output folder.
    Otherwise the data flags of ``memsep train`` (``dataset_name``, ``train_data_dir``, ...) choose the images; with
    none of them, the embedded 8x8 digits. ``validation_data_dir``: held-out images for ``memorization_gap``
    (default: the population minus the training subset).
    """

    name: str
    builtin: str | None = None
    dataset_name: str | None = None
    dataset_config_name: str | None = None
    dataset_revision: str | None = None
    train_data_dir: str | None = None
    validation_data_dir: str | None = None
    image_column: str = "image"
    label_column: str | None = None
    resolution: int | None = None
    num_train_samples: int = 16
    model: dict = field(default_factory=dict)  # keyword arguments of make_dit
    base_train: dict = field(default_factory=dict)  # this setting's changes to StudyConfig.base_train (e.g. the lr)

    def __post_init__(self):
        check_plain_name(self.name, "--setting_name")  # it names folders under --output_dir (bases/, runs/, ...)

    def data_kwargs(self, output_dir: Path) -> dict:
        folder = BUILTIN_FOLDERS[self.builtin](output_dir) if self.builtin else self.train_data_dir
        return dict(dataset_name=self.dataset_name, dataset_config_name=self.dataset_config_name,
                    revision=self.dataset_revision,
                    train_data_dir=folder, image_column=self.image_column, label_column=self.label_column,
                    resolution=self.resolution)


def builtin_setting(name: str, model: dict | None = None) -> StudySetting:
    """``digits8`` (16 of the 8x8 digits), ``colour16`` (4 tinted 16x16 digits at lr 2e-3: the recipe that
    memorizes within the base training of the full profile; how it was found is in ``docs/study.md``) or ``patches32``
    (4 natural-image patches, 32x32 RGB, the colour16 recipe)."""
    if name == "digits8":
        return StudySetting("digits8", model=dict(model or {}))
    if name == "colour16":
        return StudySetting("colour16", builtin="colour16", model=dict(model or {}, patch_size=4),
                            num_train_samples=4, base_train={"learning_rate": 2e-3})
    if name == "patches32":  # natural-image patches, CIFAR's shape; the colour16 recipe (whether it memorizes
        # within the full profile's base training is not measured: docs/detection.md)
        return StudySetting("patches32", builtin="patches32", model=dict(model or {}, patch_size=4),
                            num_train_samples=4, base_train={"learning_rate": 2e-3})
    raise ValueError(f"unknown built-in setting {name!r}; choose from {', '.join(BUILTIN_SETTINGS)}.")


def dit_num_heads(model: dict) -> int:
    """The attention heads of ``make_dit(**model)`` (its defaults for what ``model`` leaves out)."""
    defaults = {name: p.default for name, p in inspect.signature(make_dit).parameters.items()}
    model = {**defaults, **model}
    return int(model["num_layers"]) * int(model["num_attention_heads"])


def setting_num_heads(setting: StudySetting) -> int:
    """The attention heads of the DiT a setting's base models train."""
    return dit_num_heads(setting.model)


@dataclass
class SettingData:
    population: TrainingData  # every image of the setting: the quality reference
    held_out_dir: TrainingData | None  # the user's held-out folder, if any
    feature_space: object  # the quality metrics' feature space, resolved once per setting
    fingerprint: str = ""  # the content of its images (setting_fingerprint), kept in study.json


def setting_fingerprint(population: TrainingData, held_out: TrainingData | None) -> str:
    """The content of a setting's images (population, and the held-out folder if any): ``study.json`` keeps it, so a
    resumed study over replaced images (same names, same count, other pixels) is refused."""
    parts = [data_fingerprint(data) for data in (population, held_out) if data is not None]
    return parts[0] if len(parts) == 1 else hashlib.sha256("+".join(parts).encode()).hexdigest()


def check_fingerprint(name: str, recorded: str | None, fingerprint: str, where: str = "study.json") -> None:
    """Refuse a setting whose images changed since the study recorded ``recorded`` (None: nothing recorded)."""
    if recorded is not None and recorded != fingerprint:
        raise ValueError(f"the images of setting {name} changed since this study started (fingerprint "
                         f"{recorded[:12]}... in {where}, now {fingerprint[:12]}...); its finished runs and base "
                         "models come from the old images: rerun into another --output_dir.")


def load_setting(setting: StudySetting, output_dir: Path, recorded_fingerprint: str | None = None) -> SettingData:
    """Read a setting's images and resolve its feature space. With ``recorded_fingerprint`` (``study.json``'s), images
    that changed since are refused before anything is trained or cached."""
    kwargs = setting.data_kwargs(output_dir)
    population = load_training_data(**kwargs)
    if setting.num_train_samples >= len(population):
        raise ValueError(f"setting {setting.name!r}: num_train_samples={setting.num_train_samples} leaves no "
                         f"held-out image of the {len(population)}; train on fewer images.")
    held_out = None
    if setting.validation_data_dir:
        held_out = load_training_data(**{**kwargs, "dataset_name": None,
                                         "train_data_dir": setting.validation_data_dir})
    fingerprint = setting_fingerprint(population, held_out)
    check_fingerprint(setting.name, recorded_fingerprint, fingerprint, str(Path(output_dir) / "study.json"))
    # "auto": the digits classifier for the embedded digits, else a small CNN trained once on the population and
    # cached under the output folder (reused by every run and every rerun).
    cache = inside_output_dir(Path(output_dir) / "feature_networks" / setting.name, output_dir)
    feature_space = resolve_feature_space("auto", population, cache)
    return SettingData(population, held_out, feature_space, fingerprint)


def base_training_data(setting: StudySetting, output_dir: Path, base: int, setting_data: SettingData):
    """The training subset of base model ``base`` (subset seed = ``base``), carrying its held-out images."""
    train = load_training_data(**setting.data_kwargs(output_dir), max_train_samples=setting.num_train_samples,
                               seed=base)
    held_out = setting_data.held_out_dir or held_out_from_population(setting_data.population, train)
    return with_held_out(train, held_out)
