"""dsm_loss against the paper's formula, the training loop (in memory, checkpoints, resume) and its input checks."""

import pytest
import torch

from diffusers_memsep.data import TrainingData, load_training_data
from diffusers_memsep.trainer import (
    TrainingConfig,
    dsm_loss,
    list_checkpoints,
    make_dit,
    make_noise_scheduler,
    resolve_checkpoint,
    train_dit,
)


def tiny_dit(num_classes=None, **kwargs):
    torch.manual_seed(0)
    return make_dit(num_classes=num_classes, num_layers=1, num_attention_heads=2, attention_head_dim=8, **kwargs)


def tiny_config(**kwargs):
    defaults = dict(max_train_steps=4, train_batch_size=8, lr_warmup_steps=1, show_progress=False, seed=0)
    defaults.update(kwargs)
    return TrainingConfig(**defaults)


@pytest.fixture(scope="module")
def digits():
    return load_training_data(max_train_samples=16, seed=0, label_column="label")


def test_make_dit_is_prunable_and_checks_patch():
    from diffusers_memsep import PrunableDiTTransformer2DModel

    model = tiny_dit()
    assert isinstance(model, PrunableDiTTransformer2DModel)
    assert model.config.num_embeds_ada_norm == 1 and model.config.in_channels == 1
    with pytest.raises(ValueError, match="patch size 3 does not divide the resolution 8"):
        make_dit(sample_size=8, patch_size=3)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_dsm_loss_matches_the_paper_formula(prediction_type, digits):
    """The loss is ||target - model(alpha x + sigma eps, t)||^2 averaged, with the paper's alpha_t, sigma_t."""
    model = tiny_dit(num_classes=10).eval()  # eval: no random label dropout, so both forwards see the same labels
    scheduler = make_noise_scheduler(prediction_type=prediction_type)
    x = digits.images[:4]
    t = torch.tensor([0, 10, 500, 999])
    eps = torch.randn_like(x)
    loss = dsm_loss(model, scheduler, x, digits.labels[:4], t, noise=eps)

    alpha = scheduler.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1)
    sigma = (1 - scheduler.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1)
    x_t = alpha * x + sigma * eps
    with torch.no_grad():
        out = model(x_t, timestep=t, class_labels=digits.labels[:4]).sample
    target = {"epsilon": eps, "v_prediction": alpha * eps - sigma * x, "sample": x}[prediction_type]
    assert torch.allclose(loss, ((out - target) ** 2).mean(), atol=1e-6)
    if prediction_type == "epsilon":
        # the paper's score loss l_t with s = -eps_theta / sigma_t is the epsilon loss divided by sigma_t^2
        score_target = -(x_t - alpha * x) / sigma**2
        score_model = -out / sigma
        paper_l_t = ((score_target - score_model) ** 2).flatten(1).mean(1)
        assert torch.allclose(paper_l_t * sigma.flatten() ** 2, ((out - eps) ** 2).flatten(1).mean(1), rtol=1e-4)


def test_dsm_loss_null_label_and_learned_sigma(digits):
    model = tiny_dit(learn_sigma=True).eval()
    assert model.config.out_channels == 2
    scheduler = make_noise_scheduler()
    x, t, eps = digits.images[:3], torch.tensor([1, 2, 3]), torch.randn(3, 1, 8, 8)
    loss = dsm_loss(model, scheduler, x, None, t, noise=eps)
    null = torch.full((3,), 1)
    with torch.no_grad():
        out = model(scheduler.add_noise(x, eps, t), timestep=t, class_labels=null).sample[:, :1]
    assert torch.allclose(loss, ((out - eps) ** 2).mean(), atol=1e-6)
    loss.backward()  # gradients flow into the model
    assert model.pos_embed.proj.weight.grad is not None


def test_training_lowers_the_loss_in_memory(digits):
    model = tiny_dit()
    data = TrainingData(digits.images, None, None, digits.source)
    result = train_dit(model, data, make_noise_scheduler(), tiny_config(max_train_steps=40, learning_rate=3e-3))
    assert result.model is model and result.steps == 40 and len(result.losses) == 40
    assert sum(result.losses[-10:]) < 0.6 * sum(result.losses[:10])
    assert result.ema_model is not None and result.ema_model is not model
    assert not torch.equal(result.ema_model.proj_out_2.weight, model.proj_out_2.weight)


def test_fine_tunes_a_pruned_model(digits):
    model = tiny_dit(num_classes=10)
    model.prune_heads({0: [1]})
    result = train_dit(model, digits, make_noise_scheduler(), tiny_config(max_train_steps=3, use_ema=False))
    assert result.ema_model is None and result.model.heads_per_layer() == [1]


def test_gradient_accumulation_and_validation_fn(digits):
    seen = []

    def validation(model, step):
        assert not model.training
        seen.append(step)
        return {"probe": 1.0}

    model = tiny_dit(num_classes=10)
    config = tiny_config(max_train_steps=4, gradient_accumulation_steps=2, validation_steps=2)
    result = train_dit(model, digits, make_noise_scheduler(), config, validation_fn=validation)
    assert seen == [2, 4] and result.steps == 4


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_resume_from_mid_run_checkpoint_matches_uninterrupted_run(tmp_path, digits):
    config = tiny_config(max_train_steps=6, checkpointing_steps=3, checkpoints_total_limit=1, random_flip=True)
    full = train_dit(tiny_dit(num_classes=10), digits, make_noise_scheduler(), config, output_dir=tmp_path / "a")
    # the total limit keeps only the newest checkpoint; save one mid-run copy from a run that stops at step 3
    first_half = train_dit(tiny_dit(num_classes=10), digits, make_noise_scheduler(),
                           tiny_config(max_train_steps=6, checkpointing_steps=3, random_flip=True),
                           output_dir=tmp_path / "b")
    assert [p.name for p in list_checkpoints(tmp_path / "a")] == ["checkpoint-6"]
    assert [p.name for p in list_checkpoints(tmp_path / "b")] == ["checkpoint-3", "checkpoint-6"]
    resumed = train_dit(tiny_dit(num_classes=10), digits, make_noise_scheduler(), config, output_dir=tmp_path / "c",
                        resume_from_checkpoint=tmp_path / "b" / "checkpoint-3")
    assert resumed.steps == 6 and len(resumed.losses) == 3
    for name, value in _weights(full.model).items():
        assert torch.equal(value, resumed.model.state_dict()[name]), name
        assert torch.equal(first_half.model.state_dict()[name], value), name
    for name, value in _weights(full.ema_model).items():
        assert torch.equal(value, resumed.ema_model.state_dict()[name]), name
    assert resumed.losses == full.losses[3:]


def test_checkpoints_open_with_from_pretrained_in_diffusers_layout(tmp_path, digits):
    from diffusers_memsep import PrunableDiTTransformer2DModel

    model = tiny_dit(num_classes=10)
    model.prune_heads({0: [1]})  # a pruned layout must survive the checkpoint too
    result = train_dit(model, digits, make_noise_scheduler(), tiny_config(max_train_steps=2, checkpointing_steps=2),
                       output_dir=tmp_path)
    checkpoint = tmp_path / "checkpoint-2"
    assert not (checkpoint / "model.safetensors").exists()  # written once, in the diffusers layout
    trained = PrunableDiTTransformer2DModel.from_pretrained(checkpoint / "transformer")
    ema = PrunableDiTTransformer2DModel.from_pretrained(checkpoint / "transformer_ema")
    assert trained.config.pruned_heads == {"0": [1]}
    for name, value in result.model.state_dict().items():
        assert torch.equal(trained.state_dict()[name], value), name
        assert torch.equal(ema.state_dict()[name], result.ema_model.state_dict()[name]), name
    assert not torch.equal(ema.state_dict()["proj_out_2.weight"], trained.state_dict()["proj_out_2.weight"])


def test_latest_ignores_an_interrupted_save(tmp_path, digits):
    train_dit(tiny_dit(), TrainingData(digits.images, None, None, "d"), make_noise_scheduler(),
              tiny_config(max_train_steps=2, checkpointing_steps=2), output_dir=tmp_path)
    # a kill during a save leaves only a temporary folder (and a partial folder without trainer_state.json)
    (tmp_path / ".checkpoint-4.tmp").mkdir()
    (tmp_path / "checkpoint-9").mkdir()
    assert resolve_checkpoint("latest", tmp_path).name == "checkpoint-2"
    assert resolve_checkpoint("latest", tmp_path / "nothing-here") is None


def test_bad_inputs_fail_before_any_step(tmp_path, digits):
    scheduler = make_noise_scheduler()
    with pytest.raises(ValueError, match="model has 1 classes"):
        train_dit(tiny_dit(), digits, scheduler, tiny_config())
    with pytest.raises(ValueError, match="sample_size"):
        train_dit(tiny_dit(sample_size=16), digits, scheduler, tiny_config())
    with pytest.raises(ValueError, match="does not exist"):
        train_dit(tiny_dit(num_classes=10), digits, scheduler, tiny_config(), output_dir=tmp_path,
                  resume_from_checkpoint=tmp_path / "checkpoint-77")
    (tmp_path / "not-a-checkpoint").mkdir()
    with pytest.raises(ValueError, match="not a training checkpoint"):
        train_dit(tiny_dit(num_classes=10), digits, scheduler, tiny_config(), output_dir=tmp_path,
                  resume_from_checkpoint=tmp_path / "not-a-checkpoint")
    with pytest.raises(ValueError, match="learning_rate"):
        TrainingConfig(learning_rate=0)
    with pytest.raises(ValueError, match="lr_scheduler"):
        TrainingConfig(lr_scheduler="warp")


def test_the_settings_around_the_run_are_checked_when_built():
    """OutputConfig, ValidationConfig, HubConfig: each bad value names its flag and the fix."""
    from diffusers_memsep.trainer import HubConfig, OutputConfig, ValidationConfig

    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="--validation_num_samples"):
            ValidationConfig(num_samples=bad)
    for bad in (0, -3, 2.0):
        with pytest.raises(ValueError, match="--validation_inference_steps"):
            ValidationConfig(inference_steps=bad)
    with pytest.raises(ValueError, match="--report_to none"):
        OutputConfig(report_to="mlflow")
    with pytest.raises(ValueError, match="--logging_dir logs"):
        OutputConfig(logging_dir="")
    with pytest.raises(ValueError, match="--hub_model_id"):
        HubConfig(push_to_hub=True, model_id=" ")
    assert ValidationConfig().num_samples == 64 and ValidationConfig().inference_steps is None
    assert OutputConfig(report_to=None).report_to is None and not HubConfig().push_to_hub
