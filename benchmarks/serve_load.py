"""kiln serve under load: requests/s and latency with micro-batching, without it, and one at a time.

Reproduce (from the repository root)::

    .venv/bin/python benchmarks/serve_load.py --run runs/sst2          # a trained sequence run

Each mode starts its own ``kiln serve RUN --port 0`` on the loopback interface and sends POST
/predict requests (one text each, from SST-2's ``dev.tsv`` when present, else built-in sentences)
after a short warm-up, until ``--requests`` are answered or ``--seconds`` have passed:

* ``batched``: ``--clients`` concurrent clients (default 32), the server's micro-batching on (its
  default ``--max-wait-ms 5``).
* ``max-wait-0``: the same clients, with ``--max-wait-ms 0``: each request is a batch of its own.
* ``one-at-a-time``: a single client, each request sent when the previous one is answered.

for each back-end of ``--backends``: ``torch-fp32``, ``torch-bf16`` (``--precision bf16``) and
``onnx`` (the ``kiln export`` directory given with ``--export``). The clients are plain asyncio
keep-alive connections (a few lines of HTTP/1.1), so the load generator takes little of the CPU the
server needs.

It prints requests/s, p50 and p99 latency, errors and the mean batch size (from the server's
/metrics), and the ratio of each mode's requests/s to one-at-a-time's. The goal: ``batched`` at 32
clients answers at least 4x the requests/s of one at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

DEFAULT_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "glue" / "SST-2" / "dev.tsv"
GOAL = 4.0  # batched requests/s over one-at-a-time's, at 32 clients
SENTENCES = ["a gripping , funny film", "the plot is dull and the acting clumsy", "every scene is a small wonder",
             "it drags", "a moving portrait of a family , beautifully shot and never sentimental",
             "the cast is charming but the script is tedious"]


def texts_of(path: Path) -> list[str]:
    if not path.is_file():
        return SENTENCES
    lines = path.read_text(encoding="utf-8").splitlines()
    column = lines[0].split("\t").index("sentence")
    return [line.split("\t")[column] for line in lines[1:]]


class Server:
    """``kiln serve`` in a subprocess; its URL comes from the start-up line."""

    def __init__(self, run: str, flags: list[str]):
        command = [sys.executable, "-m", "kiln", "serve", run, "--port", "0", *flags]
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        self.url = ""
        found = threading.Event()

        def read() -> None:
            assert self.process.stderr is not None
            for line in self.process.stderr:
                match = re.search(r"at (http://\S+?)/predict;", line)
                if match and not found.is_set():
                    self.url = match.group(1)
                    found.set()
                elif not found.is_set():
                    print(line, end="", file=sys.stderr)
            found.set()

        threading.Thread(target=read, daemon=True).start()
        found.wait(600)
        if not self.url:
            self.process.kill()
            raise SystemExit(f"kiln serve {run} did not start")

    def mean_batch(self) -> float:
        import httpx

        text = httpx.get(f"{self.url}/metrics").text
        total = float(re.search(r"^kiln_batch_requests_sum (\S+)$", text, re.MULTILINE).group(1))
        count = float(re.search(r"^kiln_batch_requests_count (\S+)$", text, re.MULTILINE).group(1))
        return total / max(count, 1)

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait(60)


class Connection:
    """One keep-alive HTTP/1.1 connection speaking just enough of the protocol to POST /predict: a
    load generator that costs little CPU, so the 2 cores go to the server (httpx spent about as much
    CPU per request as the server's own request handling)."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str):
        self.reader, self.writer, self.host = reader, writer, host

    @classmethod
    async def open(cls, url: str) -> Connection:
        host, port = url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        return cls(reader, writer, f"{host}:{port}")

    async def post(self, path: str, body: bytes) -> tuple[int, bytes]:
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.host}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        self.writer.write(head + body)
        status_line = await self.reader.readline()
        length = 0
        while (line := await self.reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            if name.lower() == "content-length":
                length = int(value)
        return int(status_line.split()[1]), await self.reader.readexactly(length)

    def close(self) -> None:
        self.writer.close()


async def load(url: str, texts: list[str], clients: int, requests: int, seconds: float) -> dict:
    """``clients`` concurrent keep-alive connections, each sending its next request when the last is
    answered."""
    latencies: list[float] = []
    errors = 0
    sent = 0
    deadline = time.perf_counter() + seconds
    bodies = [json.dumps({"inputs": [text]}).encode() for text in texts]

    async def client(connection: Connection) -> None:
        nonlocal errors, sent
        while sent < requests and time.perf_counter() < deadline:
            body = bodies[sent % len(bodies)]
            sent += 1
            started = time.perf_counter()
            try:
                status, _ = await connection.post("/predict", body)
                ok = status == 200
            except (OSError, asyncio.IncompleteReadError, ValueError, IndexError):
                ok = False
                connection.close()
                connection = await Connection.open(url)
            latencies.append(time.perf_counter() - started)
            errors += not ok

    connections = [await Connection.open(url) for _ in range(clients)]
    for body in bodies[:8]:  # warm-up: thread pools, first-call allocations
        await connections[0].post("/predict", body)
    started = time.perf_counter()
    await asyncio.gather(*(client(connection) for connection in connections))
    elapsed = time.perf_counter() - started
    for connection in connections:
        connection.close()
    latencies.sort()

    def percentile(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000

    return {"requests": len(latencies), "seconds": elapsed, "requests_per_s": len(latencies) / elapsed,
            "p50_ms": percentile(0.5), "p99_ms": percentile(0.99), "errors": errors}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", required=True, help="a trained kiln run (runs/NAME)")
    parser.add_argument("--export", default=None, help="an ONNX export of it (kiln export), served as a back-end too")
    parser.add_argument("--backends", default="torch-fp32",
                        help="comma-separated: torch-fp32, torch-bf16, onnx (needs --export); default torch-fp32")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="a TSV with a 'sentence' column")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients (batched and max-wait-0)")
    parser.add_argument("--requests", type=int, default=2000, help="requests per mode, at most")
    parser.add_argument("--seconds", type=float, default=60, help="seconds per mode, at most")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args(argv)
    texts = texts_of(args.data)
    modes = {"batched": ([], args.clients), "max-wait-0": (["--max-wait-ms", "0"], args.clients),
             "one-at-a-time": (["--max-wait-ms", "0"], 1)}
    backends = {"torch-fp32": (args.run, ["--precision", "fp32"]), "torch-bf16": (args.run, ["--precision", "bf16"]),
                "onnx": (args.export, [])}
    results: dict[str, dict] = {}
    for backend in args.backends.split(","):
        source, flags = backends[backend]
        if source is None:
            raise SystemExit(f"{backend}: give --export DIR (kiln export)")
        for name, (mode_flags, clients) in modes.items():
            server = Server(source, [*flags, *mode_flags])
            try:
                result = asyncio.run(load(server.url, texts, clients, args.requests, args.seconds))
                result.update(clients=clients, mean_batch=server.mean_batch(), backend=backend, mode=name)
                results[f"{backend} {name}"] = result
            finally:
                server.stop()
    print(f"{'back-end':<11} {'mode':<14} {'clients':>7} {'requests':>8} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
          f"{'errors':>6} {'batch':>6} {'vs one':>7}")
    for backend in args.backends.split(","):
        baseline = results[f"{backend} one-at-a-time"]["requests_per_s"]
        for name in modes:
            result = results[f"{backend} {name}"]
            result["ratio"] = result["requests_per_s"] / baseline
            print(f"{backend:<11} {name:<14} {result['clients']:>7} {result['requests']:>8} "
                  f"{result['requests_per_s']:>8.1f} {result['p50_ms']:>8.1f} {result['p99_ms']:>8.1f} "
                  f"{result['errors']:>6} {result['mean_batch']:>6.1f} {result['ratio']:>6.2f}x")
        ratio = results[f"{backend} batched"]["ratio"]
        print(f"  {backend}: batched >= {GOAL:.0f}x one-at-a-time at {args.clients} clients: {ratio:.2f}x, "
              f"{'met' if ratio >= GOAL else 'not met'}")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
