"""What a prediction buys: replay routing through a model of an expert-offloading engine.

The engine decodes at batch 1, token by token, layer by layer (docs/prefetch.md has the whole
model and why):

- cache: the GPU holds `slots_per_layer` experts of each MoE layer (one cache per layer), or
  `slots_total` experts of any layer (one shared budget); the rest live in host memory. A full
  cache evicts the least recently used expert (`lru`), the one used least often so far (`lfu`,
  ties to the least recent), the one the predictor ranks least likely for its layer's next use
  (`predicted`: Belady on the predicted sets, `_evict_first` and `_keep_rank`), or,
  as a clairvoyant bound, the one whose next use is farthest ahead in the true routing (`belady`).
  The experts the current layer uses, and those a prefetch names, are never evicted to make room;
  with fewer slots than a layer's experts (the CPU fallback only) what finds no room runs on the
  CPU, and a prefetch with no room is dropped.
- link: one host-to-GPU link moving one expert in `transfer_ms`, one transfer at a time: with
  `queue: priority` (the default) demand fetches first, in chunks, and unchosen prefetches
  cancelled (`_replay_priority`); with `fifo` in order of issue, no pre-emption (`_replay`).
- compute: a layer computes for `compute_ms` once all its top-k experts have arrived; it waits
  for a missing one (a demand fetch) and for one still in flight (a late prefetch). With the CPU
  fallback (`cpu_ms`, priority link) a missing expert is computed on the CPU when that is sooner;
  with `miss_fraction` < 1 (`miss_bits`, priority link) a demand fetch moves a lower-precision copy.
- prediction: when layer l starts, the predictor names the experts of layer l + lookahead (and,
  with `depth` > 1, of the layers after it, from its later horizons); it runs beside the layer's
  compute for `predictor_ms`, then the engine issues transfers for those of its best `width`
  that are not resident, best first. Time the predictor takes beyond the layer's compute delays
  the next layer (it cannot overlap).

The replay is one compiled loop (numba) per link; `simulate` is arrays in, counters out, so tests
build cases by hand (an `Engine` built by hand is the FIFO engine unless told otherwise; the
stage's comes from params). `build_replay` assembles the arrays from a trace and a predictions
file, `run_all` runs the bounds (`on_demand`: no prediction; `perfect`: the true experts ahead,
free; `belady`: clairvoyant retention; `clairvoyant`: both; `compute_floor`: every expert
resident) beside every predictor, `study` adds the plots' sweeps, and `prefetch_metrics` turns
the counters into the stage's metrics.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from numba import njit
from tqdm import tqdm

from routecast.config.params import ParamsError, SimulateParams
from routecast.data.predictions import Predictions, PredictionsError
from routecast.data.traces import TraceMeta, Traces
from routecast.sim.names import BOUNDS, SLOTS_COLUMNS, WIDTH_COLUMNS
from routecast.sim.presets import find_model

log = logging.getLogger(__name__)

MAX_SWEEP_VALUES = 16  # an automatic sweep spreads at most this many values over its range

# Counters `_replay` returns, by index.
(_HITS, _IN_FLIGHT, _ACCESSES, _FETCHES, _PREFETCHES, _USEFUL, _REFETCHES, _WAIT, _OVERHEAD, _TOTAL, _LAYERS,
 _MISSING, _CANCELLED, _MOVED, _CPU) = range(15)
_N_COUNTERS = 15
LRU, LFU, BELADY, PREDICTED = 0, 1, 2, 3  # cache.eviction, as the compiled loops take it
POLICIES = {"lru": LRU, "lfu": LFU, "belady": BELADY, "predicted": PREDICTED}


@dataclass(frozen=True)
class Engine:
    """One engine configuration (times in ms, sizes in MB)."""

    slots_per_layer: int
    width: int  # prefetched experts per layer: the predictor's best `width` that are not resident
    eviction: str  # lru | lfu | belady (the clairvoyant bound: the true future use)
    transfer_ms: float  # one expert over the link
    compute_ms: float  # one layer's compute once its experts are resident
    expert_mb: float
    queue: str = "fifo"  # fifo: every transfer in order of issue | priority: demand first, wrong prefetches cancelled
    chunk_ms: float = 0.0  # priority: a transfer yields to a demand at chunk boundaries this far apart (0: whole)
    slot_on: str = "issue"  # priority: a prefetch takes its cache slot when issued | when it lands (staging)
    cpu_ms: float = 0.0  # priority: one expert computed on the CPU (Fiddler's fallback); 0: none
    depth: int = 1  # priority: prefetch layers l + lookahead .. l + lookahead + depth - 1
    slots_total: int = 0  # > 0: one cache of this many experts shared by every layer (slots_per_layer unread)
    miss_fraction: float = 1.0  # priority: the share of an expert's bytes a demand fetch moves (miss_bits' copy)

    @classmethod
    def from_params(cls, params: SimulateParams, meta: TraceMeta) -> Engine:
        """The engine `params` describe for a trace of this shape and source (its numbers: `engine_numbers`)."""
        top_k = meta.top_k
        hw = params.check_shape(meta.num_layers, meta.num_experts, top_k, meta.source)
        transfer_ms = hw.expert_mb / hw.gb_per_s  # MB / (GB/s) is ms; an infinite bandwidth moves an expert in no time
        chunk_mb = params.link.chunk_mb
        chunks = math.ceil(hw.expert_mb / chunk_mb) if chunk_mb else 1
        return cls(slots_per_layer=hw.slots_per_layer, width=params.width(top_k, hw.slots_per_layer),
                   eviction=params.cache.eviction, transfer_ms=transfer_ms, compute_ms=hw.ms_per_layer,
                   expert_mb=hw.expert_mb, queue=params.link.queue, chunk_ms=transfer_ms / chunks,
                   slot_on=params.link.slot_on, cpu_ms=hw.cpu_ms, depth=params.prefetch.depth,
                   slots_total=hw.slots_total, miss_fraction=hw.miss_fraction)


@dataclass(frozen=True)
class RunResult:
    """Counters of one replay, and the metrics derived from them."""

    engine: Engine
    tokens: int
    layers: int  # (token, layer) steps computed
    missing_layers: int  # (token, layer) steps the trace has no row for: skipped
    accesses: int  # experts the layers needed
    hits: int  # ... already resident when the layer asked for them
    in_flight: int  # ... prefetched but still on the link (the layer waits; no demand fetch)
    fetches: int  # transfers, demand and prefetch
    prefetches: int
    useful_prefetches: int  # prefetched experts used before they were evicted
    refetches: int  # transfers of an expert this layer's cache had held before
    wait_ms: float  # layers waiting for experts
    predictor_overhead_ms: float  # predictor time beyond the layers' compute
    total_ms: float
    cancelled: int = 0  # prefetches cancelled once their layer's router chose other experts (priority link)
    moved_experts: float = 0.0  # experts' worth of bytes the link moved (a cancelled transfer: its chunks moved)
    cpu_experts: int = 0  # needed experts computed on the CPU instead of waiting for the link (cpu fallback)

    @property
    def hit_rate(self) -> float:
        return self.hits / self.accesses if self.accesses else 0.0

    @property
    def prefetch_precision(self) -> float | None:
        return self.useful_prefetches / self.prefetches if self.prefetches else None

    @property
    def mb_per_token(self) -> float:
        return self.moved_experts * self.engine.expert_mb / self.tokens

    @property
    def stall_ms(self) -> float:
        """Critical-path time not spent computing: waiting for experts plus predictor overhead."""
        return self.wait_ms + self.predictor_overhead_ms

    @property
    def stall_ms_per_token(self) -> float:
        return self.stall_ms / self.tokens

    @property
    def ms_per_token(self) -> float:
        return self.total_ms / self.tokens


@njit(cache=True)
def _keep_rank(t, cur, layer, v, nt, hz):
    """How likely `layer` needs expert v next, as the predictor saw it at token t's layer `cur`: its rank
    (0: most likely) in the ranking for this token's `layer` made at `cur` (hz[t, cur, d], d = layer -
    cur), else in the next-token ranking of `layer` (nt: made at token t for t + 1 where `layer` <=
    `cur`, at t - 1 for t beyond it). The number of experts where it has neither (ties: LRU)."""
    unknown = hz.shape[3] if hz.shape[0] > 0 else nt.shape[2] if nt.shape[0] > 0 else 0
    d = layer - cur
    if hz.shape[0] > 0 and 0 < d < hz.shape[2] and hz[t, cur, d, v] < unknown:
        return hz[t, cur, d, v]
    if nt.shape[0] > 0:
        if d <= 0:
            return nt[t, layer, v]
        if t > 0:
            return nt[t - 1, layer, v]
    return unknown


@njit(cache=True)
def _room(layer, slots, total, resident, count, protect):
    """Whether the cache can take one more expert for `layer`: a free slot (its layer's, or with a
    shared budget `total` > 0 any), or a resident expert not protected that it may evict."""
    if (count.sum() < total) if total > 0 else (count[layer] < slots):
        return True
    for l2 in range(resident.shape[0]):
        if total > 0 or l2 == layer:
            for v in range(resident.shape[1]):
                if resident[l2, v] and not protect[l2, v]:
                    return True
    return False


@njit(cache=True)
def _evict_first(policy, total, top_k, la, a, lb, b, nu, now, t, cur, nt, hz, stamp, uses):
    """Whether resident expert (la, a) goes before (lb, b): LRU, LFU (ties to the least recent),
    PREDICTED (Belady on the predicted sets: the next use farthest ahead, taking it at its layer's
    next visit, this token's or the next one's, if the predictor ranks it within the top k and a
    pass later if not (`_keep_rank`), then the lowest rank, then the least recent: for a per-layer
    cache the lowest rank, and with no ranks LRU) or BELADY (next use farthest ahead in the true
    routing, from token `now` for a per-layer cache; in (token, layer) steps for a shared one)."""
    if policy == BELADY:
        if total > 0:  # the next use after the current step (token t, layer cur)
            ka = nu[t if la > cur else t + 1, la, a] * nu.shape[1] + la
            kb = nu[t if lb > cur else t + 1, lb, b] * nu.shape[1] + lb
        else:
            ka, kb = nu[now, la, a], nu[now, lb, b]
        if ka != kb:
            return ka > kb
    elif policy == PREDICTED:  # Belady on the predicted sets: the next use farthest ahead, then the lowest rank
        n_layers = stamp.shape[0]
        ra, rb = _keep_rank(t, cur, la, a, nt, hz), _keep_rank(t, cur, lb, b, nt, hz)
        # its layer's next visit (this token's, or the next one's), a whole pass later if not predicted for it
        ka = (t if la > cur else t + 1) * n_layers + la + (n_layers if ra >= top_k else 0)
        kb = (t if lb > cur else t + 1) * n_layers + lb + (n_layers if rb >= top_k else 0)
        if ka != kb:
            return ka > kb
        if ra != rb:
            return ra > rb
    elif policy == LFU and uses[la, a] != uses[lb, b]:
        return uses[la, a] < uses[lb, b]
    return stamp[la, a] < stamp[lb, b]


@njit(cache=True)
def _insert(layer, expert, slots, total, top_k, policy, nu, now, t, cur, nt, hz, resident, count, stamp, uses,
            pending, fetched, protect, queued, out):
    """Make `expert` resident in `layer`'s cache (its own `slots`, or with `total` > 0 one budget shared
    by every layer), evicting the unprotected expert `_evict_first` puts first if full (a victim
    still queued on a priority link is dropped from the queue: cancelled). False, changing nothing,
    when every resident expert is protected (a cache of fewer slots than a layer's experts and its
    prefetches, as on a machine whose CPU computes what its GPU cannot hold)."""
    if (count.sum() >= total) if total > 0 else (count[layer] >= slots):
        vl, victim = -1, -1
        for l2 in range(resident.shape[0]):
            if total == 0 and l2 != layer:
                continue
            for v in range(resident.shape[1]):
                if not resident[l2, v] or protect[l2, v]:
                    continue
                if victim < 0 or _evict_first(policy, total, top_k, l2, v, vl, victim, nu, now, t, cur, nt, hz, stamp,
                                              uses):
                    vl, victim = l2, v
        if victim < 0:  # every resident expert is in use or being prefetched: no room
            return False
        resident[vl, victim] = False
        count[vl] -= 1
        pending[vl, victim] = False  # a prefetch evicted unused: wasted
        if queued[vl, victim]:
            queued[vl, victim] = False
            out[_CANCELLED] += 1
    count[layer] += 1
    resident[layer, expert] = True
    if fetched[layer, expert]:
        out[_REFETCHES] += 1
    fetched[layer, expert] = True
    return True


@njit(cache=True)
def _replay(truth, cand, num_experts, lookahead, slots, total, policy, nu, nt, hz, transfer_ms, compute_ms,
            predictor_ms):
    """One replay. truth: [T, L, K] true experts (-1: no row); cand: [T, L, W] the experts to prefetch
    for layer l + lookahead, decided at layer l, best first (-1: none). Returns the counters."""
    n_tokens, n_layers, k = truth.shape
    width = cand.shape[2]
    out = np.zeros(_N_COUNTERS)
    resident = np.zeros((n_layers, num_experts), np.bool_)
    count = np.zeros(n_layers, np.int64)  # resident experts per layer
    ready = np.zeros((n_layers, num_experts))  # when the expert's latest transfer lands
    stamp = np.zeros((n_layers, num_experts), np.int64)  # last insertion or use (LRU order)
    uses = np.zeros((n_layers, num_experts), np.int64)  # uses so far, kept across evictions (LFU)
    pending = np.zeros((n_layers, num_experts), np.bool_)  # prefetched, not used since
    fetched = np.zeros((n_layers, num_experts), np.bool_)  # ever transferred
    protect = np.zeros((n_layers, num_experts), np.bool_)  # in use by the current layer, or being prefetched
    queued = np.zeros((n_layers, num_experts), np.bool_)  # never set: a FIFO transfer is never withdrawn
    clock = 0.0  # when the next layer may start
    link = 0.0  # when the link has moved everything issued so far
    tick = 0
    for t in range(n_tokens):
        for layer in range(n_layers):
            if truth[t, layer, 0] < 0:
                out[_MISSING] += 1
                continue
            # Demand: every needed expert not resident (nor on its way) queues behind the link.
            for j in range(k):
                protect[layer, truth[t, layer, j]] = True
            for j in range(k):
                e = truth[t, layer, j]
                out[_ACCESSES] += 1
                if resident[layer, e]:
                    out[_HITS if ready[layer, e] <= clock else _IN_FLIGHT] += 1
                else:
                    if not _insert(layer, e, slots, total, k, policy, nu, t, t, layer, nt, hz,
                                   resident, count, stamp, uses, pending, fetched, protect, queued, out):
                        raise RuntimeError("a demand fetch found no cache slot: fewer slots than top_k")
                    tick += 1
                    stamp[layer, e] = tick
                    link = max(clock, link) + transfer_ms
                    ready[layer, e] = link
                    out[_FETCHES] += 1
                    out[_MOVED] += 1
            # The layer starts once all its experts have landed.
            start = clock
            for j in range(k):
                e = truth[t, layer, j]
                start = max(start, ready[layer, e])
                tick += 1
                stamp[layer, e] = tick
                uses[layer, e] += 1
                if pending[layer, e]:
                    pending[layer, e] = False
                    out[_USEFUL] += 1
            out[_WAIT] += start - clock
            busy = compute_ms
            # Prefetch for layer + lookahead, issued once the predictor has run.
            target = layer + lookahead
            if width > 0 and target < n_layers and cand[t, layer, 0] >= 0:
                busy = max(compute_ms, predictor_ms)
                issue = start + predictor_ms
                for j in range(width):
                    if cand[t, layer, j] >= 0:
                        protect[target, cand[t, layer, j]] = True
                for j in range(width):
                    e = cand[t, layer, j]
                    if e >= 0 and not resident[target, e]:
                        if not _insert(target, e, slots, total, k, policy, nu, t, t, layer, nt, hz,
                                       resident, count, stamp, uses, pending, fetched, protect, queued, out):
                            continue
                        tick += 1
                        stamp[target, e] = tick
                        pending[target, e] = True
                        link = max(issue, link) + transfer_ms
                        ready[target, e] = link
                        out[_FETCHES] += 1
                        out[_PREFETCHES] += 1
                        out[_MOVED] += 1
                for j in range(width):
                    if cand[t, layer, j] >= 0:
                        protect[target, cand[t, layer, j]] = False
            for j in range(k):  # the layer is done with its experts
                protect[layer, truth[t, layer, j]] = False
            out[_OVERHEAD] += busy - compute_ms
            out[_LAYERS] += 1
            clock = start + busy
    out[_TOTAL] = clock
    return out


@njit(cache=True)
def _replay_priority(truth, cand, num_experts, lookahead, slots, total, policy, nu, nt, hz, transfer_ms, chunk_ms,
                     compute_ms, predictor_ms, stage, cpu_ms, miss):
    """`_replay` on a link as real engines run it (MoE-Infinity, ProMoE): demand fetches go before
    queued prefetches (a prefetch on the link finishes its current chunk first); once layer l's
    router has chosen, every prefetch for layer l still queued or on the link that it did not
    choose is cancelled (its slot freed; the chunks it moved still count as bytes), and one it
    chose becomes a demand. A prefetch takes its slot when issued, or with `stage` when it lands (a
    staging buffer: a cancelled prefetch then evicts nothing). With `cpu_ms` > 0 (Fiddler's fallback)
    an expert that is not resident is computed on the CPU instead, one after another from the
    layer's start, when that ends before its transfer would land (it is then neither fetched nor
    cached; one still on the link goes on as a prefetch); the layer ends when both the GPU and the
    CPU are done. Returns the counters."""
    n_tokens, n_layers, k = truth.shape
    depth, width = cand.shape[2], cand.shape[3]  # cand [T, L, depth, W]: slot i is for layer l + lookahead + i
    out = np.zeros(_N_COUNTERS)
    resident = np.zeros((n_layers, num_experts), np.bool_)
    count = np.zeros(n_layers, np.int64)
    ready = np.zeros((n_layers, num_experts))  # when the expert's transfer landed (or lands, for a demand)
    stamp = np.zeros((n_layers, num_experts), np.int64)
    uses = np.zeros((n_layers, num_experts), np.int64)
    pending = np.zeros((n_layers, num_experts), np.bool_)
    fetched = np.zeros((n_layers, num_experts), np.bool_)
    protect = np.zeros((n_layers, num_experts), np.bool_)  # in use by the current layer, or being prefetched
    queued = np.zeros((n_layers, num_experts), np.bool_)  # a prefetch waiting for, or on, the link
    remain = np.zeros((n_layers, num_experts))  # its transfer time still to go
    cap = n_tokens * n_layers * max(width * depth, 1) + 1
    q_layer = np.zeros(cap, np.int64)  # the prefetch queue in order of issue (dropped entries skipped)
    q_expert = np.zeros(cap, np.int64)
    q_issue = np.zeros(cap)
    q_id = np.zeros((n_layers, num_experts), np.int64)  # the queue entry of a queued prefetch (older ones are dead)
    on_cpu = np.zeros(k, np.bool_)  # this layer's experts computed on the CPU
    q_head, q_tail = 0, 0
    link = 0.0  # the link has done its work up to here
    clock = 0.0
    tick = 0
    for t in range(n_tokens):
        for layer in range(n_layers):
            if truth[t, layer, 0] < 0:
                out[_MISSING] += 1
                continue
            # The link moves queued prefetches, in order of issue, until the layer starts.
            while q_head < q_tail:
                ql, qe = q_layer[q_head], q_expert[q_head]
                if not queued[ql, qe] or q_id[ql, qe] != q_head:
                    q_head += 1
                    continue
                begin = max(link, q_issue[q_head])
                if begin >= clock:
                    break
                if begin + remain[ql, qe] <= clock:
                    link = begin + remain[ql, qe]
                    out[_MOVED] += remain[ql, qe] / transfer_ms if transfer_ms > 0 else 1.0
                    remain[ql, qe] = 0.0
                    queued[ql, qe] = False
                    ready[ql, qe] = link
                    if stage:
                        if not _insert(ql, qe, slots, total, k, policy, nu, t if ql >= layer else t + 1, t, layer, nt,
                                       hz, resident, count, stamp, uses, pending, fetched, protect, queued, out):
                            pending[ql, qe] = False  # no room: the landed copy is dropped
                        tick += 1
                        stamp[ql, qe] = tick
                    q_head += 1
                else:
                    out[_MOVED] += (clock - begin) / transfer_ms
                    remain[ql, qe] -= clock - begin
                    link = clock
                    break
            # A transfer on the link finishes its current chunk before anything else moves. One for this
            # layer that the router did not choose is cancelled below even if that chunk was its last.
            free = max(clock, link)
            if q_head < q_tail and link >= clock:
                ql, qe = q_layer[q_head], q_expert[q_head]
                if queued[ql, qe] and q_id[ql, qe] == q_head and remain[ql, qe] < transfer_ms:
                    done = transfer_ms - remain[ql, qe]
                    boundary = min(math.ceil(done / chunk_ms - 1e-9) * chunk_ms, transfer_ms) if chunk_ms > 0 \
                        else transfer_ms
                    step = boundary - done
                    free = max(clock, link) + step
                    out[_MOVED] += step / transfer_ms
                    remain[ql, qe] -= step
                    chosen = False
                    for j in range(k):
                        chosen = chosen or truth[t, layer, j] == qe
                    if remain[ql, qe] <= 1e-12 and (ql != layer or chosen):
                        remain[ql, qe] = 0.0
                        queued[ql, qe] = False
                        ready[ql, qe] = free
                        if stage:
                            for j in range(k):
                                protect[layer, truth[t, layer, j]] = True
                            if not _insert(ql, qe, slots, total, k, policy, nu, t if ql >= layer else t + 1, t, layer,
                                           nt, hz, resident, count, stamp, uses, pending, fetched, protect, queued,
                                           out):
                                pending[ql, qe] = False  # no room: the landed copy is dropped
                            tick += 1
                            stamp[ql, qe] = tick
            for j in range(k):
                protect[layer, truth[t, layer, j]] = True
            # The router has chosen: this layer's other prefetches still to land are cancelled.
            for e in range(num_experts):
                if queued[layer, e] and not protect[layer, e]:
                    queued[layer, e] = False
                    pending[layer, e] = False
                    if not stage:
                        resident[layer, e] = False
                        count[layer] -= 1
                    out[_CANCELLED] += 1
            # Demand, in rank order: a chosen prefetch still to land goes now, a missing expert after it
            # (or either on the CPU, when that is sooner).
            cpu = clock
            for j in range(k):
                e = truth[t, layer, j]
                out[_ACCESSES] += 1
                on_cpu[j] = False
                if not resident[layer, e] or queued[layer, e]:
                    lands = free + (remain[layer, e] if queued[layer, e] else transfer_ms * miss)
                    if cpu_ms > 0 and (cpu + cpu_ms < lands or not resident[layer, e] and not _room(
                            layer, slots, total, resident, count, protect)):  # sooner, or no slot to land in (Fiddler)
                        cpu += cpu_ms
                        on_cpu[j] = True
                        out[_CPU] += 1
                        continue
                if queued[layer, e]:
                    out[_IN_FLIGHT] += 1
                    free += remain[layer, e]
                    out[_MOVED] += remain[layer, e] / transfer_ms if transfer_ms > 0 else 1.0
                    remain[layer, e] = 0.0
                    queued[layer, e] = False
                    ready[layer, e] = free
                    if stage:  # (no room: the layer computes it from the staging buffer, uncached)
                        _insert(layer, e, slots, total, k, policy, nu, t, t, layer, nt, hz,
                                resident, count, stamp, uses, pending, fetched, protect, queued, out)
                elif resident[layer, e]:
                    out[_HITS if ready[layer, e] <= clock else _IN_FLIGHT] += 1
                else:
                    if not _insert(layer, e, slots, total, k, policy, nu, t, t, layer, nt, hz,
                                   resident, count, stamp, uses, pending, fetched, protect, queued, out):
                        raise RuntimeError("a demand fetch found no cache slot: fewer slots than top_k")
                    tick += 1
                    stamp[layer, e] = tick
                    free += transfer_ms * miss  # a lower-precision copy (miss_bits) moves this share
                    ready[layer, e] = free
                    out[_FETCHES] += 1
                    out[_MOVED] += miss
            link = max(link, free)
            start = max(clock, cpu - compute_ms)  # the layer ends when the CPU's experts are done, too
            for j in range(k):
                e = truth[t, layer, j]
                if on_cpu[j]:
                    continue
                start = max(start, ready[layer, e])
                tick += 1
                stamp[layer, e] = tick
                uses[layer, e] += 1
                if pending[layer, e]:
                    pending[layer, e] = False
                    out[_USEFUL] += 1
            out[_WAIT] += start - clock
            busy = compute_ms
            predicted = False
            for i in range(depth if width > 0 else 0):  # (no prediction: no column 0 to read)
                predicted = predicted or (layer + lookahead + i < n_layers and cand[t, layer, i, 0] >= 0)
            if width > 0 and predicted:
                busy = max(compute_ms, predictor_ms)
                issue = start + predictor_ms
                for i in range(depth):  # layer l + lookahead + i, nearest first
                    target = layer + lookahead + i
                    if target >= n_layers or cand[t, layer, i, 0] < 0:
                        continue
                    for j in range(width):
                        if cand[t, layer, i, j] >= 0:
                            protect[target, cand[t, layer, i, j]] = True
                    for j in range(width):
                        e = cand[t, layer, i, j]
                        if e >= 0 and not resident[target, e] and not queued[target, e]:
                            if not stage:
                                if not _insert(target, e, slots, total, k, policy, nu, t, t, layer, nt, hz,
                                               resident, count, stamp, uses, pending, fetched, protect, queued, out):
                                    continue  # no room to take a slot on issue: not prefetched
                                tick += 1
                                stamp[target, e] = tick
                            pending[target, e] = True
                            queued[target, e] = True
                            remain[target, e] = transfer_ms
                            q_layer[q_tail], q_expert[q_tail], q_issue[q_tail] = target, e, issue
                            q_id[target, e] = q_tail
                            q_tail += 1
                            out[_FETCHES] += 1
                            out[_PREFETCHES] += 1
                    for j in range(width):
                        if cand[t, layer, i, j] >= 0:
                            protect[target, cand[t, layer, i, j]] = False
            for j in range(k):  # the layer is done with its experts
                protect[layer, truth[t, layer, j]] = False
            out[_OVERHEAD] += busy - compute_ms
            out[_LAYERS] += 1
            clock = start + busy
    out[_TOTAL] = clock
    return out


@dataclass(frozen=True)
class Retention:
    """What `predicted` eviction reads: a predictor's rank (0: best; num_experts: not ranked) of each
    expert, from its rankings (`retention_ranks`)."""

    next_token: np.ndarray  # int16 [T, L, E]: in the next-token ranking made at (t, l); [0, 0, 0]: none
    horizons: np.ndarray  # int16 [T, L, D, E]: in the ranking for layer l + d made at (t, l); [0, 0, 0, 0]: none


def retention_ranks(grids: dict[int, np.ndarray], next_token: np.ndarray | None, num_experts: int) -> Retention:
    """`Retention` from a predictor's ranking grids ([T, L, R] expert ids, best first, -1: none): by
    horizon d, and for the next token."""

    def ranks(grid: np.ndarray) -> np.ndarray:
        out = np.full(grid.shape[:2] + (num_experts + 1,), num_experts, dtype=np.int16)  # column E: the -1s
        tok, lay, r = np.meshgrid(*(np.arange(n) for n in grid.shape), indexing="ij")
        out[tok, lay, np.where(grid >= 0, grid, num_experts)] = np.where(grid >= 0, r, num_experts)
        return out[:, :, :num_experts]

    T, L = next(iter(grids.values())).shape[:2] if grids else next_token.shape[:2]
    hz = np.zeros((0, 0, 0, 0), np.int16)
    if grids:
        hz = np.full((T, L, max(grids) + 1, num_experts), num_experts, dtype=np.int16)
        for d, grid in grids.items():
            hz[:, :, d] = ranks(grid)
    nt = ranks(next_token) if next_token is not None else np.zeros((0, 0, 0), np.int16)
    return Retention(next_token=nt, horizons=hz)


def next_uses(truth: np.ndarray, num_experts: int) -> np.ndarray:
    """int64 [T + 1, L, E]: the first token t' >= t whose layer l uses expert e (T: never), for Belady's
    eviction; row T (after the last token) is all T."""
    n_tokens, n_layers, _ = truth.shape
    nu = np.full((n_tokens + 1, n_layers, num_experts), n_tokens, dtype=np.int64)
    for t in range(n_tokens - 1, -1, -1):
        nu[t] = nu[t + 1]
        used = truth[t] >= 0
        layers, slots = np.nonzero(used)
        nu[t, layers, truth[t][used].astype(np.int64)] = t
    return nu


def simulate(truth: np.ndarray, candidates: np.ndarray | None, engine: Engine, num_experts: int,
             lookahead: int = 1, predictor_ms: float = 0.0, compiled: bool = True,
             retention: Retention | None = None) -> RunResult:
    """Replay `truth` ([T tokens, L layers, k] true experts, -1 for a missing row) through `engine`.

    `candidates` ([T, L, >= width], -1 for none) holds, for each token and layer l, the ranking made
    during layer l for layer l + lookahead; its first `engine.width` columns are prefetched. Deeper
    lookahead (the priority link): [T, L, D, >= width], slot i the ranking for layer l + lookahead
    + i (a slot of -1: none there). None: no prediction (on demand). `compiled=False` runs the
    same loop as plain Python (the benchmark's reference).
    """
    truth = np.ascontiguousarray(truth, dtype=np.int16)
    if truth.ndim != 3:
        raise ValueError(f"truth must be [tokens, layers, top_k], got shape {list(truth.shape)}")
    top_k = truth.shape[2]
    least = 1 if engine.cpu_ms > 0 and engine.queue == "priority" else top_k  # the CPU takes what the GPU cannot hold
    if engine.slots_total and engine.slots_total < top_k + engine.width:
        raise ValueError(f"slots_total must be >= top_k + width = {top_k + engine.width} (a layer's experts and a "
                         f"prefetch in flight), got {engine.slots_total}")
    if not least <= engine.slots_per_layer <= num_experts:
        raise ValueError(f"slots_per_layer must be in [{'1' if least == 1 else 'top_k'}, num_experts] = [{least}, "
                         f"{num_experts}], got {engine.slots_per_layer}")
    if candidates is None:
        cand = np.full(truth.shape[:2] + (1, 0), -1, dtype=np.int16)
    else:
        if candidates.ndim == 3:
            candidates = candidates[:, :, None]
        ranked = candidates.shape[-1]
        if not 1 <= engine.width <= min(engine.slots_per_layer, ranked):
            raise ValueError(f"width must be in [1, min(slots_per_layer, ranked experts)] = "
                             f"[1, {min(engine.slots_per_layer, ranked)}], got {engine.width}")
        if candidates.ndim != 4 or candidates.shape[:2] != truth.shape[:2]:
            raise ValueError(f"candidates must be [{truth.shape[0]}, {truth.shape[1]}, R] or [.., .., depth, R], "
                             f"got {list(candidates.shape)}")
        cand = np.ascontiguousarray(candidates[..., :engine.width], dtype=np.int16)
    if not 0 < engine.miss_fraction <= 1 or (engine.miss_fraction < 1 and engine.queue == "fifo"):
        raise ValueError(f"miss_fraction must be in (0, 1], below 1 on the priority link only, got "
                         f"{engine.miss_fraction} ({engine.queue})")
    if cand.shape[2] > 1 and engine.queue == "fifo":
        raise ValueError(f"prefetch depth {cand.shape[2]} needs the priority link (link.queue: priority)")
    for name, arr in (("truth", truth), ("candidates", cand)):
        if arr.size and (arr.min() < -1 or arr.max() >= num_experts):  # the compiled loop does not check bounds
            raise ValueError(f"{name}: expert ids must be in [0, {num_experts}) or -1, got [{arr.min()}, {arr.max()}]")
    policy = POLICIES[engine.eviction]
    nu = next_uses(truth, num_experts) if policy == BELADY else np.zeros((1, 1, 1), dtype=np.int64)
    nt, hz = np.zeros((0, 0, 0), np.int16), np.zeros((0, 0, 0, 0), np.int16)
    if policy == PREDICTED and retention is not None:
        # C-contiguous int16, as the empty ones: one compiled signature (each other layout compiles anew)
        nt = np.ascontiguousarray(retention.next_token, dtype=np.int16)
        hz = np.ascontiguousarray(retention.horizons, dtype=np.int16)
        for name, arr, shape in (("retention.next_token", nt, truth.shape[:2] + (num_experts,)),
                                 ("retention.horizons", hz, truth.shape[:2])):
            if arr.shape[0] and arr.shape[:len(shape)] != shape:
                raise ValueError(f"{name} must be [{', '.join(map(str, shape))}, ...], got {list(arr.shape)}")
        if hz.shape[0] and hz.shape[3] != num_experts:
            raise ValueError(f"retention.horizons must rank {num_experts} experts, got {hz.shape[3]}")
    if engine.queue == "fifo":
        replay = _replay if compiled else _replay.py_func
        out = replay(truth, cand[:, :, 0], num_experts, lookahead, engine.slots_per_layer, engine.slots_total, policy,
                     nu, nt, hz,
                     float(engine.transfer_ms), float(engine.compute_ms), float(predictor_ms))
    else:
        replay = _replay_priority if compiled else _replay_priority.py_func
        out = replay(truth, cand, num_experts, lookahead, engine.slots_per_layer, engine.slots_total, policy, nu, nt,
                     hz,
                     float(engine.transfer_ms), float(engine.chunk_ms), float(engine.compute_ms), float(predictor_ms),
                     engine.slot_on == "land", float(engine.cpu_ms), float(engine.miss_fraction))
    counts = {name: int(out[i]) for name, i in (("layers", _LAYERS), ("missing_layers", _MISSING),
                                                ("accesses", _ACCESSES), ("hits", _HITS), ("in_flight", _IN_FLIGHT),
                                                ("fetches", _FETCHES),
                                                ("prefetches", _PREFETCHES), ("useful_prefetches", _USEFUL),
                                                ("refetches", _REFETCHES), ("cancelled", _CANCELLED),
                                                ("cpu_experts", _CPU))}
    return RunResult(engine=engine, tokens=truth.shape[0], wait_ms=float(out[_WAIT]),
                     predictor_overhead_ms=float(out[_OVERHEAD]), total_ms=float(out[_TOTAL]),
                     moved_experts=float(out[_MOVED]), **counts)


def perfect_candidates(truth: np.ndarray, lookahead: int, depth: int = 1) -> np.ndarray:
    """The `perfect` bound's prefetch: at layer l, the true experts of layer l + lookahead (-1 past the
    end); with `depth` > 1, [T, L, depth, k]: those of layers l + lookahead .. l + lookahead + depth - 1."""
    T, L, k = truth.shape
    cand = np.full((T, L, depth, k), -1, dtype=truth.dtype)
    for i in range(depth):
        d = lookahead + i
        if d < L:
            cand[:, : L - d, i] = truth[:, d:]
    return cand[:, :, 0] if depth == 1 else cand


# --------------------------------------------------------------------------- the replay's arrays


@dataclass
class Replay:
    """The test sequences as the engine decodes them: one row per token, sequence after sequence."""

    truth: np.ndarray  # int16 [T, L, k]: true experts, highest weight first; -1 where the trace has no row
    rankings: dict[str, np.ndarray]  # name -> int16 [T, L, R]: the ranking made at layer l for l + lookahead; -1: none
    num_experts: int
    lookahead: int
    sequences: int
    predicted_share: float  # of the steps that could carry a prediction (row present, l + lookahead < L), those that do
    # name -> horizon d -> int16 [T, L, R]: its ranking made at layer l for layer l + d (a later horizon)
    ahead: dict[str, dict[int, np.ndarray]] = dataclasses.field(default_factory=dict)
    # name -> int16 [T, L, R]: its ranking made at (t, l) of the next token's experts at layer l
    next_token: dict[str, np.ndarray] = dataclasses.field(default_factory=dict)

    @property
    def tokens(self) -> int:
        return self.truth.shape[0]

    @property
    def missing_layers(self) -> int:
        return int((self.truth[:, :, 0] < 0).sum())


def build_replay(traces: Traces, predictions: Predictions, traces_where: str = "traces",
                 predictions_where: str = "predictions") -> Replay:
    """The test sequences' true experts at every layer (from the trace) and each predictor's rankings.

    The sequences are those of the predictions file, in its order; each sequence's tokens are
    replayed in token_pos order, every token the trace has for it.
    """
    tm, pm = traces.meta, predictions.meta
    for name in ("num_layers", "num_experts", "top_k"):
        if getattr(tm, name) != getattr(pm, name):
            raise PredictionsError(f"{predictions_where}: {name} = {getattr(pm, name)}, but {traces_where} has "
                                   f"{getattr(tm, name)}: were they written from the same trace?")
    if len(predictions) == 0:
        raise PredictionsError(f"{predictions_where}: no test samples to replay")
    _, first = np.unique(predictions.seq_id, return_index=True)
    seqs = predictions.seq_id[np.sort(first)]
    absent = np.setdiff1d(seqs, traces.seq_id)
    if len(absent):
        raise PredictionsError(f"{predictions_where}: sequence {absent[0]} is not in {traces_where}")
    # Rank each trace row's sequence by its place in the test order; rows of other sequences drop out.
    order = np.argsort(seqs, kind="stable")
    pos = np.searchsorted(seqs[order], traces.seq_id)
    in_test = np.zeros(len(traces), dtype=bool)
    inside = pos < len(seqs)
    in_test[inside] = seqs[order][pos[inside]] == traces.seq_id[inside]
    seq_rank = order[pos[in_test]].astype(np.int64)
    token_key = (seq_rank << 32) | traces.token_pos[in_test].astype(np.int64)
    tokens, token_index = np.unique(token_key, return_inverse=True)
    num_layers, k = tm.num_layers, tm.top_k
    truth = np.full((len(tokens), num_layers, k), -1, dtype=np.int16)
    truth[token_index, traces.layer[in_test].astype(np.int64)] = traces.experts[in_test]

    p_rank = order[np.searchsorted(seqs[order], predictions.seq_id)].astype(np.int64)
    p_key = (p_rank << 32) | predictions.token_pos.astype(np.int64)
    p_token = np.minimum(np.searchsorted(tokens, p_key), len(tokens) - 1)
    unknown = tokens[p_token] != p_key
    p_layer = predictions.layer.astype(np.int64)
    unknown |= truth[p_token, p_layer, 0] < 0
    if unknown.any():
        row = int(np.flatnonzero(unknown)[0])
        raise PredictionsError(f"{predictions_where}: row {row}: (seq_id {predictions.seq_id[row]}, token_pos "
                               f"{predictions.token_pos[row]}, layer {predictions.layer[row]}) has no row in "
                               f"{traces_where}")
    def as_grid(ranks: np.ndarray) -> np.ndarray:
        grid = np.full((len(tokens), num_layers, ranks.shape[1]), -1, dtype=np.int16)
        grid[p_token, p_layer] = ranks
        return grid

    rankings = {name: as_grid(ranks) for name, ranks in predictions.rankings.items()}
    ahead = {name: {int(key[1:]): as_grid(ranks) for key, ranks in by_target.items() if key.startswith("h")}
             for name, by_target in predictions.targets.items()}
    eligible = int((truth[:, : num_layers - pm.lookahead, 0] >= 0).sum())
    replay = Replay(truth=truth, rankings=rankings, num_experts=tm.num_experts, lookahead=pm.lookahead,
                    sequences=len(seqs), predicted_share=len(predictions) / eligible if eligible else 0.0,
                    ahead={name: by_d for name, by_d in ahead.items() if by_d},
                    next_token={name: as_grid(by_target["next_token"])
                                for name, by_target in predictions.targets.items() if "next_token" in by_target})
    log.info("replay: %d sequences, %d tokens x %d layers; %d (token, layer) rows missing from the trace (skipped); "
             "%.1f%% of the steps that could carry a prediction have one", replay.sequences, replay.tokens, num_layers,
             replay.missing_layers, 100 * replay.predicted_share)
    return replay


# --------------------------------------------------------------------------- runs, sweeps, metrics


def run_all(replay: Replay, engine: Engine, predictor_ms: dict[str, float] | None = None) -> dict[str, RunResult]:
    """The bounds and every predictor under one engine; `predictor_ms` by name (absent: 0)."""
    predictor_ms = predictor_ms or {}
    common = {"num_experts": replay.num_experts, "lookahead": replay.lookahead}
    true_next = perfect_candidates(replay.truth, replay.lookahead, engine.depth)
    predictors = engine  # with `predicted` eviction the bounds have no ranks: layer order, then LRU
    all_k = dataclasses.replace(engine, width=min(replay.truth.shape[2], engine.slots_per_layer))
    on_demand = simulate(replay.truth, None, engine, **common)
    results = {
        "on_demand": on_demand,
        "perfect": simulate(replay.truth, true_next, all_k, **common),
        "belady": simulate(replay.truth, None, dataclasses.replace(engine, eviction="belady"), **common),
        "clairvoyant": simulate(replay.truth, true_next, dataclasses.replace(all_k, eviction="belady"), **common),
        "compute_floor": dataclasses.replace(  # every expert resident: each layer only computes
            on_demand, hits=on_demand.accesses, in_flight=0, fetches=0, prefetches=0, useful_prefetches=0,
            refetches=0, cancelled=0, moved_experts=0.0, wait_ms=0.0, predictor_overhead_ms=0.0,
            total_ms=on_demand.layers * engine.compute_ms),
    }
    for name, grid in replay.rankings.items():
        retention = retention_for(replay, name) if predictors.eviction == "predicted" else None
        results[name] = simulate(replay.truth, depth_candidates(replay, name, grid, engine.depth), predictors,
                                 predictor_ms=predictor_ms.get(name, 0.0), retention=retention, **common)
    return results


def retention_for(replay: Replay, name: str) -> Retention:
    """What `predicted` eviction reads of a predictor: every horizon's ranking and its next-token one."""
    grids = {replay.lookahead: replay.rankings[name], **replay.ahead.get(name, {})}
    return retention_ranks(grids, replay.next_token.get(name), replay.num_experts)


def depth_candidates(replay: Replay, name: str, grid: np.ndarray, depth: int) -> np.ndarray:
    """A predictor's rankings for prefetch depth `depth`: [T, L, R] at depth 1, else [T, L, depth, R],
    slot i its ranking for layer l + lookahead + i (all -1 where it has no such horizon)."""
    if depth == 1:
        return grid
    out = np.full(grid.shape[:2] + (depth, grid.shape[2]), -1, dtype=np.int16)
    out[:, :, 0] = grid
    for i in range(1, depth):
        d = replay.lookahead + i
        if d in replay.ahead.get(name, {}):
            out[:, :, i] = replay.ahead[name][d]
    return out


def depths(replay: Replay, name: str, depth: int) -> int:
    """How many of the layers l + lookahead .. l + lookahead + depth - 1 a predictor has a ranking for."""
    return 1 + sum(replay.lookahead + i in replay.ahead.get(name, {}) for i in range(1, depth))


def sweep_values(low: int, high: int, values: list[int] | None) -> list[int]:
    """`values` as given, or every integer in [low, high] (at most MAX_SWEEP_VALUES, evenly spread)."""
    if values is not None:
        return sorted(values)
    if high - low + 1 <= MAX_SWEEP_VALUES:
        return list(range(low, high + 1))
    return sorted({int(round(v)) for v in np.linspace(low, high, MAX_SWEEP_VALUES)})


def sweep(replay: Replay, engines: list[Engine], predictor_ms: dict[str, float] | None = None,
          desc: str = "sweep") -> list[dict[str, RunResult]]:
    """`run_all` for each engine, with a progress bar."""
    return [run_all(replay, engine, predictor_ms) for engine in tqdm(engines, desc=desc, unit="config")]


@dataclass
class Study:
    """What the stage reports: every predictor at the engine, and the two sweeps the plots draw."""

    results: dict[str, RunResult]
    slots: list[int]
    by_slots: list[dict[str, RunResult]]  # at the engine's width
    widths: list[int]
    by_width: list[dict[str, RunResult]]  # at the engine's slots

    @property
    def replays(self) -> int:
        return len(self.results) * (1 + len(self.slots) + len(self.widths))


def study(replay: Replay, engine: Engine, predictor_ms: dict[str, float] | None = None,
          slots: list[int] | None = None, widths: list[int] | None = None) -> Study:
    """`run_all` at `engine`, then over cache slots (default: max(top_k, width) .. num_experts) and over
    prefetch widths (default: 1 .. slots_per_layer, at most the experts a prediction ranks)."""
    slots = sweep_values(max(replay.truth.shape[2], engine.width), replay.num_experts, slots)
    ranked = min((grid.shape[2] for grid in replay.rankings.values()), default=engine.slots_per_layer)
    top_k, layers = replay.truth.shape[2], replay.truth.shape[1]
    room = engine.slots_total - top_k if engine.slots_total else engine.slots_per_layer
    widths = sweep_values(1, min(engine.slots_per_layer, ranked, room), widths)

    def at_slots(s: int) -> Engine:  # a shared cache: the same memory, s per layer on average
        return dataclasses.replace(engine, slots_total=max(s * layers, top_k + engine.width)) if engine.slots_total \
            else dataclasses.replace(engine, slots_per_layer=s)

    return Study(
        results=run_all(replay, engine, predictor_ms),
        slots=slots,
        by_slots=sweep(replay, [at_slots(s) for s in slots], predictor_ms, desc="slots sweep"),
        widths=widths,
        by_width=sweep(replay, [dataclasses.replace(engine, width=w) for w in widths], predictor_ms,
                       desc="width sweep"),
    )


def gap_closed(results: dict[str, RunResult], name: str) -> float | None:
    """(stall on_demand - stall name) / (stall on_demand - stall perfect); None when perfect stalls no less
    than on_demand (nothing to close: a fast link or a cache holding every needed expert)."""
    base, best = results["on_demand"].stall_ms, results["perfect"].stall_ms
    gap = base - best
    if gap <= 1e-9 * max(base, 1.0):
        return None
    return (base - results[name].stall_ms) / gap


def prefetch_metrics(results: dict[str, RunResult]) -> dict[str, dict[str, float | None]]:
    """Per bound and predictor: what `metrics/prefetch.json` holds."""
    base_ms = results["on_demand"].ms_per_token
    return {name: {
        "hit_rate": r.hit_rate,
        "prefetch_precision": r.prefetch_precision,
        "mb_per_token": r.mb_per_token,
        "stall_ms_per_token": r.stall_ms_per_token,
        "ms_per_token": r.ms_per_token,
        "speedup_vs_on_demand": base_ms / r.ms_per_token,
        "gap_closed": gap_closed(results, name),
    } for name, r in results.items()}


@dataclass
class SimulationResult:
    metrics: dict[str, Any]  # metrics/prefetch.json
    slots_rows: list[list[Any]]  # SLOTS_COLUMNS: slots, predictor, then those RunResult properties
    width_rows: list[list[Any]]  # WIDTH_COLUMNS: width, predictor, then those RunResult properties


def simulate_prefetch(traces: Traces, predictions: Predictions, sim: SimulateParams, traces_where: str = "traces",
                      predictions_where: str = "predictions") -> SimulationResult:
    """The simulate_prefetch stage: every predictor and bound at the configured engine, and the sweeps."""
    tm = traces.meta
    unknown = sorted(set(sim.prefetch.predictor_ms) - set(predictions.rankings))
    if unknown:
        raise ParamsError(f"simulate.prefetch.predictor_ms.{unknown[0]}",
                          f"no such predictor in {predictions_where} (have {', '.join(predictions.rankings)})")
    replay = build_replay(traces, predictions, traces_where, predictions_where)
    engine = Engine.from_params(sim, tm)
    predictor_ms = {name: sim.prefetch.ms_for(name) for name in predictions.rankings}
    model = sim.model if sim.model != "auto" else find_model(tm.source, tm.num_experts, tm.top_k)
    log.info("engine: preset %s, model %s (trace source %r), %s; one expert %.2f ms over the link, %.3f ms compute "
             "per layer", sim.preset, model, tm.source, engine, engine.transfer_ms, engine.compute_ms)
    if engine.slots_per_layer == tm.num_experts:
        log.info("the GPU holds every expert (%d per layer): nothing to fetch, every policy is the compute floor",
                 engine.slots_per_layer)
    start = time.perf_counter()
    done = study(replay, engine, predictor_ms, sim.sweep.slots, sim.sweep.width)
    elapsed = time.perf_counter() - start
    steps = done.replays * replay.tokens * replay.truth.shape[1]
    log.info("%d replays of %d token-layer steps each in %.1fs (%.2fM steps/s, JIT compile or cache load included)",
             done.replays, replay.tokens * replay.truth.shape[1], elapsed, steps / elapsed / 1e6)
    metrics: dict[str, Any] = prefetch_metrics(done.results)
    if engine.depth > 1:  # how deep each predictor could look (a horizon it lacks: no prefetch there)
        for name in predictions.rankings:
            metrics[name]["depth"] = depths(replay, name, engine.depth)
            if metrics[name]["depth"] < engine.depth:
                log.info("%s: rankings for %d of the %d layers ahead (features.horizons); it prefetches no deeper",
                         name, metrics[name]["depth"], engine.depth)
    for name, m in metrics.items():
        gap = "-" if m["gap_closed"] is None else f"{m['gap_closed']:.3f}"
        log.info("%-16s hit %.3f  stall %8.2f ms/token  %8.1f MB/token  speedup %.3f  gap closed %s", name,
                 m["hit_rate"], m["stall_ms_per_token"], m["mb_per_token"], m["speedup_vs_on_demand"], gap)
    metrics["replay"] = {"sequences": replay.sequences, "tokens": replay.tokens,
                         "missing_layers": replay.missing_layers, "predicted_share": replay.predicted_share}
    metrics["engine"] = {"expert_mb": engine.expert_mb, "transfer_ms": engine.transfer_ms,
                         "compute_ms_per_layer": engine.compute_ms, "slots_per_layer": engine.slots_per_layer,
                         "width": engine.width} | ({"depth": engine.depth} if engine.depth > 1 else {}) \
        | ({"cpu_ms_per_expert": engine.cpu_ms} if engine.cpu_ms > 0 else {}) \
        | ({"slots_total": engine.slots_total} if engine.slots_total else {}) \
        | ({"miss_fraction": engine.miss_fraction} if engine.miss_fraction < 1 else {})
    names = [*BOUNDS, *predictions.rankings]
    return SimulationResult(
        metrics,
        [[s, n, *(getattr(r[n], c) for c in SLOTS_COLUMNS[2:])]
         for s, r in zip(done.slots, done.by_slots) for n in names],
        [[w, n, *(getattr(r[n], c) for c in WIDTH_COLUMNS[2:])]
         for w, r in zip(done.widths, done.by_width) for n in names])
