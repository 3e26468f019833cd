"""Progress bars of remote tasks, drawn by the driver (``sdk.experimental.tqdm_ray``).

A bar in a worker prints its state as one JSON line carrying ``MAGIC``; the driver's
output printer (dataplane/output_lines.py) hands such lines here instead of showing
them. The driver keeps one bar per (node, process, bar id) and draws them on stderr:
in a terminal redrawn in place, one line each; otherwise one line per bar when it
changes, at most once per ``_QUIET_REDRAW_S`` (and once more when it closes)."""

from __future__ import annotations

import json
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any

from dataplane import protocol as p

MAGIC = "__cairn_tqdm_magic_token__"
_WIDTH = 20
_QUIET_REDRAW_S = 1.0


@dataclass
class _Bar:
    state: dict[str, Any]
    origin: str  # "(name pid=N, ip=HOST)" of the process that drew it
    shown_at: float = 0.0


class BarManager:
    def __init__(self) -> None:
        self._bars: dict[tuple[str, int, str], _Bar] = {}
        self._lock = threading.Lock()
        self._drawn_lines = 0  # lines of bars on the terminal now (redrawn in place)

    def line(self, line: str, batch: p.OutputLines) -> bool:
        """Takes a progress line of a worker's output (True); False for other lines."""
        if MAGIC not in line:
            return False
        try:
            state = json.loads(line)
        except ValueError:
            return False
        origin = f"({batch.name} pid={batch.pid}, ip={batch.ip})"
        self.update((batch.ip, batch.pid, str(state.get("uuid"))), state, origin)
        return True

    def update(self, key: tuple[str, int, str], state: dict[str, Any], origin: str) -> None:
        with self._lock:
            bar = self._bars.get(key)
            if bar is None:
                bar = self._bars[key] = _Bar(state, origin)
            bar.state = state
            closed = bool(state.get("closed"))
            if sys.stderr.isatty():
                self._redraw()
            elif closed or time.monotonic() - bar.shown_at >= _QUIET_REDRAW_S:
                bar.shown_at = time.monotonic()
                print(render(bar.state, bar.origin), file=sys.stderr, flush=True)
            if closed:
                del self._bars[key]

    def _redraw(self) -> None:
        out = sys.stderr
        if self._drawn_lines:
            out.write(f"\x1b[{self._drawn_lines}F")  # back to the first bar's line
        bars = sorted(self._bars.values(), key=lambda b: b.state.get("pos") or 0)
        for bar in bars:
            out.write(f"\x1b[2K{render(bar.state, bar.origin)}\n")
        self._drawn_lines = sum(1 for b in bars if not b.state.get("closed"))
        out.flush()


def render(state: dict[str, Any], origin: str = "") -> str:
    """One bar as text: ``desc:  40%|########            | 4/10 [unit] (origin)``."""
    count, total = int(state.get("x") or 0), state.get("total")
    desc = f"{state['desc']}: " if state.get("desc") else ""
    unit = state.get("unit") or "it"
    if total:
        done = min(1.0, count / total)
        filled = int(done * _WIDTH)
        bar = f"{done:4.0%}|{'#' * filled}{' ' * (_WIDTH - filled)}| {count}/{total} {unit}"
    else:
        bar = f"{count} {unit}"
    return f"{desc}{bar} {origin}".rstrip()


bars = BarManager()  # the driver's
