"""The in-memory index backend: kvcm._core's Index in this process; every answer at once."""

from prometheus_client.core import GaugeMetricFamily

from kvcm.backend import Backend, tier_totals
from kvcm.metrics import counter


class MemoryBackend(Backend):
    snapshots = True
    ingest_thread = True    # the index's lock keeps the ingest thread's applies and lookups apart

    def __init__(self, index):
        self.index = self.local_index = index

    def score(self, model, keys, rekey, pods, scorer):
        return keys, scorer.score_detailed(self.index, model, keys, pods), None

    def score_keys(self, model, keys, pods, scorer):
        return scorer.score_detailed(self.index, model, keys, pods)

    def pod_counts(self, pods):
        pod_blocks = self.index.pod_blocks
        return {pod: pod_blocks(pod) for pod in pods}, None

    def clear_pod(self, pod):
        return self.index.clear_pod(pod)

    def dump(self):
        return self.index.dump()

    def load(self, tables, chunks):
        self.index.load(tables, chunks)

    def describe(self, listing):
        stats = self.index.stats()
        return {"backend": "memory", "blocks": stats["blocks"], "capacity": stats["capacity"],
                "entries": stats["entries"], "entries_by_tier": tier_totals(stats["pods"].values()),
                "evictions": stats["evictions"], "pods": len(stats["pods"]),
                "engine_map_entries": stats["engine_map_entries"]}

    def metric_families(self):
        stats = self.index.stats()
        yield GaugeMetricFamily("kvcm_index_blocks", "Distinct blocks in the index", value=stats["blocks"])
        yield GaugeMetricFamily("kvcm_index_capacity_blocks", "Index capacity in distinct blocks (--max-blocks)",
                                value=stats["capacity"])
        yield counter("kvcm_index_evictions_total", "Blocks evicted by the LRU at capacity", stats["evictions"])
        yield counter("kvcm_index_lock_loans_total", "Times a thread waiting for the index lock lent its CPU to "
                      "the holder, which had lost its own mid-change", self.index.lock_loans)
        yield GaugeMetricFamily("kvcm_index_engine_map_entries", "Engine hash -> kvcm key entries (decoupled mode)",
                                value=stats["engine_map_entries"])
        yield GaugeMetricFamily("kvcm_index_pods", "Pods holding at least one block", value=len(stats["pods"]))
        entries = GaugeMetricFamily("kvcm_index_entries", "(block, pod) entries by tier", labels=("tier",))
        for tier, n in tier_totals(stats["pods"].values()).items():
            entries.add_metric((tier,), n)
        yield entries
        # one series per pod and tier: pods are bounded by the ingest's stream limit
        per_pod = GaugeMetricFamily("kvcm_pod_blocks", "Blocks each pod holds, by tier", labels=("pod", "tier"))
        for pod, tiers in sorted(stats["pods"].items()):
            for tier, n in sorted(tiers.items()):
                per_pod.add_metric((pod, tier), n)
        yield per_pod
