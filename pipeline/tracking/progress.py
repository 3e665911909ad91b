"""Progress for people: a tqdm bar with ETA and images/s on a terminal, plain log lines otherwise
(Slurm logs, CI), so the same code reads well in both places."""

from __future__ import annotations

import logging
import sys
import time

log = logging.getLogger("pipeline")


def _eta(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    hours, rest = divmod(seconds, 3600)
    return f"{hours}h{rest // 60:02d}m" if hours else f"{rest // 60}m{rest % 60:02d}s"


class Progress:
    def __init__(self, total: int, start: int, enabled: bool):
        self.total, self.start_step, self.enabled = total, start, enabled
        self.started = time.perf_counter()
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True, file=sys.stderr)

    def update(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        text = f"loss {metrics['train_loss']:.4f} lr {metrics['lr']:.2e} img/s {metrics['images_per_s']:.0f}"
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix_str(text, refresh=True)
            return
        done = step - self.start_step
        rate = done / (time.perf_counter() - self.started) if done else 0.0
        eta = _eta((self.total - step) / rate) if rate else "?"
        log.info("step %d/%d (%.0f%%) %s eta %s", step, self.total, 100.0 * step / self.total, text, eta)

    def write(self, message: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(message, file=sys.stderr)
        else:
            log.info("%s", message)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
