"""``scripts/bench``: every section in one run, a table on stdout, JSON with ``--json PATH``.

Sections: transfer, overhead, tls (a secure pool against an open one), workloads, numpy (everyday NumPy
code on a resident array), tasks (``pool.map``: tiny tasks and a sweep of trainings), fleet, gpu (skipped
without CuPy and a CUDA device).
Every figure is a median over repeated runs; every comparison is a ratio against a baseline measured in
the same run, on the same machine.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
import traceback

from bench.common import Context, Result, machine, render, write_json

SECTIONS = (
    "transfer",
    "moves",
    "overhead",
    "tls",
    "workloads",
    "numpy",
    "tasks",
    "placement",
    "stragglers",
    "fleet",
    "gpu",
)
MODULES = {"numpy": "numpy_workloads"}  # a section whose module is not named after it


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="scripts/bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON here too")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, help="run only these sections")
    parser.add_argument("--skip", nargs="+", choices=SECTIONS, default=[], help="leave these sections out")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per median (default 5)")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run, not quotable figures")
    parser.add_argument(
        "--broker", metavar="URL", help="an MQTT broker for the fleet section (default: its own)"
    )
    args = parser.parse_args()
    ctx = Context(repeats=args.repeats, quick=args.quick, broker_url=args.broker)
    wanted = [s for s in (args.only or SECTIONS) if s not in args.skip]
    info = machine()
    print(
        f"gpupool bench on {info.get('cpu_model', '?')} x{info['cpus']}, Python {info['python']}"
        f"{' (quick: figures not quotable)' if args.quick else ''}",
        flush=True,
    )
    results: list[Result] = []
    failures: dict[str, str] = {}
    durations: dict[str, float] = {}
    for name in wanted:
        print(f"\n== {name}", flush=True)
        started = time.perf_counter()
        try:
            module = importlib.import_module(f"bench.{MODULES.get(name, name)}")
            section = module.run(ctx)
        except Exception as exc:  # one failing section must not lose the others' figures
            traceback.print_exc()
            failures[name] = f"{type(exc).__name__}: {exc}"
            section = []
        durations[name] = time.perf_counter() - started
        results.extend(section)
        if section:
            print(render(section), flush=True)
        print(f"({name}: {durations[name]:.1f} s)", flush=True)
    print("\n== all results\n" + render(results))
    missed = [r for r in results if r.met is False]
    print(
        f"\n{len(results)} figures, {sum(r.met is True for r in results)} targets met, {len(missed)} missed"
        + (f"; sections failed: {', '.join(failures)}" if failures else "")
    )
    if args.json:
        write_json(args.json, results, {"failures": failures, "durations": durations, "quick": args.quick})
        print(f"wrote {args.json}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
