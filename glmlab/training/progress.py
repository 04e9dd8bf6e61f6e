"""The live progress display: a tqdm bar on a terminal, plain periodic lines otherwise (logs, CI)."""

from __future__ import annotations

import sys
import time

from tqdm import tqdm


def _clock(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else \
        f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    """Shows step, loss, val loss, tokens/s and ETA; ETA honours whichever budget (steps, time) ends first."""

    def __init__(self, total_steps: int, start_step: int, max_time: float | None, enabled: bool = True,
                 line_every: float = 15.0) -> None:
        self.total = total_steps
        self.max_time = max_time
        self.interactive = enabled and sys.stderr.isatty()
        self.enabled = enabled
        self.line_every = line_every
        self._last_line = 0.0
        self.val: float | None = None
        self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, leave=True, unit="step",
                        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]",
                        disable=not self.interactive)

    def eta(self, step: int, elapsed: float, steps_per_sec: float) -> float:
        by_steps = (self.total - step) / steps_per_sec if steps_per_sec > 0 else float("inf")
        by_time = self.max_time - elapsed if self.max_time else float("inf")
        return min(by_steps, by_time)

    def update(self, step: int, loss: float, tokens_per_sec: float, elapsed: float, steps_per_sec: float) -> None:
        if not self.enabled:
            return
        val = f" | val {self.val:.4f}" if self.val is not None else ""
        eta = _clock(self.eta(step, elapsed, steps_per_sec))
        text = f"loss {loss:.4f}{val} | {tokens_per_sec / 1000:.1f}k tok/s | eta {eta}"
        if self.interactive:
            self.bar.n = step
            self.bar.set_postfix_str(text, refresh=True)
        elif time.monotonic() - self._last_line >= self.line_every:
            self._last_line = time.monotonic()
            self.message(f"step {step}/{self.total} | {text}")

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.interactive:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def close(self) -> None:
        self.bar.close()
