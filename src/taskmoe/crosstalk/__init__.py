"""taskmoe.crosstalk: expert cross-talk (the IMoE seed's interruptions).

- :mod:`~taskmoe.crosstalk.policy`: ``P_interrupt`` and the per-expert :class:`InterruptState`;
- :mod:`~taskmoe.crosstalk.dialogue`: interleaved generation of two experts -> :class:`Transcript`;
- :mod:`~taskmoe.crosstalk.discriminator`: the interrupted-or-not classifier;
- :mod:`~taskmoe.crosstalk.gan`: REINFORCE of the experts' LoRA adapters against the discriminator;
- :mod:`~taskmoe.crosstalk.runner`: the ``crosstalk/`` folder and the pipeline's runner.
"""

from taskmoe.crosstalk.dialogue import (
    DialogueConfig,
    DialogueTokens,
    Speaker,
    Transcript,
    Turn,
    run_crosstalk,
    run_dialogues,
)
from taskmoe.crosstalk.discriminator import Discriminator, DiscriminatorConfig
from taskmoe.crosstalk.gan import CrosstalkGAN, GANConfig
from taskmoe.crosstalk.policy import InterruptConfig, InterruptState, interrupt_probability, sample_interrupt
from taskmoe.crosstalk.runner import CrosstalkRunner, load_crosstalk, save_crosstalk

__all__ = [
    "DialogueConfig", "DialogueTokens", "Speaker", "Transcript", "Turn", "run_crosstalk", "run_dialogues",
    "Discriminator", "DiscriminatorConfig", "CrosstalkGAN", "GANConfig", "InterruptConfig", "InterruptState",
    "interrupt_probability", "sample_interrupt", "CrosstalkRunner", "load_crosstalk", "save_crosstalk",
]
