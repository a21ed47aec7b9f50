"""taskmoe: modular language models from specialist experts trained separately and routed per task.

Two assemblies share one toolkit:

- **IMoE (federated)**: a router discovers categories without labels, one expert LM per
  category, optional cross-talk between experts, and a summarizer that writes the answer.
- **DOE (fused)**: one transformer whose MLPs are experts routed per *sequence*, each expert
  owning the gate that decides which sequences it takes.
"""

__version__ = "0.1.0"
