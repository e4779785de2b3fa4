"""Model cards from ``model_cards/`` and pushing pipeline folders to the Hugging Face Hub.

Where the templates live. They are edited in the repository's top-level ``model_cards/`` and nowhere else. An
installed wheel carries them as package data, ``diffusers_memsep/model_cards/*.md``, read with
:mod:`importlib.resources`: ``setup.py``'s ``build_py`` copies ``model_cards/*.md`` there at build time (and adds
them to the sdist, so a wheel built from the sdist has them too). A checkout (an editable install, or
``PYTHONPATH`` pointing at a clone) has no such package folder, so the lookup falls back to ``model_cards/`` next to
the package. Why a build step rather than the alternatives: a second committed copy drifts; a symlink
``diffusers_memsep/model_cards -> ../model_cards`` breaks on checkouts without symlinks (Windows);
``[tool.setuptools.package-dir]`` can map ``model_cards/`` to a sub-package only as a separate package whose
editable import goes through setuptools' import hook, and ``data-files`` land outside the package, where
:mod:`importlib.resources` cannot see them. The commands call :func:`require_templates` before any training step,
so an installation without templates fails at once instead of after the training.

Save locally first, push as a separate step: diffusers' ``save_pretrained(push_to_hub=True)`` creates the remote
repository before anything is written, so a failed push there can leave an empty repo and nothing local. Here the
folder is complete on disk before the network is touched, and a failed push leaves it untouched.
:func:`push_folder_to_hub` is the one push path: ``MemSepPipeline.push_to_hub`` and
``MemSepPipeline.save_pretrained(push_to_hub=True)`` refuse and name it.

Offline failures become one :class:`HubPushError` line that names the cause and the fix. huggingface_hub 2.x
raises ``OfflineModeIsEnabled`` at once with ``HF_HUB_OFFLINE=1``, ``LocalTokenNotFoundError`` without a token, and,
with no network, an ``httpx2.ConnectError`` (a transport error, not an ``OSError``) after about 23 s of retries.
The first two are checked before any request, so they fail fast.
"""

from __future__ import annotations

import contextlib
import os
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData, constants, create_repo, get_token, upload_folder
from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError, OfflineModeIsEnabled
from huggingface_hub.utils import HFValidationError, validate_repo_id

from .data import EMBEDDED_DATASET
from .utils import write_text

#: The package whose ``model_cards/`` data folder holds the templates in an installed wheel.
TEMPLATE_PACKAGE = __package__
#: The folder the templates are edited in; a checkout (editable install, ``PYTHONPATH``) reads them there.
CHECKOUT_TEMPLATE_DIR = Path(__file__).resolve().parent.parent / "model_cards"
#: Never uploaded: training checkpoints (optimizer state, hundreds of MB), temporary folders, local logs.
PUSH_IGNORE_PATTERNS = ["checkpoint-*", "checkpoint-*/**", ".*", ".*/**", "logs/**", "*.tmp"]

#: The training-set reference (``reference/``: the exact training images). Private by default: a push leaves it out
#: unless asked (``push_reference=True``, ``memsep push --push_reference``); the card says how to rebuild it.
REFERENCE_PATTERNS = ["reference", "reference/**", "**/reference/**"]

DEFAULT_TAGS = ["diffusers", "diffusers-memsep", "dit", "memorization"]

#: The Hub has no task for class-conditional image generation (``facebook/DiT-XL-2-256`` carries no pipeline tag),
#: so class-conditional cards set no ``pipeline_tag`` and carry this tag; unconditional cards use the Hub's
#: ``unconditional-image-generation`` task.
CLASS_CONDITIONAL_TAG = "class-conditional-image-generation"
UNCONDITIONAL_TASK = "unconditional-image-generation"


def hub_repo_id(name: str | os.PathLike | None) -> str | None:
    """``name`` when it can be a Hub repo id (``owner/name`` or ``name``), None for a local path or free text.

    Model cards list only Hub ids in ``base_model`` and ``datasets``: a local path there is a broken link.
    """
    if name is None:
        return None
    name = str(name)
    if os.path.exists(os.path.expanduser(name)) or name.startswith((".", "/", "~")) or name.count("/") > 1:
        return None
    try:
        validate_repo_id(name)
    except HFValidationError:
        return None
    return name


class HubPushError(RuntimeError):
    """A push to the Hub failed for an expected reason (offline, no token, refused); the message says the fix."""


def template_dirs() -> tuple[Traversable, ...]:
    """Where templates are looked up, first match wins: the installed package's data, then the checkout's."""
    return resources.files(TEMPLATE_PACKAGE) / "model_cards", CHECKOUT_TEMPLATE_DIR


def template_path(template_name: str) -> Traversable:
    """The model-card template ``template_name`` (``"base_model"`` or ``"pruned_variant"``).

    A :class:`~importlib.resources.abc.Traversable`: a ``pathlib.Path`` for a package installed in a folder (wheel
    or checkout), a ``zipfile.Path`` for a zipped one. Read it with ``.read_text()``, or get a real file with
    ``importlib.resources.as_file``. Raises ``ValueError`` for an unknown name, ``FileNotFoundError`` when no
    template is installed at all.
    """
    found = _find_template(template_name)
    if found is not None:
        return found
    available = sorted({entry.name[:-3] for folder in template_dirs() if folder.is_dir()
                        for entry in folder.iterdir() if entry.name.endswith(".md")})
    if not available:
        raise FileNotFoundError(_not_installed(template_name))
    raise ValueError(f"no model-card template {template_name!r}; choose one of {available}.")


def require_templates(*template_names: str) -> None:
    """Check, before any expensive work, that the model-card templates a command will write are installed.

    Raises ``FileNotFoundError`` (one line: the missing file and the fix) for the first one missing.
    """
    for template_name in template_names:
        if _find_template(template_name) is None:
            raise FileNotFoundError(_not_installed(template_name))


def _find_template(template_name: str) -> Traversable | None:
    name = template_name if template_name.endswith(".md") else f"{template_name}.md"
    return next((folder / name for folder in template_dirs() if (folder / name).is_file()), None)


def _not_installed(template_name: str) -> str:
    name = template_name if template_name.endswith(".md") else f"{template_name}.md"
    package_dir, checkout_dir = template_dirs()
    return (f"model-card template {name} is not installed (neither in {package_dir} nor in {checkout_dir}); "
            "reinstall diffusers-memsep from a clone (`pip install .`) or from a wheel built from one (its setup.py "
            "copies model_cards/ into the package).")


def render_model_card(template_name: str, metadata: dict[str, Any] | None = None,
                      eval_results: list[dict[str, Any]] | None = None, **fields):
    """Render ``model_cards/<template_name>.md`` (Jinja) into a ``huggingface_hub.ModelCard``.

    Args:
        template_name: ``"base_model"`` (a trained DiT) or ``"pruned_variant"`` (a head-pruned, fine-tuned DiT).
        metadata: YAML header fields for ``ModelCardData`` (``license``, ``tags``, ``datasets``, ``base_model``,
            ``model_name``...); ``library_name="diffusers"`` and the project's tags are added. ``datasets`` and
            ``base_model`` keep only Hub ids (:func:`hub_repo_id`; local paths are dropped); a ``base_model``
            gets ``base_model_relation="finetune"`` (a pruned and fine-tuned copy) unless one is given.
            ``pipeline_tag``: ``unconditional-image-generation`` for an unconditional model; none for a
            class-conditional one (see :data:`CLASS_CONDITIONAL_TAG`).
        eval_results: ``model-index`` entries, each a dict with ``metric_type``, ``metric_value`` and optionally
            ``metric_name``, ``dataset_name``, ``dataset_type``, ``task_type``
            (default ``"unconditional-image-generation"``); needs ``metadata["model_name"]``.
        fields: the template's variables (see the template's header comment for the ones it uses); a truthy
            ``num_classes`` marks a class-conditional model.
    """
    metadata = dict(metadata or {})
    metadata.setdefault("library_name", "diffusers")
    conditional = bool(fields.get("num_classes"))
    task_tags = [CLASS_CONDITIONAL_TAG] if conditional else [UNCONDITIONAL_TASK]
    if not conditional:
        metadata.setdefault("pipeline_tag", UNCONDITIONAL_TASK)
    metadata["tags"] = list(dict.fromkeys(DEFAULT_TAGS + task_tags + list(metadata.get("tags") or [])))
    datasets = [hub_repo_id(name) for name in metadata.pop("datasets", None) or [] if name != EMBEDDED_DATASET]
    if any(datasets):
        metadata["datasets"] = [name for name in datasets if name]
    base_model = hub_repo_id(metadata.pop("base_model", None))
    if base_model:
        metadata["base_model"] = base_model
        metadata.setdefault("base_model_relation", "finetune")
    else:
        metadata.pop("base_model_relation", None)
    if eval_results:
        if not metadata.get("model_name"):
            raise ValueError("eval_results need metadata['model_name'] (the model-index entry's name).")
        results = []
        for entry in eval_results:
            entry = dict(entry)
            entry.setdefault("task_type", CLASS_CONDITIONAL_TAG if conditional else UNCONDITIONAL_TASK)
            entry.setdefault("dataset_name", entry.get("dataset_type", "custom"))
            # The type is a Hub dataset id (a link on the Hub); a local folder or free text is "custom".
            dataset_type = entry.get("dataset_type") or entry["dataset_name"]
            is_hub_id = dataset_type != EMBEDDED_DATASET and hub_repo_id(dataset_type)
            entry["dataset_type"] = dataset_type if is_hub_id else "custom"
            results.append(EvalResult(**entry))
        metadata["eval_results"] = results
    card_data = ModelCardData(**metadata)
    template = template_path(template_name).read_text(encoding="utf-8")
    return ModelCard.from_template(card_data, template_str=template, **fields)


def save_model_card(folder: str | os.PathLike, template_name: str, metadata: dict[str, Any] | None = None,
                    eval_results: list[dict[str, Any]] | None = None, **fields) -> Path:
    """Render a card (:func:`render_model_card`) and write it atomically as ``<folder>/README.md``."""
    card = render_model_card(template_name, metadata=metadata, eval_results=eval_results, **fields)
    return write_text(Path(folder) / "README.md", str(card))


def push_folder_to_hub(folder: str | os.PathLike, repo_id: str, private: bool = False, token: str | None = None,
                       commit_message: str = "Upload MemSepPipeline (diffusers-memsep)",
                       ignore_patterns: list[str] | None = None, push_reference: bool = False) -> str:
    """Create ``repo_id`` (private when asked, no error if it exists) and upload ``folder`` to it.

    The training-set reference (``reference/``, the exact training images) is left out unless ``push_reference``
    (:data:`REFERENCE_PATTERNS`): publishing a model must not publish its training data by accident. The local
    folder keeps it; the card says how to rebuild it (``memsep reference``).

    The folder must already hold the saved pipeline; it is only read. Returns the URL of the commit.
    Raises :class:`HubPushError` (one line: cause and fix) when offline, without a token, without network, or
    when the Hub refuses; the local folder stays as it was.
    """
    folder = Path(folder)
    if not folder.is_dir() or not any(folder.iterdir()):
        raise ValueError(f"{str(folder)!r} is not a saved pipeline folder; save the pipeline there before pushing.")
    local = f"The local copy is intact at {folder}; push it with `memsep push {folder} --hub_model_id {repo_id}`."
    with _hub_errors(repo_id, local):
        token = check_hub_repo(repo_id, private=private, token=token, local=local)
        commit = upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message, token=token,
                               ignore_patterns=push_ignore_patterns(ignore_patterns, push_reference),
                               repo_type="model")
    return str(getattr(commit, "commit_url", commit))


def push_ignore_patterns(ignore_patterns: list[str] | None = None, push_reference: bool = False) -> list[str]:
    """The patterns a push leaves out: ``ignore_patterns`` (default :data:`PUSH_IGNORE_PATTERNS`), plus the
    training-set reference unless ``push_reference``."""
    patterns = list(ignore_patterns or PUSH_IGNORE_PATTERNS)
    return patterns if push_reference else patterns + [p for p in REFERENCE_PATTERNS if p not in patterns]


def check_hub_repo(repo_id: str, private: bool = False, token: str | None = None, local: str = "") -> str:
    """Check that pushing to ``repo_id`` can work and create the repo (no error if it exists); return the token.

    Called before training with ``--push_to_hub`` (as diffusers' scripts create the repo before the first step),
    so a missing token, offline mode or a refused repo fail in seconds, not after the run.
    """
    if not isinstance(repo_id, str) or not repo_id.strip():
        raise ValueError("repo_id must be 'user/name' (e.g. --hub_model_id me/dit-digits).")
    if constants.HF_HUB_OFFLINE or _truthy(os.environ.get("HF_HUB_OFFLINE")):
        raise HubPushError(f"cannot push to {repo_id}: HF_HUB_OFFLINE is set; unset it (and connect) to push. {local}")
    token = token or get_token()
    if not token:
        raise HubPushError(f"cannot push to {repo_id}: no Hugging Face token; run `hf auth login`, set HF_TOKEN or "
                           f"pass --hub_token. {local}")
    with _hub_errors(repo_id, local):
        create_repo(repo_id, private=private, exist_ok=True, token=token, repo_type="model")
    return token


@contextlib.contextmanager
def _hub_errors(repo_id: str, local: str):
    """Turn the Hub client's expected failures into one :class:`HubPushError` line with the cause and the fix."""
    transport_errors = _transport_errors()
    try:
        yield
    except OfflineModeIsEnabled as error:
        raise HubPushError(f"cannot push to {repo_id}: offline mode is enabled ({error}); unset HF_HUB_OFFLINE. "
                           f"{local}") from None
    except LocalTokenNotFoundError:
        raise HubPushError(f"cannot push to {repo_id}: no Hugging Face token; run `hf auth login` or set HF_TOKEN. "
                           f"{local}") from None
    except HfHubHTTPError as error:
        status = getattr(getattr(error, "response", None), "status_code", None)
        hint = ("check that the token has write access to this namespace" if status in (401, 403)
                else "check the repo id and the Hub status")
        first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise HubPushError(f"cannot push to {repo_id}: the Hub refused ({first_line}); {hint}. {local}") from None
    except transport_errors as error:
        raise HubPushError(f"cannot push to {repo_id}: no connection to the Hub ({type(error).__name__}: {error}); "
                           f"connect to the internet and push again. {local}") from None


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Network failures: httpx2 (huggingface_hub 2.x), httpx, requests (older releases), plain OS errors."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"),
                         ("requests", "ConnectionError"), ("requests", "Timeout")):
        try:
            errors.append(getattr(__import__(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)


def _truthy(value: str | None) -> bool:
    return value is not None and value.strip().upper() in {"1", "ON", "YES", "TRUE"}


__all__ = ["HubPushError", "check_hub_repo", "hub_repo_id", "push_folder_to_hub", "render_model_card",
           "require_templates", "save_model_card", "template_dirs", "template_path"]
