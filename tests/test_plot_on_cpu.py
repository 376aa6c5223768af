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

from recipe.disco.plot import (
    PlotInputError,
    draw,
    find_logs,
    main,
    mean_and_halfwidth,
    plot_runs,
    read_log,
    run_labels,
    student_t_cdf,
    student_t_quantile,
)

FIXTURE = Path(__file__).parent / "fixtures" / "filelogger" / "disco_tiny.jsonl"
ALL_PANELS = ["reward", "entropy", "response_length", "kl", "constraint_active", "score_margin", "val_accuracy"]
BUCKETS = ("hard", "mid", "easy")
DIFFICULTY_PANELS = [
    "heldout_accuracy",
    *(f"train_accuracy_{b}" for b in BUCKETS),
    *(f"weight_share_{b}" for b in BUCKETS),
]
TITLES = [
    "Training reward",
    "Generation entropy",
    "Response length (tokens)",
    "KL estimate",
    "Constraint active (share of trust-region units with KL > delta)",
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
    assert all(f"drew panel {name}" in printed for name in ALL_PANELS)
    skipped = [line.split()[2].rstrip(":") for line in printed.splitlines() if line.startswith("skipped panel")]
    assert skipped == DIFFICULTY_PANELS  # the carry task's panels, absent from this log
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
    running = line(
        axis(fig, "Constraint active (share of trust-region units with KL > delta)"), "disco_tiny (running share)"
    )
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
    running = line(axis(fig, "Constraint active (share of trust-region units with KL > delta)"), "run (running share)")
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
    assert run_labels([find_logs(run)[0] for run in runs], None) == ["a/exp", "b/exp"]


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
    with pytest.raises(PlotInputError, match="holds no .jsonl file"):
        plot_runs([tmp_path])
    shutil.copy(FIXTURE, tmp_path / "a.jsonl")
    shutil.copy(FIXTURE, tmp_path / "b.jsonl")
    with pytest.raises(PlotInputError, match=r"metric '.+' is logged by two files of one run"):
        plot_runs([tmp_path])  # a directory is one run: two copies of a log are not
    with pytest.raises(PlotInputError, match="got 1 --label for 2 runs"):
        plot_runs([tmp_path / "a.jsonl", tmp_path / "b.jsonl"], labels=["a"])
    for name in ("x", "y"):
        (tmp_path / name / "a").mkdir(parents=True)
        shutil.copy(FIXTURE, tmp_path / name / "a" / "exp.jsonl")
    with pytest.raises(PlotInputError, match=r"labels \['a/exp', 'a/exp'\] repeat: give --label values"):
        plot_runs([tmp_path / "x" / "a", tmp_path / "y" / "a"])
    with pytest.raises(PlotInputError, match="smooth=0 must be >= 1"):
        plot_runs([tmp_path / "a.jsonl"], smooth=0)


def test_cli_reports_errors_without_traceback(tmp_path):
    path = write_log(tmp_path / "notes.jsonl", [{"step": 1}])
    with pytest.raises(SystemExit, match=f"error: {path}:1: not a verl file-logger"):
        main([str(path)])


# --- several seeds of a method: mean line and 95 % band ------------------------------------------------------


@pytest.mark.parametrize("x", [-30.0, -2.0, -0.5, 0.0, 0.7, 3.0, 100.0])
def test_student_t_cdf_matches_closed_forms(x):
    assert student_t_cdf(x, 1) == pytest.approx(0.5 + np.arctan(x) / np.pi, abs=1e-10)  # Cauchy
    assert student_t_cdf(x, 2) == pytest.approx(0.5 + x / (2 * np.sqrt(2 + x * x)), abs=1e-10)


def test_student_t_quantiles_match_closed_forms_and_tables():
    for q in (0.6, 0.9, 0.975, 0.995):
        assert student_t_quantile(q, 1) == pytest.approx(np.tan(np.pi * (q - 0.5)), rel=1e-9)
        a = 2 * q - 1
        assert student_t_quantile(q, 2) == pytest.approx(a * np.sqrt(2 / (1 - a * a)), rel=1e-9)
    # two-sided 95 % critical values from printed t tables (df 3, 4, 9, 29) and a textbook CDF value
    for df, value in ((3, 3.182446305), (4, 2.776445105), (9, 2.262157163), (29, 2.045229642)):
        assert student_t_quantile(0.975, df) == pytest.approx(value, abs=1e-8)
    assert student_t_cdf(2.0, 10) == pytest.approx(0.963305982, abs=1e-8)


def test_mean_and_halfwidth_is_the_t_interval():
    mean, halfwidth = mean_and_halfwidth([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5
    assert halfwidth == pytest.approx(3.182446305 * np.std([1, 2, 3, 4], ddof=1) / 2, rel=1e-9)
    assert np.isnan(mean_and_halfwidth([0.7])[1])  # no interval from one seed


def seed_logs(tmp_path: Path) -> tuple[list[Path], dict[int, list[float]]]:
    """Three seeds' logs of one method; the third lacks step 5. Returns the paths and the rewards by step."""
    rewards = {1: [0.1, 0.2, 0.6], 2: [0.3, 0.2, 0.4], 3: [0.5, 0.9, 0.1], 4: [0.2, 0.4, 0.3], 5: [0.8, 0.6]}
    paths = []
    for seed in range(3):
        records = [
            {"step": step, "data": {"critic/score/mean": v[seed]}} for step, v in rewards.items() if seed < len(v)
        ]
        paths.append(write_log(tmp_path / f"seed{seed}.jsonl", records))
    return paths, rewards


def band(ax) -> dict[float, set[float]]:
    """The y values of the confidence band's outline at each step."""
    (collection,) = ax.collections
    outline = collection.get_paths()[0].vertices
    by_step: dict[float, set[float]] = {}
    for x, y in outline:
        by_step.setdefault(round(float(x), 9), set()).add(round(float(y), 9))
    return by_step


def test_seeds_sharing_a_label_are_one_mean_line_with_a_band(tmp_path):
    paths, rewards = seed_logs(tmp_path)
    other = write_log(tmp_path / "other.jsonl", [{"step": s, "data": {"critic/score/mean": 0.5}} for s in (1, 2)])
    assert plot_runs([*paths, other], out=tmp_path / "seeds.png", labels=["A", "A", "A", "B"]) == ["reward"]
    fig, _ = draw({"A": [read_log(p) for p in paths], "B": read_log(other)})
    ax = axis(fig, "Training reward")
    assert {ln.get_label() for ln in ax.get_lines()} == {"A (3 seeds)", "B"}
    mean = line(ax, "A (3 seeds)")
    assert list(mean.get_xdata()) == [1, 2, 3, 4, 5]
    np.testing.assert_allclose(mean.get_ydata(), [np.mean(v) for v in rewards.values()])
    outline = band(ax)  # the single-seed method B has no band
    for step, values in rewards.items():
        t = 4.302652730 if len(values) == 3 else 12.706204736  # t(0.975) with 2 and 1 degrees of freedom
        halfwidth = t * np.std(values, ddof=1) / np.sqrt(len(values))
        expected = {round(np.mean(values) - halfwidth, 9), round(np.mean(values) + halfwidth, 9)}
        assert outline[float(step)] == expected, step


def test_seeds_are_smoothed_before_they_are_averaged(tmp_path):
    paths, rewards = seed_logs(tmp_path)
    fig, _ = draw({"A": [read_log(p) for p in paths]}, smooth=2)
    per_seed = [[v[seed] for v in rewards.values() if seed < len(v)] for seed in range(3)]
    trailing = [[np.mean(s[max(0, i - 1) : i + 1]) for i in range(len(s))] for s in per_seed]
    expected = [np.mean([t[i] for t in trailing if i < len(t)]) for i in range(5)]
    np.testing.assert_allclose(line(axis(fig, "Training reward"), "A (3 seeds)").get_ydata(), expected)


def difficulty_log(path: Path) -> Path:
    """A demo ``difficulty.jsonl`` for the fixture's steps: per-bucket training accuracy and weight share at every
    step, held-out accuracy at the validation steps."""
    records = []
    for step in range(0, 21):
        data = {"difficulty/heldout_acc": 0.3 + 0.02 * step} if step % 10 == 0 else {}
        if step:
            for index, bucket in enumerate(BUCKETS):
                data[f"difficulty/{bucket}/train_acc"] = (0.1 + 0.3 * index + 0.01 * step) % 1
                data[f"difficulty/{bucket}/weight_share"] = [0.5, 0.3, 0.2][index]
        records.append({"step": step, "data": data})
    return write_log(path, records)


def test_a_run_directory_is_read_as_one_run_with_the_difficulty_panels(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(FIXTURE, run / "metrics.jsonl")
    difficulty = difficulty_log(run / "difficulty.jsonl")
    drawn = plot_runs([run], out=tmp_path / "all.png", smooth=3)
    assert drawn == ALL_PANELS + DIFFICULTY_PANELS
    assert "skipped" not in capsys.readouterr().out
    assert imread(tmp_path / "all.png").shape[:2] == (5 * 360, 3 * 500)  # 14 panels in a 5x3 grid
    fig, _ = draw({"run": [read_log(run / "metrics.jsonl") | read_log(difficulty)]}, smooth=3)
    steps, hard = logged(difficulty, "difficulty/hard/train_acc")
    hard_line = line(axis(fig, "Training accuracy, hard bucket"), "run")
    assert list(hard_line.get_xdata()) == steps
    np.testing.assert_allclose(hard_line.get_ydata(), [np.mean(hard[max(0, i - 2) : i + 1]) for i in range(20)])
    steps, heldout = logged(difficulty, "difficulty/heldout_acc")  # validation: not smoothed
    np.testing.assert_allclose(
        line(axis(fig, "Held-out accuracy (all held-out questions)"), "run").get_ydata(), heldout
    )
    share = line(axis(fig, "Share of the update's weight, mid bucket"), "run")
    np.testing.assert_allclose(share.get_ydata(), 0.3)
