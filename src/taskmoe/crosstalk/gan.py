"""GAN-style training of fluent interruptions: two expert generators (LoRA) against a discriminator.

The IMoE seed: "Any two experts are put in a GAN training regimen, but both of them are
generators. The first one starts talking, then the second one tries to interrupt fluently. The
discriminator sees if it can tell if it was interrupted or not. It's fed both the uninterrupted
first expert's response and the interrupted response, but separately. No rewards are given to
the generators for the uninterrupted message. If the discriminator can tell that it's
interrupted, both generators are given a heavy penalty. If not, they're given a heavy reward.
This is all fine-tuning via LoRA, so it can save compute by only activating once cross-talk
engages."

One step (:meth:`CrosstalkGAN.forward`, the ``loss_fn`` of the shared train loop), for a batch of
prompts, each with its opener (the expert that starts) and the pair's router confidences:

1. **Uninterrupted** ``x_u``: the opener writes ``N`` tokens alone, adapters off (outside
   cross-talk an expert is its base model): the "real" texts.
2. **Interrupted** ``x_i``: the same first ``k`` tokens (the opening, ``k`` drawn uniformly in
   ``[opening_min, opening_max]`` per step), then the other expert interrupts (forced) and the
   dialogue goes on under the interrupt policy (:mod:`taskmoe.crosstalk.dialogue`) with both
   cross-talk adapters on, to ``N`` tokens in total. Neither text stops early, so length is no cue.
3. **Discriminator** ``D`` (:mod:`taskmoe.crosstalk.discriminator`) scores both, *separately*;
   cross-entropy with labels 0 (uninterrupted) / 1 (interrupted) (:func:`discriminator_loss`).
4. **Reward** of each interrupted text from D's detection probability ``p = sigmoid(D(x_i))``
   (before D's update), the same for both generators (:func:`detection_reward`); the
   uninterrupted text earns nothing and gets no generator gradient (it is sampled with the
   adapters off and only enters D's loss).
5. **REINFORCE with a moving-average baseline** ``b`` (:func:`reinforce_loss`,
   :func:`update_baseline`): the advantage ``A = R - b`` weighs the mean log-probability of the
   cross-talk tokens of ``x_i`` (every token sampled after the interruption, each under the
   model and adapter that wrote it: :func:`~taskmoe.crosstalk.dialogue.token_scores`).
6. ``loss = L_D + L_G``: the two parameter sets are disjoint (D's weights; the adapters' A, B),
   so one optimizer step updates D by its cross-entropy and the generators by the policy
   gradient, both against the same pre-update D.

Design choices:

- **Base weights frozen** (:func:`attach_adapter` + ``mark_only_adapter_trainable``); experts
  stay in eval mode, so the policy that sampled a token is exactly the one differentiated.
- **Reward** ``hard`` is the seed's: ``R = -S`` if D detects the interruption (``p >= 0.5``),
  ``+S`` otherwise. ``soft`` (default) is its expectation when D's call is read as a
  Bernoulli(p) draw, ``R = S (1 - 2p)``: same sign and mean behaviour, but it still ranks samples
  when D detects all of them (then every hard reward is ``-S``, the advantage is 0 and nothing
  is learned).
- **Reproducible and resumable**: each training step draws from a generator seeded by
  ``(seed, steps)``, where ``steps`` is a buffer (saved in checkpoints with the baseline), so a
  resumed run draws the same rollouts; evaluation seeds from the batch's content.

Glossary: ``x_u`` uninterrupted text, ``x_i`` interrupted text, ``N`` tokens per text
(``dialogue.max_new_tokens``), ``k`` opening length, ``p`` D's detection probability, ``S``
reward scale (the seed's "heavy"), ``R`` reward, ``b`` baseline, ``m`` baseline momentum,
``A = R - b`` advantage, ``n_i`` cross-talk tokens of sample ``i``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from taskmoe.config import Config, check, check_choice, check_min, check_range, doc
from taskmoe.crosstalk.dialogue import DialogueConfig, DialogueTokens, Speaker, Transcript, run_dialogues, token_scores
from taskmoe.crosstalk.discriminator import Discriminator, pad_batch
from taskmoe.errors import ConfigError
from taskmoe.layers.lora import adapter_names, inject, mark_only_adapter_trainable, set_adapter

__all__ = [
    "GANConfig",
    "REWARDS",
    "detection_reward",
    "update_baseline",
    "reinforce_loss",
    "discriminator_loss",
    "crosstalk_logprobs",
    "attach_adapter",
    "CrosstalkGAN",
    "Rollout",
    "gan_loss",
]

REWARDS = ("soft", "hard")


def _gan_dialogue() -> DialogueConfig:
    return DialogueConfig(max_new_tokens=32, n_turns=3, segment_tokens=8, min_segment_tokens=4, temperature=1.0)


@dataclass
class GANConfig(Config):
    """The adversarial game: rollouts, reward, baseline, and the generators' LoRA adapters."""

    dialogue: DialogueConfig = field(default_factory=_gan_dialogue,
                                     metadata={"help": "how the rollouts are generated (N = max_new_tokens)"})
    opening_min: int = doc(4, "fewest tokens the opener says before the forced interruption")
    opening_max: int = doc(16, "most tokens the opener says before the forced interruption")
    reward: str = doc("soft", "soft: R = S (1 - 2p); hard (the seed's): R = -S if D detects (p >= 0.5) else +S")
    reward_scale: float = doc(1.0, "S: magnitude of the penalty / reward")
    baseline_momentum: float = doc(0.9, "m: baseline b <- m b + (1 - m) mean(R)")
    adapter: str = doc("crosstalk", "name of the cross-talk LoRA adapter in each expert")
    lora_targets: list[str] = doc(["out_proj", "gate_up", "down"], "LoRA target module patterns in the experts")
    lora_rank: int = doc(8, "LoRA rank r")
    lora_alpha: float = doc(16.0, "LoRA alpha (scale alpha / r)")
    seed: int = doc(0, "seed of the rollouts (combined with the step counter)")

    def validate(self) -> None:
        if isinstance(self.dialogue, dict):
            self.dialogue = DialogueConfig.from_dict(self.dialogue, source="GANConfig.dialogue")
        d = self.dialogue
        check(d.temperature > 0, f"GANConfig.dialogue.temperature must be > 0 (the policy gradient needs a "
                                 f"stochastic policy), got {d.temperature}")
        check(d.n_turns >= 2, f"GANConfig.dialogue.n_turns must be >= 2 (an interruption is a second turn), got {d.n_turns}")
        check(1 <= self.opening_min <= self.opening_max < d.max_new_tokens,
              f"GANConfig needs 1 <= opening_min <= opening_max < dialogue.max_new_tokens, got {self.opening_min}, "
              f"{self.opening_max}, {d.max_new_tokens}")
        check_choice(self, "reward", REWARDS)
        check_min(self, ("reward_scale",), strict=True)
        check_range(self, ("baseline_momentum",), open_high=True)
        check(bool(self.lora_targets), "GANConfig.lora_targets must name at least one module pattern")
        check(self.lora_rank >= 1 and self.lora_alpha > 0, f"GANConfig: lora_rank must be >= 1 and lora_alpha > 0, "
                                                           f"got {self.lora_rank}, {self.lora_alpha}")


# ------------------------------------------------------------------------------ pure math
def detection_reward(p_detect: Tensor, mode: str = "soft", scale: float = 1.0) -> Tensor:
    """Generator reward per interrupted text from D's detection probability ``p`` (B,).

    - ``hard``: ``R = -S`` if ``p >= 0.5`` (D tells it was interrupted) else ``+S``.
    - ``soft``: ``R = S (1 - 2p)`` = ``E[R_hard]`` if D's call were a Bernoulli(p) draw.
    """
    p = p_detect.detach().float()
    if mode == "hard":
        return torch.where(p >= 0.5, -scale, scale).to(p.dtype)
    if mode == "soft":
        return scale * (1.0 - 2.0 * p)
    raise ConfigError(f"reward mode must be one of {REWARDS}, got {mode!r}")


def update_baseline(baseline: Tensor, rewards: Tensor, momentum: float) -> Tensor:
    """Moving average ``b' = m b + (1 - m) mean(R)`` (a new tensor; the caller stores it)."""
    return momentum * baseline + (1.0 - momentum) * rewards.detach().float().mean()


def reinforce_loss(logp_sum: Tensor, n_tokens: Tensor, advantages: Tensor) -> Tensor:
    """Policy-gradient loss ``L_G = -(1/B) sum_i A_i * (1/n_i) sum_t log pi(a_it)``.

    ``logp_sum`` (B,) is each sample's summed log-probability of its generated tokens (with
    gradient), ``n_tokens`` (B,) their count (rows with ``n_i = 0`` contribute nothing),
    ``advantages`` (B,) ``A = R - b`` (detached: the reward is a constant to the generators).
    Length-normalising keeps the step size independent of how many tokens a sample has.
    """
    n = n_tokens.to(logp_sum.dtype)
    per_token = torch.where(n > 0, logp_sum / n.clamp(min=1), torch.zeros_like(logp_sum))
    return -(advantages.detach().to(logp_sum.dtype) * per_token).mean()


def discriminator_loss(real_logits: Tensor, fake_logits: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``L_D = (BCE(z_u, 0) + BCE(z_i, 1)) / 2`` (means over the batch) and D's accuracy on each side.

    Returns ``(loss, acc_uninterrupted, acc_interrupted)``; D calls a text interrupted when ``z >= 0``.
    """
    loss = 0.5 * (F.binary_cross_entropy_with_logits(real_logits, torch.zeros_like(real_logits))
                  + F.binary_cross_entropy_with_logits(fake_logits, torch.ones_like(fake_logits)))
    acc_real = (real_logits.detach() < 0).float().mean()
    acc_fake = (fake_logits.detach() >= 0).float().mean()
    return loss, acc_real, acc_fake


# ------------------------------------------------------------------------ generator scores
def crosstalk_logprobs(speaker: Speaker, index: int, transcripts: Sequence[Transcript],
                       temperature: float) -> tuple[Tensor, Tensor]:
    """``(sum of log pi, count)`` per transcript (B,) over the tokens speaker ``index`` sampled with
    cross-talk engaged, recomputed with gradient under its adapter (teacher-forced, one pass)."""
    device = next(speaker.model.parameters()).device
    B = len(transcripts)
    logp_sum = torch.zeros(B, device=device)
    count = torch.zeros(B, device=device)
    rows, splits, which = [], [], []
    for b, t in enumerate(transcripts):
        s = t.crosstalk_start
        if s is None or not any(w == index for w in t.speakers[s:]):
            continue
        rows.append(list(t.prompt) + list(t.ids))
        splits.append(len(t.prompt) + s - 1)
        which.append(b)
    if not rows:
        return logp_sum, count
    scores = token_scores(speaker.model, rows, temperature, adapter=speaker.adapter, adapter_from=splits)  # (R, L - 1)
    mask = torch.zeros_like(scores, dtype=torch.bool)
    for r, b in enumerate(which):
        t = transcripts[b]
        P = len(t.prompt)
        for j in range(t.crosstalk_start or 0, len(t.ids)):
            if t.speakers[j] == index:
                mask[r, P + j - 1] = True  # token j is predicted at input position P + j - 1
    sums = (scores * mask).sum(dim=-1)  # (R,)
    idx = torch.tensor(which, device=device)
    logp_sum = logp_sum.index_add(0, idx, sums)
    count = count.index_add(0, idx, mask.sum(dim=-1).to(count.dtype))
    return logp_sum, count


def attach_adapter(model: nn.Module, cfg: GANConfig) -> list[str]:
    """Inject the cross-talk adapter into an expert (switched off: it only runs during cross-talk);
    return the wrapped module names."""
    names = inject(model, list(cfg.lora_targets), rank=cfg.lora_rank, alpha=cfg.lora_alpha, adapter_name=cfg.adapter)
    set_adapter(model, None)
    return names


# ------------------------------------------------------------------------------------ module
@dataclass
class Rollout:
    """One step's samples: uninterrupted and interrupted transcripts (row-aligned) and the opening length."""

    real: list[Transcript]
    fake: list[Transcript]
    opening: int


class CrosstalkGAN(nn.Module):
    """Both expert generators (with their cross-talk adapters) and the discriminator, as one module
    whose ``forward(batch) -> (loss, metrics)`` is a GAN step (module docstring).

    ``batch``: ``{"prompt": (B, P) long, "first": (B,) long opener index, "confidences": (B, 2)}``.
    The experts must already hold adapter ``cfg.adapter`` (:func:`attach_adapter`); everything of
    theirs but that adapter is frozen here.
    """

    def __init__(self, experts: Sequence[nn.Module], names: Sequence[str], discriminator: Discriminator,
                 cfg: GANConfig, tokens: DialogueTokens = DialogueTokens()) -> None:
        super().__init__()
        if len(experts) != 2 or len(names) != 2 or names[0] == names[1]:
            raise ConfigError(f"CrosstalkGAN needs two experts with distinct names, got {list(names)}")
        for n, m in zip(names, experts):
            if cfg.adapter not in adapter_names(m):
                raise ConfigError(f"expert '{n}' has no adapter '{cfg.adapter}' (it has {adapter_names(m)}); "
                                  "call attach_adapter first")
            if m.vocab_size != discriminator.cfg.vocab_size:
                raise ConfigError(f"expert '{n}' has vocab_size {m.vocab_size} but the discriminator reads "
                                  f"{discriminator.cfg.vocab_size}")
        self.experts = nn.ModuleList(experts)
        self.names = (str(names[0]), str(names[1]))
        self.discriminator = discriminator
        self.cfg = cfg
        self.tokens = tokens
        for m in self.experts:
            mark_only_adapter_trainable(m, cfg.adapter)
        self.register_buffer("baseline", torch.zeros((), dtype=torch.float32))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))
        self.experts.eval()

    def train(self, mode: bool = True) -> "CrosstalkGAN":
        super().train(mode)
        self.experts.eval()  # the sampling policy must equal the differentiated one (no dropout)
        return self

    @property
    def speakers(self) -> list[Speaker]:
        return [Speaker(n, m, self.cfg.adapter) for n, m in zip(self.names, self.experts)]

    def generator_for(self, batch: dict[str, Tensor]) -> torch.Generator:
        """Training: seeded by (seed, steps); evaluation: by the batch's prompts (the same rollouts each time)."""
        if self.training:
            seed = self.cfg.seed * 1_000_003 + int(self.steps)
        else:
            digest = hashlib.sha1(batch["prompt"].detach().cpu().numpy().tobytes()).hexdigest()
            seed = self.cfg.seed * 1_000_003 + int(digest[:12], 16)
        return torch.Generator().manual_seed(seed % (2**63))

    # -- the two halves of a step ----------------------------------------------------------
    @torch.no_grad()
    def rollout(self, batch: dict[str, Tensor], generator: torch.Generator) -> Rollout:
        """Sample the uninterrupted and the interrupted texts of every prompt (module docstring, 1-2)."""
        cfg = self.cfg
        prompts = batch["prompt"].tolist()
        first = batch["first"].tolist()
        conf = batch["confidences"].tolist()
        lo, hi = cfg.opening_min, cfg.opening_max
        k = int(torch.randint(lo, hi + 1, (1,), generator=generator))
        alone = cfg.dialogue.replace(n_turns=1)  # nobody may interrupt; no cross-talk, so adapters stay off
        free = DialogueTokens(stop_ids=frozenset(), sentence_end_ids=self.tokens.sentence_end_ids)  # no early stop
        speakers = self.speakers
        real = run_dialogues(speakers, prompts, conf, alone, generator, first=first, tokens=free)
        fake = run_dialogues(speakers, prompts, conf, cfg.dialogue, generator, first=first,
                             openings=[t.ids[:k] for t in real], tokens=free)
        return Rollout(real, fake, k)

    def losses(self, rollout: Rollout) -> tuple[Tensor, dict[str, Any]]:
        """GAN losses of a rollout (module docstring, 3-6); updates the baseline when training."""
        cfg = self.cfg
        device = self.baseline.device
        real, fake = rollout.real, rollout.fake
        x_u, m_u = pad_batch([t.ids for t in real], device=device)
        x_i, m_i = pad_batch([t.ids for t in fake], device=device)
        z_u = self.discriminator(x_u, m_u)  # (B,)
        z_i = self.discriminator(x_i, m_i)  # (B,)
        d_loss, acc_u, acc_i = discriminator_loss(z_u, z_i)
        p_detect = torch.sigmoid(z_i.detach())
        rewards = detection_reward(p_detect, cfg.reward, cfg.reward_scale)  # (B,)
        advantages = rewards - self.baseline
        logp_sum = torch.zeros(len(fake), device=device)
        count = torch.zeros(len(fake), device=device)
        for e, sp in enumerate(self.speakers):
            s, c = crosstalk_logprobs(sp, e, fake, cfg.dialogue.temperature)
            logp_sum, count = logp_sum + s, count + c
        g_loss = reinforce_loss(logp_sum, count, advantages)
        metrics = {
            "d_loss": float(d_loss.detach()), "d_acc": float(0.5 * (acc_u + acc_i)), "d_acc_uninterrupted": float(acc_u),
            "d_acc_interrupted": float(acc_i), "p_detect": float(p_detect.mean()), "reward": float(rewards.mean()),
            "baseline": float(self.baseline), "advantage_abs": float(advantages.abs().mean()), "g_loss": float(g_loss.detach()),
            "crosstalk_logp": float((logp_sum.detach() / count.clamp(min=1)).mean()),
            "interruptions": sum(t.n_interruptions for t in fake) / len(fake),
            "crosstalk_tokens": float(count.mean()), "opening": float(rollout.opening),
            "tokens": int(sum(len(t.ids) for t in real) + sum(len(t.ids) for t in fake)),
        }  # fmt: skip
        if self.training:
            self.baseline.copy_(update_baseline(self.baseline, rewards, cfg.baseline_momentum))
        return d_loss + g_loss, metrics

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Any]]:
        generator = self.generator_for(batch)
        out = self.losses(self.rollout(batch, generator))
        if self.training:
            self.steps += 1
        return out


def gan_loss(model: nn.Module, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Any]]:
    """The ``loss_fn`` for :func:`taskmoe.training.loop.train`: one GAN step of ``model`` (a CrosstalkGAN)."""
    return model(batch)
