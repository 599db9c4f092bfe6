"""What a run's workdir already holds, for its report: PTQ results and training curves."""

from __future__ import annotations

from pathlib import Path

from dnq_jax.train import results


def collect_ptq(wd: str | Path) -> list[dict]:
    """One row per distinct PTQ result in the workdir's result files (`train.results`):
    {'method', 'iters', 'n_calib', 'accuracy': {'fp32': top-1, 'w4a4': ...}, 'sources': [file
    names]}. Files holding the same numbers (a grid's results.json and ptq_rtn.json) share a
    row."""
    rows: list[dict] = []
    for name, r in results.in_workdir(wd):
        st = r.get("settings", {})
        row = {
            "method": st.get("method", "rtn"),
            "iters": st.get("iters", 0),
            "n_calib": st.get("n_calib"),
            "accuracy": results.accuracies(r),
        }
        same = next((x for x in rows if {**x, "sources": None} == {**row, "sources": None}), None)
        if same is not None:
            same["sources"].append(name)
        else:
            rows.append({**row, "sources": [name]})
    return rows


def training_summary(rows: list[dict]) -> dict:
    """The last epoch's numbers of metrics.jsonl's epoch rows, the largest noise lambda and
    the summed epoch time ({'epochs_logged': 0} without rows)."""
    if not rows:
        return {"epochs_logged": 0}
    last = rows[-1]
    tested = [r for r in rows if "test_acc" in r]
    return {
        "epochs_logged": len(rows),
        "final_epoch": last["epoch"],
        "train_loss": last["train_loss"],
        "train_acc": last.get("train_acc"),
        "test_acc": tested[-1]["test_acc"] if tested else None,
        "max_lambda": max(float(r.get("lambda", 0.0)) for r in rows),
        "epoch_time_s": sum(float(r.get("epoch_time_s", 0.0)) for r in rows),
    }
