"""Counters and histograms for ``GET /metrics``, in the Prometheus text format (version 0.0.4).

Written by hand: a few dozen lines, where ``prometheus_client`` would be one more dependency. All
updates happen on the event loop thread, so plain ints need no lock.
"""

from __future__ import annotations

import bisect
from collections import defaultdict

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Seconds: from a sub-millisecond queue wait to a long generation.
TIME_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(pairs: tuple[tuple[str, str], ...]) -> str:
    return "{" + ",".join(f'{name}="{_escape(value)}"' for name, value in pairs) + "}" if pairs else ""


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


class Histogram:
    """Cumulative buckets, a sum and a count per label set."""

    def __init__(self, name: str, doc: str, buckets: tuple[float, ...]):
        self.name, self.doc, self.buckets = name, doc, buckets
        self.series: dict[tuple[tuple[str, str], ...], list] = {}

    def observe(self, value: float, **labels: str) -> None:
        """Record one observation."""
        key = tuple(sorted(labels.items()))
        counts, totals = self.series.setdefault(key, [[0] * len(self.buckets), [0.0, 0]])
        index = bisect.bisect_left(self.buckets, value)  # the first bucket with value <= le
        if index < len(counts):
            counts[index] += 1
        totals[0] += value
        totals[1] += 1

    def lines(self) -> list[str]:
        """The exposition lines (HELP, TYPE, buckets, sum, count)."""
        out = [f"# HELP {self.name} {self.doc}", f"# TYPE {self.name} histogram"]
        for key, (counts, (total, count)) in sorted(self.series.items()):
            cumulative = 0
            for bound, n in zip(self.buckets, counts, strict=True):
                cumulative += n
                out.append(f"{self.name}_bucket{_labels((*key, ('le', _number(bound))))} {cumulative}")
            out.append(f"{self.name}_bucket{_labels((*key, ('le', '+Inf')))} {count}")
            out.append(f"{self.name}_sum{_labels(key)} {_number(total)}")
            out.append(f"{self.name}_count{_labels(key)} {count}")
        return out


class Counter:
    """A monotonically increasing count per label set."""

    def __init__(self, name: str, doc: str):
        self.name, self.doc = name, doc
        self.series: dict[tuple[tuple[str, str], ...], float] = defaultdict(float)

    def inc(self, amount: float = 1, **labels: str) -> None:
        """Add ``amount``."""
        self.series[tuple(sorted(labels.items()))] += amount

    def lines(self) -> list[str]:
        """The exposition lines."""
        out = [f"# HELP {self.name} {self.doc}", f"# TYPE {self.name} counter"]
        out += [f"{self.name}{_labels(key)} {_number(value)}" for key, value in sorted(self.series.items())]
        return out


class ServeMetrics:
    """Everything ``/metrics`` reports about one server."""

    def __init__(self) -> None:
        self.requests = Counter("kiln_http_requests_total", "HTTP requests answered, by path and status code.")
        self.errors = Counter("kiln_http_errors_total", "HTTP requests answered with a 4xx or 5xx status, by "
                                                        "path and status code.")
        self.latency = Histogram("kiln_http_request_duration_seconds", "Time from receiving a request to "
                                 "answering it, by path.", TIME_BUCKETS)
        self.queue_time = Histogram("kiln_queue_seconds", "Time a /predict request waited for its batch to start.",
                                    TIME_BUCKETS)
        self.inference_time = Histogram("kiln_batch_seconds", "Time one batch took in the model.", TIME_BUCKETS)
        self.batch_requests = Histogram("kiln_batch_requests", "Requests gathered into one batch.", SIZE_BUCKETS)
        self.batch_inputs = Histogram("kiln_batch_inputs", "Inputs in one batch, all its requests together.",
                                      SIZE_BUCKETS)
        self.inputs = Counter("kiln_inputs_total", "Inputs predicted.")
        self.in_flight = 0  # /predict requests waiting for or in a batch, now

    def record_request(self, path: str, status: int, seconds: float) -> None:
        """One answered HTTP request."""
        self.requests.inc(path=path, status=str(status))
        if status >= 400:
            self.errors.inc(path=path, status=str(status))
        self.latency.observe(seconds, path=path)

    def record_batch(self, requests: int, inputs: int, seconds: float, queue_seconds: list[float]) -> None:
        """One batch through the model, with the queue time of each of its requests."""
        self.batch_requests.observe(requests)
        self.batch_inputs.observe(inputs)
        self.inference_time.observe(seconds)
        self.inputs.inc(inputs)
        for waited in queue_seconds:
            self.queue_time.observe(waited)

    def render(self, loaded: bool) -> str:
        """The whole exposition, ending with a newline."""
        lines: list[str] = []
        for metric in (self.requests, self.errors, self.latency, self.queue_time, self.inference_time,
                       self.batch_requests, self.batch_inputs, self.inputs):
            lines += metric.lines()
        lines += ["# HELP kiln_predict_in_flight /predict requests waiting for or in a batch.",
                  "# TYPE kiln_predict_in_flight gauge", f"kiln_predict_in_flight {self.in_flight}",
                  "# HELP kiln_model_loaded 1 once the model is loaded and /predict answers.",
                  "# TYPE kiln_model_loaded gauge", f"kiln_model_loaded {int(loaded)}"]
        return "\n".join(lines) + "\n"
