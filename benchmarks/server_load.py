"""`sd serve` under a burst of clients: N concurrent txt2img requests at the built-in model, all at once.

    python benchmarks/server_load.py                    # 64 clients, 4 steps, 64x64 (the built-in's size)
    python benchmarks/server_load.py --clients 128 --steps 8

Starts `sd serve --port 0` (the built-in shapes model: no checkpoint is looked for, SD_HOME is a temporary
folder) on 127.0.0.1, opens every connection first, then releases all requests together, and prints how
many were answered, how many with 200, with an error status, and how many connections were reset or
refused (the stdlib server this replaced lost 3 of 64), with latency percentiles. Only 127.0.0.1 is used.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path


def start_server(home: str) -> tuple[subprocess.Popen, int, list[str]]:
    env = {k: v for k, v in os.environ.items() if k != "SD_CHECKPOINT"} | {"SD_HOME": home}
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    process = subprocess.Popen([sys.executable, "-m", "sd", "serve", "--port", "0"], env=env,
                               stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)  # fmt: skip
    lines: list[str] = []
    found: list[int] = []
    ready = threading.Event()

    def read() -> None:
        for line in process.stderr:
            lines.append(line)
            match = re.search(r"serving at http://127\.0\.0\.1:(\d+)/", line)
            if match:
                found.append(int(match.group(1)))
                ready.set()
        ready.set()

    threading.Thread(target=read, daemon=True).start()
    if not ready.wait(180) or not found:
        process.kill()
        raise SystemExit("sd serve did not start:\n" + "".join(lines))
    return process, found[0], lines


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--timeout", type=float, default=600, help="per request, seconds")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as home:
        process, port, _ = start_server(home)
        try:
            results: list[tuple[str, float]] = [("", 0.0)] * args.clients
            go = threading.Barrier(args.clients + 1)

            def client(i: int) -> None:
                fields = {"prompt": "a red circle", "seed": i, "steps": args.steps, "sampler_name": "Euler a"}
                body = json.dumps({**fields, "width": args.size, "height": args.size})
                connection = http.client.HTTPConnection("127.0.0.1", port, timeout=args.timeout)
                try:
                    connection.connect()
                    go.wait()
                    started = time.monotonic()
                    connection.request(
                        "POST", "/sdapi/v1/txt2img", body, {"Content-Type": "application/json"}
                    )
                    answer = connection.getresponse()
                    data = answer.read()
                    ok = answer.status == 200 and len(json.loads(data)["images"]) == 1
                    results[i] = ("ok" if ok else f"status {answer.status}", time.monotonic() - started)
                except (ConnectionResetError, BrokenPipeError, ConnectionRefusedError) as error:
                    results[i] = (f"reset: {type(error).__name__}", 0.0)
                except (OSError, http.client.HTTPException, ValueError) as error:
                    results[i] = (f"error: {type(error).__name__}: {error}", 0.0)
                finally:
                    connection.close()

            threads = [threading.Thread(target=client, args=(i,)) for i in range(args.clients)]
            for thread in threads:
                thread.start()
            go.wait()
            wall = time.monotonic()
            for thread in threads:
                thread.join()
            wall = time.monotonic() - wall
        finally:
            process.terminate()
            process.wait(30)
    outcomes = [r for r, _ in results]
    latencies = sorted(t for r, t in results if r == "ok")
    answered = sum(1 for r in outcomes if r == "ok" or r.startswith("status"))
    resets = sum(1 for r in outcomes if r.startswith("reset"))
    others = sorted({r for r in outcomes if r != "ok"})
    print(f"sd serve, built-in model, {args.clients} concurrent txt2img ({args.steps} steps, "
          f"{args.size}x{args.size}, Euler a), {os.cpu_count()} CPUs")  # fmt: skip
    print(f"answered {answered}/{args.clients}, ok {outcomes.count('ok')}, error status "
          f"{sum(1 for r in outcomes if r.startswith('status'))}, reset {resets}, "
          f"other failures {args.clients - answered - resets}")  # fmt: skip
    if others:
        print("not ok:", "; ".join(others))
    if latencies:
        q = (
            statistics.quantiles(latencies, n=100, method="inclusive")
            if len(latencies) > 1
            else latencies * 99
        )
        rate = len(latencies) / wall
        print(f"latency s: min {latencies[0]:.2f}, p50 {q[49]:.2f}, p90 {q[89]:.2f}, p99 {q[98]:.2f}, "
              f"max {latencies[-1]:.2f}; wall {wall:.2f} s, {rate:.1f} images/s")  # fmt: skip
    return 0 if outcomes.count("ok") == args.clients else 1


if __name__ == "__main__":
    raise SystemExit(main())
