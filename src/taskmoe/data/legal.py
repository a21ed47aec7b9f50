"""The legal corpus source: a folder of raw law (Markdown, XHTML, USLM XML, CAP JSON, text) as clean documents.

:class:`LegalFolder` walks a folder like ``shared/data/legal_raw`` in sorted path order, parses each
file by its format (:mod:`taskmoe.data.legal_formats`) into one document per rule, section,
amendment or opinion, and de-duplicates them. It is a corpus source like the others in
:mod:`taskmoe.data.sources`, so it works everywhere ``--source`` does:

- ``--source legal:PATH`` always reads PATH as a legal folder;
- ``--source PATH`` does too when the folder *looks legal* (:func:`looks_legal`: some file in it
  is USLM XML, an OLRC US Code XHTML page or CAP JSON Lines).

Format of a file (:func:`file_format`): ``.md``/``.markdown`` Markdown; ``.htm``/``.html``/
``.xhtml`` XHTML; ``.xml`` USLM when it declares the USLM namespace (any other XML is read as
markup-stripped text, one document); ``.jsonl``/``.jsonl.gz`` CAP records (a record without
``casebody.data`` is an error naming the line); ``.txt`` plain text. Other files (README, CSS,
images) are skipped and counted.

De-duplication (the same rule appears in two prints of the rules, committee notes repeat):

1. **documents**: exact, by :func:`~taskmoe.data.corpus.content_id` (whitespace-normalised
   text); the first copy in path order wins;
2. **paragraphs**: a paragraph of at least ``min_dedup_chars`` characters (normalised) that an
   earlier document already holds is dropped from the later one; a document left shorter than
   ``MIN_UNIT_CHARS`` is dropped.

``stats`` (a :class:`LegalStats`) counts files, units and what each step removed, after a pass.
"""

from __future__ import annotations

import gzip
import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from taskmoe.data.corpus import Document, content_id, normalize
from taskmoe.data.files import folder_files
from taskmoe.data.legal_formats import MIN_UNIT_CHARS, PARSERS, html_text
from taskmoe.errors import DataError

LEGAL_PREFIX = "legal:"
USLM_NS = "xml.house.gov/schemas/uslm"
_SUFFIXES = {".md": "markdown", ".markdown": "markdown", ".htm": "xhtml", ".html": "xhtml", ".xhtml": "xhtml",
             ".txt": "text", ".xml": "xml", ".jsonl": "cap"}


def _head(path: Path, n: int = 4096) -> str:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:  # type: ignore[operator]
            return f.read(n).decode("utf-8", errors="replace")
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read ({e})") from e


def file_format(path: Path) -> str | None:
    """``markdown`` / ``xhtml`` / ``uslm`` / ``xml`` / ``cap`` / ``text``, or None for a file to skip."""
    name = path.name.lower()
    suffix = ".jsonl" if name.endswith(".jsonl.gz") else path.suffix.lower()
    kind = _SUFFIXES.get(suffix)
    if kind == "xml":
        return "uslm" if USLM_NS in _head(path) else "xml"
    return kind


def looks_legal(folder: Path, max_files: int = 200) -> bool:
    """True when some file under ``folder`` is USLM XML, OLRC XHTML (``documentid`` items) or CAP JSONL."""
    if not folder.is_dir():
        return False
    for i, p in enumerate(sorted(q for q in folder.rglob("*") if q.is_file())):
        if i >= max_files:
            break
        kind = file_format(p)
        head = _head(p) if kind in ("xhtml", "cap") else ""
        if kind == "uslm" or (kind == "xhtml" and "documentid:" in head) or (kind == "cap" and '"casebody"' in head):
            return True
    return False


def _read(path: Path) -> str:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt", encoding="utf-8", errors="replace") as f:  # type: ignore[operator]
            return f.read()
    except (OSError, EOFError) as e:
        raise DataError(f"{path}: cannot read ({e})") from e


def parse_file(path: Path) -> list[tuple[str, str]]:
    """The ``(label, text)`` units of one file (empty for a skipped file)."""
    kind = file_format(path)
    if kind is None:
        return []
    text = _read(path)
    if kind == "xml":
        return PARSERS["text"](html_text(text))
    if kind in ("uslm", "cap"):
        return PARSERS[kind](text, str(path))  # type: ignore[call-arg]
    return PARSERS[kind](text)


@dataclass
class LegalStats:
    """What one pass over a :class:`LegalFolder` read and removed."""

    files: int = 0
    skipped_files: int = 0
    units: int = 0
    duplicate_documents: int = 0
    duplicate_paragraphs: int = 0
    emptied_documents: int = 0
    documents: int = 0
    per_file: dict[str, int] = field(default_factory=dict)


@dataclass
class LegalFolder:
    """Raw legal files under ``root`` as de-duplicated documents (see module docstring)."""

    root: str | Path
    domain: str | None = "legal"
    min_dedup_chars: int = 200
    stats: LegalStats = field(default_factory=LegalStats, init=False, repr=False)

    @property
    def name(self) -> str:
        return f"{LEGAL_PREFIX}{self.root}"

    def files(self) -> list[Path]:
        return folder_files(self.root, "**/*", "legal", "legal folder holds no files")

    def __iter__(self) -> Iterator[Document]:
        root = Path(self.root)
        st = self.stats = LegalStats()
        seen_docs: set[str] = set()
        seen_paras: set[bytes] = set()
        for path in self.files():
            units = parse_file(path)
            if not units and file_format(path) is None:
                st.skipped_files += 1
                continue
            st.files += 1
            rel = str(path.relative_to(root))
            kept = 0
            for label, text in units:
                st.units += 1
                cid = content_id(text)
                if cid in seen_docs:
                    st.duplicate_documents += 1
                    continue
                seen_docs.add(cid)
                text = self._drop_seen_paragraphs(text, seen_paras)
                if len(text) < MIN_UNIT_CHARS:
                    st.emptied_documents += 1
                    continue
                kept += 1
                st.documents += 1
                yield Document(text=text, domain=self.domain, source=f"{rel}#{label}")
            st.per_file[rel] = kept
        if not st.documents:
            raise DataError(f"{root}: no legal text found in {st.files} file(s) ({st.skipped_files} skipped)")

    def _drop_seen_paragraphs(self, text: str, seen: set[bytes]) -> str:
        out = []
        for para in text.split("\n\n"):
            key = normalize(para)
            if len(key) >= self.min_dedup_chars:
                h = hashlib.blake2b(key.encode("utf-8"), digest_size=16).digest()
                if h in seen:
                    self.stats.duplicate_paragraphs += 1
                    continue
                seen.add(h)
            out.append(para)
        return "\n\n".join(out).strip()
