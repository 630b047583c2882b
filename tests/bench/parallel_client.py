#!/usr/bin/env python3
"""N answers started together against llama-server (its OpenAI chat endpoint, streamed), the
load `fieldllmd bench --parallel N` puts on fieldllm: the same four questions in turn, greedy,
up to --gen tokens each. Prints one JSON row per level, with the fields fieldllmd's rows have:
aggregate tok/s (every answer's tokens over the wall time from the first request to the last
end), per-answer tok/s (tokens after the first over the time from the first to the end, mean),
time to first token (p50, max) and the longest gap between two tokens of one answer.

    parallel_client.py PORT GEN N [N ...]
"""
import http.client
import json
import sys
import threading
import time

QUESTIONS = [
    "Explain step by step how to find why a hydraulic pump loses pressure.",
    "Describe in detail how to check a three-phase motor that trips its breaker.",
    "List everything a technician should inspect on a compressor before a restart.",
    "Explain in detail what causes bearing noise in a centrifugal fan and how to fix it.",
]


def answer(port, question, gen, t0, out):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    body = json.dumps({
        "messages": [{"role": "user", "content": question}],
        "max_tokens": gen, "temperature": 0, "stream": True,
        # one token per event, as fieldllm's chunks are counted
        "stream_options": {"include_usage": True},
    })
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    first = last = None
    gap = 0.0
    tokens = 0
    usage = None
    for raw in resp:
        line = raw.decode().strip()
        if not line.startswith("data:"):
            continue
        data = line[5:].strip()
        if data == "[DONE]":
            break
        ev = json.loads(data)
        if ev.get("usage"):
            usage = ev["usage"].get("completion_tokens")
        for ch in ev.get("choices", []):
            if ch.get("delta", {}).get("content"):
                now = time.monotonic()
                if first is None:
                    first = now
                if last is not None:
                    gap = max(gap, now - last)
                last = now
                tokens += 1
    end = time.monotonic()
    out.append({"first": first, "end": end, "tokens": usage or tokens, "gap": gap, "t0": t0})


def level(port, n, gen):
    out = []
    t0 = time.monotonic()
    threads = [threading.Thread(target=answer, args=(port, QUESTIONS[i % 4], gen, t0, out))
               for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = max(a["end"] for a in out) - t0
    tokens = sum(a["tokens"] for a in out)
    ttft = sorted((a["first"] - t0) * 1e3 for a in out if a["first"])
    per = [(a["tokens"] - 1) / (a["end"] - a["first"]) for a in out
           if a["first"] and a["tokens"] > 1 and a["end"] > a["first"]]
    # the decode phase, as fieldllmd bench counts it: tokens after each answer's first, from
    # the first answer's first token to the last answer's end
    firsts = [a["first"] for a in out if a["first"]]
    span = max(a["end"] for a in out) - min(firsts) if firsts else 0
    decoded = sum(max(a["tokens"] - 1, 0) for a in out)
    return {
        "answers": n, "tokens": tokens, "wall_s": wall, "aggregate_tok_s": tokens / wall,
        "decode_tok_s": decoded / span if span > 0 else 0,
        "per_answer_tok_s": sum(per) / max(len(per), 1),
        "ttft_p50_ms": ttft[len(ttft) // 2] if ttft else 0, "ttft_max_ms": ttft[-1] if ttft else 0,
        "max_gap_ms": max(a["gap"] for a in out) * 1e3,
    }


def main():
    port, gen = int(sys.argv[1]), int(sys.argv[2])
    level(port, 1, 8)  # warm-up
    for n in map(int, sys.argv[3:]):
        print(json.dumps(level(port, n, gen)), flush=True)


if __name__ == "__main__":
    main()
