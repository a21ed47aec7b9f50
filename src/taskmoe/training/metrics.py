"""What a run reports while it trains: metrics JSONL (+ optional TensorBoard).

- ``out_dir/metrics.jsonl`` gets one JSON object per line: ``{"kind": "train", "step", "loss",
  "lr", "grad_norm", "tokens_per_s", "epoch", ...loss_fn metrics}`` every ``log_every`` steps and
  ``{"kind": "eval", "step", "eval_loss", "eval_ppl", ...}`` per evaluation. On resume the
  lines after the resumed step (written by the interrupted run) are dropped first, so the file
  reads as one uninterrupted run.
- TensorBoard is optional: used only when asked and ``torch.utils.tensorboard`` imports.
- The loop's progress bar is :func:`taskmoe.progress.progress_bar` (loss and tokens/s fields):
  off when not on a terminal, off on non-main processes, off when ``TrainConfig.progress`` is False.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from taskmoe.io import atomic_write_text

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


class MetricsWriter:
    """Append metric records to ``out_dir/metrics.jsonl`` (and TensorBoard); a no-op without out_dir."""

    def __init__(self, out_dir: Path | None, *, resume_step: int, tensorboard: bool = False) -> None:
        self.path = None if out_dir is None else Path(out_dir) / METRICS_FILE
        self._tb = None
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.exists():
            self._truncate_after(resume_step)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(Path(out_dir) / "tensorboard"), purge_step=resume_step + 1)
            except ImportError:
                log.warning("TrainConfig.tensorboard is set but tensorboard is not installed; writing JSONL only")

    def _truncate_after(self, step: int) -> None:
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a crash
                continue
            if isinstance(rec, dict) and int(rec.get("step", 0)) <= step:
                kept.append(line)
        atomic_write_text(self.path, "".join(f"{line}\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if self.path is None:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self._tb is not None:
            kind, step = record.get("kind", "train"), int(record["step"])
            for k, v in record.items():
                if k not in ("kind", "step") and isinstance(v, (int, float)) and math.isfinite(v):
                    self._tb.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
