"""taskmoe.training: the one train loop and what it is made of.

- :mod:`~taskmoe.training.loop`: :func:`train` (accelerate/DDP, accumulation, eval, metrics,
  NaN stop, atomic checkpoints, exact resume); :mod:`~taskmoe.training.evaluate`: its
  :func:`evaluate` (token-weighted eval loss and perplexity, via :mod:`taskmoe.eval.nll`).
- :mod:`~taskmoe.training.config`: :class:`TrainConfig`.
- :mod:`~taskmoe.training.losses`: pure loss functions (CE, sequence log-prob, DPO, balance).
- :mod:`~taskmoe.training.checkpoint`: step-folder checkpoints, :func:`load_latest`.
- :mod:`~taskmoe.training.optim`, :mod:`~taskmoe.training.sampler`, :mod:`~taskmoe.training.rng`,
  :mod:`~taskmoe.training.metrics`: the loop's small helpers.
- :mod:`~taskmoe.training.recipes`: thin per-job setup/train/cleanup over the loop.

Nothing is imported here, so ``import taskmoe.training.losses`` stays light.
"""
