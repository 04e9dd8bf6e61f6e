"""The live progress display: a tqdm bar on a terminal, plain periodic lines otherwise (logs, CI).

The bar fills with the fraction of the budget used: steps out of ``max_steps``, or time out of
``max_time`` when that budget ends first.
"""

from __future__ import annotations

import sys
import time

from tqdm import tqdm

BAR_UNITS = 1000


def _clock(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    seconds = max(0, int(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"
    return f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    """Shows step, loss, val loss, tokens/s and ETA; ETA honours whichever budget (steps, time) ends first."""

    def __init__(self, total_steps: int, max_time: float | None, enabled: bool = True,
                 line_every: float = 15.0) -> None:
        self.total = total_steps
        self.max_time = max_time
        self.enabled = enabled
        self.interactive = enabled and sys.stderr.isatty()
        self.line_every = line_every
        self._last_line = 0.0
        self.val: float | None = None
        self.bar = tqdm(total=BAR_UNITS, initial=0, dynamic_ncols=True, leave=True,
                        bar_format="{l_bar}{bar}| [{elapsed}{postfix}]", disable=not self.interactive)

    def status(self, step: int, loss: float, tokens_per_sec: float, elapsed: float,
               steps_per_sec: float) -> tuple[float, str]:
        """(fraction of the budget used, the status text) — split out so it can be tested without a terminal."""
        by_steps = (self.total - step) / steps_per_sec if steps_per_sec > 0 else float("inf")
        by_time = max(0.0, self.max_time - elapsed) if self.max_time else float("inf")
        fraction = max(step / self.total, elapsed / self.max_time if self.max_time else 0.0)
        steps_text = f"step {step}/{self.total}" if by_steps <= by_time else f"step {step}"
        val = f" | val {self.val:.4f}" if self.val is not None else ""
        text = (f"{steps_text} | loss {loss:.4f}{val} | {tokens_per_sec / 1000:.1f}k tok/s | "
                f"eta {_clock(min(by_steps, by_time))}")
        return min(fraction, 1.0), text

    def update(self, step: int, loss: float, tokens_per_sec: float, elapsed: float, steps_per_sec: float) -> None:
        if not self.enabled:
            return
        fraction, text = self.status(step, loss, tokens_per_sec, elapsed, steps_per_sec)
        if self.interactive:
            self.bar.n = int(fraction * BAR_UNITS)
            self.bar.set_postfix_str(text, refresh=True)
        elif time.monotonic() - self._last_line >= self.line_every:
            self._last_line = time.monotonic()
            self.message(text)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.interactive:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        self.bar.close()
