"""``memsep audit`` offline on a tiny stock DiTPipeline folder (latent DiT with learned sigma, as on the Hub).

The data-parallel test runs this file as a script: under ``torchrun`` (2 processes, gloo on CPU) and alone, each
process recording the numbers it returned and how many sampling batches it ran."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

from diffusers_memsep.cli import main
from diffusers_memsep.data import load_training_data

from conftest import write_random_images

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def stock_folder(tmp_path_factory):
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                        layers_per_block=1, norm_num_groups=4, sample_size=8)
    dit = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                num_layers=2, sample_size=4, patch_size=2, num_embeds_ada_norm=2, norm_num_groups=1)
    folder = tmp_path_factory.mktemp("stock") / "dit"
    DiTPipeline(transformer=dit, vae=vae, scheduler=DDIMScheduler()).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    return write_random_images(tmp_path_factory.mktemp("images"), 12, 8, seed=0)


def test_audit_with_training_images(stock_folder, image_folder, tmp_path):
    out = tmp_path / "audit"
    code = main(["audit", "--pipeline", str(stock_folder), "--output_dir", str(out), "--train_data_dir",
                 str(image_folder), "--max_train_samples", "6", "--num_samples", "6", "--num_inference_steps", "2",
                 "--copy_steps", "5", "--gallery_size", "3", "--no_quality"])
    assert code == 0
    numbers = json.loads((out / "audit.json").read_text())
    assert numbers["training_images"] == 6
    assert numbers["pixel"]["memorized"]["total"] == 6
    assert 0 <= numbers["copy_space"]["copied"]["low"] <= numbers["copy_space"]["copied"]["high"] <= 1
    # the population is the whole folder: the images the copy network never saw (its recipe's held-out rows), minus
    # the training images, measure the copy rule's false positives; too few (< 20) to calibrate: the recipe's threshold
    recipe = json.loads((out / "feature_network" / "copy_space" / "recipe.json").read_text())
    training_rows = load_training_data(train_data_dir=str(image_folder), max_train_samples=6, seed=0).indices
    unseen = set(recipe["holdout_indices"]) - set(training_rows)
    assert numbers["copy_space"].get("held_out_false_positives", {"total": 0})["total"] == len(unseen)
    assert numbers["copy_space"]["threshold"] == pytest.approx(recipe["threshold"])
    assert "recipe" in numbers["copy_space"]["threshold_source"]
    # too few held-out images for the registered rule, which has no recipe threshold: distances only, no verdict
    assert "not calibrated" in numbers["registered_pixel"]["threshold_source"] and "combined" not in numbers
    assert len(numbers["registered_pixel"]["distance"]) == 6
    assert len(numbers["copies_per_training_image"]) == 6
    assert len(numbers["model_score"]["scores"]) == 6
    report = (out / "report.md").read_text()
    assert "paper's 1/3 rule" in report and "Which training images leak" in report
    assert (out / "gallery.png").stat().st_size > 0
    assert (out / "feature_network" / "copy_space" / "recipe.json").is_file()
    assert not list(out.glob(".*tmp*"))  # atomic writes leave no temporary file


def test_audit_reports_registered_and_combined_rules(stock_folder, tmp_path):
    folder = write_random_images(tmp_path / "population", 150, 8, seed=1)  # 30 held out by the copy network
    out = tmp_path / "audit"
    assert main(["audit", "--pipeline", str(stock_folder), "--output_dir", str(out), "--train_data_dir",
                 str(folder), "--max_train_samples", "6", "--num_samples", "6", "--num_inference_steps", "2",
                 "--copy_steps", "5", "--gallery_size", "2", "--no_quality"]) == 0
    numbers = json.loads((out / "audit.json").read_text())
    held = numbers["copy_space"]["held_out_false_positives"]["total"]
    assert held >= 20 and "held-out" in numbers["copy_space"]["threshold_source"]  # the copy space's numbers stay
    registered, combined = numbers["registered_pixel"], numbers["combined"]
    assert registered["held_out_false_positives"]["total"] == combined["held_out_false_positives"]["total"] == held
    assert registered["held_out_false_positives"]["share"] <= 0.01
    assert combined["held_out_false_positives"]["share"] <= 0.01  # the union, one standardised score
    # fewer than 99 held-out images cannot promise 1%: the thresholds flag none of them and say what they promise
    promise = f"{1 / (held + 1):.2%}"
    assert promise in registered["threshold_source"] and promise in combined["threshold_source"]
    assert registered["copied"]["total"] == combined["copied"]["total"] == 6
    union = [cos >= combined["cosine_threshold"] or distance <= combined["distance_threshold"]
             for cos, distance in zip(numbers["copy_space"]["similarity"], registered["distance"])]
    assert combined["flagged"] == union and combined["copied"]["count"] == sum(union)
    report = (out / "report.md").read_text()
    assert "registered pixel rule" in report and "combined rule (copy space OR registered)" in report


def test_audit_without_training_images(stock_folder, tmp_path):
    scores = {}
    for repeats in (None, "8"):
        out = tmp_path / f"audit-{repeats}"
        assert main(["audit", "--pipeline", str(stock_folder), "--output_dir", str(out), "--num_samples", "4",
                     "--num_inference_steps", "2", "--gallery_size", "2",
                     *(["--score_repeats", repeats] if repeats else [])]) == 0
        numbers = json.loads((out / "audit.json").read_text())
        assert numbers["training_images"] is None and "pixel" not in numbers
        assert numbers["model_score"]["flagged"]["total"] == 4
        assert numbers["model_score"]["options"] == ({"repeats": 8} if repeats else {})
        assert numbers["model_score"]["method"] == "renoise" and numbers["model_score"]["extracted_images"] is None
        assert "only the model-only score" in (out / "report.md").read_text()
        scores[repeats] = numbers["model_score"]["scores"]
    assert "renoise, repeats=8 >=" in (tmp_path / "audit-8" / "report.md").read_text()
    assert scores[None] != scores["8"]  # the option reached the score


def test_audit_with_the_extraction_score(stock_folder, tmp_path):
    """``--score_method extraction``: one extraction for the whole audit; a random model copies nothing, so the
    audit scores with renoise and its threshold (and says so); with images extracted before, the paper's rule."""
    from diffusers_memsep.audit import audit_pipeline
    from diffusers_memsep.memorization.model_score import THRESHOLDS, ExtractionOutput, to_model_space
    from diffusers_memsep.sources import load_pipeline

    out = tmp_path / "audit"
    assert main(["audit", "--pipeline", str(stock_folder), "--output_dir", str(out), "--num_samples", "4",
                 "--num_inference_steps", "2", "--gallery_size", "0", "--score_method", "extraction",
                 "--score_repeats", "2"]) == 0
    score = json.loads((out / "audit.json").read_text())["model_score"]
    assert (score["method"], score["extracted_images"], score["threshold"]) == ("renoise", 0, THRESHOLDS["renoise"])
    assert score["options"] == {"repeats": 2, "iterations": 2}  # the fallback iterates the re-noising map

    pipe = load_pipeline(str(stock_folder))
    pipe.set_progress_bar_config(disable=True)
    drawn = pipe(class_labels=[0, 1], num_inference_steps=2, output_type="pt",
                 generator=torch.Generator().manual_seed(5)).images
    extracted = ExtractionOutput(images=to_model_space(pipe, drawn).float(), bank_scores=torch.zeros(2),
                                 num_stable=2, gap=10.0)
    result = audit_pipeline(pipe, num_samples=4, num_inference_steps=2, gallery_size=0, progress=False,
                            score_method="extraction", score_options={"extracted": extracted})
    score = result.numbers["model_score"]
    assert (score["method"], score["extracted_images"]) == ("extraction", 2)
    assert score["threshold"] == THRESHOLDS["extraction"] and score["options"] == {"repeats": 16}  # draws used
    assert len(score["scores"]) == 4 and score["flagged"]["total"] == 4


def test_audit_bad_input(stock_folder, tmp_path, capsys):
    assert main(["audit", "--pipeline", str(stock_folder), "--output_dir", str(tmp_path / "a"),
                 "--num_samples", "2"]) == 2
    assert "--num_samples must be >= 4" in capsys.readouterr().err
    assert main(["audit", "--pipeline", str(stock_folder), "--output_dir", str(tmp_path / "b"),
                 "--score_method", "fixed_point", "--score_repeats", "8"]) == 2
    assert "method 'fixed_point' takes the options levels, draws; got 'repeats'" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_write_audit_writes_on_the_main_process_only(tmp_path, monkeypatch):
    import diffusers_memsep.audit as audit

    result = audit.AuditResult({"any": 1}, torch.zeros(1, 1, 8, 8))
    monkeypatch.setattr(audit, "is_main_process", lambda: False)
    assert audit.write_audit(result, tmp_path / "out", "title") == tmp_path / "out" / "report.md"
    assert not (tmp_path / "out").exists()


def run_audit_worker(records: Path, argv: list[str]) -> int:
    """``memsep audit`` as every process runs it, recording per rank the numbers it returned and its pipeline calls."""
    import diffusers_memsep.commands.audit as command
    from diffusers_memsep import MemSepPipeline
    from diffusers_memsep.distributed import rank_and_world_size

    calls, call, write = [], MemSepPipeline.__call__, command.write_audit
    MemSepPipeline.__call__ = lambda self, *args, **kwargs: calls.append(1) or call(self, *args, **kwargs)

    def recording_write(result, output_dir, title):
        rank, world_size = rank_and_world_size()
        (records / f"rank{rank}-of-{world_size}.json").write_text(
            json.dumps({"numbers": result.numbers, "pipeline_calls": len(calls)}, sort_keys=True))
        return write(result, output_dir, title)

    command.write_audit = recording_write
    status = main(argv)
    import torch.distributed as dist

    # The command leaves the process group: exiting with it alive can abort in gloo's threads (SIGABRT).
    assert not (dist.is_available() and dist.is_initialized()), "memsep audit exited with its process group alive"
    return status


def comparable(numbers: dict) -> str:
    """The numbers as JSON text (NaN included), without the copy network's training time and its cache folder."""
    numbers = json.loads(json.dumps(numbers))
    details = numbers.get("copy_space", {}).get("details", {})
    for key in ("train_seconds", "cache"):
        details.pop(key, None)
    return json.dumps(numbers, sort_keys=True)


def test_two_processes_audit_like_one(stock_folder, image_folder, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), ACCELERATE_USE_CPU="true", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    outputs = {}
    for processes in (1, 2):
        out, records = tmp_path / f"audit-{processes}", tmp_path / f"records-{processes}"
        records.mkdir()
        # 5 samples in batches of 2: 3 batches, split 1 + 2
        argv = ["audit", "--pipeline", str(stock_folder), "--output_dir", str(out), "--train_data_dir",
                str(image_folder), "--max_train_samples", "6", "--num_samples", "5", "--batch_size", "2",
                "--num_inference_steps", "2", "--copy_steps", "5", "--gallery_size", "3", "--no_quality"]
        launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
                  if processes == 2 else [sys.executable])
        done = subprocess.run([*launch, __file__, str(records), *argv], capture_output=True, text=True, timeout=300,
                              env=env, cwd=ROOT)
        assert done.returncode == 0, done.stderr[-4000:]
        assert done.stdout.count("# Memorization audit") == 1  # the report is printed by the main process alone
        outputs[processes] = (json.loads((out / "audit.json").read_text()), records)
        assert (out / "report.md").is_file() and (out / "gallery.png").stat().st_size > 0
        assert not list(out.glob(".*tmp*"))  # atomic writes leave no temporary file
    one, records_one = outputs[1]
    two, records_two = outputs[2]
    assert len(one["model_score"]["scores"]) == 5 and one["training_images"] == 6
    assert comparable(two) == comparable(one)  # every number, per-sample scores and copy space included
    ranks = [json.loads((records_two / f"rank{rank}-of-2.json").read_text()) for rank in (0, 1)]
    assert [rank["pipeline_calls"] for rank in ranks] == [1, 2]  # each process sampled its share of the batches
    assert comparable(ranks[1]["numbers"]) == comparable(ranks[0]["numbers"]) == comparable(one)
    assert json.loads((records_one / "rank0-of-1.json").read_text())["pipeline_calls"] == 3


if __name__ == "__main__":
    sys.exit(run_audit_worker(Path(sys.argv[1]), sys.argv[2:]))
