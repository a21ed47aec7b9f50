"""CLI commands of the data layer: ``data stats``, ``data build``, ``tokenizer train``.

Each is a plain typed function (also the Python API) that returns its result; the CLI table in
``taskmoe.cli.table`` maps a command name to it. A corpus comes either from the embedded default
(:func:`~taskmoe.data.default.load_default_corpus`) or from ``source`` (any path or name that
:func:`~taskmoe.data.sources.open_source` understands). Token counts need a tokenizer: a given
``tokenizer.json``, else a BPE trained on the corpus's train split and cached beside the corpus
(deterministic: same corpus and vocabulary size give the same tokenizer).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import logging
import time
from pathlib import Path
from typing import Any, Callable, Optional

from taskmoe.data.corpus import SPLITS, Corpus, CorpusConfig
from taskmoe.data.default import DEFAULT_CHARS_PER_DOMAIN, cache_root, load_default_corpus
from taskmoe.data.sources import open_source
from taskmoe.data.tokenizer import Tokenizer
from taskmoe.errors import DataError
from taskmoe.io import atomic_write_json

DEFAULT_VOCAB_SIZE = 8192


log = logging.getLogger(__name__)


def get_corpus(
    source: Optional[str] = None,
    *,
    text_field: str = "text",
    domain_field: Optional[str] = None,
    max_docs_per_domain: Optional[int] = None,
    max_chars_per_domain: Optional[int] = DEFAULT_CHARS_PER_DOMAIN,
    cache_dir: Optional[Path] = None,
    progress: bool = True,
) -> Corpus:
    """The default corpus, or a corpus built from ``source`` (chunked, de-duplicated, capped, split).

    A cap of 0 or None means no cap.
    """
    max_docs_per_domain = max_docs_per_domain or None
    max_chars_per_domain = max_chars_per_domain or None
    if source is None:
        return load_default_corpus(
            max_docs_per_domain, max_chars_per_domain=max_chars_per_domain, cache_dir=cache_dir, progress=progress
        )
    src = open_source(source, text_field=text_field, domain_field=domain_field)
    cfg = CorpusConfig(max_docs_per_domain=max_docs_per_domain, max_chars_per_domain=max_chars_per_domain)
    return Corpus.from_documents(src, cfg)


def corpus_command(body: Callable[..., Any]) -> Callable[..., Any]:
    """The command ``body(..., *, corpus)`` with the options of :func:`get_corpus` as its own flags.

    The corpus options are declared once, by :func:`get_corpus` (``--source``, ``--text-field``,
    ``--domain-field``, ``--max-docs-per-domain``, ``--max-chars-per-domain``, ``--cache-dir``,
    ``--progress``); the command gets them as keyword parameters after the body's own and passes
    the corpus they select as ``corpus``. An option the body takes too (``source``, ``progress``)
    goes to both.
    """
    own = {n: p for n, p in inspect.signature(body, eval_str=True).parameters.items() if n != "corpus"}
    options = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY)
               for n, p in inspect.signature(get_corpus, eval_str=True).parameters.items() if n not in own]
    sig = inspect.signature(body, eval_str=True)
    sig = sig.replace(parameters=[*own.values(), *options])

    @functools.wraps(body)
    def command(*args: Any, **kwargs: Any) -> Any:
        bound = sig.bind(*args, **kwargs)
        bound.apply_defaults()
        a = dict(bound.arguments)
        chosen = {p.name: a.pop(p.name) for p in options}
        chosen.update({n: a[n] for n in _CORPUS_OPTIONS if n in own})
        return body(**a, corpus=get_corpus(chosen.pop("source", None), **chosen))

    command.__signature__ = sig  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in sig.parameters.values()} | {"return": sig.return_annotation}
    return command


_CORPUS_OPTIONS = tuple(inspect.signature(get_corpus).parameters)


def corpus_fingerprint(corpus: Corpus) -> str:
    """Hash of the ordered (split, id) pairs: equal fingerprints mean the same corpus."""
    h = hashlib.sha256()
    for s in SPLITS:
        for d in corpus.splits[s]:
            h.update(f"{s}:{d.id}\n".encode())
    return h.hexdigest()[:16]


def train_tokenizer(corpus: Corpus, vocab_size: int = DEFAULT_VOCAB_SIZE, *, progress: bool = True) -> Tokenizer:
    """Byte-level BPE trained on the train split, in corpus order (deterministic)."""
    texts = [d.text for d in corpus.train]
    if not texts:
        raise DataError("cannot train a tokenizer: the corpus train split is empty")
    return Tokenizer.train(texts, vocab_size, show_progress=progress, length=len(texts))


def corpus_tokenizer(
    corpus: Corpus, vocab_size: int = DEFAULT_VOCAB_SIZE, *, cache_dir: Optional[Path] = None, progress: bool = True
) -> Tokenizer:
    """:func:`train_tokenizer`, cached under the cache root by corpus fingerprint and vocab size."""
    path = cache_root(cache_dir) / f"tokenizer-{corpus_fingerprint(corpus)}-{vocab_size}.json"
    if path.is_file():
        try:
            return Tokenizer.load(path)
        except DataError as e:
            log.warning("ignoring the unreadable cached tokenizer and training a new one: %s", e)
    tok = train_tokenizer(corpus, vocab_size, progress=progress)
    try:
        tok.save(path)
    except OSError as e:  # the cache is an optimisation: a read-only cache dir must not stop the command
        log.warning("could not cache the tokenizer at %s: %s", path, e)
    return tok


def corpus_stats(corpus: Corpus, tokenizer: Tokenizer) -> list[dict[str, object]]:
    """Rows of documents, tokens, bytes (UTF-8) and characters per domain and split, plus totals.

    Tokens count each document's text alone (no BOS/EOS).
    """
    rows: list[dict[str, object]] = []
    domains: list[str | None] = list(corpus.domains)
    if any(d.domain is None for d in corpus):
        domains.append(None)
    totals = {s: [0, 0, 0, 0] for s in SPLITS}
    for dom in domains:
        for s in SPLITS:
            docs = [d for d in corpus.splits[s] if d.domain == dom]
            ids = tokenizer.encode_batch([d.text for d in docs], allow_special=False) if docs else []
            vals = [
                len(docs),
                sum(map(len, ids)),
                sum(len(d.text.encode("utf-8")) for d in docs),
                sum(len(d.text) for d in docs),
            ]
            totals[s] = [a + b for a, b in zip(totals[s], vals)]
            rows.append(dict(zip(("domain", "split", "documents", "tokens", "bytes", "chars"), [dom or "-", s, *vals])))
    for s in SPLITS:
        rows.append(dict(zip(("domain", "split", "documents", "tokens", "bytes", "chars"), ["ALL", s, *totals[s]])))
    grand = [sum(totals[s][k] for s in SPLITS) for k in range(4)]
    rows.append(dict(zip(("domain", "split", "documents", "tokens", "bytes", "chars"), ["ALL", "all", *grand])))
    return rows


@corpus_command
def data_stats(tokenizer: Optional[Path] = None, vocab_size: int = DEFAULT_VOCAB_SIZE, cache_dir: Optional[Path] = None,
               progress: bool = True, *, corpus: Corpus) -> list[dict[str, object]]:
    """Documents, tokens and bytes per domain and split of the default corpus (or --source).

    --source: a folder of .txt files, a .jsonl/.json/.parquet file, a save_to_disk folder, or hf:NAME.

    Caps apply per domain (0 = no cap). Tokens are counted with --tokenizer if given, else with a
    BPE of --vocab-size trained on the train split (cached, deterministic).
    """
    tok = Tokenizer.load(tokenizer) if tokenizer is not None else corpus_tokenizer(
        corpus, vocab_size, cache_dir=cache_dir, progress=progress
    )
    return corpus_stats(corpus, tok)


@corpus_command
def data_build(out: Path = Path("data/corpus"), source: Optional[str] = None, *, corpus: Corpus) -> dict[str, object]:
    """Build the default corpus (or --source) and write OUT/corpus.jsonl and OUT/manifest.json."""
    t0 = time.perf_counter()
    out = Path(out)
    path = corpus.save(out / "corpus.jsonl")
    counts = {s: len(corpus.splits[s]) for s in SPLITS}
    atomic_write_json(
        out / "manifest.json",
        {
            "source": source or "default",
            "fingerprint": corpus_fingerprint(corpus),
            "domains": corpus.domains,
            "documents": counts,
            "chars": {s: sum(len(d.text) for d in corpus.splits[s]) for s in SPLITS},
        },
    )
    return {"path": str(path), **{f"{s} documents": n for s, n in counts.items()}, "domains": ", ".join(corpus.domains),
            "write seconds": round(time.perf_counter() - t0, 2)}


@corpus_command
def tokenizer_train(out: Path = Path("tokenizer.json"), vocab_size: int = DEFAULT_VOCAB_SIZE, progress: bool = True, *,
                    corpus: Corpus) -> dict[str, object]:
    """Train a byte-level BPE tokenizer on the train split of the default corpus (or --source)."""
    tok = train_tokenizer(corpus, vocab_size, progress=progress)
    path = tok.save(out)
    return {"path": str(path), "vocab_size": tok.vocab_size, "train documents": len(corpus.train)}
