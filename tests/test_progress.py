"""Progress off a terminal: plain lines at every tenth (at most one a minute), with the rate and the time left;
no carriage returns."""
from __future__ import annotations

import io

from dyntok.progress import LineProgress, progress_bar


def test_a_redirected_log_gets_one_plain_line_per_tenth():
    out = io.StringIO()
    bar = LineProgress(total=20, desc="main epoch 1", unit="step", file=out, min_seconds=0)
    for step in range(20):
        bar.set_postfix(img_s="512", refresh=False)
        bar.update(1)
    bar.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 10 and "\r" not in out.getvalue()
    assert lines[0].startswith("main epoch 1: 2/20 step (10%)") and lines[-1].startswith("main epoch 1: 20/20")
    assert all(" left" in line and "img_s=512" in line for line in lines)


def test_a_loop_left_early_still_reports_where_it_stopped():
    out = io.StringIO()
    with LineProgress(range(100), desc="eval", file=out, min_seconds=0) as bar:
        for index in bar:
            if index == 54:
                break
    assert out.getvalue().splitlines()[-1].startswith("eval: 54/100")  # items 0..53 done


def test_quick_work_prints_nothing():
    out = io.StringIO()
    with LineProgress(range(100), desc="decoding", file=out) as bar:  # far quicker than a minute
        for _ in bar:
            pass
    assert out.getvalue() == ""


def test_progress_bar_is_plain_when_stderr_is_not_a_terminal(capsys):
    assert isinstance(progress_bar(range(3), desc="x"), LineProgress)  # pytest captures stderr: not a TTY
    assert list(progress_bar(range(3), disable=True)) == [0, 1, 2]
