"""taskmoe.summarizer: the IMoE summarizer's parts above the SSM LM itself (``nn.summarizer_lm``).

- :mod:`.fuser`: the fusion prompt (question + expert drafts, most confident first, confidence
  as text) as token ids, the one truncation rule, and the answer-only loss mask;
- :mod:`.examples`: fusion training pairs cut from corpus documents;
- :mod:`.drafts`: route prompts, let the selected experts draft (grouped by expert), cache drafts;
- :mod:`.intent`: intent detection from pooled embeddings (code vs other) -> coding LoRA adapter;
- :mod:`.disagreement`: draft similarity + intent consistency -> disagreement score and the
  clarification question;
- :mod:`.backbone_format`, :mod:`.backbone_summarizer`: the summarizer of a backbone system (the
  fusion prompt in the backbone's chat template; the fusion LoRA adapter of the shared backbone with
  its coding adapter switched per row);
- :mod:`.switch`: switching either summarizer's adapters through one protocol.
"""

from taskmoe.summarizer.backbone_format import BackboneFusionFormat
from taskmoe.summarizer.backbone_summarizer import BackboneSummarizer
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
    "BackboneFusionFormat", "BackboneSummarizer",
]
