"""Runs the Array API standard's test suite (vendored in ``array-api-tests/``) against an array module.

    python -m tests.array_api.suite_runner [--max-examples N]

starts a local pool (two NumPy agents, every array split over both), runs the suite against ``gpupool`` on
it and against ``numpy``, with the same flags, and prints the passes per test file of each as a Markdown
table (what ``RESULTS.md`` holds). ``tests/array_api/test_array_api_suite.py`` runs the gpupool half in CI.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path

from gpupool.local import LocalPool

HERE = Path(__file__).parent
SUITE = HERE / "array-api-tests"
SKIPS = HERE / "skips.txt"
#: Per test file: outcome -> count.
Counts = dict[str, collections.Counter[str]]


def suite_command(report: Path, *, max_examples: int, skips: bool) -> list[str]:
    """The pytest command line, run in :data:`SUITE`: the standard 2024.12 without its extensions (gpupool's
    ``linalg`` and ``fft`` are NumPy's on the host copy), deadlines off (a round trip is not a CPU's
    microseconds), examples derandomized so every run draws the same ones."""
    command = [
        sys.executable,
        "-m",
        "pytest",
        "array_api_tests",
        "-q",
        "-p",
        "no:cacheprovider",
        "-c",
        "pytest.ini",
        "--rootdir",
        ".",
        "--max-examples",
        str(max_examples),
        "--hypothesis-disable-deadline",
        "--hypothesis-derandomize",
        "--disable-extension",
        "linalg",
        "fft",
        "--json-report",
        f"--json-report-file={report}",
        "-W",
        "ignore::UserWarning",
    ]
    if skips:
        command += ["--skips-file", str(SKIPS)]
    return command


def run_suite(
    module: str, env: Mapping[str, str], *, max_examples: int, skips: bool, timeout: float
) -> tuple[int, str, Counts]:
    """Run the suite against ``module``; returns pytest's exit code, its output's tail, and the counts."""
    with tempfile.TemporaryDirectory() as scratch:
        report = Path(scratch) / "report.json"
        environment = {
            **env,
            "ARRAY_API_TESTS_MODULE": module,
            "ARRAY_API_TESTS_VERSION": "2024.12",
            "PYTHONDONTWRITEBYTECODE": "1",
        }
        done = subprocess.run(
            suite_command(report, max_examples=max_examples, skips=skips),
            cwd=SUITE,
            env=environment,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        counts: Counts = collections.defaultdict(collections.Counter)
        if report.exists():
            for test in json.loads(report.read_text())["tests"]:
                counts[test["nodeid"].split("::")[0].removeprefix("array_api_tests/")][test["outcome"]] += 1
        return done.returncode, (done.stdout + done.stderr)[-6000:], dict(counts)


def table(columns: Mapping[str, Counts]) -> str:
    """Passes (and failures, skips) per file of each run, as Markdown."""
    files = sorted({name for counts in columns.values() for name in counts})
    lines = ["| test file | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    totals = {name: collections.Counter[str]() for name in columns}
    for file in files:
        cells = []
        for name, counts in columns.items():
            got = counts.get(file, collections.Counter())
            totals[name].update(got)
            cells.append(f"{got['passed']} passed, {got['failed']} failed, {got['skipped']} skipped")
        lines.append(f"| {file} | " + " | ".join(cells) + " |")
    summary = [f"{t['passed']} passed, {t['failed']} failed, {t['skipped']} skipped" for t in totals.values()]
    lines.append("| **all** | " + " | ".join(summary) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--max-examples", type=int, default=3)
    args = parser.parse_args()
    with LocalPool(
        agents=2,
        port=0,
        topic_prefix=f"gpupool-array-api-{uuid.uuid4().hex[:8]}",
        backend="numpy",
        coordinator_args=["--min-shard-bytes", "0"],
    ) as local:
        env = {
            **os.environ,
            "GPUPOOL_COORDINATOR": local.coordinator_address,
            "GPUPOOL_TOKEN": local.client_token,
        }
        code, tail, gpupool_counts = run_suite(
            "gpupool", env, max_examples=args.max_examples, skips=True, timeout=3600
        )
    print(tail.splitlines()[-1] if tail else "(no output)", file=sys.stderr)
    _, numpy_tail, numpy_counts = run_suite(
        "numpy", os.environ, max_examples=args.max_examples, skips=False, timeout=3600
    )
    print(numpy_tail.splitlines()[-1] if numpy_tail else "(no output)", file=sys.stderr)
    print(table({"gpupool (2 agents)": gpupool_counts, "numpy": numpy_counts}))
    return code


if __name__ == "__main__":
    sys.exit(main())
