"""The README's code examples run as written."""

import math
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def run_section(title: str) -> dict:
    """Executes the ```python block of the README section `## {title}`; returns its globals."""
    text = README.read_text()
    section = re.search(rf"^## {re.escape(title)}\s*$(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert section is not None, f"README.md has no '## {title}' section"
    block = re.search(r"```python\n(.*?)```", section.group(1), re.S)
    assert block is not None, f"README section '{title}' has no python block"
    namespace = {"__name__": "readme_example"}
    exec(compile(block.group(1), str(README), "exec"), namespace)
    return namespace


def test_quantize_any_flax_model_example(capsys):
    run_section("Quantize any Flax model")
    out = capsys.readouterr().out
    assert "FP32 top-1:" in out and "W4A4 top-1:" in out


def test_dnq_noise_in_your_own_train_step_example(capsys):
    ns = run_section("Add DNQ noise to your own train step")
    out = capsys.readouterr().out
    assert "W2A4 top-1:" in out
    assert math.isfinite(float(ns["loss"]))
    # As the README says: stats, step and lambda are arguments, so 40 steps with a ramp and
    # five re-profilings compiled the step once.
    assert ns["train_step"]._cache_size() == 1
    assert int(ns["stats"].count) == 5


def test_reconstruction_ptq_example(capsys):
    ns = run_section("Reconstruction PTQ: AdaRound, BRECQ, QDrop")
    out = capsys.readouterr().out
    assert [line.split()[0] for line in out.splitlines()] == ["stem", "block", "head"]
    report = ns["qm"].report
    assert report["method"] == "qdrop" and report["settings"]["iters"] == 100
