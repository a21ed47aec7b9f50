"""Serving soak: 64 concurrent clients for 60 s against an IMoE run, then an overload burst of 400.

Setup: a small IMoE run (router, three expert LMs, summarizer with a coding adapter) is trained in
a temporary folder exactly as the serving tests build theirs (``tests/inference/pipeline_helpers``,
about a minute), then served by ``create_app`` under uvicorn in a **separate process** on
127.0.0.1 only (the load generator must not share the server's GIL), with the server's timeout
``--timeout`` (default 30 s). ``--run FOLDER`` serves an existing run instead; a **backbone system** (its manifest names a
backbone, e.g. a copy of the quickstart run: SmolLM2-135M + LoRA experts) is sent
:data:`BACKBONE_PROMPTS` (plain questions, written here) and writes its own section
(``serving_soak_backbone``). Both run with continuous batching: a request's rows join the
running pipeline decodes between steps.

Soak (closed loop, bounded by ``--seconds``): ``--clients`` async clients send requests back to
back, chosen with a fixed seed: 40% streaming chat, 40% non-streaming completions, 20% that hang up
early (a stream closed after its first event, or a non-streaming request abandoned after 0.2 s).
Counted: every status; **lost** responses (a request that did not hang up but got neither a
complete answer -- JSON with choices, or a stream ending in ``[DONE]`` without an error event --
nor a 4xx); 5xx (must be 0); refusals (must all be 429 with an admission code, i.e. refused
before any work); p50/p99 latency of complete answers; the server's RSS before and after.

Burst: ``--burst`` non-streaming requests sent at once to the idle server: only 200 and 429 may
come back (no 504: admission by work refuses what would not finish in time).

The baseline of the run is the server's own idle state: RSS before vs after, p50/p99 of the soak
vs the latency of one request alone (measured first).

Run: ``python -m bench.serving_soak`` (``--quick``: 16 clients for 15 s, burst 100); against a
backbone system: ``python -m bench.serving_soak --run runs/quickstart --timeout 120`` (a copy of
the quickstart run; one request alone takes ~15-20 s on the loaded 2-core box, so 30 s is too tight).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx

from bench._report import load_note, md_table, write_section
from bench.serving import percentile, start_server, stop_server
from taskmoe.serving.serve import KEEP_ALIVE_S

START_LOAD = load_note()  # how busy the machine was when this run started

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 30.0
MAX_TOKENS = 16
ADMISSION_CODES = {"server_busy", "queue_full", "request_over_share"}
BACKBONE_PROMPTS = {
    "code": "Write a Python function that returns the largest value in a list.",
    "legal": "What does a limitation of liability clause in a contract do?",
    "chat": "Any tips for a relaxing weekend at home?",
    "science": "Why is the sky blue?",
}
"""What the soak sends a backbone system (an instruct backbone answers questions)."""


def backbone_of(run: Path) -> str | None:
    """The backbone a run's manifest names (None: the run has its own models)."""
    meta = json.loads((run / "taskmoe.json").read_text()).get("meta") or {}
    return meta.get("backbone")


def _helpers():
    path = ROOT / "tests" / "inference" / "pipeline_helpers.py"
    spec = importlib.util.spec_from_file_location("pipeline_helpers_for_soak", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # type: ignore[union-attr]
    return mod


def build_run(folder: Path) -> tuple[Path, dict[str, str]]:
    """Train the tests' tiny IMoE run into ``folder`` (see the module docstring)."""
    mod = _helpers()
    return mod.build_run(folder), mod.prompts()


def serve_worker(run: str, port: int, threads: int, timeout_s: float = TIMEOUT_S, admit_fraction: float = 0.5) -> None:
    """Server process: the IMoE run behind the real app, on 127.0.0.1 only."""
    import torch
    import uvicorn

    from taskmoe.serving.app import create_app
    from taskmoe.serving.backends import load_backend
    from taskmoe.serving.limits import Limits
    from taskmoe.serving.serve import check_backend

    torch.set_num_threads(threads)
    backend = load_backend(run, name="imoe")
    check_backend(backend)
    app = create_app(backend, Limits(max_batch=32, max_wait_ms=5.0, generation_timeout_s=timeout_s,
                                         admit_fraction=admit_fraction))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False,
                timeout_keep_alive=KEEP_ALIVE_S)


def rss_mib(pid: int) -> float:
    import psutil

    return psutil.Process(pid).memory_info().rss / 2**20


class Tally:
    """What the clients saw."""

    def __init__(self) -> None:
        self.status: Counter[int] = Counter()
        self.refusal_codes: Counter[str] = Counter()
        self.kinds: Counter[str] = Counter()
        self.lost: list[str] = []
        self.latency: list[float] = []

    def error(self, r: httpx.Response) -> None:
        self.status[r.status_code] += 1
        if r.status_code == 429:
            try:
                self.refusal_codes[r.json()["error"]["code"]] += 1
            except (ValueError, KeyError, TypeError):
                self.refusal_codes["(not an admission error)"] += 1
        elif r.status_code >= 500:
            self.lost.append(f"{r.status_code}: {r.text[:200]}")


async def one(http: httpx.AsyncClient, rng: random.Random, prompts: list[str], tally: Tally) -> None:
    text = rng.choice(prompts)
    u = rng.random()
    kind = "stream" if u < 0.4 else "json" if u < 0.8 else "hangup-stream" if u < 0.9 else "hangup-json"
    tally.kinds[kind] += 1
    t0 = time.perf_counter()
    if kind in ("stream", "hangup-stream"):
        body = {"model": "imoe", "messages": [{"role": "user", "content": text}], "max_tokens": MAX_TOKENS,
                "stream": True}
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                tally.error(r)
                return
            tally.status[200] += 1
            events = []
            async for line in r.aiter_lines():
                if not line:
                    continue
                events.append(line)
                if kind == "hangup-stream":
                    return  # close the stream after its first event
            if events[-1:] != ["data: [DONE]"] or any('"error"' in e for e in events):
                tally.lost.append(f"stream: {events[-2:]}")
            else:
                tally.latency.append(time.perf_counter() - t0)
        return
    body = {"model": "imoe", "prompt": text, "max_tokens": MAX_TOKENS}
    if kind == "hangup-json":  # on its own connection: abandoning it must not touch the shared pool
        async with httpx.AsyncClient(base_url=str(http.base_url), timeout=TIMEOUT_S) as own:
            try:
                await asyncio.wait_for(own.post("/v1/completions", json=body), 0.2)
            except asyncio.TimeoutError:
                pass
        return
    r = await http.post("/v1/completions", json=body)
    if r.status_code != 200:
        tally.error(r)
        return
    tally.status[200] += 1
    if not r.json().get("choices"):
        tally.lost.append(f"200 without choices: {r.text[:200]}")
    else:
        tally.latency.append(time.perf_counter() - t0)


async def soak(url: str, prompts: list[str], clients: int, seconds: float, timeout_s: float = TIMEOUT_S) -> Tally:
    tally = Tally()
    stop_at = time.monotonic() + seconds
    # idle connections expire on the client well before the server's keep-alive (30 s) closes them
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients, keepalive_expiry=2.0)
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s + 30, limits=limits) as http:
        async def client(i: int) -> None:
            rng = random.Random(i)
            while time.monotonic() < stop_at:
                try:
                    await one(http, rng, prompts, tally)
                except httpx.HTTPError as e:  # a transport failure is a lost response
                    tally.lost.append(f"{type(e).__name__}: {e}")
                if tally.status[429]:
                    await asyncio.sleep(0.05)  # a refused client backs off a little, as a real one would

        await asyncio.gather(*(client(i) for i in range(clients)))
    return tally


async def burst(url: str, prompts: list[str], n: int, timeout_s: float = TIMEOUT_S) -> Counter[int]:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=url, timeout=timeout_s + 60, limits=limits) as http:
        rs = await asyncio.gather(*(http.post("/v1/completions", json={
            "model": "imoe", "prompt": prompts[i % len(prompts)], "max_tokens": MAX_TOKENS}) for i in range(n)),
            return_exceptions=True)
    return Counter(r.status_code if isinstance(r, httpx.Response) else type(r).__name__ for r in rs)


def alone_latency(url: str, prompt: str, timeout_s: float = TIMEOUT_S, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        r = httpx.post(url + "/v1/completions", json={"model": "imoe", "prompt": prompt, "max_tokens": MAX_TOKENS},
                       timeout=timeout_s + 30)
        r.raise_for_status()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def run_config(run: Path, prompts: list[str], args: argparse.Namespace, admit_fraction: float, clients: int,
               seconds: float, n_burst: int) -> dict:
    """One server (``admit_fraction``): alone latency, the soak, memory, the burst; the checks."""
    proc, url = start_server(run, 32, args.threads, module="bench.serving_soak",
                             extra=(str(args.timeout), str(admit_fraction)))
    try:
        alone = alone_latency(url, prompts[0], args.timeout)
        rss0 = rss_mib(proc.pid)
        tally = asyncio.run(soak(url, prompts, clients, seconds, args.timeout))
        time.sleep(1.0)
        rss1 = rss_mib(proc.pid)
        health = httpx.get(url + "/health").json()
        burst_codes = asyncio.run(burst(url, prompts, n_burst, args.timeout))
        rss2 = rss_mib(proc.pid)
    finally:
        stop_server(proc)
    fivexx = sum(v for k, v in tally.status.items() if k >= 500)
    refusals = tally.status[429]
    row = {
        "admit fraction": admit_fraction, "clients": clients, "seconds": seconds, "requests": sum(tally.kinds.values()),
        "200": tally.status[200], "429": refusals, "5xx": fivexx, "lost": len(tally.lost),
        "429 with admission code": sum(v for k, v in tally.refusal_codes.items() if k in ADMISSION_CODES),
        "p50 ms": percentile(tally.latency, 50) * 1e3 if tally.latency else float("nan"),
        "p99 ms": percentile(tally.latency, 99) * 1e3 if tally.latency else float("nan"),
        "alone ms": alone * 1e3,
    }
    mem = {"admit fraction": admit_fraction, "RSS before MiB": round(rss0, 1), "RSS after soak MiB": round(rss1, 1),
           "RSS after burst MiB": round(rss2, 1)}
    burst_row = {"admit fraction": admit_fraction, "burst": n_burst,
                 **{str(k): v for k, v in sorted(burst_codes.items(), key=str)}}
    ok = fivexx == 0 and not tally.lost and row["429 with admission code"] == refusals and set(burst_codes) <= {200, 429}
    print(json.dumps({"soak": row, "kinds": dict(tally.kinds), "memory": mem, "burst": burst_row,
                      "lost": tally.lost[:5], "health": health}, indent=1), flush=True)
    return {"soak": row, "memory": mem, "burst": burst_row, "kinds": dict(tally.kinds), "ok": ok}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="16 clients for 15 s, burst of 100")
    ap.add_argument("--clients", type=int, default=0)
    ap.add_argument("--seconds", type=float, default=0)
    ap.add_argument("--burst", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads in the server process")
    ap.add_argument("--run", type=Path, default=None, help="reuse (or build once into) this run folder")
    ap.add_argument("--no-write", action="store_true", help="print only, do not update docs/benchmarks.md")
    ap.add_argument("--timeout", type=float, default=TIMEOUT_S,
                    help="the server's --timeout in seconds (a backbone system on a loaded 2-core box needs more)")
    ap.add_argument("--admit-fractions", default="0.5",
                    help="comma-separated Limits.admit_fraction values, one server (and soak) each; 0.5 = default")
    ap.add_argument("--serve-worker", nargs=7, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve_worker:
        run, port, _max_batch, threads, _batching, timeout, fraction = args.serve_worker
        serve_worker(run, int(port), int(threads), float(timeout), float(fraction))
        return {}
    clients = args.clients or (16 if args.quick else 64)
    seconds = args.seconds or (15.0 if args.quick else 60.0)
    n_burst = args.burst or (100 if args.quick else 400)
    fractions = [float(f) for f in args.admit_fractions.split(",")]
    with tempfile.TemporaryDirectory(prefix="taskmoe-bench-soak-") as tmp:
        t0 = time.perf_counter()
        folder = args.run or Path(tmp) / "run"
        if (folder / "taskmoe.json").is_file():
            run, by_domain = folder, BACKBONE_PROMPTS if backbone_of(folder) else _helpers().prompts()
        else:
            run, by_domain = build_run(folder)
        build_s = time.perf_counter() - t0
        backbone = backbone_of(run)
        n_experts = len(json.loads((run / "taskmoe.json").read_text())["experts"])
        results = [run_config(run, list(by_domain.values()), args, f, clients, seconds, n_burst) for f in fractions]
    if backbone:
        setup = (f"Backbone system `{run.name}` (experts are LoRA adapters of the backbone `{Path(backbone).name}`, "
                 f"{n_experts} experts, experts-only mode: the confidence-weighted mixture decodes the answer; loaded "
                 f"in {build_s:.0f} s)")
    else:
        setup = (f"IMoE run built like the serving tests' (router + 3 expert LMs + summarizer with a coding adapter, "
                 f"d_model 32; built/loaded in {build_s:.0f} s)")
    verdicts = "\n".join(
        f"- admit fraction {r['soak']['admit fraction']:g}: " + (
            "all checks hold: 0 x 5xx, 0 lost, every refusal a 429 from admission (before any work), the burst only "
            "200/429." if r["ok"] else "**a check failed** (see the tables).") for r in results)
    body = (
        f"{setup}, served from a separate process on 127.0.0.1 (torch threads {args.threads}, "
        f"--timeout {args.timeout:g} s, max_batch 32, admission fraction as in the tables (0.5 is the default), "
        "continuous batching: rows join the running pipeline decodes between steps); one server per admission "
        f"setting. Soak: {clients} concurrent clients for {seconds:g} s, closed loop, max_tokens {MAX_TOKENS}; request "
        f"mix {[r['kinds'] for r in results]} (hangup = the client closes a stream after its first event, or abandons "
        "a non-streaming request after 0.2 s). `lost` = a request that did not hang up and got neither a complete "
        "answer nor a 4xx; latency of complete answers; `alone` = one request on the idle server.\n\n"
        + md_table([r["soak"] for r in results]) + "\n\n" + md_table([r["memory"] for r in results]) + "\n\n"
        f"Overload burst of {n_burst} simultaneous non-streaming requests on the idle server:\n\n"
        + md_table([r["burst"] for r in results]) + "\n\n" + verdicts + "\n"
        + f"\nMachine: {START_LOAD}." + (" Quick run (`--quick`)." if args.quick else "") + "\n"
    )
    print(body)
    if not args.no_write:
        flags = " ".join(a for a in (argv if argv is not None else sys.argv[1:]) if a != "--no-write")
        name, title = (("serving_soak_backbone", "Serving soak: 64 clients x 60 s against a backbone system, overload burst")
                       if backbone else ("serving_soak", "Serving soak: 64 clients x 60 s against an IMoE run, overload burst"))
        write_section(name, title, f"python -m bench.serving_soak {flags}".strip(), body)
    return {"results": results, "ok": all(r["ok"] for r in results)}


if __name__ == "__main__":
    main()
