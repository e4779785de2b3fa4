"""The denoising score-matching loss of the paper, line by line (as NVlabs/edm's ``training/loss.py`` does)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def model_config(model):
    """The diffusers config of ``model``, also when Accelerate wrapped it (DDP keeps the model in ``.module``)."""
    return getattr(model, "config", None) or getattr(getattr(model, "module", None), "config")


def null_class_labels(model, batch_size: int, device) -> torch.Tensor:
    """The null label ``num_embeds_ada_norm`` (DiT's ``LabelEmbedding`` reserves that row for it)."""
    return torch.full((batch_size,), int(model_config(model).num_embeds_ada_norm), dtype=torch.long, device=device)


def dsm_loss(model, noise_scheduler, clean_images: torch.Tensor, class_labels: torch.Tensor | None,
             timesteps: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
    """The ordinary denoising loss at the given timesteps (mean over batch and pixels).

    The paper (Ye et al. 2025, Section 2, the denoising score-matching loss) writes, for a training image ``x_i``
    and time ``t``::

        l_t(x_i, s) = E_{X_t | X_0 = x_i} || -(X_t - alpha_t x_i) / sigma_t^2 - s(X_t, t) ||^2

    Line by line, as computed below (``alpha_t^2 = alphas_cumprod[t]``, ``sigma_t^2 = 1 - alpha_t^2``):

    - ``X_t = alpha_t x_i + sigma_t eps``, ``eps ~ N(0, I)``                ->  ``noise_scheduler.add_noise``
    - the regression target ``-(X_t - alpha_t x_i) / sigma_t^2 = -eps / sigma_t``
    - the score is parameterised by a noise predictor, ``s(X_t, t) = -eps_theta(X_t, t) / sigma_t``, so
      ``l_t = || eps - eps_theta(X_t, t) ||^2 / sigma_t^2``, and the returned epsilon loss
      ``mean || eps - eps_theta ||^2`` is ``sigma_t^2 l_t / d`` (d = pixels): the paper's loss re-weighted by
      ``sigma_t^2`` (Ho et al.'s "simple" weighting), with the same minimiser at every t.
    - ``prediction_type="v_prediction"``: target ``v = alpha_t eps - sigma_t x_i`` (``get_velocity``);
      ``"sample"``: target ``x_i`` (the denoiser ``E[X_0 | X_t]``). Both are again affine reparameterisations of
      the same score, so the minimiser (the empirical score when trained to optimality) is unchanged.

    Args:
        model: a DiT (``DiTTransformer2DModel`` or subclass). With learned sigma (``out_channels = 2 in_channels``)
            only the first ``in_channels`` output channels (the mean) enter the loss.
        noise_scheduler: a diffusers scheduler with ``add_noise`` (and ``get_velocity`` for v-prediction); its
            ``config.prediction_type`` selects the target.
        clean_images: ``[b, C, H, W]`` in ``[-1, 1]``.
        class_labels: ``LongTensor[b]`` or None, meaning the null label ``model.config.num_embeds_ada_norm``.
        timesteps: ``LongTensor[b]`` of scheduler indices (passed in, so callers choose t: Algorithm 2 of the paper
            evaluates this loss at small t).
        noise: the ``eps`` to use (default fresh ``randn_like``).
    """
    if noise is None:
        noise = torch.randn_like(clean_images)
    if class_labels is None:
        class_labels = null_class_labels(model, clean_images.shape[0], clean_images.device)
    num_train_timesteps = int(noise_scheduler.config.num_train_timesteps)
    if timesteps.numel() and (int(timesteps.min()) < 0 or int(timesteps.max()) >= num_train_timesteps):
        raise ValueError(f"timesteps must be scheduler indices in [0, {num_train_timesteps - 1}], got the range "
                         f"[{int(timesteps.min())}, {int(timesteps.max())}].")
    timesteps = timesteps.to(clean_images.device)
    noisy_images = noise_scheduler.add_noise(clean_images, noise, timesteps)
    prediction = model(noisy_images, timestep=timesteps, class_labels=class_labels, return_dict=False)[0]
    prediction = prediction[:, : clean_images.shape[1]]  # learned sigma: the mean channels only
    prediction_type = noise_scheduler.config.prediction_type
    if prediction_type == "epsilon":
        target = noise
    elif prediction_type == "v_prediction":
        target = noise_scheduler.get_velocity(clean_images, noise, timesteps)
    elif prediction_type == "sample":
        target = clean_images
    else:
        raise ValueError(f"unsupported prediction_type {prediction_type!r}; use epsilon, v_prediction or sample.")
    # At least float32 (fp16/bf16 predictions are up-cast), never down-cast: a float64 model keeps a float64 loss.
    loss_dtype = torch.promote_types(prediction.dtype, torch.float32)
    return F.mse_loss(prediction.to(loss_dtype), target.to(loss_dtype))

