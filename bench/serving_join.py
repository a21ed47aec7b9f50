"""A short IMoE request arriving while a long one decodes: continuous batching vs one pipeline call per batch.

Setup: the serving tests' tiny IMoE run (``tests/inference/pipeline_helpers``: router, three expert
LMs, summarizer with a coding adapter; built in a temporary folder, or ``--run``), served by the
real :class:`~taskmoe.serving.scheduler.Scheduler` in-process (no HTTP: the figure is the
scheduler's). A long request (the code prompt, greedy, ``--long`` max_tokens) is submitted; once its
first answer piece has streamed, a short request (the legal prompt, greedy, 8 max_tokens, another
expert) is submitted. Measured: the short request's time to its first answer piece and to its
answer, and the long request's total time.

Two modes in the same run, the second being the baseline:

- **continuous** (today's server): the IMoE backend's ``open_batch`` steps the pipeline's decodes,
  and the short request's rows join between steps;
- **whole batch** (the server before): ``open_batch`` hidden, so the scheduler runs each batch as
  ONE ``System.generate_ids`` call; the short request waits for the long one's call to end.

Each figure is the median of ``--repeat`` rounds. The answers of both modes are checked equal.

Run: ``python -m bench.serving_join`` (``--quick``: long 64 tokens, 2 rounds).
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from bench._report import bench_parser, command, load_note, md_table, parse_bench_args, write_section
from bench.serving_soak import _helpers
from taskmoe.serving.backend import SamplingParams
from taskmoe.serving.backends import load_backend
from taskmoe.serving.limits import Limits
from taskmoe.serving.scheduler import Scheduler

START_LOAD = load_note()
SHORT = 8


async def _first(sink: asyncio.Queue) -> float:
    while True:
        _i, piece = await sink.get()
        if piece:
            return time.perf_counter()


async def one_round(backend, long_text: str, short_text: str, long_tokens: int) -> dict:
    """Long request, then (after its first answer piece) the short one; seconds and answers."""
    sched = Scheduler(backend, Limits(max_batch=32, max_wait_ms=5.0, token_budget=1 << 20, max_request_share=1.0,
                                      generation_timeout_s=600.0))
    await sched.start()
    try:
        ids_l, ids_s = backend.encode_prompt(long_text), backend.encode_prompt(short_text)
        sink_l, sink_s = asyncio.Queue(), asyncio.Queue()
        t0 = time.perf_counter()
        (lo,) = sched.submit(backend.route("imoe", ids_l), [(ids_l, SamplingParams(long_tokens, 0.0))], sink=sink_l)
        await _first(sink_l)
        t1 = time.perf_counter()
        (sh,) = sched.submit(backend.route("imoe", ids_s), [(ids_s, SamplingParams(SHORT, 0.0))], sink=sink_s)
        first_s = asyncio.ensure_future(_first(sink_s))
        out_s = await sh.result()
        t2 = time.perf_counter()
        out_l = await lo.result()
        t3 = time.perf_counter()
        return {"short first piece s": await first_s - t1, "short answer s": t2 - t1, "long s": t3 - t0,
                "long tokens": len(out_l.token_ids), "answers": (out_l.token_ids, out_s.token_ids)}
    finally:
        await sched.close()


def main(argv: list[str] | None = None) -> dict:
    ap = bench_parser(__doc__, "long request of 64 tokens, 2 rounds", threads=1)
    ap.add_argument("--long", type=int, default=512, help="max_tokens of the long request")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--run", type=Path, default=None, help="reuse (or build once into) this IMoE run folder")
    args = parse_bench_args(ap, argv)
    long_tokens, repeat = (64, 2) if args.quick else (args.long, args.repeat)
    helpers = _helpers()
    with tempfile.TemporaryDirectory(prefix="taskmoe-bench-join-") as tmp:
        folder = args.run or Path(tmp) / "run"
        if not (folder / "taskmoe.json").is_file():
            helpers.build_run(folder)
        prompts = helpers.prompts()
        rows, answers = [], {}
        for mode in ("continuous", "whole batch"):
            backend = load_backend(folder, name="imoe")
            if mode == "whole batch":
                backend.open_batch = None  # the scheduler then runs each batch as one pipeline call
            rounds = [asyncio.run(one_round(backend, prompts["code"], prompts["legal"], long_tokens))
                      for _ in range(repeat)]
            answers[mode] = [r.pop("answers") for r in rounds]
            rows.append({"mode": mode, **{k: statistics.median(r[k] for r in rounds) * (1e3 if k.endswith(" s") else 1)
                                          for k in rounds[0]}})
    for row in rows:
        for k in [k for k in row if k.endswith(" s")]:
            row[k.replace(" s", " ms")] = row.pop(k)
    same = all(a == answers["whole batch"][0] for a in answers["continuous"] + answers["whole batch"])
    cont, whole = rows
    ratio = whole["short answer ms"] / max(cont["short answer ms"], 1e-9)
    body = (
        f"The serving tests' tiny IMoE run behind the real scheduler, in-process (torch threads {args.threads}). "
        f"A long request (code prompt, greedy, max_tokens {long_tokens}) is submitted; after its first answer piece, "
        f"a short one (legal prompt, greedy, max_tokens {SHORT}, other experts). Median of {repeat} rounds; "
        "`whole batch` is the baseline (each batch one `System.generate_ids` call, as the server ran IMoE before).\n\n"
        + md_table(rows) + "\n\n"
        f"The short request is answered {ratio:.1f}x sooner with continuous batching (it joins the running decodes "
        f"between steps instead of waiting for the long call); answers {'identical' if same else '**differ**'} in "
        f"both modes.\n\nMachine: {START_LOAD}." + (" Quick run (`--quick`)." if args.quick else "") + "\n"
    )
    print(body)
    if not args.no_write:
        write_section("serving_join", "Serving an IMoE run: a short request arriving while a long one decodes",
                      command("serving_join", argv), body)
    return {"rows": rows, "same": same}


if __name__ == "__main__":
    main()
