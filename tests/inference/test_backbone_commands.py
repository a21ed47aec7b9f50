"""`taskmoe backbone import`, `generate` and `chat` on a backbone folder, through the CLI table."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

sys.path.insert(0, str(Path(__file__).parents[1] / "models" / "backbones"))
from backbone_helpers import write_hf_backbone  # noqa: E402

from taskmoe.cli import build_app  # noqa: E402
from taskmoe.inference.commands import chat, generate_text  # noqa: E402
from taskmoe.inference.generate import GenerationConfig, generate  # noqa: E402
from taskmoe.models.backbones import load_backbone  # noqa: E402

pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def backbone(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bb")
    write_hf_backbone(root / "hf")
    r = CliRunner().invoke(build_app(), ["backbone", "import", str(root / "hf"), "--out", str(root / "bb")])
    assert r.exit_code == 0, r.output
    assert "LlamaForCausalLM" in r.output
    return root / "bb"


def _greedy(folder: Path, ids: list[int], n: int = 64) -> str:
    model, tok = load_backbone(folder)
    cfg = GenerationConfig(max_new_tokens=n, temperature=0.0, stop_tokens=sorted({tok.eos_id, *model.config.eos_token_id}))
    return tok.decode(generate(model, [ids], cfg)[0], skip_special=True)


def test_generate_uses_the_chat_template_or_raw(backbone: Path) -> None:
    _, tok = load_backbone(backbone)
    out = generate_text(backbone, "hello world", max_new_tokens=9)
    assert out["prompt_format"] == "chat template" and out["kind"] == "backbone"
    assert out["answer"] == _greedy(backbone, tok.encode_chat([{"role": "user", "content": "hello world"}]), 9)
    raw = generate_text(backbone, "hello world", max_new_tokens=9, raw=True)
    assert raw["prompt_format"] == "completion"
    assert raw["answer"] == _greedy(backbone, tok.encode_prompt("hello world"), 9)


def test_chat_keeps_history_as_messages(backbone: Path, monkeypatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("hello world\n\nthe quick fox\n/exit\nnever read\n"))
    assert chat(backbone, history=1, max_new_tokens=5) == {"turns": 2}


def test_import_errors_are_one_clear_line(tmp_path: Path) -> None:
    r = CliRunner().invoke(build_app(), ["backbone", "import", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert r.exit_code == 2 and "nothing is downloaded" in " ".join(r.output.split())
