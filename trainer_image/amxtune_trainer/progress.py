"""Progress reporting (rank 0 only).

Machine-readable: one JSON object per line on stdout, which the operator reads; the events and
their keys are the models of amxtune_api.events (TrainingStarted, TrainingProgress,
TrainingCompleted, TrainingStopped), shared by both sides.
Human: a progress bar on stderr, only when stdout is a terminal.
"""

from __future__ import annotations

import sys
import time
from collections import deque

from amxtune_api.events import Event, TrainingProgress


def emit(event: Event, stream=None) -> None:
    stream = stream or sys.stdout
    stream.write(event.line() + "\n")
    stream.flush()


class Progress:
    def __init__(self, enabled: bool, max_steps: int, start_step: int, samples_per_step: int,
                 logging_steps: int):
        self.enabled = enabled
        self.max_steps = max_steps
        self.samples_per_step = samples_per_step
        self.logging_steps = logging_steps
        self.start_step = start_step
        self.recent: deque[tuple[int, float]] = deque(maxlen=20)
        self.recent.append((start_step, time.perf_counter()))
        self.bar = None
        if enabled and sys.stdout.isatty():
            try:
                from tqdm.auto import tqdm

                self.bar = tqdm(total=max_steps, initial=start_step, file=sys.stderr,
                                unit="step", dynamic_ncols=True)
            except ImportError:
                self.bar = None

    def step(self, step: int, loss: float, lr: float) -> None:
        now = time.perf_counter()
        self.recent.append((step, now))
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        if step % self.logging_steps == 0 or step == self.max_steps:
            first_step, first_time = self.recent[0]
            elapsed = max(now - first_time, 1e-9)
            per_step = elapsed / max(step - first_step, 1)
            emit(TrainingProgress(
                step=int(step), max_steps=int(self.max_steps), loss=float(loss), lr=float(lr),
                samples_per_second=round(self.samples_per_step / per_step, 4),
                eta_seconds=round(per_step * (self.max_steps - step), 2),
            ))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None
