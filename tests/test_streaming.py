"""Streaming data: batches decoded on the fly by DataLoader workers train exactly as the in-memory path does.

The data are a second setting, not the digits: 16x16 RGB images written as PNG files in code.
"""

import pytest
import torch

from diffusers_memsep.data import StreamingTrainingData, TrainingData, all_images, load_training_data
from diffusers_memsep.trainer import TrainingConfig, make_dit, make_noise_scheduler, train_dit

from conftest import write_random_images


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    return write_random_images(tmp_path_factory.mktemp("rgb16"), 24, 16, seed=3)


def _model():
    torch.manual_seed(0)
    return make_dit(sample_size=16, in_channels=3, num_layers=1, num_attention_heads=2, attention_head_dim=8,
                    patch_size=4)


def _config(**overrides):
    values = dict(max_train_steps=4, train_batch_size=5, random_flip=True, show_progress=False, lr_warmup_steps=0)
    values.update(overrides)
    return TrainingConfig(**values)


def test_streamed_set_holds_the_same_images_as_the_in_memory_one(image_folder):
    memory = load_training_data(train_data_dir=image_folder, max_train_samples=12, seed=1)
    stream = load_training_data(train_data_dir=image_folder, max_train_samples=12, seed=1, streaming=True)
    assert isinstance(memory, TrainingData) and isinstance(stream, StreamingTrainingData)
    assert (len(stream), stream.resolution, stream.num_channels) == (12, 16, 3) and stream.indices == memory.indices
    assert torch.equal(all_images(stream), memory.images)
    positions = torch.tensor([7, 0, 11])
    assert torch.equal(stream.load(positions), memory.images[positions])


@pytest.mark.parametrize("workers", [0, 2])
def test_streaming_training_is_bit_identical_to_in_memory_training(image_folder, workers):
    memory = load_training_data(train_data_dir=image_folder, max_train_samples=12, seed=1)
    stream = load_training_data(train_data_dir=image_folder, max_train_samples=12, seed=1, streaming=True)
    scheduler = make_noise_scheduler(100)
    expected = train_dit(_model(), memory, scheduler, _config())
    streamed = train_dit(_model(), stream, scheduler, _config(dataloader_num_workers=workers))
    assert streamed.losses == expected.losses
    for name, value in expected.model.state_dict().items():
        assert torch.equal(streamed.model.state_dict()[name], value), name


def test_streaming_resume_is_bit_identical(image_folder, tmp_path):
    stream = load_training_data(train_data_dir=image_folder, max_train_samples=12, seed=1, streaming=True)
    scheduler = make_noise_scheduler(100)
    full = train_dit(_model(), stream, scheduler, _config(max_train_steps=6))
    train_dit(_model(), stream, scheduler, _config(max_train_steps=3, checkpointing_steps=3), output_dir=tmp_path)
    resumed = train_dit(_model(), stream, scheduler, _config(max_train_steps=6), output_dir=tmp_path,
                        resume_from_checkpoint="latest")
    assert resumed.losses == full.losses[3:]
    for name, value in full.ema_model.state_dict().items():
        assert torch.equal(resumed.ema_model.state_dict()[name], value), name


def test_memsep_train_streaming_writes_a_pipeline_with_the_full_reference(image_folder, tmp_path):
    from diffusers_memsep import MemSepPipeline
    from diffusers_memsep.cli import main

    out = tmp_path / "run"
    assert main(["--train_data_dir", str(image_folder), "--streaming", "--dataloader_num_workers", "1",
                 "--max_train_samples", "0", "--num_layers", "1", "--num_attention_heads", "2",
                 "--attention_head_dim", "8", "--patch_size", "4", "--train_batch_size", "8", "--max_train_steps",
                 "2", "--validation_num_samples", "2", "--validation_inference_steps", "2", "--report_to", "none",
                 "--no_progress", "--output_dir", str(out)], command="train") == 0
    pipe = MemSepPipeline.from_pretrained(out)
    memory = load_training_data(train_data_dir=image_folder)
    assert pipe.reference.num_images == 24
    assert torch.equal(pipe.reference.images.reshape(24, 3, 16, 16).cpu(), memory.images)
