"""What every benchmark section shares: timing, medians, result rows, the table and the JSON."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

__all__ = ["Context", "Result", "median_time", "percentile", "render", "write_json"]

Better = Literal["higher", "lower"]


@dataclass(frozen=True, slots=True)
class Context:
    """Settings of one benchmark run.

    Attributes:
        repeats: how many timed runs each median is taken over (sections may use more for cheap things).
        quick: smaller sizes, for a smoke run (tests use it); figures from a quick run are not quotable.
        broker_url: an MQTT broker for sections that want one (None: each starts its own).
    """

    repeats: int = 5
    quick: bool = False
    broker_url: str | None = None


@dataclass(slots=True)
class Result:
    """One measured figure and, where there is one, its comparison.

    ``ratio`` is always "how many times better gpupool is than the baseline" in the figure's own sense:
    for throughput (better="higher") value / baseline; for times (better="lower") baseline / value.
    ``target`` is the ratio the issue asks for; ``met`` says whether this run reached it.
    """

    section: str
    name: str
    value: float
    unit: str
    better: Better = "higher"
    baseline_name: str = ""
    baseline: float | None = None
    target: float | None = None
    note: str = ""
    samples: list[float] = field(default_factory=list)

    @property
    def ratio(self) -> float | None:
        if self.baseline is None or self.baseline == 0 or self.value == 0 or math.isnan(self.value):
            return None  # NaN: no figure (an operation gpupool could not run)
        return self.value / self.baseline if self.better == "higher" else self.baseline / self.value

    @property
    def met(self) -> bool | None:
        if self.target is None or self.ratio is None:
            return None
        return self.ratio >= self.target

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if math.isnan(self.value):
            data["value"] = None  # JSON has no NaN
        data["ratio"] = self.ratio
        data["met"] = self.met
        return data


def median_time(fn: Callable[[], object], repeats: int, *, warmup: int = 1) -> tuple[float, list[float]]:
    """Median wall time of ``fn`` over ``repeats`` runs after ``warmup`` untimed ones; also every sample."""
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples), samples


def percentile(samples: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) by nearest rank."""
    ordered = sorted(samples)
    index = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return ordered[index]


def _fmt(value: float | None, unit: str = "") -> str:
    if value is None or math.isnan(value):
        return "-"
    if abs(value) >= 1000:
        text = f"{value:,.0f}"
    elif abs(value) >= 10:
        text = f"{value:.1f}"
    else:
        text = f"{value:.3g}"
    return f"{text} {unit}".strip()


def render(results: list[Result]) -> str:
    """The results as a plain-text table, grouped by section."""
    headers = ["section", "figure", "gpupool", "baseline", "ratio", "target", ""]
    rows = []
    for r in results:
        base = f"{_fmt(r.baseline, r.unit)} ({r.baseline_name})" if r.baseline is not None else ""
        ratio = f"{r.ratio:.2f}x" if r.ratio is not None else ""
        target = f">= {r.target:g}x" if r.target is not None else ""
        met = {True: "met", False: "MISSED", None: ""}[r.met]
        rows.append(
            [
                r.section,
                r.name + (f" [{r.note}]" if r.note else ""),
                _fmt(r.value, r.unit),
                base,
                ratio,
                target,
                met,
            ]
        )
    widths = [max(len(str(row[i])) for row in [headers, *rows]) for i in range(len(headers))]
    lines = ["  ".join(str(cell).ljust(w) for cell, w in zip(headers, widths, strict=True)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    """What ran the benchmark."""
    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), "")
        info["cpu_model"] = model
    except OSError:
        pass
    try:
        import numpy

        info["numpy"] = numpy.__version__
        from threadpoolctl import threadpool_info

        info["blas"] = [
            {k: i.get(k) for k in ("internal_api", "architecture", "num_threads", "version")}
            for i in threadpool_info()
        ]
    except ImportError:
        pass
    return info


def write_json(path: str, results: list[Result], extra: dict[str, Any] | None = None) -> None:
    """Write the results, the machine and ``extra`` as JSON."""
    payload = {
        "machine": machine(),
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "results": [r.as_dict() for r in results],
        **(extra or {}),
    }
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)
