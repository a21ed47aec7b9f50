"""``TrainConfig``: every knob of the one train loop (:mod:`taskmoe.training.loop`).

Design choices:

- **Batch sizes are per process and per micro-step.** One optimizer step consumes
  ``batch_size * grad_accum * world_size`` samples (the *global batch*), so a 2-process DDP
  run with ``batch_size=2`` sees exactly the samples a 1-process run with ``batch_size=4`` sees.
- **Schedules are in optimizer steps**, not micro-steps or epochs: ``max_steps``,
  ``warmup_steps``, ``eval_every``, ``save_every`` and ``log_every`` all count optimizer steps.
- **0 disables a periodic action** (``eval_every``, ``save_every``, ``grad_clip``); the loop
  still evaluates and saves once at the end when it has eval data / an output folder.
"""

from __future__ import annotations

from dataclasses import dataclass

from taskmoe.config import Config, check, check_choice, check_min, check_range, doc

MIXED_PRECISION = ("no", "bf16")


@dataclass
class TrainConfig(Config):
    """Hyper-parameters and bookkeeping of one training run."""

    max_steps: int = doc(1000, "Optimizer steps to train for in total (honoured across resume).")
    batch_size: int = doc(8, "Micro-batch size per process (samples per forward/backward).")
    grad_accum: int = doc(1, "Micro-batches accumulated per optimizer step.")
    lr: float = doc(3e-4, "Peak learning rate (reached at the end of warmup).")
    weight_decay: float = doc(0.1, "AdamW decoupled weight decay for matrices (never norms, biases or embeddings).")
    betas: tuple[float, float] = doc((0.9, 0.95), "AdamW (beta1, beta2).")
    eps: float = doc(1e-8, "AdamW epsilon.")
    warmup_steps: int = doc(100, "Steps of linear warmup from lr/warmup_steps to lr.")
    min_lr_ratio: float = doc(0.1, "Cosine decay ends at lr * min_lr_ratio on the last step.")
    grad_clip: float = doc(1.0, "Clip the global gradient L2 norm to this value (0 disables clipping).")
    eval_every: int = doc(200, "Evaluate every N steps when eval data is given (0: only at the end).")
    eval_batches: int = doc(8, "Fixed number of eval batches (the first ones, unshuffled) per evaluation.")
    save_every: int = doc(500, "Save a training checkpoint every N steps when out_dir is set (0: only at the end).")
    keep_last: int = doc(2, "Training checkpoints kept on disk (older ones are deleted after a save).")
    seed: int = doc(0, "Seed of the data order and of torch/python/numpy RNGs (plus the process rank).")
    log_every: int = doc(10, "Append a metrics line to metrics.jsonl every N steps.")
    mixed_precision: str = doc("no", "'no' or 'bf16' (bf16 only on CUDA; falls back to 'no' with a warning on CPU).")
    num_workers: int = doc(0, "DataLoader worker processes (0 loads in the training process).")
    progress: bool = doc(True, "Show a progress bar with loss and tokens/s (only on a terminal, main process).")
    tensorboard: bool = doc(False, "Also write TensorBoard events under out_dir/tensorboard (if installed).")

    def validate(self) -> None:
        check_min(self, ("max_steps", "batch_size", "grad_accum", "eval_batches", "keep_last", "log_every"), 1)
        check_min(self, ("lr", "eps"), strict=True)
        check_min(self, ("weight_decay", "warmup_steps", "eval_every", "save_every", "num_workers"))
        check(
            isinstance(self.betas, (tuple, list)) and len(self.betas) == 2 and all(0.0 <= b < 1.0 for b in self.betas),
            f"TrainConfig.betas must be two numbers in [0, 1), got {self.betas}",
        )
        check_range(self, ("min_lr_ratio",))
        check(self.grad_clip >= 0, f"TrainConfig.grad_clip must be >= 0 (0 disables), got {self.grad_clip}")
        check_choice(self, "mixed_precision", MIXED_PRECISION)
        self.betas = (float(self.betas[0]), float(self.betas[1]))
