"""`memsep train` and the trainer API against bad input and faults: one clear line, exit code 2, nothing lost.

Each case of the table runs the real command in-process and asserts the message, the exit code and that every file
present before (the run folder AND its parent, where a sibling file stands) is byte-identical after.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffusers_memsep.cli import main
from diffusers_memsep.trainer import (
    NonFiniteLossError,
    TrainingConfig,
    dsm_loss,
    make_dit,
    make_noise_scheduler,
    train_dit,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--num_layers", "1", "--num_attention_heads", "2", "--attention_head_dim", "8", "--train_batch_size", "8",
        "--validation_num_samples", "4", "--validation_inference_steps", "4", "--no_progress", "--report_to", "none",
        "--max_train_samples", "8"]


def train(*argv):
    return main([*TINY, *map(str, argv)], command="train")


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 2-step run WITH checkpoints (at steps 1 and 2) and one WITHOUT any."""
    root = tmp_path_factory.mktemp("runs")
    assert train("--output_dir", root / "with_checkpoints", "--max_train_steps", "2", "--checkpointing_steps", "1",
                 "--checkpoints_total_limit", "3") == 0
    assert train("--output_dir", root / "without_checkpoints", "--max_train_steps", "2",
                 "--checkpointing_steps", "0") == 0
    return root


def _copy(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


# name -> (build the argv from (tmp_path, finished_run); the phrase the one-line error must hold)
CASES = {
    "logging_dir_parent": (lambda tmp, runs: ["--output_dir", _copy(runs / "without_checkpoints", tmp / "run"),
                                              "--overwrite_output_dir", "--logging_dir", ".."],
                           "logging_dir '..' must be a sub-folder inside output_dir"),
    "logging_dir_absolute": (lambda tmp, runs: ["--output_dir", _copy(runs / "without_checkpoints", tmp / "run"),
                                                "--overwrite_output_dir", "--logging_dir", str(tmp / "elsewhere")],
                             "must be a sub-folder inside output_dir"),
    "learning_rate_inf": (lambda tmp, runs: ["--output_dir", tmp / "run", "--learning_rate", "inf"],
                          "learning_rate must be a finite number"),
    "learning_rate_nan": (lambda tmp, runs: ["--output_dir", tmp / "run", "--learning_rate", "nan"],
                          "learning_rate must be a finite number"),
    "adam_epsilon_zero": (lambda tmp, runs: ["--output_dir", tmp / "run", "--adam_epsilon", "0"],
                          "adam_epsilon must be > 0"),
    "negative_nonfinite_budget": (lambda tmp, runs: ["--output_dir", tmp / "run", "--max_nonfinite_steps", "-1"],
                                  "max_nonfinite_steps must be an integer >= 0"),
    "latest_on_finished_run": (lambda tmp, runs: ["--output_dir", _copy(runs / "without_checkpoints", tmp / "run"),
                                                  "--resume_from_checkpoint", "latest"],
                               "holds no checkpoint to resume"),
    "resume_other_seed": (lambda tmp, runs: ["--output_dir", _copy(runs / "with_checkpoints", tmp / "run"),
                                             "--max_train_steps", "3", "--checkpointing_steps", "1",
                                             "--resume_from_checkpoint", "latest", "--seed", "1"],
                          "seed (checkpoint 0, now 1)"),
    "resume_other_subset": (lambda tmp, runs: ["--output_dir", _copy(runs / "with_checkpoints", tmp / "run"),
                                               "--max_train_steps", "3", "--resume_from_checkpoint", "latest",
                                               "--max_train_samples", "16"],
                            "num_train_images (checkpoint 8, now 16)"),
    "resume_other_architecture": (lambda tmp, runs: ["--output_dir", _copy(runs / "with_checkpoints", tmp / "run"),
                                                     "--max_train_steps", "3", "--resume_from_checkpoint", "latest",
                                                     "--num_layers", "2"],
                                  "model_config.num_layers (checkpoint 1, now 2)"),
    "resume_corrupt_checkpoint": (lambda tmp, runs: ["--output_dir", _corrupt(_copy(runs / "with_checkpoints",
                                                                                    tmp / "run")),
                                                     "--max_train_steps", "3", "--resume_from_checkpoint", "latest"],
                                  "cannot be loaded"),
    "ddpm_num_steps_zero": (lambda tmp, runs: ["--output_dir", tmp / "run", "--ddpm_num_steps", "0"],
                            "--ddpm_num_steps) must be an integer >= 2"),
    "ddpm_beta_schedule_unknown": (lambda tmp, runs: ["--output_dir", tmp / "run", "--ddpm_beta_schedule", "foo"],
                                   "--ddpm_beta_schedule) must be one of"),
    "validation_steps_beyond_schedule": (lambda tmp, runs: ["--output_dir", tmp / "run", "--ddpm_num_steps", "500",
                                                            "--validation_inference_steps", "1000"],
                                         "exceeds the 500 training timesteps"),
    "missing_model_config": (lambda tmp, runs: ["--output_dir", tmp / "run", "--model_config_name_or_path",
                                                str(tmp / "nowhere" / "config.json")],
                             "cannot read a DiT config"),
    "output_dir_is_a_file": (lambda tmp, runs: ["--output_dir", _file(tmp / "run")], "is a file"),
    "occupied_output_dir": (lambda tmp, runs: ["--output_dir", _copy(runs / "without_checkpoints", tmp / "run")],
                            "already holds another run"),
    # data loss: a checkpoint of ANOTHER folder never licenses writing over the run in --output_dir
    "resume_foreign_checkpoint_over_finished_run": (
        lambda tmp, runs: ["--output_dir", _copy(runs / "without_checkpoints", tmp / "run"), "--max_train_steps", "3",
                           "--resume_from_checkpoint", runs / "with_checkpoints" / "checkpoint-2", "--seed", "1"],
        "lies outside it, so its run would be written over this one"),
    "output_inside_training_images": (lambda tmp, runs: ["--output_dir", _images(tmp / "images") / "run",
                                                         "--train_data_dir", tmp / "images"],
                                      "lies inside the training images folder --train_data_dir"),
    "output_is_training_images": (lambda tmp, runs: ["--output_dir", _images(tmp / "images"),
                                                     "--train_data_dir", tmp / "images"],
                                  "is the training images folder"),
    "output_is_pretrained_pipeline": (lambda tmp, runs: ["--output_dir", _copy(runs / "without_checkpoints",
                                                                               tmp / "run"),
                                                         "--pretrained_model_name_or_path", tmp / "run",
                                                         "--overwrite_output_dir"],
                                      "is the input pipeline folder"),
    "second_writer_locked_out": (lambda tmp, runs: ["--output_dir", _locked(tmp / "run")],
                                 "is being written by process"),
    # a resume refuses every setting it cannot apply, naming it
    "resume_other_learning_rate": (lambda tmp, runs: [*_resume(tmp, runs), "--learning_rate", "1e-3"],
                                   "optimizer.learning_rate (checkpoint 0.0005, now 0.001)"),
    "resume_other_lr_scheduler": (lambda tmp, runs: [*_resume(tmp, runs), "--lr_scheduler", "cosine"],
                                  "optimizer.lr_scheduler (checkpoint 'constant_with_warmup', now 'cosine')"),
    "resume_other_warmup": (lambda tmp, runs: [*_resume(tmp, runs), "--lr_warmup_steps", "7"],
                            "optimizer.lr_warmup_steps (checkpoint 100, now 7)"),
    "resume_other_weight_decay": (lambda tmp, runs: [*_resume(tmp, runs), "--weight_decay", "0.1"],
                                  "optimizer.adam_weight_decay (checkpoint 0.0, now 0.1)"),
    "resume_other_ema_decay": (lambda tmp, runs: [*_resume(tmp, runs), "--ema_max_decay", "0.99"],
                               "optimizer.ema_max_decay (checkpoint 0.999, now 0.99)"),
    "resume_other_batch": (lambda tmp, runs: [*_resume(tmp, runs), "--train_batch_size", "4"],
                           "train_batch_size (checkpoint 8, now 4)"),
    # inputs checked before any work
    "one_training_image": (lambda tmp, runs: ["--output_dir", tmp / "run", "--max_train_samples", "1"],
                           "needs at least 2"),
    "one_image_in_the_folder": (lambda tmp, runs: ["--output_dir", tmp / "run", "--train_data_dir",
                                                   _images(tmp / "images", count=1), "--max_train_samples", "0"],
                                "holds 1 image"),
    "negative_seed": (lambda tmp, runs: ["--output_dir", tmp / "run", "--seed=-1"],
                      "--seed must be an integer in [0, 4294967295], got -1"),
    "resolution_2048": (lambda tmp, runs: ["--output_dir", tmp / "run", "--resolution", "2048"],
                        "--resolution 2048 is outside [1, 1024]"),
    "non_square_images": (lambda tmp, runs: ["--output_dir", tmp / "run", "--train_data_dir",
                                             _images(tmp / "images", size=(8, 12)), "--max_train_samples", "0"],
                          "not square; pass --resolution N"),
    "mixed_image_sizes": (lambda tmp, runs: ["--output_dir", tmp / "run", "--train_data_dir",
                                             _mixed(tmp / "images"), "--max_train_samples", "0"],
                          "pass --resolution N"),
    "corrupt_trainer_state": (lambda tmp, runs: ["--output_dir", _bad_state(_copy(runs / "with_checkpoints",
                                                                                  tmp / "run")),
                                                 "--max_train_steps", "3", "--resume_from_checkpoint", "latest"],
                              "trainer_state.json' is not a valid JSON file"),
    "pretrained_config_string_in_int_field": (lambda tmp, runs: ["--output_dir", tmp / "out",
                                                                 "--pretrained_model_name_or_path",
                                                                 _string_field(_copy(runs / "without_checkpoints",
                                                                                     tmp / "run"))],
                                              "num_layers is '1' (str) but must be a int"),
}


def _resume(tmp, runs):
    return ["--output_dir", _copy(runs / "with_checkpoints", tmp / "run"), "--max_train_steps", "3",
            "--checkpointing_steps", "1", "--resume_from_checkpoint", "latest"]


def _images(folder: Path, count=3, size=(8, 8)) -> Path:
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(np.full(size, 40 * i, dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def _mixed(folder: Path) -> Path:
    import numpy as np
    from PIL import Image

    _images(folder)
    Image.fromarray(np.zeros((12, 12), dtype=np.uint8)).save(folder / "big.png")
    return folder


def _locked(folder: Path) -> Path:
    import socket

    (folder.parent / f".{folder.name}.memsep.lock").write_text(
        json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "command": "memsep train"}))
    return folder


def _bad_state(run: Path) -> Path:
    latest = sorted(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
    (latest / "trainer_state.json").write_text('{"global_step": 2,')
    return run


def _string_field(run: Path) -> Path:
    config_path = run / "transformer" / "config.json"
    config = json.loads(config_path.read_text())
    config["num_layers"] = str(config["num_layers"])
    config_path.write_text(json.dumps(config))
    return run


def _corrupt(run: Path) -> Path:
    latest = sorted(run.glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[-1]
    weights = next(latest.rglob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])  # a truncated file, as a full disk leaves it
    return run


def _file(path: Path) -> Path:
    path.write_text("not a folder")
    return path


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_train_input_one_line_exit_2_nothing_lost(case, tmp_path, finished_run, capsys):
    (tmp_path / "sibling.txt").write_text("a file beside the run folder that must survive")
    build, phrase = CASES[case]
    argv = build(tmp_path, finished_run)
    before = snapshot(tmp_path)
    assert train(*argv) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("memsep: error: ") and phrase in error, error
    after = snapshot(tmp_path)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing present before changed or vanished
    assert not any(k.endswith("model_index.json") and k not in before for k in after)  # no pipeline written


def test_diverged_training_stops_with_an_error_and_saves_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    assert train("--output_dir", out, "--max_train_steps", "30", "--learning_rate", "1e6", "--max_grad_norm", "0",
                 "--lr_warmup_steps", "0", "--checkpointing_steps", "0") == 2
    error = capsys.readouterr().err
    assert "training diverged" in error and "Lower --learning_rate" in error
    assert not (out / "model_index.json").exists() and not (out / "README.md").exists()


def test_skipped_nonfinite_steps_are_counted_against_the_budget(digits_data):
    model = make_dit(num_layers=1, num_attention_heads=2, attention_head_dim=8)
    scheduler = make_noise_scheduler(100)
    with torch.no_grad():  # a NaN weight makes every loss NaN
        next(model.parameters()).fill_(float("nan"))
    config = TrainingConfig(max_train_steps=5, train_batch_size=4, max_nonfinite_steps=2, use_ema=False,
                            show_progress=False)
    with pytest.raises(NonFiniteLossError, match="non-finite steps: 3, allowed: 2"):
        train_dit(model, digits_data, scheduler, config)


def test_resume_that_lands_on_the_last_step_still_measures_memorization(tmp_path, finished_run):
    run = _copy(finished_run / "with_checkpoints", tmp_path / "run")
    (run / "README.md").unlink()
    assert train("--output_dir", run, "--max_train_steps", "2", "--checkpointing_steps", "1",
                 "--resume_from_checkpoint", "latest") == 0
    card = (run / "README.md").read_text()
    assert "memorization_ratio" in card


def test_several_processes_without_a_distributed_setup_are_refused(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert train("--output_dir", tmp_path / "run", "--max_train_steps", "1") == 2
    error = capsys.readouterr().err
    assert "2 processes were started" in error and "ACCELERATE_USE_CPU=true torchrun" in error
    assert not (tmp_path / "run" / "model_index.json").exists()


@pytest.mark.parametrize("timestep", [-1, 100])
def test_dsm_loss_refuses_timesteps_outside_the_schedule(timestep, digits_data):
    model = make_dit(num_layers=1, num_attention_heads=2, attention_head_dim=8)
    scheduler = make_noise_scheduler(100)
    images = digits_data.images[:2]
    with pytest.raises(ValueError, match=r"timesteps must be scheduler indices in \[0, 99\]"):
        dsm_loss(model, scheduler, images, None, torch.tensor([0, timestep]))


@pytest.fixture
def digits_data():
    from diffusers_memsep.data import load_training_data

    return load_training_data(max_train_samples=8, seed=0)


def test_two_process_data_parallel_training_equals_one_process_on_the_same_global_batch(tmp_path):
    """A real gloo run of 2 processes x batch 4 against 1 process x batch 8: the same weights (float tolerance)."""
    common = [*TINY, "--max_train_steps", "3", "--checkpointing_steps", "0", "--validation_num_samples", "0",
              "--lr_warmup_steps", "0"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    script = str(ROOT / "training" / "train_dit.py")
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                          "--master_port", "29517", script, *common, "--train_batch_size", "4",
                          "--output_dir", str(tmp_path / "two")], env=env, capture_output=True, text=True,
                         timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    assert two.stdout.count("Saved a MemSepPipeline") == 1  # only the main process reports
    one = subprocess.run([sys.executable, script, *common, "--train_batch_size", "8",
                          "--output_dir", str(tmp_path / "one")], env=env, capture_output=True, text=True,
                         timeout=600)
    assert one.returncode == 0, one.stderr[-3000:]
    weights = [load_file(str(tmp_path / run / "transformer" / "diffusion_pytorch_model.safetensors"))
               for run in ("one", "two")]
    assert weights[0].keys() == weights[1].keys()
    torch.manual_seed(0)  # the initial weights of both runs (memsep train seeds them with --seed)
    initial = make_dit(num_layers=1, num_attention_heads=2, attention_head_dim=8).state_dict()
    moved = 0
    for name in weights[0]:
        torch.testing.assert_close(weights[1][name], weights[0][name], rtol=1e-4, atol=1e-5)
        moved += int(not torch.equal(weights[0][name], initial[name]))
    assert moved > 0  # training changed the weights, so the comparison is not between two untouched copies
    assert json.loads((tmp_path / "two" / "model_index.json").read_text())["_class_name"] == "MemSepPipeline"


# ------------------------------------------------------------------------------------------------------- more cases
def _full_disk_safetensors(monkeypatch):
    """A full disk as safetensors reports it: SafetensorError (not an OSError) from save_file."""
    import safetensors.torch
    from safetensors import SafetensorError

    def save_file(*args, **kwargs):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space '
                              'left on device" })')

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)


@pytest.mark.parametrize("checkpointing_steps", ["0", "1"])  # the pipeline save / the checkpoint save fails
def test_full_disk_during_train_ends_in_one_line_and_leaves_no_hidden_folder(checkpointing_steps, tmp_path,
                                                                             monkeypatch, capsys):
    _full_disk_safetensors(monkeypatch)
    out = tmp_path / "run"
    assert train("--output_dir", out, "--max_train_steps", "1", "--checkpointing_steps", checkpointing_steps) == 2
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "No space left on device" in errors[0] and "free disk space" in errors[0], stderr
    assert "Traceback" not in stderr
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]  # no .pipeline.tmp / .checkpoint-1.tmp
    assert not (out / "model_index.json").exists() and not list(out.glob("checkpoint-*"))
    assert not list(tmp_path.glob(".*.memsep.lock"))  # the lock is released on errors too


def test_stale_lock_of_a_dead_process_is_taken_over_with_a_note(tmp_path, capsys):
    import socket

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    lock = tmp_path / ".run.memsep.lock"
    lock.write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname(), "command": "memsep train"}))
    assert train("--output_dir", tmp_path / "run", "--max_train_steps", "1", "--checkpointing_steps", "0",
                 "--validation_num_samples", "0") == 0
    stderr = capsys.readouterr().err
    assert "memsep: note: taking over the lock" in stderr and f"process {int(dead.stdout)}" in stderr
    assert not lock.exists()  # released at the end
    assert (tmp_path / "run" / "model_index.json").is_file()


def test_lock_of_another_host_is_refused_and_kept(tmp_path, capsys):
    lock = tmp_path / ".run.memsep.lock"
    lock.write_text(json.dumps({"pid": 1, "host": "another-machine", "command": "memsep train"}))
    assert train("--output_dir", tmp_path / "run", "--max_train_steps", "1") == 2
    assert "is being written by process 1 on 'another-machine'" in capsys.readouterr().err
    assert lock.exists() and not (tmp_path / "run").exists()  # nothing created, nothing removed


def test_card_says_how_to_rebuild_the_reference(finished_run):
    card = (finished_run / "without_checkpoints" / "README.md").read_text()
    assert "## Training-set reference (private by default)" in card and "--push_reference" in card
    assert "memsep reference --pipeline" in card and "--embedded_digits --max_train_samples 8 --data_seed 0" in card
    assert "Subset: the 8 images at positions" in card


def test_resume_of_a_checkpoint_without_the_optimizer_record_compares_its_config(tmp_path, finished_run, capsys):
    """Checkpoints written before the optimizer settings entered the run record: their saved config is used."""
    run = _copy(finished_run / "with_checkpoints", tmp_path / "run")
    for state_file in run.glob("checkpoint-*/trainer_state.json"):
        state = json.loads(state_file.read_text())
        state["run"].pop("optimizer", None)
        state_file.write_text(json.dumps(state))
    assert train("--output_dir", run, "--max_train_steps", "3", "--resume_from_checkpoint", "latest",
                 "--learning_rate", "1e-3") == 2
    assert "optimizer.learning_rate (checkpoint 0.0005, now 0.001)" in capsys.readouterr().err


def test_data_fingerprint_is_the_content_not_the_path(tmp_path):
    from diffusers_memsep.data import load_training_data
    from diffusers_memsep.utils import data_fingerprint

    folder = tmp_path / "images"
    first = data_fingerprint(load_training_data(train_data_dir=_images(folder)))
    assert data_fingerprint(load_training_data(train_data_dir=folder)) == first  # same images: same fingerprint
    import numpy as np
    from PIL import Image

    Image.fromarray(np.full((8, 8), 7, dtype=np.uint8)).save(folder / "1.png")  # same names, same count
    assert data_fingerprint(load_training_data(train_data_dir=folder)) != first


def test_negative_value_as_a_separate_token_says_to_use_equals(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_:
        train("--output_dir", tmp_path / "run", "--learning_rate", "-1e-3")
    assert exit_.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "write --learning_rate=-1e-3" in errors[0]
    assert not (tmp_path / "run").exists()


def test_foreign_checkpoint_with_overwrite_replaces_the_run_and_its_checkpoints(tmp_path, finished_run):
    """Data loss, the allowed way: --overwrite_output_dir replaces B's run, and B's old checkpoints (another run's)
    are removed, so a later 'latest' can never resume them as this run's."""
    target = _copy(finished_run / "with_checkpoints", tmp_path / "B")
    old = {p.name: p.joinpath("trainer_state.json").read_bytes() for p in target.glob("checkpoint-*")}
    assert old
    source = finished_run / "with_checkpoints" / "checkpoint-1"
    before = snapshot(finished_run / "with_checkpoints")
    assert train("--output_dir", target, "--max_train_steps", "2", "--checkpointing_steps", "0",
                 "--resume_from_checkpoint", source, "--overwrite_output_dir") == 0
    assert not list(target.glob("checkpoint-*"))  # the run that was there is gone with its checkpoints
    assert (target / "model_index.json").is_file()
    assert snapshot(finished_run / "with_checkpoints") == before  # the source run is only read


def test_two_train_runs_into_one_empty_folder_second_is_refused(tmp_path, capsys):
    """Two `memsep train` runs into one empty folder: the second is refused
    while the first runs; after the first is killed its lock is stale and is taken over."""
    import time

    out = tmp_path / "run"
    out.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    first = subprocess.Popen([sys.executable, "-m", "diffusers_memsep.cli", "train", *TINY, "--output_dir", str(out),
                              "--max_train_steps", "100000", "--checkpointing_steps", "0",
                              "--validation_num_samples", "0"], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lock = tmp_path / ".run.memsep.lock"
    try:
        deadline = time.time() + 300
        while not lock.exists() and time.time() < deadline and first.poll() is None:
            time.sleep(0.2)
        assert lock.exists(), "the first run never took the lock"
        assert train("--output_dir", out, "--max_train_steps", "1") == 2
        assert f"is being written by process {first.pid}" in capsys.readouterr().err
    finally:
        first.kill()
        first.wait()
    assert lock.exists()  # killed: the lock stays, stale
    assert train("--output_dir", out, "--max_train_steps", "1", "--checkpointing_steps", "0",
                 "--validation_num_samples", "0") == 0
    assert "taking over the lock" in capsys.readouterr().err and not lock.exists()
