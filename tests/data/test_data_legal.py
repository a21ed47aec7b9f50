"""The legal corpus source: each format parsed to clean per-section documents, de-duplicated, and
reachable through ``open_source`` (``legal:`` prefix or content detection). Synthetic files are
written by the tests; the real folder is checked in the ``shared`` test."""

from __future__ import annotations

import gzip
import json
import re

import pytest

from taskmoe.data.legal import LegalFolder, file_format, looks_legal
from taskmoe.data.legal_formats import parse_cap_jsonl, parse_markdown, parse_uscode_xhtml, parse_uslm
from taskmoe.data.sources import TextFolder, open_source
from taskmoe.errors import DataError

MARKUP = re.compile(r"</?[A-Za-z][\w:-]*(\s[^<>]*)?/?>|&(#\d+|[a-z]+);|\*\*|\\[.\[\]*]|^#+ ", re.M)

MD = """# # MODEL RULES OF TESTING

## **ARTICLE I. GENERAL**

### **Rule 1\\. Scope of These Test Rules**

These rules govern every *synthetic* proceeding in a test court.

# Rule 2

# MODEL RULES OF TESTING

(As amended Jan. 1, 2001.)

### **Rule 2\\. Definitions of Test Words**

(a) A ‘‘widget’’ means any object to- gether with its parts and accessories.

# Rule 2

# MODEL RULES OF TESTING

# Rule 2

# MODEL RULES OF TESTING
"""

XHTML = """<html xmlns="http://www.w3.org/1999/xhtml"><head><title>United States Code Document</title></head><body>
<!-- documentid:99a_ currentthrough:x -->
<!-- field-start:analysis -->
<div class="analysis"><div>Rule 1. Table of contents entry that must vanish</div></div>
<!-- field-end:analysis -->
<!-- documentid:99a_Rule_1  usckey:1 -->
<h3 class="section-head">Rule 1. Filing of Test Papers</h3>
<p class="statutory-body">A party must file every test paper with the clerk &amp; serve it.</p>
<p class="note-body">Notes of Advisory Committee: the rule restates existing practice&#160;exactly.</p>
<!-- documentid:99a_Rule_2  usckey:2 -->
<h3 class="section-head">Rule 2. Time for Test Papers</h3>
<p class="statutory-body">Papers are due within <em>fourteen</em> days after service of the notice.</p>
<img src="x.gif" />
</body></html>"""

USLM = """<?xml version="1.0" encoding="UTF-8"?>
<uscDoc xmlns="http://xml.house.gov/schemas/uslm/1.0" identifier="/us/usc/t99">
<meta><title>Title 99 meta that must vanish</title></meta>
<main><title identifier="/us/usc/t99"><num value="99">Title 99—</num><heading>TESTING</heading>
<toc><tocItem>1. toc entry that must vanish</tocItem></toc>
<chapter><num>CHAPTER 1—</num><heading>GENERAL</heading>
<section identifier="/us/usc/t99/s1"><num value="1">§ 1.</num><heading>Definitions</heading>
<subsection><num>(a)</num><content>In this title the term “gadget” means a testing device.</content></subsection>
<subsection><num>(b)</num><chapeau>A gadget includes—</chapeau>
<paragraph><num>(1)</num><content>its case; and</content></paragraph></subsection>
<notes><note><heading>Amendments</heading><p>2001—Subsec. (b) added by a test law.</p></note></notes>
<quotedContent><section><num>§ 7.</num><content>A quoted section stays inside its host section.</content></section></quotedContent>
</section>
<section identifier="/us/usc/t99/s2"><num value="2">§ 2.</num><heading>Application</heading>
<content>This title applies to every gadget used in a test of software.</content></section>
</chapter></title></main></uscDoc>"""


def _cap(name: str, body: str) -> str:
    data = f'<casebody xmlns="urn:x"><parties>{name}</parties><opinion><page-number>*12</page-number><p>{body}</p></opinion></casebody>'
    return json.dumps({"id": 1, "name": name, "name_abbreviation": name, "casebody": {"status": "ok", "data": data}})


def test_markdown_one_document_per_rule_without_running_heads_or_markup():
    units = parse_markdown(MD)
    labels = [lb for lb, _ in units]
    assert labels == ["Rule 1", "Rule 2"]  # front matter is shorter than MIN_UNIT_CHARS
    r1, r2 = (t for _, t in units)
    assert r1.startswith("Rule 1. Scope of These Test Rules") and "synthetic proceeding" in r1
    assert "(As amended Jan. 1, 2001.)" in r1 and "MODEL RULES" not in r1 and "# Rule 2" not in r1
    assert "object together with" in r2
    assert not MARKUP.search(r1 + r2)


def test_xhtml_items_skip_the_table_of_contents_and_decode_entities():
    units = parse_uscode_xhtml(XHTML)
    assert [lb for lb, _ in units] == ["99a_Rule_1", "99a_Rule_2"]
    r1 = units[0][1]
    assert r1 == ("Rule 1. Filing of Test Papers\n\nA party must file every test paper with the clerk & serve it.\n\n"
                  "Notes of Advisory Committee: the rule restates existing practice exactly.")
    assert "must vanish" not in r1 + units[1][1]
    assert "within fourteen days" in units[1][1]


def test_uslm_outermost_sections_with_nums_and_headings_inline():
    units = parse_uslm(USLM)
    assert [lb for lb, _ in units] == ["s1", "s2"]
    s1 = units[0][1]
    assert s1.startswith("§ 1. Definitions\n\n(a) In this title the term “gadget” means a testing device.")
    assert "(1) its case; and" in s1 and "Amendments 2001—Subsec. (b) added" in s1.replace("\n\n", " ")
    assert "A quoted section stays inside its host section." in s1
    assert "must vanish" not in s1 + units[1][1] and not MARKUP.search(s1)
    with pytest.raises(DataError, match="bad.xml: not well-formed"):
        parse_uslm("<uscDoc><section>", "bad.xml")


def test_cap_jsonl_drops_page_numbers_and_names_a_bad_line():
    text = _cap("Alpha v. Beta", "The appellate court affirmed the judgment of the circuit court in full.")
    ((label, body),) = parse_cap_jsonl(text)
    assert label == "Alpha v. Beta" and "*12" not in body and "affirmed the judgment" in body
    with pytest.raises(DataError, match=r"cases.jsonl:2: a CAP record needs casebody.data"):
        parse_cap_jsonl(text + "\n" + json.dumps({"id": 2}), "cases.jsonl")


def _folder(tmp_path):
    root = tmp_path / "law"
    (root / "rules").mkdir(parents=True)
    (root / "code").mkdir()
    (root / "cases").mkdir()
    (root / "rules" / "a.md").write_text(MD, encoding="utf-8")
    (root / "rules" / "b.htm").write_text(XHTML, encoding="utf-8")
    (root / "rules" / "c_copy.md").write_text(MD, encoding="utf-8")  # an exact duplicate print
    (root / "code" / "t99.xml").write_text(USLM, encoding="utf-8")
    with gzip.open(root / "cases" / "cap.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(_cap("Alpha v. Beta", "The appellate court affirmed the judgment of the circuit court in full.") + "\n")
    (root / "cases" / "op.txt").write_text("SUPREME COURT OF TESTING\n\f\nThe opinion of the court is that tests pass.\n")
    (root / "usc.css").write_text("body { color: black }")
    return root


def test_folder_source_deduplicates_and_open_source_detects_it(tmp_path):
    root = _folder(tmp_path)
    assert file_format(root / "code" / "t99.xml") == "uslm" and file_format(root / "usc.css") is None
    assert looks_legal(root)
    src = open_source(root)
    assert isinstance(src, LegalFolder) and isinstance(open_source(f"legal:{root}"), LegalFolder)
    docs = list(src)
    assert [d.source for d in docs] == [
        "cases/cap.jsonl.gz#Alpha v. Beta", "cases/op.txt#text", "code/t99.xml#s1", "code/t99.xml#s2",
        "rules/a.md#Rule 1", "rules/a.md#Rule 2", "rules/b.htm#99a_Rule_1", "rules/b.htm#99a_Rule_2",
    ]
    assert src.stats.duplicate_documents == 2 and src.stats.skipped_files == 1 and src.stats.documents == 8
    assert all(d.domain == "legal" for d in docs) and "\f" not in docs[1].text
    # a long paragraph already seen in an earlier document is dropped from a later one
    para = "A repeated committee note paragraph that is long enough to count for de-duplication. " * 3
    (root / "rules" / "d.md").write_text(f"### **Rule 9\\. Extra**\n\nFresh text of rule nine here.\n\n{para}\n")
    (root / "rules" / "e.md").write_text(f"### **Rule 10\\. More**\n\nFresh text of rule ten here.\n\n{para}\n")
    docs = {d.source: d.text for d in LegalFolder(root, min_dedup_chars=100)}
    assert para.strip() in docs["rules/d.md#Rule 9"] and para.strip() not in docs["rules/e.md#Rule 10"]
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "x.txt").write_text("just text")
    assert not looks_legal(plain) and isinstance(open_source(plain), TextFolder)
    with pytest.raises(DataError, match="legal folder not found"):
        list(LegalFolder(tmp_path / "missing"))


@pytest.mark.shared
def test_real_legal_raw_folder(shared):
    root = shared / "data" / "legal_raw"
    if not root.is_dir():
        pytest.skip(f"{root} is absent")
    src = open_source(root)
    assert isinstance(src, LegalFolder)
    docs = list(src)
    assert 1300 <= len(docs) <= 1700, len(docs)  # 1,511 at the time of writing
    assert src.stats.files == 13 and src.stats.duplicate_paragraphs > 100
    sources = {d.source for d in docs}
    for rule in range(801, 808):
        assert f"federal_rules/federal-rules-of-evidence-dec-1-2024_0.md#Rule {rule}" in sources
        assert f"federal_rules/PRELIMusc28a.htm#28a_Rule_{rule}" in sources
    assert len({d.id for d in docs}) == len(docs)
    structural = re.compile(r"</?[A-Za-z][\w:-]*(\s[^<>]*)?/?>|&(#\d+|[a-z]+);|\\[.\[\]]|^#+ ", re.M)
    assert not [d.source for d in docs if structural.search(d.text)]
    hearsay = next(d.text for d in docs if d.source.endswith("2024_0.md#Rule 802"))
    assert "Hearsay is not admissible" in hearsay
