"""Continuous batching: up to ``B`` requests decode together on the mesh.

Requests start in their given order. Between two decode steps, waiting requests are admitted
while fewer than ``max_batch`` run and their KV caches fit what is left of the pool; their
prompts are prefilled together, up to :data:`PREFILL_TOKENS` tokens in one prefill
(:meth:`llm.engine.model.MeshModel.prefill_sequences`: each prompt attends to itself only),
their first tokens are picked from the prompts' last logits, and they join the next step. A
decode step runs every running sequence at once
(:meth:`llm.engine.model.MeshModel.decode_sequences`, each over its own KV cache); each
sequence stops on its own (a stop token, its token limit, the context, or its cache full:
``stopped_by`` says which, as for one request), frees its cache, and makes room for the next
request. A request that does not fit waits for one that finishes; none is dropped.

Each sequence's tokens are the tokens it gets alone (greedy on the mesh, or its own seeded
sampler on the host); its figures are its own: TTFT is its prefill and first pick (wall clock
and ledger; the prefill it shared with the prompts admitted with it), its decode time covers
the steps it took part in, each step whole (a wafer step gives every sequence of the batch
one token).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .generate import Generation

#: ``generate --batch``'s default ``--max-batch``: on 2 ranks of a quiet 2-core machine, 32
#: SmolLM2 requests (prompts of 5-52 tokens, 32 new tokens each) took 57.5 s one after the
#: other, and 25.2 / 17.9 / 14.1 s with 8 / 16 / 32 decoding together (0.44 / 0.31 / 0.25x);
#: 16 keeps most of the gain with half the caches of 32.
DEFAULT_MAX_BATCH = 16

#: Most prompt tokens prefilled together (a longer prompt is prefilled alone): a prefill's
#: scores grow with the square of its tokens, and a batch of short prompts gains most.
PREFILL_TOKENS = 512


@dataclass
class Job:
    """One request for :func:`run_continuous`."""

    key: Any
    prompt_ids: list
    max_new_tokens: int
    sampler: object = None
    stop_ids: frozenset = frozenset()


@dataclass
class _Running:
    job: Job
    seq: Any  # llm.engine.model.Sequence
    gen: Generation
    t_first: float = 0.0
    next_token: int = -1
    stop_ids: set = field(default_factory=set)


def slots_needed(model, jobs: Iterable[Job], kv_capacity: int | None) -> int:
    """KV slots per core of each sequence's cache: ``kv_capacity`` if given, else enough for
    the largest request's prompt and new tokens (one capacity for all: a batch step reads the
    caches of its sequences as one block)."""
    if kv_capacity is not None:
        return kv_capacity
    return max(model.capacity_for(len(j.prompt_ids) + j.max_new_tokens) for j in jobs)


def run_continuous(
    model,
    jobs: list[Job],
    max_batch: int,
    capacity: int,
    pool: int | None = None,
    on_done: Callable[[Job, Generation], None] | None = None,
    prefill_tokens: int = PREFILL_TOKENS,
) -> list[Generation]:
    """Run ``jobs`` with up to ``max_batch`` decoding together (collective over the ranks).

    Parameters
    ----------
    capacity : int
        KV slots per core of every sequence's own cache.
    pool : int, optional
        KV slots per core that all running sequences share (default: ``max_batch`` caches);
        at least ``capacity``.
    on_done : callable, optional
        ``(job, generation)`` as each request finishes (in completion order).
    prefill_tokens : int
        Most prompt tokens prefilled together (1: every prompt alone).

    Returns
    -------
    list of Generation
        In the order of ``jobs``.
    """
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    pool = capacity * max_batch if pool is None else pool
    if capacity > pool:
        raise ValueError(f"a KV pool of {pool} slots per core holds no cache of {capacity}")
    width = min(max_batch, pool // capacity)
    led = model.ledgers()
    dled = led["decode"]
    limit = model.config.max_position_embeddings
    waiting = deque(enumerate(jobs))
    running: list[tuple[int, _Running]] = []
    done: dict[int, Generation] = {}

    def finish(i: int, r: _Running, why: str | None) -> None:
        if why is not None:
            r.gen.stopped_by = why
        r.gen.decode_s = time.perf_counter() - r.t_first
        done[i] = r.gen
        if on_done is not None:
            on_done(r.job, r.gen)

    def after_token(i: int, r: _Running, token: int) -> bool:
        """Record ``token``; whether the sequence goes on (else it is finished)."""
        r.gen.new_ids.append(token)
        why = None
        if token in r.stop_ids:
            why = "stop_token"
        elif len(r.gen.new_ids) >= r.job.max_new_tokens:
            why = "max_new_tokens"
        elif r.seq.position >= limit:
            why = "context_full"
        elif r.seq.cache.full:
            why = "kv_full"
        if why is None:
            r.next_token = token
            return True
        finish(i, r, why)
        return False

    def admit(group: list[tuple[int, Job]]) -> None:
        """Prefill ``group``'s prompts together, pick their first tokens, start them."""
        new = []
        for i, job in group:
            r = _Running(job, model.open_sequence(capacity), Generation(list(job.prompt_ids)))
            r.stop_ids = {int(s) for s in job.stop_ids}
            new.append((i, r))
        c0 = led["prefill"].cycles + dled.cycles
        t0 = time.perf_counter()
        logits = model.prefill_sequences(
            [r.seq for _, r in new], [list(r.job.prompt_ids) for _, r in new]
        )
        tokens = model.pick_sequences(logits, [r.job.sampler for _, r in new])
        t1 = time.perf_counter()
        modeled = dled.device.seconds(led["prefill"].cycles + dled.cycles - c0)
        for (i, r), token in zip(new, tokens):
            r.t_first, r.gen.ttft_s, r.gen.modeled_prefill_s = t1, t1 - t0, modeled
            if after_token(i, r, token):
                running.append((i, r))

    while waiting or running:
        group: list[tuple[int, Job]] = []
        size = 0
        while waiting and len(running) + len(group) < width:  # admit between decode steps
            n = len(waiting[0][1].prompt_ids)
            if group and size + n > prefill_tokens:
                admit(group)  # in order: the prompts so far first
                group, size = [], 0
            group.append(waiting.popleft())
            size += n
        if group:
            admit(group)
        if not running:
            continue
        c0 = dled.cycles
        seqs = [r.seq for _, r in running]
        logits = model.decode_sequences(seqs, [r.next_token for _, r in running])
        tokens = model.pick_sequences(logits, [r.job.sampler for _, r in running])
        step = dled.device.seconds(dled.cycles - c0)
        still = []
        for (i, r), token in zip(running, tokens):
            r.gen.modeled_decode_s += step
            if after_token(i, r, token):
                still.append((i, r))
        running = still  # finished sequences' caches are dropped: their slots are free
    return [done[i] for i in range(len(jobs))]
