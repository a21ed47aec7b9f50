"""Corpus sources: where raw documents come from.

Every source is an iterable of :class:`~taskmoe.data.corpus.Document` (one per file, line, row
or dataset record) with a ``name`` for messages. Sources read lazily, in a deterministic order,
and fail with :class:`~taskmoe.errors.DataError` naming the path and the problem when a source
is missing, empty, unreadable or lacks the configured field.

- :class:`TextFolder`: text files under a folder matching a glob (sorted paths; undecodable
  bytes are replaced, never fatal; empty files are skipped).
- :class:`JsonlFile`: JSON Lines (optionally ``.gz``), or a ``.json`` file holding a list of
  objects; ``text_field`` and an optional ``domain_field``.
- :class:`ParquetFile`: Parquet via ``pyarrow``, read in record batches of the needed columns.
- :class:`HFDataset`: Hugging Face ``datasets``: a folder written by ``save_to_disk``, local
  data files through a packaged builder (``load_dataset("json", data_files=...)``), or a hub
  name (needs network; the error says so when it is unreachable).

:func:`open_source` picks one from a path or name, which is what the CLI's ``--source`` uses;
legal folders (``legal:PATH``, or a folder of US Code / USLM / CAP files) go to
:class:`~taskmoe.data.legal.LegalFolder`.
"""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Protocol

from taskmoe.data.corpus import Document
from taskmoe.data.files import folder_files
from taskmoe.data.jsonl import json_lines
from taskmoe.data.legal import LEGAL_PREFIX, LegalFolder, looks_legal
from taskmoe.errors import DataError


class Source(Protocol):
    """Anything that yields Documents and has a name."""

    name: str

    def __iter__(self) -> Iterator[Document]: ...


def _label(rec: dict[str, Any], domain_field: str | None, domain: str | None, where: str) -> str | None:
    if domain_field is None:
        return domain
    if domain_field not in rec:
        raise DataError(f"{where}: missing domain field {domain_field!r} (fields: {sorted(rec)[:12]})")
    v = rec[domain_field]
    return None if v is None else str(v)


def _text(rec: Any, text_field: str, where: str) -> str:
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    if text_field not in rec:
        raise DataError(f"{where}: missing text field {text_field!r} (fields: {sorted(rec)[:12]})")
    v = rec[text_field]
    if not isinstance(v, str):
        raise DataError(f"{where}: field {text_field!r} must be a string, got {type(v).__name__}")
    return v


def _nonempty(docs: Iterable[Document], name: str) -> Iterator[Document]:
    """Pass documents through; raise DataError at the end if none had any text."""
    any_text = False
    for d in docs:
        if d.text.strip():
            any_text = True
            yield d
    if not any_text:
        raise DataError(f"{name}: source is empty (no document with any text)")


# ------------------------------------------------------------------------------ text files
@dataclass
class TextFolder:
    """Text files under ``root`` matching ``pattern`` (recursive ``**`` allowed), sorted by path."""

    root: str | Path
    pattern: str = "**/*.txt"
    domain: str | None = None
    encoding: str = "utf-8"
    errors: str = "replace"

    @property
    def name(self) -> str:
        return f"{self.root}/{self.pattern}"

    def files(self) -> list[Path]:
        return folder_files(self.root, self.pattern, "text", f"no files match {self.pattern!r}")

    def __iter__(self) -> Iterator[Document]:
        root = Path(self.root)

        def read() -> Iterator[Document]:
            for p in self.files():
                try:
                    text = p.read_text(encoding=self.encoding, errors=self.errors)
                except (OSError, UnicodeError, LookupError) as e:
                    raise DataError(f"{p}: cannot read text file ({e})") from e
                yield Document(text=text, domain=self.domain, source=str(p.relative_to(root)))

        return _nonempty(read(), self.name)


# ------------------------------------------------------------------------- record files
@dataclass
class _RecordFile:
    """A file of records: the text in ``text_field``, the domain in ``domain_field`` (else the
    fixed ``domain``). The shared fields of :class:`JsonlFile` and :class:`ParquetFile`."""

    path: str | Path
    text_field: str = "text"
    domain_field: str | None = None
    domain: str | None = None

    @property
    def name(self) -> str:
        return str(self.path)


@dataclass
class JsonlFile(_RecordFile):
    """JSON Lines (``.jsonl``/``.jsonl.gz``) or a ``.json`` list of objects."""

    def _records(self) -> Iterator[tuple[str, Any]]:
        path = Path(self.path)
        if not path.is_file():
            raise DataError(f"{path}: file not found")
        opener = gzip.open if path.suffix == ".gz" else open
        try:
            with opener(path, "rt", encoding="utf-8", errors="replace") as f:  # type: ignore[operator]
                if path.name.endswith((".json", ".json.gz")):
                    try:
                        data = json.load(f)
                    except json.JSONDecodeError as e:
                        raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from e
                    if not isinstance(data, list):
                        raise DataError(f"{path}: expected a JSON list of objects, got {type(data).__name__}")
                    for i, rec in enumerate(data):
                        yield f"{path}[{i}]", rec
                    return
                for n, rec in json_lines(f, str(path)):
                    yield f"{path}:{n}", rec
        except (OSError, EOFError) as e:
            raise DataError(f"{path}: cannot read ({e})") from e

    def __iter__(self) -> Iterator[Document]:
        def read() -> Iterator[Document]:
            for where, rec in self._records():
                text = _text(rec, self.text_field, where)
                yield Document(text=text, domain=_label(rec, self.domain_field, self.domain, where), source=where)

        return _nonempty(read(), self.name)


@dataclass
class ParquetFile(_RecordFile):
    """A Parquet file (or a folder of them) read column-wise in record batches."""

    batch_size: int = 1024

    def __iter__(self) -> Iterator[Document]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = Path(self.path)
        files = sorted(path.glob("**/*.parquet")) if path.is_dir() else [path]
        if not files or not files[0].is_file():
            raise DataError(f"{path}: no Parquet file found")

        def read() -> Iterator[Document]:
            for file in files:
                try:
                    pf = pq.ParquetFile(file)
                except (OSError, pa.ArrowException) as e:
                    raise DataError(f"{file}: cannot read Parquet ({e})") from e
                names = pf.schema_arrow.names
                cols = [self.text_field] + ([self.domain_field] if self.domain_field else [])
                missing = [c for c in cols if c not in names]
                if missing:
                    raise DataError(f"{file}: missing column(s) {missing} (columns: {names[:12]})")
                row = 0
                for batch in pf.iter_batches(batch_size=self.batch_size, columns=cols):
                    data = batch.to_pydict()
                    for j, text in enumerate(data[self.text_field]):
                        where = f"{file}[{row + j}]"
                        if text is None:
                            continue
                        if not isinstance(text, str):
                            kind = type(text).__name__
                            raise DataError(f"{where}: column {self.text_field!r} must hold strings, got {kind}")
                        dom = self.domain
                        if self.domain_field:
                            v = data[self.domain_field][j]
                            dom = None if v is None else str(v)
                        yield Document(text=text, domain=dom, source=where)
                    row += batch.num_rows

        return _nonempty(read(), self.name)


# ---------------------------------------------------------------------- Hugging Face datasets
def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())


@dataclass
class HFDataset:
    """A Hugging Face dataset: a ``save_to_disk`` folder, local files via a builder, or a hub name.

    ``path`` is what ``datasets.load_dataset`` takes (``"json"``, ``"parquet"``, ``"text"``, a
    hub name or a local folder); ``data_files`` goes with the packaged builders. A folder holding
    ``state.json`` or ``dataset_dict.json`` is read with ``datasets.load_from_disk`` instead.
    """

    path: str | Path
    split: str = "train"
    text_field: str = "text"
    domain_field: str | None = None
    domain: str | None = None
    name_config: str | None = None
    data_files: str | list[str] | dict[str, Any] | None = None
    cache_dir: str | Path | None = None

    @property
    def name(self) -> str:
        return f"hf:{self.path}" + (f" ({self.data_files})" if self.data_files else "")

    def load(self) -> Any:
        """The ``datasets.Dataset`` for ``split``; errors become DataError naming the dataset."""
        import datasets

        path = Path(str(self.path))
        try:
            if _is_saved_dataset(path):
                ds = datasets.load_from_disk(str(path))
            else:
                data_files = self.data_files
                if isinstance(data_files, (str, Path)):
                    data_files = str(data_files)
                ds = datasets.load_dataset(
                    str(self.path),
                    name=self.name_config,
                    data_files=data_files,
                    split=self.split,
                    cache_dir=None if self.cache_dir is None else str(self.cache_dir),
                )
        except (ConnectionError, TimeoutError) as e:
            raise DataError(f"{self.name}: not found locally and the Hugging Face hub is unreachable ({e})") from e
        except (FileNotFoundError, ValueError, OSError) as e:
            raise DataError(f"{self.name}: cannot load dataset ({type(e).__name__}: {e})") from e
        except Exception as e:  # datasets raises its own exception types (DatasetNotFoundError, ...)
            if type(e).__module__.startswith(("datasets", "huggingface_hub", "pyarrow")):
                raise DataError(f"{self.name}: cannot load dataset ({type(e).__name__}: {e})") from e
            raise
        if isinstance(ds, datasets.DatasetDict):
            if self.split not in ds:
                raise DataError(f"{self.name}: no split {self.split!r} (splits: {sorted(ds)})")
            ds = ds[self.split]
        cols = [self.text_field] + ([self.domain_field] if self.domain_field else [])
        missing = [c for c in cols if c not in ds.column_names]
        if missing:
            raise DataError(f"{self.name}: missing column(s) {missing} (columns: {ds.column_names[:12]})")
        return ds

    def __iter__(self) -> Iterator[Document]:
        def read() -> Iterator[Document]:
            ds = self.load()
            cols = [self.text_field] + ([self.domain_field] if self.domain_field else [])
            for i, rec in enumerate(ds.select_columns(cols)):
                text = rec[self.text_field]
                if text is None:
                    continue
                if not isinstance(text, str):
                    raise DataError(f"{self.name}[{i}]: column {self.text_field!r} must hold strings")
                dom = self.domain
                if self.domain_field:
                    v = rec[self.domain_field]
                    dom = None if v is None else str(v)
                yield Document(text=text, domain=dom, source=f"{self.name}[{i}]")

        return _nonempty(read(), self.name)


# ------------------------------------------------------------------------------ dispatch
def open_source(
    spec: str | Path,
    *,
    text_field: str = "text",
    domain_field: str | None = None,
    domain: str | None = None,
    pattern: str = "**/*.txt",
) -> TextFolder | JsonlFile | ParquetFile | HFDataset | LegalFolder:
    """Choose a source from a path or name.

    - ``hf:NAME`` -> :class:`HFDataset` (hub name or local dataset folder),
    - ``legal:PATH``, or a folder that :func:`~taskmoe.data.legal.looks_legal` (USLM XML, OLRC
      XHTML or CAP JSONL inside) -> :class:`~taskmoe.data.legal.LegalFolder` (``domain``
      defaults to ``"legal"``),
    - a ``save_to_disk`` folder -> :class:`HFDataset`,
    - ``*.parquet`` or a folder of them -> :class:`ParquetFile`,
    - ``*.jsonl``, ``*.jsonl.gz``, ``*.json`` -> :class:`JsonlFile`,
    - another folder -> :class:`TextFolder` with ``pattern``.
    """
    s = str(spec)
    kw: dict[str, Any] = {"text_field": text_field, "domain_field": domain_field, "domain": domain}
    if s.startswith("hf:"):
        return HFDataset(s[3:], **kw)
    if s.startswith(LEGAL_PREFIX):
        return LegalFolder(s[len(LEGAL_PREFIX) :], domain=domain or "legal")
    path = Path(s)
    if _is_saved_dataset(path):
        return HFDataset(path, **kw)
    if s.endswith(".parquet") or (path.is_dir() and any(path.glob("**/*.parquet"))):
        return ParquetFile(path, **kw)
    if s.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz")):
        return JsonlFile(path, **kw)
    if path.is_dir() and looks_legal(path):
        return LegalFolder(path, domain=domain or "legal")
    if path.is_dir():
        return TextFolder(path, pattern=pattern, domain=domain)
    if not path.exists():
        raise DataError(f"{path}: source not found (give a folder, .jsonl/.json/.parquet file, or hf:NAME)")
    raise DataError(f"{path}: unsupported source type (expected a folder, .jsonl/.json/.parquet, or hf:NAME)")
