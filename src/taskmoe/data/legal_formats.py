"""Parsers that turn one legal file into sections of clean text, one per rule / section / opinion.

Each parser takes the file's text and returns ``[(label, text), ...]``: ``label`` names the unit
("Rule 801", "§ 106", "amendment-XIV") for the document's ``source`` string, ``text`` is plain
text with paragraphs separated by blank lines and no markup left. Only the standard library is
used (``xml.etree``, ``html.parser``, ``re``).

Formats and where each one is cut into units:

- **Markdown** (:func:`parse_markdown`): at every heading that names a rule with its title
  (``### **Rule 801\\. Definitions ...**``, ``# Rule 4. Summons``). Heading lines that recur
  three or more times in a file are running heads of a PDF conversion (``# Rule 26``, ``# FEDERAL
  RULES OF CIVIL PROCEDURE``) and are dropped; other heading markers, emphasis and ``\\.``
  escapes are removed; words split by a line-end hyphen (``to- gether``) are joined.
- **US Code XHTML** (:func:`parse_uscode_xhtml`, OLRC releases): at every ``<!-- documentid:``
  comment (one per rule, section or heading item); table-of-contents (``analysis``) fields and
  images are skipped; block elements end a paragraph.
- **USLM XML** (:func:`parse_uslm`, US Code titles and the House Manual's Constitution): one unit
  per outermost ``<section>`` (a section quoted inside another stays inside it), per
  ``<level name="amendment">`` and per ``<preamble>``; ``<meta>``, ``<toc>`` and ``<layout>``
  are skipped; ``<num>``, ``<heading>`` and the ``<content>`` after them stay on one line.
- **CAP JSON Lines** (:func:`parse_cap_jsonl`, Caselaw Access Project API v1): one unit per case,
  the XML string in ``casebody.data`` with ``<page-number>`` marks dropped.
- **Plain text** (:func:`parse_text`): the whole file, form feeds removed.

Unit text shorter than :data:`MIN_UNIT_CHARS` (a bare article heading) is dropped.
"""

from __future__ import annotations

import html
import re
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from typing import Callable, Iterable

from taskmoe.data.jsonl import json_lines
from taskmoe.errors import DataError

MIN_UNIT_CHARS = 40
Unit = tuple[str, str]

_SPACES = re.compile(r"[ \t\u00a0\u2002\u2003\u2009\u202f]+")
_BLANKS = re.compile(r"\n\s*\n+")


def clean_paragraphs(text: str) -> str:
    """Collapse spaces inside lines, drop empty lines between paragraphs, strip each line."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\f", "\n")
    lines = [_SPACES.sub(" ", ln).strip() for ln in text.split("\n")]
    return _BLANKS.sub("\n\n", "\n".join(lines)).strip()


def _keep(units: Iterable[Unit]) -> list[Unit]:
    return [(label, t) for label, t in ((lb, clean_paragraphs(tx)) for lb, tx in units) if len(t) >= MIN_UNIT_CHARS]


# ------------------------------------------------------------------------------- Markdown
_MD_HEADING = re.compile(r"^\s{0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_MD_RULE = re.compile(r"^Rule\s+([0-9]+(?:\.[0-9]+)?|[A-Z](?:\([0-9]+\))?)\.\s+\S")
_MD_EMPH = re.compile(r"(\*{1,3}|_{2,3})(?=\S)(.+?)(?<=\S)\1")
_MD_ESCAPE = re.compile(r"\\([\\`*_{}\[\]()#+\-.!|])")
_SPLIT_WORD = re.compile(r"(?<=[a-z])- (?=[a-z])")


def _md_inline(line: str) -> str:
    line = _MD_ESCAPE.sub(r"\1", line)
    for _ in range(2):  # nested emphasis: ***x*** or **[*x*]**
        line = _MD_EMPH.sub(r"\2", line)
    return _SPLIT_WORD.sub("", line.replace("**", ""))


def parse_markdown(text: str) -> list[Unit]:
    """Markdown -> one unit per rule heading (see module docstring); text before the first rule is one unit."""
    lines = text.replace("\r\n", "\n").split("\n")
    heads = [m.group(2).lstrip("# ") for m in map(_MD_HEADING.match, lines) if m]
    counts: dict[str, int] = {}
    for h in heads:
        counts[h] = counts.get(h, 0) + 1
    units: list[Unit] = []
    label, buf = "front matter", []
    for ln in lines:
        m = _MD_HEADING.match(ln)
        if m:
            head = m.group(2).lstrip("# ")
            if counts[head] >= 3:
                continue  # running head
            plain = _md_inline(head).strip()
            r = _MD_RULE.match(plain)
            if r:
                units.append((label, "\n".join(buf)))
                label, buf = f"Rule {r.group(1)}", []
            buf.append(plain)
            buf.append("")
            continue
        buf.append(_md_inline(ln))
    units.append((label, "\n".join(buf)))
    return _keep(units)


# ---------------------------------------------------------------------------- XHTML (OLRC)
_BLOCK_TAGS = {"p", "div", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "li", "br", "table", "caption", "dt", "dd",
               "blockquote", "pre"}
_SKIP_TAGS = {"script", "style", "head", "title"}


class _TextHTML(HTMLParser):
    """Collects text; block tags end a paragraph; ``analysis`` fields and skipped tags are dropped."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip_depth = 0
        self.in_analysis = False

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _SKIP_TAGS:
            self.skip_depth += 1
        elif tag in _BLOCK_TAGS:
            self.parts.append("\n\n")
        elif tag in ("td", "th"):
            self.parts.append(" ")

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIP_TAGS:
            self.skip_depth = max(0, self.skip_depth - 1)
        elif tag in _BLOCK_TAGS:
            self.parts.append("\n\n")

    def handle_comment(self, data: str) -> None:
        d = data.strip()
        if d.startswith("field-start:analysis") or d.startswith("field-start:formimagecreditandhead"):
            self.in_analysis = True
        elif d.startswith("field-end:analysis") or d.startswith("field-end:formimagecreditandhead"):
            self.in_analysis = False

    def handle_data(self, data: str) -> None:
        if not self.skip_depth and not self.in_analysis:
            self.parts.append(data.replace("\n", " "))

    def text(self) -> str:
        return "".join(self.parts)


def html_text(markup: str) -> str:
    """Plain text of an HTML/XHTML fragment (stdlib parser; entities decoded)."""
    p = _TextHTML()
    p.feed(markup)
    p.close()
    return p.text()


_DOCID = re.compile(r"<!--\s*documentid:(\S+)[^>]*-->")


def parse_uscode_xhtml(text: str) -> list[Unit]:
    """OLRC XHTML -> one unit per ``documentid`` item; a page without those markers is one unit."""
    marks = list(_DOCID.finditer(text))
    if not marks:
        return _keep([("page", html_text(text))])
    units = []
    for m, nxt in zip(marks, marks[1:] + [None]):
        end = nxt.start() if nxt is not None else len(text)
        units.append((m.group(1), html_text(text[m.end() : end])))
    return _keep(units)


# -------------------------------------------------------------------------------- USLM XML
_USLM_SKIP = {"meta", "toc", "layout"}
_USLM_INLINE_BREAK = {"num", "heading"}  # followed by a space, not a paragraph break
_USLM_AFTER = {"content", "chapeau", "continuation", "text"}  # close a paragraph, continue the num's line
_USLM_BLOCK = {"p", "subsection", "paragraph", "subparagraph", "clause",
               "subclause", "item", "subitem", "note", "notes", "sourceCredit", "tr", "recital", "section",
               "level", "article", "preamble", "quotedContent", "signature", "row", "block", "proviso"}


def _local(tag: object) -> str:
    return tag.rsplit("}", 1)[-1] if isinstance(tag, str) else ""


def _uslm_text(e: ET.Element, out: list[str]) -> None:
    name = _local(e.tag)
    if name in _USLM_SKIP:
        if e.tail:
            out.append(e.tail)
        return
    block = name in _USLM_BLOCK
    if block:
        out.append("\n\n")
    if e.text:
        out.append(e.text)
    for c in e:
        _uslm_text(c, out)
    if name in _USLM_INLINE_BREAK:
        out.append(" ")
    if block or name in _USLM_AFTER:
        out.append("\n\n")
    if e.tail:
        out.append(e.tail)


def _uslm_label(e: ET.Element) -> str:
    ident = e.get("identifier") or e.get("id") or _local(e.tag)
    return ident.rsplit("/", 1)[-1]


def _is_unit(e: ET.Element) -> bool:
    name = _local(e.tag)
    return name in ("section", "preamble") or (name == "level" and e.get("name") == "amendment")


def _uslm_units(e: ET.Element, out: list[ET.Element]) -> None:
    for c in e:
        name = _local(c.tag)
        if name in _USLM_SKIP:
            continue
        if _is_unit(c):
            out.append(c)
        else:
            _uslm_units(c, out)


def parse_uslm(text: str, where: str = "USLM XML") -> list[Unit]:
    """USLM XML -> one unit per outermost section / amendment / preamble (module docstring)."""
    try:
        root = ET.fromstring(text.encode("utf-8"))
    except ET.ParseError as e:
        raise DataError(f"{where}: not well-formed XML ({e})") from e
    found: list[ET.Element] = []
    _uslm_units(root, found)
    units = []
    for e in found:
        parts: list[str] = []
        _uslm_text(e, parts)
        units.append((_uslm_label(e), "".join(parts).replace("\n\n", "\0").replace("\n", " ").replace("\0", "\n\n")))
    return _keep(units)


# ------------------------------------------------------------------------------ CAP JSONL
def parse_cap_jsonl(text: str, where: str = "CAP JSONL") -> list[Unit]:
    """Caselaw Access Project JSON Lines -> one unit per case (``name`` + casebody text)."""
    units = []
    for n, rec in json_lines(text.splitlines(), where):
        body = rec.get("casebody") if isinstance(rec, dict) else None
        if not isinstance(body, dict) or not isinstance(body.get("data"), str):
            raise DataError(f"{where}:{n}: a CAP record needs casebody.data (a string); got fields "
                            f"{sorted(rec)[:12] if isinstance(rec, dict) else type(rec).__name__}")
        data = re.sub(r"<page-number\b[^>]*>.*?</page-number>", "", body["data"], flags=re.S)
        name = str(rec.get("name_abbreviation") or rec.get("name") or rec.get("id") or n)
        units.append((name, f"{html.unescape(str(rec.get('name', '')))}\n\n{html_text(data)}"))
    return _keep(units)


def parse_text(text: str) -> list[Unit]:
    """A plain-text file is one unit."""
    return _keep([("text", text)])


PARSERS: dict[str, Callable[[str], list[Unit]]] = {
    "markdown": parse_markdown,
    "xhtml": parse_uscode_xhtml,
    "uslm": parse_uslm,
    "cap": parse_cap_jsonl,
    "text": parse_text,
}
