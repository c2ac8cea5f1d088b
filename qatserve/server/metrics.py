"""Prometheus /metrics (prometheus-client): tokens, tok/s, queue, KV use, speculative acceptance.

A custom collector reads the engine's counters and the server's totals at scrape time, so nothing
on the request path updates a metric object, and each app has its own registry (several apps in one
process, as in tests, do not collide in the global one).
"""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from qatserve.server.state import ServerState

router = APIRouter()


def _ratio(a: float, b: float) -> float:
    return a / b if b else 0.0


class EngineCollector:
    def __init__(self, state: ServerState):
        self.state = state

    def collect(self):
        s = self.state
        st, c, eng = s.engine.stats, s.counters, s.engine

        def counter(name: str, doc: str, value: float):
            return CounterMetricFamily(f"qatserve_{name}", doc, value=value)

        def gauge(name: str, doc: str, value: float):
            return GaugeMetricFamily(f"qatserve_{name}", doc, value=value)

        yield counter("prompt_tokens", "Prompt tokens computed (prefix-cache hits excluded)", st.prompt_tokens)
        yield counter("prompt_tokens_cached", "Prompt tokens taken from the prefix cache", st.cached_tokens)
        yield counter("generated_tokens", "Tokens generated", st.generated_tokens)
        yield counter("engine_steps", "Engine forward steps", st.steps)
        yield counter("engine_busy_seconds", "Seconds the engine spent stepping", st.busy_seconds)
        yield counter("draft_tokens", "Speculative tokens proposed", st.draft_tokens)
        yield counter("draft_tokens_accepted", "Speculative tokens accepted", st.draft_accepted)
        yield gauge("draft_acceptance_ratio", "Accepted / proposed speculative tokens",
                    _ratio(st.draft_accepted, st.draft_tokens))
        yield counter("draft_verifications", "Target forwards that verified a draft", st.draft_steps)
        yield gauge("draft_mean_accepted_length", "Tokens emitted per verification forward (accepted drafts + 1)",
                    1.0 + st.draft_accepted / st.draft_steps if st.draft_steps else 0.0)
        # Averages over finished requests, as llama.cpp's prompt_tokens_seconds / predicted_tokens_seconds.
        yield gauge("prompt_tokens_per_second", "Average prompt throughput of finished requests",
                    _ratio(c.prompt_tokens, c.prompt_seconds))
        yield gauge("generation_tokens_per_second", "Average generation speed of finished requests",
                    _ratio(c.predicted_tokens, c.predicted_seconds))
        yield gauge("requests_running", "Requests holding a slot", eng.n_running())
        yield gauge("requests_waiting", "Requests queued for a slot", len(eng.waiting))
        yield gauge("slots_total", "Parallel slots (-np)", eng.config.n_slots)
        yield gauge("kv_cache_usage_ratio", "Share of KV-cache blocks in use (0..1)", eng.cache.usage())
        done = CounterMetricFamily("qatserve_requests_finished", "Requests that ended, by finish reason",
                                   labels=["reason"])
        for reason, n in sorted(c.requests.items()):
            done.add_metric([reason], n)
        yield done
        rejected = CounterMetricFamily("qatserve_requests_rejected", "Requests refused before generation, "
                                       "by HTTP status (429 queue full, 503 stopping, ...)", labels=["status"])
        for status, n in sorted(c.rejected.items()):
            rejected.add_metric([status], n)
        yield rejected


def registry_for(state: ServerState) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(EngineCollector(state))
    return reg


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.metrics), media_type=CONTENT_TYPE_LATEST)
