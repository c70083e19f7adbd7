"""`resd serve` under load, and after a SIGKILL: what is acknowledged is stored.

Two parts, both against a real `resd serve` process on loopback with the bundled model:

- **Load.** `--clients` threads (default 8) for `--seconds` (default 60): each asks for a
  completion through the `openai` client, then posts feedback on it. Reported:
  completions/s, p50/p99 latency of completions and of feedback posts, and the database
  rows against the responses the clients received (they must be equal).
- **Fault.** The same load, and after `--kill-after` seconds the server is killed with
  SIGKILL mid-load and started again on the same database. Every completion and every
  feedback row a client saw acknowledged (200/201) must be in the database.

    python benchmarks/serve_load.py                          # smollm2-135m, 8 clients, 60 s
    python benchmarks/serve_load.py --model path/to/model --seconds 10 --out runs/serve_load
    python benchmarks/serve_load.py --model qwen2.5-coder-0.5b --dtypes float32,bfloat16 --no-fault
    python benchmarks/serve_load.py --stream --no-fault       # streaming clients: time to first piece

`--dtypes` runs the load part once per weight dtype (`resd serve --dtype`), one after the
other on the same requests; the fault part runs with the first.

Prints a table and writes --json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openai

KEY = "bench-key"
MODEL = "served"


@dataclass
class Tally:
    """What the clients saw, shared by the client threads."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    completions: list[str] = field(default_factory=list)  # acknowledged completion ids
    feedback: list[str] = field(default_factory=list)  # completion ids with acknowledged feedback
    completion_s: list[float] = field(default_factory=list)
    first_piece_s: list[float] = field(default_factory=list)  # streamed: until the first text
    tokens: int = 0  # completion tokens of the acknowledged completions
    feedback_s: list[float] = field(default_factory=list)
    errors: int = 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(args: argparse.Namespace, out: Path, port: int, dtype: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "resd", "serve", "--model", args.model, "--served-model-name", MODEL,
               "--dtype", dtype,
               "--port", str(port), "--output-dir", str(out), "--max-new-tokens", str(args.max_tokens),
               "--max-batch", str(args.clients), "--log-level", "warning"]  # fmt: skip
    process = subprocess.Popen(command, env={**os.environ, "RESD_API_KEY": KEY},
                               stderr=subprocess.DEVNULL)  # fmt: skip
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"resd serve exited with {process.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.3)
    raise RuntimeError("resd serve did not come up")


def client_loop(
    port: int, stop: threading.Event, tally: Tally, max_tokens: int, worker: int, stream: bool
) -> None:
    url = f"http://127.0.0.1:{port}"
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=120)
    i = 0
    while not stop.is_set():
        i += 1
        try:
            t0 = time.perf_counter()
            request = dict(
                model=MODEL, max_tokens=max_tokens, temperature=1.0, seed=worker * 100_000 + i,
                messages=[{"role": "user", "content": f"Name a city (request {worker}-{i})."}],
            )  # fmt: skip
            first = None
            if stream:
                reply_id, usage = None, None
                for chunk in client.chat.completions.create(
                    **request, stream=True, stream_options={"include_usage": True}
                ):
                    reply_id, usage = chunk.id, chunk.usage or usage
                    if first is None and chunk.choices and chunk.choices[0].delta.content:
                        first = time.perf_counter()
            else:
                reply = client.chat.completions.create(**request)
                reply_id, usage = reply.id, reply.usage
            t1 = time.perf_counter()
            with tally.lock:
                tally.completions.append(reply_id)
                tally.completion_s.append(t1 - t0)
                tally.first_piece_s.append((first or t1) - t0)
                tally.tokens += usage.completion_tokens if usage else 0
            note = httpx.post(f"{url}/v1/feedback", headers={"Authorization": f"Bearer {KEY}"},
                              json={"completion_id": reply_id, "reward": 0, "feedback": "Name the country too."},
                              timeout=120)  # fmt: skip
            if note.status_code in (200, 201):
                with tally.lock:
                    tally.feedback.append(reply_id)
                    tally.feedback_s.append(time.perf_counter() - t1)
            else:
                tally.errors += 1
        except (openai.APIError, httpx.HTTPError):
            with tally.lock:
                tally.errors += 1
            time.sleep(0.1)


def run_load(port: int, seconds: float, args: argparse.Namespace, kill: subprocess.Popen | None = None,
             kill_after: float = 0.0) -> tuple[Tally, float]:  # fmt: skip
    tally, stop = Tally(), threading.Event()
    threads = [threading.Thread(target=client_loop,
                                args=(port, stop, tally, args.max_tokens, w, args.stream))
               for w in range(args.clients)]  # fmt: skip
    start_t = time.perf_counter()
    for t in threads:
        t.start()
    if kill is not None:
        time.sleep(kill_after)
        kill.send_signal(signal.SIGKILL)
        kill.wait()
        time.sleep(1.0)  # clients see the connection die
        stop.set()
    else:
        time.sleep(seconds)
        stop.set()
    for t in threads:
        t.join()
    return tally, time.perf_counter() - start_t


def stored(out: Path) -> tuple[set[str], set[str]]:
    """Completion ids and completion ids with feedback, read straight from the database."""
    from resd.serve.store import Store

    store = Store(str(out / "resd.db"))
    try:
        rows = store.recent(10**9)
    finally:
        store.close()
    return {r["id"] for r in rows}, {r["id"] for r in rows if r["feedback"]}


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--kill-after", type=float, default=20.0)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--out", default="runs/serve_load")
    parser.add_argument("--json", default="benchmarks/results/serve_load.json")
    parser.add_argument("--dtypes", default="auto", help="comma-separated `resd serve --dtype`s")
    parser.add_argument("--no-fault", action="store_true", help="skip the SIGKILL part")
    parser.add_argument("--stream", action="store_true",
                        help="clients stream, and the time to the first text piece is reported")  # fmt: skip
    args = parser.parse_args(argv)
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    dtypes = args.dtypes.split(",")
    result: dict[str, Any] = {"settings": vars(args), "machine": f"{os.cpu_count()} CPU cores",
                              "load_by_dtype": {}}  # fmt: skip
    for dtype in dtypes:
        result["load_by_dtype"][dtype] = load_part(args, out / f"load-{dtype}", dtype)
    load = result["load"] = result["load_by_dtype"][dtypes[0]]
    print(f"\nresd serve, {args.model}, {args.clients} clients, max_tokens {args.max_tokens}, "
          f"{result['machine']}")  # fmt: skip
    for dtype, run in result["load_by_dtype"].items():
        print(f"{'load, --dtype ' + dtype:32s} {run['seconds']:.0f} s: {run['completions']} completions, "
              f"{run['completions_per_s']:.2f}/s, p50 {run['completion_p50_s']:.2f} s, "
              f"p99 {run['completion_p99_s']:.2f} s, {run['tokens_per_completion']:.1f} tokens each"
              + (f"; first piece p50 {run['first_piece_p50_s']:.2f} s, p99 {run['first_piece_p99_s']:.2f} s"
                 if args.stream else ""))  # fmt: skip
    print(
        f"{'feedback post':32s} p50 {load['feedback_p50_s'] * 1000:.1f} ms, p99 {load['feedback_p99_s'] * 1000:.1f} ms"
    )
    stored_all = all(run["all_acknowledged_stored"] for run in result["load_by_dtype"].values())
    print(f"{'rows = acknowledged':32s} {load['rows']} / {load['acknowledged_completions']} completions, "
          f"{load['feedback_rows']} / {load['acknowledged_feedback']} feedback: {stored_all}")  # fmt: skip
    lost = lost_feedback = set()
    if not args.no_fault:
        result["fault"], lost, lost_feedback = fault_part(args, out / "fault", dtypes[0])
        fault = result["fault"]
        print(f"{'SIGKILL after ' + str(args.kill_after) + ' s, restart':32s} acknowledged {fault['acknowledged_completions']} "
              f"completions / {fault['acknowledged_feedback']} feedback; lost {fault['lost_completions']} / {fault['lost_feedback']}")  # fmt: skip
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    return 0 if stored_all and not lost and not lost_feedback else 1


def load_part(args: argparse.Namespace, out: Path, dtype: str) -> dict[str, Any]:
    """`--clients` clients against a fresh server for `--seconds`; what they saw and what
    the database holds."""
    port = free_port()
    server = start(args, out, port, dtype)
    try:
        tally, wall = run_load(port, args.seconds, args)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)
    ids, with_feedback = stored(out)
    return {
        "seconds": round(wall, 2), "completions": len(tally.completions),
        "completions_per_s": round(len(tally.completions) / wall, 3),
        "completion_p50_s": round(pct(tally.completion_s, 0.5), 3),
        "completion_p99_s": round(pct(tally.completion_s, 0.99), 3),
        "first_piece_p50_s": round(pct(tally.first_piece_s, 0.5), 3),
        "first_piece_p99_s": round(pct(tally.first_piece_s, 0.99), 3),
        "feedback_p50_s": round(pct(tally.feedback_s, 0.5), 4),
        "feedback_p99_s": round(pct(tally.feedback_s, 0.99), 4),
        "client_errors": tally.errors, "rows": len(ids), "feedback_rows": len(with_feedback),
        "acknowledged_completions": len(tally.completions), "acknowledged_feedback": len(tally.feedback),
        "all_acknowledged_stored": set(tally.completions) <= ids and set(tally.feedback) <= with_feedback,
        "tokens_per_completion": tally.tokens / max(1, len(tally.completions)),
    }  # fmt: skip


def fault_part(args: argparse.Namespace, out: Path, dtype: str) -> tuple[dict[str, Any], set, set]:
    """SIGKILL mid-load, then a restart on the same database: what was acknowledged and lost."""
    port = free_port()
    server = start(args, out, port, dtype)
    tally, _ = run_load(port, 0, args, kill=server, kill_after=args.kill_after)
    server = start(args, out, port, dtype)  # the restart must open the database cleanly
    server.send_signal(signal.SIGTERM)
    server.wait(timeout=120)
    ids, with_feedback = stored(out)
    lost = set(tally.completions) - ids
    lost_feedback = set(tally.feedback) - with_feedback
    fault = {
        "killed_after_s": args.kill_after, "acknowledged_completions": len(tally.completions),
        "acknowledged_feedback": len(tally.feedback), "rows_after_restart": len(ids),
        "feedback_rows_after_restart": len(with_feedback), "lost_completions": len(lost),
        "lost_feedback": len(lost_feedback),
    }  # fmt: skip
    return fault, lost, lost_feedback


if __name__ == "__main__":
    raise SystemExit(main())
