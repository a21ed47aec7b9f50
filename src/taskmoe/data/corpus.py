"""Documents and corpora: content ids, chunking, de-duplication, size caps, splits, JSONL I/O.

A :class:`Document` is one piece of text with a content-hash ``id``, a ``source`` string saying
where it came from, and an optional ``domain`` label. The domain label is for *evaluation only*
(routing purity, per-domain perplexity); nothing that routes or trains may read it.

A :class:`Corpus` holds three splits. :meth:`Corpus.from_documents` turns any stream of raw
documents into one, in this fixed order:

1. **chunk** each document into training-sized pieces (:func:`chunk_text`: greedy packing of
   paragraphs, falling back to lines, then words, then a hard cut, each chunk at most
   ``max_chunk_chars``; chunks shorter than ``min_chunk_chars`` are dropped),
2. **de-duplicate** exactly, by the hash of the whitespace-normalised text (the first copy wins),
3. **cap** each domain at ``max_docs_per_domain`` chunks and ``max_chars_per_domain``
   characters (in stream order, so the caller decides which documents come first),
4. **split** by content hash (:func:`split_of`): a document's split depends only on its id, so
   the split is deterministic, independent of input order, and stable when the corpus grows.

Design choices: ids are content hashes so that de-duplication and splitting need no state;
everything is a lazy iterator until the final split so that a capped build reads no more of a
source than it keeps; files are written atomically through :mod:`taskmoe.io`.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from taskmoe.config import Config, check, check_min, check_range, doc
from taskmoe.data.jsonl import json_lines
from taskmoe.errors import DataError
from taskmoe.io import atomic_write

SPLITS: tuple[str, str, str] = ("train", "validation", "test")

_WS = re.compile(r"\s+")


# ------------------------------------------------------------------------------- documents
def normalize(text: str) -> str:
    """Unicode NFC, every whitespace run collapsed to one space, stripped (the de-dup key)."""
    return _WS.sub(" ", unicodedata.normalize("NFC", text)).strip()


def content_id(text: str) -> str:
    """First 16 hex digits of sha256(normalize(text)): equal for texts differing only in spacing."""
    return hashlib.sha256(normalize(text).encode("utf-8")).hexdigest()[:16]


@dataclass(frozen=True)
class Document:
    """One text. ``domain`` is an evaluation-only label; ``id`` is the content hash of ``text``."""

    text: str
    domain: str | None = None
    source: str = ""
    id: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.text, str):
            raise DataError(f"Document from {self.source or '?'}: text must be str, got {type(self.text).__name__}")
        if not self.id:
            object.__setattr__(self, "id", content_id(self.text))

    def to_dict(self) -> dict[str, str | None]:
        return {"id": self.id, "domain": self.domain, "source": self.source, "text": self.text}


# -------------------------------------------------------------------------------- chunking
# Boundaries tried in order of preference: paragraph (blank line), line, word.
_BOUNDARIES = (
    re.compile(r".*?(?:\n[ \t]*\n(?:[ \t]*\n)*|\Z)", re.S),
    re.compile(r".*?(?:\n|\Z)", re.S),
    re.compile(r"\S*\s*"),
)


_LEADING_BLANK_LINES = re.compile(r"\A(?:[ \t]*\n)+")


def _pieces(text: str, max_chars: int, level: int = 0) -> list[str]:
    """Cut ``text`` into consecutive pieces of at most ``max_chars`` at the coarsest boundary.

    The pieces keep their trailing whitespace, so ``"".join(_pieces(t, n)) == t``.
    """
    if len(text) <= max_chars:
        return [text]
    if level == len(_BOUNDARIES):
        return [text[i : i + max_chars] for i in range(0, len(text), max_chars)]
    out: list[str] = []
    for m in _BOUNDARIES[level].finditer(text):
        part = m.group(0)
        if part:
            out.extend(_pieces(part, max_chars, level + 1) if len(part) > max_chars else [part])
    return out


def chunk_text(text: str, max_chars: int = 2000, min_chars: int = 64) -> list[str]:
    """Split ``text`` into chunks of at most ``max_chars`` characters on natural boundaries.

    Pieces (paragraphs; lines of a paragraph too long to fit; words of a line too long to fit;
    hard cuts of a word too long to fit) are packed greedily: a chunk is closed when the next
    piece would push it past ``max_chars``. Each chunk is trimmed; chunks shorter than
    ``min_chars`` are dropped. Up to whitespace, the chunks concatenated in order give ``text``
    back minus the dropped ones. Trimming removes trailing whitespace and leading blank lines
    but keeps the first line's indentation (code stays valid-looking).
    """
    if max_chars <= 0:
        raise DataError(f"chunk_text: max_chars must be positive, got {max_chars}")
    chunks: list[str] = []
    cur: list[str] = []
    size = 0
    for piece in _pieces(text, max_chars):
        if cur and size + len(piece) > max_chars:
            chunks.append("".join(cur))
            cur, size = [], 0
        cur.append(piece)
        size += len(piece)
    if cur:
        chunks.append("".join(cur))
    trimmed = (_LEADING_BLANK_LINES.sub("", c.rstrip()) for c in chunks)
    return [c for c in trimmed if c.strip() and len(c) >= min_chars]


def chunk_documents(docs: Iterable[Document], max_chars: int = 2000, min_chars: int = 64) -> Iterator[Document]:
    """Chunk each document; chunk ``i`` of a document from ``src`` has source ``src#i``."""
    for d in docs:
        for i, piece in enumerate(chunk_text(d.text, max_chars, min_chars)):
            yield Document(text=piece, domain=d.domain, source=f"{d.source}#{i}")


def deduplicate(docs: Iterable[Document]) -> Iterator[Document]:
    """Drop exact duplicates (same normalised text, i.e. same id); the first copy wins."""
    seen: set[str] = set()
    for d in docs:
        if d.id not in seen:
            seen.add(d.id)
            yield d


class DomainBudget:
    """Per-domain caps on a stream: at most ``max_docs`` documents and ``max_chars`` characters.

    :meth:`admit` records and accepts a document if its domain still has room; a document that
    would overflow ``max_chars`` is refused (later, shorter ones may still fit). A domain is
    :meth:`full` at ``max_docs`` documents or within ``slack`` characters of ``max_chars`` (a
    reader that knows no chunk is shorter than ``slack`` can then stop reading). ``None``
    means unlimited. Documents without a domain share the ``None`` budget.
    """

    def __init__(self, max_docs: int | None = None, max_chars: int | None = None, slack: int = 0) -> None:
        self.max_docs, self.max_chars, self.slack = max_docs, max_chars, slack
        self.docs: Counter[str | None] = Counter()
        self.chars: Counter[str | None] = Counter()

    def full(self, domain: str | None) -> bool:
        if self.max_docs is not None and self.docs[domain] >= self.max_docs:
            return True
        return self.max_chars is not None and self.chars[domain] > self.max_chars - self.slack

    def admit(self, d: Document) -> bool:
        if self.full(d.domain):
            return False
        if self.max_chars is not None and self.chars[d.domain] + len(d.text) > self.max_chars:
            return False
        self.docs[d.domain] += 1
        self.chars[d.domain] += len(d.text)
        return True


def cap(docs: Iterable[Document], max_docs: int | None = None, max_chars: int | None = None) -> Iterator[Document]:
    """Keep documents, in stream order, while their domain is within its caps (see DomainBudget)."""
    budget = DomainBudget(max_docs, max_chars)
    return (d for d in docs if budget.admit(d))


# --------------------------------------------------------------------------------- splits
def split_of(doc_id: str, fractions: tuple[float, float, float] = (0.9, 0.05, 0.05)) -> str:
    """The split of a document: u = int(sha256("split:" + id)[:15], 16) / 16**15 in [0, 1);
    train if u < f_train, validation if u < f_train + f_validation, else test."""
    u = int(hashlib.sha256(f"split:{doc_id}".encode()).hexdigest()[:15], 16) / 16**15
    if u < fractions[0]:
        return "train"
    return "validation" if u < fractions[0] + fractions[1] else "test"


@dataclass
class CorpusConfig(Config):
    """How raw documents become a corpus (chunk sizes, per-domain caps, split fractions)."""

    max_chunk_chars: int = doc(2000, "largest chunk, in characters")
    min_chunk_chars: int = doc(64, "chunks shorter than this are dropped")
    max_docs_per_domain: int | None = doc(None, "keep at most this many chunks per domain (None: all)")
    max_chars_per_domain: int | None = doc(None, "keep at most this many characters per domain (None: all)")
    split_fractions: tuple[float, float, float] = doc((0.9, 0.05, 0.05), "train/validation/test fractions")

    def validate(self) -> None:
        check_min(self, ("max_chunk_chars",), strict=True)
        check_range(self, ("min_chunk_chars",), 0, self.max_chunk_chars)
        for name in ("max_docs_per_domain", "max_chars_per_domain"):
            v = getattr(self, name)
            check(v is None or v > 0, f"{name} must be None or > 0, got {v}")
        f = tuple(self.split_fractions)
        check(len(f) == 3 and all(x >= 0 for x in f), f"split_fractions must be 3 non-negative numbers, got {f}")
        check(abs(sum(f) - 1.0) < 1e-6 and f[0] > 0, f"split_fractions must sum to 1 with train > 0, got {f}")
        self.split_fractions = (float(f[0]), float(f[1]), float(f[2]))


# --------------------------------------------------------------------------------- corpus
@dataclass
class Corpus:
    """Three splits of documents ("train", "validation", "test")."""

    splits: dict[str, list[Document]]

    def __post_init__(self) -> None:
        unknown = sorted(set(self.splits) - set(SPLITS))
        if unknown:
            raise DataError(f"Corpus: unknown split(s) {unknown}; expected {list(SPLITS)}")
        for s in SPLITS:
            self.splits.setdefault(s, [])

    @property
    def train(self) -> list[Document]:
        return self.splits["train"]

    @property
    def validation(self) -> list[Document]:
        return self.splits["validation"]

    @property
    def test(self) -> list[Document]:
        return self.splits["test"]

    @property
    def domains(self) -> list[str]:
        """Sorted domain labels present in any split (evaluation only)."""
        return sorted({d.domain for docs in self.splits.values() for d in docs if d.domain is not None})

    def __len__(self) -> int:
        return sum(len(v) for v in self.splits.values())

    def __iter__(self) -> Iterator[Document]:
        for s in SPLITS:
            yield from self.splits[s]

    @classmethod
    def from_documents(cls, docs: Iterable[Document], config: CorpusConfig | None = None) -> "Corpus":
        """Chunk -> de-duplicate -> cap per domain -> split by content hash (see module docstring)."""
        cfg = config or CorpusConfig()
        stream = chunk_documents(docs, cfg.max_chunk_chars, cfg.min_chunk_chars)
        stream = cap(deduplicate(stream), cfg.max_docs_per_domain, cfg.max_chars_per_domain)
        return cls.from_chunks(stream, cfg.split_fractions)

    @classmethod
    def from_chunks(cls, docs: Iterable[Document], fractions: tuple[float, float, float] = (0.9, 0.05, 0.05)) -> "Corpus":
        """Split already-prepared documents by content hash, keeping stream order within a split."""
        splits: dict[str, list[Document]] = {s: [] for s in SPLITS}
        for d in docs:
            splits[split_of(d.id, fractions)].append(d)
        if not any(splits.values()):
            raise DataError("corpus is empty: no document survived chunking (texts shorter than min_chunk_chars?)")
        return cls(splits)

    # -- JSONL ---------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        """Write one JSON object per line: {"split", "id", "domain", "source", "text"} (atomic)."""

        def write(tmp: Path) -> None:
            with open(tmp, "w", encoding="utf-8") as f:
                for s in SPLITS:
                    for d in self.splits[s]:
                        f.write(json.dumps({"split": s, **d.to_dict()}, ensure_ascii=False) + "\n")

        return atomic_write(path, write)

    @classmethod
    def load(cls, path: str | Path) -> "Corpus":
        """Read a file written by :meth:`save`; errors name the file, line and field."""
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path}: corpus file not found")
        splits: dict[str, list[Document]] = {s: [] for s in SPLITS}
        try:
            with open(path, encoding="utf-8") as f:
                for n, rec in json_lines(f, str(path)):
                    if not isinstance(rec, dict) or not isinstance(rec.get("text"), str):
                        raise DataError(f"{path}:{n}: expected an object with a string 'text' field")
                    split = rec.get("split")
                    if split not in splits:
                        raise DataError(f"{path}:{n}: split {split!r} is not one of {list(SPLITS)}")
                    doc = Document(rec["text"], rec.get("domain"), rec.get("source", ""), rec.get("id", ""))
                    splits[split].append(doc)
        except (OSError, UnicodeDecodeError) as e:
            raise DataError(f"{path}: cannot read corpus file ({e})") from e
        if not any(splits.values()):
            raise DataError(f"{path}: corpus file holds no documents")
        return cls(splits)
