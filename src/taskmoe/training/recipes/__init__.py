"""Recipes: one thin module per training job (router, experts, summarizer, cross-talk, DOE, SFT, DPO).

A recipe only *sets up* (builds the model from its config, gets its dataset from
:mod:`taskmoe.data`, writes a ``loss_fn(model, batch) -> (loss, metrics)`` from the pure
functions in :mod:`taskmoe.training.losses`), *trains* by calling the one loop
:func:`taskmoe.training.loop.train`, and *cleans up* (exports the trained component with
:func:`taskmoe.io.save_component`). No recipe carries its own loop, optimizer, scheduler,
checkpointing or progress bar: those live in the loop, so every job resumes exactly, stops on
NaN, and logs the same metrics.
"""
