"""Recipes: one thin module per training job, all of one shape (torchtune's).

Each recipe module (router, experts, summarizer, crosstalk, doe; ``tests/training/test_recipe_configs.py``
checks the shape) has

- a **config dataclass** (:class:`~taskmoe.config.Config`; every field's ``doc(...)`` help doubles
  as CLI help): ``RouterConfig`` (router), ``ExpertsRecipeConfig`` (experts),
  ``SummarizerRecipeConfig`` (summarizer), ``CrosstalkRecipeConfig`` (crosstalk),
  ``DOERecipeConfig`` (doe), ``DOEAddConfig`` (doe_add);
- ``setup`` (builds the data from :mod:`taskmoe.data` and the model from its config), ``train``
  (one call of the loop :func:`taskmoe.training.loop.train` with a ``loss_fn`` made of the pure
  functions in :mod:`taskmoe.training.losses`) and ``cleanup`` (saves the component, its report
  and registers it in the run's manifest);
- its CLI command (a typed function in :mod:`taskmoe.cli.table`), made by
  :func:`~taskmoe.training.recipes.command.recipe_command` from the recipe's ``FLAGS`` map
  ({flag: config path}): each flag is typed and documented by its config field, ``--config
  FILE.json`` reads the config, the flags given apply on top, and ``--set PATH=VALUE`` (repeatable,
  dotted paths such as ``train.lr=3e-4``) overrides any field last, through the one helper
  :func:`taskmoe.config.config_from_flags` / :func:`taskmoe.config.apply_overrides`.

No recipe carries its own loop, optimizer, scheduler, checkpointing, progress bar or perplexity
loop: those live in the loop and in :mod:`taskmoe.eval.nll`, so every job resumes exactly, stops
on NaN, and logs and evaluates the same way. ``summarizer_run`` assembles the summarizer recipe
from a run folder (``train summarizer``); ``quickstart`` chains every recipe.
"""
