"""TensorBoard monitor: panels, scalars read back with TensorBoard's own reader, curves exported to PNG."""

import numpy as np
from PIL import Image

from rl.monitor import LABEL_HEIGHT, RunMonitor, image_panel, read_scalars
from tools.plot import moving_average, plot_runs


def test_panel_layout_and_missing_hr():
    lr = np.zeros((16, 16, 3), np.uint8)
    panel = image_panel({"lr": lr, "rough": lr, "middle": np.zeros((32, 32, 3), np.uint8),
                         "final": np.zeros((64, 64, 3), np.uint8), "hr": None}, height=32)
    assert panel.shape[0] == LABEL_HEIGHT + 32 and panel.dtype == np.uint8
    assert (panel[LABEL_HEIGHT:, -32:] == 128).all()  # no HR: a grey tile keeps the layout
    labels = panel[:LABEL_HEIGHT]
    starts = [0, 34, 68, 102, 136]  # tiles of 32 px (the final one resized to 32) and 2 px separators
    for x in starts:  # every column has its name written above it (white text on black)
        assert labels[:, x:x + 32].max() > 200, x
    assert (labels[:, 32:34] == 0).all()


def test_scalars_round_trip_and_png(tmp_path):
    mon = RunMonitor(tmp_path / "run" / "tensorboard", total_steps=3, progress_bar=False)
    for step in range(1, 4):
        mon.scalars(step, {"reward/total/mean": step / 10, "skip": float("nan")})
    mon.text(1, "chain/text", "<degradation>x</degradation>")
    mon.close()
    scalars = read_scalars(tmp_path / "run" / "tensorboard")
    assert [v for _, v in scalars["reward/total/mean"]] == pytest_approx([0.1, 0.2, 0.3])
    assert "skip" not in scalars  # non-finite values are not written
    out = tmp_path / "curves.png"
    assert plot_runs([tmp_path / "run"], ["reward/total/mean", "absent"], out) == ["reward/total/mean"]
    assert Image.open(out).size[0] > 100


def test_moving_average():
    v = np.array([0.0, 2.0, 4.0, 6.0])
    assert np.allclose(moving_average(v, 2), [0.0, 1.0, 3.0, 5.0])


def pytest_approx(values):
    import pytest

    return pytest.approx(values, rel=1e-6)


def test_run_console_keeps_the_terminal_for_the_runs_own_lines(tmp_path, capfd):
    """rl.console: third-party prints, warnings and log records go to run.log; the run's own log lines reach
    the terminal (and run.log); afterwards stdout and stderr are the terminal again."""
    import logging
    import os
    import warnings

    from rl.console import run_console, stream

    logging.basicConfig(level=logging.INFO, force=True)  # as rl.launch: the root handler writes to stderr
    log = tmp_path / "run.log"
    with run_console(log) as terminal:
        assert stream() is terminal
        print("a third-party print")
        os.write(2, b"C-level stderr\n")
        warnings.warn("a library warning")
        logging.getLogger("some_library.engine").warning("a library log line")
        logging.getLogger("rl.trainer").info("checkpoint step_000002")
        terminal.flush()
    print("after the run")
    seen = capfd.readouterr()
    shown = seen.out + seen.err
    assert "checkpoint step_000002" in shown and "after the run" in shown
    for noise in ("a third-party print", "C-level stderr", "a library warning", "a library log line"):
        assert noise not in shown, noise
    text = log.read_text()
    for line in ("a third-party print", "C-level stderr", "a library warning", "a library log line",
                 "checkpoint step_000002"):
        assert line in text, line
