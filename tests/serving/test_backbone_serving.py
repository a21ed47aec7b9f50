"""`taskmoe serve` on a backbone folder: the LM backend loads it, chat requests use its chat template,
completions its plain prompt, rows stop at its end-of-sequence ids, and answers equal `generate`."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "models" / "backbones"))
from backbone_helpers import write_hf_backbone  # noqa: E402

from serving_helpers import client, running  # noqa: E402
from taskmoe.inference.generate import GenerationConfig, generate  # noqa: E402
from taskmoe.serving.app import create_app  # noqa: E402
from taskmoe.serving.backends import load_backend  # noqa: E402
from taskmoe.serving.limits import Limits  # noqa: E402

pytest.importorskip("transformers")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello world"}]


@pytest.fixture(scope="module")
def backbone(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("bb") / "tiny-llama"
    write_hf_backbone(folder)
    return folder


def test_backbone_folder_serves_with_its_template_and_stops(backbone: Path) -> None:
    b = load_backend(backbone)
    assert type(b).__name__ == "LMBackend" and b.model_ids() == ["tiny-llama"]
    model, tok = b.models["tiny-llama"], b.tokenizer
    assert b.stop_ids == sorted({tok.eos_id, *model.config.eos_token_id})
    chat_ids = b.encode_chat(MESSAGES)
    assert chat_ids == tok.encode_chat(MESSAGES) and tok.decode(chat_ids).endswith("<|im_start|>assistant\n")
    cfg = GenerationConfig(max_new_tokens=10, temperature=0.0, stop_tokens=b.stop_ids)
    want_chat = tok.decode(generate(model, [chat_ids], cfg)[0])
    want_text = tok.decode(generate(model, [tok.encode_prompt("the quick")], cfg)[0])
    with running(create_app(b, Limits())) as srv:
        c = client(srv.url)
        r = c.chat.completions.create(model="tiny-llama", messages=MESSAGES, max_tokens=10, temperature=0)
        assert r.choices[0].message.content == want_chat
        assert r.usage.prompt_tokens == len(chat_ids)
        r = c.completions.create(model="tiny-llama", prompt="the quick", max_tokens=10, temperature=0)
        assert r.choices[0].text == want_text
