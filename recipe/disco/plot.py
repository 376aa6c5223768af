"""Draw DisCO's training-dynamics panels from verl's ``file`` logger.

verl's file logger (``trainer.logger=[console,file]``) writes one JSON object per logged step,
``{"step": N, "data": {metric: value}}``, to ``$VERL_FILE_LOGGER_PATH`` or
``$VERL_FILE_LOGGER_ROOT/<project_name>/<experiment_name>.jsonl`` (the root defaults to the working directory).

    python -m recipe.disco.plot RUN [RUN ...] [--label NAME ...] [--out PNG] [--delta 1e-4] [--smooth N]

Each RUN is such a ``.jsonl`` file, or a directory holding exactly one ``.jsonl`` file (not searched recursively).
Runs are labelled by file stem unless ``--label`` is given once per run. The PNG goes to ``--out`` or to
``disco_curves.png`` next to the first run's log. Panels whose metrics no run logged are skipped, and the reason is
printed. Extend ``PANELS`` to draw more.
"""

import argparse
import json
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
        "Constraint active (share of questions with KL > delta)",
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
)


def find_log(run: str | Path) -> Path:
    """The file-logger JSONL named by ``run``: the file itself, or the single ``.jsonl`` in a directory."""
    path = Path(run)
    if path.is_file():
        return path
    if not path.is_dir():
        raise PlotInputError(f"RUN {str(run)!r} does not exist: pass a verl file-logger .jsonl or its directory")
    logs = sorted(path.glob("*.jsonl"))
    if len(logs) != 1:
        raise PlotInputError(
            f"RUN directory {str(path)!r} holds {len(logs)} .jsonl files {[p.name for p in logs]}: "
            "pass the log file itself"
        )
    return logs[0]


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


def _legend_name(run_label: str, suffix: str, n_runs: int) -> str:
    if not suffix:
        return run_label
    return suffix if n_runs == 1 else f"{run_label}: {suffix}"


def _draw_panel(ax, spec: PanelSpec, runs: dict[str, Run], delta: float, smooth: int) -> None:
    for color, (label, run) in enumerate(runs.items()):
        for index, (suffix, key) in enumerate(_panel_lines(spec, run)):
            steps, values = run[key]
            name = _legend_name(label, suffix, len(runs))
            style = {"color": f"C{color}", "linestyle": LINESTYLES[index % len(LINESTYLES)]}
            if spec.pattern:
                style["marker"] = MARKERS[index % len(MARKERS)]
            shown = smoothed(values, smooth) if spec.smooth else values
            ax.plot(steps, shown, label=name + (" (per step)" if spec.running_mean else ""), **style)
            if spec.running_mean:
                running = np.cumsum(values) / np.arange(1, len(values) + 1)
                ax.plot(steps, running, label=f"{name} (running share)", color=f"C{color}", linestyle="--")
    if spec.delta_line:
        ax.axhline(delta, color="black", linestyle=":", label=f"delta = {delta:g}")
    ax.set_title(spec.title, fontsize=10)
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)


def draw(runs: dict[str, Run], delta: float = 1e-4, smooth: int = 1) -> tuple[Figure, list[str]]:
    """A figure with one panel per ``PANELS`` entry that some run logged, and the names of those panels."""
    drawn = []
    for spec in PANELS:
        missing = [label for label, run in runs.items() if not _panel_lines(spec, run)]
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
    return [f"{log.parent.name}/{log.stem}" if stems.count(log.stem) > 1 else log.stem for log in logs]


def plot_runs(
    runs: Sequence[str | Path],
    out: str | Path | None = None,
    labels: Sequence[str] | None = None,
    delta: float = 1e-4,
    smooth: int = 1,
) -> list[str]:
    """Plot the file-logger logs ``runs`` into one PNG and return the names of the drawn panels."""
    if not runs:
        raise PlotInputError("no RUN given: pass at least one verl file-logger .jsonl or its directory")
    if smooth < 1:
        raise PlotInputError(f"smooth={smooth} must be >= 1 (1 = no smoothing)")
    logs = [find_log(run) for run in runs]
    names = run_labels(logs, labels)
    if len(set(names)) != len(names):
        raise PlotInputError(f"run labels {names} repeat: give distinct --label values")
    data = {name: read_log(log) for name, log in zip(names, logs, strict=True)}
    fig, drawn = draw(data, delta=delta, smooth=smooth)
    out = Path(out) if out is not None else logs[0].parent / "disco_curves.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    print(f"wrote {out} with panels {drawn}")
    return drawn


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m recipe.disco.plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN", help="verl file-logger .jsonl, or a directory holding one")
    parser.add_argument("--label", action="append", help="legend name, once per RUN in order (default: file stem)")
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
