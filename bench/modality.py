"""Modality experts on a DOE model: MNIST and FSDD answered as generated text, against baselines in the same run.

One run: trains a small text DOE model on the default corpus, adds an image expert (MNIST, 60k
train) and then an audio expert (FSDD, take index 5-49 train) with everything else frozen, and
measures: held-out accuracy of the *generated* answers (exact match) vs logistic regression on raw
pixels and the same conv trunk trained alone with a linear head on the same images for the same
steps (MNIST), vs logistic regression on mean log-mel features (FSDD test split, take index 0-4);
gate routing shares; text perplexity before/after adding both experts (and whether the logits are
bit-identical); added parameters; latency of an image / audio question vs a text question of the
same token length. Writes its section of docs/benchmarks.md. With ``--backbone DIR`` it instead adds
an image expert to that pretrained backbone (upcycled, everything of it frozen; SmolLM2-135M here),
trained on an MNIST subset for a few hundred steps, and writes a second section with its numbers
(accuracy, routing, text logits vs the plain backbone, added parameters, latency).

    python -m bench.modality [--image-steps 1000] [--threads 1] [--audio-steps 600] [--backbone DIR] [--quick]
"""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench._report import bench_parser, command, load_note, md_table, parse_bench_args, timeit, write_section

START_LOAD = load_note()  # how busy the machine was when this run started

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_data() -> Path:
    import os

    for cand in [Path(os.environ.get("TASKMOE_SHARED", "/nonexistent")) / "data", SHARED]:
        if (cand / "images" / "mnist").is_dir():
            return cand
    raise SystemExit("bench.modality needs the shared data folder (MNIST, FSDD): set TASKMOE_SHARED")


def cnn_alone(x_tr, y_tr, x_te, y_te, steps: int, batch: int, lr: float, channels: int, seed: int) -> float:
    """The image encoder's trunk + global pooling + a linear head, trained alone (same steps, batch, lr, AdamW+cosine)."""
    from taskmoe.doe.modality.encoders import ImageEncoder, ImageEncoderConfig

    torch.manual_seed(seed)
    # the summary position is not used here; 'mean' (no flat layer) keeps the seeded init of trunk and head
    cfg = ImageEncoderConfig(image_size=int(x_tr.shape[-1]), summary_from="mean")
    enc = ImageEncoder(cfg.replace(channels=channels or cfg.channels), 8)  # the same trunk and augmentation
    head = torch.nn.Linear(enc.cfg.channels * enc.cfg.grid ** 2, 10)
    params = list(enc.trunk.parameters()) + list(head.parameters())
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.05)
    g = torch.Generator().manual_seed(seed)
    y_tr_t = torch.as_tensor(y_tr)

    def logits(x):
        f = torch.nn.functional.adaptive_avg_pool2d(enc.features(x), enc.cfg.grid)  # (B, C, g, g)
        return head(f.flatten(1))

    enc.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x_tr), (batch,), generator=g)
        loss = torch.nn.functional.cross_entropy(logits(x_tr[idx]), y_tr_t[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    enc.eval()
    with torch.no_grad():
        pred = torch.cat([logits(x_te[i : i + 500]).argmax(1) for i in range(0, len(x_te), 500)])
    return float((pred.numpy() == np.asarray(y_te)).mean())


def logreg(f_tr, y_tr, f_te, y_te, max_iter: int = 200) -> float:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    sc = StandardScaler().fit(f_tr)
    clf = LogisticRegression(max_iter=max_iter).fit(sc.transform(f_tr), y_tr)
    return float(clf.score(sc.transform(f_te), y_te))


def mean_log_mel(x: torch.Tensor, rate: int) -> np.ndarray:
    from taskmoe.ops.spectrogram import log_mel, mel_filterbank

    fb = mel_filterbank(129, 40, rate)
    lm = torch.cat([log_mel(x[i : i + 256], fb, 256, 80) for i in range(0, len(x), 256)])  # (N, 40, frames)
    return lm.mean(dim=2).numpy()


@torch.no_grad()
def text_logits_ppl(model, windows, batch: int = 32) -> tuple[float, list[torch.Tensor]]:
    """Held-out perplexity over DOE windows (prompt-routed, threshold routing) and the logits themselves."""
    from taskmoe.training.losses import IGNORE_INDEX, lm_cross_entropy

    total, count, outs = 0.0, 0, []
    for i in range(0, len(windows), batch):
        b = [windows[j] for j in range(i, min(len(windows), i + batch))]
        ids, tgt = torch.stack([x["input_ids"] for x in b]), torch.stack([x["targets"] for x in b])
        logits = model(ids, prompt_mask=torch.stack([x["prompt_mask"] for x in b])).logits
        n = int((tgt != IGNORE_INDEX).sum())
        total += float(lm_cross_entropy(logits, tgt)) * n
        count += n
        outs.append(logits)
    return math.exp(total / count), outs


def main(argv: list[str] | None = None) -> dict:
    ap = bench_parser(__doc__, "tiny sizes and subsets (smoke run)")
    ap.add_argument("--text-steps", type=int, default=300)
    ap.add_argument("--image-steps", type=int, default=1000)
    ap.add_argument("--audio-steps", type=int, default=600)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--mnist-test", type=int, default=0, help="evaluate on the first N MNIST test images (0 = all 10k)")
    ap.add_argument("--cnn-seeds", type=int, default=3, help="random starts of the CNN-alone baseline (its spread)")
    ap.add_argument("--channels", type=int, default=0, help="image trunk channels (0 = the encoder's default)")
    ap.add_argument("--backbone", default="", help="a backbone folder: add an image expert to it instead (its own section)")
    ap.add_argument("--backbone-steps", type=int, default=300)
    ap.add_argument("--backbone-batch", type=int, default=8)
    ap.add_argument("--backbone-train", type=int, default=6000, help="MNIST training images for the backbone run")
    ap.add_argument("--backbone-test", type=int, default=500, help="MNIST test images for the backbone run")
    args = parse_bench_args(ap, argv)
    from taskmoe.data.media import read_mnist
    from taskmoe.data.media_tasks import digit_audio, media_prompt
    from taskmoe.doe.model import load_doe
    from taskmoe.inference.generate import GenerationConfig
    from taskmoe.inference.media import MediaQuestion, generate_media
    from taskmoe.training.recipes import modality as rec
    from taskmoe.training.recipes.doe import train_doe, windows_for
    from taskmoe.data.commands import get_corpus

    q = args.quick
    data = shared_data()
    if args.backbone:  # its own section, so the two runs can go side by side
        out, text = backbone_run(args, data, q)
        text = f"Machine: {START_LOAD}. " + text
        print(text)
        if not args.no_write:
            write_section("modality_backbone", "Modality expert on an upcycled pretrained backbone: MNIST as generated text",
                          command("modality", argv), text)
        return out
    t_start = time.time()
    res: dict = {}
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        # 1. the text DOE model
        t0 = time.time()
        s = train_doe(out=d / "doe", vocab_size=2048, d_model=64, n_layers=2, n_heads=2, experts=4,
                      steps=20 if q else args.text_steps, seq_len=128, prompt_len=32, batch_size=16,
                      max_docs_per_domain=60 if q else 300, compare_dense=False, progress=False)
        res["text_train_s"] = time.time() - t0
        base = load_doe(d / "doe" / "model").eval()
        tok = rec.Tokenizer.beside(d / "doe" / "model")
        corpus = get_corpus(None, max_docs_per_domain=60 if q else 300, progress=False)
        val = windows_for(corpus.validation, tok, list(corpus.domains), 128, 32)
        ppl_before, logits_before = text_logits_ppl(base, val)
        res["text_val_ppl_doe_report"] = s["doe_val_ppl"]

        # 2. image expert on MNIST
        common = dict(batch_size=args.batch_size, lr=args.lr, channels=args.channels, progress=False)
        icfg = rec.ModalityTrainConfig(kind="image", base=str(d / "doe" / "model"), out=str(d / "mm_image"),
                                       data=str(data / "images" / "mnist"), steps=30 if q else args.image_steps,
                                       max_train=2000 if q else 0, max_test=500 if q else args.mnist_test, **common)
        t0 = time.time()
        si = rec.setup(icfg)
        ri = rec.train(si, icfg)
        res["image_train_s"] = time.time() - t0
        rep_i = rec.cleanup(si, icfg, ri, res["image_train_s"])
        # baselines on the same images
        x_tr, y_tr = read_mnist(data / "images" / "mnist", "train")
        x_te, y_te = read_mnist(data / "images" / "mnist", "test")
        if q:
            x_tr, y_tr = x_tr[:2000], y_tr[:2000]
        if q or args.mnist_test:
            x_te, y_te = x_te[: icfg.max_test], y_te[: icfg.max_test]
        t0 = time.time()
        res["mnist_logreg"] = logreg(x_tr.reshape(len(x_tr), -1), y_tr, x_te.reshape(len(x_te), -1), y_te,
                                     max_iter=50 if q else 100)
        res["mnist_logreg_s"] = time.time() - t0
        t0 = time.time()
        res["mnist_cnn_seeds"] = [cnn_alone(torch.from_numpy(x_tr), y_tr, torch.from_numpy(x_te), y_te, icfg.steps,
                                            args.batch_size, args.lr, args.channels, seed)
                                  for seed in range(max(1, 1 if q else args.cnn_seeds))]
        res["mnist_cnn"] = res["mnist_cnn_seeds"][0]
        res["mnist_cnn_s"] = time.time() - t0

        # 3. audio expert on FSDD, added to the image model
        acfg = rec.ModalityTrainConfig(kind="audio", base=str(d / "mm_image"), out=str(d / "mm_both"),
                                       data=str(data / "audio" / "fsdd" / "recordings"),
                                       steps=30 if q else args.audio_steps, batch_size=32, lr=args.lr,
                                       progress=False)
        t0 = time.time()
        sa = rec.setup(acfg)
        ra = rec.train(sa, acfg)
        res["audio_train_s"] = time.time() - t0
        rep_a = rec.cleanup(sa, acfg, ra, res["audio_train_s"])
        enc = sa.model.encoders["audio"].cfg
        a_tr, ay_tr = digit_audio(acfg.data, "train", enc.sample_rate, enc.clip_samples)
        a_te, ay_te = digit_audio(acfg.data, "test", enc.sample_rate, enc.clip_samples)
        res["fsdd_logreg"] = logreg(mean_log_mel(a_tr, enc.sample_rate), ay_tr, mean_log_mel(a_te, enc.sample_rate), ay_te,
                                    max_iter=1000)

        # 4. text after adding both experts
        mm = rec.load_multimodal(d / "mm_both")
        ppl_after, logits_after = text_logits_ppl(mm, val)
        res["ppl_before"], res["ppl_after"] = ppl_before, ppl_after
        res["text_logits_identical"] = all(torch.equal(a, b) for a, b in zip(logits_before, logits_after))
        shares = rec.routing_shares(mm, sa.text_prompts)

        # 5. cost: parameters and latency (2 new tokens each, no stop token, greedy)
        added = {m: sum(p.numel() for p in mm.modality_parameters(m)) for m in mm.modalities}
        cfg = GenerationConfig(max_new_tokens=2, temperature=0.0)
        img_q = MediaQuestion("What digit is this?", "image", x_te[0])
        aud_q = MediaQuestion("What digit is spoken?", "audio", (a_te[0].numpy(), enc.sample_rate))
        lat = {}
        for name, qq in (("image", img_q), ("audio", aud_q)):
            n_tok = len(media_prompt(tok, qq.prompt, name, mm.n_positions(name))[0])
            words = " ".join(["the"] * 64)
            ids = tok.encode(words, allow_special=False)[: n_tok - 1]
            text_q = MediaQuestion(tok.decode(ids))
            assert len(ids) + 1 == n_tok, (len(ids), n_tok)
            lat[name] = (timeit(lambda: generate_media(mm, tok, [qq], cfg), repeat=5),
                         timeit(lambda: generate_media(mm, tok, [text_q], cfg), repeat=5), n_tok)
        res["total_s"] = time.time() - t_start

    ti, ta = rep_i["test"], rep_a["test"]
    digit_i, cap_i = ti["What digit is this? <image>"], ti["Describe the image. <image>"]
    digit_a, cap_a = ta["What digit is spoken? <audio>"], ta["Transcribe the audio. <audio>"]
    rows_acc = [
        {"task": f"MNIST test ({digit_i['n']}): generated answer to 'What digit is this? <image>'",
         "accuracy": digit_i["accuracy"]},
        {"task": "MNIST test: generated caption 'Describe the image. <image>' = 'a handwritten seven' (exact)",
         "accuracy": cap_i["accuracy"]},
        {"task": "MNIST baseline: logistic regression on raw pixels", "accuracy": res["mnist_logreg"]},
        {"task": "MNIST baseline: the same conv trunk + linear head on its 2x2 pooled grid, trained alone (same "
                 "training images, augmentation, steps, batch and lr)",
         "accuracy": res["mnist_cnn"]},
        {"task": f"  same, over {len(res['mnist_cnn_seeds'])} random starts (seeds 0-{len(res['mnist_cnn_seeds']) - 1}): "
                 f"mean (min - max)",
         "accuracy": f"{np.mean(res['mnist_cnn_seeds']):.4f} ({min(res['mnist_cnn_seeds']):.4f} - "
                     f"{max(res['mnist_cnn_seeds']):.4f})"},
        {"task": "FSDD test (take 0-4, 300): generated answer to 'What digit is spoken? <audio>'",
         "accuracy": digit_a["accuracy"]},
        {"task": "FSDD test: generated transcription 'Transcribe the audio. <audio>' = 'seven' (exact)",
         "accuracy": cap_a["accuracy"]},
        {"task": "FSDD baseline: logistic regression on mean log-mel (40 bands)", "accuracy": res["fsdd_logreg"]},
    ]
    rows_route = [
        {"sequences": "MNIST test image questions", "taken by the image expert": digit_i["taken_by_expert"],
         "fell back to a text expert": digit_i["fallback"]},
        {"sequences": "FSDD test audio questions", "taken by the audio expert": digit_a["taken_by_expert"],
         "fell back to a text expert": digit_a["fallback"]},
        {"sequences": f"held-out text prompts ({len(sa.text_prompts)})",
         "taken by the image expert": shares["image"]["text_taken"], "taken by the audio expert": shares["audio"]["text_taken"]},
        {"sequences": "  same, the modality gate alone (p > tau, before the modality guard)",
         "taken by the image expert": shares["image"]["text_gate_alone"],
         "taken by the audio expert": shares["audio"]["text_gate_alone"]},
    ]
    rows_cost = [{"modality": m, "added params": added[m], "question tokens": lat[m][2],
                  "media question (ms)": lat[m][0] * 1e3, "text question, same length (ms)": lat[m][1] * 1e3,
                  "ratio": lat[m][0] / lat[m][1]} for m in lat]
    body = (
        f"Machine: {START_LOAD}. Text DOE: d_model 64, 2 layers, 4 experts, vocab 2048, "
        f"{args.text_steps if not q else 20} steps ({res['text_train_s']:.0f} s). Image expert: {icfg.steps} steps x "
        f"{args.batch_size} ({res['image_train_s']:.0f} s incl. setup), audio expert: {acfg.steps} steps x 32 "
        f"({res['audio_train_s']:.0f} s); only the encoder, projector, expert MLPs, gate and head adapter train. "
        f"Image encoder: {icfg.channels or si.model.encoders['image'].cfg.channels} channels, summary position = "
        f"{si.model.encoders['image'].cfg.summary_from} over the {si.model.encoders['image'].cfg.grid}x"
        f"{si.model.encoders['image'].cfg.grid} grid; head adapter rank {si.model.heads['image'].rank}, B init "
        f"{icfg.head_init} / sqrt(rank); lr {icfg.lr}, warmup then cosine to {icfg.min_lr_ratio} x lr. "
        f"Whole run {res['total_s'] / 60:.1f} min.\n\n"
        + md_table(rows_acc) + "\n\n"
        + md_table(rows_route, ["sequences", "taken by the image expert", "taken by the audio expert",
                                "fell back to a text expert"]) + "\n\n"
        + f"Text perplexity on the default corpus's validation windows: {res['ppl_before']:.3f} before, "
          f"{res['ppl_after']:.3f} after adding both experts; logits bit-identical: {res['text_logits_identical']}.\n\n"
        + md_table(rows_cost) + "\n\n"
        + f"Goals: MNIST >= 98% and >= CNN alone: {digit_i['accuracy']:.2%} vs CNN {res['mnist_cnn']:.2%} (seed 0) "
          f"({'met' if digit_i['accuracy'] >= max(0.98, res['mnist_cnn']) else 'NOT met'}; against the CNN's mean over "
          f"its random starts {np.mean(res['mnist_cnn_seeds']):.2%}: "
          f"{'met' if digit_i['accuracy'] >= max(0.98, np.mean(res['mnist_cnn_seeds'])) else 'NOT met'}, against its best "
          f"{max(res['mnist_cnn_seeds']):.2%}: {'met' if digit_i['accuracy'] >= max(res['mnist_cnn_seeds']) else 'NOT met'}); "
          f"FSDD >= 95%: "
          f"{digit_a['accuracy']:.2%} ({'met' if digit_a['accuracy'] >= 0.95 else 'NOT met'}); "
          f"routing 100% / 0%: {'met' if digit_i['taken_by_expert'] == 1 and digit_a['taken_by_expert'] == 1 and shares['image']['text_taken'] == 0 and shares['audio']['text_taken'] == 0 else 'NOT met'}; "
          f"perplexity equal: {'met' if res['ppl_before'] == res['ppl_after'] else 'NOT met'}."
    )
    print(body)
    if not args.no_write:
        write_section("modality", "Modality experts: MNIST and FSDD as generated text on a DOE model",
                      command("modality", argv), body)
    return res


def backbone_run(args, data: Path, q: bool) -> tuple[dict, str]:
    """An image expert on the upcycled backbone ``args.backbone`` (expert ``base`` = its MLPs, the new one a LoRA
    update of them), trained on an MNIST subset with everything of the backbone frozen; its table as markdown."""
    from taskmoe.data.backbone_tokenizer import BackboneTokenizer
    from taskmoe.data.media_tasks import media_prompt
    from taskmoe.inference.generate import GenerationConfig
    from taskmoe.inference.media import MediaQuestion, generate_media
    from taskmoe.models.backbones import load_backbone
    from taskmoe.training.recipes import modality as rec

    tok = BackboneTokenizer.load(args.backbone)
    text = rec.text_prompts(tok, 16, 32, split="validation")
    backbone, _ = load_backbone(args.backbone)
    with torch.no_grad():
        ref = backbone(text).logits
    del backbone
    with tempfile.TemporaryDirectory() as d:
        cfg = rec.ModalityTrainConfig(kind="image", base=str(args.backbone), out=str(Path(d) / "mm"),
                                      data=str(data / "images" / "mnist"), steps=5 if q else args.backbone_steps,
                                      batch_size=args.backbone_batch, lr=args.lr, max_train=args.backbone_train,
                                      max_test=50 if q else args.backbone_test, negatives=128, progress=False)
        t0 = time.time()
        s = rec.setup(cfg)
        r = rec.train(s, cfg)
        train_s = time.time() - t0
        rep = rec.cleanup(s, cfg, r, train_s)
        mm = s.model.eval()
        with torch.no_grad():
            identical = torch.equal(mm(text).logits, ref)
        x = s.test_media[0].numpy()
        img_q = MediaQuestion("What digit is this?", "image", x)
        n_tok = len(media_prompt(tok, img_q.prompt, "image", mm.n_positions("image"), mm.placeholder_id)[0])
        text_q = MediaQuestion(tok.decode(tok.encode(" ".join(["the"] * 64), allow_special=False)[:n_tok]))
        gcfg = GenerationConfig(max_new_tokens=2, temperature=0.0)
        lat = (timeit(lambda: generate_media(mm, tok, [img_q], gcfg), repeat=3),
               timeit(lambda: generate_media(mm, tok, [text_q], gcfg), repeat=3))
    t = rep["test"]
    digit, cap = t["What digit is this? <image>"], t["Describe the image. <image>"]
    rows = [{"task": f"MNIST test (first {digit['n']}): generated answer to 'What digit is this? <image>'",
             "accuracy": digit["accuracy"], "taken by the image expert": digit["taken_by_expert"]},
            {"task": "MNIST test: generated caption 'Describe the image. <image>' (exact)", "accuracy": cap["accuracy"],
             "taken by the image expert": cap["taken_by_expert"]}]
    out = {"digit": digit["accuracy"], "caption": cap["accuracy"], "text_logits_identical": identical,
           "train_s": train_s, "added": rep["added_params"], "latency": lat, "text_routing": rep["text_routing"]}
    body = (f"**On a pretrained backbone** ({Path(args.backbone).name}, upcycled: expert `base` = its MLPs, the image "
            f"expert = a LoRA update (r {s.model.base.doe_config.backbone.lora_rank}) of all "
            f"{len(s.model.base.moe_layers)} MLPs + encoder + projector into d_model {s.model.d_model}; placeholder id "
            f"{s.model.placeholder_id}, no embedding row added; all backbone weights frozen). {cfg.steps} steps x "
            f"{cfg.batch_size} on the first {cfg.max_train} MNIST training images ({train_s:.0f} s incl. setup).\n\n"
            + md_table(rows) + "\n\n"
            + f"Text prompts taken by the image expert: {rep['text_routing']['text_taken']:.3g} (its gate alone: "
              f"{rep['text_routing']['text_gate_alone']:.3g}). Text logits of 16 held-out prompts equal the plain "
              f"backbone's (torch.equal): {identical}. Added parameters: {rep['added_params']}. One image question "
              f"({n_tok} tokens, 2 new tokens): {lat[0] * 1e3:.0f} ms vs a text question of the same length "
              f"{lat[1] * 1e3:.0f} ms.")
    return out, body


if __name__ == "__main__":
    main()
