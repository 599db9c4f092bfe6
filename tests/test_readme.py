"""The code examples of README.md and docs/*.md run as written."""

import math
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def section_blocks(page: str, title: str) -> list[str]:
    """The ```python blocks of the section `## {title}` of `page` (relative to the root)."""
    text = (ROOT / page).read_text()
    section = re.search(rf"^## {re.escape(title)}\s*$(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert section is not None, f"{page} has no '## {title}' section"
    blocks = re.findall(r"```python\n(.*?)```", section.group(1), re.S)
    assert blocks, f"{page} section '{title}' has no python block"
    return blocks


def run_section(
    page: str, title: str, replace: dict[str, str] | None = None, index: int = 0
) -> dict:
    """Executes the `index`-th ```python block of `page`'s section `## {title}`; returns its
    globals. `replace` swaps strings of the block first (a scratch folder for a fixed path)."""
    code = section_blocks(page, title)[index]
    for old, new in (replace or {}).items():
        assert old in code, f"{page} section '{title}' no longer holds {old!r}"
        code = code.replace(old, new)
    namespace = {"__name__": "docs_example"}
    exec(compile(code, str(ROOT / page), "exec"), namespace)
    return namespace


def test_readme_quantize_any_flax_model_example(capsys):
    ns = run_section("README.md", "Quantize any Flax model")
    out = capsys.readouterr().out
    assert "FP32 top-1:" in out and "W4A4 top-1:" in out
    assert 4 in {w for w, _ in ns["qm"].bits_per_layer.values()}  # not every layer at 8 bits


def test_readme_nnx_example(capsys):
    ns = run_section("README.md", "Quantize any Flax model", index=1)
    assert "NNX W4A4 top-1:" in capsys.readouterr().out
    assert set(ns["qm"].bits_per_layer) == {"convs_0", "convs_1", "head"}


def test_quantize_any_flax_model_example(capsys):
    run_section("docs/api.md", "Quantize any Flax model")
    out = capsys.readouterr().out
    assert "FP32 top-1:" in out and "W4A4 top-1:" in out


def test_scanned_stack_example(capsys):
    run_section("docs/api.md", "Lifted transforms: nn.remat, nn.scan, nn.vmap")
    out = capsys.readouterr().out
    assert "'stack/Dense_1[0]', 'stack/Dense_0[0]', 'stack/Dense_1[1]'" in out


def test_nnx_train_step_example(capsys):
    ns = run_section("docs/api.md", "NNX models")
    out = capsys.readouterr().out
    assert "W2A4 top-1:" in out and math.isfinite(float(ns["loss"]))
    # The BatchNorm statistics were written back into the NNX model, and the step compiled
    # once for 40 steps with five re-profilings and a ramp.
    assert float(abs(ns["model"].bn1.mean.value).sum()) > 0
    assert ns["train_step"].jitted_fn._cache_size() == 1


def test_dnq_noise_in_your_own_train_step_example(capsys):
    ns = run_section("docs/api.md", "Add DNQ noise to your own train step")
    out = capsys.readouterr().out
    assert "W2A4 top-1:" in out
    assert math.isfinite(float(ns["loss"]))
    # As docs/api.md says: stats, step and lambda are arguments, so 40 steps with a ramp and
    # five re-profilings compiled the step once.
    assert ns["train_step"]._cache_size() == 1
    assert int(ns["stats"].count) == 5


def test_reconstruction_ptq_example(capsys):
    ns = run_section("docs/api.md", "Reconstruction PTQ: AdaRound, BRECQ, QDrop")
    out = capsys.readouterr().out
    assert [line.split()[0] for line in out.splitlines()] == ["stem", "block", "head"]
    report = ns["qm"].report
    assert report["method"] == "qdrop" and report["settings"]["iters"] == 100


@pytest.mark.slow
def test_notebook_example(capsys, tmp_path):
    ns = run_section(
        "docs/api.md", "Use it from a notebook", replace={'"/tmp/run"': repr(str(tmp_path))}
    )
    assert (tmp_path / "results.json").exists()
    assert {"fp32", "w4a4"} <= set(ns["results"])
