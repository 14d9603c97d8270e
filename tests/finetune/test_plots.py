"""Loss plots from metrics.jsonl: what is read (torn lines, nulls, evaluations between logged steps), the picture
(a real PNG, both curves drawn in their colours), comparisons, and every bad input as a UserError."""
from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

from finetune.errors import UserError
from finetune.plots import load_curves, plot, plot_run, plot_runs, read_metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def write_run(folder, *, tokens=True, val=True, scale=1.0, steps=range(10, 101, 10)):
    """A metrics.jsonl as RunLog writes it, with an evaluation at step 25 (between logged steps), a skipped step's
    NaN written as null, a blank line and a line torn by a crash."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = [{"step": 0, "val_exact_match": 0.0}]
    for step in steps:
        line = {"step": step, "train_loss": scale * 4.0 / step, "lr": 1e-3 * step / 100, "grad_norm": 0.5}
        if tokens:
            line.update(tokens=step * 1000, tokens_per_s=5000.0)
        lines.append(line)
        if val and step in (20, 50, 100):
            lines.append({"step": step, "val_loss": scale * 5.0 / step, "val_ppl": 1.5})
    if val:
        lines += [{"step": 25, "val_loss": scale * 0.2, "val_ppl": 1.2}, {"step": 5, "val_loss": scale * 0.9}]
    lines.append({"step": 60, "train_loss": None, "lr": 6e-4, "grad_norm": None})  # a skipped step, logged again
    lines.append({"step": 70, "train_loss": float("nan")})  # written as NaN by another writer than RunLog
    text = "\n".join(json.dumps(line) for line in lines) + "\n\n" + '{"step": 110, "train_lo'
    (folder / "metrics.jsonl").write_text(text)
    return folder


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def pixels_near(path, rgb, tolerance=0.08) -> int:
    """How many pixels of the PNG have about this colour."""
    import matplotlib.image
    import numpy as np

    image = matplotlib.image.imread(str(path))[..., :3]
    return int((np.abs(image - np.array(rgb) / 255).max(axis=-1) < tolerance).sum())


BLUE, ORANGE, GREEN = (31, 119, 180), (255, 127, 14), (44, 160, 44)  # matplotlib's C0, C1, C2


def test_read_metrics_skips_blank_and_torn_lines(tmp_path):
    run = write_run(tmp_path / "run")
    records = read_metrics(run / "metrics.jsonl")
    assert len(records) == 1 + 10 + 3 + 2 + 2
    assert records[-2] == {"step": 60, "train_loss": None, "lr": 6e-4, "grad_norm": None}


def test_curves_place_evaluations_by_tokens_and_drop_nulls(tmp_path, capsys):
    curves = load_curves(write_run(tmp_path / "run"))
    assert capsys.readouterr().err == f"note: {tmp_path / 'run' / 'metrics.jsonl'}: 1 unreadable line skipped\n"
    x, y = curves.points("train_loss", by_tokens=True)
    assert x == [step * 1000 for step in range(10, 101, 10)]
    assert y[5:7] == pytest.approx([4.0 / 60, 4.0 / 70])  # a later null or NaN for a step does not erase it
    x, y = curves.points("val_loss", by_tokens=True)
    assert x == [5_000, 20_000, 25_000, 50_000, 100_000]  # steps 5 and 25 interpolated (no tokens at step 0)
    assert y == pytest.approx([0.9, 0.25, 0.2, 0.1, 0.05])
    assert curves.points("lr", by_tokens=False)[1][5] == pytest.approx(6e-4)  # a later line for a step wins
    assert curves.points("val_loss", by_tokens=False)[0] == [5, 20, 25, 50, 100]


def test_plot_run_writes_loss_png_with_both_curves(tmp_path):
    pyplot_before = "matplotlib.pyplot" in sys.modules
    run = write_run(tmp_path / "run")
    path = plot_run(run)
    assert path == run / "loss.png"
    assert png_size(path) == (1100, 420)
    assert path.stat().st_size > 20_000
    assert sorted(os.listdir(run)) == ["loss.png", "metrics.jsonl"]  # no temporary file left
    assert pixels_near(path, BLUE) > 200 and pixels_near(path, ORANGE) > 200 and pixels_near(path, GREEN) > 200
    assert ("matplotlib.pyplot" in sys.modules) == pyplot_before  # no global backend set on the way

    without_val = plot_run(write_run(tmp_path / "train-only", val=False), tmp_path / "train-only.png")
    assert pixels_near(without_val, ORANGE) < 20  # no validation line drawn from nothing


def test_plot_runs_compares_runs_in_one_picture(tmp_path):
    a = write_run(tmp_path / "lr-3e-4")
    b = write_run(tmp_path / "lr-1e-3", scale=1.5, steps=range(10, 61, 10))
    path = plot_runs([a, b], tmp_path / "compare.png")
    assert png_size(path) == (1100, 420)
    assert pixels_near(path, BLUE) > 200 and pixels_near(path, ORANGE) > 200  # one colour per run
    assert not (a / "loss.png").exists()


def test_plot_command_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_run(tmp_path / "a")
    write_run(tmp_path / "b", tokens=False)  # no token counts: both runs are drawn against steps
    assert plot(["a"]) == Path("a", "loss.png") and (tmp_path / "a" / "loss.png").is_file()
    assert str(plot(["a", "b"])) == "loss_comparison.png" and (tmp_path / "loss_comparison.png").is_file()
    svg = plot(["a", "b"], "cmp.svg")
    assert svg.read_text().lstrip().startswith("<?xml") and "<svg" in svg.read_text()


@pytest.mark.parametrize("case, message", [
    ("missing", "no such run folder"),
    ("a file", "is a file; give a run's output folder"),
    ("no metrics", "has no metrics.jsonl"),
    ("no losses", "no train_loss or val_loss values to plot"),
])
def test_bad_runs_are_user_errors(tmp_path, case, message):
    run = tmp_path / "run"
    if case == "a file":
        run.write_text("x")
    elif case == "no metrics":
        run.mkdir()
    elif case == "no losses":
        run.mkdir()
        (run / "metrics.jsonl").write_text('{"step": 0, "val_exact_match": 0.0}\n{"step": 10, "train_loss": null}\n'
                                           'not json\n')
    with pytest.raises(UserError, match=message):
        plot_run(run)
    with pytest.raises(UserError, match=message):
        plot_runs([write_run(tmp_path / "good"), run], tmp_path / "cmp.png")
    assert not (tmp_path / "cmp.png").exists()


def test_bad_outputs_are_user_errors_and_nothing_is_written(tmp_path):
    run = write_run(tmp_path / "run")
    (tmp_path / "folder.png").mkdir()
    target = tmp_path / "target.png"
    target.write_bytes(b"keep")
    (tmp_path / "link.png").symlink_to(target)
    with pytest.raises(UserError, match="is a folder"):
        plot_run(run, tmp_path / "folder.png")
    with pytest.raises(UserError, match="is a symbolic link"):
        plot_run(run, tmp_path / "link.png")
    with pytest.raises(UserError, match=r"ends in \.png, \.svg, \.pdf"):
        plot_run(run, tmp_path / "loss.jpg")
    with pytest.raises(UserError, match="metrics.jsonl is a file"):
        plot_runs([run], run / "metrics.jsonl" / "cmp.png")
    with pytest.raises(UserError, match="at least one run folder"):
        plot_runs([], tmp_path / "cmp.png")
    assert target.read_bytes() == b"keep" and (tmp_path / "link.png").is_symlink()
    assert sorted(os.listdir(tmp_path)) == ["folder.png", "link.png", "run", "target.png"]
    assert sorted(os.listdir(run)) == ["metrics.jsonl"]


def test_missing_matplotlib_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import matplotlib.figure now fails
    with pytest.raises(UserError, match=r"plotting needs matplotlib: pip install 'llama-finetune\[plot\]'"):
        plot_run(write_run(tmp_path / "run"))
    assert not (tmp_path / "run" / "loss.png").exists()
