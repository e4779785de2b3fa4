"""Early stopping by memorization: stop at the first validation whose memorization ratio exceeds a bound.

The paper (Ye et al. 2025, Section 4) calls a sample memorized when ``||x - x_(1)||^2 <= (1/9) ||x - x_(2)||^2``;
a small training set is memorized more and more as training goes on. With ``TrainingConfig.stop_at_memorization``
= ``R`` the trainer measures that ratio on its validation samples, stops at the first validation whose ratio
exceeds ``R``, and hands back the weights (EMA weights when EMA is on) of the LAST validation at or below ``R``,
kept in memory as a CPU copy (checkpoints need not be on).

Choices made here:
- Validation noise never is evaluation noise: the seed scheme is :mod:`~diffusers_memsep.evaluate`'s (one scheme,
  :data:`~diffusers_memsep.evaluate.EVALUATION_SEED_STRIDE`). Evaluations (``evaluate.py`` and the ``study/``
  package) sample batch ``b`` of run seed ``s`` from ``1000 * s + b``, below
  :data:`~diffusers_memsep.evaluate.CURVE_SEED`; a run that stops by memorization validates batch ``b`` from
  ``CURVE_SEED + b`` (:func:`~diffusers_memsep.evaluate.validation_seed`), the range of the study's memorization
  curve, so the rule never selects weights on the noise they are later evaluated on.
- A ratio that is not finite (every validation sample diverged) counts as exceeding ``R``: it is no evidence of
  safety.
- When the very first validation already exceeds ``R``, no validated weights were ever at or below it: the weights of
  that first validation are kept (the earliest measured) and ``stopped_before_first_safe_validation`` is set, and the
  model card says so in words. Validate more often (``validation_steps``) to find an earlier safe point.
- Under several processes the ratio is measured on the main process and broadcast, so every process stops at the
  same step; each process keeps its own copy of the weights (identical under data parallelism).
- The state (curve, kept step, kept weights) rides in every checkpoint as ``early_stopping.json`` and
  ``early_stopping.safetensors`` (no pickle), so a resumed run ends exactly as the uninterrupted one.
"""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..utils import save_figure, write_text

#: In a checkpoint folder: the curve and decisions (JSON) and the kept weights (safetensors).
STATE_FILE, WEIGHTS_FILE = "early_stopping.json", "early_stopping.safetensors"
#: In the output folder of ``memsep train``: the curve as JSON and as a plot.
CURVE_JSON, CURVE_PNG = "memorization_curve.json", "memorization_curve.png"
#: The quality metrics of a validation with a quality reference, plotted beside the ratio when present.
QUALITY_CURVES = ("precision", "recall")


class EarlyStopping:
    """The curve of validations and the weights of the last one at or below ``threshold``.

    Attributes:
        threshold: ``R``; a validation is safe when its memorization ratio is ``<= R``.
        curve: one dict per validation, ``{"step", "memorization_ratio", ...}`` (plus the other validation metrics
            on the main process, e.g. precision and recall with a quality reference).
        kept_step: the step whose weights are kept (None before the first validation).
        kept_state: those weights, a CPU state dict.
        stopped_step: the step of the first validation above ``R`` (None while training continues).
    """

    def __init__(self, threshold: float):
        self.threshold = float(threshold)
        self.curve: list[dict] = []
        self.kept_step: int | None = None
        self.kept_state: dict[str, torch.Tensor] | None = None
        self.stopped_step: int | None = None

    @property
    def stopped(self) -> bool:
        return self.stopped_step is not None

    @property
    def stopped_before_first_safe_validation(self) -> bool:
        """True when no validation was at or below the threshold: the kept weights are the first validation's."""
        return self.kept_step is not None and not self._is_safe(self._entry(self.kept_step)["memorization_ratio"])

    @property
    def kept_metrics(self) -> dict:
        """The validation metrics of the kept step (empty before the first validation)."""
        return dict(self._entry(self.kept_step)) if self.kept_step is not None else {}

    def observe(self, step: int, ratio: float, metrics: dict, weights: dict[str, torch.Tensor]) -> bool:
        """Record the validation of ``step``; keep ``weights`` when it is safe; return True when training stops."""
        self.curve.append({**metrics, "step": int(step), "memorization_ratio": float(ratio)})
        if self._is_safe(ratio) or self.kept_state is None:
            self.kept_step, self.kept_state = int(step), weights
        if not self._is_safe(ratio):
            self.stopped_step = int(step)
        return self.stopped

    def kept_model(self, model: torch.nn.Module) -> torch.nn.Module | None:
        """A copy of ``model`` holding the kept weights, in eval mode (None before the first validation)."""
        if self.kept_state is None:
            return None
        kept = copy.deepcopy(model)
        kept.load_state_dict(self.kept_state)
        return kept.eval()

    def summary(self) -> dict:
        """What the model card and ``memorization_curve.json`` say about the decision (without the curve)."""
        kept, stopped = self.kept_metrics, self._entry(self.stopped_step) if self.stopped else {}
        return {"threshold": self.threshold, "kept_step": self.kept_step,
                "kept_memorization_ratio": kept.get("memorization_ratio"), "stopped_step": self.stopped_step,
                "stopped_memorization_ratio": stopped.get("memorization_ratio"),
                "stopped_before_first_safe_validation": self.stopped_before_first_safe_validation,
                "num_validations": len(self.curve)}

    # --------------------------------------------------------------------------------------- checkpoints
    def save(self, folder: str | os.PathLike) -> None:
        """Write the state into a checkpoint folder (JSON + safetensors)."""
        folder = Path(folder)
        state = {"threshold": self.threshold, "curve": self.curve, "kept_step": self.kept_step,
                 "stopped_step": self.stopped_step}
        (folder / STATE_FILE).write_text(json.dumps(state, indent=2))
        if self.kept_state is not None:
            save_file({k: v.contiguous() for k, v in self.kept_state.items()}, str(folder / WEIGHTS_FILE))

    def load(self, folder: str | os.PathLike) -> None:
        """Read the state of a checkpoint folder; a checkpoint of a run without early stopping starts a new curve."""
        folder = Path(folder)
        if not (folder / STATE_FILE).is_file():
            return
        state = json.loads((folder / STATE_FILE).read_text())
        if state["threshold"] != self.threshold:
            raise ValueError(
                f"checkpoint {str(folder)!r} was written with stop_at_memorization={state['threshold']}, not "
                f"{self.threshold}; resume with --stop_at_memorization {state['threshold']}, or start a new run."
            )
        self.curve, self.kept_step, self.stopped_step = state["curve"], state["kept_step"], state["stopped_step"]
        self.kept_state = load_file(str(folder / WEIGHTS_FILE)) if self.kept_step is not None else None

    def register_checkpoint_hooks(self, accelerator) -> list:
        """Save and load this state with every ``accelerator.save_state`` / ``load_state`` (the checkpoints)."""
        return [accelerator.register_save_state_pre_hook(lambda models, weights, folder: self.save(folder)),
                accelerator.register_load_state_pre_hook(lambda models, folder: self.load(folder))]

    # ------------------------------------------------------------------------------------------- outputs
    def write_curve(self, output_dir: str | os.PathLike, validation_seed: int | None = None) -> tuple[Path, Path]:
        """``memorization_curve.json`` and ``memorization_curve.png`` in ``output_dir`` (each written atomically)."""
        output_dir = Path(output_dir)
        record = {**self.summary(), "validation_seed": validation_seed, "curve": self.curve}
        json_path = write_text(output_dir / CURVE_JSON, json.dumps(record, indent=2) + "\n")
        return json_path, save_figure(self._figure(), output_dir / CURVE_PNG)

    def _figure(self):
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        figure, axis = plt.subplots(figsize=(6, 3.5))
        steps = [row["step"] for row in self.curve]
        axis.plot(steps, [row["memorization_ratio"] for row in self.curve], "o-", label="memorization ratio")
        for name in QUALITY_CURVES:
            if self.curve and all(name in row for row in self.curve):
                axis.plot(steps, [row[name] for row in self.curve], ".--", label=name)
        axis.axhline(self.threshold, color="grey", linestyle=":", label=f"threshold {self.threshold:g}")
        if self.kept_step is not None:
            axis.axvline(self.kept_step, color="green", alpha=0.6, label=f"kept step {self.kept_step}")
        if self.stopped:
            axis.axvline(self.stopped_step, color="red", alpha=0.6, label=f"stopped at step {self.stopped_step}")
        axis.set(xlabel="optimizer step", ylabel="fraction of validation samples", ylim=(-0.02, 1.02),
                 title="Memorization during training")
        axis.legend(fontsize=7, loc="best")
        return figure

    # ------------------------------------------------------------------------------------------- helpers
    def _is_safe(self, ratio: float) -> bool:
        return math.isfinite(ratio) and ratio <= self.threshold

    def _entry(self, step: int) -> dict:
        return next(row for row in reversed(self.curve) if row["step"] == step)
