"""taskmoe.summarizer: the IMoE summarizer's parts above the SSM LM itself (``nn.summarizer_lm``).

- :mod:`.fuser`: the fusion prompt (question + expert drafts, most confident first, confidence
  as text) as token ids, the one truncation rule, and the answer-only loss mask;
- :mod:`.examples`: fusion training pairs cut from corpus documents;
- :mod:`.drafts`: route prompts, let the selected experts draft (grouped by expert), cache drafts;
- :mod:`.intent`: intent detection from pooled embeddings (code vs other) -> coding LoRA adapter;
- :mod:`.disagreement`: draft similarity + intent consistency -> disagreement score and the
  clarification question.
"""

from taskmoe.summarizer.disagreement import (
    DisagreementConfig,
    DisagreementReport,
    assess,
    calibrate_threshold,
    clarification,
)
from taskmoe.summarizer.drafts import DraftCache, Drafter, DraftSet
from taskmoe.summarizer.examples import FusionPair, fusion_pairs
from taskmoe.summarizer.fuser import Draft, FusedSequence, FusionFormat, collate, fusion_text
from taskmoe.summarizer.intent import IntentClassifier, IntentResult, domain_intents, pooled_hidden

__all__ = [
    "DisagreementConfig", "DisagreementReport", "assess", "calibrate_threshold", "clarification",
    "DraftCache", "Drafter", "DraftSet", "FusionPair", "fusion_pairs",
    "Draft", "FusedSequence", "FusionFormat", "collate", "fusion_text",
    "IntentClassifier", "IntentResult", "domain_intents", "pooled_hidden",
]
