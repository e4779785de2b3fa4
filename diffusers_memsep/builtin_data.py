"""Built-in image sets made offline from packages the project installs: tinted digits (``colour16``) and
natural-image patches (``patches32``).

``colour_digits_folder(output_dir)`` writes the 1,797 embedded digits upsampled to 16x16 and tinted, one colour per
image.

``patches32_folder(output_dir)`` cuts 32x32 RGB patches, non-overlapping, on a regular grid, from the colour sample
photographs bundled with scikit-image (``skimage.data``: astronaut, coffee, chelsea, rocket, ...), and writes them
once as an image folder, one sub-folder per photograph (so ``load_training_data(train_data_dir=...)`` reads them,
with the photograph as the class label when ``label_column="label"``). It is the project's setting with
natural-image statistics and CIFAR's shape (32x32x3).

Choices the paper leaves open, and why:
- photographs: the colour images of ``skimage.data`` that ship inside the wheel (no download): astronaut, chelsea,
  coffee, rocket, hubble_deep_field, immunohistochemistry and the left view of stereo_motorcycle (the right view is
  the same scene, whose patches would be near-duplicates of the left ones, which would make "copy" ill-defined);
- patches are taken at the photographs' own scale (no resizing), from the top-left corner, dropping the border
  remainder;
- nearly flat patches (pixel standard deviation below 4/255 on the 0..255 scale, e.g. the black sky of the Hubble
  field) are dropped: such patches are near-duplicates of one another, so no rule could tell a copy of one from
  another one;
- the order is fixed (photograph by photograph, row by row), so a seed chooses the same training subset everywhere.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from sklearn.datasets import load_digits

from .utils import inside_output_dir

__all__ = ["BUILTIN_FOLDERS", "PATCHES32_PHOTOS", "colour_digits_folder", "patch_grid", "patches32_folder"]

#: The skimage.data photographs the patches come from (colour, bundled with scikit-image).
PATCHES32_PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry",
                    "stereo_motorcycle")
_MIN_STD = 4.0  # on the 0..255 scale


def _photo(name: str) -> np.ndarray:
    try:
        import skimage.data
    except ImportError as error:
        raise ImportError("the built-in setting patches32 needs scikit-image; pip install scikit-image") from error
    image = getattr(skimage.data, name)()
    if name == "stereo_motorcycle":
        image = image[0]  # (left, right, disparity): the left view only
    return np.ascontiguousarray(image[..., :3]).astype(np.uint8)


def patch_grid(image: np.ndarray, size: int = 32, min_std: float = _MIN_STD) -> list[np.ndarray]:
    """The non-overlapping ``size x size`` patches of ``image`` ``[H, W, 3]`` (uint8), row by row, without the nearly
    flat ones (pixel standard deviation below ``min_std``)."""
    rows, cols = image.shape[0] // size, image.shape[1] // size
    patches = [image[r * size:(r + 1) * size, c * size:(c + 1) * size] for r in range(rows) for c in range(cols)]
    return [p for p in patches if p.astype(np.float64).std() >= min_std]


def patches32_folder(output_dir: str | Path, size: int = 32) -> str:
    """Write (once) the patches of :data:`PATCHES32_PHOTOS` as PNGs under ``<output_dir>/data/patches32/<photo>/``.

    Returns the folder. It is built in a temporary folder and renamed, so a killed build never leaves half a set;
    an existing complete folder (its ``COMPLETE`` marker holds the patch count) is reused.
    """
    folder = Path(output_dir) / "data" / f"patches{size}"
    if (folder / "COMPLETE").is_file():
        return str(folder)
    temporary = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    count = 0
    for name in PATCHES32_PHOTOS:
        (temporary / name).mkdir(parents=True)
        for index, patch in enumerate(patch_grid(_photo(name), size)):
            Image.fromarray(patch, mode="RGB").save(temporary / name / f"{index:04d}.png")
            count += 1
    (temporary / "COMPLETE").write_text(f"{count}\n")
    shutil.rmtree(folder, ignore_errors=True)
    temporary.rename(folder)
    return str(folder)


def colour_digits_folder(output_dir: Path) -> str:
    """Write (once) the 1,797 digits as 16x16 RGB PNGs, image ``i`` tinted by colour ``i`` of a seed-0 draw."""
    folder = inside_output_dir(Path(output_dir) / "data" / "colour16-digits", output_dir)
    pixels = load_digits().images  # [1797, 8, 8], 0..16
    if folder.is_dir() and len(list(folder.glob("*.png"))) == len(pixels):
        return str(folder)
    colours = 0.25 + 0.75 * torch.rand(len(pixels), 3, generator=torch.Generator().manual_seed(0))
    temporary = folder.with_name(f".{folder.name}.tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    for index, (grey, colour) in enumerate(zip(pixels, colours)):
        large = Image.fromarray((grey / 16 * 255).round().astype("uint8"), mode="L").resize(
            (16, 16), Image.Resampling.BILINEAR)
        rgb = torch.from_numpy(np.array(large)).float()[..., None] * colour
        Image.fromarray(rgb.round().clamp(0, 255).to(torch.uint8).numpy(), mode="RGB").save(
            temporary / f"{index:04d}.png")
    shutil.rmtree(folder, ignore_errors=True)
    temporary.rename(folder)
    return str(folder)


#: Built-in setting name -> the function that writes its image folder under an output folder (and returns it).
BUILTIN_FOLDERS = {"colour16": colour_digits_folder, "patches32": patches32_folder}
