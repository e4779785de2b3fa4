"""Atomic outputs, shared by every module that writes files (ground floor: imports nothing of ours).

A result file is either the old one or the complete new one, never half-written: it is written to a temporary name
beside the target (same file system) and moved over it with ``os.replace``. The temporary name is plain (not
``mkstemp``, whose 0600 permissions would survive the rename), so the file gets the user's usual umask permissions.
"""

from __future__ import annotations

import contextlib
import csv
import os
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path`` (same extension, so writers that infer the format still work); when
    the block succeeds it replaces ``path``, when it fails it is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        if temporary.exists():
            temporary.unlink()


def replace_path(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Move ``source`` (file or folder) onto ``target``. An existing folder at ``target`` is first moved aside and
    removed only after the new one is in place, so ``target`` is never missing a complete version for long."""
    source, target = Path(source), Path(target)
    if target.is_dir():
        stale = target.with_name(f".{target.name}.old")
        shutil.rmtree(stale, ignore_errors=True)
        os.replace(target, stale)
        os.replace(source, target)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.replace(source, target)


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return Path(path)


def write_csv(rows: Sequence[dict], path: str | os.PathLike, columns: Sequence[str] | None = None) -> Path:
    """``rows`` (dicts) as CSV; ``columns`` default to every key, in first-seen order."""
    if not rows:
        raise ValueError(f"no rows to write to {path}.")
    columns = list(columns) if columns is not None else list(dict.fromkeys(key for row in rows for key in row))
    with atomic_path(path) as temporary, open(temporary, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return Path(path)


def save_figure(figure, path: str | os.PathLike, **savefig_kwargs) -> Path:
    """Save a matplotlib figure (PNG by default, 120 dpi, tight box) and close it."""
    import matplotlib.pyplot as plt

    options = {"format": "png", "dpi": 120, "bbox_inches": "tight", **savefig_kwargs}
    try:
        with atomic_path(path) as temporary:
            figure.savefig(temporary, **options)
    finally:
        plt.close(figure)
    return Path(path)


#: Caches a command keeps in its output folder, keyed by their content and reused (a population-trained feature
#: network, VAE latents of the training images): they never count as "another run" in that folder.
CACHE_FOLDERS = ("feature_network", "latent_cache")

#: Name prefix of the probe file :func:`check_writable_dir` writes and removes (ignored by "folder is empty" checks).
WRITE_CHECK_PREFIX = ".memsep-write-check"


def check_writable_dir(path: str | os.PathLike, what: str = "output_dir") -> Path:
    """Raise a ValueError naming the problem and the fix when ``path`` cannot become a folder we write into: a file
    is in the way (at ``path`` or at one of its parents), or the nearest existing folder refuses a new file.

    Meant to run before any expensive work. The check creates and removes one probe file in the nearest existing
    folder and creates nothing else (missing folders are made later by the writers).
    """
    path = Path(path).expanduser()
    existing = path
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        where = "is a file" if existing == path else f"cannot be created: {str(existing)!r} is a file"
        raise ValueError(f"{what} {str(path)!r} {where}; pass a folder path, or move the file away.")
    probe = existing / f"{WRITE_CHECK_PREFIX}.{os.getpid()}"
    try:
        with open(probe, "x"):
            pass
        probe.unlink()
    except OSError as error:
        raise ValueError(f"{what} {str(path)!r} is not writable ({error.strerror or error} in {str(existing)!r}); "
                         "choose a folder you can write to.") from None
    return path
