"""MemSepPipeline: class-conditional DiT sampling in pixel or latent space that says which samples copy training data.

diffusers' ``DiTPipeline`` requires a VAE and hard-codes ImageNet's null class 1000; this pipeline serves small
pixel-space DiTs as well as latent ones (it loads a stock ``DiTPipeline`` folder such as ``facebook/DiT-XL-2-256``,
keeping its ``id2label`` table), takes the null class from the model itself, and carries the training-set reference
(:class:`~diffusers_memsep.memorization.NearestNeighborIndex`) so a pipeline loaded later can still apply the
paper's memorization rule to what it generates.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import numbers
import os
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DiffusionPipeline, DiTTransformer2DModel
from diffusers.models.embeddings import LabelEmbedding
from diffusers.schedulers import KarrasDiffusionSchedulers
from diffusers.utils import BaseOutput, logging
from diffusers.utils.torch_utils import randn_tensor
from huggingface_hub import constants

from ..memorization import NearestNeighborIndex, memorization_report
from ..memorization.metrics import MemorizationResult
from ..memorization.model_score import METHODS, THRESHOLDS, check_method_options, memorization_score, score_generator
from ..utils import check_pipeline_json
from .remote_code import SHIPPED_COMPONENTS, write_remote_code

logger = logging.get_logger(__name__)

__all__ = ["MemSepPipeline", "MemSepPipelineOutput", "PipelineLoadError"]


class PipelineLoadError(OSError):
    """A pipeline folder or Hub repo could not be loaded (not cached offline, damaged file); the message says the
    fix. An ``OSError``, as diffusers' own load errors are, so ``except OSError`` keeps working."""

#: Keyword arguments of ``from_pretrained`` that also apply to loading one component.
_COMPONENT_LOAD_KWARGS = ("torch_dtype", "cache_dir", "revision", "token", "local_files_only", "force_download",
                          "proxies", "variant", "use_safetensors")


@dataclass
class MemSepPipelineOutput(BaseOutput):
    """
    Output of :class:`MemSepPipeline`.

    Args:
        images (`list[PIL.Image.Image]` | `np.ndarray` | `torch.Tensor`): the samples, values in ``[0, 1]``
            (``np``: ``[B, H, W, C]``; ``pt``: ``[B, C, H, W]``).
        memorized (`torch.BoolTensor` `[B]`, *optional*): the paper's rule
            ``||x - x_(1)||^2 <= (1/9) ||x - x_(2)||^2`` against the pipeline's ``reference``; None without one.
        distance_ratio (`torch.Tensor` `[B]`, *optional*): ``||x - x_(1)||^2 / ||x - x_(2)||^2``.
        nearest_index (`torch.LongTensor` `[B]`, *optional*): row of the nearest training image in the reference;
            :meth:`MemSepPipeline.training_images` returns those images to show beside the samples.
        finite (`torch.BoolTensor` `[B]`, *optional*): False for a sample with NaN or infinite values (the model or
            the sampler diverged). Such a sample is not judged: ``memorized`` False, ``distance_ratio`` NaN,
            ``nearest_index`` -1; count them (``(~finite).sum()``) beside the memorization ratio of the others.
        num_resamples (`torch.LongTensor` `[B]`, *optional*): with ``avoid_copies=True``, how many times each sample
            was drawn again from fresh noise (0 = its first trajectory was kept); None otherwise. A sample still
            flagged after ``max_resamples`` redraws has ``memorized`` True.
        early_distance_ratio (`torch.Tensor` `[B]`, *optional*): with ``copy_check_at``, the ``distance_ratio`` of the
            predicted clean image at the early check, for the trajectory that was returned; None otherwise.
        denoising_steps (`torch.LongTensor` `[B]`, *optional*): the sampler steps spent on each sample over all its
            trajectories (a trajectory stopped at the early check counts the steps it ran), so
            ``denoising_steps.float().mean() / num_inference_steps`` is the cost of copy-free sampling relative to
            plain sampling (1 without ``avoid_copies``). With classifier-free guidance each step runs the
            transformer on two rows.
        memorization_score (`torch.Tensor` `[B]`, *optional*): with ``memorization_score``, the model-only score
            of each returned sample (:func:`~diffusers_memsep.memorization.model_score.memorization_score`; higher =
            more likely a copy); needs no ``reference``. NaN for a sample that is not finite. None otherwise.
        score_memorized (`torch.BoolTensor` `[B]`, *optional*): ``memorization_score`` at or above the method's
            documented threshold (``model_score.THRESHOLDS``); None without ``memorization_score``.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    memorized: torch.Tensor | None = None
    distance_ratio: torch.Tensor | None = None
    nearest_index: torch.Tensor | None = None
    finite: torch.Tensor | None = None
    num_resamples: torch.Tensor | None = None
    early_distance_ratio: torch.Tensor | None = None
    denoising_steps: torch.Tensor | None = None
    memorization_score: torch.Tensor | None = None
    score_memorized: torch.Tensor | None = None


class MemSepPipeline(DiffusionPipeline):
    r"""
    Sample a (prunable) DiT and check every sample against the training set.

    Components:
        transformer ([`~diffusers.DiTTransformer2DModel`] or [`~diffusers_memsep.PrunableDiTTransformer2DModel`]):
            epsilon-prediction DiT; ``config.num_embeds_ada_norm`` classes plus one null class (index
            ``num_embeds_ada_norm``, the extra row of DiT's label table) used for unconditional sampling and as the
            unconditional branch of classifier-free guidance.
        scheduler ([`~diffusers.SchedulerMixin`]): any epsilon-prediction scheduler (DDPM, DDIM, DPM-Solver++...).
        vae ([`~diffusers.AutoencoderKL`], *optional*): latent space when given; pixel space when None.
        reference ([`~diffusers_memsep.memorization.NearestNeighborIndex`], *optional*): the training images in
            pixel space, model data range ``[-1, 1]``; saved in its own sub-folder by ``save_pretrained``.
        small_t_transformer (*optional*): a second DiT with the same input/output (e.g. a head-pruned copy) for
            *time-routed sampling*: with a switch timestep ``s`` (``small_t_switch``, in the scheduler's
            train-timestep numbering, 0 = least noise), steps with ``t < s`` use ``small_t_transformer`` and the others
            ``transformer``. The paper (Section 5) locates memorization at small noise levels, where the empirical
            score is hardest to represent; routing only those steps to the pruned model keeps the original model's
            global structure.

    Config values (saved in ``model_index.json``):
        small_t_switch (`int`, *optional*): default switch timestep for routing (overridden by ``__call__``).
        label_dropout_prob (`float`, *optional*): fraction of training labels replaced by the null class, written by
            the trainer: 0 means the null class was never learned (guidance and unconditional sampling refused),
            1 means an unconditional model (class labels refused); None = unknown (only the label table is checked).
        id2label (`dict[int | str, str]`, *optional*): class names, as ``DiTPipeline`` takes them
            (``"tench, Tinca tinca"``: several comma-separated names for one class); see :attr:`labels` and
            :meth:`get_label_ids`.

    Where the memorization check looks: at the generated images in pixel space, after the VAE decode and the clamp
    to ``[-1, 1]``, against the training images in the same space. The paper's rule is defined on data points and
    the user's question is "does this *image* copy a training image"; latent distances would depend on the VAE's
    (stochastic, lossy) encoding of the training set, and pixel space is what the samples are judged in.
    """

    model_cpu_offload_seq = "transformer->small_t_transformer->vae"
    _optional_components = ["vae", "reference", "small_t_transformer"]

    def __init__(
        self,
        transformer: DiTTransformer2DModel,
        scheduler: KarrasDiffusionSchedulers,
        vae: AutoencoderKL | None = None,
        reference: NearestNeighborIndex | None = None,
        small_t_transformer: DiTTransformer2DModel | None = None,
        small_t_switch: int | None = None,
        label_dropout_prob: float | None = None,
        id2label: dict | None = None,
    ):
        super().__init__()
        self.register_modules(
            transformer=transformer,
            scheduler=scheduler,
            vae=vae,
            reference=reference,
            small_t_transformer=small_t_transformer,
        )
        self.register_to_config(small_t_switch=small_t_switch, label_dropout_prob=label_dropout_prob)
        # Saved in model_index.json with string keys (JSON), as in the Hub's DiT repositories.
        self.register_to_config(id2label={str(k): str(v) for k, v in id2label.items()} if id2label else None)
        self.check_components()

    # -------------------------------------------------------------------------------------- save and load
    def save_pretrained(self, save_directory: str | os.PathLike, *args, push_to_hub: bool = False, **kwargs):
        """``DiffusionPipeline.save_pretrained``, plus the code stock diffusers needs to load the folder.

        The folder gets ``pipeline_memsep.py`` (this pipeline) and, beside each custom component's weights, the
        file of its class; ``model_index.json`` names those files, so
        ``DiffusionPipeline.from_pretrained(folder, custom_pipeline="pipeline_memsep", trust_remote_code=True)``
        loads it without diffusers-memsep installed (see :mod:`diffusers_memsep.pipelines.remote_code`).

        ``push_to_hub=True`` is refused (ValueError), as is :meth:`push_to_hub`: the folder is pushed in a separate
        step, ``memsep push FOLDER --hub_model_id ID`` or ``diffusers_memsep.hub.push_folder_to_hub(FOLDER, ID)``.
        """
        if push_to_hub:
            raise ValueError(_push_refused(save_directory, kwargs.get("repo_id") or "ID"))
        super().save_pretrained(save_directory, *args, **kwargs)
        write_remote_code(save_directory)

    def push_to_hub(self, repo_id: str, *args, **kwargs):
        """Refused (ValueError): save the folder, then push it with ``memsep push`` (see :meth:`save_pretrained`)."""
        raise ValueError(_push_refused("FOLDER", repo_id))

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, **kwargs) -> "MemSepPipeline":
        """:meth:`diffusers.DiffusionPipeline.from_pretrained`, loading only safetensors weights by default
        (``use_safetensors=True``: no pickle is read from a folder or Hub repo someone else wrote). This library's
        components are loaded with the installed classes, so the code a folder ships for stock diffusers
        (``<component>/<module>.py``) is never executed.

        A failure to load (a Hub id that is not cached while offline, a damaged ``model_index.json`` or config,
        truncated weights) raises one :class:`PipelineLoadError` line naming the file and the fix; weights that do
        not match the config of a :class:`~diffusers_memsep.PrunableDiTTransformer2DModel` raise a ValueError. In a
        local folder every JSON file is read first (``utils.check_pipeline_json``): one that is damaged or not a JSON
        object raises a ValueError naming it.
        """
        kwargs.setdefault("use_safetensors", True)
        if os.path.isdir(os.path.expanduser(str(pretrained_model_name_or_path))):
            # A damaged model_index.json or component config names itself (ValueError), before diffusers reads it.
            check_pipeline_json(os.path.expanduser(str(pretrained_model_name_or_path)))
        try:
            return cls._from_pretrained_with_installed_components(pretrained_model_name_or_path, **kwargs)
        except PipelineLoadError:
            raise
        except OSError as error:
            raise PipelineLoadError(_load_failure_message(pretrained_model_name_or_path, error)) from error

    @classmethod
    def _from_pretrained_with_installed_components(cls, pretrained_model_name_or_path, **kwargs):
        hub_kwargs = {k: kwargs[k] for k in ("cache_dir", "revision", "token", "local_files_only", "force_download",
                                             "proxies") if k in kwargs}
        config = cls.load_config(pretrained_model_name_or_path, **hub_kwargs)
        component_kwargs = {k: kwargs[k] for k in _COMPONENT_LOAD_KWARGS if k in kwargs}
        for name, value in config.items():
            is_component = isinstance(value, (list, tuple)) and len(value) == 2
            component = SHIPPED_COMPONENTS.get(value[1]) if is_component else None
            if component is not None and value[0] == component.__module__ and name not in kwargs:
                kwargs[name] = component.from_pretrained(pretrained_model_name_or_path, subfolder=name,
                                                         **component_kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    # ---------------------------------------------------------------------------------------- class names
    @property
    def labels(self) -> dict[str, int]:
        """Class name -> class id, sorted by name, every comma-separated name of ``id2label`` (as ``DiTPipeline``)."""
        names = {}
        for key, value in (self.config.get("id2label") or {}).items():
            for name in value.split(","):
                names[name.strip()] = int(key)
        return dict(sorted(names.items()))

    def get_label_ids(self, label: str | Sequence[str]) -> list[int]:
        """Class ids of class names (``pipe.labels`` lists them); raises ValueError naming an unknown name."""
        names = [label] if isinstance(label, str) else list(label)
        labels = self.labels
        for name in names:
            if name not in labels:
                known = ", ".join(list(labels)[:20]) + (", ..." if len(labels) > 20 else "")
                raise ValueError(f"{name!r} is not a class name of this pipeline; choose from pipe.labels ({known})."
                                 if labels else f"{name!r} is not a class name: this pipeline has no id2label table; "
                                 "pass class ids (ints).")
        return [labels[name] for name in names]

    # ------------------------------------------------------------------------------------------ reference
    def attach_reference(self, images: torch.Tensor) -> NearestNeighborIndex:
        """Make ``images`` (the training images, ``[n, C, H, W]`` in ``[-1, 1]``) the pipeline's reference.

        The reference lives where samples are judged: pixel space at the pipeline's output resolution
        (:attr:`image_shape`, after the VAE decode for a latent model); images are first brought there by
        :meth:`match_image_shape`, so a stock checkpoint can be checked against any user's image set. Returns the
        new index (also ``pipe.reference``, saved by ``save_pretrained``).
        """
        reference = NearestNeighborIndex.from_images(self.match_image_shape(images))
        self.register_modules(reference=reference)
        return reference

    def match_image_shape(self, images: torch.Tensor) -> torch.Tensor:
        """``images`` (``[n, C, H, W]`` in ``[-1, 1]``) at :attr:`image_shape`, float32 on the CPU.

        Another size is resized (bilinear, antialiased); grey images are repeated to 3 channels when the pipeline
        makes RGB images. Raises ValueError for other channel counts.
        """
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            raise ValueError("expected training images as a tensor [n, C, H, W] in [-1, 1].")
        channels, height, width = self.image_shape
        images = images.detach().float().cpu()
        if images.shape[1] == 1 and channels == 3:
            images = images.expand(-1, 3, -1, -1)
        if images.shape[1] != channels:
            raise ValueError(f"the images have {images.shape[1]} channels but this pipeline generates {channels}; "
                             f"load them with {channels} channel(s).")
        if tuple(images.shape[-2:]) != (height, width):
            images = F.interpolate(images, size=(height, width), mode="bilinear", antialias=True, align_corners=False)
        return images.clamp(-1, 1).contiguous()

    # ------------------------------------------------------------------------------------------------ checks
    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the generated images (after the VAE decode in latent space)."""
        config = self.transformer.config
        size = config.sample_size
        if self.vae is None:
            return (config.in_channels, size, size)
        scale = 2 ** (len(self.vae.config.block_out_channels) - 1)
        return (self.vae.config.out_channels, size * scale, size * scale)

    @property
    def num_classes(self) -> int:
        return int(self.transformer.config.num_embeds_ada_norm)

    @property
    def null_class(self) -> int:
        """Index of the null ("no class") label: the extra last row of DiT's label table, never a fixed 1000."""
        return self.num_classes

    def check_components(self) -> None:
        """Raise a ValueError when the components do not fit together (called at construction and per call)."""
        config = self.transformer.config
        if getattr(config, "num_embeds_ada_norm", None) is None:
            raise ValueError(
                "transformer.config.num_embeds_ada_norm is None: MemSepPipeline needs a DiT with a label table."
            )
        if self.vae is not None and self.vae.config.latent_channels != config.in_channels:
            raise ValueError(
                f"vae has {self.vae.config.latent_channels} latent channels but the transformer takes "
                f"{config.in_channels}; use the VAE the model was trained with."
            )
        if self.reference is not None and tuple(self.reference.sample_shape) != self.image_shape:
            raise ValueError(
                f"reference holds images of shape {tuple(self.reference.sample_shape)} but this pipeline generates "
                f"{self.image_shape} (C, H, W); build it with NearestNeighborIndex.from_images(train_images) from the "
                "training images at the model's resolution and channel count, in [-1, 1]."
            )
        if self.small_t_transformer is not None:
            small = self.small_t_transformer.config
            for key in ("in_channels", "out_channels", "sample_size", "patch_size", "num_embeds_ada_norm"):
                if getattr(small, key) != getattr(config, key):
                    raise ValueError(
                        f"small_t_transformer.config.{key}={getattr(small, key)} differs from transformer's "
                        f"{getattr(config, key)}; the routed model must be a (pruned) copy of the same model."
                    )

    def _check_null_class(self, why: str) -> None:
        if self.config.get("label_dropout_prob") == 0:
            raise ValueError(
                f"{why} needs the null class, but this model was trained with label_dropout_prob=0 "
                "(the null class was never learned); sample class-conditionally with guidance_scale=1, "
                "or retrain with label dropout."
            )
        for model in (self.transformer, self.small_t_transformer):
            for module in model.modules() if model is not None else ():
                if isinstance(module, LabelEmbedding) and module.embedding_table.num_embeddings <= self.num_classes:
                    raise ValueError(
                        f"{why} needs the null class {self.null_class}, but the model's label table has only "
                        f"{module.embedding_table.num_embeddings} rows (it was built without a null class); pass "
                        "class_labels and guidance_scale=1."
                    )

    def _prepare_labels(self, class_labels, batch_size: int | None, device) -> torch.Tensor:
        if batch_size is not None and (
            isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1
        ):
            raise ValueError(f"batch_size={batch_size!r}: pass a positive integer.")
        if class_labels is None:
            self._check_null_class("Unconditional sampling (class_labels=None)")
            return torch.full((batch_size or 1,), self.null_class, dtype=torch.long, device=device)
        if self.config.get("label_dropout_prob") == 1:
            raise ValueError("This model was trained unconditionally (label_dropout_prob=1): pass class_labels=None.")
        if isinstance(class_labels, str) or (isinstance(class_labels, (list, tuple)) and class_labels
                                              and all(isinstance(label, str) for label in class_labels)):
            class_labels = self.get_label_ids(class_labels)  # class names, as DiTPipeline.get_label_ids takes them
            if len(class_labels) == 1 and batch_size:
                class_labels = class_labels[0]
        if isinstance(class_labels, int) and not isinstance(class_labels, bool):
            labels = torch.full((batch_size or 1,), class_labels, dtype=torch.long)
        else:
            labels = torch.as_tensor(class_labels)
            if labels.is_floating_point() or labels.dtype == torch.bool or labels.ndim != 1 or labels.numel() == 0:
                raise ValueError(
                    f"class_labels must be an int or a non-empty 1-D list/tensor of ints, got {class_labels!r}."
                )
            if batch_size is not None and batch_size != labels.numel():
                raise ValueError(
                    f"batch_size={batch_size} but {labels.numel()} class labels were given; pass one label per "
                    "sample, or an int label with batch_size."
                )
        if labels.min() < 0 or labels.max() >= self.num_classes:
            raise ValueError(
                f"class labels must lie in [0, {self.num_classes - 1}] (the model has {self.num_classes} classes), "
                f"got {labels.tolist()}; use class_labels=None for unconditional samples."
            )
        return labels.to(device=device, dtype=torch.long)

    # ------------------------------------------------------------------------------------------------- sampling
    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | Sequence[int] | torch.Tensor | None = None,
        batch_size: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        check_memorization: bool = True,
        small_t_switch: int | None = None,
        avoid_copies: bool = False,
        max_resamples: int = 8,
        copy_check_at: float | None = None,
        memorization_score: bool | str = False,
        memorization_score_kwargs: dict | None = None,
    ) -> MemSepPipelineOutput | tuple:
        r"""
        Generate images and, when the pipeline has a ``reference``, flag those that copy a training image.

        Args:
            class_labels: one label per sample (list or 1-D tensor), one int for all ``batch_size`` samples, or None
                for unconditional samples (the model's null class ``num_embeds_ada_norm``). Class names of
                :attr:`labels` (a string, or a list of strings) are accepted too.
            batch_size: number of samples when ``class_labels`` is None or an int (default 1).
            num_inference_steps: denoising steps (>= 1).
            guidance_scale: classifier-free guidance weight ``w``: ``eps = eps_null + w (eps_class - eps_null)``;
                enabled when ``> 1``, needs class labels and a model that learned its null class.
            generator: ``torch.Generator`` (or one per sample) for reproducible samples.
            output_type: ``"pil"``, ``"np"`` or ``"pt"``.
            return_dict: return a :class:`MemSepPipelineOutput` (else the tuple of its first four fields; a sample
                with NaN/inf values has ``memorized`` False and ``nearest_index`` -1 there too).
            check_memorization: compare the samples with ``reference`` (ignored when there is none).
            small_t_switch: time routing switch (see the class docstring); defaults to ``config.small_t_switch``.
            avoid_copies: copy-free sampling. Every sample that :meth:`detect_copies` flags is drawn again from fresh
                noise (same class label), until it is not a copy or ``max_resamples`` redraws are spent; only the
                flagged samples are denoised again. A sample still flagged after that keeps ``memorized=True``, so
                a copy is never returned as novel; ``num_resamples`` counts the redraws. Needs a ``reference``
                (:meth:`attach_reference`, or ``memsep reference`` for a saved pipeline).
            max_resamples: redraws allowed per sample with ``avoid_copies`` (an integer >= 0), so each sample costs
                at most ``max_resamples + 1`` trajectories.
            copy_check_at: early copy check, a fraction ``f`` in ``(0, 1)`` of the denoising steps. After that many
                steps the scheduler's prediction of the clean image (``pred_original_sample``, or
                ``(x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)`` for schedulers that do not return one;
                decoded by the VAE in latent space) is checked against the reference: with ``avoid_copies`` a
                trajectory flagged then restarts at once instead of at the end (the final check still applies; the
                last allowed trajectory always runs to the end). Its ratio is returned as ``early_distance_ratio``.
            memorization_score: also score every returned sample with the model alone, no training images needed
                (``output.memorization_score`` and ``output.score_memorized``): True for the default method
                ``"renoise"``, or a method name of ``model_score.METHODS`` (``"cond_gap"`` needs class labels and a
                learned null class). The score is that of
                :func:`~diffusers_memsep.memorization.model_score.memorization_score` on the images as
                ``output_type="pt"`` returns them (before the 8-bit rounding of ``"pil"``), with the sample's class
                labels, seeded by :func:`~diffusers_memsep.memorization.model_score.score_generator` of
                ``generator`` as it was passed: the score is reproducible from the same seed, and the images are the
                same whether it is on or off (the sampling noise is drawn as without it).
            memorization_score_kwargs: options of the score's method (``model_score.METHOD_OPTIONS``), e.g.
                ``{"repeats": 32}``: 32 re-noising draws instead of 4 (at 8 times the scoring cost).
                ``"extraction"`` (the paper's 1/3 rule against training images extracted from the model, seeded by
                its own ``seed`` option) samples and scores a bank of 256 images first, so for several calls extract
                once and pass ``{"extracted": model_score.extract_training_images(pipe)}``.

        Restarts draw their noise from ``generator`` after the pass that flagged them: a single generator continues
        its stream (redrawn samples in batch order), a list of generators gives each sample its redraws from its own
        generator, so one seed always gives the same output, and with per-sample generators each sample's output
        depends on its own generator only.
        """
        self.check_components()
        if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, numbers.Real) or not math.isfinite(
                guidance_scale):
            raise ValueError(f"guidance_scale={guidance_scale!r}: pass a finite number (1 = no guidance).")
        if (
            isinstance(num_inference_steps, bool)
            or not isinstance(num_inference_steps, int)
            or num_inference_steps < 1
        ):
            raise ValueError(f"num_inference_steps={num_inference_steps!r}: use an integer >= 1 (e.g. 50).")
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type={output_type!r}: choose 'pil', 'np' or 'pt'.")
        self._check_copy_free_arguments(avoid_copies, max_resamples, copy_check_at, check_memorization)
        score_method = _score_method(self, memorization_score, class_labels, memorization_score_kwargs)
        # derived before sampling draws from `generator`, which it only reads: the sampling noise is unchanged
        score_generators = score_generator(generator) if score_method is not None else None
        device = self._execution_device
        labels = self._prepare_labels(class_labels, batch_size, device)
        if guidance_scale > 1:
            if class_labels is None:
                raise ValueError(
                    "guidance_scale > 1 needs class_labels: guiding the null class towards itself does nothing."
                )
            self._check_null_class("Classifier-free guidance (guidance_scale > 1)")
        switch = small_t_switch if small_t_switch is not None else self.config.get("small_t_switch")
        if switch is not None and self.small_t_transformer is None:
            raise ValueError(
                "small_t_switch is set but the pipeline has no small_t_transformer; pass one, or no switch."
            )
        if self.small_t_transformer is not None and switch is None:
            logger.warning("small_t_transformer is set but no small_t_switch: sampling uses `transformer` only.")

        config = self.transformer.config
        channels, size = config.in_channels, config.sample_size
        num_samples = labels.shape[0]
        if isinstance(generator, list) and len(generator) != num_samples:
            raise ValueError(f"{len(generator)} generators were given for {num_samples} samples; pass one generator "
                             "per sample, or a single torch.Generator.")
        latents = randn_tensor(
            (num_samples, channels, size, size), generator=generator, device=device, dtype=self.transformer.dtype
        )
        denoise = functools.partial(self._denoise, num_inference_steps=num_inference_steps,
                                    guidance_scale=guidance_scale, switch=switch)
        checking = check_memorization and self.reference is not None
        with _eval_mode(self.transformer, self.small_t_transformer):
            samples, report, num_resamples, early_ratio, steps_spent = self._sample(
                denoise, latents, labels, generator, checking, avoid_copies, max_resamples, copy_check_at)

        memorized = distance_ratio = nearest_index = finite = None
        if report is not None:
            memorized, distance_ratio = report.memorized.cpu(), report.distance_ratio.cpu()
            nearest_index, finite = report.nearest_index.cpu(), report.finite.cpu()

        score = score_memorized = None
        if score_method is not None:
            score, score_memorized = self._memorization_score(samples, labels if class_labels is not None else None,
                                                              score_method, score_generators,
                                                              memorization_score_kwargs or {})

        images = self._to_output(samples, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images, memorized, distance_ratio, nearest_index)
        return MemSepPipelineOutput(
            images=images, memorized=memorized, distance_ratio=distance_ratio, nearest_index=nearest_index,
            finite=finite, num_resamples=num_resamples, early_distance_ratio=early_ratio, denoising_steps=steps_spent,
            memorization_score=score, score_memorized=score_memorized,
        )

    def _memorization_score(self, samples: torch.Tensor, labels: torch.Tensor | None, method: str, generator,
                            options: dict):
        """The model-only score of ``samples`` (``[-1, 1]``) and its flags, as ``memorization_score`` gives them for
        the ``output_type="pt"`` images, so a user can recompute them from the output (see ``__call__``)."""
        result = memorization_score(self, self._to_output(samples, "pt"), class_labels=labels, method=method,
                                    generator=generator, **options)
        return result.score, result.memorized

    # --------------------------------------------------------------------------------- denoising and checks
    def _denoise(self, latents, labels, generator, num_inference_steps: int, guidance_scale: float, switch,
                 check_at: float | None = None, on_check=None):
        """THE denoising loop: the scheduler's steps from the noise ``latents`` with class ``labels`` (null class for
        unconditional rows), classifier-free guidance when ``guidance_scale > 1``, time routing below ``switch``.

        With ``on_check``, once a fraction ``check_at`` of the steps is done, ``on_check(pred_x0)`` gets the predicted
        clean latents of every row and returns which rows go on (a bool tensor); the others stop there, and the
        scheduler's per-sample state and the per-sample generators are cut down with them. Returns the final
        latents of the rows that went on and their positions in the input batch (None when all did).
        """
        device, channels = latents.device, self.transformer.config.in_channels
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        check_index = max(0, math.ceil(check_at * len(timesteps)) - 1) if on_check is not None else None
        latents = latents * self.scheduler.init_noise_sigma
        takes_generator = "generator" in inspect.signature(self.scheduler.step).parameters
        full_output = self.scheduler.config.get("variance_type") in ("learned", "learned_range")
        guided = guidance_scale > 1
        rows = None
        for index, t in enumerate(self.progress_bar(timesteps)):
            model = self.transformer
            if switch is not None and int(t) < switch:
                model = self.small_t_transformer
            model_labels = torch.cat([labels, torch.full_like(labels, self.null_class)]) if guided else labels
            model_input = torch.cat([latents, latents]) if guided else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            model_timesteps = torch.as_tensor(t, device=device).reshape(1).expand(model_input.shape[0])
            noise_pred = model(model_input, timestep=model_timesteps, class_labels=model_labels).sample
            # Learned-sigma DiTs output [eps, variance]; only eps is guided, the variance follows the class branch.
            eps, rest = noise_pred[:, :channels], noise_pred[:, channels:]
            if guided:
                eps_class, eps_null = eps.chunk(2)
                eps, rest = eps_null + guidance_scale * (eps_class - eps_null), rest.chunk(2)[0]
            model_output = torch.cat([eps, rest], 1) if full_output and rest.shape[1] else eps
            step_kwargs = {"generator": generator} if takes_generator else {}
            step = self.scheduler.step(model_output, t, latents, **step_kwargs)
            if index == check_index:
                keep = on_check(self._predicted_clean(step, eps, t, latents)).to(latents.device)
                if not keep.all():
                    _keep_scheduler_rows(self.scheduler, keep, latents.shape)
                    kept = keep.nonzero().flatten()
                    rows = kept if rows is None else rows[kept]
                    labels, generator = labels[keep], _generators_of(generator, kept)
                    latents = step.prev_sample[keep]
                    if not keep.any():
                        break
                    continue
            latents = step.prev_sample
        return latents, rows

    def _predicted_clean(self, step_output, eps: torch.Tensor, t, latents: torch.Tensor) -> torch.Tensor:
        """The scheduler's x0 prediction at ``t``, or, when its step output has none, the epsilon formula."""
        predicted = getattr(step_output, "pred_original_sample", None)
        if predicted is not None:
            return predicted
        alpha_bar = self.scheduler.alphas_cumprod.to(latents.device)[int(t)].to(latents.dtype)
        return (latents - (1 - alpha_bar).sqrt() * eps) / alpha_bar.sqrt()

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents (or pixel samples) -> images in the model's data range ``[-1, 1]``, float32."""
        if self.vae is not None and latents.shape[0]:
            latents = latents / self.vae.config.scaling_factor
            if getattr(self.vae.config, "shift_factor", None):
                latents = latents + self.vae.config.shift_factor
            latents = self.vae.decode(latents.to(self.vae.dtype)).sample
        return latents.float().clamp(-1, 1)  # the model's data range; the reference holds [-1, 1] images

    def detect_copies(self, images: torch.Tensor) -> MemorizationResult:
        """The copy detector behind the output flags and copy-free sampling: the paper's 1/3 rule of ``images``
        (``[B, C, H, W]`` in ``[-1, 1]``, pixel space) against ``reference``.

        This is the one place copies are decided: a detector that needs no reference can replace it here.
        """
        if self.reference is None:
            raise ValueError(
                "copy detection needs the training images: attach them with pipe.attach_reference(train_images), "
                "or `memsep reference --pipeline <folder> --train_data_dir <images>` for a saved pipeline."
            )
        reference = self.reference
        if not isinstance(reference, NearestNeighborIndex):
            # Only under stock diffusers loading the shipped code: the reference's class comes from its own copy
            # of this file, a different module; rebuild it with this module's class.
            reference = NearestNeighborIndex.from_images(reference.images)
        return memorization_report(images, reference)  # warns when some samples are not finite

    def _sample(self, denoise, noise, labels, generator, checking: bool, avoid_copies: bool, max_resamples: int,
                copy_check_at: float | None):
        """Passes of :meth:`_denoise`: the first over every sample, each next one (with ``avoid_copies``) over the
        samples to draw again (flagged at the early check or at the end, with redraws left), from fresh noise out of
        ``generator``. Plain sampling is the first pass alone.

        Returns the images in ``[-1, 1]``, the final :class:`MemorizationResult` of every sample (None without
        ``checking``), the redraws per sample (None without ``avoid_copies``) and the early distance ratio of the
        returned trajectories (None without ``copy_check_at``), and the sampler steps spent on each sample.
        """
        num_samples, device = noise.shape[0], noise.device
        images = torch.empty((num_samples, *self.image_shape), device=device)
        report = None
        if checking:
            report = MemorizationResult(memorized=torch.zeros(num_samples, dtype=torch.bool),
                                        distance_ratio=torch.full((num_samples,), math.nan),
                                        nearest_index=torch.full((num_samples,), -1, dtype=torch.long),
                                        nearest_distance=torch.full((num_samples,), math.nan),
                                        finite=torch.ones(num_samples, dtype=torch.bool))
        num_resamples = torch.zeros(num_samples, dtype=torch.long)
        steps_spent = torch.zeros(num_samples, dtype=torch.long)
        early_ratio = torch.full((num_samples,), math.nan) if copy_check_at is not None else None
        todo, latents = torch.arange(num_samples), noise
        while todo.numel():
            may_restart = torch.full((todo.numel(),), avoid_copies) & (num_resamples[todo] < max_resamples)

            def early_check(predicted, todo=todo, may_restart=may_restart):
                early = self.detect_copies(self._decode(predicted))
                early_ratio[todo] = early.distance_ratio.cpu()
                return ~(early.memorized.cpu() & may_restart)

            final, rows = denoise(latents, labels[todo.to(labels.device)], _generators_of(generator, todo),
                                  check_at=copy_check_at, on_check=early_check if copy_check_at is not None else None)
            went_on = torch.ones(todo.numel(), dtype=torch.bool)  # rows of this pass that reached the last step
            if rows is not None:
                went_on[:] = False
                went_on[rows.cpu()] = True
            # _denoise set the schedule: a full trajectory ran all of its steps, a stopped one those up to the check.
            schedule_length = len(self.scheduler.timesteps)
            steps_spent[todo[went_on]] += schedule_length
            if copy_check_at is not None:
                steps_spent[todo[~went_on]] += max(1, math.ceil(copy_check_at * schedule_length))
            finished, restart = todo[went_on], todo[~went_on]
            if finished.numel():
                images[finished.to(device)] = self._decode(final).to(device)
            if finished.numel() and checking:
                final_report = self.detect_copies(images[finished.to(device)])
                for name in ("memorized", "distance_ratio", "nearest_index", "nearest_distance", "finite"):
                    getattr(report, name)[finished] = getattr(final_report, name).cpu()
                copies = final_report.memorized.cpu() & may_restart[went_on]
                restart = torch.cat([restart, finished[copies]]).sort().values
            num_resamples[restart] += 1
            todo = restart
            if todo.numel():
                latents = randn_tensor((todo.numel(), *noise.shape[1:]), generator=_generators_of(generator, todo),
                                       device=device, dtype=noise.dtype)
        return images, report, num_resamples if avoid_copies else None, early_ratio, steps_spent

    def _check_copy_free_arguments(self, avoid_copies, max_resamples, copy_check_at, check_memorization) -> None:
        if not isinstance(avoid_copies, bool):
            raise ValueError(f"avoid_copies={avoid_copies!r}: pass True or False.")
        if isinstance(max_resamples, bool) or not isinstance(max_resamples, int) or max_resamples < 0:
            raise ValueError(f"max_resamples={max_resamples!r}: pass an integer >= 0 (redraws allowed per sample).")
        if copy_check_at is not None and (
            isinstance(copy_check_at, bool) or not isinstance(copy_check_at, numbers.Real)
            or not 0 < copy_check_at < 1
        ):
            raise ValueError(f"copy_check_at={copy_check_at!r}: pass a fraction of the denoising steps in (0, 1), "
                             "e.g. 0.5, or None (no early check).")
        if avoid_copies or copy_check_at is not None:
            what = "avoid_copies" if avoid_copies else "copy_check_at"
            if not check_memorization:
                raise ValueError(f"{what} checks samples for copies; it cannot run with check_memorization=False.")
            if self.reference is None:
                raise ValueError(
                    f"{what} needs the training images to recognise copies: attach them with "
                    "pipe.attach_reference(train_images), or `memsep reference --pipeline <folder> "
                    "--train_data_dir <images>` for a saved pipeline."
                )

    def training_images(self, indices: torch.Tensor | Sequence[int], output_type: str = "pil"):
        """The reference's training images at ``indices`` (e.g. ``output.nearest_index``), in the same format as the
        pipeline's output, to show each sample beside the image it is closest to."""
        if self.reference is None:
            raise ValueError(
                "This pipeline has no reference; add one with "
                "pipe.register_modules(reference=NearestNeighborIndex.from_images(train_images))."
            )
        indices = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
        if indices.numel() and (indices.min() < 0 or indices.max() >= self.reference.num_images):
            raise ValueError(f"indices must lie in [0, {self.reference.num_images - 1}].")
        return self._to_output(self.reference.images[indices.to(self.reference.images.device)], output_type)

    def _to_output(self, samples: torch.Tensor, output_type: str):
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type={output_type!r}: choose 'pil', 'np' or 'pt'.")
        images = (samples.float() / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return images
        images = images.cpu().permute(0, 2, 3, 1).numpy()
        return self.numpy_to_pil(images) if output_type == "pil" else images


def _push_refused(folder: str | os.PathLike, repo_id: str = "ID") -> str:
    # One push path, which uploads a folder already complete on disk: a failed push loses nothing.
    return (f"MemSepPipeline is pushed in a separate step: pipe.save_pretrained({str(folder)!r}), then "
            f"`memsep push {folder} --hub_model_id {repo_id}` or "
            f"diffusers_memsep.hub.push_folder_to_hub({str(folder)!r}, {repo_id!r}).")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0].strip() if text else type(error).__name__


def _load_failure_message(name: str | os.PathLike, error: OSError) -> str:
    """One line: what failed to load (with the underlying cause, e.g. a safetensors header error) and the fix."""
    detail, cause = _first_line(error), error
    while (cause.__cause__ or cause.__context__) is not None:  # the root cause, e.g. the safetensors header error
        cause = cause.__cause__ or cause.__context__
    if cause is not error and _first_line(cause) not in detail:
        detail += f" ({type(cause).__name__}: {_first_line(cause)})"
    if os.path.isdir(os.path.expanduser(os.fspath(name))):
        fix = "a file of the folder is damaged or incomplete; restore it or save the pipeline again (save_pretrained)"
    elif constants.HF_HUB_OFFLINE:
        fix = ("it is not in the local Hugging Face cache and HF_HUB_OFFLINE is set; download it once online, or "
               "pass a local pipeline folder")
    else:
        fix = "check the repo id (user/name), the connection and your access rights, or pass a local pipeline folder"
    return f"cannot load the pipeline {os.fspath(name)!r}: {detail}; {fix}."


def _score_method(pipe, option, class_labels, options: dict | None = None) -> str | None:
    """The method of ``__call__``'s ``memorization_score`` option (None: off), checked with its ``options``
    (``memorization_score_kwargs``) before any sampling."""
    if option is None or option is False:
        if options:
            raise ValueError("memorization_score_kwargs were given but memorization_score is off; pass "
                             "memorization_score=True (or a method name) with them.")
        return None
    method = "renoise" if option is True else option
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"memorization_score={option!r}: pass True (the default method 'renoise'), False, or a "
                         f"method name: {', '.join(METHODS)} (thresholds: {THRESHOLDS}).")
    if method == "cond_gap":
        if class_labels is None:
            raise ValueError("memorization_score='cond_gap' compares the class and null-class predictions: pass "
                             "class_labels, or use memorization_score='renoise' for unconditional samples.")
        pipe._check_null_class("memorization_score='cond_gap'")
    check_method_options(method, options or {})
    return method


def _generators_of(generator, rows: torch.Tensor):
    """The generators of ``rows``: a list of per-sample generators is cut down to them, a single one is shared."""
    return [generator[i] for i in rows.tolist()] if isinstance(generator, list) else generator


def _keep_scheduler_rows(scheduler, keep: torch.Tensor, batch_shape: torch.Size) -> None:
    """Cut the scheduler's per-sample state down to the ``keep`` rows: every tensor shaped like the batch of
    latents, alone or in a list (multistep solvers keep past model outputs, e.g. DPM-Solver's ``model_outputs``)."""

    def cut(value):
        return value[keep] if isinstance(value, torch.Tensor) and value.shape == batch_shape else value

    for name, value in list(vars(scheduler).items()):
        if isinstance(value, torch.Tensor):
            setattr(scheduler, name, cut(value))
        elif isinstance(value, list) and any(isinstance(item, torch.Tensor) for item in value):
            setattr(scheduler, name, [cut(item) for item in value])


@contextlib.contextmanager
def _eval_mode(*models):
    """Sample in eval mode (DiT drops labels at random in train mode) and restore each model's mode after."""
    models = [model for model in models if model is not None]
    modes = [model.training for model in models]
    try:
        for model in models:
            model.eval()
        yield
    finally:
        for model, mode in zip(models, modes):
            model.train(mode)
