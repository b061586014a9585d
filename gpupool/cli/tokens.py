"""``gpupool token create | list | revoke``: bearer tokens in a coordinator's state store.

Run on the coordinator's host, against its state dir (the store is SQLite: a running coordinator sees a
new or revoked token within seconds). The plaintext of a token is printed once, at creation; the store
keeps only its SHA-256.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import TextIO

from gpupool._config import default_state_dir
from gpupool.cli._table import render_table
from gpupool.security.store import StateStore, TokenRecord
from gpupool.security.tokens import ROLES, parse_ttl

__all__ = ["add_arguments", "run"]


def _state_dir_option(*, suppress: bool) -> argparse.ArgumentParser:
    """``--state-dir``, accepted before and after the action (``token --state-dir D list``, ``token list
    --state-dir D``)."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument(
        "--state-dir",
        default=argparse.SUPPRESS if suppress else None,
        help="the coordinator's state dir (default $GPUPOOL_STATE_DIR or ~/.local/state/gpupool/coordinator)",
    )
    return parser


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``gpupool token``."""
    parser.add_argument("--state-dir", default=None, help=argparse.SUPPRESS)
    state = _state_dir_option(suppress=True)
    actions = parser.add_subparsers(dest="token_action", metavar="ACTION", required=True)
    create = actions.add_parser("create", parents=[state], help="make a token and print it (once)")
    create.add_argument("--role", choices=ROLES, required=True, help="client, agent (to enrol rigs) or admin")
    create.add_argument("--name", default="", help="a note for the list, e.g. who holds it")
    create.add_argument("--ttl", default="", help="lifetime: 30d, 12h, 90m, seconds; default: never expires")
    create.add_argument("--json", action="store_true", help="print JSON")
    listing = actions.add_parser("list", parents=[state], help="tokens and their state (never their secrets)")
    listing.add_argument("--json", action="store_true", help="print JSON")
    revoke = actions.add_parser(
        "revoke", parents=[state], help="revoke a token by id (or a unique id prefix)"
    )
    revoke.add_argument("token_id", metavar="ID")


def _when(seconds: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds)) if seconds else "-"


def _as_dict(record: TokenRecord, now: float) -> dict[str, object]:
    return {
        "id": record.token_id,
        "role": record.role,
        "name": record.name,
        "created": record.created,
        "expires": record.expires,
        "revoked": record.revoked,
        "active": record.active(now),
    }


def run(args: argparse.Namespace, out: TextIO = sys.stdout) -> int:
    """Run ``gpupool token ACTION``."""
    state_dir = Path(args.state_dir or default_state_dir("coordinator"))
    now = time.time()
    with StateStore.open(state_dir) as store:
        if args.token_action == "create":
            token, record = store.create_token(
                role=args.role, name=args.name, ttl=parse_ttl(args.ttl), now=now
            )
            if args.json:
                print(json.dumps({"token": token, **_as_dict(record, now)}), file=out)
            else:
                print(token, file=out)
                expiry = f", expires {_when(record.expires)}" if record.expires else ""
                print(
                    f"token {record.token_id}: role {record.role}{expiry}. It is shown only now; "
                    f"revoke it with `gpupool token revoke {record.token_id}`.",
                    file=sys.stderr,
                )
            return 0
        if args.token_action == "list":
            records = store.list_tokens()
            if args.json:
                print(json.dumps([_as_dict(r, now) for r in records], indent=2), file=out)
            elif records:
                rows = [
                    [
                        r.token_id,
                        r.role,
                        r.name or "-",
                        _when(r.created),
                        _when(r.expires) if r.expires else "never",
                        "revoked" if r.revoked else ("expired" if not r.active(now) else "active"),
                    ]
                    for r in records
                ]
                print(render_table(["ID", "ROLE", "NAME", "CREATED", "EXPIRES", "STATE"], rows), file=out)
            else:
                print("no tokens", file=out)
            return 0
        record = store.revoke_token(args.token_id, now=now)
        print(
            f"token {record.token_id} ({record.role}{', ' + record.name if record.name else ''}) revoked",
            file=out,
        )
        return 0
