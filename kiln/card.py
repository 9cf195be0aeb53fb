"""The model card: ``model/README.md``, what a Hugging Face user expects to find next to the weights.

It is written from the run's own records (``run.json``, ``model/kiln.json``, ``model/config.json``),
so it says what was trained, on which files, how well it scores and the exact command that made it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def parameter_count(model_dir: Path) -> int:
    """Parameters stored in the safetensors files (tied weights are stored once), read from headers."""
    from safetensors import safe_open

    total = 0
    for file in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as weights:
            for name in weights.keys():  # noqa: SIM118 (safe_open is not a dict)
                count = 1
                for size in weights.get_slice(name).get_shape():
                    count *= size
                total += count
    return total


def _number(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def _metrics_table(rows: dict[str, dict]) -> list[str]:
    names = [k for k in dict.fromkeys(k for metrics in rows.values() for k in metrics) if k != "n"]
    lines = ["| split | examples | " + " | ".join(names) + " |", "|---" * (len(names) + 2) + "|"]
    for split, metrics in rows.items():
        cells = [_number(metrics[k]) if k in metrics else "" for k in names]
        lines.append(f"| {split} | {metrics.get('n', '')} | " + " | ".join(cells) + " |")
    return lines


def model_card(run_dir: Path) -> str:
    """The card's Markdown for a finished run directory."""
    from kiln.tasks import task_class

    run = json.loads((run_dir / "run.json").read_text())
    model_dir = run_dir / "model"
    saved = json.loads((model_dir / "kiln.json").read_text())
    config = json.loads((model_dir / "config.json").read_text())
    task = run["task"]
    facts = task_class(task).card_facts(config)
    auto, labels = facts.auto_model, facts.labels
    params = parameter_count(model_dir)
    splits = run.get("splits", {})
    rows = {"validation": saved.get("metrics", {})}
    if run.get("test_metrics"):
        rows["test"] = run["test_metrics"]
    start = f"fine-tuned from `{run['init']}`" if run.get("init") else "trained from random weights"
    lines = [
        "---",
        "library_name: transformers",
        f"pipeline_tag: {facts.pipeline_tag}",
        "tags: [kiln]",
        "---",
        "",
        f"# {run_dir.name}",
        "",
        f"A {config.get('model_type', 'transformer')} model ({params / 1e6:.2f}M parameters) for the kiln task "
        f"`{task}`, {start} with the profile `{run['profile']}` (kiln {run['kiln_version']}, "
        f"{run.get('precision', 'fp32')}). It is the checkpoint of step {saved.get('step', '?')}"
        + (", the best on the validation split." if saved.get("metrics") else ", the last one."),
        "",
        "## Data",
        "",
        *[f"- {split}: `{path}`" for split, path in splits.items()],
        *([f"- labels ({len(labels)}): " + ", ".join(f"`{label}`" for label in labels)] if labels else []),
        "",
        "## Results",
        "",
        *(_metrics_table(rows) if any(rows.values()) else ["No evaluation was run."]),
        "",
        "## Use",
        "",
        "```python",
        f"from transformers import {auto}, AutoTokenizer",
        "",
        f'model = {auto}.from_pretrained("PATH/TO/{run_dir.name}/model")',
        f'tokenizer = AutoTokenizer.from_pretrained("PATH/TO/{run_dir.name}/model")',
        "```",
        "",
    ]
    for note in facts.notes:
        lines += [note, ""]
    lines += ["With kiln: `kiln predict PATH/TO/" + run_dir.name + " INPUT` or `kiln evaluate PATH/TO/"
              + run_dir.name + " LABELLED`.", "", "## Training", "", "```", run.get("command", ""), "```", ""]
    return "\n".join(lines)


def write_model_card(run_dir: Path) -> Path:
    """Write ``model/README.md`` atomically."""
    from kiln.files import write_text_atomic

    target = run_dir / "model" / "README.md"
    write_text_atomic(target, model_card(run_dir))
    return target
