"""The load test's report: a Markdown page with the summary, the audit and PNG plots of the
timeline (rentals per second, start-latency percentiles, mailbox depths, stations online, event
lag), so an operator sees how the run went over time, not just its averages."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

PLOTS = (
    ("rentals_per_s.png", "Rentals completed per second"),
    ("start_latency.png", "Start latency (request to bank out), last 5 s"),
    ("mailboxes.png", "Actor mailbox depth (pending commands)"),
    ("stations_online.png", "Stations online"),
    ("event_lag.png", "Station event lag (publish to acknowledged commit), last 5 s"),
)


def write_report(directory: Path, summary: dict[str, Any], timeline: list, violations: dict[str, list[str]]) -> Path:
    """Write report.md, the plots and timeline.json into `directory`; returns report.md's path."""
    directory.mkdir(parents=True, exist_ok=True)
    rows = [sample_row(sample) for sample in timeline]
    (directory / "timeline.json").write_text(json.dumps(rows))
    draw_plots(directory, rows)
    path = directory / "report.md"
    path.write_text(markdown(summary, violations))
    return path


def sample_row(sample) -> dict[str, Any]:
    from dataclasses import asdict

    return asdict(sample)


def per_second(rows: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
    """A cumulative counter turned into a rate between consecutive samples."""
    times, rates = [], []
    for before, after in zip(rows, rows[1:]):
        elapsed = after["t_s"] - before["t_s"]
        if elapsed > 0:
            times.append(after["t_s"])
            rates.append((after[key] - before[key]) / elapsed)
    return times, rates


def draw_plots(directory: Path, rows: list[dict[str, Any]]) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only: the report is written on machines with no screen
    from matplotlib import pyplot

    t = [row["t_s"] for row in rows]
    kinds = sorted({kind for row in rows for kind in row["mailboxes"]})
    series = {
        "rentals_per_s.png": [("completed", *per_second(rows, "completed")), ("started", *per_second(rows, "started"))],
        "start_latency.png": [("p50 ms", t, [r["start_p50_ms"] for r in rows]), ("p99 ms", t, [r["start_p99_ms"] for r in rows])],
        "mailboxes.png": [(kind, t, [r["mailboxes"].get(kind, 0) for r in rows]) for kind in kinds] or [("all", t, [0] * len(t))],
        "stations_online.png": [("online (database)", t, [r["stations_online"] for r in rows]),
                                ("connected (simulators)", t, [r["fleet_connected"] for r in rows])],
        "event_lag.png": [("p50 ms", t, [r["event_lag_p50_ms"] for r in rows]), ("p99 ms", t, [r["event_lag_p99_ms"] for r in rows])],
    }
    for filename, title in PLOTS:
        figure, axes = pyplot.subplots(figsize=(8, 3.2))
        for label, xs, ys in series[filename]:
            axes.plot(xs, ys, label=label)
        axes.set_title(title)
        axes.set_xlabel("seconds since the riders started")
        axes.grid(alpha=0.3)
        axes.legend(loc="upper right")
        figure.tight_layout()
        figure.savefig(directory / filename, dpi=100)
        pyplot.close(figure)


def markdown(summary: dict[str, Any], violations: dict[str, list[str]]) -> str:
    lines = ["# Load test report", "", "| figure | value |", "|---|---|"]
    lines += [f"| `{key}` | {json.dumps(value)} |" for key, value in summary.items() if key != "violation_examples"]
    lines += ["", "## Audit", ""]
    if not violations:
        lines.append("Every invariant held: 0 violations.")
    for kind, problems in violations.items():
        lines.append(f"- **{kind}**: {len(problems)}")
        lines += [f"  - {problem}" for problem in problems[:10]]
    lines += ["", "## Over time", ""]
    lines += [f"### {title}\n\n![{title}]({filename})\n" for filename, title in PLOTS]
    return "\n".join(lines) + "\n"
