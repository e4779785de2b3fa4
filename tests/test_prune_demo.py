"""The pruning-study engine on one pipeline: `memsep demo --quick` and `memsep prune` end to end (tiny settings:
wiring, not results)."""

import csv
import json
import subprocess
import sys

import pytest
import torch

from diffusers_memsep import MemSepPipeline, PrunableDiTTransformer2DModel
from diffusers_memsep.cli import main
from diffusers_memsep.study import PruningStudyConfig

QUICK_PRUNE = ["--seeds", "0", "--finetune_steps", "2", "--finetune_batch_size", "8", "--importance_batches", "1",
               "--importance_batch_size", "8", "--num_samples", "16", "--num_inference_steps", "3"]


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    output = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--quick", "--output_dir", str(output), "--small_t_switch", "500"]) == 0
    return output


def test_demo_writes_report_tables_figures_variants_and_cards(demo_dir):
    for name in ("report.md", "runs.csv", "summary.csv", "pareto.png", "samples_nearest.png",
                 "base/model_index.json", "base/README.md"):
        assert (demo_dir / name).is_file(), name
    rows = list(csv.DictReader((demo_dir / "runs.csv").open()))
    methods = [row["method"] for row in rows]
    assert methods[:2] == ["original", "finetune_only"] and {"small_t", "random", "small_t_top"} <= set(methods)
    assert any(m.startswith("small_t+routed") for m in methods)
    for row in rows:
        assert 0.0 <= float(row["memorization_ratio"]) <= 1.0
        assert float(row["frechet_distance"]) >= 0.0
        assert row["feature_space"] == "digits-classifier feature space"
    report = (demo_dir / "report.md").read_text()
    assert "random" in report and "small_t" in report and "Frechet distance in digits-classifier" in report
    assert "FID" not in report and "Holm-Bonferroni over the K =" in report
    assert len(list((demo_dir / "runs" / "pipeline" / "base-0").glob("*.json"))) == len(rows)  # one JSON per run


def test_demo_variants_are_pruned_pipelines_that_reload(demo_dir):
    base = MemSepPipeline.from_pretrained(demo_dir / "base")
    total = sum(base.transformer.heads_per_layer())
    for method in ("small_t", "random", "small_t_top"):
        folder = demo_dir / "variants" / f"{method}-eta0.5"
        pipe = MemSepPipeline.from_pretrained(folder)
        assert isinstance(pipe.transformer, PrunableDiTTransformer2DModel)
        assert sum(pipe.transformer.heads_per_layer()) == total - int(0.5 * total)
        assert json.loads((folder / "transformer" / "config.json").read_text())["pruned_heads"]
        assert pipe.reference is not None and pipe.reference.num_images == base.reference.num_images
        out = pipe(batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt")
        assert out.images.shape == (2, 1, 8, 8) and out.memorized.shape == (2,)
        card = (folder / "README.md").read_text()
        assert "random pruning" in card.lower() and "model-index" in card


def test_prune_command_on_a_saved_pipeline(demo_dir, tmp_path, capsys):
    output = tmp_path / "pruned"
    code = main(["prune", "--pipeline", str(demo_dir / "base"), "--output_dir", str(output), "--methods", "ablation",
                 "uniform_t", "--etas", "0.5", *QUICK_PRUNE])
    assert code == 0
    summary = list(csv.DictReader((output / "summary.csv").open()))
    assert [row["method"] for row in summary] == ["original", "finetune_only", "ablation", "uniform_t"]
    assert (output / "variants" / "ablation-eta0.5" / "model_index.json").is_file()
    assert "report:" in capsys.readouterr().out


def test_prune_push_offline_fails_in_one_line_and_keeps_the_variant(demo_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    output = tmp_path / "pushed"
    code = main(["prune", "--pipeline", str(demo_dir / "base"), "--output_dir", str(output), "--methods", "random",
                 *QUICK_PRUNE, "--push_to_hub", "--hub_model_id_prefix", "someone/dit"])
    assert code == 2
    stderr = capsys.readouterr().err
    errors = [line for line in stderr.splitlines() if line.startswith("memsep: error")]
    assert len(errors) == 1 and "HF_HUB_OFFLINE" in errors[0] and "intact" in errors[0]
    assert "Traceback" not in stderr
    assert (output / "variants" / "random-eta0.2" / "model_index.json").is_file()


def test_prune_refuses_a_pipeline_without_reference(demo_dir, tmp_path, capsys):
    pipe = MemSepPipeline.from_pretrained(demo_dir / "base")
    pipe.register_modules(reference=None)
    pipe.save_pretrained(tmp_path / "no_reference")
    code = main(["prune", "--pipeline", str(tmp_path / "no_reference"), "--output_dir", str(tmp_path / "out"),
                 *QUICK_PRUNE])
    assert code == 2 and "no training reference" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kwargs, message", [
    (dict(methods=("magnitude",)), "unknown pruning method"),
    (dict(etas=(1.0,)), "eta must lie in"),
    (dict(etas=(0.0,)), "eta must lie in"),
    (dict(seeds=()), "at least one seed"),
    (dict(sampler="euler"), "sampler"),
])
def test_study_config_bad_input(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PruningStudyConfig(**kwargs)


def test_prune_names_a_missing_pipeline_folder(tmp_path, capsys):
    missing = tmp_path / "nowhere" / "base"
    assert main(["prune", "--pipeline", str(missing), "--output_dir", str(tmp_path / "out")]) == 2
    assert "no pipeline folder at" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_prune_memorization_gap_needs_and_takes_held_out_images(demo_dir, tmp_path, capsys):
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    refused = tmp_path / "refused"
    code = main(["prune", "--pipeline", str(demo_dir / "base"), "--output_dir", str(refused), "--methods",
                 "memorization_gap", "--etas", "0.5", *QUICK_PRUNE])
    assert code == 2 and "--validation_data_dir" in capsys.readouterr().err
    assert not refused.exists()

    held_out = tmp_path / "held_out"  # digits the base model was not trained on (the reference holds its images)
    held_out.mkdir()
    reference = MemSepPipeline.from_pretrained(demo_dir / "base").reference.images
    digits = load_digits().images
    for index in range(len(digits) - 8, len(digits)):
        image = (digits[index] / 16 * 255).round().astype(np.uint8)
        as_model_input = torch.from_numpy(image).float().div(127.5).sub(1)
        assert not any(torch.allclose(as_model_input, r[0], atol=1e-3) for r in reference)
        Image.fromarray(image, mode="L").save(held_out / f"{index}.png")
    output = tmp_path / "gap"
    code = main(["prune", "--pipeline", str(demo_dir / "base"), "--output_dir", str(output), "--methods",
                 "memorization_gap", "--etas", "0.5", "--validation_data_dir", str(held_out), *QUICK_PRUNE])
    assert code == 0, capsys.readouterr().err
    summary = list(csv.DictReader((output / "summary.csv").open()))
    assert [row["method"] for row in summary] == ["original", "finetune_only", "memorization_gap"]
    assert (output / "variants" / "memorization_gap-eta0.5" / "model_index.json").is_file()


def test_the_demo_base_model_starts_from_the_same_weights_in_every_process(tmp_path):
    """torch seeds its default generator differently in every process, so the demo seeds the initial weights
    itself (as `memsep train` does): two processes build the same base model before training."""
    script = (
        "import sys, torch\n"
        "import diffusers_memsep.demo as demo\n"
        "class Stop(Exception): pass\n"
        "def capture(output_dir, data, model, *args, **kwargs):\n"
        "    print(float(sum(p.double().sum() for p in model.parameters()))); raise Stop\n"
        "demo.train_pipeline = capture\n"
        "try: demo.run_demo(demo.DemoConfig(output_dir=sys.argv[1]))\n"
        "except Stop: pass\n")
    sums = [subprocess.run([sys.executable, "-c", script, str(tmp_path / f"run{i}")], capture_output=True, text=True,
                           check=True).stdout.strip().splitlines()[-1] for i in range(2)]
    assert sums[0] == sums[1]
