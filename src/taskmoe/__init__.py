"""taskmoe: modular language models from specialist experts trained separately and routed per task.

Two assemblies share one toolkit:

- **IMoE (federated)**: a router discovers categories without labels, one expert LM per
  category, optional cross-talk between experts, and a summarizer that writes the answer.
- **DOE (fused)**: one transformer whose MLPs are experts routed per *sequence*, each expert
  owning the gate that decides which sequences it takes.
"""

__version__ = "0.1.0"


def load(path, **kwargs):  # type: ignore[no-untyped-def]
    """Load a trained IMoE system from its run folder: ``system = taskmoe.load("runs/quickstart")``.

    Returns a :class:`taskmoe.inference.pipeline.System`; ``system.generate(prompt, trace=True)``
    answers with a trace of every decision. Keyword arguments go to
    :func:`taskmoe.inference.loader.load_system` (``max_experts``, ``crosstalk``, ...). Imported
    lazily so ``import taskmoe`` stays cheap (no torch until a system is loaded).
    """
    from taskmoe.inference.loader import load_system

    return load_system(path, **kwargs)


__all__ = ["__version__", "load"]
