"""Tiny models, datasets and loss functions shared by the training tests (and the DDP script).

The LM is an embedding + a residual MLP with dropout + a linear head: small enough to train in
milliseconds on CPU, with dropout so exact-resume tests also prove the RNG state is restored.
The data is learnable by a bigram model: every sequence follows ``x[t+1] = (5 * x[t] + 3) mod V``
from a random start, so the loss clearly falls within a few steps.
"""

from __future__ import annotations

import torch
from torch import nn

from taskmoe.training.losses import lm_cross_entropy, next_token_targets


class TinyLM(nn.Module):
    def __init__(self, vocab: int = 32, d: int = 16, dropout: float = 0.1) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.norm = nn.LayerNorm(d)
        self.drop = nn.Dropout(dropout)
        self.mlp = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)  # (B, T, D)
        x = x + torch.tanh(self.mlp(self.drop(self.norm(x))))
        return self.head(x)  # (B, T, V)


class AffineSequences:
    """Map-style dataset of ``n`` int64 sequences of length ``T``; ``collate`` stacks them."""

    def __init__(self, n: int, T: int = 12, vocab: int = 32, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        x = [torch.randint(0, vocab, (n, 1), generator=g)]
        for _ in range(T - 1):
            x.append((5 * x[-1] + 3) % vocab)
        self.data = torch.cat(x, dim=1)  # (n, T)

    def __len__(self) -> int:
        return self.data.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.data[i]

    def collate(self, samples: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"input_ids": torch.stack(samples)}  # (B, T)


def lm_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
    ids = batch["input_ids"]
    logits = model(ids)
    targets = next_token_targets(ids)
    loss = lm_cross_entropy(logits, targets)
    acc = (logits.argmax(-1) == targets)[:, :-1].float().mean()
    return loss, {"tokens": int(ids.numel()), "accuracy": acc}
