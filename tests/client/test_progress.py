"""Progress bars: shown for calls that outlast the delay, in a terminal, and never when progress is off."""

from __future__ import annotations

import io
import time

import numpy as np
import pytest
from rich.console import Console

from gpupool.client.progress import Tracker, progress_default
from gpupool.local import LocalPool


def terminal() -> tuple[Console, io.StringIO]:
    out = io.StringIO()
    return Console(file=out, force_terminal=True, width=100), out


def test_a_long_call_shows_its_bar_and_clears_it() -> None:
    console, out = terminal()
    with Tracker("upload 256 MiB", total=1000, unit="bytes", enabled=True, delay=0.05, console=console) as t:
        deadline = time.monotonic() + 30
        while not t.shown and time.monotonic() < deadline:  # the timer thread shows it after the delay
            time.sleep(0.01)
        t.advance(400)
        assert t.shown
    assert not t.shown
    assert "gpupool upload 256 MiB" in out.getvalue()
    assert t.done == 400


def test_a_short_call_or_progress_off_prints_nothing() -> None:
    console, out = terminal()
    with Tracker("compute", total=2, unit="programs", enabled=True, delay=5, console=console) as quick:
        quick.advance(2)
    with Tracker("compute", enabled=False, delay=0, console=console) as off:
        time.sleep(0.1)
    assert not quick.shown
    assert not off.shown
    assert out.getvalue() == ""


def test_progress_is_off_by_default_outside_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    assert progress_default() is False  # pytest's stderr is not a terminal
    monkeypatch.setenv("CI", "true")
    assert progress_default() is False


def test_pool_calls_report_progress_when_asked(local_pool: LocalPool) -> None:
    with local_pool.connect(progress=False) as quiet:
        assert quiet._session.progress is False
    with local_pool.connect(progress=True) as pool:
        session = pool._session
        session.progress_delay = 0.0
        made: list[Tracker] = []
        track = session.track

        def spy(what: str, **kwargs: object) -> Tracker:
            tracker = track(what, **kwargs)  # type: ignore[arg-type]
            made.append(tracker)
            return tracker

        session.track = spy  # type: ignore[method-assign]
        x = pool.asarray(np.ones((4000, 8)), rows=[2000, 2000])
        total = float((x * 2).sum())
        np.testing.assert_array_equal(x.get(), np.ones((4000, 8)))
    assert total == 64000
    whats = [t.what for t in made]
    assert whats[:1] == ["upload"]
    assert "download" in whats
    transfers = [t for t in made if t.unit == "bytes"]
    assert [t.total for t in transfers] == [4000 * 8 * 8] * 2
    assert all(t.done == t.total for t in transfers)  # every chunk counted, as it moved
    programs = [t for t in made if t.unit == "programs"]
    assert programs
    assert all(t.done == t.total for t in programs)
