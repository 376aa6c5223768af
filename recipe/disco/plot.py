"""Draw DisCO's training-dynamics panels from verl's ``file`` logger.

verl's file logger (``trainer.logger=[console,file]``) writes one JSON object per logged step,
``{"step": N, "data": {metric: value}}``, to ``$VERL_FILE_LOGGER_PATH`` or
``$VERL_FILE_LOGGER_ROOT/<project_name>/<experiment_name>.jsonl`` (the root defaults to the working directory).

    python -m recipe.disco.plot RUN [RUN ...] [--label NAME ...] [--out PNG] [--delta 1e-4] [--smooth N]

Each RUN is such a ``.jsonl`` file, or a directory whose ``.jsonl`` files (not searched recursively) are read as
one run: the demo writes verl's ``metrics.jsonl`` and its own ``difficulty.jsonl`` side by side; a metric logged by
two files of one run is refused. Runs are labelled by the stem of their (first) file unless ``--label`` is given
once per run. Runs with the same label are seeds of one method: they are drawn as the mean over seeds with a 95 %
confidence band (Student's t over seeds, after each seed's smoothing). The PNG goes to ``--out`` or to
``disco_curves.png`` next to the first run's log. Panels whose metrics no run logged are skipped, and the reason is
printed. Extend ``PANELS`` to draw more.
"""

import argparse
import json
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

Series = tuple[np.ndarray, np.ndarray]  # (steps, values), sorted by step
Run = dict[str, Series]
LINESTYLES = ("-", "--", ":", "-.")
MARKERS = ("o", "s", "^", "v", "D", "P", "X")
NCOLS = 3
CONFIDENCE = 0.95  # of the band drawn around the mean of several seeds
BUCKETS = ("hard", "mid", "easy")  # difficulty buckets of the demo's carry task (recipe.disco.cpu.carry)


class PlotInputError(ValueError):
    """A RUN argument or log file that cannot be plotted."""


@dataclass(frozen=True)
class PanelSpec:
    name: str
    title: str
    series: tuple[tuple[str, ...], ...] = ()  # one line per entry; an entry lists a metric and its fallbacks
    pattern: str = ""  # regex with a ``label`` group: one line per matching metric (e.g. per benchmark)
    pattern_hint: str = ""  # the pattern in words, for messages
    smooth: bool = True  # apply --smooth
    delta_line: bool = False  # horizontal line at --delta
    running_mean: bool = False  # also draw the running mean of each line

    def keys_wanted(self) -> str:
        return self.pattern_hint or ", ".join(" or ".join(alternatives) for alternatives in self.series)


PANELS = (
    PanelSpec("reward", "Training reward", series=(("critic/score/mean", "critic/rewards/mean"),)),
    PanelSpec("entropy", "Generation entropy", series=(("actor/entropy",),)),
    PanelSpec("response_length", "Response length (tokens)", series=(("response_length/mean",),)),
    PanelSpec("kl", "KL estimate", series=(("actor/disco/kl",),), delta_line=True),
    PanelSpec(
        "constraint_active",
        "Constraint active (share of trust-region units with KL > delta)",
        series=(("actor/disco/constraint_active",),),
        running_mean=True,
    ),
    PanelSpec(
        "score_margin",
        "Positive/negative score margin",
        series=(("actor/disco/score_margin",), ("actor/disco/pos_score",), ("actor/disco/neg_score",)),
    ),
    PanelSpec(
        "val_accuracy",
        "Validation accuracy",
        pattern=r"val-core/(?P<label>.+)/(?:acc|reward)/mean@\d+",
        pattern_hint="val-core/<data_source>/acc/mean@<n> or val-core/<data_source>/reward/mean@<n>",
        smooth=False,
    ),
    PanelSpec(
        "heldout_accuracy",
        "Held-out accuracy (all held-out questions)",
        series=(("difficulty/heldout_acc",),),
        smooth=False,
    ),
    *(
        PanelSpec(
            f"train_accuracy_{bucket}",
            f"Training accuracy, {bucket} bucket",
            series=((f"difficulty/{bucket}/train_acc",),),
        )
        for bucket in BUCKETS
    ),
    *(
        PanelSpec(
            f"weight_share_{bucket}",
            f"Share of the update's weight, {bucket} bucket",
            series=((f"difficulty/{bucket}/weight_share",),),
        )
        for bucket in BUCKETS
    ),
)


def find_logs(run: str | Path) -> list[Path]:
    """The file-logger JSONL files of ``run``: the file itself, or the ``.jsonl`` files in a directory."""
    path = Path(run)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise PlotInputError(f"RUN {str(run)!r} does not exist: pass a verl file-logger .jsonl or its directory")
    logs = sorted(path.glob("*.jsonl"))
    if not logs:
        raise PlotInputError(f"RUN directory {str(path)!r} holds no .jsonl file: pass a verl file-logger log")
    return logs


def read_run(logs: Sequence[Path]) -> Run:
    """The metrics of one run's log files, merged; a metric in two of them is refused."""
    run: Run = {}
    for log in logs:
        for key, series in read_log(log).items():
            if key in run:
                raise PlotInputError(
                    f"metric {key!r} is logged by two files of one run ({[str(p) for p in logs]}): "
                    "pass the log file itself"
                )
            run[key] = series
    return run


def read_log(path: Path) -> Run:
    """Numeric metrics of one file-logger log; a later line overrides an earlier one for the same step and metric."""
    points: dict[str, dict[int, float]] = {}
    records = 0
    with open(path, encoding="utf-8") as handle:
        for lineno, line in enumerate(handle, start=1):
            if line.strip():
                records += 1
                step, data = _parse_line(line, f"{path}:{lineno}")
                for key, value in data.items():
                    if isinstance(value, int | float) and not isinstance(value, bool):  # NaN is logged as null
                        points.setdefault(key, {})[step] = float(value)
    if not records:
        raise PlotInputError(f"{path} is empty: has the run logged a step yet (trainer.logger=[...,file])?")
    if not points:
        raise PlotInputError(f"{path} holds no numeric metrics in its {records} records")
    return {
        key: (np.array(sorted(by_step)), np.array([v for _, v in sorted(by_step.items())]))
        for key, by_step in points.items()
    }


def _parse_line(line: str, where: str) -> tuple[int, dict]:
    expected = (
        'expected one JSON object {"step": <int>, "data": {<metric>: <value>}} per line as verl\'s file logger writes'
    )
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise PlotInputError(f"{where}: not JSON ({err.msg}); {expected}") from err
    if (
        not isinstance(record, dict)
        or not isinstance(record.get("step"), int)
        or not isinstance(record.get("data"), dict)
    ):
        raise PlotInputError(f"{where}: not a verl file-logger record ({line.strip()[:80]!r}); {expected}")
    return record["step"], record["data"]


def smoothed(values: np.ndarray, window: int) -> np.ndarray:
    """Trailing moving average over ``window`` points (fewer at the start)."""
    sums = np.cumsum(np.insert(values, 0, 0.0))
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(ends - window, 0)
    return (sums[ends] - sums[starts]) / (ends - starts)


def _panel_lines(spec: PanelSpec, run: Run) -> list[tuple[str, str]]:
    """(legend suffix, metric) for each line ``spec`` draws from ``run``."""
    if spec.pattern:
        matches = ((re.fullmatch(spec.pattern, key), key) for key in run)
        return sorted((match["label"], key) for match, key in matches if match)
    lines = []
    for alternatives in spec.series:
        key = next((k for k in alternatives if k in run), None)
        if key is not None:
            lines.append((key.rsplit("/", 1)[-1] if len(spec.series) > 1 else "", key))
    return lines


def _method_lines(spec: PanelSpec, seeds: list[Run]) -> list[tuple[str, list[Series]]]:
    """(legend suffix, the series of each seed that logs it) for each line ``spec`` draws for one method."""
    lines: dict[str, list[Series]] = {}
    for run in seeds:
        for suffix, key in _panel_lines(spec, run):
            lines.setdefault(suffix, []).append(run[key])
    return list(lines.items())


def _legend_name(run_label: str, suffix: str, n_runs: int) -> str:
    if not suffix:
        return run_label
    return suffix if n_runs == 1 else f"{run_label}: {suffix}"


def student_t_cdf(x: float, df: int) -> float:
    """P(T <= x) for Student's t with ``df`` degrees of freedom.

    With x = sqrt(df) tan(theta) the density becomes c cos(theta)^(df-1) dtheta, c = Gamma((df+1)/2) /
    (sqrt(pi) Gamma(df/2)), a smooth integrand on [0, pi/2], integrated by Simpson's rule.
    """
    theta = math.atan(abs(x) / math.sqrt(df))
    grid = np.linspace(0.0, theta, 2001)
    weights = np.ones_like(grid)
    weights[1:-1:2], weights[2:-1:2] = 4.0, 2.0
    integral = float((weights * np.cos(grid) ** (df - 1)).sum() * (theta / 2000) / 3)
    c = math.exp(math.lgamma((df + 1) / 2) - math.lgamma(df / 2)) / math.sqrt(math.pi)
    return 0.5 + math.copysign(c * integral, x)


def student_t_quantile(q: float, df: int) -> float:
    """The x with P(T <= x) = q (0.5 <= q < 1), by bisection on the angle of ``student_t_cdf``."""
    low, high = 0.0, math.pi / 2
    for _ in range(60):
        middle = (low + high) / 2
        if student_t_cdf(math.sqrt(df) * math.tan(middle), df) < q:
            low = middle
        else:
            high = middle
    return math.sqrt(df) * math.tan((low + high) / 2)


def mean_and_halfwidth(values: Sequence[float], confidence: float = CONFIDENCE) -> tuple[float, float]:
    """The mean of ``values`` and the half-width of its Student's t confidence interval (NaN for one value)."""
    values = np.asarray(values, dtype=float)
    if len(values) < 2:
        return float(values.mean()), math.nan
    t = student_t_quantile(0.5 + confidence / 2, len(values) - 1)
    return float(values.mean()), t * float(values.std(ddof=1)) / math.sqrt(len(values))


def _across_seeds(series: list[Series]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Steps, mean over the seeds that log each step, and the confidence half-width (NaN under two seeds)."""
    by_step: dict[int, list[float]] = {}
    for steps, values in series:
        for step, value in zip(steps.tolist(), values.tolist(), strict=True):
            by_step.setdefault(step, []).append(value)
    steps = np.array(sorted(by_step))
    stats = np.array([mean_and_halfwidth(by_step[step]) for step in steps.tolist()])
    return steps, stats[:, 0], stats[:, 1]


def _draw_line(ax, series: list[Series], name: str, style: dict) -> None:
    """One seed's line, or the mean of several with its confidence band."""
    steps, mean, halfwidth = _across_seeds(series)
    label = name if len(series) == 1 else f"{name} ({len(series)} seeds)"
    ax.plot(steps, mean, label=label, **style)
    if len(series) > 1:
        ax.fill_between(steps, mean - halfwidth, mean + halfwidth, color=style["color"], alpha=0.2, linewidth=0)


def _draw_panel(ax, spec: PanelSpec, runs: dict[str, list[Run]], delta: float, smooth: int) -> None:
    for color, (label, seeds) in enumerate(runs.items()):
        for index, (suffix, logged) in enumerate(_method_lines(spec, seeds)):
            name = _legend_name(label, suffix, len(runs))
            style = {"color": f"C{color}", "linestyle": LINESTYLES[index % len(LINESTYLES)]}
            if spec.pattern:
                style["marker"] = MARKERS[index % len(MARKERS)]
            shown = [(steps, smoothed(values, smooth) if spec.smooth else values) for steps, values in logged]
            _draw_line(ax, shown, name + (" (per step)" if spec.running_mean else ""), style)
            if spec.running_mean:
                running = [(steps, np.cumsum(values) / np.arange(1, len(values) + 1)) for steps, values in logged]
                _draw_line(ax, running, f"{name} (running share)", {**style, "linestyle": "--"})
    if spec.delta_line:
        ax.axhline(delta, color="black", linestyle=":", label=f"delta = {delta:g}")
    ax.set_title(spec.title, fontsize=10)
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def draw(runs: dict[str, Run | list[Run]], delta: float = 1e-4, smooth: int = 1) -> tuple[Figure, list[str]]:
    """A figure with one panel per ``PANELS`` entry that some run logged, and the names of those panels.

    ``runs`` maps a label to one run, or to the runs of several seeds (drawn as their mean with a band).
    """
    runs = {label: run if isinstance(run, list) else [run] for label, run in runs.items()}
    drawn = []
    for spec in PANELS:
        missing = [label for label, seeds in runs.items() if not _method_lines(spec, seeds)]
        if len(missing) == len(runs):
            print(f"skipped panel {spec.name}: no run logs {spec.keys_wanted()}")
            continue
        drawn.append(spec)
        print(f"drew panel {spec.name}" + (f" (not logged by {', '.join(missing)})" if missing else ""))
    if not drawn:
        raise PlotInputError(
            f"runs {list(runs)} log none of the plotted metrics: "
            + "; ".join(f"{spec.name}: {spec.keys_wanted()}" for spec in PANELS)
        )
    nrows = -(-len(drawn) // NCOLS)
    ncols = min(NCOLS, len(drawn))
    fig = Figure(figsize=(5 * ncols, 3.6 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    for position, spec in enumerate(drawn, start=1):
        _draw_panel(fig.add_subplot(nrows, ncols, position), spec, runs, delta, smooth)
    return fig, [spec.name for spec in drawn]


def run_labels(logs: Sequence[Path], labels: Sequence[str] | None) -> list[str]:
    """``labels`` if given (one per run), else file stems, widened to parent/stem where stems collide."""
    if labels:
        if len(labels) != len(logs):
            raise PlotInputError(f"got {len(labels)} --label for {len(logs)} runs: give one --label per RUN or none")
        return list(labels)
    stems = [log.stem for log in logs]
    names = [f"{log.parent.name}/{log.stem}" if stems.count(log.stem) > 1 else log.stem for log in logs]
    if len(set(names)) != len(names):
        raise PlotInputError(f"run labels {names} repeat: give --label values (runs sharing a label are seeds)")
    return names


def plot_runs(
    runs: Sequence[str | Path],
    out: str | Path | None = None,
    labels: Sequence[str] | None = None,
    delta: float = 1e-4,
    smooth: int = 1,
) -> list[str]:
    """Plot the file-logger logs ``runs`` into one PNG and return the names of the drawn panels.

    Runs with the same label are seeds of one method, drawn as their mean with a confidence band.
    """
    if not runs:
        raise PlotInputError("no RUN given: pass at least one verl file-logger .jsonl or its directory")
    if smooth < 1:
        raise PlotInputError(f"smooth={smooth} must be >= 1 (1 = no smoothing)")
    logs = [find_logs(run) for run in runs]
    names = run_labels([run_logs[0] for run_logs in logs], labels)
    data: dict[str, list[Run]] = {}
    for name, run_logs in zip(names, logs, strict=True):
        data.setdefault(name, []).append(read_run(run_logs))
    fig, drawn = draw(data, delta=delta, smooth=smooth)
    out = Path(out) if out is not None else logs[0][0].parent / "disco_curves.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    print(f"wrote {out} with panels {drawn}")
    return drawn


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m recipe.disco.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN", help="verl file-logger .jsonl, or a directory of them")
    parser.add_argument(
        "--label",
        action="append",
        help="legend name, once per RUN in order (default: file stem); runs sharing a label are seeds of one method",
    )
    parser.add_argument("--out", help="PNG path (default: disco_curves.png next to the first run's log)")
    parser.add_argument("--delta", type=float, default=1e-4, help="KL budget drawn on the KL panel (default 1e-4)")
    parser.add_argument("--smooth", type=int, default=1, help="moving-average window in steps (default 1 = none)")
    args = parser.parse_args(argv)
    try:
        plot_runs(args.runs, out=args.out, labels=args.label, delta=args.delta, smooth=args.smooth)
    except PlotInputError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
