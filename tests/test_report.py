"""The run report: curves from metrics.jsonl (also of a killed run), clear errors for a broken file."""

import json

import pytest

from p2o_hpc.run_dir import RunDir
from p2o_hpc.trainer.report import main, read_metrics, write_report


def fake_rows(steps: int) -> list[dict]:
    rows = []
    for step in range(1, steps + 1):
        row = {"step": step, "epoch": (step - 1) // 4, "reward/mean": step / steps, "advantage/zero_group_frac": 0.5,
               "response/length_mean": 100.0 + step, "actor/loss": -0.01, "actor/grad_norm": 0.3, "actor/lr": 1e-6,
               "time/generate": 2.0, "time/update": 1.0, "time/weight_sync": 0.05, "time/step": 3.1}
        if step % 4 == 0:
            row["hard/size"] = 10 - step
        rows.append(row)
    return rows


def test_png_and_table_from_a_killed_runs_metrics(tmp_path, capsys):
    run_dir = RunDir(tmp_path)
    lines = [json.dumps(row) for row in fake_rows(8)]
    run_dir.metrics.write_text("\n".join(lines) + '\n{"step": 9, "rew')  # cut off mid-write
    assert [row["step"] for row in read_metrics(run_dir)] == list(range(1, 9))
    assert main([str(tmp_path)]) == 0
    png = (run_dir.plots / "training.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 20_000
    assert "reward/mean" in capsys.readouterr().out


def test_broken_line_inside_the_file_names_file_and_line(tmp_path):
    rows = [json.dumps(row) for row in fake_rows(3)]
    rows[1] = "{not json"
    run_dir = RunDir(tmp_path)
    run_dir.metrics.write_text("\n".join(rows) + "\n")
    with pytest.raises(ValueError, match=rf"{run_dir.metrics.name}:2: not JSON"):
        write_report(run_dir)


def test_missing_run_dir_is_a_clear_error(tmp_path, capsys):
    assert main([str(tmp_path / "nope")]) == 2
    assert "no metrics" in capsys.readouterr().out
