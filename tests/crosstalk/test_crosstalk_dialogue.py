"""Cross-talk dialogues: seeded determinism, batch == alone, decisions replayed from InterruptState,
the empirical interrupt rate, adapters on exactly during cross-talk, drafts/trace, clear errors."""

from __future__ import annotations

import copy
import dataclasses
import math

import pytest
import torch

from crosstalk_helpers import V, pair, tiny_expert
from taskmoe.crosstalk.dialogue import (
    DialogueConfig,
    DialogueTokens,
    Speaker,
    choose_tokens,
    run_crosstalk,
    run_dialogues,
    token_logprobs,
    token_scores,
)
from taskmoe.crosstalk.policy import InterruptConfig, InterruptState, interrupt_probability
from taskmoe.errors import ConfigError, RequestError
from taskmoe.layers.lora import lora_layers, remove_adapters, set_adapter
from taskmoe.summarizer.fuser import Draft

PROMPTS = [[1, 2, 3, 4], [5, 6], [7, 8, 9], [10, 11, 12, 13, 14], [3, 3]]
CONF = [(0.6, 0.55), (0.4, 0.45), (0.7, 0.62), (0.5, 0.5), (0.9, 0.85)]
SENT = frozenset({7, 8, 9, 20, 21})  # arbitrary "sentence end" ids for the boundary rule
TOKENS = DialogueTokens(stop_ids=frozenset({0}), sentence_end_ids=SENT)


def cfg(**kw) -> DialogueConfig:
    base = dict(max_new_tokens=30, n_turns=4, segment_tokens=5, min_segment_tokens=2, temperature=1.0,
                interrupt=InterruptConfig(alpha=1.0, beta=0.5, shr=0.3))
    base.update(kw)
    return DialogueConfig(**base)


def run(speakers, seed: int, **kw):
    first = kw.pop("first", [0, 1, 0, 1, 0])
    return run_dialogues(speakers, PROMPTS, CONF, kw.pop("cfg", cfg()), torch.Generator().manual_seed(seed),
                         first=first, tokens=kw.pop("tokens", TOKENS), **kw)


@pytest.fixture(scope="module")
def speakers():
    return pair(adapters=False)


@pytest.fixture(scope="module")
def adapted():
    return pair(adapters=True)


def test_seeded_dialogue_is_deterministic(speakers) -> None:
    a, b, c = run(speakers, 3), run(speakers, 3), run(speakers, 4)
    assert a == b
    assert [t.ids for t in a] != [t.ids for t in c]
    assert sum(t.n_interruptions for t in a) > 0  # the test exercises interruptions


def test_decisions_replay_interrupt_state_and_boundaries(speakers) -> None:
    c = cfg()
    ts = [t for seed in range(4) for t in run(speakers, seed, cfg=c)]
    n_hits = 0
    for t in ts:
        # replay the boundary rule and the per-expert interrupt clock over the finished transcript
        states = [InterruptState(), InterruptState()]
        speaker, turns, since, k = t.opener, 1, 0, 0
        expected_positions = []
        for j, tok in enumerate(t.ids):
            assert t.speakers[j] == speaker
            since += 1
            if j + 1 >= c.max_new_tokens:  # the last token ends the dialogue: no decision after it
                break
            if since >= c.segment_tokens or (tok in SENT and since >= c.min_segment_tokens):
                since = 0
                if turns >= c.n_turns:
                    continue
                d = t.decisions[k]
                k += 1
                listener = 1 - speaker
                expected_positions.append(j + 1)
                assert (d.position, d.listener) == (j + 1, listener)
                assert (d.t_since, d.i_recent) == (states[listener].t_since, states[listener].i_recent)
                assert d.p == pytest.approx(interrupt_probability(t.confidences[listener], d.t_since, d.i_recent, c.interrupt))
                states[listener] = states[listener].after(d.interrupted)
                states[speaker] = states[speaker].aged()
                if d.interrupted:
                    speaker, turns, since = listener, turns + 1, 0
                    n_hits += 1
        assert k == len(t.decisions)
        assert t.states == (states[0], states[1])
        assert len(t.turns) == 1 + t.n_interruptions <= c.n_turns
        assert [x.speaker for x in t.turns] == [(t.opener + i) % 2 for i in range(len(t.turns))]
        first_hit = next((d.position for d in t.decisions if d.interrupted), None)
        assert t.crosstalk_start == first_hit
    assert n_hits >= 5


def test_empirical_interrupt_rate_matches_probability() -> None:
    # C = 0 makes the score -shr whatever the state, so every opportunity has the same p
    speakers = pair(adapters=False)
    c = cfg(max_new_tokens=40, segment_tokens=4, min_segment_tokens=4, n_turns=1000,
            interrupt=InterruptConfig(shr=0.5))
    p = 1 / (1 + math.exp(0.5))
    ts = run_dialogues(speakers, [[1, 2]] * 48, [(0.0, 0.0)] * 48, c, torch.Generator().manual_seed(0),
                       tokens=DialogueTokens())
    ds = [d for t in ts for d in t.decisions]
    assert len(ds) == 48 * 9 and all(d.p == pytest.approx(p) for d in ds)
    rate = sum(d.interrupted for d in ds) / len(ds)
    assert abs(rate - p) < 4 * math.sqrt(p * (1 - p) / len(ds))


def test_batch_equals_alone_when_greedy_and_certain(speakers) -> None:
    # greedy tokens and p = 1 at every opportunity (clip squash of a positive score): no randomness left
    c = cfg(temperature=0.0, interrupt=InterruptConfig(shr=-1.0, squash="clip"))
    batch = run(speakers, 0, cfg=c)
    for i, (p, conf, f) in enumerate(zip(PROMPTS, CONF, [0, 1, 0, 1, 0])):
        alone = run_dialogues(speakers, [p], [conf], c, torch.Generator().manual_seed(99), first=[f], tokens=TOKENS)[0]
        assert dataclasses.replace(alone, logprobs=()) == dataclasses.replace(batch[i], logprobs=())
        assert alone.logprobs == pytest.approx(batch[i].logprobs, abs=1e-5)  # batched matmuls round differently
    assert all(t.n_interruptions == c.n_turns - 1 for t in batch if len(t.ids) == c.max_new_tokens)


def test_per_row_generators_make_sampled_rows_equal_alone(adapted) -> None:
    """Sampling (T = 1) and random interruptions: with a generator per row, each row's transcript is
    that row run alone with the same seed, although finished rows leave the batch along the way."""
    c = cfg()
    first = [0, 1, 0, 1, 0]
    gens = [torch.Generator().manual_seed(10 + i) for i in range(len(PROMPTS))]
    batch = run_dialogues(adapted, PROMPTS, CONF, c, gens, first=first, tokens=TOKENS)
    assert len({len(t.ids) for t in batch}) > 1 and any(t.n_interruptions for t in batch)  # ragged, interrupted
    for i, (p, conf, f) in enumerate(zip(PROMPTS, CONF, first)):
        alone = run_dialogues(adapted, [p], [conf], c, [torch.Generator().manual_seed(10 + i)], first=[f], tokens=TOKENS)[0]
        assert dataclasses.replace(alone, logprobs=()) == dataclasses.replace(batch[i], logprobs=())
    with pytest.raises(ConfigError, match="5 prompts but 2 generators"):
        run_dialogues(adapted, PROMPTS, CONF, c, gens[:2], first=first, tokens=TOKENS)


@pytest.mark.parametrize("per_row", [False, True])
def test_emit_streams_tokens_and_halts_a_row_within_one_step(speakers, per_row) -> None:
    c = cfg(temperature=0.0, max_new_tokens=12)
    seen: dict[int, list[tuple[int, int]]] = {i: [] for i in range(len(PROMPTS))}
    mark: list[int] = []

    def emit(row, tok, who):
        seen[row].append((tok, who))
        if row == 1 and len(seen[row]) == 3:  # cancel row 1 at its third token
            mark.append(len(reads))
            return False
        return True

    def dialogue(emit_fn):
        gens = [torch.Generator().manual_seed(0) for _ in PROMPTS] if per_row else torch.Generator().manual_seed(0)
        reads.clear()
        out = run_dialogues(speakers, PROMPTS, CONF, c, gens, tokens=TOKENS, emit=emit_fn)
        return out, list(reads)

    reads: list[int] = []  # rows in each one-token forward of speaker 0
    hook = speakers[0].model.register_forward_pre_hook(lambda m, a: reads.append(a[0].shape[0]) if a[0].shape[1] == 1 else None)
    try:
        full, full_reads = dialogue(None)
        got, got_reads = dialogue(emit)
    finally:
        hook.remove()
    assert got[1].stop == "halted" and len(got[1].ids) == 3 and len(seen[1]) == 3  # no token after the cancel
    assert full[1].stop != "halted" and len(full[1].ids) > 3
    for i in (0, 2, 3, 4):  # the others are untouched (greedy) and every token was streamed with its speaker
        assert got[i].ids == full[i].ids and seen[i] == list(zip(got[i].ids, got[i].speakers))
    # the very next forward already runs without row 1 (and the forwards before it were the same)
    j = mark[0]
    assert got_reads[:j] == full_reads[:j] and got_reads[j] == full_reads[j] - 1


def test_adapters_only_during_crosstalk(adapted) -> None:
    base = [Speaker(s.name, remove_adapters_copy(s.model), None) for s in adapted]
    # no interruption possible -> no cross-talk -> exactly the base models' dialogue, adapters or not
    quiet = cfg(n_turns=1)
    assert run(adapted, 5, cfg=quiet) == run(base, 5, cfg=quiet)
    # leave the adapters switched ON: the dialogue must still run the opening without them
    for s in adapted:
        set_adapter(s.model, "crosstalk")
    try:
        loud = cfg(interrupt=InterruptConfig(shr=-1.0, squash="clip"))  # interrupt at every opportunity
        ts = run(adapted, 6, cfg=loud)
        assert all(layer.enabled and layer.active == "crosstalk" for s in adapted for layer in lora_layers(s.model).values())
    finally:
        for s in adapted:
            set_adapter(s.model, None)
    for e, (s, b) in enumerate(zip(adapted, base)):
        rows = [list(t.prompt) + list(t.ids) for t in ts]
        with torch.no_grad():
            with_ad = token_scores(s.model, rows, 1.0, adapter="crosstalk",
                                   adapter_from=[len(t.prompt) + t.crosstalk_start - 1 for t in ts])
            plain = token_scores(b.model, rows, 1.0)
        for r, t in enumerate(ts):
            P = len(t.prompt)
            for j, (lp, w) in enumerate(zip(t.logprobs, t.speakers)):
                if w != e:
                    continue
                if j < t.crosstalk_start:  # before cross-talk: the base model's probability
                    assert lp == pytest.approx(float(plain[r, P + j - 1]), abs=1e-4)
                else:  # in cross-talk: the adapted model's, which differs from the base
                    assert lp == pytest.approx(float(with_ad[r, P + j - 1]), abs=1e-4)
                    assert abs(lp - float(plain[r, P + j - 1])) > 1e-3


def remove_adapters_copy(model: torch.nn.Module) -> torch.nn.Module:
    m = copy.deepcopy(model)
    remove_adapters(m)
    return m


def test_given_opening_is_followed_by_a_forced_interruption(adapted) -> None:
    openings = [[5, 6, 7], [8], [9, 10], [11, 12, 13, 14], [1, 2]]
    ts = run(adapted, 1, openings=openings)
    for t, o in zip(ts, openings):
        assert t.ids[: len(o)] == tuple(o) and t.crosstalk_start == len(o)
        assert all(math.isnan(x) for x in t.logprobs[: len(o)])
        d = t.decisions[0]
        assert (d.position, d.forced, d.interrupted, d.p, d.listener) == (len(o), True, True, 1.0, 1 - t.opener)
        assert t.turns[1].interrupted and t.turns[1].speaker == 1 - t.opener


def test_token_policy() -> None:
    z = torch.tensor([[1.0, 2.0, 3.0]])
    assert torch.allclose(token_logprobs(z, 2.0), torch.log_softmax(z / 2, -1))
    assert torch.allclose(token_logprobs(z, 0.0), torch.log_softmax(z, -1))
    tok, lp = choose_tokens(z, 0.0, None)
    assert tok.tolist() == [2] and lp.item() == pytest.approx(torch.log_softmax(z, -1)[0, 2].item())


def test_stop_token_ends_the_dialogue(speakers) -> None:
    # every token is a stop token -> nothing is written, the stop is recorded
    ts = run_dialogues(speakers, [[1, 2]], [(0.5, 0.5)], cfg(), torch.Generator().manual_seed(0),
                       tokens=DialogueTokens(stop_ids=frozenset(range(V))))
    assert ts[0].ids == () and ts[0].stop == "stop" and ts[0].turns[0].ids == ()


def test_drafts_and_trace(speakers) -> None:
    loud = cfg(interrupt=InterruptConfig(shr=-1.0, squash="clip"))
    t = run_crosstalk(speakers[0], speakers[1], [1, 2, 3], (0.4, 0.6), loud, torch.Generator().manual_seed(0),
                      tokens=TOKENS)
    drafts = t.drafts()
    assert [d.expert for d in drafts] == ["poet", "law"]  # most confident first
    assert {d.expert: d.ids for d in drafts} == {"law": tuple(t.tokens_of(0)), "poet": tuple(t.tokens_of(1))}
    assert sum(len(d.ids) for d in drafts) == len(t.ids)
    trace = t.trace(lambda ids: " ".join(map(str, ids)))
    assert [x["expert"] for x in trace] == [x.expert for x in t.turns]
    assert trace[0]["interrupted"] is False and trace[0]["p_interrupt"] is None
    assert all(x["interrupted"] and x["p_interrupt"] == 1.0 for x in trace[1:])
    assert trace[1]["text"] == " ".join(map(str, t.turns[1].ids))
    # an expert that never spoke keeps its independent draft
    quiet = run_crosstalk(speakers[0], speakers[1], [1, 2, 3], (0.4, 0.6), cfg(n_turns=1), None, tokens=TOKENS)
    own = Draft("poet", 0.6, (4, 5))
    assert quiet.drafts([own]) == [own, Draft("law", 0.4, quiet.ids)]
    assert quiet.drafts() == [Draft("law", 0.4, quiet.ids)]
    assert t.to_dict()["experts"] == ("law", "poet")


def test_sentence_ends_from_a_tokenizer() -> None:
    from taskmoe.data.tokenizer import Tokenizer

    tok = Tokenizer.train(["The court rules. Is it so? Yes!\nNext line here."] * 20, vocab_size=300, show_progress=False)
    marks = DialogueTokens.from_tokenizer(tok)
    assert marks.stop_ids == frozenset({tok.eos_id})
    for text in (".", "?", "!", "\n"):
        assert tok.encode(text)[-1] in marks.sentence_end_ids
    assert tok.encode("court")[0] not in marks.sentence_end_ids
    assert not marks.sentence_end_ids & set(tok.special_ids.values())


def test_clear_errors(speakers) -> None:
    c = cfg()
    g = torch.Generator().manual_seed(0)
    with pytest.raises(RequestError, match="prompt 0 is empty"):
        run_dialogues(speakers, [[]], [(0.5, 0.5)], c, g)
    with pytest.raises(RequestError, match="outside"):
        run_dialogues(speakers, [[V + 3]], [(0.5, 0.5)], c, g)
    with pytest.raises(ConfigError, match="opening 0 has 30 tokens"):
        run_dialogues(speakers, [[1]], [(0.5, 0.5)], c, g, openings=[[1] * 30])
    with pytest.raises(ConfigError, match="n_turns >= 2"):
        run_dialogues(speakers, [[1]], [(0.5, 0.5)], cfg(n_turns=1), g, openings=[[1]])
    with pytest.raises(ConfigError, match="confidences"):
        run_dialogues(speakers, [[1]], [(0.5, 1.5)], c, g)
    with pytest.raises(ConfigError, match="share one model"):
        run_dialogues([speakers[0], Speaker("x", speakers[0].model)], [[1]], [(0.5, 0.5)], c, g)
    with pytest.raises(ConfigError, match="vocabularies"):
        run_dialogues([speakers[0], Speaker("x", tiny_expert(3, vocab=V + 1))], [[1]], [(0.5, 0.5)], c, g)
    with pytest.raises(ConfigError, match="adapter 'crosstalk' is not in this model"):
        run_dialogues([Speaker("a", speakers[0].model, "crosstalk"), speakers[1]], [[1]], [(0.5, 0.5)], c, g,
                      openings=[[2]])
    with pytest.raises(ConfigError, match="min_segment_tokens"):
        DialogueConfig(segment_tokens=3, min_segment_tokens=4)
    assert DialogueConfig.from_dict(cfg().to_dict()) == cfg()
