"""taskmoe.data: corpora, the embedded default corpus, the tokenizer, and torch datasets.

Never imports models (enforced by import-linter). Main entry points:

- :class:`Document`, :class:`Corpus`, :class:`CorpusConfig` (``corpus.py``)
- sources: :class:`TextFolder`, :class:`JsonlFile`, :class:`ParquetFile`, :class:`HFDataset`,
  :func:`open_source` (``sources.py``)
- :func:`load_default_corpus` (``default.py``)
- :class:`Tokenizer` (``tokenizer.py``)
- :class:`LegalFolder` (``legal.py``, parsers in ``legal_formats.py``): raw law as documents
- :class:`PackedLMDataset` (``datasets.py``); :class:`SFTDataset`, :class:`PreferenceDataset`,
  :class:`GroupedBatches` (``sft.py``)
- :func:`render_chat`, :func:`prompt_ids`, :class:`RenderedChat` (``chat.py``): chat template +
  assistant mask for any tokenizer
- :class:`SFTExample`, :class:`PreferenceExample`, :func:`read_alpaca`, :func:`read_hh_rlhf`,
  :func:`read_alpaca_eval` (``formats.py``)
"""

from taskmoe.data.corpus import SPLITS, Corpus, CorpusConfig, Document, chunk_text, content_id
from taskmoe.data.chat import RenderedChat, prompt_ids, render_chat
from taskmoe.data.datasets import IGNORE_INDEX, PackedLMDataset, truncate_pair
from taskmoe.data.default import DOMAINS, load_default_corpus
from taskmoe.data.formats import PreferenceExample, SFTExample, read_alpaca, read_alpaca_eval, read_hh_rlhf
from taskmoe.data.legal import LegalFolder
from taskmoe.data.sources import HFDataset, JsonlFile, ParquetFile, TextFolder, open_source
from taskmoe.data.sft import GroupedBatches, PreferenceDataset, SFTDataset
from taskmoe.data.tokenizer import SPECIAL_TOKENS, Tokenizer

__all__ = [
    "DOMAINS",
    "IGNORE_INDEX",
    "SPECIAL_TOKENS",
    "SPLITS",
    "Corpus",
    "CorpusConfig",
    "Document",
    "GroupedBatches",
    "HFDataset",
    "JsonlFile",
    "LegalFolder",
    "PackedLMDataset",
    "ParquetFile",
    "PreferenceDataset",
    "PreferenceExample",
    "RenderedChat",
    "SFTDataset",
    "SFTExample",
    "TextFolder",
    "Tokenizer",
    "chunk_text",
    "content_id",
    "load_default_corpus",
    "open_source",
    "prompt_ids",
    "read_alpaca",
    "read_alpaca_eval",
    "read_hh_rlhf",
    "render_chat",
    "truncate_pair",
]
