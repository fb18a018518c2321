"""What the outer loop shows and logs: a progress bar and the tracker (W&B), on rank 0 only.

reporter = OuterLoopReporter(tracker, progress=True, world=world, total=outer_steps)
reporter.step(metrics, step, skipped)     # after every outer step
reporter.finish(history, skipped)         # final_* summary
reporter.close()
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from l2o.meta.distributed import World


class OuterLoopReporter:
    """The progress bar starts after the first reported step: the first outer step carries
    one-off warm-up (allocation, caches), which would make the bar's ETA wildly wrong."""

    def __init__(self, tracker: Any, *, progress: bool, world: World, total: int) -> None:
        self.tracker = tracker if world.is_main else None
        self.show = progress and world.is_main
        self.total = total
        self._bar = None

    def step(self, metrics: Mapping[str, float], step: int, skipped: int) -> None:
        if self.tracker is not None:
            self.tracker.log(metrics, step=step)
        if not self.show:
            return
        if self._bar is None:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=self.total, initial=step - 1, desc="meta-train", unit="step", mininterval=1.0
            )
        self._bar.update(1)
        self._bar.set_postfix(
            meta_loss=f"{metrics.get('meta_loss', float('nan')):.4g}", skipped=skipped
        )

    def finish(self, history: Sequence[Mapping[str, float]], skipped: int) -> None:
        if self.tracker is not None:
            final = {f"final_{k}": v for k, v in (history[-1] if history else {}).items()}
            self.tracker.summary({**final, "skipped_nonfinite": skipped})

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
