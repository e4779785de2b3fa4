"""Wheel smoke test: the package as a user installs it, not as the checkout has it.

1. build the sdist and, from it, the wheel (``python -m build``), so both are checked to carry everything;
2. create a fresh virtual environment (no system site-packages), install the CPU torch first (a bare ``torch``
   requirement pulls a multi-GB CUDA build), then the wheel, NOT editable;
3. from a folder outside the checkout, without ``PYTHONPATH``, offline: a tiny ``memsep train``, a tiny
   ``memsep prune`` of its output, a tiny ``memsep study`` (its remedy rows and frontier), then
   ``MemSepPipeline.from_pretrained`` on the pruned variant with a short plain and copy-free sampling call; check
   that ``diffusers_memsep`` and its model-card templates come from site-packages and that the base model and the
   variant have model cards (YAML header, model-index).

Run by ``make smoke`` (part of ``make test``): ``python scripts/wheel_smoke.py [--keep]``. Needs ``build`` (the
``test`` extra). ``TORCH_SPEC`` overrides the torch requirement (default ``torch==2.13.0``). Prints the time of every
step.

The dependencies are installed from a wheelhouse, ``$MEMSEP_WHEELHOUSE`` (default
``~/.cache/diffusers-memsep/wheelhouse``), filled by ``pip download`` whenever it misses a requirement. pip's own
HTTP cache cannot be relied on: it stores only responses that carry caching headers, and a proxy may strip them, in
which case every fresh environment downloads everything again (measured: over 4 minutes). ``--no-compile`` skips
byte-compiling torch and the rest at install time; Python compiles what it imports, once.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TORCH_SPEC = os.environ.get("TORCH_SPEC", "torch==2.13.0")
CACHE_HOME = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
WHEELHOUSE = Path(os.environ.get("MEMSEP_WHEELHOUSE") or CACHE_HOME / "diffusers-memsep" / "wheelhouse")

TRAIN = ["--output_dir", "base", "--max_train_steps", "3", "--max_train_samples", "8", "--train_batch_size", "8",
         "--num_layers", "1", "--num_attention_heads", "2", "--attention_head_dim", "8",
         "--validation_num_samples", "4", "--validation_inference_steps", "2", "--report_to", "none",
         "--checkpointing_steps", "0", "--no_progress"]
STUDY = ["--quick", "--output_dir", "study", "--settings", "digits8", "--num_base_models", "1", "--seeds", "0",
         "--base_train_steps", "40", "--checkpoint_every", "20", "--max_resamples", "2"]
PRUNE = ["--pipeline", "base", "--output_dir", "pruned", "--methods", "small_t", "--etas", "0.5", "--seeds", "0",
         "--finetune_steps", "2", "--finetune_batch_size", "8", "--importance_batches", "1",
         "--importance_batch_size", "8", "--num_samples", "8", "--num_inference_steps", "2"]

# Runs in the fresh environment, from the run folder: argv[1] = the checkout.
CHECK = r'''
import sys
import sysconfig
from pathlib import Path

import torch
from huggingface_hub import ModelCard

import diffusers_memsep
from diffusers_memsep import MemSepPipeline, hub

checkout = Path(sys.argv[1]).resolve()
site = Path(sysconfig.get_paths()["purelib"]).resolve()
package = Path(diffusers_memsep.__file__).resolve().parent
assert package == site / "diffusers_memsep" and not package.is_relative_to(checkout), f"imported from {package}"
for name in ("base_model", "pruned_variant"):
    template = Path(str(hub.template_path(name))).resolve()
    assert template == package / "model_cards" / f"{name}.md", f"template {name} read from {template}"

variants = sorted(path for path in Path("pruned", "variants").iterdir() if path.is_dir())
assert [path.name for path in variants] == ["small_t-eta0.5"], variants
for folder, model_name in ((Path("base"), "dit-memsep"), (variants[0], "dit-small_t-eta0.5")):
    card_file = folder / "README.md"
    text = card_file.read_text(encoding="utf-8")
    assert text.startswith("---\n") and text.count("\n---\n") >= 1 and "{{" not in text, f"{card_file}: no card"
    card = ModelCard.load(card_file)
    data = card.data.to_dict()
    assert data["library_name"] == "diffusers" and "memorization" in data["tags"], f"{card_file}: {data}"
    assert data["model-index"][0]["name"] == model_name, f"{card_file}: {data.get('model-index')}"
    assert f"# {model_name}" in card.text, f"{card_file}: no title"

pipe = MemSepPipeline.from_pretrained(variants[0])
out = pipe(batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np")
assert out.images.shape[0] == 2 and out.memorized.shape == (2,), (out.images.shape, out.memorized.shape)
free = pipe(batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0), avoid_copies=True,
            max_resamples=1, memorization_score=True)
assert free.num_resamples.shape == free.memorization_score.shape == (2,) and (free.denoising_steps >= 2).all()
extracted = pipe(batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                 memorization_score="extraction",
                 memorization_score_kwargs={"num_samples": 8, "repeats": 2, "num_inference_steps": 2})
assert extracted.memorization_score.shape == (2,), "extraction score"
report = Path("study", "report.md").read_text(encoding="utf-8")
assert "### Remedies: effect and cost" in report and Path("study", "frontier.csv").is_file(), "study: no frontier"
rows = Path("study", "runs.csv").read_text(encoding="utf-8")
assert all(name in rows for name in ("early_stop+copy_free", "weight_decay=1", "original+copy_free(check)",
                                          "weight_decay=1+copy_free")), rows
print(f"diffusers_memsep from {package}; templates from {package / 'model_cards'}; "
      f"cards, from_pretrained + copy-free sampling + extraction score of {variants[0]}, the study's remedies OK")
'''


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", action="store_true", help="Keep the temporary folder (printed) for inspection.")
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="memsep-wheel-smoke-"))
    assert not work.resolve().is_relative_to(ROOT), "the run folder must be outside the checkout"
    started = time.perf_counter()
    try:
        dist, venv, run_dir = work / "dist", work / "venv", work / "run"
        step("build sdist + wheel", [sys.executable, "-m", "build", "--outdir", str(dist), str(ROOT)], work)
        wheel = only(dist.glob("diffusers_memsep-*.whl"))

        step("fresh venv", [sys.executable, "-m", "venv", str(venv)], work)
        config = (venv / "pyvenv.cfg").read_text()
        assert "include-system-site-packages = false" in config, config
        python, memsep = venv / "bin" / "python", venv / "bin" / "memsep"
        install = [str(python), "-m", "pip", "install", "--quiet", "--no-compile", "--no-index",
                   "--find-links", str(WHEELHOUSE)]
        fill = [str(python), "-m", "pip", "download", "--quiet", "--dest", str(WHEELHOUSE), TORCH_SPEC, str(wheel)]
        for requirement in (TORCH_SPEC, str(wheel)):  # torch first: the CPU build, never a CUDA one
            title = f"install {Path(requirement).name}"
            if not try_step(title, [*install, requirement], work):
                step(f"fill the wheelhouse {WHEELHOUSE} (pip download)", fill, work)
                for copy in WHEELHOUSE.glob("diffusers_memsep-*.whl"):  # only dependencies are kept there
                    copy.unlink()
                step(title, [*install, requirement], work)

        run_dir.mkdir()
        step("memsep train (tiny)", [str(memsep), "train", *TRAIN], run_dir)
        step("memsep prune (tiny)", [str(memsep), "prune", *PRUNE], run_dir)
        step("memsep study (tiny)", [str(memsep), "study", *STUDY], run_dir)
        print("  " + step("check import, cards, from_pretrained", [str(python), "-c", CHECK, str(ROOT)], run_dir))
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"wheel smoke test passed in {time.perf_counter() - started:.0f} s ({_children_cpu():.0f} s CPU)")
    return 0


def step(title: str, command: list[str], cwd: Path) -> str:
    """Run ``command`` in ``cwd`` offline, without PYTHONPATH; print its time, or its output and exit if it fails.

    Returns the last line it printed.
    """
    done, seconds, cpu = _run(command, cwd)
    if done.returncode:
        print(done.stdout[-6000:], file=sys.stderr)
        raise SystemExit(f"wheel smoke test: '{title}' failed (exit {done.returncode}, {seconds:.0f} s): "
                         f"{' '.join(command)[:300]}")
    print(f"  {seconds:6.1f} s ({cpu:5.1f} s CPU)  {title}", flush=True)
    return done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""


def try_step(title: str, command: list[str], cwd: Path) -> bool:
    """Like :func:`step`, but a failure only returns ``False`` (the caller has a fallback)."""
    done, seconds, cpu = _run(command, cwd)
    print(f"  {seconds:6.1f} s ({cpu:5.1f} s CPU)  {title}" + (" (missed, falling back)" if done.returncode else ""),
          flush=True)
    return done.returncode == 0


def _run(command: list[str], cwd: Path) -> tuple[subprocess.CompletedProcess, float, float]:
    """Run offline, without PYTHONPATH; return the process, its wall time and its CPU time (a shared machine's
    wall times vary with the load, CPU times much less)."""
    # PYTHONDONTWRITEBYTECODE is dropped too: with --no-compile, the first command byte-compiles what it imports
    # (into the throw-away venv) and the later ones reuse it, instead of each compiling torch and diffusers again.
    unset = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONDONTWRITEBYTECODE")
    env = {key: value for key, value in os.environ.items() if key not in unset}
    env["HF_HUB_OFFLINE"] = "1"
    started, cpu_before = time.perf_counter(), _children_cpu()
    done = subprocess.run(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return done, time.perf_counter() - started, _children_cpu() - cpu_before


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def only(paths) -> Path:
    paths = list(paths)
    if len(paths) != 1:
        raise SystemExit(f"wheel smoke test: expected one wheel, found {[path.name for path in paths]}")
    return paths[0]


if __name__ == "__main__":
    sys.exit(main())
