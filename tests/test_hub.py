"""Model cards (both templates, model-index metadata), where the templates are found (installed package data through
importlib.resources, or the checkout's model_cards/), and pushing: offline, no token, no network, refused."""

import sys
import time
import zipfile
from pathlib import Path

import huggingface_hub
import huggingface_hub.constants  # noqa: F401  (the tests patch HF_HUB_OFFLINE in it)
import pytest
from huggingface_hub import ModelCard

from diffusers_memsep import hub
from diffusers_memsep.cli import main
from diffusers_memsep.hub import HubPushError, push_folder_to_hub, render_model_card, save_model_card

ROOT = Path(__file__).resolve().parent.parent

BASE_FIELDS = dict(
    model_name="dit-digits", num_train_images=64, dataset_source="sklearn-digits (64 of 1797 images, seed 0)",
    resolution=8, num_channels=1, num_classes=None, num_parameters=1420164,
    model_config={"num_layers": 4, "num_attention_heads": 4, "attention_head_dim": 32, "patch_size": 2},
    noise_scheduler={"num_train_timesteps": 1000, "beta_schedule": "linear", "prediction_type": "epsilon"},
    memorization=[{"sampler": "DDPM-1000", "ratio": 0.875, "num_samples": 64}],
)
PRUNED_FIELDS = dict(
    base_model="me/dit-digits", method="small-t head importance (Algorithm 2)", eta=0.25, num_pruned_heads=4,
    num_heads=16, pruned_heads={"0": [1, 3], "2": [0, 2]}, time_distribution="Beta(0.8, 2) on k / K",
    finetune_steps=300, num_train_images=64, num_seeds=3, sampler="DDPM-1000",
    metrics=[
        dict(model="original", method=None, eta=None, memorization=0.85, memorization_std=0.02, precision=0.9,
             recall=0.2, fd=1.5, num_parameters=1420164, sampling_seconds=4.0),
        dict(model="pruned", method="small-t", eta=0.25, memorization=0.41, memorization_std=0.05, precision=None,
             recall=None, fd=None, num_parameters=1200000, sampling_seconds=3.5),
        dict(model="pruned", method="random", eta=0.25, memorization=0.6, memorization_std=None, precision=0.8,
             recall=0.25, fd=1.9, num_parameters=1200000, sampling_seconds=3.5),
    ],
)


def test_base_model_card_has_model_index_and_fields():
    card = render_model_card(
        "base_model", metadata={"model_name": "dit-digits", "datasets": ["sklearn-digits"], "license": "apache-2.0"},
        eval_results=[{"metric_type": "memorization_ratio", "metric_value": 0.875, "dataset_type": "sklearn-digits",
                       "metric_name": "Memorization ratio (DDPM-1000)"}], **BASE_FIELDS)
    reparsed = ModelCard(str(card))  # what the Hub sees
    data = reparsed.data.to_dict()
    assert data["library_name"] == "diffusers" and "memorization" in data["tags"]
    results = data["model-index"][0]["results"][0]
    assert data["model-index"][0]["name"] == "dit-digits"
    assert results["metrics"][0] == {"type": "memorization_ratio", "value": 0.875,
                                     "name": "Memorization ratio (DDPM-1000)"}
    text = reparsed.text
    assert "# dit-digits" in text and "**64 images**" in text and "unconditional" in text
    assert "| DDPM-1000 | 64 | 87.5 % |" in text and "1,420,164 parameters" in text
    assert "{{" not in text and "{%" not in text


def test_pruned_variant_card_keeps_every_row_and_the_random_baseline():
    card = render_model_card("pruned_variant",
                             metadata={"model_name": "dit-digits-pruned", "base_model": "me/dit-digits"},
                             eval_results=[{"metric_type": "memorization_ratio", "metric_value": 0.41,
                                            "dataset_type": "sklearn-digits"}], **PRUNED_FIELDS)
    data = ModelCard(str(card)).data.to_dict()
    assert data["base_model"] == "me/dit-digits"
    assert data["model-index"][0]["results"][0]["metrics"][0]["value"] == 0.41
    text = card.text
    assert "**4 of 16 attention heads removed**" in text and "eta = 0.25" in text and "300 steps" in text
    assert "Beta(0.8, 2) on k / K" in text and "layer 0: 1, 3; layer 2: 0, 2" in text
    assert "| original | - | - | 85.0 +- 2.0 | - | 0.900 | 0.200 | 1.5 | - | 1,420,164 | 4.00 |" in text
    assert "| pruned | small-t | 0.25 | 41.0 +- 5.0 | - | - | - | - | - |" in text
    assert "| pruned | random | 0.25 | 60.0 | - | 0.800 |" in text
    assert "over 3 seeds" in text and "Limitations" in text


def test_save_model_card_and_errors(tmp_path):
    path = save_model_card(tmp_path / "folder", "base_model", metadata={"model_name": "m"}, **BASE_FIELDS)
    assert path.name == "README.md" and ModelCard.load(path).data.library_name == "diffusers"
    assert not list((tmp_path / "folder").glob(".*"))
    with pytest.raises(ValueError, match="no model-card template 'nope'"):
        render_model_card("nope")
    with pytest.raises(ValueError, match="model_name"):
        render_model_card("base_model", eval_results=[{"metric_type": "m", "metric_value": 1}])


@pytest.fixture
def zipped_package(tmp_path, monkeypatch):
    """A package in a zip on sys.path whose model_cards/ holds only base_model.md; no checkout folder.

    A zip is reachable through importlib.resources only, never as files: the lookup must go through it.
    """
    name = "memsep_zipped_cards"
    archive = tmp_path / "cards.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        zipped.writestr(f"{name}/__init__.py", "")
        zipped.write(ROOT / "model_cards" / "base_model.md", f"{name}/model_cards/base_model.md")
    monkeypatch.syspath_prepend(str(archive))
    monkeypatch.setattr(hub, "TEMPLATE_PACKAGE", name)
    monkeypatch.setattr(hub, "CHECKOUT_TEMPLATE_DIR", tmp_path / "no-checkout")
    yield archive
    sys.modules.pop(name, None)


def test_templates_are_read_from_package_data_through_importlib_resources(zipped_package):
    template = hub.template_path("base_model")
    assert isinstance(template, zipfile.Path) and str(template).endswith("model_cards/base_model.md")
    card = render_model_card("base_model", metadata={"model_name": "dit-digits"}, **BASE_FIELDS)
    assert "# dit-digits" in card.text and ModelCard(str(card)).data.library_name == "diffusers"
    hub.require_templates("base_model")
    with pytest.raises(FileNotFoundError, match=r"pruned_variant\.md is not installed .*reinstall") as error:
        hub.require_templates("base_model", "pruned_variant")
    assert "\n" not in str(error.value) and str(zipped_package) in str(error.value)
    with pytest.raises(ValueError, match=r"choose one of \['base_model'\]"):
        hub.template_path("nope")


def test_checkout_reads_the_top_level_model_cards_folder():
    # A checkout has no diffusers_memsep/model_cards/ (setup.py makes it in the wheel only): one place to edit.
    assert not (ROOT / "diffusers_memsep" / "model_cards").exists()
    for name in ("base_model", "pruned_variant"):
        assert Path(str(hub.template_path(name))) == ROOT / "model_cards" / f"{name}.md"
    hub.require_templates("base_model", "pruned_variant")


def test_no_templates_installed_fails_with_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "TEMPLATE_PACKAGE", "json")  # a package without model_cards/
    monkeypatch.setattr(hub, "CHECKOUT_TEMPLATE_DIR", tmp_path)
    with pytest.raises(FileNotFoundError, match="base_model.md is not installed.*reinstall diffusers-memsep"):
        hub.template_path("base_model")
    with pytest.raises(FileNotFoundError, match="base_model.md is not installed"):
        save_model_card(tmp_path / "folder", "base_model", metadata={"model_name": "m"}, **BASE_FIELDS)
    assert not (tmp_path / "folder").exists()


@pytest.mark.parametrize("command, missing", [
    (["train", "--max_train_steps", "1", "--max_train_samples", "8", "--num_layers", "1", "--num_attention_heads", "2",
      "--attention_head_dim", "8", "--validation_num_samples", "0", "--report_to", "none"], "base_model.md"),
    (["prune", "--pipeline", "PIPELINE"], "pruned_variant.md"),
    (["demo", "--quick"], "base_model.md"),
])
def test_commands_check_their_templates_before_any_work(command, missing, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(hub, "TEMPLATE_PACKAGE", "json")
    monkeypatch.setattr(hub, "CHECKOUT_TEMPLATE_DIR", tmp_path / "no-checkout")
    output_dir = tmp_path / "out"
    argv = [str(tmp_path / "no-pipeline") if arg == "PIPELINE" else arg for arg in command]
    assert main([*argv, "--output_dir", str(output_dir)]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"memsep: error: model-card template {missing} is not installed") and "\n" not in error
    assert "reinstall diffusers-memsep" in error and not output_dir.exists()


def test_setup_build_step_ships_the_templates_in_the_package(tmp_path, monkeypatch):
    import setuptools
    from setuptools.dist import Distribution

    captured = {}
    monkeypatch.setattr(setuptools, "setup", lambda **kwargs: captured.update(kwargs))
    monkeypatch.chdir(ROOT)
    exec(compile((ROOT / "setup.py").read_text(), str(ROOT / "setup.py"), "exec"), {"__name__": "setup"})
    command = Distribution({"name": "x", "cmdclass": captured["cmdclass"]}).get_command_obj("build_py")
    command.build_lib = str(tmp_path)
    command.ensure_finalized()
    command.run()
    shipped = sorted((tmp_path / "diffusers_memsep" / "model_cards").glob("*.md"))
    edited = sorted((ROOT / "model_cards").glob("*.md"))
    assert [p.name for p in shipped] == [p.name for p in edited] == ["base_model.md", "pruned_variant.md"]
    assert all(a.read_bytes() == b.read_bytes() for a, b in zip(shipped, edited))
    assert {"model_cards/base_model.md", "model_cards/pruned_variant.md"} <= set(command.get_source_files())


@pytest.fixture
def saved_folder(tmp_path):
    folder = tmp_path / "variant"
    save_model_card(folder, "base_model", metadata={"model_name": "m"}, **BASE_FIELDS)
    (folder / "transformer").mkdir()
    (folder / "transformer" / "config.json").write_text("{}")
    return folder, {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def _intact(folder, files):
    return {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()} == files


def test_push_offline_fails_at_once_with_one_line(saved_folder, monkeypatch):
    folder, files = saved_folder
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    start = time.perf_counter()
    with pytest.raises(HubPushError) as error:
        push_folder_to_hub(folder, "me/variant", token="hf_fake")
    assert time.perf_counter() - start < 2
    message = str(error.value)
    assert "\n" not in message and "HF_HUB_OFFLINE" in message and str(folder) in message
    assert _intact(folder, files)


def test_push_without_token_fails_at_once(saved_folder, monkeypatch):
    folder, files = saved_folder
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "get_token", lambda: None)
    called = []
    monkeypatch.setattr(hub, "create_repo", lambda *a, **k: called.append(1))
    with pytest.raises(HubPushError, match="no Hugging Face token.*hf auth login") as error:
        push_folder_to_hub(folder, "me/variant")
    assert not called and "\n" not in str(error.value) and _intact(folder, files)


def test_push_network_and_refusal_errors_become_one_line(saved_folder, monkeypatch):
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    folder, files = saved_folder
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    failures = {
        "no connection to the Hub": httpx2.ConnectError("[Errno -3] Temporary failure in name resolution"),
        "the Hub refused.*write access": HfHubHTTPError(
            "401 Client Error: Unauthorized\nmore detail",
            response=httpx2.Response(401, request=httpx2.Request("POST", "https://huggingface.co/api/repos/create"))),
        "no Hugging Face token": LocalTokenNotFoundError("Token is required"),
    }
    for expected, failure in failures.items():
        def fail(*args, _failure=failure, **kwargs):
            raise _failure

        monkeypatch.setattr(hub, "create_repo", fail)
        with pytest.raises(HubPushError, match=expected) as error:
            push_folder_to_hub(folder, "me/variant", token="hf_fake")
        assert "\n" not in str(error.value) and error.value.__cause__ is None
        assert _intact(folder, files)


def test_push_creates_the_repo_privately_and_uploads_without_checkpoints(saved_folder, monkeypatch):
    folder, _ = saved_folder
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    calls = {}
    monkeypatch.setattr(hub, "create_repo",
                        lambda repo_id, **kw: calls.setdefault("create", (repo_id, kw)))

    class Commit:
        commit_url = "https://huggingface.co/me/variant/commit/abc"

    monkeypatch.setattr(hub, "upload_folder", lambda **kw: calls.setdefault("upload", kw) and Commit())
    assert push_folder_to_hub(folder, "me/variant", private=True, token="hf_x") == Commit.commit_url
    assert calls["create"] == ("me/variant",
                               {"private": True, "exist_ok": True, "token": "hf_x", "repo_type": "model"})
    assert calls["upload"]["folder_path"] == str(folder) and "checkpoint-*" in calls["upload"]["ignore_patterns"]
    with pytest.raises(ValueError, match="not a saved pipeline folder"):
        push_folder_to_hub(folder / "missing", "me/variant", token="hf_x")
    assert hub.PUSH_IGNORE_PATTERNS
