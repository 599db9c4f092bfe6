"""The demo's cells and table: QDrop only at the DNQ targets, the gains it prints."""

import pytest

from dnq_jax.grid import demo


def test_the_demo_reconstructs_only_at_the_dnq_targets():
    sgd, half = demo.demo_cells(10, ("w2a4",))
    assert sgd.bits == half.bits == ((4, 4), (2, 4))
    for cell in (sgd, half):
        assert cell.bits_for("rtn") == ((4, 4), (2, 4))
        assert cell.bits_for("qdrop") == ((2, 4),)
    # The default form: the paper's at lambda 0.5; the paper's at lambda 1 when asked.
    assert half.overrides == "method=dnq_half" and sgd.config.noise.weight == "none"
    assert (half.config.noise.weight, half.config.noise.lambda_max) == ("differential", 0.5)
    (_, lam08) = demo.demo_cells(10, ("w2a4",), "lam08")
    assert (lam08.config.noise.weight, lam08.config.noise.lambda_max) == ("naive", 0.8)
    (_, dnq) = demo.demo_cells(10, ("w2a4",), "dnq")
    assert dnq.config.noise.weight == "differential" and dnq.config.noise.lambda_max == 1.0
    (_, naive) = demo.demo_cells(10, ("w2a4",), "naive")
    assert naive.config.noise.weight == "naive" and naive.overrides == "method=naive"
    (_, authors) = demo.demo_cells(10, ("w2a4",), "authors")
    assert authors.overrides == "method=authors" and authors.config.noise.lambda_max == 0.8
    # One DNQ model per target: each evaluated at its own precision only, QDrop at both.
    cells = demo.demo_cells(10, ("w4a4", "w2a4"), "dnq")
    assert [c.name for c in cells] == ["sgd_s0", "dnq_w4a4_s0", "dnq_w2a4_s0"]
    assert [c.bits for c in cells[1:]] == [((4, 4),), ((2, 4),)]
    assert cells[0].bits_for("qdrop") == ((4, 4), (2, 4))


def _record(fp32, rtn, qdrop):
    return {"fp32": fp32, "ptq": {"rtn": rtn, "qdrop": qdrop}}


def test_the_demo_table_prints_the_columns_measured_and_the_gains():
    records = {
        "sgd": _record(86.5, {"w4a4": 83.75, "w2a4": 46.5}, {"w2a4": 80.75}),
        "dnq_w2a4": _record(82.0, {"w4a4": 81.5, "w2a4": 75.25}, {"w2a4": 81.0}),
    }
    text = demo.format_table(records, 10, 2000, "dnq")
    head, sgd, dnq = text.strip().splitlines()[1:4]
    assert head.split() == ["model", "FP32", "W4A4", "RTN", "W2A4", "RTN", "W2A4", "QDROP"]
    assert sgd.split() == ["SGD", "86.50", "83.75", "46.50", "80.75"]
    assert dnq.split()[-4:] == ["82.00", "81.50*", "75.25", "81.00"]
    assert "QDrop: 2000 iterations per block" in text
    assert "DNQ - SGD: FP32 -4.50" in text
    assert "W4A4* RTN -2.25; W2A4 RTN +28.75, QDROP +0.25" in text
    assert "* off target: no DNQ model was trained with the noise at W4A4" in text
    rtn_only = {n: {**r, "ptq": {"rtn": r["ptq"]["rtn"]}} for n, r in records.items()}
    text = demo.format_table(rtn_only, 10, 0, "dnq")
    assert "no QDrop (--qdrop-iters 0)" in text and "QDROP" not in text
    assert "W2A4 RTN +28.75" in text
    sgd = _record(86.5, {"w4a4": 83.75, "w2a4": 46.5}, {"w4a4": 85.5, "w2a4": 80.75})
    three = {
        "sgd": sgd,
        "dnq_w4a4": _record(86.0, {"w4a4": 83.5}, {"w4a4": 85.0}),
        "dnq_w2a4": _record(82.0, {"w2a4": 75.25}, {"w2a4": 81.0}),
    }
    text = demo.format_table(three, 10, 2000, "dnq")
    assert "DNQ - SGD: FP32 noise at W4A4 -0.50, noise at W2A4 -4.50" in text
    assert "W4A4 RTN -0.25, QDROP -0.50; W2A4 RTN +28.75, QDROP +0.25" in text
    assert "off target" not in text
    named = demo.format_table(records, 10, 2000, "naive")
    assert "DNQ naive (noise at W2A4)" in named and "DNQ naive - SGD: FP32 -4.50" in named


def test_the_demo_refuses_a_method_without_noise_and_an_unknown_one(capsys):
    from dnq_jax.cli import grid as cli

    assert cli.demo_main(["--method", "sgd", "--workdir", "unused"]) != 0
    assert "trains without noise" in capsys.readouterr().err
    assert cli.demo_main(["--method", "dnqq", "--workdir", "unused"]) != 0
    assert "unknown 'dnqq'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "flag,value", [("--dnq-targets", "w8a8"), ("--dnq-targets", ""), ("--qdrop-iters", "-1")]
)
def test_the_demo_refuses_other_targets_and_a_negative_count(flag, value, capsys):
    from dnq_jax.cli import grid as cli

    assert cli.demo_main([flag, value, "--workdir", "unused"]) != 0
    assert flag in capsys.readouterr().err
