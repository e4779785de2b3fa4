"""Write the run tables of README.md and docs/results.md from the committed reports they come from.

- the demo tables, from ``docs/demo_summary.csv`` (the ``summary.csv`` of the ``memsep demo`` run the docs
  describe: copy a new run's file there and rerun this script);
- the study tables (remedies, frontier, budgets, pruning against random) and the README's table of quality budgets,
  from ``docs/study_report.md`` (the ``report.md`` of the full ``memsep study`` run);
- the copy-detection tables, from ``docs/detection_results/detection_report.md`` (the ``report.md`` of
  ``scripts/measure_detection.py``), and the model-only score tables, the first table of
  ``docs/detection_results/model_score/report.md`` (of ``scripts/measure_model_score.py``) and the table of every
  run, ``docs/detection_results/model_score/runs.md`` (its ``--summarize``).

Each table sits between ``<!-- generated: NAME -->`` and ``<!-- end: NAME -->``; run ``python scripts/docs_tables.py``
after replacing a report. ``tests/test_engine_rules.py`` checks that the committed tables equal what this prints.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path

from diffusers_memsep.utils import write_text

DEMO_LABELS = {"finetune_only": "finetune_only (control)", "small_t": "small_t (paper)", "random": "random (baseline)"}
STUDY_COLUMNS = ("memorization_ratio", "precision", "recall", "frechet_distance", "kid")
STUDY_TITLES = "| {first} | eta | memorized | precision | recall | Frechet distance | KID formula |"
VERDICTS = {"better": "**better**", "worse": "*worse*", "not distinguishable": "n.d.",
            "higher, with more copies": "higher, with more copies"}


def _mean_std(row: dict, key: str, style: str) -> str:
    return f"{float(row[key]):{style}} +- {float(row[key + '_std']):{style}}"


def _change(row: dict, original: dict, key: str) -> str:
    return f" ({100 * (float(row[key]) - float(original[key])) / float(original[key]):+.0f}%)"


def demo_readme_table(rows: list[dict]) -> str:
    original = rows[0]
    lines = ["| method | eta | memorized | precision | recall | Frechet distance | KID formula |",
             "|---|---|---|---|---|---|---|"]
    for row in rows:
        change = "" if row is original else _change(row, original, "memorization_ratio")
        lines.append(f"| {DEMO_LABELS.get(row['method'], row['method'])} | {float(row['eta']):g} | "
                     f"{_mean_std(row, 'memorization_ratio', '.3f')}{change} | {_mean_std(row, 'precision', '.3f')} | "
                     f"{_mean_std(row, 'recall', '.3f')} | {_mean_std(row, 'frechet_distance', '.0f')} | "
                     f"{_mean_std(row, 'kid', '.3f')} |")
    return "\n".join(lines)


def demo_results_table(rows: list[dict]) -> str:
    original = rows[0]
    lines = ["| method | eta | runs | memorized (pixels) | memorized_features | precision | recall | Frechet distance "
             "| KID formula | parameters | sampling s |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        mem = "" if row is original else _change(row, original, "memorization_ratio")
        fd = "" if row is original else _change(row, original, "frechet_distance")
        lines.append(f"| {DEMO_LABELS.get(row['method'], row['method'])} | {float(row['eta']):g} | {row['runs']} | "
                     f"{_mean_std(row, 'memorization_ratio', '.3f')}{mem} | "
                     f"{_mean_std(row, 'memorization_ratio_features', '.3f')} | "
                     f"{_mean_std(row, 'precision', '.3f')} | "
                     f"{_mean_std(row, 'recall', '.3f')} | {_mean_std(row, 'frechet_distance', '.1f')}{fd} | "
                     f"{_mean_std(row, 'kid', '.3f')} | {int(float(row['num_parameters'])):,} | "
                     f"{float(row['sampling_seconds']):.2f} |")
    return "\n".join(lines)


def _report_tables(report: str) -> dict[str, dict]:
    """Per setting of a study report: the base-model lines, the table of means, the table against random, the
    remedies table (effect, frontier, costs) and the quality budgets."""
    settings, current, table = {}, None, None
    for line in report.splitlines():
        if line.startswith("## "):
            current = settings.setdefault(line[3:], {"curves": [], "means": [], "random": [], "remedies": [],
                                                     "budgets": []})
            table = "means"
        elif current is None:
            continue
        elif line.startswith("- base "):
            current["curves"].append(line)
        elif line.startswith("Paired difference (method - "):
            table = "random" if line.startswith("Paired difference (method - random)") else None
        elif line.startswith("### Remedies"):
            table = "remedies"
        elif line.startswith("Quality budgets"):
            table = "budgets"
        elif line.startswith("| ") and not line.startswith(("| method", "| condition", "| budget")) and table:
            current[table].append([cell.strip() for cell in line.strip("|").split("|")])
        elif line.startswith("Verdicts"):
            table = None
    return settings


def _short(cell: str, digits: int | None) -> str:
    """``497.841 [428.426, 567.256] verdict`` -> the same rounded to ``digits`` (None: kept), verdict shortened."""
    match = re.match(r"([-+]?[\d.]+) \[([-+]?[\d.]+), ([-+]?[\d.]+)\]\s*(.*)", cell)
    if match is None:  # a mean without interval (fewer than 2 runs)
        return cell
    values, verdict = match.groups()[:3], match.group(4)
    if digits is not None:
        sign = "+" if values[0][0] in "+-" else ""  # differences are signed, means are not
        values = [f"{float(v):{sign}.{digits}f}" for v in values]
    text = f"{values[0]} [{values[1]}, {values[2]}]"
    return f"{text} {VERDICTS[verdict]}" if verdict else text


def _curve_summary(settings: dict) -> str:
    parts = []
    for name, tables in settings.items():
        stops = [int(re.search(r"early stop at step (\d+)", line).group(1)) for line in tables["curves"]]
        original = next(cells for cells in tables["means"] if cells[0] == "original")
        parts.append(f"{name}: the original copies {_short(original[3], None)}, the trainer's early stop keeps the "
                     f"weights of step {min(stops):,}-{max(stops):,}")
    return "Base models: " + "; ".join(parts) + "."


REMEDY_TITLES = ("| condition | eta | frontier | memorized | precision | recall | Frechet distance | KID formula | "
                 "train steps | fine-tune steps | denoising steps / sample |")
BUDGET_TITLES = "| budget | condition | memorized | Frechet distance | train steps | denoising steps / sample |"


def study_tables(report: str) -> str:
    settings = _report_tables(report)
    lines = [_curve_summary(settings)]
    for name, tables in settings.items():
        lines += ["", f"### {name}", "", REMEDY_TITLES, "|---|---|---|---|---|---|---|---|---|---|---|"]
        for cells in tables["remedies"]:
            lines.append(f"| {cells[0]} | {cells[1]} | {cells[2]} | " + " | ".join(
                _short(cells[c], 0 if c == 7 else None) for c in (3, 5, 6, 7, 8)) + f" | {' | '.join(cells[9:12])} |")
        lines += ["", "The condition that copies least within each quality budget:", "", BUDGET_TITLES,
                  "|---|---|---|---|---|---|"]
        lines += [_budget_row(cells) for cells in tables["budgets"]]
        lines += ["", "Paired difference, method - random (same eta), mean [95% t-interval] and verdict:", "",
                  STUDY_TITLES.format(first="method"), "|---|---|---|---|---|---|---|"]
        for cells in tables["random"]:
            lines.append(f"| {cells[0]} | {cells[1]} | " + " | ".join(
                _short(cells[c], 0 if c == 7 else None) for c in (3, 5, 6, 7, 8)) + " |")
    return "\n".join(lines)


def _budget_row(cells: list[str]) -> str:
    if cells[1] == "none":
        return f"| {cells[0]} | none | | | | |"
    eta = "" if cells[2] == "0" else f" (eta {cells[2]})"
    return (f"| {cells[0]} | {cells[1]}{eta} | {_short(cells[3], None)} | {_short(cells[4], 0)} | {cells[6]} | "
            f"{cells[8]} |")


#: The README's short names of the report's quality budgets.
SHORT_BUDGETS = {"recall, FD and KID within the original's 95% interval (or better)": "original's 95% interval",
                 "FD at most 10% above the original's": "FD +10%", "KID at most 10% above the original's": "KID +10%"}


def budget_table(report: str) -> str:
    """The README's table: per setting and quality budget, the condition that copies least and its cost."""
    lines = ["| setting | " + BUDGET_TITLES[2:], "|---|---|---|---|---|---|---|"]
    for name, tables in _report_tables(report).items():
        lines += [f"| {name} {row}" for row in
                  (_budget_row([SHORT_BUDGETS.get(cells[0], cells[0]), *cells[1:]]) for cells in tables["budgets"])]
    return "\n".join(lines)


def detection_tables(report: str) -> str:
    """The detection report from its first section on, its headings two levels deeper (under results.md's own)."""
    body = report[report.index("\n## ") + 1:]
    return "\n".join(f"##{line}" if line.startswith("#") else line for line in body.rstrip("\n").splitlines())


def first_table(report: str) -> str:
    """The first markdown table of a report."""
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    return "\n".join(lines[start:end])


def replace_block(text: str, name: str, content: str) -> str:
    start, end = f"<!-- generated: {name} -->", f"<!-- end: {name} -->"
    if start not in text or end not in text:
        raise ValueError(f"no block {name!r} ({start} ... {end}) to replace.")
    head, rest = text.split(start, 1)
    return f"{head}{start}\n{content}\n{end}{rest.split(end, 1)[1]}"


def render_all(root: Path) -> dict[Path, str]:
    """``{file: its text with every generated table rewritten}``."""
    demo = list(csv.DictReader((root / "docs" / "demo_summary.csv").open()))
    study = (root / "docs" / "study_report.md").read_text()
    detection = (root / "docs" / "detection_results" / "detection_report.md").read_text()
    model_score = (root / "docs" / "detection_results" / "model_score" / "report.md").read_text()
    model_score_runs = (root / "docs" / "detection_results" / "model_score" / "runs.md").read_text()
    readme, results = root / "README.md", root / "docs" / "results.md"
    readme_text = replace_block(readme.read_text(), "demo table", demo_readme_table(demo))
    return {readme: replace_block(readme_text, "study budgets", budget_table(study)),
            results: replace_block(replace_block(replace_block(replace_block(replace_block(
                results.read_text(), "demo table", demo_results_table(demo)), "study tables", study_tables(study)),
                "detection tables", detection_tables(detection)), "model score table", first_table(model_score)),
                "model score runs", first_table(model_score_runs))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("repository", nargs="?", default=str(Path(__file__).resolve().parents[1]),
                        help="The checkout whose README.md and docs/ to rewrite (default: this one).")
    root = Path(parser.parse_args(argv).repository)
    missing = [name for name in ("README.md", "docs/results.md", "docs/demo_summary.csv", "docs/study_report.md",
                                 "docs/detection_results/detection_report.md",
                                 "docs/detection_results/model_score/report.md",
                                 "docs/detection_results/model_score/runs.md") if not (root / name).is_file()]
    if missing:
        parser.error(f"{root} is not a checkout of this project (missing {', '.join(missing)}); pass the folder "
                     "that holds README.md and docs/.")
    for path, text in render_all(root).items():
        write_text(path, text)  # atomic: an interrupted run leaves the old file
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
