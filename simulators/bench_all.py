"""`powerbank bench all`: every benchmark and the load test, one after another, in one report.

Each suite runs as its own subprocess (`powerbank bench actors`, `bench stations`, `bench http`,
`bench fanout`, then `powerbank loadtest`), at full size unless `--quick`, never two at once:
they would measure each other. The last JSON line of each is kept; a suite that fails, times out
or does not exist is recorded as failed with the end of its log, and the run goes on.

The report (Markdown, `var/bench/<UTC timestamp>/report.md`, its path printed) has a table per
suite: every ratio with the figure and the same-run reference it divides, every other figure,
the command that reproduces the suite, and, once at the top, the git commit, the machine and
the date. Each suite's log and full JSON line sit next to it. The last line on stdout merges
the suites' top-level figures, each key prefixed by its suite.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from powerbank.simulators.bench import json_line

POWERBANK = (sys.executable, "-m", "powerbank.cli")
REPORT_DIR_MARK = "{report_dir}"
INTERRUPT_GRACE_S = 60.0


@dataclass(frozen=True)
class Suite:
    name: str
    full_args: tuple[str, ...]
    quick_args: tuple[str, ...]
    reference: str
    timeout_s: float
    quick_timeout_s: float = 300.0
    # How each ratio is made: ratio key -> (figure key, reference key).
    ratios: dict[str, tuple[str, str]] = field(default_factory=dict)
    program: tuple[str, ...] = POWERBANK

    def args(self, quick: bool, report_dir: Path) -> list[str]:
        """The suite's arguments after `powerbank`, with its own report directory filled in."""
        args = self.quick_args if quick else self.full_args
        return [arg.replace(REPORT_DIR_MARK, str(report_dir / self.name)) for arg in args]


# The headline's shape (README): PostgreSQL + Redis, the Procfile's processes, two workers.
LOADTEST_FULL = ("--deployment", "procfile", "--workers", "2", "--stations", "1000", "--riders", "100", "--duration", "120")
LOADTEST_QUICK = ("--stations", "10", "--riders", "5", "--duration", "10")

SUITES = (
    Suite(
        "actors", ("bench", "actors"), ("bench", "actors", "--quick"),
        "pgbench single-row UPDATE; naive SELECT ... FOR UPDATE debits; redis-benchmark LPUSH", 900,
        ratios={
            "hot_entity_vs_pgbench": ("hot_entity_commands_per_s", "pgbench_hot_row_tps"),
            "vs_naive_locking": ("hot_entity_commands_per_s", "naive_locking_commands_per_s"),
            "independent_vs_redis_lpush": ("independent_commands_per_s", "redis_lpush_per_s"),
        },
    ),
    Suite(
        "stations", ("bench", "stations"), ("bench", "stations", "--quick"),
        "Mosquitto (the same slot-event workload)", 1800,
        ratios={"embedded_vs_mosquitto": ("events_per_s_embedded", "events_per_s_mosquitto")},
    ),
    Suite(
        "http", ("bench", "http"), ("bench", "http", "--quick"),
        "bare Litestar (same uvicorn settings, same number of processes)", 900,
    ),
    Suite(
        "fanout", ("bench", "fanout"), ("bench", "fanout", "--clients", "40", "--changes", "3"),
        "one watching client; redis-benchmark PUBLISH", 600,
        ratios={
            "fanout_vs_single_p50": ("fanout_p50_ms", "single_client_p50_ms"),
            "fanout_deliveries_vs_redis_publish": ("fanout_deliveries_per_s", "redis_publish_per_s"),
        },
    ),
    Suite(
        "loadtest", ("loadtest", *LOADTEST_FULL, "--report", REPORT_DIR_MARK),
        ("loadtest", *LOADTEST_QUICK, "--report", REPORT_DIR_MARK),
        "none: an audit (invariant_violations must be 0)", 1800,
    ),
)
SUITE_NAMES = tuple(suite.name for suite in SUITES)


@dataclass
class AllOptions:
    quick: bool = False
    only: tuple[str, ...] = SUITE_NAMES
    out_dir: Path | None = None


def _suite_list(text_value: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text_value.split(",") if name.strip())
    unknown = sorted(set(names) - set(SUITE_NAMES))
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown suite {unknown[0] if unknown else ''!r}; choose from {', '.join(SUITE_NAMES)}")
    return tuple(name for name in SUITE_NAMES if name in names)


def parse_options(argv: list[str]) -> AllOptions:
    parser = argparse.ArgumentParser(
        prog="powerbank bench all",
        description="Run every benchmark (actors, stations, http, fanout) and the load test one after another, "
        "write one Markdown report with every ratio against its same-run reference, and print one merged JSON line.",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run of every suite")
    parser.add_argument("--only", type=_suite_list, help=f"comma-separated subset of {','.join(SUITE_NAMES)}")
    parser.add_argument("--out", dest="out_dir", type=Path,
                        help="where the timestamped report directory goes (default $POWERBANK_DATA_DIR/bench, i.e. var/bench)")
    args = parser.parse_args(argv)
    return AllOptions(quick=args.quick, only=args.only or SUITE_NAMES, out_dir=args.out_dir)


# --- running one suite ------------------------------------------------------------------------


@dataclass
class SuiteRun:
    suite: Suite
    command: str
    returncode: int | None
    elapsed_s: float
    summary: dict[str, Any] | None
    log_path: Path

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and self.summary is not None and "error" not in self.summary

    def failure(self) -> str | None:
        """Why the suite does not count, or None."""
        if self.ok:
            return None
        if self.returncode is None:
            return f"timed out after {self.elapsed_s:.0f} s"
        if self.summary is None:
            return f"exit code {self.returncode}, no JSON line"
        if "error" in self.summary:
            return f"exit code {self.returncode}: {self.summary['error']}"
        return f"exit code {self.returncode}"

    def log_tail(self, chars: int = 1500) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def last_json_line(text: str) -> dict[str, Any] | None:
    """The suite's result: the last stdout line that is a JSON object (progress may precede it)."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                return value
    return None


def run_suite(suite: Suite, quick: bool, report_dir: Path) -> SuiteRun:
    """The suite as a subprocess in its own process group, stderr to `<suite>.log`, stdout to
    `<suite>.out`. On timeout it gets SIGINT first (suites clean up their databases and
    children on KeyboardInterrupt), then SIGKILL."""
    args = suite.args(quick, report_dir)
    argv = [*suite.program, *args]
    if any(REPORT_DIR_MARK in arg for arg in (suite.quick_args if quick else suite.full_args)):
        (report_dir / suite.name).mkdir(exist_ok=True)  # where the suite writes its own report
    log_path, out_path = report_dir / f"{suite.name}.log", report_dir / f"{suite.name}.out"
    timeout_s = suite.quick_timeout_s if quick else suite.timeout_s
    started = time.monotonic()
    with log_path.open("w") as log, out_path.open("w") as out:
        process = subprocess.Popen(argv, stdout=out, stderr=log, start_new_session=True)
        try:
            returncode: int | None = process.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            returncode = None
            _stop(process)
        except KeyboardInterrupt:
            _stop(process)  # in its own session, the suite did not see the terminal's Ctrl-C
            raise
    summary = last_json_line(out_path.read_text(errors="replace"))
    if summary is not None:
        (report_dir / f"{suite.name}.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    command = "powerbank " + shlex.join(args) if suite.program == POWERBANK else shlex.join(argv)
    return SuiteRun(suite, command, returncode, time.monotonic() - started, summary, log_path)


def _stop(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGINT)
        process.wait(timeout=INTERRUPT_GRACE_S)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()


# --- the machine --------------------------------------------------------------------------------


def machine_facts() -> dict[str, Any]:
    """What the figures were measured on: they mean nothing without it."""
    from powerbank.simulators.bench_actors import source_revision

    cpu_model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model,
        "platform": platform.platform(),
        "python": platform.python_version(),
        **source_revision(),
    }


# --- the report ---------------------------------------------------------------------------------


def scalar_figures(summary: dict[str, Any]) -> dict[str, Any]:
    """The top-level figures of a suite's line (numbers, booleans, short strings); details
    nested under `phases` and the like stay in `<suite>.json`."""
    return {key: value for key, value in summary.items()
            if key != "suite" and (isinstance(value, (int, float, bool)) or (isinstance(value, str) and len(value) < 80))}


def ratio_parts(suite: Suite, key: str, summary: dict[str, Any]) -> tuple[str, str] | None:
    """(figure key, reference key) of a ratio: the suite's table, or `X_vs_Y` -> X_requests_per_s
    over Y_requests_per_s (bench http's per-endpoint ratios)."""
    if key in suite.ratios:
        return suite.ratios[key]
    figure, _, reference = key.partition("_vs_")
    for unit in ("requests_per_s", "per_s"):
        if f"{figure}_{unit}" in summary and f"{reference}_{unit}" in summary:
            return f"{figure}_{unit}", f"{reference}_{unit}"
    return None


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}" if math.isfinite(value) else str(value)
    return str(value).replace("|", "\\|")


def suite_section(run: SuiteRun) -> list[str]:
    suite, summary = run.suite, run.summary or {}
    status = "ok" if run.ok else f"FAILED ({run.failure()})"
    lines = [f"## {suite.name}: {status}", "",
             f"- reproduce: `{run.command}`",
             f"- same-run reference: {suite.reference}",
             f"- took {run.elapsed_s:.0f} s; log `{run.log_path.name}`" + (", full line `" + suite.name + ".json`" if run.summary else ""),
             ""]
    figures = scalar_figures(summary)
    ratios = {key: value for key, value in figures.items() if "_vs_" in key or key.startswith("vs_")}
    if ratios:
        lines += ["| ratio | value | figure | reference (same run) |", "|---|---:|---|---|"]
        for key, value in ratios.items():
            parts = ratio_parts(suite, key, summary)
            figure = f"{parts[0]} = {_cell(summary.get(parts[0]))}" if parts else ""
            reference = f"{parts[1]} = {_cell(summary.get(parts[1]))}" if parts else ""
            lines.append(f"| {key} | {_cell(value)} | {figure} | {reference} |")
        lines.append("")
    others = {key: value for key, value in figures.items() if key not in ratios}
    goals = summary.get("goals")
    if others or isinstance(goals, dict):
        lines += ["| figure | value |", "|---|---:|"]
        lines += [f"| {key} | {_cell(value)} |" for key, value in others.items()]
        if isinstance(goals, dict):
            lines += [f"| goal: {_cell(goal)} | {'met' if met else 'not met'} |" for goal, met in goals.items()]
        lines.append("")
    if not run.ok:
        lines += ["End of the log:", "", "```", run.log_tail().rstrip(), "```", ""]
    return lines


def render_report(runs: list[SuiteRun], machine: dict[str, Any], quick: bool) -> str:
    commit = machine.get("git_head", "unknown") + (" (uncommitted changes)" if machine.get("git_dirty") else "")
    lines = [
        f"# powerbank benchmarks{' (quick)' if quick else ''}",
        "",
        f"- date: {machine['date']}",
        f"- git commit: {commit}",
        f"- machine: {machine['cpu_count']} cores, {machine['cpu_model']}; {machine['platform']}; Python {machine['python']}",
        f"- reproduce all: `powerbank bench all{' --quick' if quick else ''} --only {','.join(run.suite.name for run in runs)}`",
        "",
        "Every ratio divides a figure by a reference measured in the same run on the same machine "
        "(docs/benchmarks.md says how to read each); the machine is shared and noisy, so the ratios "
        "mean more than the absolute figures.",
        "",
        "| suite | status | took (s) |",
        "|---|---|---:|",
    ]
    lines += [f"| {run.suite.name} | {'ok' if run.ok else 'FAILED'} | {run.elapsed_s:.0f} |" for run in runs]
    lines.append("")
    for run in runs:
        lines += suite_section(run)
    return "\n".join(lines)


def merged_line(runs: list[SuiteRun], machine: dict[str, Any], report_path: Path, quick: bool) -> dict[str, Any]:
    """One line for all: each suite's top-level figures prefixed by its name, whether it
    passed, and where the report is."""
    merged: dict[str, Any] = {
        "suite": "all", "report": str(report_path), "quick": quick,
        "suites": [run.suite.name for run in runs],
        "suites_failed": [run.suite.name for run in runs if not run.ok],
        **{key: machine[key] for key in ("date", "cpu_count", "cpu_model", "git_head", "git_dirty") if key in machine},
    }
    for run in runs:
        merged[f"{run.suite.name}_ok"] = run.ok
        if not run.ok:
            merged[f"{run.suite.name}_error"] = run.failure()
        for key, value in scalar_figures(run.summary or {}).items():
            merged[f"{run.suite.name}_{key}"] = value
    return merged


# --- the command ----------------------------------------------------------------------------------


def report_root(out_dir: Path | None) -> Path:
    return out_dir if out_dir is not None else Path(os.environ.get("POWERBANK_DATA_DIR", "var")) / "bench"


def run_all(suites: list[Suite], quick: bool, out_dir: Path | None, say=print) -> tuple[dict[str, Any], Path]:
    """Every suite in turn; writes the report and returns the merged line and its path."""
    report_dir = report_root(out_dir) / datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    report_dir.mkdir(parents=True, exist_ok=True)
    machine = machine_facts()
    runs = []
    for suite in suites:
        say(f"bench all: {suite.name} ({'quick' if quick else 'full size'}) ...")
        run = run_suite(suite, quick, report_dir)
        say(f"bench all: {suite.name} {'ok' if run.ok else 'FAILED: ' + str(run.failure())} in {run.elapsed_s:.0f} s")
        runs.append(run)
    report_path = report_dir / "report.md"
    report_path.write_text(render_report(runs, machine, quick) + "\n")
    return merged_line(runs, machine, report_path, quick), report_path


def main(argv: list[str]) -> int:
    """`powerbank bench all [--quick] [--only SUITE,...]`: progress on stderr, the report's path,
    then the merged JSON line last on stdout."""
    options = parse_options(argv)
    suites = [suite for suite in SUITES if suite.name in options.only]
    merged, report_path = run_all(suites, options.quick, options.out_dir, say=lambda m: print(m, file=sys.stderr, flush=True))
    print(f"report: {report_path}", flush=True)
    print(json_line(merged), flush=True)
    return 0 if not merged["suites_failed"] else 1
