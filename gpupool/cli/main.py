"""The ``gpupool`` command: a pool on this machine, a demo, and an operator's view of a coordinator.

::

    gpupool up [--agents N] [--broker URL] [--port 50051]    a whole pool here, in the foreground
    gpupool demo                                             a sharded workload checked against NumPy
    gpupool demo --sweep [--quick]                           32 trainings via pool.map, checked likewise
    gpupool demo --agents 3 --kill                           the same with an agent SIGKILLed midway
    gpupool status | agents [--json] [--all] | jobs          what the coordinator knows
    gpupool drain | cordon | uncordon | forget AGENT         change an agent's state, or remove it
    gpupool jobs end JOB                                     end a client session
    gpupool token create | list | revoke                     bearer tokens (on the coordinator's host)
    gpupool coordinator --broker URL --listen ADDR           run a coordinator

``--coordinator ADDR`` (default ``$GPUPOOL_COORDINATOR``, else 127.0.0.1:50051) says which
coordinator the operator commands talk to; ``--token`` (``$GPUPOOL_TOKEN``) and ``--ca``
(``$GPUPOOL_CA``) are the credentials they present.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence

from gpupool._config import coordinator_address
from gpupool._errors import ConnectError, DeadlineExceeded, GpupoolError, UsageError
from gpupool._version import __version__
from gpupool.cli import admin, tokens, up

__all__ = ["build_parser", "main"]

Handler = Callable[[argparse.Namespace], int]


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than zero: {text!r}")
    return value


def _connection_options(*, suppress: bool) -> argparse.ArgumentParser:
    """``--coordinator`` and ``--timeout``, accepted before and after the subcommand."""
    parser = argparse.ArgumentParser(add_help=False)
    default = argparse.SUPPRESS if suppress else None
    parser.add_argument(
        "--coordinator",
        metavar="ADDR",
        default=default,
        help="the coordinator's HOST:PORT (default $GPUPOOL_COORDINATOR, else 127.0.0.1:50051)",
    )
    parser.add_argument(
        "--token",
        metavar="TOKEN",
        default=default,
        help="bearer token (default $GPUPOOL_TOKEN; an admin token for drain, cordon, forget, jobs end)",
    )
    parser.add_argument(
        "--ca",
        metavar="PEM",
        default=default,
        help="the pool CA, to dial the coordinator with TLS (default $GPUPOOL_CA)",
    )
    parser.add_argument(
        "--timeout",
        type=_positive_float,
        metavar="SECONDS",
        default=argparse.SUPPRESS if suppress else 10.0,
        help="deadline of each call to the coordinator (default 10)",
    )
    return parser


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``gpupool``."""
    parser = argparse.ArgumentParser(
        prog="gpupool",
        description="GPU-over-IP pooling: many small GPUs on a network used as one device from Python.",
        parents=[_connection_options(suppress=False)],
    )
    parser.add_argument("-V", "--version", action="version", version=f"gpupool {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    connection = _connection_options(suppress=True)

    sub = commands.add_parser("up", help="run a whole pool on this machine, in the foreground")
    up.add_arguments(sub)
    sub.set_defaults(handler=up.run)

    sub = commands.add_parser(
        "demo", help="start a local pool, run a sharded workload, check it against NumPy"
    )
    sub.add_argument("--agents", type=int, default=2, metavar="N", help="agents to start (default 2)")
    sub.add_argument("--rows", type=int, default=50_001, help="rows of the input matrix (default 50001)")
    sub.add_argument("--cols", type=int, default=512, help="columns of the input matrix (default 512)")
    sub.add_argument("--backend", choices=["auto", "cupy", "numpy"], default="auto", help="agents' backend")
    sub.add_argument(
        "--sweep",
        action="store_true",
        help="run examples/sweep.py (32 trainings via pool.map) instead, each checked against NumPy",
    )
    sub.add_argument("--quick", action="store_true", help="with --sweep: a small sweep (8 trainings)")
    sub.add_argument(
        "--kill",
        action="store_true",
        help="SIGKILL an agent holding rows midway: the results still check out (rebuilt from lineage)",
    )
    sub.set_defaults(handler=_run_demo)

    sub = commands.add_parser("status", parents=[connection], help="a summary of the pool")
    sub.add_argument("--json", action="store_true", help="print JSON")
    sub.set_defaults(handler=_operator(admin.run_status))

    sub = commands.add_parser("agents", parents=[connection], help="the agents the coordinator knows")
    sub.add_argument("--json", action="store_true", help="print the records as protobuf JSON")
    sub.add_argument("--all", action="store_true", help="include offline agents")
    sub.add_argument(
        "--watch",
        type=_positive_float,
        nargs="?",
        const=2.0,
        metavar="SECONDS",
        help="print again every SECONDS (default 2) until Ctrl-C",
    )
    sub.set_defaults(handler=_operator(admin.run_agents))

    helps = {
        "drain": "take no new work on an agent and move what it holds to other ready agents",
        "cordon": "take no new shards on an agent, keep serving",
        "uncordon": "make a cordoned, draining or quarantined agent ready again",
        "forget": "remove a dead agent, clear its retained topics and revoke its enrolment",
    }
    for action, text in helps.items():
        sub = commands.add_parser(action, parents=[connection], help=text)
        sub.add_argument("agent", metavar="AGENT", help="an agent id, a unique prefix of one, or a name")
        sub.add_argument("--reason", default="", help="why, for the record")
        if action == "drain":
            sub.add_argument(
                "--no-move",
                action="store_true",
                help="keep the agent's buffers where they are (it serves them until freed) instead of moving "
                "them to other agents",
            )
            sub.add_argument(
                "--move-timeout",
                type=_positive_float,
                metavar="SECONDS",
                default=admin.MOVE_TIMEOUT,
                help="how long to wait for the buffers to move (default %(default)g; they go on moving "
                "after)",
            )
        sub.set_defaults(handler=_operator(admin.run_admin))

    sub = commands.add_parser("jobs", parents=[connection], help="client sessions the coordinator knows")
    sub.add_argument("--json", action="store_true", help="print JSON")
    sub.add_argument("--mine", action="store_true", help="only the sessions of this token")
    job_actions = sub.add_subparsers(dest="job_action", metavar="ACTION")
    end = job_actions.add_parser(
        "end", parents=[connection], help="end a session: its agents free its buffers"
    )
    end.add_argument("job_id", metavar="JOB")
    sub.set_defaults(handler=_operator(admin.run_jobs))

    sub = commands.add_parser("token", help="create, list and revoke bearer tokens (in a state dir)")
    tokens.add_arguments(sub)
    sub.set_defaults(handler=_operator(tokens.run))

    commands.add_parser(
        "coordinator",
        add_help=False,
        help="run a coordinator (gpupool coordinator --help for its options)",
    )
    return parser


def _run_demo(args: argparse.Namespace) -> int:
    from gpupool.cli import demo, sweep  # import the client library; only the demo needs it

    return sweep.run(args) if args.sweep else demo.run(args)


def _operator(handler: Handler) -> Handler:
    """Wrap an operator command: errors become one line on stderr and exit code 1."""

    def run(args: argparse.Namespace) -> int:
        address = args.coordinator
        try:
            return handler(args)
        except ConnectError:
            print(
                f"gpupool: cannot reach the coordinator at {address} (is `gpupool up` running?)",
                file=sys.stderr,
            )
        except DeadlineExceeded as exc:
            if exc.detail.lower() == "deadline exceeded":  # our own deadline, not the coordinator's words
                print(
                    f"gpupool: the coordinator at {address} did not answer in time (--timeout)",
                    file=sys.stderr,
                )
            else:
                print(f"gpupool: {exc.detail} (coordinator {address})", file=sys.stderr)
        except GpupoolError as exc:
            print(f"gpupool: {exc}", file=sys.stderr)
        return 1

    return run


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``gpupool``; returns the exit code."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args, rest = parser.parse_known_args(arguments)
    if args.command == "coordinator":
        from gpupool.coordinator.main import main as coordinator_main

        return coordinator_main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    try:
        args.coordinator = coordinator_address(args.coordinator)
    except UsageError as exc:
        parser.error(str(exc))
    handler: Handler = args.handler
    try:
        return handler(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`gpupool agents | head`): stop quietly, as other tools do.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 1


if __name__ == "__main__":
    sys.exit(main())
