"""Bad input, table-driven: every case must fail with one clear line (CLI: ``memsep: error: ...``, exit code 2; API:
an exception naming the problem) and leave every file that was there before byte-identical, with no new file.

Read-only folders: the tests may run as root, for whom ``chmod`` does not stop writes, so a read-only folder is
emulated by making the write probe fail with ``PermissionError`` (monkeypatch), and a folder that cannot be created
by a file in its place.
"""

from __future__ import annotations

import errno
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from PIL import Image

import diffusers_memsep.utils
from diffusers_memsep import MemSepPipeline, NearestNeighborIndex, PrunableDiTTransformer2DModel
from diffusers_memsep.cli import main
from diffusers_memsep.data import load_training_data
from diffusers_memsep.memorization import memorization_ratio, memorization_report, precision_recall
from diffusers_memsep.pruning import one_shot_prune
from diffusers_memsep.pruning.prune import head_importance
from diffusers_memsep.study import PruningStudyConfig, StudyConfig, StudySetting, prune_pipeline, quick_config
from diffusers_memsep.study.bases import base_dir, prepare_base_model

from conftest import tiny_dit

QUICK_PRUNE = ["--seeds", "0", "--finetune_steps", "2", "--finetune_batch_size", "8", "--importance_batches", "1",
               "--importance_batch_size", "8", "--num_samples", "16", "--num_inference_steps", "2",
               "--methods", "random", "--etas", "0.5"]


def tiny_transformer() -> PrunableDiTTransformer2DModel:
    return PrunableDiTTransformer2DModel.from_dit(tiny_dit(learned_sigma=False))


def tiny_pipeline() -> MemSepPipeline:
    images = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    reference = NearestNeighborIndex.from_images(images)
    pipe = MemSepPipeline(transformer=tiny_transformer(), scheduler=DDPMScheduler(num_train_timesteps=100),
                          reference=reference, label_dropout_prob=1.0)  # unconditional: the reference is the data
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("saved") / "pipe"
    tiny_pipeline().save_pretrained(folder)
    return folder


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def write_png(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)
    return path


def digit_images(folder: Path, count=3, size=8) -> Path:
    for i in range(count):
        write_png(folder / f"{i}.png", np.full((size, size), 40 * i, dtype=np.uint8))
    return folder


def deny_writes(monkeypatch):
    """Emulate a read-only folder: the write probe of check_writable_dir is refused (see the module docstring)."""
    def refuse(path, mode="r", *args, **kwargs):
        if "x" in mode or "w" in mode:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(diffusers_memsep.utils, "open", refuse, raising=False)


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device", "diffusion_pytorch_model.safetensors")


# --------------------------------------------------------------------------------------------------- the commands
# Each case: (setup(tmp, pipe, monkeypatch) -> argv, a phrase the one-line error must contain).
# `pipe` is a private copy of a tiny saved MemSepPipeline inside `tmp`, so cases may damage it.

def _earlier_study(out: Path) -> Path:
    """An output folder holding an earlier study (and a file of someone else that must survive)."""
    (out / "variants" / "small_t-eta0.1").mkdir(parents=True)
    (out / "variants" / "small_t-eta0.1" / "model_index.json").write_text("{}")
    (out / "report.md").write_text("# earlier study\n")
    (out / "runs.csv").write_text("method\noriginal\n")
    return out


def _corrupt_model_index(tmp, pipe, mp):
    (pipe / "model_index.json").write_text('{"_class_name": ')
    return ["prune", "--pipeline", str(pipe), "--output_dir", str(tmp / "out")]


def _truncated_weights(tmp, pipe, mp):
    weights = pipe / "transformer" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    return ["prune", "--pipeline", str(pipe), "--output_dir", str(tmp / "out")]


def _config_edit(delta):
    def setup(tmp, pipe, mp):
        config_path = pipe / "transformer" / "config.json"
        config = json.loads(config_path.read_text())
        config["num_layers"] += delta
        config_path.write_text(json.dumps(config))
        return ["prune", "--pipeline", str(pipe), "--output_dir", str(tmp / "out")]
    return setup


def _offline_hub_id(tmp, pipe, mp):
    import huggingface_hub.constants

    mp.setenv("HF_HUB_OFFLINE", "1")
    mp.setenv("HF_HUB_CACHE", str(tmp / "empty_cache"))
    mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return ["prune", "--pipeline", "nobody-memsep/not-a-cached-model", "--output_dir", str(tmp / "out")]


def _read_only(command):
    def setup(tmp, pipe, mp):
        deny_writes(mp)
        extra = ["--pipeline", str(pipe)] if command == "prune" else []
        return [command, *extra, "--output_dir", str(tmp / "out")]
    return setup


def _output_is_a_file(command, below=False):
    def setup(tmp, pipe, mp):
        (tmp / "taken").write_text("not a folder")
        out = tmp / "taken" / "sub" if below else tmp / "taken"
        extra = ["--pipeline", str(pipe)] if command == "prune" else []
        return [command, *extra, "--output_dir", str(out)]
    return setup


def _images_setup(make):
    def setup(tmp, pipe, mp):
        folder = make(tmp / "images")
        return ["prune", "--pipeline", str(pipe), "--output_dir", str(tmp / "out"), "--train_data_dir", str(folder)]
    return setup


def _truncated_png(folder):
    digit_images(folder)
    data = (folder / "1.png").read_bytes()
    (folder / "1.png").write_bytes(data[: len(data) // 2])
    return folder


def _mixed_sizes(folder):
    digit_images(folder, count=2, size=8)
    write_png(folder / "big.png", np.zeros((12, 12), dtype=np.uint8))
    return folder


def _empty(folder):
    folder.mkdir()
    (folder / "notes.txt").write_text("no images here")
    return folder


def _disk_full_while_overwriting(tmp, pipe, mp):
    """--overwrite_output_dir over an earlier study, and the disk fills up while the variants are saved: the earlier
    study must be left exactly as it was (the variants are staged beside it and swapped in at the end)."""
    _earlier_study(tmp / "out")
    mp.setattr(MemSepPipeline, "save_pretrained", disk_full)
    return ["prune", "--pipeline", str(pipe), "--output_dir", str(tmp / "out"), "--overwrite_output_dir",
            *QUICK_PRUNE]


def _safetensors_disk_full(tmp, pipe, mp):
    """A full disk as safetensors reports it (SafetensorError, not an OSError) while the variants are saved."""
    import safetensors.torch
    from safetensors import SafetensorError

    def save_file(*args, **kwargs):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No '
                              'space left on device" })')

    _earlier_study(tmp / "out")
    mp.setattr(safetensors.torch, "save_file", save_file)
    return ["prune", "--pipeline", str(pipe), "--output_dir", str(tmp / "out"), "--overwrite_output_dir",
            *QUICK_PRUNE]


def _disk_full_loss_gap(tmp, pipe, mp):
    import diffusers_memsep.commands.loss_gap

    mp.setattr(diffusers_memsep.commands.loss_gap, "write_loss_gap_csv", disk_full)
    return ["loss-gap", "--output_dir", str(tmp / "out"), "--dim", "2", "--num_components", "2", "--n_values", "10",
            "--num_times", "2", "--num_noise_samples", "8", "--no_fisher"]


# --------------------------------------------------------------- general rules, configs, no-op flags
def _config_set(**values):
    """Edit transformer/config.json of the pipeline (hand-edited configs that contradict the weights)."""
    def setup(tmp, pipe, mp):
        config_path = pipe / "transformer" / "config.json"
        config = json.loads(config_path.read_text())
        config.update(values)
        config_path.write_text(json.dumps(config))
        return ["prune", "--pipeline", str(pipe), "--output_dir", str(tmp / "out")]
    return setup


def _scheduler_set(pipe, **values):
    path = pipe / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **values}))


def _model_index_not_an_object(tmp, pipe, mp):
    (pipe / "model_index.json").write_text("[1, 2]")
    return ["prune", "--pipeline", str(pipe), "--output_dir", str(tmp / "out")]


def _scheduler_config_corrupt(tmp, pipe, mp):
    (pipe / "scheduler" / "scheduler_config.json").write_text('{"num_train_timesteps": 100,')
    return ["prune", "--pipeline", str(pipe), "--output_dir", str(tmp / "out")]


def _output_inside_images(command, equal=False):
    def setup(tmp, pipe, mp):
        folder = digit_images(tmp / "images")
        out = folder if equal else folder / "run"
        extra = ["--pipeline", str(pipe)] if command in ("prune", "reference") else []
        return [command, *extra, "--output_dir", str(out), "--train_data_dir", str(folder)]
    return setup


def _locked(command):
    """Another live process (here: this one, as far as the lock can tell) is writing the output folder."""
    def setup(tmp, pipe, mp):
        import os
        import socket

        (tmp / ".out.memsep.lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                                          "command": "memsep train"}))
        extra = ["--pipeline", str(pipe), "--embedded_digits"] if command in ("prune", "reference") else []
        return [command, *extra, "--output_dir", str(tmp / "out")]
    return setup


def _study(*flags):
    return lambda tmp, pipe, mp: ["study", "--output_dir", str(tmp / "out"), "--quick", *flags]


def _prune(*flags, out="out"):
    return lambda tmp, pipe, mp: ["prune", "--pipeline", str(pipe), "--output_dir", str(tmp / out), *flags]


def _plain(command, *flags):
    return lambda tmp, pipe, mp: [command, "--output_dir", str(tmp / "out"), *flags]


# ------------------------------------------------------------- the reliability checks wired into the engine
def _random_images(folder: Path, count=12, seed=0) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(count, 8, 8), dtype=np.uint8)
    for index, image in enumerate(pixels):
        write_png(folder / f"{index:02d}.png", image)
    return folder


#: A study of one image folder, as small as the CLI allows (one run, 4 base training steps).
TINY_FOLDER_STUDY = ["--quick", "--settings", "--num_train_samples", "4", "--max_runs", "1", "--base_train_steps", "4",
                     "--checkpoint_every", "2", "--finetune_steps", "1", "--seeds", "0", "--methods", "random"]


def _study_over_replaced_images(tmp, pipe, mp):
    """A study ran one run on --train_data_dir; then its images are replaced (same names, same count, other
    pixels): resuming it is refused before any training or caching."""
    images = _random_images(tmp / "images")
    argv = ["study", "--output_dir", str(tmp / "out"), "--train_data_dir", str(images), *TINY_FOLDER_STUDY]
    assert main(argv) == 0
    _random_images(images, seed=1)
    return argv


def _study_json(text):
    def setup(tmp, pipe, mp):
        (tmp / "out").mkdir()
        (tmp / "out" / "study.json").write_text(text)
        return _study("--settings", "digits8")(tmp, pipe, mp)
    return setup


def _link_outside(name):
    """``<output_dir>/<name>`` is a link to a folder outside it: nothing may be written through it."""
    def setup(tmp, pipe, mp):
        (tmp / "elsewhere").mkdir()
        (tmp / "out").mkdir()
        (tmp / "out" / name).symlink_to(tmp / "elsewhere", target_is_directory=True)
        return _study("--settings", "digits8")(tmp, pipe, mp)
    return setup


COMMAND_CASES = {
    # output folders (checked before the pipeline is even loaded)
    "prune-output-is-a-file": (_output_is_a_file("prune"), "is a file"),
    "prune-output-below-a-file": (_output_is_a_file("prune", below=True), "is a file"),
    "prune-output-read-only": (_read_only("prune"), "not writable"),
    "prune-output-is-the-pipeline": (lambda tmp, pipe, mp: ["prune", "--pipeline", str(pipe), "--output_dir",
                                                            str(pipe)], "input pipeline folder"),
    "prune-output-inside-the-pipeline": (lambda tmp, pipe, mp: ["prune", "--pipeline", str(pipe), "--output_dir",
                                                                str(pipe / "pruned")], "input pipeline folder"),
    "prune-output-holds-an-earlier-study": (
        lambda tmp, pipe, mp: (_earlier_study(tmp / "out"), _prune()(tmp, pipe, mp))[1], "--overwrite_output_dir"),
    "prune-pipeline-inside-variants": (lambda tmp, pipe, mp: ["prune", "--pipeline", str(pipe), "--output_dir",
                                                              str(pipe.parent.parent), "--overwrite_output_dir"],
                                       "which the study replaces"),
    "demo-output-is-a-file": (_output_is_a_file("demo"), "is a file"),
    "demo-output-read-only": (_read_only("demo"), "not writable"),
    "loss-gap-output-is-a-file": (_output_is_a_file("loss-gap"), "is a file"),
    "gmm-output-below-a-file": (_output_is_a_file("gmm", below=True), "is a file"),
    # the pipeline to load
    "prune-missing-pipeline-folder": (lambda tmp, pipe, mp: ["prune", "--pipeline", str(tmp / "nowhere" / "base"),
                                                             "--output_dir", str(tmp / "out")], "no pipeline folder"),
    "prune-corrupt-model-index": (_corrupt_model_index, "not a valid JSON"),
    "prune-truncated-weights": (_truncated_weights, "deserializing header"),
    "prune-config-one-layer-more": (_config_edit(+1), "do not match the config.json"),
    "prune-config-one-layer-less": (_config_edit(-1), "do not match the config.json"),
    "prune-offline-hub-id-not-cached": (_offline_hub_id, "not in the local Hugging Face cache"),
    # training data flags
    "prune-missing-train-data-dir": (_prune("--train_data_dir", "/nonexistent/memsep-images"), "is not a directory"),
    "prune-empty-image-folder": (_images_setup(_empty), "holds no image files"),
    "prune-truncated-png": (_images_setup(_truncated_png), "cannot read image"),
    # memsep prune brings every image to the pipeline's resolution, so mixed sizes load; they are not its training set
    "prune-mixed-image-sizes": (_images_setup(_mixed_sizes), "differs from the pipeline's reference images"),
    # numbers
    "prune-eta-above-one": (_prune("--etas", "1.5"), "eta must lie in"),
    "prune-eta-nan": (_prune("--etas", "nan"), "eta must lie in"),
    "prune-eta-zero": (_prune("--etas", "0"), "eta must lie in"),
    "prune-one-sample": (_prune("--num_samples", "1"), "num_samples >= 2"),
    "prune-zero-inference-steps": (_prune("--num_inference_steps", "0"), "num_inference_steps must be >= 1"),
    "prune-unknown-method": (_prune("--methods", "magnitude"), "invalid choice"),
    "demo-eta-above-one": (_plain("demo", "--etas", "1.5"), "eta must lie in"),
    "demo-zero-train-samples": (_plain("demo", "--num_train_samples", "0"), "max_train_samples must be a positive"),
    "demo-negative-train-samples": (_plain("demo", "--num_train_samples", "-3"),
                                    "max_train_samples must be a positive"),
    "demo-too-many-train-samples": (_plain("demo", "--num_train_samples", "5000"), "larger than the data"),
    "loss-gap-one-time": (_plain("loss-gap", "--num_times", "1"), "--num_times must be >= 2"),
    "loss-gap-t-min-zero": (_plain("loss-gap", "--t_min", "0"), "t_min"),
    "loss-gap-zero-n": (_plain("loss-gap", "--n_values", "0"), "positive training-set sizes"),
    "loss-gap-zero-dim": (_plain("loss-gap", "--dim", "0"), "must be positive"),
    "loss-gap-nan-mean-scale": (_plain("loss-gap", "--mean_scale", "nan"), "NaN"),
    "gmm-zero-workers": (_plain("gmm", "--scale", "tiny", "--workers", "0"), "workers must be a positive integer"),
    "gmm-zero-depth": (_plain("gmm", "--scale", "tiny", "--depth", "0"), "depth must be a positive integer"),
    "gmm-level-above-one": (_plain("gmm", "--scale", "tiny", "--level", "1.5"), "--level must lie in (0, 1)"),
    "gmm-level-nan": (_plain("gmm", "--scale", "tiny", "--level", "nan"), "--level must lie in (0, 1)"),
    "gmm-unknown-sweep-parameter": (_plain("gmm", "--sweep", "heads=1,2"), "heads"),
    "gmm-replot-nothing": (_plain("gmm", "--replot"), "gmm_runs.csv"),
    # the general rule (outputs inside --output_dir, never among the inputs, one writer at a time)
    "study-setting-name-is-a-path": (_study("--train_data_dir", "imgs", "--setting_name", "../../my_project"),
                                     "is not a plain name"),
    "study-setting-name-dot-dot": (_study("--train_data_dir", "imgs", "--setting_name", ".."),
                                   "is not a plain name"),
    "prune-output-inside-training-images": (_output_inside_images("prune"), "lies inside the training images folder"),
    "prune-output-is-training-images": (_output_inside_images("prune", equal=True), "is the training images folder"),
    "reference-output-inside-training-images": (_output_inside_images("reference"),
                                                "lies inside the training images folder"),
    "reference-output-is-the-pipeline": (lambda tmp, pipe, mp: ["reference", "--pipeline", str(pipe),
                                                                "--output_dir", str(pipe), "--embedded_digits"],
                                         "is the input pipeline folder"),
    "prune-second-writer-locked-out": (_locked("prune"), "is being written by process"),
    "demo-output-holds-another-run": (lambda tmp, pipe, mp: (_earlier_study(tmp / "out"), ["demo", "--output_dir",
                                                                                          str(tmp / "out")])[1],
                                      "already holds another run"),
    "demo-second-writer-locked-out": (_locked("demo"), "is being written by process"),
    "study-second-writer-locked-out": (_locked("study"), "is being written by process"),
    "reference-second-writer-locked-out": (_locked("reference"), "is being written by process"),
    # configs that contradict their weights, JSON that is not an object
    "prune-config-heads-relaid-1x16": (_config_set(num_attention_heads=1, attention_head_dim=16),
                                       "were saved with 2 heads x 8"),
    "prune-config-head-dim-doubled": (_config_set(attention_head_dim=16), "do not match the config.json"),
    "prune-config-string-in-int-field": (_config_set(num_layers="2"), "num_layers is '2' (str) but must be a int"),
    "prune-scheduler-string-in-int-field": (lambda tmp, pipe, mp: _scheduler_set(pipe, num_train_timesteps="100") or
                                            _prune()(tmp, pipe, mp), "num_train_timesteps is '100' (str)"),
    "prune-model-index-not-an-object": (_model_index_not_an_object, "holds a JSON list, not an object"),
    "prune-corrupt-scheduler-config-named": (_scheduler_config_corrupt, "scheduler_config.json' is not a valid JSON"),
    # values that make a method a no-op or out of range, checked before any work
    "prune-duplicate-etas": (_prune("--etas", "0.5", "0.5"), "--etas lists 0.5 more than once"),
    "prune-duplicate-seeds": (_prune("--seeds", "0", "0"), "--seeds lists 0 more than once"),
    "prune-negative-data-seed": (_prune("--data_seed=-1"), "--data_seed must be an integer in [0"),
    "prune-resolution-2048": (_prune("--resolution", "2048"), "outside [1, 1024]"),
    "prune-eta-removes-no-head": (_prune("--etas", "0.2"), "--etas 0.2 removes no head of the 4 heads it ranks"),
    "prune-time-switch-beyond-the-schedule": (_prune("--small_t_switch", "100"), "--small_t_switch 100 lies outside"),
    "prune-time-switch-zero": (_prune("--small_t_switch", "0"), "--small_t_switch 0 lies outside the schedule"),
    "prune-negative-value-as-a-token": (_prune("--finetune_lr", "-1e-3"), "write --finetune_lr=-1e-3"),
    "demo-one-train-sample": (_plain("demo", "--num_train_samples", "1"), "--num_train_samples 1"),
    "demo-duplicate-seeds": (_plain("demo", "--seeds", "1", "1"), "--seeds lists 1 more than once"),
    "study-one-train-sample": (_study("--train_data_dir", "imgs", "--num_train_samples", "1"),
                               "--num_train_samples 1"),
    "study-duplicate-etas": (_study("--etas", "0.25", "0.25"), "--etas lists 0.25 more than once"),
    "study-negative-seed": (_study("--seeds=-3"), "--seeds must be an integer in [0"),
    "study-zero-max-runs": (_study("--max_runs", "0"), "--max_runs must be a positive integer"),
    "study-zero-base-models": (_study("--num_base_models", "0"), "--num_base_models must be a positive integer"),
    "gmm-cuda-without-gpu": (_plain("gmm", "--scale", "tiny", "--device", "cuda"),
                             "CUDA is not available; use --device cpu"),
    "gmm-negative-seed": (_plain("gmm", "--scale", "tiny", "--seed=-1"), "--seed must be an integer in [0"),
    "train-zero-threads": (lambda tmp, pipe, mp: ["train", "--output_dir", str(tmp / "out"), "--num_threads", "0"],
                           "--num_threads must be >= 1"),
    # the reliability checks wired into the engine: content fingerprints, paths, no-op values, JSON files
    "study-images-replaced-since-it-started": (_study_over_replaced_images,
                                               "the images of setting custom changed since this study started"),
    "study-runs-folder-links-outside": (_link_outside("runs"), "lies outside --output_dir"),
    "study-bases-folder-links-outside": (_link_outside("bases"), "lies outside --output_dir"),
    "study-feature-networks-folder-links-outside": (_link_outside("feature_networks"), "lies outside --output_dir"),
    "study-eta-removes-no-head": (_study("--etas", "0.1"),
                                  "setting 'digits8': --etas 0.1 removes no head of the 8 heads it ranks"),
    "study-unknown-quality-metric": (_study("--quality_metric", "fid"),
                                     "--quality_metric 'fid' is not a metric of the runs"),
    "study-corrupt-study-json": (_study_json('{"settings": '), "study.json' is not a valid JSON file"),
    "study-study-json-not-an-object": (_study_json("[1]"), "holds a JSON list, not an object"),
    "demo-eta-removes-no-head": (_plain("demo", "--quick", "--etas", "0.1"),
                                 "--etas 0.1 removes no head of the 8 heads it ranks"),
    "prune-default-eta-removes-no-head": (_prune(*QUICK_PRUNE[:-2]), "--etas 0.2 removes no head of the 4 heads"),
    "prune-push-reference-without-push": (_prune("--push_reference"), "--push_reference applies to a push"),
    # the file system refuses mid-run
    "loss-gap-disk-full": (_disk_full_loss_gap,
                           "No space left on device: 'diffusion_pytorch_model.safetensors'; free disk space"),
    "prune-disk-full-while-overwriting": (_disk_full_while_overwriting, "No space left on device"),
    "prune-disk-full-safetensors-error": (_safetensors_disk_full, "No space left on device"),
}


@pytest.mark.parametrize("case", list(COMMAND_CASES))
def test_command_bad_input_fails_in_one_line_and_changes_no_file(case, saved_pipeline, tmp_path, monkeypatch,
                                                                 capsys):
    setup, phrase = COMMAND_CASES[case]
    pipe = tmp_path / "models" / "variants" / "pipe"  # nested so that one case can point output_dir two levels up
    shutil.copytree(saved_pipeline, pipe)
    argv = setup(tmp_path, pipe, monkeypatch)
    before = snapshot(tmp_path)
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse's own errors (e.g. an unknown choice)
        code = exit_.code
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if "error:" in line]
    assert code == 2, stderr[-2000:]
    assert len(errors) == 1 and phrase in errors[0], stderr[-2000:]
    assert "Traceback" not in stderr
    assert "ignore_mismatched_sizes" not in stderr  # diffusers' advice would replace the weights with random ones
    assert snapshot(tmp_path) == before  # same files, same bytes, nothing added (not even a probe file or lock)


def test_prune_overwrite_replaces_only_the_study_outputs(saved_pipeline, tmp_path, capsys):
    out = _earlier_study(tmp_path / "out")
    (out / "base").mkdir()
    (out / "base" / "keep.txt").write_text("not the study's")
    assert main(["prune", "--pipeline", str(saved_pipeline), "--output_dir", str(out), "--overwrite_output_dir",
                 *QUICK_PRUNE]) == 0
    assert sorted(p.name for p in (out / "variants").iterdir()) == ["random-eta0.5"]  # the stale variant is gone
    assert (out / "base" / "keep.txt").read_text() == "not the study's"
    assert (out / "report.md").read_text() != "# earlier study\n"
    assert not list(out.glob(".*"))  # no staging folder or probe file left behind
    reloaded = MemSepPipeline.from_pretrained(out / "variants" / "random-eta0.5")
    assert sum(reloaded.transformer.heads_per_layer()) == 2
    assert len(json.loads((out / "prune.json").read_text())["data_fingerprint"]) == 64  # what the prune ran on


# ---------------------------------------------------------------------------------------------- the public APIs
def _nan_images(n=4):
    images = torch.zeros(n, 1, 8, 8)
    images[1, 0, 2, 3] = float("nan")
    return images


def _edited_transformer(tmp, delta):
    folder = tmp / "transformer"
    tiny_transformer().save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config["num_layers"] += delta
    (folder / "config.json").write_text(json.dumps(config))
    return lambda: PrunableDiTTransformer2DModel.from_pretrained(folder)


def _api(call):
    return lambda tmp: call


def _load_from(make, **kwargs):
    """Write the image folder now (before the snapshot); the call loads it."""
    def setup(tmp):
        folder = make(tmp / "images")
        return lambda: load_training_data(train_data_dir=folder, **kwargs)
    return setup


def _reference_and_copies(scale):
    images = torch.rand(8, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    copies = images[:3].clone()
    return NearestNeighborIndex.from_images(images), (copies + 1) / 2 if scale == "0-1" else (copies + 1) * 127.5


def _copies_first(scale):
    index, copies = _reference_and_copies(scale)
    return copies, index


def _edited_config(tmp, **values):
    folder = tmp / "transformer"
    tiny_transformer().save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config.update(values)
    (folder / "config.json").write_text(json.dumps(config))
    return lambda: PrunableDiTTransformer2DModel.from_pretrained(folder)


def _config_replaced(tmp, text):
    call = _edited_config(tmp)
    (tmp / "transformer" / "config.json").write_text(text)
    return call


def _non_square(folder):
    for i in range(3):
        write_png(folder / f"{i}.png", np.full((8, 12), 40 * i, dtype=np.uint8))
    return folder


def _corrupt_trainer_state(tmp):
    from diffusers_memsep.trainer.checkpoints import read_trainer_state

    folder = tmp / "checkpoint-2"
    folder.mkdir()
    (folder / "trainer_state.json").write_text('{"global_step": 2,')
    return lambda: read_trainer_state(folder)


def _held_lock(tmp):
    import os
    import socket

    (tmp / ".out.memsep.lock").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    return lambda: diffusers_memsep.utils.OutputLock(tmp / "out").acquire()


def _digits(n=8):
    return load_training_data(max_train_samples=n, seed=0)


def _prune_api(config, out="out", record=None, **kwargs):
    """prune_pipeline on the tiny pipeline (4 heads, 100 timesteps); ``record``: a prune.json there first."""
    def setup(tmp):
        if record is not None:
            (tmp / out).mkdir()
            (tmp / out / "prune.json").write_text(json.dumps(record))
        data = _digits()
        return lambda: prune_pipeline(tiny_pipeline(), data, data.images, config, tmp / out, **kwargs)
    return setup


def _nan_transformer() -> PrunableDiTTransformer2DModel:
    model = tiny_transformer()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(float("nan"))
    return model


def _base_with_corrupt_curve(tmp):
    config = quick_config(str(tmp / "out"))
    setting = config.settings[0]
    folder = base_dir(tmp / "out", setting, 0)
    for name in (folder, folder.with_name(folder.name + "-early_stop")):
        tiny_pipeline().save_pretrained(name)
    (folder / "memorization_curve.json").write_text('{"steps": [')
    data = _digits()
    return lambda: prepare_base_model(config, setting, 0, data)


def _bases_link_outside(tmp):
    (tmp / "elsewhere").mkdir()
    (tmp / "out").mkdir()
    (tmp / "out" / "bases").symlink_to(tmp / "elsewhere", target_is_directory=True)
    return lambda: base_dir(tmp / "out", StudySetting("digits8"), 0)


def _pipeline_with(edit):
    def setup(tmp):
        tiny_pipeline().save_pretrained(tmp / "pipe")
        edit(tmp / "pipe")
        return lambda: MemSepPipeline.from_pretrained(tmp / "pipe")
    return setup


API_CASES = {
    "index-search-nan-query": (lambda tmp: lambda: NearestNeighborIndex.from_images(torch.randn(4, 3)).search(
        torch.tensor([[0.0, float("nan"), 1.0]])), ValueError, "NaN or infinite"),
    "index-search-inf-query": (lambda tmp: lambda: NearestNeighborIndex.from_images(torch.randn(4, 3)).search(
        torch.tensor([[0.0, float("inf"), 1.0]])), ValueError, "NaN or infinite"),
    "index-search-bad-nonfinite-option": (lambda tmp: lambda: NearestNeighborIndex.from_images(
        torch.randn(4, 3)).search(torch.randn(2, 3), nonfinite="ignore"), ValueError, "nonfinite"),
    "index-nan-training-images": (_api(lambda: NearestNeighborIndex.from_images(_nan_images())), ValueError, "NaN"),
    "index-wrong-query-shape": (lambda tmp: lambda: NearestNeighborIndex.from_images(torch.randn(4, 1, 8, 8)).search(
        torch.randn(2, 1, 4, 4)), ValueError, "sample shape"),
    "index-one-training-image": (_api(lambda: NearestNeighborIndex.from_images(torch.randn(1, 3))), ValueError,
                                 "at least 2"),
    "head-mask-nan": (_api(lambda: tiny_transformer().set_head_mask(torch.full((2, 2), float("nan")))), ValueError,
                      "NaN or infinite"),
    "head-mask-inf": (_api(lambda: tiny_transformer().set_head_mask(torch.tensor([[1.0, math.inf], [1.0, 1.0]]))),
                      ValueError, "NaN or infinite"),
    "head-mask-wrong-shape": (_api(lambda: tiny_transformer().set_head_mask(torch.ones(3, 2))), ValueError,
                              "expected (num_layers, num_attention_heads)"),
    "pipeline-guidance-nan": (_api(lambda: tiny_pipeline()(batch_size=2, guidance_scale=float("nan"),
                                                           num_inference_steps=1)), ValueError, "guidance_scale"),
    "pipeline-guidance-inf": (_api(lambda: tiny_pipeline()(batch_size=2, guidance_scale=math.inf,
                                                           num_inference_steps=1)), ValueError, "guidance_scale"),
    "pipeline-more-generators-than-samples": (
        _api(lambda: tiny_pipeline()(batch_size=2, num_inference_steps=1,
                                     generator=[torch.Generator().manual_seed(i) for i in range(3)])),
        ValueError, "3 generators were given for 2 samples"),
    "pipeline-fewer-generators-than-samples": (
        _api(lambda: tiny_pipeline()(batch_size=3, num_inference_steps=1, generator=[torch.Generator()])),
        ValueError, "1 generators were given for 3 samples"),
    "pipeline-zero-steps": (_api(lambda: tiny_pipeline()(batch_size=1, num_inference_steps=0)), ValueError,
                            "num_inference_steps"),
    "pipeline-zero-batch": (_api(lambda: tiny_pipeline()(batch_size=0, num_inference_steps=1)), ValueError,
                            "batch_size"),
    "transformer-config-one-layer-more": (lambda tmp: _edited_transformer(tmp, +1), ValueError,
                                          "do not match the config.json"),
    "transformer-config-one-layer-less": (lambda tmp: _edited_transformer(tmp, -1), ValueError,
                                          "do not match the config.json"),
    "data-missing-folder": (lambda tmp: lambda: load_training_data(train_data_dir=tmp / "nowhere"),
                            FileNotFoundError, "is not a directory"),
    "data-empty-folder": (_load_from(_empty), ValueError, "holds no image files"),
    "data-truncated-png": (_load_from(_truncated_png), ValueError, "cannot read image"),
    "data-mixed-sizes": (_load_from(_mixed_sizes), ValueError, "different sizes"),
    "data-zero-resolution": (_load_from(digit_images, resolution=0), ValueError, "resolution"),
    "data-zero-samples": (_api(lambda: load_training_data(max_train_samples=0)), ValueError, "positive integer"),
    "data-negative-samples": (_api(lambda: load_training_data(max_train_samples=-1)), ValueError, "positive integer"),
    "data-32-bit-values-beyond-16-bits": (_load_from(lambda folder: _deep_tiff(folder, 70000)), ValueError,
                                          "outside the 65535 range"),
    "study-eta-nan": (_api(lambda: PruningStudyConfig(etas=(float("nan"),))), ValueError, "eta must lie in"),
    # scales, configs, JSON, general rules, no-op values
    "index-copies-on-the-0-1-scale": (lambda tmp: lambda: memorization_report(*_copies_first("0-1")), ValueError,
                                      "look like [0, 1] images"),
    "index-copies-on-the-0-255-scale": (lambda tmp: lambda: _reference_and_copies("0-255")[0].search(
        _reference_and_copies("0-255")[1]), ValueError, "x / 127.5 - 1 for 0..255"),
    "ratio-copies-on-the-0-1-scale": (lambda tmp: lambda: memorization_ratio(*_copies_first("0-1")), ValueError,
                                      "put them on the reference's scale"),
    "precision-recall-all-fakes-nan": (_api(lambda: precision_recall(torch.randn(10, 4),
                                                                     torch.full((10, 4), float("nan")))),
                                       ValueError, "the model or its sampler diverged"),
    "transformer-config-heads-relaid-1x16": (lambda tmp: _edited_config(tmp, num_attention_heads=1,
                                                                        attention_head_dim=16),
                                             ValueError, "were saved with 2 heads x 8"),
    "transformer-config-head-dim-doubled": (lambda tmp: _edited_config(tmp, attention_head_dim=16), ValueError,
                                            "do not match the config.json"),
    "transformer-config-string-in-int-field": (lambda tmp: _edited_config(tmp, num_layers="2"), ValueError,
                                               "num_layers is '2' (str)"),
    "transformer-config-not-an-object": (lambda tmp: _config_replaced(tmp, "[]"), ValueError,
                                         "holds a JSON list, not an object"),
    "trainer-state-corrupt-names-the-file": (_corrupt_trainer_state, ValueError,
                                             "trainer_state.json' is not a valid JSON file"),
    "data-non-square-images": (_load_from(_non_square), ValueError, "not square; pass --resolution N"),
    "data-mixed-sizes-name-a-file": (_load_from(_mixed_sizes), ValueError, "'big.png'"),
    "write-outside-output-dir": (lambda tmp: lambda: diffusers_memsep.utils.inside_output_dir(
        tmp / "out" / ".." / ".." / "my_project" / "runs.csv", tmp / "out"), ValueError, "lies outside --output_dir"),
    "setting-name-with-a-separator": (_api(lambda: diffusers_memsep.utils.check_plain_name("a/b", "--setting_name")),
                                      ValueError, "is not a plain name"),
    "output-lock-held-by-a-live-process": (_held_lock, ValueError, "is being written by process"),
    "eta-that-removes-no-head": (_api(lambda: diffusers_memsep.utils.check_etas_remove_heads([0.1], 4)),
                                 ValueError, "removes no head of the 4 heads it ranks"),
    "time-switch-outside-the-schedule": (_api(lambda: diffusers_memsep.utils.check_time_switch(1000, 1000)),
                                         ValueError, "lies outside the schedule"),
    "time-switch-zero": (_api(lambda: diffusers_memsep.utils.check_time_switch(0, 1000)), ValueError,
                         "lies outside the schedule"),
    "limit-zero": (_api(lambda: diffusers_memsep.utils.check_positive_limit(0, "--max_runs")), ValueError,
                   "must be a positive integer"),
    "duplicate-seeds": (_api(lambda: diffusers_memsep.utils.check_unique([0, 1, 0], "--seeds")), ValueError,
                        "--seeds lists 0 more than once"),
    "nan-scores": (_api(lambda: diffusers_memsep.utils.check_finite_scores(torch.tensor([1.0, float("nan")]))),
                   ValueError, "1 of 2 head importance scores are NaN"),
    # the reliability checks wired into the engine
    "prune-pipeline-over-a-prune-of-other-images": (
        _prune_api(PruningStudyConfig(etas=(0.5,)), record={"data_fingerprint": "0" * 64}, overwrite_output_dir=False),
        ValueError, "holds a prune of other training images"),
    "prune-pipeline-default-eta-removes-no-head": (_prune_api(PruningStudyConfig()), ValueError,
                                                   "--etas 0.2 removes no head of the 4 heads it ranks"),
    "prune-pipeline-time-switch-beyond-the-schedule": (_prune_api(PruningStudyConfig(etas=(0.5,), small_t_switch=100)),
                                                       ValueError, "--small_t_switch 100 lies outside the schedule"),
    "study-setting-name-is-a-path": (_api(lambda: StudySetting(name="../x")), ValueError,
                                     "--setting_name '../x' is not a plain name"),
    "study-bases-folder-links-outside": (_bases_link_outside, ValueError, "lies outside --output_dir"),
    "study-eta-removes-no-head": (_api(lambda: quick_config(etas=(0.1,))), ValueError,
                                  "setting 'digits8': --etas 0.1 removes no head of the 8 heads"),
    "study-time-switch-beyond-the-schedule": (_api(lambda: quick_config(small_t_switch=1000)), ValueError,
                                              "--small_t_switch 1000 lies outside the schedule"),
    "study-unknown-quality-metric": (_api(lambda: StudyConfig(quality_metric="FID")), ValueError,
                                     "--quality_metric 'FID' is not a metric of the runs"),
    "study-corrupt-memorization-curve": (_base_with_corrupt_curve, ValueError,
                                         "memorization_curve.json' is not a valid JSON file"),
    "head-importance-of-a-nan-model": (_api(lambda: head_importance(
        "small_t", _nan_transformer(), _digits(), DDPMScheduler(num_train_timesteps=100), num_batches=1,
        batch_size=4)), ValueError, "of 4 small_t head importance scores are NaN or infinite"),
    "one-shot-prune-of-a-nan-model": (_api(lambda: one_shot_prune(
        _nan_transformer(), _digits(), DDPMScheduler(num_train_timesteps=100), eta=0.5, method="ablation",
        num_batches=1, batch_size=4)), ValueError, "of 4 ablation head importance scores are NaN or infinite"),
    "pipeline-load-corrupt-transformer-config": (
        _pipeline_with(lambda pipe: (pipe / "transformer" / "config.json").write_text('{"num_layers": 2,')),
        ValueError, "config.json' is not a valid JSON file"),
    "pipeline-load-model-index-not-an-object": (
        _pipeline_with(lambda pipe: (pipe / "model_index.json").write_text("[]")), ValueError,
        "holds a JSON list, not an object"),
}


def _deep_tiff(folder, top):
    for i in range(2):
        path = folder / f"{i}.tif"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((8, 8), top, dtype=np.int32)).save(path)
    return folder


@pytest.mark.parametrize("case", list(API_CASES))
def test_api_bad_input_raises_a_clear_error_and_changes_no_file(case, tmp_path):
    make, error_type, phrase = API_CASES[case]
    call = make(tmp_path)
    before = snapshot(tmp_path)
    with pytest.raises(error_type) as raised:
        call()
    assert phrase in str(raised.value)
    assert "\n" not in str(raised.value).strip()
    assert snapshot(tmp_path) == before


# ------------------------------------------------------------------------------------ non-finite and 16-bit data
def test_search_skips_nonfinite_queries_and_finds_the_others_exactly():
    database = torch.randn(20, 5, generator=torch.Generator().manual_seed(0))
    queries = torch.randn(4, 5, generator=torch.Generator().manual_seed(1))
    queries[1, 2], queries[3, 0] = float("nan"), -float("inf")
    distances, indices = NearestNeighborIndex.from_images(database).search(queries, k=3, nonfinite="skip")
    assert indices[[1, 3]].eq(-1).all() and distances[[1, 3]].isnan().all()
    brute = torch.cdist(queries[[0, 2]].double(), database.double()).square()
    expected_distances, expected_indices = brute.topk(3, largest=False)
    assert torch.equal(indices[[0, 2]], expected_indices)
    torch.testing.assert_close(distances[[0, 2]].double(), expected_distances, rtol=1e-5, atol=1e-6)


def test_nonfinite_samples_are_never_counted_as_not_memorized():
    train = torch.randn(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    samples = torch.stack([train[0], train[1] + 0.3 * torch.randn(1, 8, 8), train[2], train[3]])
    samples[2, 0, 0, 0] = float("nan")
    samples[3, 0, 1, 1] = float("inf")
    report = memorization_report(samples, train)
    assert report.finite.tolist() == [True, True, False, False] and report.num_nonfinite == 2
    assert not report.memorized[2:].any() and report.nearest_index[2:].eq(-1).all()
    assert report.distance_ratio[2:].isnan().all()
    # the ratio is over the two finite samples: the exact copy counts, the nonfinite ones do not dilute it
    assert report.ratio == pytest.approx(report.memorized[:2].float().mean().item())
    assert memorization_ratio(samples, train) == report.ratio
    assert math.isnan(memorization_ratio(samples[2:], train))


def test_pipeline_flags_diverged_samples_as_not_finite():
    pipe = tiny_pipeline()
    pipe.transformer.register_forward_hook(lambda module, args, output: type(output)(sample=output.sample * math.nan))
    output = pipe(batch_size=3, num_inference_steps=2, output_type="pt", generator=torch.Generator().manual_seed(0))
    assert output.finite.tolist() == [False, False, False]
    assert not output.memorized.any() and output.nearest_index.eq(-1).all()


def test_16_bit_grey_png_is_scaled_by_its_bit_depth(tmp_path):
    ramp = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1040)  # 0 .. 65520, spread over the 16-bit range
    for i in range(2):
        write_png(tmp_path / "images" / f"{i}.png", ramp)
    assert Image.open(tmp_path / "images" / "0.png").mode in ("I;16", "I")
    data = load_training_data(train_data_dir=tmp_path / "images")
    expected = torch.from_numpy(ramp.astype(np.float64) / 65535 * 2 - 1).float()
    assert data.images.shape == (2, 1, 8, 8)
    torch.testing.assert_close(data.images[0, 0], expected, rtol=0, atol=1e-6)
    assert (data.images > 0.99).float().mean() < 0.05  # clipping made 98% of these pixels white
    resized = load_training_data(train_data_dir=tmp_path / "images", resolution=4).images
    assert -1 < resized.min() < resized.max() < 1 and resized.unique().numel() > 4


def test_8_bit_png_is_unchanged_by_the_deep_grey_path(tmp_path):
    pixels = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    for i in range(2):
        write_png(tmp_path / "images" / f"{i}.png", pixels)
    data = load_training_data(train_data_dir=tmp_path / "images")
    torch.testing.assert_close(data.images[0, 0], torch.from_numpy(pixels).float() / 255 * 2 - 1)


def test_write_probe_leaves_nothing_and_creates_no_folder(tmp_path):
    target = tmp_path / "a" / "b"
    assert diffusers_memsep.utils.check_writable_dir(target) == target
    assert list(tmp_path.iterdir()) == []


def test_precision_recall_count_nonfinite_fakes_as_off_the_real_manifold():
    from diffusers_memsep.memorization import precision_recall

    real = torch.randn(40, 3, generator=torch.Generator().manual_seed(0))
    fake = real[:20].clone()
    precision, recall = precision_recall(real, fake, k=3)
    fake[:5, 0] = float("nan")
    precision_nan, recall_nan = precision_recall(real, fake, k=3)
    assert precision == 1.0 and precision_nan == pytest.approx(15 / 20)
    assert recall_nan == pytest.approx(precision_recall(real, fake[5:], k=3)[1])
    with pytest.raises(ValueError, match="real_features hold NaN"):
        precision_recall(fake, real, k=3)


# ------------------------------------------------------------------------------- private by default
def _fake_hub(monkeypatch):
    """upload_folder replaced by a recorder of the files it would upload (same pattern filter as the Hub client)."""
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    import diffusers_memsep.hub as hub

    uploads = []

    def upload_folder(repo_id, folder_path, ignore_patterns=None, **kwargs):
        files = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*") if p.is_file())
        uploads.append(sorted(filter_repo_objects(files, ignore_patterns=ignore_patterns)))
        return f"https://huggingface.co/{repo_id}/commit/0"

    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    monkeypatch.setattr(hub, "upload_folder", upload_folder)  # hub.py imports the name: patch the one it calls
    monkeypatch.setattr(hub, "check_hub_repo", lambda *args, **kwargs: "token")
    return uploads


@pytest.mark.parametrize("flag", [[], ["--push_reference"]])
def test_push_leaves_the_training_images_out_unless_asked(flag, saved_pipeline, tmp_path, monkeypatch, capsys):
    folder = tmp_path / "pipe"
    shutil.copytree(saved_pipeline, folder)
    assert (folder / "reference").is_dir()
    uploads = _fake_hub(monkeypatch)
    before = snapshot(folder)
    assert main(["push", str(folder), "--hub_model_id", "me/dit", *flag]) == 0
    uploaded = uploads[0]
    assert "model_index.json" in uploaded and any(name.startswith("transformer/") for name in uploaded)
    has_reference = any(name.startswith("reference/") for name in uploaded)
    assert has_reference == bool(flag), uploaded
    out = capsys.readouterr().out
    assert ("the training images are now published" in out) if flag else ("pass --push_reference" in out)
    assert snapshot(folder) == before  # the local folder keeps its reference


def test_push_api_leaves_the_reference_out_by_default(saved_pipeline, monkeypatch):
    from diffusers_memsep.hub import push_folder_to_hub

    uploads = _fake_hub(monkeypatch)
    push_folder_to_hub(saved_pipeline, "me/dit")  # the path memsep train --push_to_hub takes
    push_folder_to_hub(saved_pipeline, "me/dit", push_reference=True)
    assert not any(n.startswith("reference/") for n in uploads[0])
    assert any(n.startswith("reference/") for n in uploads[1])


# ------------------------------------------------------------------------------------------ threads
def test_thread_default_is_one_and_the_user_setting_wins(monkeypatch):
    from diffusers_memsep.cli import set_num_threads

    original = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        monkeypatch.delenv("MKL_NUM_THREADS", raising=False)
        assert set_num_threads(None) == 1 and torch.get_num_threads() == 1
        assert set_num_threads(2) == 2 and torch.get_num_threads() == 2  # --num_threads wins
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        torch.set_num_threads(2)
        assert set_num_threads(None) is None and torch.get_num_threads() == 2  # OMP_NUM_THREADS left to torch
    finally:
        torch.set_num_threads(original)


def test_every_command_takes_num_threads():
    from diffusers_memsep.cli import COMMANDS, build_parser

    for name in COMMANDS:
        flags = {flag for action in build_parser(name)._actions for flag in action.option_strings}
        assert "--num_threads" in flags, name


# ------------------------------------------------------------------- the scale check lets good data pass
def test_copies_on_the_reference_scale_are_found_and_features_are_not_scale_checked():
    index, _ = _reference_and_copies("0-1")
    assert memorization_ratio(index.images[:3].clone(), index) == 1.0
    vectors = NearestNeighborIndex.from_images(torch.randn(8, 5))
    vectors.search(torch.rand(2, 5) * 1000)  # feature vectors: no image scale to check


def test_saved_transformer_records_its_head_layout(tmp_path):
    from safetensors import safe_open

    from diffusers_memsep.models.prunable_dit import HEAD_LAYOUT_KEY

    tiny_transformer().save_pretrained(tmp_path / "t")
    with safe_open(str(tmp_path / "t" / "diffusion_pytorch_model.safetensors"), framework="pt") as handle:
        assert json.loads(handle.metadata()[HEAD_LAYOUT_KEY]) == {"num_attention_heads": 2, "attention_head_dim": 8}
    PrunableDiTTransformer2DModel.from_pretrained(tmp_path / "t")  # the untouched folder loads


def test_train_push_goes_through_the_one_push_path_without_the_reference(tmp_path, monkeypatch):
    import diffusers_memsep.trainer.output

    uploads = _fake_hub(monkeypatch)
    monkeypatch.setattr(diffusers_memsep.trainer.output, "check_hub_repo", lambda *args, **kwargs: "token")
    out = tmp_path / "out"
    assert main(["train", "--output_dir", str(out), "--max_train_steps", "2", "--max_train_samples", "4",
                 "--num_layers", "1", "--num_attention_heads", "2", "--attention_head_dim", "8",
                 "--validation_num_samples", "0", "--report_to", "none", "--checkpointing_steps", "0",
                 "--no_progress", "--push_to_hub", "--hub_model_id", "me/dit"]) == 0
    assert (out / "reference").is_dir() and len(uploads) == 1
    assert "model_index.json" in uploads[0] and not any(n.startswith("reference/") for n in uploads[0])
    assert "leaves it out unless `--push_reference`" in (out / "README.md").read_text()


@pytest.mark.parametrize("flag", [[], ["--push_reference"]])
def test_prune_push_leaves_the_reference_out_unless_asked(flag, saved_pipeline, tmp_path, monkeypatch, capsys):
    uploads = _fake_hub(monkeypatch)
    out = tmp_path / "out"
    assert main(["prune", "--pipeline", str(saved_pipeline), "--output_dir", str(out), *QUICK_PRUNE,
                 "--push_to_hub", "--hub_model_id_prefix", "me/dit", *flag]) == 0
    assert len(uploads) == 1 and "model_index.json" in uploads[0]  # one variant: random-eta0.5
    assert any(n.startswith("reference/") for n in uploads[0]) == bool(flag)
    card = (out / "variants" / "random-eta0.5" / "README.md").read_text()
    assert "`memsep prune --push_to_hub`" in card and "`--push_reference`" in card
