"""Load test of `flashinfer serve`: N concurrent clients x M chat requests each,
through the official `openai` client.

Checks that every request is answered (200, a non-empty reply), that the server
finished them in the order they were queued (its log), and measures the server's
resident memory before and after each of two rounds (flat memory: the second round
ends where the first did), latencies and throughput.

    python benchmarks/server_load.py [--model default] [--clients 8] [--requests 5]
        [--max-tokens 32] [-- extra serve options, e.g. --memory-budget 100%]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prompt_cache import cpu_model  # noqa: E402

QUESTIONS = [
    "What is the capital of France?",
    "Name three colours.",
    "What is 2 + 2?",
    "Say hello in Spanish.",
    "What is the largest planet?",
]


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


def start(model: str | None, extra: list[str]) -> tuple[subprocess.Popen, int, list]:
    argv = [sys.executable, "-m", "mlx_flashinfer", "serve", "--port", "0", *extra]
    if model:
        argv += ["--model", model]
    process = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    line = process.stderr.readline()
    port = int(line.split("http://")[1].split(":")[1].split("/")[0])
    lines = []

    def keep_log():  # the server's log, read as it comes (a full pipe would block it)
        for text in process.stderr:
            lines.append(text.rstrip())

    threading.Thread(target=keep_log, daemon=True).start()
    return process, port, lines


def round_of_load(client, model_id, clients, requests, max_tokens) -> dict:
    results, errors = [], []

    def one_client(i):
        for j in range(requests):
            question = QUESTIONS[(i + j) % len(QUESTIONS)]
            started = time.perf_counter()
            try:
                r = client.chat.completions.create(
                    model=model_id,
                    messages=[{"role": "user", "content": question}],
                    max_tokens=max_tokens,
                )
                results.append(
                    {
                        "client": i,
                        "seconds": time.perf_counter() - started,
                        "request": r.model_extra["flashinfer"]["request"],
                        "queued_s": r.model_extra["flashinfer"]["queued_s"],
                        "tokens": r.usage.completion_tokens,
                        "text": r.choices[0].message.content,
                    }
                )
            except Exception as err:  # noqa: BLE001 - counted and reported
                errors.append(repr(err))

    started = time.perf_counter()
    threads = [threading.Thread(target=one_client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    latencies = sorted(r["seconds"] for r in results)
    return {
        "answered": len(results),
        "errors": errors,
        "empty_replies": sum(not r["text"] for r in results),
        "wall_s": wall,
        "requests_per_s": len(results) / wall,
        "tokens_per_s": sum(r["tokens"] for r in results) / wall,
        "latency_p50_s": statistics.median(latencies),
        "latency_max_s": latencies[-1],
        "max_queued_s": max(r["queued_s"] for r in results),
        "numbers": sorted(r["request"] for r in results),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--out", default="benchmarks/results/server_load_smollm2.json")
    opts, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    process, port, log = start(opts.model, extra)
    try:
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1",
            api_key="none",
            max_retries=0,
            timeout=600,
        )
        model_id = client.models.list().data[0].id
        client.chat.completions.create(  # warm-up: compiled kernels, first buffers
            model=model_id,
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=8,
        )
        rss = [rss_mb(process.pid)]
        rounds = []
        for _ in range(2):
            rounds.append(
                round_of_load(
                    client, model_id, opts.clients, opts.requests, opts.max_tokens
                )
            )
            rss.append(rss_mb(process.pid))
        time.sleep(0.5)
        done = [
            int(m.group(1)) for line in log if (m := re.match(r"request (\d+):", line))
        ]
    finally:
        process.send_signal(2)  # SIGINT: Ctrl-C
        status = process.wait(timeout=60)
    expected = opts.clients * opts.requests
    in_order = done == sorted(done)
    result = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "command": " ".join(["python", *sys.argv]),
        "serve_options": extra,
        "clients": opts.clients,
        "requests_per_client": opts.requests,
        "max_tokens": opts.max_tokens,
        "rounds": rounds,
        "all_answered": all(
            r["answered"] == expected and not r["errors"] for r in rounds
        ),
        "finished_in_queue_order": in_order,
        "rss_mb": {
            "after_warm_up": rss[0],
            "after_round_1": rss[1],
            "after_round_2": rss[2],
        },
        "exit_status_on_sigint": status,
    }
    for r in rounds:
        del r["numbers"]
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    Path(opts.out).write_text(json.dumps(result, indent=2) + "\n")
    for i, r in enumerate(rounds, 1):
        print(
            f"round {i}: {r['answered']}/{expected} answered, {len(r['errors'])} "
            f"errors, {r['requests_per_s']:.2f} req/s, {r['tokens_per_s']:.1f} tok/s, "
            f"latency p50 {r['latency_p50_s']:.2f} s max {r['latency_max_s']:.2f} s"
        )
    print(
        f"finished in queue order: {in_order}; RSS MB: after warm-up {rss[0]:.0f}, "
        f"after round 1 {rss[1]:.0f}, after round 2 {rss[2]:.0f}; exit on SIGINT "
        f"{status}; wrote {opts.out}"
    )


if __name__ == "__main__":
    main()
