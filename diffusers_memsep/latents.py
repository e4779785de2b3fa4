"""Training images -> VAE latents, encoded once and cached: the training data of a latent DiT (e.g. DiT-XL/2).

A latent DiT is trained, scored (Algorithm 2 of Ye et al. 2025) and fine-tuned on latents, while memorization and
quality are measured on decoded images in pixel space (see ``MemSepPipeline``). This module makes the latents.

Choices the paper leaves open (its experiments are in pixel space):

- Deterministic latents. Each image is encoded to the MEAN of the VAE's latent distribution, times
  ``vae.config.scaling_factor`` (after subtracting ``vae.config.shift_factor`` when the VAE has one), the inverse of
  what ``MemSepPipeline`` does before decoding. DiT's own training samples the latent distribution on every step;
  the mean is used here so the "training set" seen by the scores and the fine-tuning is one fixed set of ``n``
  points, as the paper's empirical score assumes, and so it can be cached.
- Cache. ``<cache_dir>/latents-<key>.safetensors`` with ``key`` = SHA-256 of the images' bytes (float32), the VAE's
  config and the VAE's weights: the same images through the same VAE are encoded once and reused by every method,
  eta and seed (and by later runs with the same ``cache_dir``); any change to the images or the VAE gives a new key.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .data import TrainingData, TrainingDataWithHeldOut
from .utils import atomic_path

__all__ = ["encode_images", "latent_cache_key", "latent_training_data"]


def latent_cache_key(images: torch.Tensor, vae) -> str:
    """SHA-256 (hex, 16 characters) of the images' content, the VAE's config and the VAE's weights."""
    digest = hashlib.sha256()
    digest.update(str(tuple(images.shape)).encode())
    digest.update(images.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    config = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
    digest.update(json.dumps(config, sort_keys=True, default=str).encode())
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


@torch.no_grad()
def encode_images(vae, images: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Latents ``(mean - shift_factor) * scaling_factor`` of ``images`` (``[n, C, H, W]`` in ``[-1, 1]``), float32 CPU.

    Raises ValueError when the images do not fit the VAE (channels, or a size the VAE cannot encode).
    """
    channels = vae.config.in_channels
    if images.ndim != 4 or images.shape[1] != channels:
        raise ValueError(f"the VAE encodes [n, {channels}, H, W] images, got shape {tuple(images.shape)}; load the "
                         f"training images with {channels} channels at the pipeline's output resolution.")
    scale = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    parameter = next(vae.parameters())
    was_training = vae.training
    vae.eval()
    try:
        chunks = []
        for start in range(0, images.shape[0], batch_size):
            batch = images[start:start + batch_size].to(parameter.device, parameter.dtype)
            mean = vae.encode(batch).latent_dist.mean
            chunks.append(((mean - shift) * scale).float().cpu())
    finally:
        vae.train(was_training)
    return torch.cat(chunks)


def latent_training_data(data: TrainingData, vae, cache_dir: str | os.PathLike | None = None) -> TrainingData:
    """``data`` with its images replaced by their latents (labels, classes, source and indices kept).

    With ``cache_dir`` the latents are read from / written to ``latents-<key>.safetensors`` there (see the module
    docstring). The result is what the trainer's ``train_dit`` and the head scores take for a latent DiT.
    """
    if isinstance(data, TrainingDataWithHeldOut) and data.held_out is not None:  # scored in the same space
        data = replace(data, held_out=latent_training_data(data.held_out, vae, cache_dir))
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"latents-{latent_cache_key(data.images, vae)}.safetensors"
        if path.is_file():
            return replace(data, images=load_file(str(path))["latents"])
    latents = encode_images(vae, data.images)
    if path is not None:
        with atomic_path(path) as temporary:
            save_file({"latents": latents.contiguous()}, str(temporary), metadata={"source": data.source})
    return replace(data, images=latents)
