"""Serve plain causal LMs (``taskmoe.models`` component folders) that share one tokenizer.

The simplest real backend: each served model is one ``CausalLM``; a request's route is the model
it names, so the routing key (the batching group) is the model id and a batch always runs through
one set of weights. Several LMs can be served side by side (one model id each); their requests
never share a batch.

On disk, either one LM folder (``config.json`` + ``model.safetensors`` from
:func:`taskmoe.models.save_lm`) with ``tokenizer.json`` inside it or beside it, a folder holding
several LM folders and one ``tokenizer.json``, or a backbone folder (a Hugging Face Llama-family
folder from ``taskmoe backbone import``: :meth:`LMBackend.from_backbone`), whose own tokenizer and
chat template then encode prompts and chats, and whose end-of-sequence ids stop rows.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

from taskmoe.data.tokenizer import TOKENIZER_FILE, Tokenizer
from taskmoe.errors import CheckpointError, DataError
from taskmoe.io import CONFIG_FILE
from taskmoe.models import CausalLM, load_lm
from taskmoe.models.backbones import is_backbone_dir, load_backbone
from taskmoe.serving.backend import Route, Row, RowResult
from taskmoe.serving.backends.decode import RowBatch, decode_rows


class LMBackend:
    """One or more ``CausalLM`` s behind one tokenizer; route key = model id.

    ``stop_ids`` end a row (default: the tokenizer's ``<|eos|>``); pass ``()`` to always generate
    ``max_tokens`` (benchmarks use this so every request does the same work).
    """

    def __init__(self, models: Mapping[str, CausalLM], tokenizer: Tokenizer, *, stop_ids: Sequence[int] | None = None,
                 source: str = "models") -> None:
        if not models:
            raise CheckpointError(f"{source}: no language model to serve")
        for name, m in models.items():
            if tokenizer.vocab_size > m.vocab_size:
                raise CheckpointError(
                    f"{source}: model {name!r} has vocab_size {m.vocab_size} but the tokenizer has "
                    f"{tokenizer.vocab_size} tokens (vocabulary size mismatch)")
            m.eval()
        self.models = dict(models)
        self.tokenizer = tokenizer
        self.stop_ids = [tokenizer.eos_id] if stop_ids is None else list(stop_ids)

    @classmethod
    def load(cls, path: str | Path, *, name: str | None = None, stop_ids: Sequence[int] | None = None,
             device: str | torch.device = "cpu") -> "LMBackend":
        """Load one LM folder, every LM folder inside ``path``, or a backbone folder (see the module docstring)."""
        path = Path(path)
        if is_backbone_dir(path):
            return cls.from_backbone(path, name=name, stop_ids=stop_ids, device=device)
        if not path.is_dir():
            raise CheckpointError(f"{path}: not a folder (expected an LM component folder or a folder of them)")
        if (path / CONFIG_FILE).is_file():
            folders = {name or path.name: path}
            tok_candidates = [path / TOKENIZER_FILE, path.parent / TOKENIZER_FILE]
        else:
            folders = {p.name: p for p in sorted(path.iterdir()) if (p / CONFIG_FILE).is_file()}
            if not folders:
                raise CheckpointError(f"{path}: holds no {CONFIG_FILE} and no model folders with one")
            if name is not None:
                raise CheckpointError(f"{path}: --name applies to a single model folder; this folder serves "
                                      f"{sorted(folders)} under their folder names")
            tok_candidates = [path / TOKENIZER_FILE]
        tok_path = next((p for p in tok_candidates if p.is_file()), None)
        if tok_path is None:
            raise CheckpointError(f"{path}: no {TOKENIZER_FILE} found (looked at {[str(p) for p in tok_candidates]})")
        tokenizer = Tokenizer.load(tok_path)
        models = {n: load_lm(f, device=device) for n, f in folders.items()}
        return cls(models, tokenizer, stop_ids=stop_ids, source=str(path))

    @classmethod
    def one_folder(cls, path: str | Path, load_model: Any, *, name: str | None = None,
                   stop_ids: Sequence[int] | None = None, device: str | torch.device = "cpu",
                   tokenizer_of: Any = None) -> Any:
        """One model folder read by ``load_model(path, device=...)``, with its tokenizer
        ``tokenizer_of(path, model)`` (default: the one beside it, :meth:`Tokenizer.beside`); a missing
        or unreadable tokenizer is a :class:`CheckpointError`."""
        path = Path(path)
        model = load_model(path, device=device)
        try:
            tok = tokenizer_of(path, model) if tokenizer_of is not None else Tokenizer.beside(path)
        except DataError as e:
            raise CheckpointError(str(e)) from e
        return cls({name or path.name: model}, tok, stop_ids=stop_ids, source=str(path))

    @classmethod
    def from_backbone(cls, path: str | Path, *, name: str | None = None, stop_ids: Sequence[int] | None = None,
                      device: str | torch.device = "cpu", weights: str = "fp32") -> "LMBackend":
        """Serve a backbone folder (``weights="int4"``: its projections in 4 bits); rows stop at the
        tokenizer's eos and the config's eos ids."""
        path = Path(path)
        model, tokenizer = load_backbone(path, device=device, weights=weights)
        if stop_ids is None:
            stop_ids = sorted({tokenizer.eos_id, *model.config.eos_token_id})
        return cls({name or path.name: model}, tokenizer, stop_ids=stop_ids, source=str(path))

    def model_ids(self) -> list[str]:
        return list(self.models)

    def encode_prompt(self, text: str) -> list[int]:
        """The text as plain bytes after the tokenizer's prompt prefix (our ``<|bos|>``; a backbone's own)."""
        return self.tokenizer.encode_prompt(text)

    def encode_chat(self, messages: Sequence[Mapping[str, str]]) -> list[int]:
        """The tokenizer's chat template (a backbone's own), ending with an open assistant turn."""
        return self.tokenizer.encode_chat(list(messages))

    def route(self, model_id: str, prompt_ids: Sequence[int]) -> Route:
        m = self.models[model_id]
        return Route(key=model_id, trace={"model": model_id, "builder": getattr(m, "builder", None)})

    def model_for(self, route: Route) -> CausalLM:
        """The weights a route's rows run through."""
        return self.models[route.key]

    def generate_batch(self, route: Route, rows: Sequence[Row]) -> list[RowResult]:
        return decode_rows(self.model_for(route), rows, self.stop_ids)

    def open_batch(self, route: Route) -> RowBatch:
        """A continuous batch for ``route``'s rows (rows join between steps)."""
        return RowBatch(self.model_for(route), self.stop_ids)
