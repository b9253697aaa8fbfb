"""Loopback load test of ``genret serve``: throughput and latency at several client counts, every answer checked.

    python scripts/load_test.py PIPELINE_DIR [--clients 1,4,16,64] [--requests 128] [--k 5] [--max-batch 16]
        [--max-wait-ms 5] [--json]

Starts ``genret serve PIPELINE_DIR`` as its own process on a free loopback port, takes text queries from the
pipeline's caption gallery (spread over it: different images), and first asks each one alone (one client, one at
a time): those answers are the reference. Then for each client count, that many threads send the same queries (``--requests`` in all, each
client its share) and every answer is compared with its reference (the same ids in the same order, scores within
1e-4: nothing lost, nothing mixed between requests). Prints per client count: requests/s, p50/p95 latency, the mean
batch size the server reports, mismatches, errors, and the server's resident memory after the run.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _post(url: str, body: dict, timeout: float = 300) -> tuple[int, dict, float]:
    data = json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read()), time.perf_counter() - start
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}"), time.perf_counter() - start


def _same(a: dict, b: dict) -> bool:
    ra, rb = a["results"], b["results"]
    return [r["id"] for r in ra] == [r["id"] for r in rb] and all(
        abs(x["scores"][s] - y["scores"][s]) <= 1e-4 for x, y in zip(ra, rb) for s in x["scores"])


def _difference(text: str, got: dict, want: dict) -> dict:
    """What differs between an answer and its reference: ids, and the largest score gap between same-rank hits."""
    gap = max((abs(x["scores"][s] - y["scores"].get(s, float("inf"))) for x, y in zip(got["results"], want["results"])
               for s in x["scores"]), default=0.0)
    return {"query": text, "got": [r["id"] for r in got["results"]], "want": [r["id"] for r in want["results"]],
            "max_score_gap": gap}


def run_level(url: str, queries: list[str], clients: int, requests: int, k: int, reference: dict) -> dict:
    jobs = [queries[i % len(queries)] for i in range(requests)]
    latencies, batches, errors, mismatches = [], [], [], []
    lock = threading.Lock()

    def client(share: list[str]) -> None:
        for text in share:
            status, body, seconds = _post(url, {"text": text, "k": k})
            with lock:
                latencies.append(seconds)
                if status != 200:
                    errors.append(status)
                else:
                    batches.append(body.get("batch_size", 1))
                    if not _same(body, reference[text]):
                        mismatches.append(_difference(text, body, reference[text]))

    threads = [threading.Thread(target=client, args=(jobs[c::clients],)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    latencies.sort()
    return {"clients": clients, "requests": requests, "seconds": round(wall, 2),
            "requests_per_s": round(requests / wall, 2),
            "p50_ms": round(1000 * statistics.median(latencies), 1),
            "p95_ms": round(1000 * latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], 1),
            "mean_batch": round(statistics.mean(batches), 2) if batches else None,
            "mismatches": len(mismatches), "errors": len(errors), "mismatched": mismatches[:5]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pipeline")
    ap.add_argument("--clients", default="1,4,16,64")
    ap.add_argument("--requests", type=int, default=128)
    ap.add_argument("--k", type=int, default=5)
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--max-wait-ms", type=float, default=5.0)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([sys.executable, "-m", "genret.cli", "-q", "serve", args.pipeline, "--port", str(port),
                               "--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms),
                               "--max-queue", "1024", "--timeout-s", "600"])
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(1200):
            try:
                urllib.request.urlopen(base + "/health", timeout=1)
                break
            except OSError:
                if server.poll() is not None:
                    sys.exit("genret serve exited")
                time.sleep(0.1)
        from genret.index.gallery import Gallery  # the gallery's captions are the queries (no model loaded)

        texts = [it.text for it in Gallery.load(Path(args.pipeline) / "gallery", root=Path(args.pipeline)).items["text"].values()]
        # Spread over the caption gallery (one caption in every len/requests): queries about different images, as
        # many users' are, not the first captions of a handful of images (whose candidates would overlap).
        queries = texts[:: max(1, len(texts) // args.requests)][: args.requests]
        url = base + "/v1/search"
        reference = {}
        for text in queries:  # each alone: the reference answers
            status, body, _ = _post(url, {"text": text, "k": args.k})
            if status != 200:
                sys.exit(f"reference query failed: HTTP {status} {body}")
            reference[text] = body
        rows, rss = [], [round(_rss_mb(server.pid), 1)]
        for clients in [int(c) for c in args.clients.split(",")]:
            rows.append(run_level(url, queries, clients, args.requests, args.k, reference))
            rss.append(round(_rss_mb(server.pid), 1))
            rows[-1]["server_rss_mb"] = rss[-1]
    finally:
        server.terminate()
        server.wait(timeout=30)
    if args.json:
        print(json.dumps({"rows": rows, "rss_after_reference_mb": rss[0]}, indent=2))
        return
    print(f"server RSS after the reference pass: {rss[0]} MB")
    print("| clients | requests | req/s | p50 ms | p95 ms | mean batch | mismatches | errors | server RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['clients']} | {r['requests']} | {r['requests_per_s']} | {r['p50_ms']} | {r['p95_ms']} | "
              f"{r['mean_batch']} | {r['mismatches']} | {r['errors']} | {r['server_rss_mb']} |")
    first = rows[0]["requests_per_s"]
    print("throughput vs 1 client: " + ", ".join(f"{r['clients']}: {r['requests_per_s'] / first:.2f}x" for r in rows))
    for r in rows:
        for m in r["mismatched"]:
            print(f"mismatch at {r['clients']} clients: {m['query']!r}: got {m['got']}, alone {m['want']} "
                  f"(largest score gap {m['max_score_gap']:.2e})")


if __name__ == "__main__":
    main()
