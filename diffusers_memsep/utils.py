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
    except BaseException as error:
        if is_write_error(error) and not isinstance(error, OSError):
            raise as_write_error(error, path) from error  # safetensors' full-disk error: one line, not a traceback
        raise
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


# ------------------------------------------------------------------------------------------------ write failures
def _storage_errno(message: str) -> int | None:
    """The errno a safetensors (Rust) write error carries in its text, e.g. ``Os { code: 28, kind: StorageFull }``."""
    import errno
    import re

    found = re.search(r"code:\s*(\d+)", message)
    if found:
        return int(found.group(1))
    if "StorageFull" in message or "No space left" in message:
        return errno.ENOSPC
    if "PermissionDenied" in message:
        return errno.EACCES
    return None


def as_write_error(error: BaseException, path: str | os.PathLike) -> OSError:
    """``error`` raised while writing ``path`` as an ``OSError`` (errno kept): safetensors raises its own
    ``SafetensorError`` for a full disk, which is not an OSError and would otherwise end in a traceback."""
    if isinstance(error, OSError):
        return error
    message = " ".join(str(error).split()) or type(error).__name__
    code = _storage_errno(message)
    if code is not None:
        return OSError(code, f"{os.strerror(code)} while writing {str(path)!r} ({type(error).__name__})")
    return OSError(f"cannot write {str(path)!r}: {message}")


def is_write_error(error: BaseException) -> bool:
    """True for the errors a writer meets when the file system refuses (OSError, safetensors' SafetensorError;
    the command line tells a safetensors READ error, "Error while deserializing", apart)."""
    return isinstance(error, OSError) or type(error).__name__ == "SafetensorError"


@contextlib.contextmanager
def staging_folder(path: str | os.PathLike) -> Iterator[Path]:
    """Yield ``path`` as a fresh, empty temporary folder (e.g. ``<output_dir>/.pipeline.tmp``) to save into.

    When the block fails the folder is removed, so no half-written hidden folder is left behind; a write failure
    (a full disk raises safetensors' ``SafetensorError``) is re-raised as an ``OSError`` naming the folder, which
    the command line turns into one line. On success the caller moves the content into place (and removes it).
    """
    path = Path(path)
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    try:
        yield path
    except BaseException as error:
        shutil.rmtree(path, ignore_errors=True)
        if is_write_error(error) and not isinstance(error, OSError):
            raise as_write_error(error, path) from error
        raise


# ------------------------------------------------------------------------------------ paths inside the output folder
def inside_output_dir(path: str | os.PathLike, output_dir: str | os.PathLike, what: str = "--output_dir") -> Path:
    """Return ``path`` if it lies inside ``output_dir`` (after resolving ``..`` and symbolic links), else raise a
    ValueError: every path a command writes must lie inside its output folder. Call it on every path built from
    user input (a setting name, a method name, a variant name) before writing there."""
    resolved, root = Path(path).expanduser().resolve(), Path(output_dir).expanduser().resolve()
    if resolved != root and root not in resolved.parents:
        raise ValueError(f"refusing to write {str(path)!r}: it lies outside {what} {str(output_dir)!r}; every output "
                         "of a command stays inside its output folder.")
    return Path(path)


def check_plain_name(value: str, flag: str) -> str:
    """A name that becomes a file or folder name (``--setting_name``...): letters, digits, ``-``, ``_`` and ``.``,
    no path separator, not ``.`` or ``..``. Returns it, or raises a ValueError naming the flag and the fix."""
    import re

    if not isinstance(value, str) or value in (".", "..") or not re.fullmatch(r"[A-Za-z0-9._-]{1,100}", value):
        raise ValueError(f"{flag} {value!r} is not a plain name; use letters, digits, '-', '_' and '.' only (no '/', "
                         "not '.' or '..'), e.g. my_project: it names a folder inside --output_dir.")
    return value


def check_output_outside_inputs(output_dir: str | os.PathLike, inputs: dict[str, tuple[str, str | None]]) -> None:
    """Refuse an output folder that is, or lies inside, one of the input folders.

    ``inputs`` maps a flag (``--train_data_dir``) to ``(what, path)``; paths that are not local folders (a Hub id,
    None) are skipped. An output folder inside the training images would put sample grids among them (the next
    run trains on them); inside an input pipeline it would mix outputs with the model being read.
    """
    out = Path(output_dir).expanduser().resolve()
    for flag, (what, value) in inputs.items():
        if not value:
            continue
        folder = Path(value).expanduser()
        if not folder.is_dir():
            continue
        folder = folder.resolve()
        if out == folder or folder in out.parents:
            where = "is" if out == folder else "lies inside"
            raise ValueError(f"--output_dir {str(output_dir)!r} {where} the {what} {flag} {str(value)!r}; outputs "
                             f"would be written among the inputs. Choose an --output_dir outside {str(value)!r}.")


# ------------------------------------------------------------------------------------------- one writer per folder
#: Suffix of the lock file beside an output folder (``<parent>/.<name>.memsep.lock``) while a command writes it.
LOCK_SUFFIX = ".memsep.lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by someone else
    return True


class OutputLock:
    """A lock that keeps a second process from writing the same output folder.

    The lock is a file beside the folder (``<parent>/.<name>.memsep.lock``, so it never counts as content of the
    folder), created with ``O_CREAT | O_EXCL`` and holding the pid, the host and the command. A lock left by a
    dead process on this host is taken over with a note; a live one (or one of another host) is refused with a
    ValueError naming the lock file. :meth:`release` removes the file and any empty folder the lock created.
    """

    def __init__(self, output_dir: str | os.PathLike, command: str = "memsep"):
        resolved = Path(output_dir).expanduser().resolve()
        self.output_dir = Path(output_dir)
        self.path = resolved.parent / f".{resolved.name or 'root'}{LOCK_SUFFIX}"
        self.command = command
        self._created: list[Path] = []
        self._held = False

    def acquire(self) -> "OutputLock":
        import json
        import socket
        import sys

        parent = self.path.parent
        missing = []
        while not parent.exists():
            missing.append(parent)
            parent = parent.parent
        for folder in reversed(missing):
            folder.mkdir()
            self._created.append(folder)
        record = {"pid": os.getpid(), "host": socket.gethostname(), "command": self.command}
        for _ in range(2):
            try:
                descriptor = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                same_host = holder.get("host") == record["host"]
                pid = holder.get("pid")
                if same_host and isinstance(pid, int) and pid != os.getpid() and not _pid_alive(pid):
                    print(f"memsep: note: taking over the lock {str(self.path)!r} left by process {pid}, which is "
                          "no longer running.", file=sys.stderr)
                    self.path.unlink(missing_ok=True)
                    continue
                self._remove_created()
                who = f"process {pid} on {holder.get('host')!r}" if pid else "another process"
                raise ValueError(
                    f"--output_dir {str(self.output_dir)!r} is being written by {who} ({holder.get('command', '?')}; "
                    f"lock file {str(self.path)!r}); wait for it to finish or choose another --output_dir. If that "
                    "process is no longer running, delete the lock file."
                ) from None
            with os.fdopen(descriptor, "w") as handle:
                handle.write(json.dumps(record))
            self._held = True
            return self
        raise ValueError(f"cannot take the lock {str(self.path)!r}; delete it if no memsep command is running.")

    def _holder(self) -> dict:
        import json

        try:
            holder = json.loads(self.path.read_text())
            return holder if isinstance(holder, dict) else {}
        except (OSError, ValueError):
            return {}

    def _remove_created(self) -> None:
        for folder in reversed(self._created):
            with contextlib.suppress(OSError):
                folder.rmdir()  # only when still empty
        self._created = []

    def release(self) -> None:
        if self._held:
            holder = self._holder()
            if holder.get("pid") == os.getpid():
                self.path.unlink(missing_ok=True)
            self._held = False
        self._remove_created()

    def __enter__(self) -> "OutputLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


# ------------------------------------------------------------------------------------------ checks of flag values
def check_unique(values, flag: str) -> None:
    """Refuse duplicates in a list flag (``--seeds 0 0``: the same run twice, counted as two replicates)."""
    values = list(values or [])
    seen, repeated = set(), []
    for value in values:
        key = repr(value)
        if key in seen and value not in repeated:
            repeated.append(value)
        seen.add(key)
    if repeated:
        raise ValueError(f"{flag} lists {', '.join(map(str, repeated))} more than once; give each value once.")


def check_seed(value, flag: str = "--seed") -> None:
    """Seeds are integers in [0, 2**32 - 1] (numpy's range; torch accepts more, but a study must replay them)."""
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2 ** 32:
        raise ValueError(f"{flag} must be an integer in [0, 4294967295], got {value!r}.")


def check_etas_remove_heads(etas, num_heads: int, flag: str = "--etas") -> None:
    """Refuse a pruning fraction that removes no head of the ``num_heads`` heads it ranks (``floor(eta * H) == 0``;
    H: the heads still present, over the whole model as ``select_heads_to_prune`` ranks them): the method would run
    as a no-op and be reported as if it had pruned."""
    import math

    for eta in etas:
        if math.floor(float(eta) * num_heads) == 0:
            raise ValueError(f"{flag} {eta} removes no head of the {num_heads} heads it ranks (floor({eta} x "
                             f"{num_heads}) = 0): the method would run as a no-op; pass an eta >= "
                             f"{1 / num_heads:.4g}.")


def check_time_switch(value, num_train_timesteps: int, flag: str = "--small_t_switch") -> None:
    """Refuse a switch timestep outside the schedule ``[1, num_train_timesteps - 1]`` (at 0 or past the end the
    switch never happens, and the method is the unmodified sampler)."""
    if value is None:
        return
    if not isinstance(value, int) or not 1 <= value < num_train_timesteps:
        raise ValueError(f"{flag} {value!r} lies outside the schedule; pass an integer in [1, "
                         f"{num_train_timesteps - 1}] (the model has {num_train_timesteps} training timesteps).")


def check_positive_limit(value, flag: str) -> None:
    """A limit that would make a method do nothing (``--max_runs 0``, a budget of 0) is refused; None means none."""
    if value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{flag} must be a positive integer (or left unset for no limit), got {value!r}.")


def check_finite_scores(scores, what: str = "head importance scores") -> None:
    """Refuse NaN or infinite scores before they rank anything (a NaN sorts arbitrarily: the pruned heads would be
    chosen at random while reported as chosen by the score)."""
    import torch

    scores = torch.as_tensor(scores)
    bad = int((~torch.isfinite(scores)).sum())
    if bad:
        raise ValueError(f"{bad} of {scores.numel()} {what} are NaN or infinite; the model or its data is not finite "
                         "(check the checkpoint for NaN weights and the images for NaN values).")


# ------------------------------------------------------------------------------------------------ JSON files
def read_json_object(path: str | os.PathLike, what: str | None = None) -> dict:
    """The JSON object in ``path``, or a ValueError naming the file: unreadable JSON, or JSON that is not an object
    (``model_index.json``, ``config.json`` and ``trainer_state.json`` must hold ``{...}``)."""
    import json

    path = Path(path)
    what = what or path.name
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{what} {str(path)!r} is not a valid JSON file ({error.msg} at line {error.lineno}, "
                         f"column {error.colno}); restore the file or save it again.") from None
    except UnicodeDecodeError:
        raise ValueError(f"{what} {str(path)!r} is not a text file; restore the file or save it again.") from None
    if not isinstance(value, dict):
        raise ValueError(f"{what} {str(path)!r} holds a JSON {type(value).__name__}, not an object ({{...}}); restore "
                         "the file or save it again.")
    return value


def check_pipeline_json(folder: str | os.PathLike) -> None:
    """Read every JSON file of a local pipeline folder (``model_index.json``, each component's ``config.json`` /
    ``scheduler_config.json``) before loading it: a damaged file or one that is not a JSON object raises a
    ValueError naming it (diffusers would fail later with a traceback, or without naming the file)."""
    folder = Path(folder)
    if not (folder / "model_index.json").is_file():
        return
    read_json_object(folder / "model_index.json")
    for path in sorted(folder.glob("*/*.json")):
        if path.parent.name.startswith("."):
            continue
        read_json_object(path)


def check_config_types(config: dict, defaults: dict, path: str | os.PathLike) -> None:
    """Refuse values of another type than their default in a loaded config (``"num_layers": "4"``), naming the
    file and the key: diffusers passes them on, and they fail later deep inside the model."""
    for key, default in defaults.items():
        if key not in config or config[key] is None or default is None:
            continue
        value = config[key]
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, int):
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif isinstance(default, float):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif isinstance(default, str):
            ok = isinstance(value, str)
        else:
            continue
        if not ok:
            raise ValueError(f"{str(path)!r}: {key} is {value!r} ({type(value).__name__}) but must be a "
                             f"{type(default).__name__} (like {default!r}); fix that value in the file.")


# -------------------------------------------------------------------------------------- data content fingerprint
def data_fingerprint(data) -> str:
    """SHA-256 of a training set's content: the bytes of every image (as ``data.iter_chunks()`` yields them, or
    ``data.images``) and of its labels. Two sets with the same paths but replaced images differ; a resumed run,
    study or prune records this, never the path alone."""
    import hashlib

    digest = hashlib.sha256()
    chunks = data.iter_chunks() if hasattr(data, "iter_chunks") else [data.images]
    for chunk in chunks:
        digest.update(chunk.detach().cpu().contiguous().numpy().tobytes())
    labels = getattr(data, "labels", None)
    if labels is not None:
        digest.update(labels.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()
