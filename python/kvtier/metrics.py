"""Metrics: kvtier's counters, gauges and latency histograms, exported to Prometheus.

The values live here in plain Python, so a Metrics works without prometheus-client (then only
``render()`` and ``start_http_server()`` are unavailable). Each Metrics owns its own
``CollectorRegistry`` — never the process-global one — so several caches in one process do not
clash. docs/metrics.md lists every metric and the ``stats()`` key it comes from.

Example::

    metrics = Metrics(stats_fn=cache.stats)        # stats() is read again on every scrape
    server = metrics.start_http_server(9400)       # http://127.0.0.1:9400/metrics
    with metrics.time("load"):
        cache.load(tokens, page_ids).wait()
    server.close()
"""

from __future__ import annotations

import bisect
import contextlib
import logging
import math
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from time import perf_counter
from typing import Any

from kvtier.errors import InvalidArgumentError, KVTierIOError, UnavailableError

log = logging.getLogger(__name__)

TIERS = ("gpu", "cpu", "disk", "peer")
PATHS = ("offload", "load", "disk_write", "disk_read", "peer_pull")
LATENCY_OPS = ("store", "lookup", "load", "disk_read", "disk_write", "peer_pull")
# 10 us .. 10 s: a CPU-tier lookup is microseconds, a disk promotion of a long prefix is seconds.
LATENCY_BUCKETS = (
    1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3,
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
_NAME_RE = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
PROMETHEUS_PACKAGE = "prometheus-client"


@dataclass(frozen=True)
class MetricSpec:
    """One metric family: its name after the namespace prefix, kind, help text and labels."""

    name: str
    kind: str  # "counter", "gauge" or "histogram"
    help: str
    labels: tuple[str, ...] = ()


SPECS: tuple[MetricSpec, ...] = (
    MetricSpec("hits_total", "counter", "Chunks found, by the tier that held them.", ("tier",)),
    MetricSpec(
        "misses_total",
        "counter",
        "Lookups and loads that stopped at a chunk the tier did not hold (one per call).",
        ("tier",),
    ),
    MetricSpec("operations_total", "counter", "Calls of store, lookup and load.", ("op",)),
    MetricSpec(
        "chunks_total",
        "counter",
        "Chunks handled, by event: stored, already_cached, loaded, promoted, demoted.",
        ("event",),
    ),
    MetricSpec("bytes_total", "counter", "Bytes moved, by data path.", ("path",)),
    MetricSpec("evictions_total", "counter", "Chunks evicted, by tier.", ("tier",)),
    MetricSpec("admissions_total", "counter", "Chunks admitted into a tier.", ("tier",)),
    MetricSpec(
        "rejected_total",
        "counter",
        "Chunks a tier refused, by tier and reason.",
        ("tier", "reason"),
    ),
    MetricSpec(
        "failed_total",
        "counter",
        "Failed operations: chunks (store, promote, demote) or disk requests (disk_read, disk_write).",
        ("op",),
    ),
    MetricSpec(
        "corrupt_total",
        "counter",
        "Blobs that failed a checksum, magic or layout-fingerprint check (each one a miss).",
        ("tier",),
    ),
    MetricSpec(
        "events_total",
        "counter",
        "KV events (chunks a medium gained or lost) recorded, and dropped from a full event log.",
        ("outcome",),
    ),
    MetricSpec("stats_errors_total", "counter", "Scrapes whose stats_fn raised."),
    MetricSpec("capacity_chunks", "gauge", "Chunks a tier can hold.", ("tier",)),
    MetricSpec("used_chunks", "gauge", "Chunks a tier holds now (in flight included).", ("tier",)),
    MetricSpec("chunk_bytes", "gauge", "Bytes of one chunk blob."),
    MetricSpec("in_flight", "gauge", "Copies and disk requests in flight."),
    MetricSpec("disk_nospace", "gauge", "1 while disk admission is paused after ENOSPC, else 0."),
    MetricSpec("events_pending", "gauge", "KV events recorded and not yet taken (take_events)."),
    MetricSpec(
        "bandwidth_bytes_per_second",
        "gauge",
        "Most recent measured bandwidth of a data path (set by the planner or a transfer).",
        ("path",),
    ),
    MetricSpec(
        "info",
        "gauge",
        "Always 1; the labels say how this cache runs.",
        ("method", "pinned", "disk_backend"),
    ),
    MetricSpec("latency_seconds", "histogram", "Wall time of kvtier operations, by op.", ("op",)),
)
_SPEC_BY_NAME = {s.name: s for s in SPECS}

# KVCache.stats() key (dotted) -> counter and its label values. The counters grow by the
# change of the stats value between two update_from_stats calls. gpu.* and peer.* keys are the
# contract for the tiers still to come; a key a stats dict lacks is skipped.
COUNTER_SOURCES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("index.hit_chunks", "hits_total", ("cpu",)),
    ("disk.lookup_chunks", "hits_total", ("disk",)),
    ("gpu.hit_chunks", "hits_total", ("gpu",)),
    ("peer.hit_chunks", "hits_total", ("peer",)),
    ("index.miss_chunks", "misses_total", ("cpu",)),
    ("disk.miss_chunks", "misses_total", ("disk",)),
    ("gpu.miss_chunks", "misses_total", ("gpu",)),
    ("peer.miss_chunks", "misses_total", ("peer",)),
    ("store_calls", "operations_total", ("store",)),
    ("index.lookups", "operations_total", ("lookup",)),
    ("load_calls", "operations_total", ("load",)),
    ("chunks_stored", "chunks_total", ("stored",)),
    ("chunks_already_cached", "chunks_total", ("already_cached",)),
    ("chunks_loaded", "chunks_total", ("loaded",)),
    ("disk.chunks_promoted", "chunks_total", ("promoted",)),
    ("disk.demotions_written", "chunks_total", ("demoted",)),
    ("bytes_offloaded", "bytes_total", ("offload",)),
    ("bytes_loaded", "bytes_total", ("load",)),
    ("disk.write_bytes", "bytes_total", ("disk_write",)),
    ("disk.read_bytes", "bytes_total", ("disk_read",)),
    ("peer.pull_bytes", "bytes_total", ("peer_pull",)),
    ("gpu.evictions", "evictions_total", ("gpu",)),
    ("index.evictions", "evictions_total", ("cpu",)),
    ("disk.evictions", "evictions_total", ("disk",)),
    ("index.inserts", "admissions_total", ("cpu",)),
    ("index.demotions", "admissions_total", ("disk",)),
    ("chunks_skipped_full", "rejected_total", ("cpu", "full")),
    ("index.demotions_not_admitted", "rejected_total", ("disk", "not_admitted")),
    ("index.demotions_busy", "rejected_total", ("disk", "busy")),
    ("chunks_failed", "failed_total", ("store",)),
    ("disk.promotion_failures", "failed_total", ("promote",)),
    ("disk.demotions_failed", "failed_total", ("demote",)),
    ("disk.read_failures", "failed_total", ("disk_read",)),
    ("disk.write_failures", "failed_total", ("disk_write",)),
    ("disk.corrupt_detected", "corrupt_total", ("disk",)),
    ("peer.corrupt_detected", "corrupt_total", ("peer",)),
    ("events_recorded", "events_total", ("recorded",)),
    ("events_dropped", "events_total", ("dropped",)),
)
# KVCache.stats() key -> gauge, set to the value as it is.
GAUGE_SOURCES: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("capacity_chunks", "capacity_chunks", ("cpu",)),
    ("blocks.used_blocks", "used_chunks", ("cpu",)),
    ("disk.slots_total", "capacity_chunks", ("disk",)),
    ("disk.slots_used", "used_chunks", ("disk",)),
    ("chunk_bytes", "chunk_bytes", ()),
    ("in_flight", "in_flight", ()),
    ("disk.nospace", "disk_nospace", ()),
    ("events_pending", "events_pending", ()),
)


def _flatten(stats: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in stats.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _number(value: Any) -> float | None:
    """The value as a finite float, or None when it is absent or not a number."""
    if isinstance(value, bool):
        return float(value)
    if isinstance(value, (int, float)) and math.isfinite(value):
        return float(value)
    return None


def _import_prometheus():
    """The prometheus_client module, or None where it is not installed."""
    try:
        import prometheus_client
        from prometheus_client import metrics_core, utils
    except ImportError:
        return None
    return prometheus_client, metrics_core, utils


class MetricsServer:
    """A running ``/metrics`` HTTP endpoint; ``close()`` stops it and frees its port."""

    def __init__(self, server, thread: threading.Thread | None, addr: str, port: int) -> None:
        self.server = server  # wsgiref WSGIServer; None with prometheus-client < 0.20
        self.thread = thread
        self.addr = addr
        self.port = port

    @property
    def url(self) -> str:
        host = f"[{self.addr}]" if ":" in self.addr else self.addr
        return f"http://{host}:{self.port}/metrics"

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop serving and close the socket (idempotent)."""
        server, self.server = self.server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self.thread is not None:
            self.thread.join(timeout_s)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Collector:
    """Hands a Metrics' values to its registry at scrape time (a prometheus-client collector)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self):
        return self._metrics._families(with_samples=True)

    def describe(self):
        return self._metrics._families(with_samples=False)


class Metrics:
    """Counters, gauges and latency histograms of one cache; see docs/metrics.md.

    Args:
        namespace: prefix of every metric name (``kvtier_hits_total``).
        stats_fn: optional callable returning a ``KVCache.stats()`` dict; when given, every
            scrape and ``render()`` calls it and applies the result (``update_from_stats``).
    Thread-safe: counters may be updated from several threads while a scrape runs.
    """

    def __init__(self, namespace: str = "kvtier", *, stats_fn: Callable[[], Mapping[str, Any]] | None = None) -> None:
        if not isinstance(namespace, str) or not _NAME_RE.fullmatch(namespace):
            raise InvalidArgumentError(
                f"namespace: invalid value {namespace!r}; allowed: a Prometheus name [a-zA-Z_][a-zA-Z0-9_]*"
            )
        if stats_fn is not None and not callable(stats_fn):
            raise InvalidArgumentError(f"stats_fn must be callable, got {type(stats_fn).__name__}")
        self.namespace = namespace
        self._stats_fn = stats_fn
        self._lock = threading.Lock()
        self._values: dict[str, dict[tuple[str, ...], float]] = {s.name: {} for s in SPECS}
        # histogram series -> [count per bucket (the last one: above the top bound), sum]
        self._hist: dict[tuple[str, ...], list] = {}
        self._last: dict[str, float] = {}  # stats key -> value at the previous update
        for _, name, labels in COUNTER_SOURCES:  # every series exists from the start, at 0
            self._values[name][labels] = 0.0
        self._values["stats_errors_total"][()] = 0.0
        for op in ("store", "lookup", "load"):
            self._hist[(op,)] = [[0] * (len(LATENCY_BUCKETS) + 1), 0.0]
        self._servers: list[MetricsServer] = []
        self._prom = _import_prometheus()
        self._registry = None
        if self._prom is not None:
            self._registry = self._prom[0].CollectorRegistry(auto_describe=False)
            self._registry.register(_Collector(self))

    @classmethod
    def from_config(cls, config, *, stats_fn: Callable[[], Mapping[str, Any]] | None = None) -> Metrics:
        """Metrics for a :class:`kvtier.config.KVTierConfig`: its namespace, and its HTTP
        endpoint started when ``metrics.prometheus_port`` is set (see ``servers``)."""
        metrics = cls(config.metrics.namespace, stats_fn=stats_fn)
        if config.metrics.prometheus_port is not None:
            metrics.start_http_server(config.metrics.prometheus_port, config.metrics.prometheus_addr)
        return metrics

    # -- feeding -----------------------------------------------------------------------------
    def update_from_stats(self, stats: Mapping[str, Any]) -> None:
        """Apply a ``KVCache.stats()`` dict: counters grow by what each stats counter grew since
        the previous call (a stats counter that went down is a restarted source: its whole value
        counts), gauges take the values. Absent keys are skipped; counters never go down."""
        if not isinstance(stats, Mapping):
            raise InvalidArgumentError(f"stats must be a dict like KVCache.stats() returns, got {type(stats).__name__}")
        flat = _flatten(stats)
        with self._lock:
            for key, name, labels in COUNTER_SOURCES:
                value = _number(flat.get(key))
                if value is None or value < 0:
                    continue
                prev = self._last.get(key)
                delta = value - prev if prev is not None and value >= prev else value
                self._last[key] = value
                if delta > 0:
                    series = self._values[name]
                    series[labels] = series.get(labels, 0.0) + delta
            for key, name, labels in GAUGE_SOURCES:
                value = _number(flat.get(key))
                if value is not None:
                    self._values[name][labels] = value
            if "method" in flat or "pinned" in flat or "disk.backend" in flat:
                info = (
                    str(flat.get("method", "")),
                    str(flat.get("pinned", "")).lower(),
                    str(flat.get("disk.backend", "none")),
                )
                self._values["info"] = {info: 1.0}

    def observe_latency(self, op: str, seconds: float) -> None:
        """Record one ``op`` (one of LATENCY_OPS) that took ``seconds``."""
        self._check_choice("op", op, LATENCY_OPS)
        value = _number(seconds)
        if value is None or value < 0 or isinstance(seconds, bool):
            raise InvalidArgumentError(f"seconds: invalid value {seconds!r}; allowed: a finite number >= 0")
        i = bisect.bisect_left(LATENCY_BUCKETS, value)  # first bound >= value: le semantics
        with self._lock:
            series = self._hist.setdefault((op,), [[0] * (len(LATENCY_BUCKETS) + 1), 0.0])
            series[0][i] += 1
            series[1] += value

    def time(self, op: str) -> contextlib.AbstractContextManager[None]:
        """Time a ``with`` block as one ``op`` (recorded also when the block raises)."""
        self._check_choice("op", op, LATENCY_OPS)
        return self._timer(op)

    @contextlib.contextmanager
    def _timer(self, op: str) -> Iterator[None]:
        start = perf_counter()
        try:
            yield
        finally:
            self.observe_latency(op, perf_counter() - start)

    def set_bandwidth(self, path: str, bytes_per_second: float) -> None:
        """Set the measured bandwidth of ``path`` (one of PATHS), in bytes per second."""
        self._check_choice("path", path, PATHS)
        value = _number(bytes_per_second)
        if value is None or value < 0 or isinstance(bytes_per_second, bool):
            raise InvalidArgumentError(
                f"bytes_per_second: invalid value {bytes_per_second!r}; allowed: a finite number >= 0"
            )
        with self._lock:
            self._values["bandwidth_bytes_per_second"][(path,)] = value

    def observe_transfer(self, path: str, nbytes: int, seconds: float) -> None:
        """Set the bandwidth of ``path`` from one transfer of ``nbytes`` that took ``seconds``.
        (Only the gauge: ``bytes_total`` comes from stats, so bytes are never counted twice.)"""
        n, t = _number(nbytes), _number(seconds)
        if n is None or n < 0 or isinstance(nbytes, bool):
            raise InvalidArgumentError(f"nbytes: invalid value {nbytes!r}; allowed: an int >= 0")
        if t is None or t <= 0 or isinstance(seconds, bool):
            raise InvalidArgumentError(f"seconds: invalid value {seconds!r}; allowed: a number > 0")
        self.set_bandwidth(path, n / t)

    # -- reading ----------------------------------------------------------------------------------
    def value(self, name: str, **labels: str) -> float:
        """Current value of one series, e.g. ``value("hits_total", tier="cpu")``; histograms
        answer ``latency_seconds_count`` and ``latency_seconds_sum``. Unknown series: 0."""
        short = name[len(self.namespace) + 1 :] if name.startswith(self.namespace + "_") else name
        part = None
        if short not in _SPEC_BY_NAME and short.rsplit("_", 1)[-1] in ("count", "sum"):
            short, part = short.rsplit("_", 1)
        spec = _SPEC_BY_NAME.get(short)
        if spec is None or (part is not None) != (spec.kind == "histogram"):
            known = ", ".join(s.name for s in SPECS)
            raise InvalidArgumentError(f"name: unknown metric {name!r}; known: {known}")
        if set(labels) != set(spec.labels):
            raise InvalidArgumentError(f"labels: {spec.name} takes {list(spec.labels)}, got {sorted(labels)}")
        key = tuple(str(labels[n]) for n in spec.labels)
        with self._lock:
            if spec.kind == "histogram":
                series = self._hist.get(key)
                if series is None:
                    return 0.0
                return float(sum(series[0])) if part == "count" else series[1]
            return self._values[spec.name].get(key, 0.0)

    def snapshot(self) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
        """Every series as ``{full name: {((label, value), ...): value}}`` (histograms as
        ``_count`` and ``_sum``); works without prometheus-client."""
        out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
        with self._lock:
            for spec in SPECS:
                full = f"{self.namespace}_{spec.name}"
                if spec.kind == "histogram":
                    counts = out.setdefault(full + "_count", {})
                    sums = out.setdefault(full + "_sum", {})
                    for key, (buckets, total) in self._hist.items():
                        pairs = tuple(zip(spec.labels, key))
                        counts[pairs] = float(sum(buckets))
                        sums[pairs] = total
                else:
                    out[full] = {tuple(zip(spec.labels, key)): v for key, v in self._values[spec.name].items()}
        return out

    # -- Prometheus -------------------------------------------------------------------------------
    @property
    def registry(self):
        """This Metrics' own ``prometheus_client.CollectorRegistry``."""
        self._require()
        return self._registry

    def render(self) -> bytes:
        """The metrics in the Prometheus text format (what a scrape of the endpoint returns)."""
        prom = self._require()[0]
        return prom.generate_latest(self._registry)

    def start_http_server(self, port: int, addr: str = "127.0.0.1") -> MetricsServer:
        """Serve ``/metrics`` on ``addr:port`` from a daemon thread (port 0: any free port).

        Returns the running server; ``close()`` it (``Metrics.close()`` closes them all).
        """
        prom = self._require()[0]
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
            raise InvalidArgumentError(f"port: invalid value {port!r}; allowed: an int in [0, 65535]")
        if not isinstance(addr, str) or not addr:
            raise InvalidArgumentError(f"addr: invalid value {addr!r}; allowed: a host address")
        try:
            started = prom.start_http_server(port, addr=addr, registry=self._registry)
        except OSError as e:
            raise KVTierIOError(e.errno, f"cannot serve metrics on {addr}:{port}: {e.strerror}") from e
        if isinstance(started, tuple):  # prometheus-client >= 0.20: (server, thread)
            server, thread = started
            handle = MetricsServer(server, thread, addr, server.server_address[1])
        else:  # older releases return nothing: the server runs until the process ends
            handle = MetricsServer(None, None, addr, port)
        with self._lock:
            self._servers.append(handle)
        return handle

    @property
    def servers(self) -> list[MetricsServer]:
        """The HTTP endpoints this Metrics started and has not closed."""
        with self._lock:
            return [s for s in self._servers if s.server is not None]

    def close(self) -> None:
        """Stop every HTTP endpoint this Metrics started."""
        with self._lock:
            servers, self._servers = self._servers, []
        for server in servers:
            server.close()

    def __enter__(self) -> Metrics:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals --------------------------------------------------------------------------------
    @staticmethod
    def _check_choice(what: str, value: Any, allowed: tuple[str, ...]) -> None:
        if value not in allowed:
            raise InvalidArgumentError(
                f"{what}: invalid value {value!r}; allowed: one of {', '.join(map(repr, allowed))}"
            )

    def _require(self):
        if self._prom is None:
            raise UnavailableError(
                f"exporting kvtier metrics needs the {PROMETHEUS_PACKAGE} package, which is not "
                f"installed: pip install {PROMETHEUS_PACKAGE}"
            )
        return self._prom

    def _pull_stats(self) -> None:
        try:
            stats = self._stats_fn()
            self.update_from_stats(stats)
        except Exception as e:  # noqa: BLE001 -- a closed cache must not break the whole scrape
            log.warning("kvtier metrics: stats_fn failed: %s: %s", type(e).__name__, e)
            with self._lock:
                self._values["stats_errors_total"][()] += 1

    def _families(self, with_samples: bool):
        """The metric families for prometheus-client (samples only when ``with_samples``)."""
        _, core, utils = self._require()
        if with_samples and self._stats_fn is not None:
            self._pull_stats()
        bounds = [utils.floatToGoString(b) for b in LATENCY_BUCKETS]
        families = []
        with self._lock:
            for spec in SPECS:
                full = f"{self.namespace}_{spec.name}"
                labels = list(spec.labels)
                if spec.kind == "counter":
                    family = core.CounterMetricFamily(full, spec.help, labels=labels)
                elif spec.kind == "gauge":
                    family = core.GaugeMetricFamily(full, spec.help, labels=labels)
                else:
                    family = core.HistogramMetricFamily(full, spec.help, labels=labels)
                families.append(family)
                if not with_samples:
                    continue
                if spec.kind == "histogram":
                    for key, (counts, total) in sorted(self._hist.items()):
                        cumulative, running = [], 0
                        for bound, count in zip(bounds, counts):
                            running += count
                            cumulative.append((bound, running))
                        cumulative.append(("+Inf", running + counts[-1]))
                        family.add_metric(list(key), cumulative, total)
                else:
                    for key, value in sorted(self._values[spec.name].items()):
                        family.add_metric(list(key), value)
        return families


__all__ = [
    "COUNTER_SOURCES",
    "GAUGE_SOURCES",
    "LATENCY_BUCKETS",
    "LATENCY_OPS",
    "PATHS",
    "SPECS",
    "TIERS",
    "MetricSpec",
    "Metrics",
    "MetricsServer",
]
