"""Model and scheduler factories: the DiT the trainer builds, its DDPM training scheduler, and reading a DiT config."""

from __future__ import annotations

import json
import os
from pathlib import Path

from diffusers import DDPMScheduler

from ..models import PrunableDiTTransformer2DModel

#: The beta schedules ``diffusers.DDPMScheduler`` implements.
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")


def make_dit(
    sample_size: int = 8,
    in_channels: int = 1,
    num_classes: int | None = None,
    num_layers: int = 4,
    num_attention_heads: int = 4,
    attention_head_dim: int = 32,
    patch_size: int = 2,
    learn_sigma: bool = False,
):
    """A ``PrunableDiTTransformer2DModel`` for ``sample_size x sample_size`` images with ``in_channels`` channels.

    The defaults are the documented setting for the embedded 8x8 digits (4 layers, 4 heads of 32, patch 2,
    1.42M parameters; ``docs/results.md`` says how fast it memorizes). ``num_classes=None`` builds an
    unconditional model: one placeholder class (index 0, never used) and the null label 1, the only one trained.
    ``learn_sigma=True`` doubles the output channels as DiT does; only the first ``in_channels`` are trained by
    :func:`dsm_loss` (DDPM with fixed variances does not use the rest).
    """
    for name, value in (("sample_size", sample_size), ("in_channels", in_channels), ("num_layers", num_layers),
                        ("num_attention_heads", num_attention_heads), ("attention_head_dim", attention_head_dim),
                        ("patch_size", patch_size)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")
    if sample_size % patch_size:
        raise ValueError(
            f"patch size {patch_size} does not divide the resolution {sample_size}; choose a patch size that "
            f"divides it (e.g. {', '.join(str(p) for p in range(1, sample_size + 1) if sample_size % p == 0)}) "
            "or change the resolution."
        )
    if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
        raise ValueError(f"num_classes must be a positive integer or None (unconditional), got {num_classes!r}.")
    return PrunableDiTTransformer2DModel(
        num_attention_heads=num_attention_heads,
        attention_head_dim=attention_head_dim,
        in_channels=in_channels,
        out_channels=2 * in_channels if learn_sigma else in_channels,
        num_layers=num_layers,
        sample_size=sample_size,
        patch_size=patch_size,
        num_embeds_ada_norm=num_classes if num_classes is not None else 1,
    )


def make_noise_scheduler(num_train_timesteps: int = 1000, beta_schedule: str = "linear",
                         prediction_type: str = "epsilon"):
    """The DDPM training scheduler (``diffusers.DDPMScheduler``) with the given discretisation."""
    if not isinstance(num_train_timesteps, int) or num_train_timesteps < 2:
        raise ValueError(
            f"num_train_timesteps (--ddpm_num_steps) must be an integer >= 2, got {num_train_timesteps!r}."
        )
    if beta_schedule not in BETA_SCHEDULES:
        raise ValueError(
            f"beta_schedule (--ddpm_beta_schedule) must be one of {BETA_SCHEDULES}, got {beta_schedule!r}."
        )
    if prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(f"prediction_type must be 'epsilon', 'v_prediction' or 'sample', got {prediction_type!r}.")
    return DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule,
                         prediction_type=prediction_type)


def load_dit_config(name_or_path: str | os.PathLike) -> dict:
    """A DiT config from ``config.json``, its folder, a pipeline folder (``transformer/``), or a Hub id."""
    path = Path(name_or_path)
    try:
        if path.is_file():
            return json.loads(path.read_text())
        if path.is_dir() and (path / "transformer" / "config.json").is_file():
            return PrunableDiTTransformer2DModel.load_config(str(path), subfolder="transformer")
        if path.is_dir() and not (path / "config.json").is_file():
            raise ValueError(f"{str(path)!r} holds no config.json (nor transformer/config.json); pass a DiT config.")
        return PrunableDiTTransformer2DModel.load_config(str(name_or_path))
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(
            f"cannot read a DiT config from {str(name_or_path)!r} ({str(error).splitlines()[0]}); pass "
            "an existing config.json, its folder, a pipeline folder, or a Hub id in the local cache."
        ) from None
