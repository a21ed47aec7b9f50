"""CLI commands of the pipeline: ``taskmoe generate`` and ``taskmoe chat``.

Plain typed functions (also the Python API) over :func:`taskmoe.inference.loader.load_system`.

``chat`` renders the conversation in the default corpus's dialogue format (``A: ...`` lines for
the user, ``B:`` for the system), which is what the conversation expert and the summarizer's
reply pairs were trained on; the last ``history`` exchanges are kept in the prompt. It reads
lines from standard input until EOF or ``/exit``, and prints the routing decision of every turn
(``--trace`` prints the whole trace).

A **backbone folder** (``taskmoe backbone import``) works with both commands: ``generate`` wraps
the prompt as one user message in the backbone's own chat template (``--raw`` sends it as a plain
completion instead), and ``chat`` keeps the conversation as chat messages in that template (the
last ``history`` exchanges); decoding stops at the backbone's end-of-sequence tokens.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Iterator, Optional, TextIO

import torch

from taskmoe.data.tokenizer import Tokenizer
from taskmoe.errors import ConfigError
from taskmoe.doe.model import KIND as DOE_KIND
from taskmoe.doe.model import load_doe
from taskmoe.inference.generate import GenerationConfig, generate
from taskmoe.doe.modality.model import KIND as MM_KIND
from taskmoe.inference.loader import load_system
from taskmoe.inference.media import answer_with_media
from taskmoe.inference.trace import Answer
from taskmoe.io import CONFIG_FILE, load_component
from taskmoe.manifest import MANIFEST_FILE
from taskmoe.models import load_lm
from taskmoe.models.backbones import is_backbone_dir, load_backbone

__all__ = ["generate_text", "chat", "dialogue_prompt", "reply_of"]

USER, BOT = "A", "B"
EXIT = "/exit"


def _gen(max_new_tokens: Optional[int], temperature: Optional[float], seed: Optional[int]) -> dict[str, Any]:
    gen = {"max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed}
    return {k: v for k, v in gen.items() if v is not None}


def generate_text(
    path: Path,
    prompt: str,
    trace: bool = False,
    max_new_tokens: Optional[int] = None,
    temperature: Optional[float] = None,
    seed: Optional[int] = None,
    max_experts: Optional[int] = None,
    raw: bool = False,
    image: Optional[Path] = None,
    audio: Optional[Path] = None,
    mode: Optional[str] = None,
    weights: str = "fp32",
) -> Answer | dict[str, Any]:
    """Answer one prompt with a trained system: taskmoe generate RUN "prompt" [--trace].

    RUN is a run folder with taskmoe.json (e.g. runs/quickstart), or a single model folder: a DOE
    model written by `taskmoe train doe` (its trace names the experts its gates chose) or any LM
    component, with tokenizer.json inside or beside it. For a run, --trace shows every decision:
    routing (confidences, c_S, t_C, selected experts, fallback, cross-talk), experts loaded or
    cached, drafts, disagreement score, intent and adapter, and timings per stage. Decoding
    defaults come from the run's manifest; --max-new-tokens / --temperature / --seed override
    them. --max-experts bounds the experts kept in memory. RUN may also be a backbone folder
    (taskmoe backbone import): the prompt is one user message in its chat template, or a plain
    completion with --raw. --image FILE.png / --audio FILE.wav ask a multimodal model (taskmoe
    train modality) about a picture or a recording; its result names the modality expert that
    took the question. --mode summarizer|ensemble answers through the run's summarizer or with the
    confidence-weighted mixture of the selected experts (default: the run's own mode). --weights int4
    keeps a backbone's projections in 4 bits (a backbone folder or a backbone system; faster on CPU).
    """
    if image is None and audio is None and is_backbone_dir(path):
        return generate_with_backbone(path, prompt, raw=raw, weights=weights, **_gen(max_new_tokens, temperature, seed))
    if weights != "fp32" and not (Path(path) / MANIFEST_FILE).is_file():
        raise ConfigError(f"{path}: --weights {weights} applies to a backbone folder or a backbone system")
    if image is not None or audio is not None or _kind(path) == MM_KIND:
        return answer_with_media(path, prompt, image=image, audio=audio, **_gen(max_new_tokens, temperature, seed))
    if not (Path(path) / MANIFEST_FILE).is_file() and (Path(path) / CONFIG_FILE).is_file():
        return generate_with_model(path, prompt, **_gen(max_new_tokens, temperature, seed))
    system = load_system(path, max_experts=max_experts, mode=mode, weights=weights)
    return system.generate(prompt, trace=trace, **_gen(max_new_tokens, temperature, seed))


def _kind(path: Path) -> str | None:
    return load_component(path).kind if (Path(path) / CONFIG_FILE).is_file() else None


def generate_with_model(path: Path, prompt: str, **gen: Any) -> dict[str, Any]:
    """Generate from one model folder (DOE or a plain LM); the result names a DOE model's experts."""
    comp = load_component(path)
    model = load_doe(path) if comp.kind == DOE_KIND else load_lm(path)
    tok = Tokenizer.beside(path)
    ids = [tok.bos_id, *tok.encode(prompt, allow_special=False)]
    cfg = GenerationConfig(**{"max_new_tokens": 64, "temperature": 0.0, **gen}, stop_tokens=[tok.eos_id])
    out = generate(model, [ids], cfg)[0]
    result: dict[str, Any] = {"answer": tok.decode(out), "model": str(path), "kind": comp.kind}
    if comp.kind == DOE_KIND:
        with torch.inference_mode():
            routing = model.route(torch.tensor([ids]))
        result["experts"] = ", ".join(routing.expert_names()[0])
        result["fallback"] = bool(routing.fallback[0])
    return result


def _backbone_config(model: Any, tok: Tokenizer, gen: dict[str, Any]) -> GenerationConfig:
    stops = sorted({tok.eos_id, *model.config.eos_token_id})
    return GenerationConfig(**{"max_new_tokens": 64, "temperature": 0.0, **gen}, stop_tokens=stops)


def generate_with_backbone(path: Path, prompt: str, *, raw: bool = False, weights: str = "fp32",
                           **gen: Any) -> dict[str, Any]:
    """Answer one prompt with a backbone folder: its chat template (one user turn), or ``raw`` completion."""
    model, tok = load_backbone(path, weights=weights)
    use_chat = not raw and bool(getattr(tok, "chat_template", None))
    ids = tok.encode_chat([{"role": "user", "content": prompt}]) if use_chat else tok.encode_prompt(prompt)
    out = generate(model, [ids], _backbone_config(model, tok, gen))[0]
    return {"answer": tok.decode(out, skip_special=True), "model": str(path), "kind": "backbone",
            "prompt_format": "chat template" if use_chat else "completion"}


def dialogue_prompt(history: list[tuple[str, str]], message: str, keep: int = 2) -> str:
    """The last ``keep`` (user, reply) exchanges and the new message as ``A: ...`` / ``B: ...`` lines, ending ``B:``."""
    lines = []
    for user, reply in history[-keep:] if keep > 0 else []:
        lines += [f"{USER}: {user}", f"{BOT}: {reply}"]
    lines += [f"{USER}: {message}", f"{BOT}:"]
    return "\n".join(lines)


def reply_of(text: str) -> str:
    """The system's turn only: the answer up to where it starts a new ``A:`` line."""
    cut = text.find(f"\n{USER}:")
    return (text[:cut] if cut >= 0 else text).strip()


def chat(
    path: Path,
    trace: bool = False,
    history: int = 2,
    max_new_tokens: Optional[int] = None,
    temperature: Optional[float] = None,
    seed: Optional[int] = None,
    max_experts: Optional[int] = None,
    mode: Optional[str] = None,
    weights: str = "fp32",
) -> dict[str, Any]:
    """Chat with a trained system on stdin; prints the routing of every turn (/exit or EOF ends).

    Each line you type is one user turn; the prompt holds the last --history exchanges in the
    corpus's dialogue format (A: you / B: the system). --trace prints the whole trace per turn.
    PATH may be a backbone folder: turns are chat messages in its own chat template. --mode
    summarizer|ensemble and --weights fp32|int4 as for `generate`.
    """
    from rich.console import Console
    from rich.text import Text

    console = Console()
    gen = _gen(max_new_tokens, temperature, seed)
    if is_backbone_dir(path):
        return _chat_backbone(path, history, gen, console, weights)
    system = load_system(path, max_experts=max_experts, mode=mode, weights=weights)
    turns: list[tuple[str, str]] = []
    console.print(Text(f"taskmoe chat: {path} ({system.mode}; experts {', '.join(system.store.names)}). "
                       f"Type a message; {EXIT} or EOF ends."), style="dim")
    for message in _lines(sys.stdin):
        ans = system.generate(dialogue_prompt(turns, message, history), trace=True, **gen)
        assert ans.trace is not None
        reply = ans.text if ans.trace.clarify else reply_of(ans.text)
        console.print(Text(ans.trace.routing_line(), style="cyan"))
        if trace:
            console.print(ans.trace)
        console.print(Text(f"{BOT}: {reply}"))
        turns.append((message, reply))
    return {"turns": len(turns), "experts_loaded": system.store.stats().loads}


def _lines(inp: TextIO) -> Iterator[str]:
    """Non-empty stripped input lines until EOF or /exit."""
    for line in iter(inp.readline, ""):
        message = line.strip()
        if message == EXIT:
            return
        if message:
            yield message


def _chat_backbone(path: Path, history: int, gen: dict[str, Any], console: Any, weights: str = "fp32") -> dict[str, Any]:
    """``chat`` on a backbone folder: the last ``history`` exchanges as messages in its chat template."""
    from rich.text import Text

    model, tok = load_backbone(path, weights=weights)
    cfg = _backbone_config(model, tok, gen)
    turns: list[tuple[str, str]] = []
    console.print(Text(f"taskmoe chat: {path} (backbone). Type a message; {EXIT} or EOF ends."), style="dim")
    for message in _lines(sys.stdin):
        messages = [m for u, r in (turns[-history:] if history > 0 else [])
                    for m in ({"role": "user", "content": u}, {"role": "assistant", "content": r})]
        ids = tok.encode_chat([*messages, {"role": "user", "content": message}])
        reply = tok.decode(generate(model, [ids], cfg)[0], skip_special=True).strip()
        console.print(Text(f"{BOT}: {reply}"))
        turns.append((message, reply))
    return {"turns": len(turns)}
