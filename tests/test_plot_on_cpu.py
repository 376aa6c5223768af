"""``recipe.disco.plot`` on verl file-logger logs.

``fixtures/filelogger/disco_tiny.jsonl`` was written through verl 0.9.1's own ``verl.utils.tracking.FileLogger``
(numpy values as the trainer logs them) with synthetic values for 20 training steps: verl's usual data, timing and
perf metrics, the ``actor/disco/*`` metrics of the DisCO loss (NaN -> null at step 7, a step without mixed
questions), and validation at steps 0, 10 and 20 for the data sources ``aime`` and ``lighteval/MATH``.
Expected values below are read from the file with ``json`` in this module, not through the code under test.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib.image import imread
from verl.utils.tracking import FileLogger

from recipe.disco.plot import PlotInputError, draw, find_log, main, plot_runs, read_log, run_labels

FIXTURE = Path(__file__).parent / "fixtures" / "filelogger" / "disco_tiny.jsonl"
ALL_PANELS = ["reward", "entropy", "response_length", "kl", "constraint_active", "score_margin", "val_accuracy"]
TITLES = [
    "Training reward",
    "Generation entropy",
    "Response length (tokens)",
    "KL estimate",
    "Constraint active (share of questions with KL > delta)",
    "Positive/negative score margin",
    "Validation accuracy",
]


def logged(path: Path, key: str) -> tuple[list[int], list[float]]:
    """Steps and non-null values of ``key``, straight from the JSON lines."""
    records = [json.loads(line) for line in path.read_text().splitlines()]
    pairs = [(r["step"], r["data"][key]) for r in records if r["data"].get(key) is not None]
    return [s for s, _ in pairs], [v for _, v in pairs]


def axis(fig, title: str):
    (ax,) = [ax for ax in fig.axes if ax.get_title() == title]
    return ax


def line(ax, label: str):
    (found,) = [ln for ln in ax.get_lines() if ln.get_label() == label]
    return found


def write_log(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def without_disco(tmp_path: Path, name: str = "grpo") -> Path:
    """The fixture as a run without DisCO metrics whose reward is logged only as critic/rewards/mean."""
    records = [json.loads(line) for line in FIXTURE.read_text().splitlines()]
    for record in records:
        record["data"] = {
            k: v for k, v in record["data"].items() if not k.startswith("actor/disco/") and k != "critic/score/mean"
        }
    return write_log(tmp_path / f"{name}.jsonl", records)


def test_fixture_png_has_every_panel(tmp_path, capsys):
    out = tmp_path / "curves.png"
    drawn = plot_runs([FIXTURE], out=out)
    assert drawn == ALL_PANELS
    printed = capsys.readouterr().out
    assert all(f"drew panel {name}" in printed for name in ALL_PANELS) and "skipped" not in printed
    image = imread(out)
    assert image.shape[:2] == (3 * 360, 3 * 500)  # 3x3 grid of 5 x 3.6 inch panels at 100 dpi
    assert image[..., :3].std() > 0.05  # not a blank canvas


def test_figure_lines_are_the_logged_values():
    fig, drawn = draw({"disco_tiny": read_log(FIXTURE)}, delta=2e-4)
    assert drawn == ALL_PANELS
    assert [ax.get_title() for ax in fig.axes] == TITLES
    steps, score = logged(FIXTURE, "critic/score/mean")
    reward = line(axis(fig, "Training reward"), "disco_tiny")
    assert list(reward.get_xdata()) == steps == list(range(1, 21))
    np.testing.assert_allclose(reward.get_ydata(), score)

    kl_ax = axis(fig, "KL estimate")
    np.testing.assert_allclose(line(kl_ax, "delta = 0.0002").get_ydata(), [2e-4, 2e-4])
    np.testing.assert_allclose(line(kl_ax, "disco_tiny").get_ydata(), logged(FIXTURE, "actor/disco/kl")[1])

    _, active = logged(FIXTURE, "actor/disco/constraint_active")
    running = line(axis(fig, "Constraint active (share of questions with KL > delta)"), "disco_tiny (running share)")
    np.testing.assert_allclose(running.get_ydata(), [np.mean(active[: i + 1]) for i in range(len(active))])

    margin_ax = axis(fig, "Positive/negative score margin")
    assert {ln.get_label() for ln in margin_ax.get_lines()} == {"score_margin", "pos_score", "neg_score"}
    assert 7 not in line(margin_ax, "score_margin").get_xdata()  # logged as null (NaN)

    val_ax = axis(fig, "Validation accuracy")
    assert {ln.get_label() for ln in val_ax.get_lines()} == {"aime", "lighteval/MATH"}
    for benchmark in ("aime", "lighteval/MATH"):
        steps, acc = logged(FIXTURE, f"val-core/{benchmark}/acc/mean@16")
        assert steps == [0, 10, 20]
        np.testing.assert_allclose(line(val_ax, benchmark).get_ydata(), acc)


def test_smoothing_is_a_trailing_moving_average():
    fig, _ = draw({"run": read_log(FIXTURE)}, smooth=4)
    _, entropy = logged(FIXTURE, "actor/entropy")
    expected = [np.mean(entropy[max(0, i - 3) : i + 1]) for i in range(len(entropy))]
    np.testing.assert_allclose(line(axis(fig, "Generation entropy"), "run").get_ydata(), expected, rtol=1e-6)
    _, active = logged(FIXTURE, "actor/disco/constraint_active")
    running = line(axis(fig, "Constraint active (share of questions with KL > delta)"), "run (running share)")
    np.testing.assert_allclose(running.get_ydata(), np.cumsum(active) / np.arange(1, 21))  # of the raw values
    _, acc = logged(FIXTURE, "val-core/aime/acc/mean@16")
    np.testing.assert_allclose(line(axis(fig, "Validation accuracy"), "aime").get_ydata(), acc)  # not smoothed


def test_missing_metrics_skip_their_panels(tmp_path, capsys):
    run = without_disco(tmp_path)
    fig, drawn = draw({"grpo": read_log(run)})
    assert drawn == ["reward", "entropy", "response_length", "val_accuracy"]
    printed = capsys.readouterr().out
    assert "skipped panel kl: no run logs actor/disco/kl" in printed
    assert "skipped panel constraint_active: no run logs actor/disco/constraint_active" in printed
    assert "skipped panel score_margin: no run logs actor/disco/score_margin, actor/disco/pos_score" in printed
    np.testing.assert_allclose(  # reward falls back to critic/rewards/mean
        line(axis(fig, "Training reward"), "grpo").get_ydata(), logged(FIXTURE, "critic/rewards/mean")[1]
    )


def test_two_runs_share_panels_and_name_the_run_missing_a_metric(tmp_path, capsys):
    other = without_disco(tmp_path)
    drawn = plot_runs([FIXTURE, other], out=tmp_path / "both.png", labels=["DisCO", "GRPO"])
    assert drawn == ALL_PANELS
    assert "drew panel kl (not logged by GRPO)" in capsys.readouterr().out
    fig, _ = draw({"DisCO": read_log(FIXTURE), "GRPO": read_log(other)})
    assert {ln.get_label() for ln in axis(fig, "Training reward").get_lines()} == {"DisCO", "GRPO"}
    assert {ln.get_label() for ln in axis(fig, "Validation accuracy").get_lines()} == {
        "DisCO: aime",
        "DisCO: lighteval/MATH",
        "GRPO: aime",
        "GRPO: lighteval/MATH",
    }


def test_a_later_record_of_a_step_overrides_an_earlier_one(tmp_path):
    records = [{"step": s, "data": {"critic/score/mean": v}} for s, v in ((1, 0.1), (2, 0.2), (1, 0.3))]
    steps, values = read_log(write_log(tmp_path / "log.jsonl", records))["critic/score/mean"]
    assert steps.tolist() == [1, 2] and values.tolist() == [0.3, 0.2]


def test_runs_with_the_same_file_name_are_told_apart_by_directory(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        shutil.copy(FIXTURE, tmp_path / name / "exp.jsonl")
    runs = [tmp_path / "a" / "exp.jsonl", tmp_path / "b"]
    assert run_labels([find_log(run) for run in runs], None) == ["a/exp", "b/exp"]


def test_reads_a_run_directory_written_by_verl_file_logger(tmp_path, monkeypatch):
    monkeypatch.delenv("VERL_FILE_LOGGER_PATH", raising=False)
    monkeypatch.setenv("VERL_FILE_LOGGER_ROOT", str(tmp_path))
    logger = FileLogger("disco_project", "exp1")
    for step in range(1, 4):
        logger.log({"critic/score/mean": np.float32(0.1 * step), "actor/disco/kl": np.float64("nan")}, step=step)
    logger.finish()
    drawn = plot_runs([tmp_path / "disco_project"])
    assert drawn == ["reward"]  # the KL metric is all NaN (null): nothing to draw
    assert (tmp_path / "disco_project" / "disco_curves.png").stat().st_size > 0


def test_module_entry_point(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(FIXTURE, run)
    cmd = [sys.executable, "-m", "recipe.disco.plot", str(run), "--smooth", "3", "--label", "tiny"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert (run / "disco_curves.png").stat().st_size > 0
    assert "drew panel val_accuracy" in done.stdout


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "is empty"),
        ("\n\n", "is empty"),
        (
            '{"step": 1, "data": {"note": "text", "hist": [1, 2], "done": true}}\n',
            "holds no numeric metrics in its 1 records",
        ),
        ("step,reward\n1,0.5\n", ":1: not JSON"),
        ('{"step": 1, "data": {"critic/score/mean": 0.5}}\n{"critic/score/mean": 0.6}\n', ":2: not a verl file-logger"),
        ('{"step": "1", "data": {}}\n', ":1: not a verl file-logger"),
        ('[1, {"a": 2}]\n', ":1: not a verl file-logger"),
    ],
)
def test_not_a_file_logger_log(tmp_path, content, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(PlotInputError, match=message) as err:
        plot_runs([path], out=tmp_path / "x.png")
    assert str(path) in str(err.value)


def test_no_drawable_panel(tmp_path):
    path = write_log(tmp_path / "timing.jsonl", [{"step": 1, "data": {"timing_s/gen": 3.0}}])
    with pytest.raises(PlotInputError, match="log none of the plotted metrics: reward: critic/score/mean or critic"):
        plot_runs([path], out=tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_bad_arguments(tmp_path):
    with pytest.raises(PlotInputError, match="does not exist"):
        plot_runs([tmp_path / "nope.jsonl"])
    with pytest.raises(PlotInputError, match="holds 0 .jsonl files"):
        plot_runs([tmp_path])
    shutil.copy(FIXTURE, tmp_path / "a.jsonl")
    shutil.copy(FIXTURE, tmp_path / "b.jsonl")
    with pytest.raises(PlotInputError, match=r"holds 2 .jsonl files \['a.jsonl', 'b.jsonl'\]"):
        plot_runs([tmp_path])
    with pytest.raises(PlotInputError, match="got 1 --label for 2 runs"):
        plot_runs([tmp_path / "a.jsonl", tmp_path / "b.jsonl"], labels=["a"])
    with pytest.raises(PlotInputError, match="repeat"):
        plot_runs([tmp_path / "a.jsonl", tmp_path / "b.jsonl"], labels=["a", "a"])
    with pytest.raises(PlotInputError, match="smooth=0 must be >= 1"):
        plot_runs([tmp_path / "a.jsonl"], smooth=0)


def test_cli_reports_errors_without_traceback(tmp_path):
    path = write_log(tmp_path / "notes.jsonl", [{"step": 1}])
    with pytest.raises(SystemExit, match=f"error: {path}:1: not a verl file-logger"):
        main([str(path)])
