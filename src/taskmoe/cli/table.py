"""The command table. Add a command by importing its function and adding one line."""

from __future__ import annotations

from typing import Any, Callable

from taskmoe.data.commands import data_build, data_stats, tokenizer_train
from taskmoe.doctor import doctor
from taskmoe.doe.upcycle import doe_upcycle
from taskmoe.eval.legal import eval_legal
from taskmoe.eval.perplexity import eval_experts
from taskmoe.eval.routing import route_report
from taskmoe.inference.commands import chat, generate_text
from taskmoe.models.backbones.load import import_backbone
from taskmoe.router.commands import route_predict
from taskmoe.serving.serve import serve
from taskmoe.training.recipes.backbone_experts import experts_add
from taskmoe.training.recipes.cohesion import cohesion
from taskmoe.training.recipes.crosstalk import train_crosstalk
from taskmoe.training.recipes.dpo import train_dpo
from taskmoe.training.recipes.doe import add_expert as doe_add_expert, doe_report, train_doe
from taskmoe.training.recipes.experts import train_experts
from taskmoe.training.recipes.mixture import train_mixture
from taskmoe.training.recipes.modality import train_modality
from taskmoe.training.recipes.quickstart import quickstart
from taskmoe.training.recipes.router import route_fit
from taskmoe.training.recipes.sft import train_sft
from taskmoe.training.recipes.summarizer_run import train_summarizer

COMMANDS: dict[str, Callable[..., Any]] = {
    "quickstart": quickstart,
    "generate": generate_text,
    "chat": chat,
    "train summarizer": train_summarizer,
    "data stats": data_stats,
    "data build": data_build,
    "tokenizer train": tokenizer_train,
    "route fit": route_fit,
    "route predict": route_predict,
    "route report": route_report,
    "train experts": train_experts,
    "train mixture": train_mixture,
    "eval experts": eval_experts,
    "eval legal": eval_legal,
    "serve": serve,
    "train crosstalk": train_crosstalk,
    "train doe": train_doe,
    "doe report": doe_report,
    "doe add-expert": doe_add_expert,
    "doe upcycle": doe_upcycle,
    "cohesion": cohesion,
    "train sft": train_sft,
    "train dpo": train_dpo,
    "doctor": doctor,
    "backbone import": import_backbone,
    "experts add": experts_add,
    "train modality": train_modality,
}

GROUP_HELP: dict[str, str] = {
    "train": "Train one stage of a run: experts, summarizer, cross-talk, a DOE model, chat tuning (SFT, DPO), or a modality expert.",
    "data": "Inspect or export a corpus (the embedded default or --source).",
    "tokenizer": "Train the shared byte-level BPE tokenizer.",
    "route": "Fit the router, route a text, or report routing quality.",
    "eval": "Evaluate trained components (perplexity matrices and plots) or a model on legal tasks.",
    "experts": "Experts of a backbone system: register a PEFT LoRA adapter trained elsewhere.",
    "doe": "Fused experts: report a DOE model's routing, add an expert to it, or upcycle a backbone into one.",
    "backbone": "Pretrained backbones: import a GGUF file or a local Hugging Face folder as a backbone folder.",
}
