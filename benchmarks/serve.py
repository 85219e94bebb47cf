"""Benchmark `melanoma serve`: latency and throughput of /v1/predict against a naive endpoint.

In one run, on loopback, posting real HAM10000 JPEGs (one image per request):

- served: `melanoma serve` (real server process): the model loaded once, predictions of
  concurrent requests stacked into one model call by the micro-batcher;
- lock: the same Predictor called once per request in the threadpool (its lock
  serialises the model calls; no batching): what batching adds over a plain lock;
- naive: ``model.predict`` per request, as most examples do (same model, same
  preprocessing), the baseline.

Each with 1 and 8 concurrent clients, bounded by a request count and a time cap, in
interleaved rounds so that a change in the machine's load hits all endpoints alike. The
load generator runs on the same machine, so it competes with the servers for the CPU.
Targets (small CNN at 128 px, 2 cores): p50 < 20 ms with one client; served >= 3x naive
throughput with 8 clients.

With ``--mixed SECONDS``, instead: a mixed load on `melanoma serve` for that long, 8
clients predicting while 8 ask for LIME explanations and one polls /healthz: p50/p99 of
/v1/predict and /healthz, the count of each status (503 busy, 504 deadline, never 500),
and the server's peak RSS. Targets: /healthz p99 < 50 ms and /v1/predict p99 < 1 s while
explanations are saturated; zero 500s; RSS bounded.

    .venv/bin/python benchmarks/serve.py --run models/RUN [--requests 400] [--time-limit 30] [--rounds 4]
    .venv/bin/python benchmarks/serve.py --run models/RUN --mixed 60 [--lime-samples 1000]
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
from fastapi import FastAPI, UploadFile
from rich.console import Console
from rich.table import Table

REPO = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = REPO.parent / "shared" / "data" / "ham10000" / "HAM10000_images_part_1"


# --------------------------------------------------------------------------- the baselines' app
def baseline_app(run_dir: Path) -> FastAPI:
    """/naive: ``model.predict`` per request; /lock: ``Predictor.predict_arrays`` per request."""
    from melanoma.data.preprocess import load_image
    from melanoma.modeling.predict import Predictor

    predictor = Predictor.from_run(run_dir)
    model = predictor.model
    app = FastAPI()

    @app.post("/naive")
    def naive(files: list[UploadFile]) -> dict:
        image = load_image(files[0].file.read(), predictor.params)
        probabilities = model.predict(image[None].astype(np.float32), verbose=0)[0]
        return {"top_class": predictor.classes[int(np.argmax(probabilities))]}

    @app.post("/lock")
    def lock(files: list[UploadFile]) -> dict:
        image = load_image(files[0].file.read(), predictor.params)
        probabilities = predictor.predict_arrays(image[None])[0]
        return {"top_class": predictor.classes[int(np.argmax(probabilities))]}

    return app


# --------------------------------------------------------------------------- servers
def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start(command: list[str], ready_url: str, timeout: float = 300) -> subprocess.Popen:
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"{' '.join(command)} exited with code {process.returncode}")
        try:
            httpx.get(ready_url, timeout=2).raise_for_status()
            return process
        except httpx.HTTPError:
            time.sleep(0.5)
    process.kill()
    raise SystemExit(f"{' '.join(command)} was not ready after {timeout:.0f} s")


def stop(process: subprocess.Popen) -> None:
    process.send_signal(signal.SIGINT)
    process.wait(60)


# --------------------------------------------------------------------------- load
def load(url: str, images: list[bytes], *, clients: int, requests: int,
         time_limit: float) -> tuple[list[float], float, int]:
    """``requests`` posts shared by ``clients`` threads, stopping at ``time_limit`` s.
    Returns the latencies (s), the wall time (s) and the number of non-200 answers."""
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()
    counter = iter(range(requests))
    deadline = time.monotonic() + time_limit

    def client() -> None:
        nonlocal errors
        with httpx.Client(timeout=60) as http:
            while time.monotonic() < deadline:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                start = time.perf_counter()
                response = http.post(url, files=[("files", (f"{i}.jpg", images[i % len(images)], "image/jpeg"))])
                elapsed = time.perf_counter() - start
                with lock:
                    latencies.append(elapsed)
                    errors += response.status_code != 200

    began = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, time.perf_counter() - began, errors


def peak_rss_mb(pid: int) -> float:
    """The process's peak resident set size so far (Linux: VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def mixed_load(base_url: str, images: list[bytes], *, seconds: float, lime_samples: int,
               predictors: int = 8, explainers: int = 8) -> tuple[dict[str, list[float]], dict[str, Counter]]:
    """Clients posting predictions, clients asking for LIME and one polling /healthz, each
    in a loop until ``seconds`` have passed. Latencies (s) and status counts by endpoint."""
    latencies: dict[str, list[float]] = {"predict": [], "healthz": [], "explain": []}
    statuses: dict[str, Counter] = {name: Counter() for name in latencies}
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def loop(name: str, call) -> None:
        with httpx.Client(timeout=120) as http:
            i = 0
            while time.monotonic() < deadline:
                start = time.perf_counter()
                response = call(http, images[i % len(images)], i)
                with lock:
                    latencies[name].append(time.perf_counter() - start)
                    statuses[name][response.status_code] += 1
                if response.status_code == 503:  # as a client should: wait as told
                    time.sleep(float(response.headers.get("retry-after", 1)))
                i += 1

    def predict(http: httpx.Client, image: bytes, i: int) -> httpx.Response:
        return http.post(f"{base_url}/v1/predict", files=[("files", (f"{i}.jpg", image, "image/jpeg"))])

    def explain(http: httpx.Client, image: bytes, i: int) -> httpx.Response:
        return http.post(f"{base_url}/v1/explain", files=[("file", (f"{i}.jpg", image, "image/jpeg"))],
                         data={"method": "lime", "samples": str(lime_samples)})

    def healthz(http: httpx.Client, image: bytes, i: int) -> httpx.Response:
        time.sleep(0.05)  # a prober, not a load
        return http.get(f"{base_url}/healthz")

    threads = ([threading.Thread(target=loop, args=("predict", predict)) for _ in range(predictors)]
               + [threading.Thread(target=loop, args=("explain", explain)) for _ in range(explainers)]
               + [threading.Thread(target=loop, args=("healthz", healthz))])
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, statuses


def report_mixed(console: Console, args: argparse.Namespace, images: list[bytes]) -> None:
    port = free_port()
    process = start([sys.executable, "-m", "melanoma", "serve", "--run", str(args.run), "--port", str(port)],
                    f"http://127.0.0.1:{port}/readyz")
    try:
        with console.status(f"Mixed load for {args.mixed:g} s ..."):
            latencies, statuses = mixed_load(f"http://127.0.0.1:{port}", images, seconds=args.mixed,
                                             lime_samples=args.lime_samples)
        rss = peak_rss_mb(process.pid)
    finally:
        stop(process)
    table = Table(title=f"Mixed load, {args.mixed:g} s: 8 clients predicting, 8 asking for LIME "
                        f"({args.lime_samples} samples), 1 polling /healthz; {os.cpu_count()} CPUs, load average "
                        f"{os.getloadavg()[0]:.1f} at the end; {args.run}")
    for column in ("endpoint", "requests", "p50 ms", "p99 ms", "200", "503", "504", "other"):
        table.add_column(column, justify="left" if column == "endpoint" else "right")
    for name, route in (("predict", "/v1/predict"), ("healthz", "/healthz"), ("explain", "/v1/explain (LIME)")):
        ms = np.array(latencies[name]) * 1000
        p50, p99 = np.percentile(ms, [50, 99]) if len(ms) else (float("nan"),) * 2
        counts = statuses[name]
        other = sum(n for code, n in counts.items() if code not in (200, 503, 504))
        table.add_row(route, str(len(ms)), f"{p50:.1f}", f"{p99:.1f}", str(counts[200]), str(counts[503]),
                      str(counts[504]), str(other))
    console.print(table)
    errors = sum(counts[500] for counts in statuses.values())
    console.print(f"Server peak RSS {rss:.0f} MB; 500s: {errors}. Statuses: "
                  + "; ".join(f"{name} {dict(sorted(counts.items()))}" for name, counts in statuses.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--run", type=Path, required=True, help="Run folder to serve (e.g. the small CNN at 128 px).")
    parser.add_argument("--images", type=Path, default=DEFAULT_IMAGES, help="Folder of JPEGs to post.")
    parser.add_argument("--requests", type=int, default=400, help="Requests per endpoint and client count, at most.")
    parser.add_argument("--time-limit", type=float, default=30, help="Seconds per endpoint and client count, at most.")
    parser.add_argument("--rounds", type=int, default=4, help="Interleaved rounds (evens out a busy machine).")
    parser.add_argument("--mixed", type=float, metavar="SECONDS",
                        help="Instead: mixed prediction + LIME load on `melanoma serve` for this long.")
    parser.add_argument("--lime-samples", type=int, default=1000, help="LIME samples per explanation (--mixed).")
    parser.add_argument("--serve-baselines", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.serve_baselines:  # the child process that serves /naive and /lock
        import uvicorn

        uvicorn.run(baseline_app(args.run), host="127.0.0.1", port=args.serve_baselines, log_level="warning")
        return

    console = Console(width=120)
    images = [p.read_bytes() for p in sorted(args.images.glob("*.jpg"))[:50]]
    if not images:
        raise SystemExit(f"No JPEG in {args.images}")
    if args.mixed:
        report_mixed(console, args, images)
        return
    served_port, baseline_port = free_port(), free_port()
    with console.status("Starting the servers ..."):
        processes = [
            start([sys.executable, "-m", "melanoma", "serve", "--run", str(args.run), "--port", str(served_port)],
                  f"http://127.0.0.1:{served_port}/readyz"),
            start([sys.executable, __file__, "--run", str(args.run), "--serve-baselines", str(baseline_port)],
                  f"http://127.0.0.1:{baseline_port}/docs"),
        ]
    urls = {
        "served": f"http://127.0.0.1:{served_port}/v1/predict",
        "lock": f"http://127.0.0.1:{baseline_port}/lock",
        "naive": f"http://127.0.0.1:{baseline_port}/naive",
    }
    cells = [(name, clients) for name in urls for clients in (1, 8)]
    latencies: dict[tuple[str, int], list[float]] = {cell: [] for cell in cells}
    wall = dict.fromkeys(cells, 0.0)
    errors = dict.fromkeys(cells, 0)
    try:
        for name, clients in cells:  # warm-up
            load(urls[name], images, clients=clients, requests=2 * clients, time_limit=30)
        for round_number in range(args.rounds):
            for name, clients in cells:
                with console.status(f"round {round_number + 1}/{args.rounds}: {name}, {clients} client(s) ..."):
                    times, seconds, failed = load(urls[name], images, clients=clients,
                                                  requests=args.requests // args.rounds,
                                                  time_limit=args.time_limit / args.rounds)
                latencies[name, clients] += times
                wall[name, clients] += seconds
                errors[name, clients] += failed
    finally:
        for process in processes:
            stop(process)

    rps = {cell: len(latencies[cell]) / wall[cell] for cell in cells}
    table = Table(title=f"POST one 200x150 JPEG per request; {os.cpu_count()} CPUs, load average "
                        f"{os.getloadavg()[0]:.1f} at the end; {args.run}")
    for column in ("endpoint", "clients", "requests", "errors", "p50 ms", "p95 ms", "p99 ms", "req/s", "x naive"):
        table.add_column(column, justify="left" if column == "endpoint" else "right")
    for name, clients in cells:
        ms = np.array(latencies[name, clients]) * 1000
        p50, p95, p99 = np.percentile(ms, [50, 95, 99])
        table.add_row(name, str(clients), str(len(ms)), str(errors[name, clients]), f"{p50:.1f}", f"{p95:.1f}",
                      f"{p99:.1f}", f"{rps[name, clients]:.1f}", f"{rps[name, clients] / rps['naive', clients]:.1f}")
    console.print(table)
    console.print("served: `melanoma serve` /v1/predict (micro-batched); lock: Predictor.predict_arrays per request "
                  "(its lock, no batching); naive: model.predict per request.")
    p50 = float(np.percentile(latencies["served", 1], 50)) * 1000
    speedup = rps["served", 8] / rps["naive", 8]
    console.print(f"Targets: p50 < 20 ms with 1 client: {p50:.1f} ms ({'met' if p50 < 20 else 'NOT met'}); "
                  f">= 3x naive with 8 clients: {speedup:.1f}x ({'met' if speedup >= 3 else 'NOT met'}).")


if __name__ == "__main__":
    main()
