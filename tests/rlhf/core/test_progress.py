"""Progress reporting: a bar on a terminal, a plain line every tenth of the way otherwise."""
from rlhf.core.progress import Progress, format_seconds


def test_plain_lines_every_tenth_with_eta_and_a_final_line():
    lines = []
    with Progress(20, "warmup", "step", lines.append, bar=False) as progress:
        for i in range(20):
            progress.update(loss=1.0 / (i + 1))
    assert len(lines) == 10
    assert lines[0].startswith("warmup 2/20  loss 0.5  (") and "ETA" in lines[0]
    assert lines[-1].startswith("warmup 20/20  loss 0.05  (") and "ETA" not in lines[-1]


def test_custom_line_and_more_steps_than_planned():
    lines = []
    progress = Progress(2, "RL", "step", lines.append, bar=False, line=lambda done, total, f: f"step {done}/{total}")
    for _ in range(3):
        progress.update(reward=0.5)
    progress.close()
    progress.close()  # idempotent
    assert [line.split("  ")[0] for line in lines] == ["step 1/2", "step 2/2", "step 3/2"]


def test_bar_mode_draws_on_stderr_and_logs_nothing(capsys):
    lines = []
    with Progress(4, "eval", "prompt", lines.append, bar=True) as progress:
        progress.update(4, acc=0.75)
    assert lines == []
    err = capsys.readouterr().err
    assert "eval" in err and "4/4" in err and "acc=0.75" in err


def test_format_seconds():
    assert [format_seconds(s) for s in (12, 150, 7200)] == ["12 s", "2.5 min", "2.0 h"]
