"""Prometheus metrics of ``hire serve`` (``GET /metrics``, the text exposition format).

Per request, observed by the app: requests by route and status code, the time to the first token
(from the request's arrival) and the latency between a stream's tokens. From the decode loop, read
when scraped: running and waiting requests, slots, whether the loop is up, decode steps and their
tokens (the mean batch is their rate's ratio), decode and prefill time and tokens, finished and
cancelled requests, and the HiRE head's batched steps with their union and candidate rows (the
union's cost over one sequence's candidates is their ratio). Each app has its own registry.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

# seconds: a token every few ms on a small model, a first token after a prefill of up to seconds
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class _LoopCollector(Collector):
    """The decode loop's counters (``LoopStats``, the decoder's ``UnionStats``) at scrape time."""

    def __init__(self, scheduler):
        self.scheduler = scheduler

    def collect(self):
        s = self.scheduler
        loop, union, load = s.stats, s.decoder.stats, s.load()
        yield GaugeMetricFamily("hire_decode_loop_up", "1 while the decode loop runs or can run, 0 once it has failed",
                                value=0 if s.error is not None else 1)
        yield GaugeMetricFamily("hire_requests_running", "Requests in a batch slot", value=load["active"])
        yield GaugeMetricFamily("hire_requests_waiting", "Requests waiting for a slot", value=load["waiting"])
        yield GaugeMetricFamily("hire_slots", "Batch slots (--slots)", value=load["slots"])
        counters = [
            ("hire_decode_steps", "Batched decode steps", loop.steps),
            ("hire_decode_step_tokens", "Tokens decoded, summed over steps (steps' batch sizes)", loop.step_tokens),
            ("hire_decode_seconds", "Time in decode steps", loop.decode_s),
            ("hire_prefills", "Prompts prefilled", loop.prefills),
            ("hire_prefill_tokens", "Prompt tokens prefilled", loop.prefill_tokens),
            ("hire_prefill_seconds", "Time in prefills", loop.prefill_s),
            ("hire_requests_finished", "Requests that ended (stop, length or error)", loop.finished),
            ("hire_requests_cancelled", "Requests cancelled (client gone, stop string, shutdown)", loop.cancelled),
            ("hire_head_union_steps", "Batched steps whose head computed the union of the rows' candidates", union.steps),
            ("hire_head_union_rows", "Head rows computed exactly in those steps (the unions), summed", union.head_union),
            ("hire_head_candidate_rows", "One sequence's candidates (k') in those steps, summed", union.head_candidates),
            ("hire_head_dense_steps", "Steps whose union passed --dense-above and read every row", union.head_dense),
            ("hire_head_batch_dense_steps", "Steps of --dense-batch or more sequences (dense head)", union.batch_dense),
        ]
        for name, doc, value in counters:
            yield CounterMetricFamily(name, doc, value=value)


class ServeMetrics:
    """The app's registry: its own histograms and counters, and the decode loop's collector."""

    def __init__(self, scheduler):
        self.registry = CollectorRegistry()
        self.requests = Counter("hire_http_requests", "HTTP requests by route and status code", ["route", "status"],
                                registry=self.registry)
        self.ttft = Histogram("hire_time_to_first_token_seconds", "From a request's arrival to its first token",
                              buckets=TTFT_BUCKETS, registry=self.registry)
        self.itl = Histogram("hire_inter_token_latency_seconds", "Between consecutive tokens of a request",
                             buckets=ITL_BUCKETS, registry=self.registry)
        self.registry.register(_LoopCollector(scheduler))

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
