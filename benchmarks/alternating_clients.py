"""Time to first token of a chat's second turn when two clients take turns.

Two conversations, A and B, each open with a different passage of text (a few
hundred tokens) and a question, and go on with a follow-up: A turn 1, B turn 1,
A turn 2, B turn 2, through `flashinfer serve` and the official `openai` client,
streamed. A server that keeps one prompt cache lets B's first turn evict A's
history, so A's second turn computes its whole conversation again; one that keeps
a cache per conversation (--prompt-cache-size, default 10) computes only the new
tokens. Each configuration is a server of its own, started afresh for each repeat,
the configurations taking turns so that a busy machine weighs on each alike.

    python benchmarks/alternating_clients.py --before DIR [--repeats 3]
        [--model default] [--words 300] [--reply-tokens 48] [--out FILE]

--before names a source tree of the code to compare with (the folder holding its
`mlx_flashinfer`, e.g. `git archive 6fcac12 mlx_flashinfer | tar -x -C DIR`);
the server runs from it with PYTHONPATH. Without it only this checkout runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai

sys.path.insert(0, str(Path(__file__).resolve().parent))
from prompt_cache import QUESTIONS, cpu_model, passage  # noqa: E402

HERE = Path(__file__).resolve().parents[1]  # this checkout
TURNS = ("A1", "B1", "A2", "B2")


def start(code: Path, model: str | None, options: list[str]):
    """A server running the `mlx_flashinfer` of `code` (the working directory and
    PYTHONPATH: an editable install of another tree must not win)."""
    argv = [sys.executable, "-m", "mlx_flashinfer", "serve", "--port", "0", *options]
    if model:
        argv += ["--model", model]
    env = os.environ | {"PYTHONPATH": str(code)}
    process = subprocess.Popen(
        argv, stderr=subprocess.PIPE, text=True, cwd=code, env=env
    )
    line = process.stderr.readline()
    if "http://" not in line:
        process.kill()
        raise RuntimeError(f"the server did not start: {line}")
    port = int(line.split("http://")[1].split(":")[1].split("/")[0])
    log = [line.rstrip()]
    threading.Thread(  # a full pipe would block the server
        target=lambda: log.extend(text.rstrip() for text in process.stderr),
        daemon=True,
    ).start()
    return process, port, log


def ask(client, model_id: str, messages: list, max_tokens: int) -> dict:
    """One streamed turn: seconds to the first token, the reply, the usage."""
    started = time.perf_counter()
    first, text, usage = None, "", None
    for chunk in client.chat.completions.create(
        model=model_id,
        messages=messages,
        max_tokens=max_tokens,
        stream=True,
        stream_options={"include_usage": True},
    ):
        if chunk.usage is not None:
            usage = chunk.usage
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        if first is None and (choice.delta.content or choice.finish_reason):
            first = time.perf_counter() - started
        text += choice.delta.content or ""
    return {
        "ttft_s": first,
        "text": text,
        "prompt_tokens": usage.prompt_tokens,
        "cached_tokens": usage.prompt_tokens_details.cached_tokens,
    }


def one_run(code: Path, model, options, texts, reply_tokens) -> dict:
    process, port, log = start(code, model, options)
    try:
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1",
            api_key="none",
            max_retries=0,
            timeout=600,
        )
        model_id = client.models.list().data[0].id
        ask(client, model_id, [{"role": "user", "content": "Hi"}], 4)  # warm-up
        conversations = {
            name: [{"role": "user", "content": f"{text}\n\n{QUESTIONS[0]}"}]
            for name, text in zip("AB", texts, strict=True)
        }
        turns = {}
        for turn in TURNS:
            name = turn[0]
            messages = conversations[name]
            if turn[1] == "2":
                messages = [*messages, {"role": "user", "content": QUESTIONS[1]}]
            turns[turn] = ask(client, model_id, messages, reply_tokens)
            reply = {"role": "assistant", "content": turns[turn]["text"]}
            conversations[name] = [*messages, reply]
    finally:
        process.send_signal(2)  # SIGINT: Ctrl-C
        process.wait(timeout=60)
    for t in turns.values():
        del t["text"]
    return turns


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, default=None)
    parser.add_argument("--model", default=None, help="default: the embedded model")
    parser.add_argument("--words", type=int, default=300, help="passage length")
    parser.add_argument("--reply-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--out", default="benchmarks/results/alternating_clients_smollm2.json"
    )
    opts = parser.parse_args()
    words = passage(2 * opts.words).split()
    texts = [" ".join(words[: opts.words]), " ".join(words[opts.words :])]
    configs = {"after: a cache per conversation (default 10)": (HERE, [])}
    configs["after, --prompt-cache-size 1"] = (HERE, ["--prompt-cache-size", "1"])
    if opts.before is not None:
        configs = {"before: one cache": (opts.before.resolve(), [])} | configs
    load = {"before": os.getloadavg()}
    runs = {name: [] for name in configs}
    for r in range(opts.repeats):
        order = list(configs) if r % 2 == 0 else list(reversed(configs))
        for name in order:
            code, options = configs[name]
            turns = one_run(code, opts.model, options, texts, opts.reply_tokens)
            runs[name].append(turns)
            print(
                f"repeat {r + 1} {name}: "
                + ", ".join(
                    f"{t} {v['ttft_s']:.2f} s ({v['cached_tokens']}/"
                    f"{v['prompt_tokens']} cached)"
                    for t, v in turns.items()
                ),
                flush=True,
            )
    load["after"] = os.getloadavg()
    summary = {
        name: {
            turn: {
                "ttft_s_median": statistics.median(r[turn]["ttft_s"] for r in rs),
                "cached_tokens": [r[turn]["cached_tokens"] for r in rs],
                "prompt_tokens": rs[0][turn]["prompt_tokens"],
            }
            for turn in TURNS
        }
        for name, rs in runs.items()
    }
    result = {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "platform": platform.platform(),
        "load_average_1_5_15": load,
        "command": " ".join(["python", *sys.argv]),
        "words": opts.words,
        "reply_tokens": opts.reply_tokens,
        "repeats": opts.repeats,
        "summary": summary,
        "runs": runs,
    }
    out = Path(opts.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    out.with_suffix(".md").write_text(table(result))
    print(f"\n{table(result)}\nwrote {out} and {out.with_suffix('.md')}")


def table(result: dict) -> str:
    """The summary as a Markdown table, with the machine and its load."""
    load = result["load_average_1_5_15"]
    lines = [
        f"`{result['command']}`",
        "",
        f"{result['cpu']}, {result['cores']} cores; load average (1, 5, 15 min) "
        f"{', '.join(f'{x:.1f}' for x in load['before'])} before, "
        f"{', '.join(f'{x:.1f}' for x in load['after'])} after. Median time to "
        f"first token of {result['repeats']} runs (streamed); cached / prompt "
        "tokens (the fewest cached of the runs).",
        "",
        "| server | " + " | ".join(TURNS) + " |",
        "|---|" + "---:|" * len(TURNS),
    ]
    for name, turns in result["summary"].items():
        cells = [
            f"{v['ttft_s_median']:.2f} s, {min(v['cached_tokens'])} / "
            f"{v['prompt_tokens']}"
            for v in turns.values()
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
