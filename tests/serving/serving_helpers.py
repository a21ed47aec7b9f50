"""Plain helpers shared by the serving tests (fixtures live in conftest.py)."""

from __future__ import annotations

import json
import textwrap
from pathlib import Path

from taskmoe.data.tokenizer import Tokenizer
from taskmoe.models import LMConfig


def few_kb_of_text() -> list[str]:
    """Real text: two standard-library modules' sources (stable, offline), cut to paragraphs."""
    out: list[str] = []
    for mod in (json, textwrap):
        src = Path(mod.__file__).read_text(encoding="utf-8")
        out += [p for p in src.split("\n\n") if p.strip()]
    return out


def tiny_config(tokenizer: Tokenizer) -> LMConfig:
    return LMConfig(vocab_size=tokenizer.vocab_size, d_model=32, n_layers=2, n_heads=2)


def running(app):
    from taskmoe.serving.server import BackgroundServer

    return BackgroundServer(app)


def client(url: str, api_key: str = "unused"):
    import openai

    return openai.OpenAI(base_url=url + "/v1", api_key=api_key, max_retries=0, timeout=60)
