"""A plain-Python replay of the priority link (`link.queue: priority`), written apart from the
compiled loop in `routecast.sim.prefetch` and step by step, so the two can be compared on random
cases (tests/test_prefetch.py). Objects and lists instead of arrays; the same engine rules:

- the link moves one transfer at a time: demand fetches first, then queued prefetches in order
  of issue; a prefetch on the link finishes its current chunk before a demand starts;
- when layer l's router has chosen, every prefetch for layer l still to land that it did not
  choose is cancelled (its moved chunks still count; also one whose last chunk was on the link),
  and one it chose is moved as a demand;
- a prefetch takes its cache slot when issued, or with `stage` when it lands; with a ranking per
  depth (cand [T, L, D, W]) the layers l + lookahead .. l + lookahead + D - 1 are prefetched,
  nearest first;
- with `cpu_ms` > 0 a needed expert not resident is computed on the CPU (the layer's such experts
  one after another from its start) when that ends before its transfer would land, or when the
  layer's cache holds only experts the layer is using (fewer slots than top_k); the layer ends
  when the GPU and the CPU are both done;
- a full cache evicts the least recently used expert of the layer (`lfu`: the least used so far;
  `belady`: the one next used farthest ahead; `predicted`: the one the predictor ranks lowest for
  that layer's next use, see `keep_rank`; ties to the least recent), never one the current layer
  (or the prefetch being issued) holds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class Transfer:
    layer: int
    expert: int
    issued: float
    left: float  # ms still to move
    live: bool = True


def next_use(truth, t: int, layer: int, e: int) -> int:
    """The first token t' >= t whose layer uses e (len(truth): never): what Belady looks at."""
    for u in range(t, len(truth)):
        if e in [int(x) for x in truth[u, layer]]:
            return u
    return len(truth)


def keep_rank(horizons: dict, next_token, num_experts: int, t: int, cur: int, layer: int, e: int) -> int:
    """Where the predictor, at token t's layer `cur`, ranks e for `layer`'s next use (num_experts: not
    ranked): in its ranking of this token's `layer` made at `cur` if it has that horizon and ranks e
    there, else in its next-token ranking of `layer` (made at this token when `layer` <= `cur`, the
    next use being the next token's; at the previous token for a layer still ahead)."""
    d = layer - cur
    if d > 0 and d in horizons:
        row = [int(x) for x in horizons[d][t, cur] if x >= 0]
        if e in row:
            return row.index(e)
    if next_token is not None and (d <= 0 or t > 0):
        row = [int(x) for x in next_token[t if d <= 0 else t - 1, layer] if x >= 0]
        return row.index(e) if e in row else num_experts
    return num_experts


def replay_priority(truth, cand, num_experts: int, lookahead: int, slots: int, eviction: str, transfer_ms: float,
                    chunk_ms: float, compute_ms: float, predictor_ms: float, stage: bool,
                    cpu_ms: float = 0.0, horizons: dict | None = None, next_token=None,
                    total: int = 0, miss: float = 1.0) -> dict[str, float]:
    """`horizons` (d -> [T, L, R] rankings made at (t, l) for layer l + d) and `next_token` ([T, L, R]):
    what `predicted` eviction reads; `total` > 0: one cache of that many experts for every layer;
    `miss` < 1: a demand fetch moves that share of an expert (a lower-precision copy)."""
    n_tokens, n_layers, k = truth.shape
    if cand.ndim == 3:  # one ranking per step: for layer l + lookahead
        cand = cand[:, :, None]
    width = cand.shape[3]  # cand [T, L, depth, W]: slot i for layer l + lookahead + i
    cache = [dict() for _ in range(n_layers)]  # expert -> when it landed (or lands)
    recency: list[tuple[int, int]] = []  # (layer, expert), least recent first
    uses = [[0] * num_experts for _ in range(n_layers)]
    prefetched = [set() for _ in range(n_layers)]  # prefetched, not used since
    ever = [set() for _ in range(n_layers)]
    queue: list[Transfer] = []
    on_link: dict[tuple[int, int], Transfer] = {}
    c = dict.fromkeys(("hits", "in_flight", "accesses", "fetches", "prefetches", "useful", "refetches", "wait",
                       "overhead", "layers", "missing", "cancelled", "moved", "cpu"), 0.0)
    clock = link = 0.0

    def moved(ms: float) -> float:
        return ms / transfer_ms if transfer_ms > 0 else 1.0

    def touch(layer: int, e: int) -> None:
        if (layer, e) in recency:
            recency.remove((layer, e))
        recency.append((layer, e))

    def evictable(layer: int, keep: set) -> list[tuple[int, int]]:
        """The residents `layer`'s insertion may evict, least recent first: its layer's (or, with a shared
        budget, every layer's) not in `keep` ((layer, expert) pairs in use or being prefetched)."""
        return [(lv, v) for lv, v in recency if v in cache[lv] and (lv, v) not in keep and (total or lv == layer)]

    def full(layer: int) -> bool:
        return sum(len(x) for x in cache) >= total if total else len(cache[layer]) >= slots

    def insert(layer: int, e: int, keep: set, when: float, now: int) -> bool:
        """False, changing nothing, when the cache is full of experts in `keep`."""
        if full(layer):
            candidates = evictable(layer, keep)
            if not candidates:
                return False
            if eviction == "lfu":
                least = min(uses[lv][v] for lv, v in candidates)
                candidates = [(lv, v) for lv, v in candidates if uses[lv][v] == least]
            elif eviction == "belady":
                def ahead(lv: int, v: int) -> int:  # shared: in (token, layer) steps after the one being decoded
                    if total:
                        return next_use(truth, t if lv > decoding else t + 1, lv, v) * n_layers + lv
                    return next_use(truth, now, lv, v)
                farthest = max(ahead(lv, v) for lv, v in candidates)
                candidates = [(lv, v) for lv, v in candidates if ahead(lv, v) == farthest]
            elif eviction == "predicted":  # t and decoding: the token and layer being decoded
                def key(lv: int, v: int) -> tuple:
                    """Larger goes first: the expert's next use as the predicted sets say, in (token, layer)
                    steps: its layer's next visit (this token's if still ahead, else the next token's), or
                    the visit after it if the predictor ranks it outside the top k; then its rank (none
                    given: every rank 0)."""
                    rank = keep_rank(horizons or {}, next_token, num_experts, t, decoding, lv, v) \
                        if horizons or next_token is not None else 0
                    return ((t if lv > decoding else t + 1) * n_layers + lv + (n_layers if rank >= k else 0), rank)
                worst = max(key(lv, v) for lv, v in candidates)
                candidates = [(lv, v) for lv, v in candidates if key(lv, v) == worst]
            lv, victim = candidates[0]
            del cache[lv][victim]
            prefetched[lv].discard(victim)
            if (lv, victim) in on_link:
                on_link.pop((lv, victim)).live = False
                c["cancelled"] += 1
        cache[layer][e] = when
        if e in ever[layer]:
            c["refetches"] += 1
        ever[layer].add(e)
        return True

    def land(tr: Transfer, when: float, keep: set, now: int) -> None:
        tr.live = False
        on_link.pop((tr.layer, tr.expert))
        if stage:
            if not insert(tr.layer, tr.expert, keep, when, now):
                prefetched[tr.layer].discard(tr.expert)  # no room: dropped
            touch(tr.layer, tr.expert)
        else:
            cache[tr.layer][tr.expert] = when

    for t in range(n_tokens):
        for layer in range(n_layers):
            decoding = layer
            if truth[t, layer, 0] < 0:
                c["missing"] += 1
                continue
            while queue:  # the link until the layer starts
                tr = queue[0]
                if not tr.live:
                    queue.pop(0)
                    continue
                begin = max(link, tr.issued)
                if begin >= clock:
                    break
                if begin + tr.left <= clock:
                    link = begin + tr.left
                    c["moved"] += moved(tr.left)
                    tr.left = 0.0
                    land(tr, link, set(), t if tr.layer >= layer else t + 1)
                    queue.pop(0)
                else:
                    c["moved"] += (clock - begin) / transfer_ms
                    tr.left -= clock - begin
                    link = clock
                    break
            chosen = [int(e) for e in truth[t, layer]]
            free = max(clock, link)
            head = next((tr for tr in queue if tr.live), None)
            if head is not None and link >= clock and head.left < transfer_ms:
                done = transfer_ms - head.left
                boundary = min(math.ceil(done / chunk_ms - 1e-9) * chunk_ms, transfer_ms) if chunk_ms > 0 \
                    else transfer_ms
                step = boundary - done
                free = max(clock, link) + step
                c["moved"] += step / transfer_ms
                head.left -= step
                if head.left <= 1e-12 and (head.layer != layer or head.expert in chosen):  # else: cancelled below
                    head.left = 0.0
                    land(head, free, {(layer, x) for x in chosen},
                         t if head.layer >= layer else t + 1)
            for (tl, e), tr in list(on_link.items()):  # the router has chosen
                if tl == layer and e not in chosen:
                    tr.live = False
                    del on_link[(tl, e)]
                    prefetched[layer].discard(e)
                    if not stage:
                        del cache[layer][e]
                    c["cancelled"] += 1
            cpu = clock  # the CPU computes this layer's experts it takes one after another
            gpu = []
            for e in chosen:
                c["accesses"] += 1
                if e not in cache[layer] or (layer, e) in on_link:
                    lands = free + (on_link[(layer, e)].left if (layer, e) in on_link else transfer_ms * miss)
                    no_room = full(layer) and not evictable(layer, {(layer, x) for x in chosen})
                    if cpu_ms > 0 and (cpu + cpu_ms < lands or e not in cache[layer] and no_room):
                        cpu += cpu_ms
                        c["cpu"] += 1
                        continue
                gpu.append(e)
                if (layer, e) in on_link:
                    c["in_flight"] += 1
                    tr = on_link[(layer, e)]
                    free += tr.left
                    c["moved"] += moved(tr.left)
                    tr.left = 0.0
                    tr.live = False
                    del on_link[(layer, e)]
                    if stage:
                        insert(layer, e, {(layer, x) for x in chosen}, free, t)
                    else:
                        cache[layer][e] = free
                elif e in cache[layer]:
                    c["hits" if cache[layer][e] <= clock else "in_flight"] += 1
                else:
                    if not insert(layer, e, {(layer, x) for x in chosen}, 0.0, t):
                        raise RuntimeError("a demand fetch found no cache slot")
                    touch(layer, e)
                    free += transfer_ms * miss
                    cache[layer][e] = free
                    c["fetches"] += 1
                    c["moved"] += miss
            link = max(link, free)
            start = max([clock, cpu - compute_ms] + [cache[layer][e] for e in gpu])
            for e in gpu:
                touch(layer, e)
                uses[layer][e] += 1
                if e in prefetched[layer]:
                    prefetched[layer].discard(e)
                    c["useful"] += 1
            c["wait"] += start - clock
            busy = compute_ms
            plans = [(layer + lookahead + i, [int(e) for e in cand[t, layer, i] if e >= 0])
                     for i in range(cand.shape[2])]
            plans = [(target, named) for target, named in plans if target < n_layers and named]
            if width > 0 and plans:
                busy = max(compute_ms, predictor_ms)
                issue = start + predictor_ms
            for target, named in plans if width > 0 else []:
                for e in named:
                    if e in cache[target] or (target, e) in on_link:
                        continue
                    if not stage:
                        if not insert(target, e, {(target, x) for x in named} | {(layer, x) for x in chosen},
                                      math.inf, t):
                            continue
                        touch(target, e)
                    prefetched[target].add(e)
                    tr = Transfer(target, e, issue, transfer_ms)
                    queue.append(tr)
                    on_link[(target, e)] = tr
                    c["fetches"] += 1
                    c["prefetches"] += 1
            c["overhead"] += busy - compute_ms
            c["layers"] += 1
            clock = start + busy
    c["total"] = clock
    return c
