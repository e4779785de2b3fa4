"""Built-in image sets made offline from packages the project installs: natural-image patches (``patches32``).

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

__all__ = ["PATCHES32_PHOTOS", "patch_grid", "patches32_folder"]

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
    from PIL import Image

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
