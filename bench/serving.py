"""HTTP serving throughput: expert-grouped continuous batching vs plain FIFO batching vs one at a time.

Setup: four expert LMs (``expert_lm``, d_model 256, 4 layers, vocab 2048, random weights) behind
one tokenizer, served by the real server (``create_app`` under uvicorn) in a **separate process**
so the load generator does not share the server's GIL. The routing key of a request is the expert
it runs through; a batch holds rows of one expert only and runs its weights once per step for all
of them. The backend ignores the end token (``stop_ids=()``) so every request generates exactly
``--tokens`` tokens and every mode does the same work per request.

Runs (identical models and prompts; only the scheduler's ``max_batch``/``batching`` and the expert
mix differ). Every run is continuous batching (rows join running batches between steps):

- ``grouped, 4 experts``: ``max_batch=32`` rows *per expert*; requests spread round-robin over the
  four experts, so at concurrency C each expert's batch holds about C/4 rows;
- ``grouped, 1 expert``: ``max_batch=32``; every request routes to the same expert;
- ``fifo, 4 experts``: the **batching baseline**, ``batching="fifo"``: at most ``max_batch=32`` rows
  in flight over all experts, started strictly in arrival order, without grouping by expert (each
  step still runs each expert once over its rows, since different weights cannot share a matmul);
- ``one-at-a-time``: ``max_batch=1``, requests round-robin over the four experts (no batching).

Grouping's gain is ``grouped, 4 experts`` over ``fifo, 4 experts`` (batching vs batching); the
old headline compared against ``one-at-a-time``.

Load: a closed loop of C concurrent clients (C = 1, 8, 32), each sending non-streaming chat
completions back to back; requests/s over the whole level, and p50/p99 of per-request latency.
Torch runs one thread in the server (``--threads``); the second core serves the load generator.

Run: ``python -m bench.serving`` (``--quick``: fewer requests and tokens, a smoke run).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench._report import load_note, md_table, write_section

START_LOAD = load_note()  # how busy the machine was when this run started

N_EXPERTS = 4
CONCURRENCY = (1, 8, 32)
RUNS = {  # name -> (max_batch, experts the requests spread over, batching)
    "grouped, 4 experts": (32, N_EXPERTS, "grouped"),
    "grouped, 1 expert": (32, 1, "grouped"),
    "fifo, 4 experts": (32, N_EXPERTS, "fifo"),
    "one-at-a-time": (1, N_EXPERTS, "grouped"),
}
BASELINES = ("fifo, 4 experts", "one-at-a-time")


def corpus() -> list[str]:
    """A few hundred KB of real text (standard-library sources) for the tokenizer and the prompts."""
    import json as _json
    import textwrap as _textwrap
    import argparse as _argparse

    out: list[str] = []
    for mod in (_json, _textwrap, _argparse):
        out += [p.strip() for p in Path(mod.__file__).read_text(encoding="utf-8").split("\n\n") if p.strip()]
    return out


def build(folder: Path, d_model: int, n_layers: int) -> None:
    """Save N_EXPERTS expert LM folders and one tokenizer.json into ``folder``."""
    import torch

    from taskmoe.data.tokenizer import Tokenizer
    from taskmoe.models import LMConfig, expert_lm, save_lm

    tok = Tokenizer.train(corpus(), vocab_size=2048, show_progress=False)
    tok.save(folder / "tokenizer.json")
    cfg = LMConfig(vocab_size=tok.vocab_size, d_model=d_model, n_layers=n_layers, n_heads=4)
    for i in range(N_EXPERTS):
        torch.manual_seed(i)
        save_lm(expert_lm(cfg), folder / f"expert{i}", kind="expert")


def serve_worker(folder: str, port: int, max_batch: int, threads: int, batching: str = "grouped") -> None:
    """Server process: LMBackend without end token, real app, uvicorn on 127.0.0.1:port."""
    import torch
    import uvicorn

    from taskmoe.serving.app import create_app
    from taskmoe.serving.backends.lm import LMBackend
    from taskmoe.serving.limits import Limits

    torch.set_num_threads(threads)
    backend = LMBackend.load(folder, stop_ids=())
    app = create_app(backend, Limits(max_batch=max_batch, max_wait_ms=5.0, queue_size=256, batching=batching))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(folder: Path, max_batch: int, threads: int, batching: str = "grouped",
                 module: str = "bench.serving", extra: tuple[str, ...] = ()) -> tuple[subprocess.Popen, str]:
    """Start ``module``'s ``--serve-worker FOLDER PORT MAX_BATCH THREADS BATCHING *extra`` process; wait until healthy."""
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen([sys.executable, "-m", module, "--serve-worker", str(folder), str(port),
                             str(max_batch), str(threads), batching, *extra], env=env,
                            cwd=Path(__file__).resolve().parents[1])
    url = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    while True:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() - t0 > 120:
            proc.kill()
            raise RuntimeError(f"benchmark server (max_batch={max_batch}) did not start")
        time.sleep(0.1)


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def percentile(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of a non-empty list."""
    s = sorted(xs)
    k = max(0, min(len(s) - 1, int(-(-q * len(s) // 100)) - 1))
    return s[k]


async def load(url: str, prompts: list[str], concurrency: int, n_requests: int, tokens: int, experts: int) -> dict:
    """Closed loop: ``concurrency`` workers send ``n_requests`` chat completions in total (a 429 is
    retried after its Retry-After and counted)."""
    latencies: list[float] = []
    errors: list[int] = []
    refused = [0]
    counter = iter(range(n_requests))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        async def worker() -> None:
            for i in counter:
                body = {"model": f"expert{i % experts}", "max_tokens": tokens, "temperature": 0,
                        "messages": [{"role": "user", "content": prompts[i % len(prompts)]}]}
                t0 = time.perf_counter()
                r = await http.post("/v1/chat/completions", json=body)
                while r.status_code == 429:
                    refused[0] += 1
                    await asyncio.sleep(float(r.headers.get("retry-after", 1)))
                    r = await http.post("/v1/chat/completions", json=body)
                latencies.append(time.perf_counter() - t0)
                if r.status_code != 200 or r.json()["usage"]["completion_tokens"] != tokens:
                    errors.append(r.status_code)

        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} failed requests at concurrency {concurrency}: {errors[:5]}")
    return {"requests": n_requests, "req/s": n_requests / wall, "tokens/s": n_requests * tokens / wall,
            "p50 ms": percentile(latencies, 50) * 1e3, "p99 ms": percentile(latencies, 99) * 1e3,
            "429 retried": refused[0]}


def batch_stats(url: str) -> tuple[float, float]:
    """(sum, count) of the server's taskmoe_batch_rows histogram."""
    vals = {}
    for line in httpx.get(url + "/metrics").text.splitlines():
        for k in ("taskmoe_batch_rows_sum", "taskmoe_batch_rows_count"):
            if line.startswith(k + " "):
                vals[k] = float(line.split()[1])
    return vals["taskmoe_batch_rows_sum"], vals["taskmoe_batch_rows_count"]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer requests and tokens (smoke run)")
    ap.add_argument("--tokens", type=int, default=0, help="tokens per request (default 64, quick 8)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads in the server process")
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--no-write", action="store_true", help="print only, do not update docs/benchmarks.md")
    ap.add_argument("--serve-worker", nargs=5, metavar=("FOLDER", "PORT", "MAX_BATCH", "THREADS", "BATCHING"),
                    help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve_worker:
        folder, port, max_batch, threads, batching = args.serve_worker
        serve_worker(folder, int(port), int(max_batch), int(threads), batching)
        return {}
    tokens = args.tokens or (8 if args.quick else 64)
    per_level = {1: 8, 8: 32, 32: 64} if args.quick else {1: 16, 8: 48, 32: 128}
    prompts = [p[:200] for p in corpus()[:64]]

    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="taskmoe-bench-serving-") as tmp:
        folder = Path(tmp)
        build(folder, args.d_model, args.layers)
        for mode, (max_batch, experts, batching) in RUNS.items():
            proc, url = start_server(folder, max_batch, args.threads, batching)
            try:
                asyncio.run(load(url, prompts, 4, 8, tokens, experts))  # warm-up: first calls, allocator, caches
                for c in CONCURRENCY:
                    before = batch_stats(url)
                    res = asyncio.run(load(url, prompts, c, per_level[c], tokens, experts))
                    after = batch_stats(url)
                    res["mean batch rows"] = (after[0] - before[0]) / max(after[1] - before[1], 1)
                    rows.append({"mode": mode, "concurrency": c, **res})
                    print(json.dumps(rows[-1]), flush=True)
            finally:
                stop_server(proc)

    by = {(r["mode"], r["concurrency"]): r for r in rows}
    pairs = [(m, b) for b in BASELINES for m in RUNS if m not in BASELINES or (b == "one-at-a-time" and m != b)]
    speedups = [{"concurrency": c, **{f"req/s {m} / {b}": by[(m, c)]["req/s"] / by[(b, c)]["req/s"] for m, b in pairs}}
                for c in CONCURRENCY]
    cols = ["mode", "concurrency", "requests", "req/s", "tokens/s", "p50 ms", "p99 ms", "mean batch rows", "429 retried"]
    body = (
        f"{N_EXPERTS} expert LMs (expert_lm, d_model {args.d_model}, {args.layers} layers, vocab 2048), "
        f"{tokens} generated tokens per request, greedy, non-streaming chat completions over HTTP from a separate "
        f"load-generator process (closed loop of C clients); server torch threads: {args.threads}. "
        "All runs are continuous batching (rows join running batches between steps). "
        "`grouped, 4 experts`: max_batch 32 rows per expert, requests round-robin over the 4 experts; "
        "`grouped, 1 expert`: every request to one expert; `fifo, 4 experts`: the batching baseline, at most 32 rows "
        "in flight over all experts in arrival order, no grouping by expert; `one-at-a-time`: max_batch 1 (no "
        "batching). `mean batch rows` is rows per group that started together. Grouping's gain is "
        "`grouped, 4 experts / fifo, 4 experts` (batching vs batching).\n\n"
        + md_table(rows, cols) + "\n\n" + md_table(speedups) + "\n\n"
        f"Machine: {START_LOAD}. Goal of the old headline: >= 3x requests/s over one-at-a-time "
        "at concurrency 32. "
        + ("_Quick smoke run (`--quick`): it only shows the benchmark runs; run without `--quick` for the figures._\n"
           if args.quick else "\n")
    )
    print(md_table(rows, cols))
    print(md_table(speedups))
    if not args.no_write:
        write_section("serving", "Serving: expert-grouped continuous batching vs FIFO batching vs one at a time",
                      "python -m bench.serving" + (" --quick" if args.quick else ""), body)
    return {"rows": rows, "speedups": speedups}


if __name__ == "__main__":
    main()
