"""Loads are read-only (a half-renamed run still loads, from the aside copy), `taskmoe doctor` lists
and repairs what interrupted saves left, and a run with a pruned expert loads and routes around it."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

from pipeline_helpers import build_run, prompts
from taskmoe.doctor import doctor
from taskmoe.inference.loader import load_system
from taskmoe.io import SAVE_LOCK


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    return build_run(tmp_path_factory.mktemp("run"))


@pytest.fixture
def run(base_run, tmp_path):
    return Path(shutil.copytree(base_run, tmp_path / "run"))


def _tree(root: Path) -> list[tuple[str, int, int]]:
    """Every path under ``root`` with its inode and mtime: any rename, write or delete changes it."""
    return sorted((str(p.relative_to(root)), p.stat().st_ino, p.stat().st_mtime_ns) for p in root.rglob("*"))


def _half_rename(run: Path) -> None:
    """The state a kill between the two renames of a save leaves: NAME moved aside, the new copy a temp."""
    os.replace(run / "experts" / "c1", run / "experts" / "c1.aside-0123abcd")
    shutil.copytree(run / "summarizer", run / ".summarizer.tmp-89abcdef")  # the new copy, never renamed in
    os.replace(run / "summarizer", run / "summarizer.aside-76543210")
    (run / "experts" / ".c0.tmp-deadbeef").mkdir()  # a save of c0 killed earlier
    stale = run / ".taskmoe.json.0badf00d.tmp"  # an atomic file write killed mid-way
    stale.write_text("{")
    os.utime(stale, (1, 1))


def test_a_half_renamed_run_loads_read_only_and_doctor_repairs_it(run):
    _half_rename(run)
    before = _tree(run)
    system = load_system(run)
    text = prompts()
    out = system.generate_batch(list(text.values()), max_new_tokens=4)
    assert len(out) == 3 and set(system.expert_of.values()) == {"c0", "c1", "c2"}
    for name in ("c0", "c1", "c2"):
        system.store.get(name)  # c1 is read from experts/c1.aside-0123abcd
    assert _tree(run) == before  # the load renamed, wrote and deleted nothing

    found = {(Path(r["path"]).name, r["problem"]) for r in doctor(run)}  # dry run: lists, changes nothing
    assert found == {("c1.aside-0123abcd", "half-saved"), ("summarizer.aside-76543210", "half-saved"),
                     (".summarizer.tmp-89abcdef", "stale temp folder"), (".c0.tmp-deadbeef", "stale temp folder"),
                     (".taskmoe.json.0badf00d.tmp", "stale temp file")}
    assert _tree(run) == before

    rows = doctor(run, fix=True)
    assert all(r["fixed"] for r in rows)
    names = lambda d: sorted(p.name for p in d.iterdir() if p.name != SAVE_LOCK)  # noqa: E731
    assert names(run / "experts") == ["c0", "c1", "c2"]
    assert "summarizer" in names(run) and not [n for n in names(run) if "tmp" in n or "aside" in n]
    assert doctor(run) == [{"path": str(run), "problem": "none", "action": "nothing to do", "fixed": False}]
    assert load_system(run).generate(text["code"], max_new_tokens=4)


def test_doctor_reports_a_manifest_that_does_not_validate(run):
    shutil.rmtree(run / "experts" / "c2")
    rows = doctor(run, fix=True)
    assert [r["problem"] for r in rows] == ["manifest"] and "expert for category 2 'experts/c2' not found" in rows[0]["action"]


def test_a_run_with_a_pruned_expert_loads_and_routes_its_category_to_the_others(run):
    m = json.loads((run / "taskmoe.json").read_text())
    m["pruned"] = {"1": {"expert": "c1", "stage": "experts", "window": 0, "counts": {"c1": 2}}}
    del m["experts"]["1"]
    (run / "taskmoe.json").write_text(json.dumps(m))
    shutil.rmtree(run / "experts" / "c1")
    system = load_system(run)
    assert system.router.unavailable == {1} and "c1" not in system.store.names
    assert system.describe()["experts"][system.router.categories[1]] == "(pruned)"
    seqs = [system.encode(t) for t in prompts().values()] + [[]]  # [] takes the input fallback
    for d in system.router.route_batch(seqs):
        assert 1 not in d.selected and d.selected and abs(sum(d.weights) - 1) < 1e-6
        assert d.confidences[1] == 0.0 or d.reason  # its share went to the remaining experts
        assert d.crosstalk is None or 1 not in d.crosstalk
    out = system.generate_batch(list(prompts().values()), max_new_tokens=4, trace=True)
    used = {e.name for r in out for e in r.trace.experts}
    assert used and "c1" not in used


def test_a_from_scratch_run_refuses_4bit_weights(run) -> None:
    from taskmoe.errors import ConfigError

    with pytest.raises(ConfigError, match="applies to backbone systems"):
        load_system(run, weights="int4")
