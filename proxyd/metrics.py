"""Prometheus metrics: kube-proxy's names where the concept is the same.

All metrics live in one module-level registry (one daemon per process) so any
layer can record without plumbing. kube-proxy's own metric names are kept
exactly so that existing dashboards and alerts carry over; proxyd's own
metrics use the ``proxyd_`` prefix.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

REGISTRY = CollectorRegistry(auto_describe=True)

# kube-proxy's buckets: exponential from 1 ms.
_SYNC_BUCKETS = tuple(0.001 * 2**i for i in range(15))
_PROGRAMMING_BUCKETS = (0.25, 0.5, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18,
                        19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 29, 30, 31, 32, 33, 34, 35, 36,
                        37, 38, 39, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54,
                        55, 56, 57, 58, 59, 60, 65, 70, 75, 80, 85, 90, 95, 100, 105, 110, 115,
                        120, 150, 180, 210, 240, 270, 300)

SYNC_DURATION = Histogram(
    "kubeproxy_sync_proxy_rules_duration_seconds",
    "SyncProxyRules latency in seconds",
    buckets=_SYNC_BUCKETS, registry=REGISTRY)
SYNC_LAST_TIMESTAMP = Gauge(
    "kubeproxy_sync_proxy_rules_last_timestamp_seconds",
    "The last time proxy rules were successfully synced",
    registry=REGISTRY)
SYNC_LAST_QUEUED_TIMESTAMP = Gauge(
    "kubeproxy_sync_proxy_rules_last_queued_timestamp_seconds",
    "The last time a sync of proxy rules was queued",
    registry=REGISTRY)
NETWORK_PROGRAMMING_DURATION = Histogram(
    "kubeproxy_network_programming_duration_seconds",
    "In Cluster Network Programming Latency in seconds",
    buckets=_PROGRAMMING_BUCKETS, registry=REGISTRY)
ENDPOINT_CHANGES_PENDING = Gauge(
    "kubeproxy_sync_proxy_rules_endpoint_changes_pending",
    "Pending proxy rules Endpoint changes", registry=REGISTRY)
ENDPOINT_CHANGES_TOTAL = Counter(
    "kubeproxy_sync_proxy_rules_endpoint_changes",
    "Cumulative proxy rules Endpoint changes", registry=REGISTRY)
SERVICE_CHANGES_PENDING = Gauge(
    "kubeproxy_sync_proxy_rules_service_changes_pending",
    "Pending proxy rules Service changes", registry=REGISTRY)
SERVICE_CHANGES_TOTAL = Counter(
    "kubeproxy_sync_proxy_rules_service_changes",
    "Cumulative proxy rules Service changes", registry=REGISTRY)
IPTABLES_RESTORE_FAILURES = Counter(
    "kubeproxy_sync_proxy_rules_iptables_restore_failures",
    "Cumulative proxy iptables restore failures", registry=REGISTRY)
IPTABLES_PARTIAL_RESTORE_FAILURES = Counter(
    "kubeproxy_sync_proxy_rules_iptables_partial_restore_failures",
    "Cumulative proxy iptables partial restore failures", registry=REGISTRY)
IPTABLES_TOTAL_RULES = Gauge(
    "kubeproxy_sync_proxy_rules_iptables_total",
    "Total number of iptables rules owned by proxyd", ["table"], registry=REGISTRY)
NFTABLES_SYNC_FAILURES = Counter(
    "kubeproxy_sync_proxy_rules_nftables_sync_failures",
    "Cumulative proxy nftables sync failures", registry=REGISTRY)
NFTABLES_REPAIRS = Counter(
    "proxyd_nftables_table_repairs_total",
    "Full resyncs because proxyd's nftables table was deleted or replaced by someone else",
    registry=REGISTRY)
SYNC_FULL_DURATION = Histogram(
    "kubeproxy_sync_full_proxy_rules_duration_seconds",
    "SyncProxyRules latency in seconds for full resyncs",
    buckets=_SYNC_BUCKETS, registry=REGISTRY)
SYNC_PARTIAL_DURATION = Histogram(
    "kubeproxy_sync_partial_proxy_rules_duration_seconds",
    "SyncProxyRules latency in seconds for partial resyncs",
    buckets=_SYNC_BUCKETS, registry=REGISTRY)
SYNC_FAILURES = Counter(
    "proxyd_sync_failures_total", "Syncs that raised and will be retried", ["mode"],
    registry=REGISTRY)
NETFILTER_REPAIRS = Counter(
    "proxyd_netfilter_repairs_total",
    "Sync-period checks that found a canary chain or a base-chain jump gone and forced a full sync",
    ["mode"], registry=REGISTRY)

# proxyd's own: sources.
REJECTED_OBJECTS = Counter(
    "proxyd_rejected_objects_total",
    "Objects or files skipped because they were invalid or unreadable",
    ["source", "kind", "reason"], registry=REGISTRY)
IGNORED_OBJECTS = Counter(
    "proxyd_ignored_objects_total",
    "Objects or parts of objects proxyd leaves alone by design (headless, ExternalName, other kinds, …)",
    ["source", "kind", "reason"], registry=REGISTRY)
SOURCE_EVENTS = Counter(
    "proxyd_source_events_total", "Objects received from the source", ["source", "kind"],
    registry=REGISTRY)
SOURCE_RECONNECTS = Counter(
    "proxyd_source_reconnects_total", "Watch reconnects and relists", ["kind", "reason"],
    registry=REGISTRY)
SOURCE_LAST_EVENT_TIMESTAMP = Gauge(
    "proxyd_source_last_event_timestamp_seconds",
    "Last time the source delivered an event or a complete list", registry=REGISTRY)
SOURCE_CONNECTED = Gauge(
    "proxyd_source_connected", "1 while the source's watches are established",
    registry=REGISTRY)

# proxyd's own: userspace data path. The per-service-port series (proxyd_active_connections,
# proxyd_connections_total, proxyd_bytes_total, proxyd_connect_retries_total,
# proxyd_connections_rejected_total) are built at scrape time from plain counts by the collector
# proxyd.modes.userspace.stats.SERIES, registered here when userspace mode is imported.
ACCEPT_PAUSES = Counter(
    "proxyd_accept_pauses_total", "Times accepting paused because file descriptors ran out",
    registry=REGISTRY)
UDP_FLOWS_EVICTED = Counter(
    "proxyd_udp_flows_evicted_total", "UDP flows evicted because the flow table was full",
    registry=REGISTRY)
LISTEN_FAILURES = Gauge(
    "proxyd_listen_failures",
    "Service listeners (userspace) not open now: descriptors (budget), permission, address_in_use, other",
    ["reason"], registry=REGISTRY)
HEALTHY = Gauge(
    "proxyd_healthy", "1 while /healthz answers 200 (the last sync is recent and nothing waits too long)",
    registry=REGISTRY)
CONNTABLE_IMPLEMENTATION = Gauge(
    "proxyd_conntable_native", "1 when the Cython connection table is in use",
    registry=REGISTRY)


USERSPACE_ENGINE_NATIVE = Gauge(
    "proxyd_userspace_engine_native", "1 when userspace mode's TCP connections run in the native engine",
    registry=REGISTRY)

# Called (in the event loop) before each scrape: sources of counts kept outside prometheus_client,
# such as the native engine's C counters, push what they hold so a scrape is never stale.
BEFORE_RENDER: list[Callable[[], None]] = []


def render() -> bytes:
    for hook in list(BEFORE_RENDER):
        hook()
    return generate_latest(REGISTRY)

# proxyd's own: kernel objects refused inside a netlink batch (the rest of the batch applied).
NETLINK_FAILURES = Counter(
    "proxyd_netlink_failures_total", "Objects the kernel refused in a netlink batch", ["kind"],
    registry=REGISTRY)

# proxyd's own: service ports held back because the kernel refused them (proxyd.quarantine).
QUARANTINED_PORTS = Gauge(
    "proxyd_quarantined_service_ports",
    "Service ports quarantined now: the kernel refused them, the rest of the node is applied",
    ["mode"], registry=REGISTRY)
QUARANTINED_TOTAL = Counter(
    "proxyd_quarantined_total", "Service ports put in quarantine, by mode and kind of refusal",
    ["mode", "reason"], registry=REGISTRY)
QUARANTINE_TRIALS = Counter(
    "proxyd_quarantine_transactions_total",
    "Extra restores/transactions run to isolate refused service ports after a failed one",
    ["mode"], registry=REGISTRY)
