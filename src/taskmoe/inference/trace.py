"""What the pipeline returns: :class:`Answer` (the text) and its :class:`Trace` (every decision).

A trace is plain data (JSON-safe through :meth:`Trace.to_dict`, used by the HTTP server and the
report) and renders itself for the terminal (``__rich__``: the answer, a routing table with
c_S / t_C / the selected experts, the drafts, and one line per remaining decision).

Fields, in pipeline order:

- ``routing``: the router's decision (:meth:`RoutingDecision.to_dict`: confidences, c_S, t_C,
  selected, weights, fallback, cross-talk pair, reason);
- ``experts``: each expert the prompt used, its category and confidence, and whether this call
  ``loaded`` it from disk or found it ``cached`` in the expert store (with the load seconds);
- ``drafts``: each expert's draft (text, tokens, confidence), most confident first;
- ``crosstalk``: None when the router did not flag a pair; else the pair, its categories, those
  that joined the selection for it, whether the dialogue ran (else ``reason``), whether the
  speakers had trained adapters, and its turns;
- ``disagreement``: the :class:`~taskmoe.summarizer.disagreement.DisagreementReport` as a dict
  and ``clarify`` (True: the answer is ``clarification``, a question naming the conflicting
  experts; the drafts were ignored and the summarizer did not run);
- ``intent`` (label and probabilities) and ``adapter`` (the LoRA adapter the summarizer ran
  with, or None);
- ``stopped``: None, or ``{"reason": "cancelled" | "deadline", "stage": ...}`` when the row's
  :class:`~taskmoe.inference.stages.Control` stopped its work (the answer holds what was produced);
- ``timings``: seconds per stage. In a batch the stages run once for all prompts, so a row's
  timings are the batch's (``batch_size`` says how many prompts shared them).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["Answer", "Trace", "ExpertUse", "DraftRecord"]


@dataclass
class ExpertUse:
    name: str
    category: str
    confidence: float
    status: str  # "loaded" (read from disk by this call) or "cached" (already resident)
    load_s: float = 0.0


@dataclass
class DraftRecord:
    expert: str
    confidence: float
    text: str
    tokens: int


@dataclass
class Trace:
    prompt: str
    prompt_tokens: int
    mode: str  # "summarizer" or "ensemble"
    routing: dict[str, Any]
    experts: list[ExpertUse] = field(default_factory=list)
    drafts: list[DraftRecord] = field(default_factory=list)
    fusion: dict[str, Any] = field(default_factory=dict)
    crosstalk: dict[str, Any] | None = None
    disagreement: dict[str, Any] | None = None
    clarify: bool = False
    clarification: str | None = None
    intent: dict[str, Any] | None = None
    adapter: str | None = None
    answer_tokens: int = 0
    stopped: dict[str, str] | None = None
    timings: dict[str, float] = field(default_factory=dict)
    batch_size: int = 1

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["timings"] = {k: round(v, 6) for k, v in self.timings.items()}
        return d

    # ------------------------------------------------------------------------- terminal
    def routing_line(self) -> str:
        """One line: selected experts with confidences, c_S, t_C, fallback/cross-talk flags."""
        r = self.routing
        cats, conf = r.get("categories", []), r.get("confidences", [])
        sel = ", ".join(f"{cats[i] if i < len(cats) else i} {conf[i]:.2f}" for i in r.get("selected", []))
        flags = []
        if r.get("fallback"):
            flags.append("fallback: all experts" + (f" ({r['reason']})" if r.get("reason") else ""))
        if r.get("crosstalk"):
            a, b = r["crosstalk"]
            flags.append(f"cross-talk {cats[a] if a < len(cats) else a}<->{cats[b] if b < len(cats) else b}")
        extra = f" [{'; '.join(flags)}]" if flags else ""
        return f"route -> {sel}  (c_S={r.get('c_S', 0):.2f}, t_C={r.get('t_C', 0):.3f}){extra}"

    def __rich__(self) -> Any:
        from rich.console import Group
        from rich.table import Table
        from rich.text import Text

        parts: list[Any] = [Text(self.routing_line())]
        r = self.routing
        t = Table(title="routing", show_lines=False)
        for c in ("category", "confidence", "selected", "expert", "status"):
            t.add_column(c)
        use = {e.category: e for e in self.experts}
        for i, (cat, conf) in enumerate(zip(r.get("categories", []), r.get("confidences", []))):
            e = use.get(cat)
            t.add_row(cat, f"{conf:.3f}", "yes" if i in r.get("selected", []) else "",
                      e.name if e else "", (f"{e.status}" + (f" {e.load_s:.2f}s" if e.status == "loaded" else "")) if e else "")
        parts.append(t)
        if self.drafts:
            d = Table(title="drafts (most confident first)")
            d.add_column("expert")
            d.add_column("conf")
            d.add_column("draft")
            for x in self.drafts:
                d.add_row(x.expert, f"{x.confidence:.2f}", Text(x.text.replace("\n", "\\n")[:160]))
            parts.append(d)
        if self.crosstalk is not None:
            ct = self.crosstalk
            parts.append(Text(f"cross-talk {ct.get('pair')}: " + (f"{len(ct.get('turns', []))} turns" if ct.get("ran")
                                                           else f"not run ({ct.get('reason', '')})")))
        if self.disagreement is not None:
            dg = self.disagreement
            parts.append(f"disagreement {dg['score']:.3f} (threshold {dg['threshold']:.3f}) -> "
                         + ("ask for clarification" if self.clarify else "answer"))
        if self.intent is not None:
            probs = ", ".join(f"{k} {v:.2f}" for k, v in self.intent["probs"].items())
            parts.append(f"intent {self.intent['label']} ({probs})"
                         + ("" if self.clarify else f" -> adapter {self.adapter or 'none'}"))
        if self.stopped is not None:
            parts.append(f"stopped: {self.stopped['reason']} during {self.stopped['stage']}")
        parts.append("timings: " + ", ".join(f"{k} {v * 1000:.0f} ms" for k, v in self.timings.items())
                     + (f" (batch of {self.batch_size})" if self.batch_size > 1 else ""))
        return Group(*parts)


@dataclass
class Answer:
    """The final text (an answer, or a clarification question when ``trace.clarify``) and its trace."""

    text: str
    trace: Trace | None = None
    ids: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "trace": self.trace.to_dict() if self.trace is not None else None}

    def __str__(self) -> str:
        return self.text

    def __rich__(self) -> Any:
        from rich.console import Group
        from rich.panel import Panel
        from rich.text import Text

        title = "clarification" if self.trace is not None and self.trace.clarify else "answer"
        panel = Panel(Text(self.text or "(empty)"), title=title)
        return Group(panel, self.trace) if self.trace is not None else panel
