"""SFT and DPO on the one loop: the DPO loss by hand and against TRL, the frozen reference, exact resume.

Models are tiny ``transformer_lm``\\ s saved to a folder with a small tokenizer, so each test runs
the real recipes (setup / train / cleanup) in seconds."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

from taskmoe.data.tokenizer import Tokenizer
from taskmoe.layers.lora import load_adapter, set_adapter
from taskmoe.models import LMConfig, transformer_lm
from taskmoe.models.checkpoint import load_lm, save_lm
from taskmoe.training.losses import IGNORE_INDEX, completion_logprob, dpo_loss, dpo_metrics
from taskmoe.training.policy import logits_of
from taskmoe.training.recipes.chat import run, setup
from taskmoe.training.recipes.dpo import DPOConfig, dpo_loss_fn, train_dpo
from taskmoe.training.recipes.sft import SFTConfig, sft_loss, train_sft
from taskmoe.data.formats import read_alpaca, read_preferences
from taskmoe.data.sft import PreferenceDataset, SFTDataset

WORDS = "red green blue cat dog sun moon tree rock bird fish one two three four five".split()


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A tiny transformer LM folder with its tokenizer, an Alpaca JSONL and an HH-RLHF JSONL."""
    root = tmp_path_factory.mktemp("chat")
    g = torch.Generator().manual_seed(0)
    pick = lambda n: " ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (n,), generator=g))  # noqa: E731
    rows = [{"instruction": f"Repeat: {pick(3)}", "input": "", "output": pick(int(2 + k % 5))} for k in range(40)]
    for r in rows:
        r["output"] = r["instruction"].split(": ")[1]  # learnable: echo the words
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = [{"chosen": f"\n\nHuman: Say {w}\n\nAssistant: {w} {w}", "rejected": f"\n\nHuman: Say {w}\n\nAssistant: {pick(2)}"}
             for w in WORDS * 2]
    (root / "hh.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))
    tok = Tokenizer.train([json.dumps(r) for r in rows] * 3, 300, show_progress=False)
    torch.manual_seed(0)
    model = transformer_lm(LMConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=2))
    save_lm(model, root / "model")
    tok.save(root / "model")
    return root


def _cfg(cls, **kw):
    train = dict(max_steps=8, batch_size=4, lr=5e-3, warmup_steps=1, eval_every=4, save_every=3, eval_batches=2,
                 log_every=1, progress=False, seed=3)
    train.update(kw.pop("train", {}))
    return cls(max_len=48, lora_rank=4, val_examples=8, **kw).replace(train=SFTConfig().train.replace(**train))


# ------------------------------------------------------------------------------ DPO loss
def test_dpo_loss_hand_value():
    """Two pairs, beta = 0.5.

    Pair 1: pi_w = -2, pi_l = -4, ref_w = -3, ref_l = -3 -> h = (-2 + 4) - (-3 + 3) = 2,
    loss_1 = -log sigmoid(0.5 * 2) = log(1 + e^-1) = 0.3132617; rewards r_w = 0.5 * (-2 + 3) = 0.5,
    r_l = 0.5 * (-4 + 3) = -0.5.  Pair 2: pi_w = -5, pi_l = -1, ref_w = -4, ref_l = -2 ->
    h = -4 - (-2) = -2, loss_2 = log(1 + e^1) = 1.3132617; r_w = -0.5, r_l = 0.5.
    Mean loss = 0.8132617; margins (1, -1) -> mean 0, accuracy 1/2.
    """
    t = lambda *v: torch.tensor(v)  # noqa: E731
    out = dpo_loss(t(-2.0, -5.0), t(-4.0, -1.0), t(-3.0, -4.0), t(-3.0, -2.0), beta=0.5)
    assert out.loss.item() == pytest.approx((math.log1p(math.exp(-1)) + math.log1p(math.e)) / 2, abs=1e-6)
    assert out.loss.item() == pytest.approx(0.8132617, abs=1e-6)
    m = dpo_metrics(out)
    assert out.chosen_rewards.tolist() == [0.5, -0.5] and out.rejected_rewards.tolist() == [-0.5, 0.5]
    assert (m["reward_margin"].item(), m["reward_accuracy"].item()) == (0.0, 0.5)


def _trl_compute_loss(tmp_path, ids, mask, logits, ref_logps, beta):
    """TRL's own ``DPOTrainer._compute_loss`` on an instance holding only what that method reads.

    TRL 1.x has no free ``dpo_loss`` function: the sigmoid loss lives inside ``_compute_loss``,
    which calls the model with ``fused_lm_head=True`` and reads ``outputs.log_probs`` (per-token
    log-probabilities of ``input_ids[:, 1:]``, zero outside the completion). A stub model returns
    exactly that from the given logits; the reference log-probabilities go in through TRL's
    precomputed-reference path. Everything else (shift, sum, chunk into chosen/rejected, the
    sigmoid loss, rewards, margins, accuracies) is TRL's code.
    """
    from trl import DPOConfig as TRLConfig, DPOTrainer

    args = TRLConfig(output_dir=str(tmp_path / "trl"), beta=beta, report_to=[], bf16=False, use_cpu=True)
    tr = DPOTrainer.__new__(DPOTrainer)
    lp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1) * mask[:, 1:]

    class Stub:
        training = True

        def __call__(self, **kw):
            return SimpleNamespace(log_probs=lp, entropy=torch.zeros_like(lp), mean_logits=torch.zeros_like(lp),
                                   is_top1=torch.zeros_like(lp, dtype=torch.bool))

    acc = SimpleNamespace(device=torch.device("cpu"), gather_for_metrics=lambda x: x, gather=lambda x: x)
    tr.__dict__.update(model=Stub(), accelerator=acc, aux_loss_enabled=False, precompute_ref_logps=True,
                       ld_alpha=args.ld_alpha, f_divergence_type=args.f_divergence_type, loss_types=args.loss_type,
                       loss_weights=args.loss_weights or [1.0] * len(args.loss_type), beta=args.beta,
                       use_weighting=args.use_weighting, _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
                       _total_train_tokens=0, _tp_size=1, args=args)
    ref_w, ref_l = ref_logps.chunk(2)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": mask,
              "ref_chosen_logps": ref_w, "ref_rejected_logps": ref_l}
    loss = DPOTrainer._compute_loss(tr, tr.model, inputs, return_outputs=False)
    return loss, {k: v[-1] for k, v in tr._metrics["train"].items()}


def test_dpo_loss_equals_trl_on_the_same_log_probabilities(tmp_path):
    torch.manual_seed(1)
    B, T, V, beta = 3, 10, 17, 0.3
    ids = torch.randint(0, V, (2 * B, T))
    starts = torch.tensor([4, 6, 3, 5, 4, 7])
    mask = (torch.arange(T)[None] >= starts[:, None]).long()  # (2B, T): the completion
    mask[1, -2:] = 0  # a padded row
    logits, ref_logits = torch.randn(2 * B, T, V) * 2, torch.randn(2 * B, T, V)
    # ours: the data layer's shifted labels (-100 outside the completion) and logits of inputs ids[:, :-1]
    labels = torch.where(mask[:, 1:] > 0, ids[:, 1:], torch.full_like(ids[:, 1:], IGNORE_INDEX))
    pi_w, pi_l = completion_logprob(logits[:, :-1], labels).chunk(2)
    ref = completion_logprob(ref_logits[:, :-1], labels)
    ours = dpo_loss(pi_w, pi_l, *ref.chunk(2), beta=beta)
    theirs, metrics = _trl_compute_loss(tmp_path, ids, mask, logits, ref, beta)
    assert ours.loss.item() == pytest.approx(theirs.item(), abs=1e-6)
    m = dpo_metrics(ours)
    assert m["reward_margin"].item() == pytest.approx(metrics["rewards/margins"], abs=1e-6)
    assert m["reward_accuracy"].item() == pytest.approx(metrics["rewards/accuracies"], abs=1e-6)
    assert m["rewards_chosen"].item() == pytest.approx(metrics["rewards/chosen"], abs=1e-6)
    assert pi_w.mean().item() == pytest.approx(metrics["logps/chosen"], abs=1e-5)


# ------------------------------------------------------------------------------- recipes
def test_sft_trains_the_adapter_and_saves_what_it_trained(base, tmp_path):
    out = tmp_path / "sft"
    res = train_sft(base / "model", base / "sft.jsonl", out, steps=12, batch_size=4, lr=1e-2, max_len=48,
                    val_examples=8, seed=0, progress=False)
    assert res["policy"] == "lora" and res["steps"] == 12 and res["last_loss"] < res["first_loss"]
    assert res["train_examples"] == 32 and res["trainable_params"] > 0
    for f in ("adapter/config.json", "adapter/model.safetensors", "tokenizer.json", "reports/metrics.json"):
        assert (out / f).is_file(), f
    st = setup(base / "model", read_alpaca(base / "sft.jsonl"), SFTDataset, _cfg(SFTConfig))
    batch = st.val.collate([st.val[0]])
    reloaded = load_lm(base / "model")
    load_adapter(reloaded, out / "adapter")
    set_adapter(reloaded, "chat")
    reloaded.eval()
    base_only = load_lm(base / "model").eval()
    with torch.no_grad():
        a, b = reloaded(batch["input_ids"]).logits, base_only(batch["input_ids"]).logits
    assert not torch.allclose(a, b)  # the saved adapter changes the model


def test_adapter_disabled_reference_is_the_base_model(base, tmp_path):
    cfg = _cfg(DPOConfig)
    st = setup(base / "model", read_preferences(base / "hh.jsonl"), PreferenceDataset, cfg)
    with torch.no_grad():  # make the adapter non-trivial
        for p in st.policy.model.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    batch = st.train.collate([st.train[0]])
    ids = batch["chosen_input_ids"]
    plain = load_lm(base / "model").eval()
    with torch.no_grad():
        expected = plain(ids).logits
        policy_logits = logits_of(st.policy.model.eval()(ids))
    st.policy.model.train()
    assert torch.equal(st.policy.reference_logits(ids), expected)  # same weights, adapter off: bit-identical
    assert not torch.allclose(policy_logits, expected)
    assert st.policy.model.training  # the reference pass restored train mode


def test_dpo_continues_an_sft_adapter_against_it_and_reports_reward_metrics(base, tmp_path):
    sft_out = tmp_path / "sft"
    train_sft(base / "model", base / "sft.jsonl", sft_out, steps=3, batch_size=4, max_len=48, val_examples=4,
              progress=False)
    cfg = _cfg(DPOConfig, beta=0.5)
    st = setup(base / "model", read_preferences(base / "hh.jsonl"), PreferenceDataset, cfg, start=sft_out / "adapter")
    sft_model = load_lm(base / "model")
    load_adapter(sft_model, sft_out / "adapter")
    set_adapter(sft_model, "chat")
    ids = st.train.collate([st.train[0]])["chosen_input_ids"]
    with torch.no_grad():
        assert torch.equal(st.policy.reference_logits(ids), sft_model.eval()(ids).logits)
    loss_fn = dpo_loss_fn(st.policy, cfg.beta)
    loss, m = loss_fn(st.policy.model, st.train.collate([st.train[0]]))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at the start: h = 0
    assert m["reward_margin"].item() == pytest.approx(0.0, abs=1e-6)
    res = train_dpo(base / "model", base / "hh.jsonl", tmp_path / "dpo", adapter=sft_out / "adapter", beta=0.5,
                    steps=10, batch_size=4, lr=1e-2, max_len=48, val_examples=8, progress=False)
    lines = [json.loads(x) for x in (tmp_path / "dpo" / "train" / "metrics.jsonl").read_text().splitlines()]
    train_lines = [x for x in lines if x["kind"] == "train"]
    assert {"reward_margin", "reward_accuracy", "rewards_chosen", "rewards_rejected"} <= set(train_lines[-1])
    assert res["eval_reward_margin"] > 0 and res["last_loss"] < math.log(2)  # it learns to prefer chosen


class _Crash(Exception):
    pass


class _CrashAt:
    def __init__(self, step):
        self.step = step

    def on_step_end(self, step, record):
        if step == self.step:
            raise _Crash(step)


@pytest.mark.parametrize("recipe", ["sft", "dpo"])
def test_resume_is_exact(base, tmp_path, recipe):
    if recipe == "sft":
        cfg, data, ds, loss = _cfg(SFTConfig), read_alpaca(base / "sft.jsonl"), SFTDataset, lambda st: sft_loss
    else:
        cfg, data, ds = _cfg(DPOConfig, beta=0.5), read_preferences(base / "hh.jsonl"), PreferenceDataset
        loss = lambda st: dpo_loss_fn(st.policy, cfg.beta)  # noqa: E731
    st = setup(base / "model", data, ds, cfg)
    ref = run(st, loss(st), cfg, tmp_path / "ref")
    st = setup(base / "model", data, ds, cfg)
    with pytest.raises(_Crash):
        run(st, loss(st), cfg, tmp_path / "run", callbacks=[_CrashAt(7)])  # last checkpoint: step 6
    torch.manual_seed(99)
    st2 = setup(base / "model", data, ds, cfg)
    res = run(st2, loss(st2), cfg, tmp_path / "run")
    assert res.losses == ref.losses and res.eval_history == ref.eval_history


def test_backbone_lora_sft_then_dpo(base, tmp_path):
    """A tiny Llama backbone folder (HF layout, ChatML template): LoRA SFT, then DPO whose reference is the SFT adapter."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "models" / "backbones"))
    from backbone_helpers import write_hf_backbone

    from taskmoe.models.backbones import import_backbone, load_backbone

    write_hf_backbone(tmp_path / "hf")
    import_backbone(tmp_path / "hf", out=tmp_path / "bb")
    sft = train_sft(tmp_path / "bb", base / "sft.jsonl", tmp_path / "sft", steps=4, batch_size=4, lr=1e-2, max_len=64,
                    val_examples=4, progress=False)
    assert sft["policy"] == "lora" and sft["last_loss"] < sft["first_loss"]
    dpo = train_dpo(tmp_path / "bb", base / "hh.jsonl", tmp_path / "dpo", adapter=tmp_path / "sft" / "adapter",
                    steps=3, batch_size=4, max_len=64, val_examples=4, progress=False)
    assert dpo["first_loss"] == pytest.approx(math.log(2), abs=1e-5)
    model, _ = load_backbone(tmp_path / "bb")
    names = load_adapter(model, tmp_path / "dpo" / "adapter")
    assert names == "chat"
