"""taskmoe.io: atomic files and folders, safetensors round trips, and errors that name the problem."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from taskmoe.errors import CheckpointError
from taskmoe.io import (
    FORMAT_VERSION,
    SAVE_LOCK,
    atomic_dir,
    atomic_write,
    atomic_write_json,
    check_state,
    load_component,
    load_state_into,
    load_tensors,
    read_json,
    resolve_saved,
    save_component,
    save_tensors,
)


def _names(folder: Path) -> list[str]:
    """The entries of ``folder`` other than the directory's save lock."""
    return sorted(p.name for p in folder.iterdir() if p.name != SAVE_LOCK)


class LM(nn.Module):
    def __init__(self, vocab: int = 11, d: int = 4) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.proj = nn.Linear(d, d)
        self.lm_head = nn.Linear(d, vocab, bias=False)


def test_atomic_write_failure_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "a.json"
    atomic_write_json(target, {"v": 1})

    def broken(p: Path) -> None:
        p.write_text('{"v": 2, "trunc')
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, broken)
    assert read_json(target) == {"v": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_read_json_errors_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope\.json: file not found"):
        read_json(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"bad\.json: not valid JSON"):
        read_json(tmp_path / "bad.json")
    atomic_write_json(tmp_path / "p.json", {"path": tmp_path, "t": torch.tensor([1, 2])})
    assert read_json(tmp_path / "p.json") == {"path": str(tmp_path), "t": [1, 2]}


def test_tensors_round_trip_and_shared_storage_is_split(tmp_path):
    w = torch.randn(3, 4)
    save_tensors(tmp_path / "t.safetensors", {"a": w, "b": w, "c": torch.arange(5)[1:3]})
    out = load_tensors(tmp_path / "t.safetensors")
    assert torch.equal(out["a"], w) and torch.equal(out["b"], w) and out["c"].tolist() == [1, 2]


def test_truncated_and_missing_safetensors_name_the_file(tmp_path):
    f = tmp_path / "model.safetensors"
    save_tensors(f, {"w": torch.randn(16, 16)})
    f.write_bytes(f.read_bytes()[:-64])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt or truncated safetensors file"):
        load_tensors(f)
    f.write_bytes(b"\x00\x01garbage")
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_tensors(f)
    with pytest.raises(CheckpointError, match=r"other\.safetensors: weights file not found"):
        load_tensors(tmp_path / "other.safetensors")


def test_check_state_reports_vocab_mismatch_and_missing_names():
    want = LM(vocab=11).state_dict()
    got = LM(vocab=13).state_dict()
    with pytest.raises(CheckpointError) as ei:
        check_state(want, got, "ckpt.safetensors")
    msg = str(ei.value)
    assert msg.startswith("ckpt.safetensors: ")
    assert "embed.weight: shape (13, 4) in checkpoint vs (11, 4) expected (vocabulary size mismatch: checkpoint has 13, model expects 11)" in msg
    assert "lm_head.weight" in msg and "vocabulary size mismatch" in msg
    partial = {k: v for k, v in want.items() if k != "proj.bias"} | {"extra": torch.zeros(1)}
    with pytest.raises(CheckpointError, match=r"missing tensors \['proj.bias'\]; unexpected tensors \['extra'\]"):
        check_state(want, partial, "x")
    check_state(want, partial, "x", strict=False)  # names may differ when not strict; shapes still checked


def test_load_state_into_with_wrong_vocabulary_names_file_and_mismatch(tmp_path):
    f = tmp_path / "model.safetensors"
    save_tensors(f, LM(vocab=11).state_dict())
    with pytest.raises(CheckpointError, match=r"model\.safetensors: .*vocabulary size mismatch: checkpoint has 11, model expects 12"):
        load_state_into(LM(vocab=12), f)
    m = LM(vocab=11)
    load_state_into(m, f)
    assert torch.equal(m.embed.weight, load_tensors(f)["embed.weight"])


def test_component_round_trip_and_overwrite(tmp_path):
    folder = tmp_path / "expert"
    m = LM()
    save_component(folder, "expert", {"vocab": 11}, m.state_dict(), meta={"note": "x"},
                   extra_files={"sub/table.json": lambda p: p.write_text('{"k": 1}')})  # fmt: skip
    comp = load_component(folder, kind="expert")
    assert comp.config == {"vocab": 11} and comp.meta == {"note": "x"} and comp.kind == "expert"
    assert json.loads((folder / "sub" / "table.json").read_text()) == {"k": 1}
    assert torch.equal(comp.tensors()["proj.weight"], m.proj.weight)
    save_component(folder, "expert", {"vocab": 11, "v": 2}, m.state_dict())
    assert load_component(folder).config["v"] == 2
    assert _names(tmp_path) == ["expert"]  # no temp or aside folders left


def test_component_errors_name_the_problem(tmp_path):
    with pytest.raises(CheckpointError, match="component folder not found"):
        load_component(tmp_path / "none")
    folder = save_component(tmp_path / "r", "router", {}, {"w": torch.zeros(2)})
    with pytest.raises(CheckpointError, match=r"holds a 'router', expected 'expert' or 'summarizer'"):
        load_component(folder, kind=("expert", "summarizer"))
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(CheckpointError, match=f"format_version {FORMAT_VERSION + 1} is not supported"):
        load_component(folder)
    (folder / "config.json").write_text(json.dumps({"config": {}}))
    with pytest.raises(CheckpointError, match="missing 'format_version'/'kind'"):
        load_component(folder)
    (folder / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"r/config\.json: missing config\.json"):
        load_component(folder)


def _fail_on(n: int):
    """os.replace that fails on its n-th call whose source is a directory."""
    real, calls = os.replace, {"n": 0}

    def fake(src, dst, *a, **kw):
        if Path(src).is_dir():
            calls["n"] += 1
            if calls["n"] == n:
                raise OSError(f"simulated crash renaming {src}")
        return real(src, dst, *a, **kw)

    return fake


def test_crash_before_the_folder_rename_keeps_the_old_component(tmp_path, monkeypatch):
    folder = save_component(tmp_path / "e", "expert", {"v": 1}, {"w": torch.ones(2)})
    monkeypatch.setattr(os, "replace", _fail_on(1))  # the old folder is never moved aside
    with pytest.raises(OSError, match="simulated crash"):
        save_component(folder, "expert", {"v": 2}, {"w": torch.zeros(2)})
    monkeypatch.undo()
    assert load_component(folder).config == {"v": 1}
    assert _names(tmp_path) == ["e"]


def _tree(root: Path) -> list[tuple[str, int, int]]:
    """Every path under ``root`` with its inode and mtime: any rename, write or delete changes it."""
    return sorted((str(p.relative_to(root)), p.stat().st_ino, p.stat().st_mtime_ns) for p in root.rglob("*"))


def test_a_load_between_the_two_renames_is_read_only_and_names_doctor(tmp_path, monkeypatch):
    folder = save_component(tmp_path / "e", "expert", {"v": 1}, {"w": torch.ones(2)})
    monkeypatch.setattr(os, "replace", _fail_on(2))  # old folder moved aside, new one not yet in place
    with pytest.raises(OSError, match="simulated crash"):
        save_component(folder, "expert", {"v": 2}, {"w": torch.zeros(2)})
    monkeypatch.undo()
    assert not folder.exists()
    before = _tree(tmp_path)
    with pytest.raises(CheckpointError, match=r"e\.aside-\w+ \(run `taskmoe doctor .* --fix` to restore it\)"):
        load_component(folder)
    assert _tree(tmp_path) == before  # the load renamed nothing
    aside = resolve_saved(tmp_path, "e")  # what a manifest load reads instead: the last committed copy
    assert aside.name.startswith("e.aside-") and load_component(aside).config == {"v": 1}
    assert _tree(tmp_path) == before


def test_the_next_save_removes_stale_temp_folders_of_its_component(tmp_path):
    save_component(tmp_path / "c0", "expert", {"v": 1}, {"w": torch.ones(2)})
    stale = tmp_path / ".c0.tmp-deadbeef"  # left by a writer killed mid-save
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"partial")
    other = tmp_path / ".c1.tmp-cafef00d"  # another component's: not this writer's business
    other.mkdir()
    save_component(tmp_path / "c0", "expert", {"v": 2}, {"w": torch.ones(2)})
    assert _names(tmp_path) == [".c1.tmp-cafef00d", "c0"]
    assert load_component(tmp_path / "c0").config == {"v": 2}


def test_written_files_get_the_permissions_open_gives(tmp_path):
    old = os.umask(0o022)
    try:
        folder = save_component(tmp_path / "c", "expert", {}, {"w": torch.ones(2)},
                                extra_files={"t.json": lambda p: atomic_write_json(p, {})})
        single = save_tensors(tmp_path / "x.safetensors", {"w": torch.ones(2)})
        files = [folder / "model.safetensors", folder / "config.json", folder / "t.json", single]
        assert {f.name: oct(f.stat().st_mode & 0o777) for f in files} == {f.name: "0o644" for f in files}
        from safetensors.torch import save_file

        def foreign(tmp: Path) -> None:  # a writer we do not control (save_pretrained calls safetensors)
            save_file({"w": torch.ones(2)}, str(tmp / "model.safetensors"))
            (tmp / "sub").mkdir()
            fd = os.open(tmp / "sub" / "private.json", os.O_WRONLY | os.O_CREAT, 0o600)
            os.close(fd)

        out = atomic_dir(tmp_path / "hf", foreign)
        assert {oct(f.stat().st_mode & 0o777) for f in out.rglob("*") if f.is_file()} == {"0o644"}
        assert sorted(f.name for f in out.rglob("*")) == ["model.safetensors", "private.json", "sub"]
        os.umask(0o027)
        atomic_write_json(tmp_path / "y.json", {})
        assert oct((tmp_path / "y.json").stat().st_mode & 0o777) == "0o640"
        assert oct(save_tensors(tmp_path / "y.safetensors", {"w": torch.ones(1)}).stat().st_mode & 0o777) == "0o640"
    finally:
        os.umask(old)


def test_a_save_after_an_unrecovered_crash_removes_the_stale_aside(tmp_path, monkeypatch):
    folder = save_component(tmp_path / "e", "expert", {"v": 1}, {"w": torch.ones(2)})
    monkeypatch.setattr(os, "replace", _fail_on(2))
    with pytest.raises(OSError):
        save_component(folder, "expert", {"v": 2}, {"w": torch.zeros(2)})
    monkeypatch.undo()
    save_component(folder, "expert", {"v": 3}, {"w": torch.zeros(2)})  # no load in between
    assert load_component(folder).config == {"v": 3}
    assert _names(tmp_path) == ["e"]  # the old copy does not linger
