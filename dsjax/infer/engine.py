"""A serving engine: continuous batching over a paged latent cache.

    engine = Engine(cfg, variables, tokenizer, max_batch=16, page_size=16)
    rid = engine.add_request(prompt_ids, SamplingParams(max_tokens=64, temperature=0.7, seed=1))
    while engine.has_work():
        for out in engine.step():   # RequestOutput: new tokens and text of one sequence, finished?
            ...

Every ``step`` (one iteration of the loop above):
  1. admit  waiting requests while a decode slot and their pages are free. A request reserves the
            pages of its prompt + max_tokens; prompt pages already cached for an earlier request
            with the same prefix are shared, not recomputed (``PageAllocator.lookup``).
  2. prefill one chunk of ``prefill_chunk`` tokens of each of the ``prefill_rows`` oldest requests
            still reading their prompts, in one call (chunked prefill: a long prompt delays the
            running decodes by a chunk per step, not by its whole length); at a prompt's end the
            request's first token is sampled and its ``n`` sequences fork, sharing every prompt page.
  3. decode one token for every running sequence, all in one batch of ``max_batch`` rows. A row
            about to write into a page it shares copies that page first (copy on write). With a
            ``speculative`` request running, the step verifies each such row's MTP drafts and
            drafts anew (``generate``'s speculative step over the paged cache, DeepSeek-V3 §2.2):
            up to D + 1 tokens per row; the other rows take one.
  4. finish sequences at EOS, a stop string or max_tokens; their pages and slots are free at once.

The model runs ``Transformer.decode`` over a ``PagedLatentCache``. A few compiled shapes serve
every request: [1 or prefill_rows, prefill_chunk] and [b, 1], b the smallest power of two that
holds the running sequences (a speculative engine adds [b, D + 1] and the prompt's drafting pass).
The MTP modules' caches are pages of the same ids: a page holds a span of positions in every layer
and module. Sampling is per row (temperature, top-k, top-p, and a key from the request's seed and
the token's index, so a seeded request samples the same tokens whatever else runs beside it).
Greedy output equals ``generate``'s. ``add_request`` and ``abort`` may be called from other
threads; ``step`` from one thread at a time.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import itertools
import threading
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from dsjax.config import ModelConfig
from dsjax.infer.generate import DecodeState, RowSampling, _draft, _speculative_step
from dsjax.infer.pages import PageAllocator
from dsjax.model.transformer import Transformer, init_paged_cache, with_pages


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """Per request, with the OpenAI API's names. temperature 0: greedy. top_k 0 / top_p 1: off.
    ``stop``: strings that end a completion (not included in its text). ``seed``: None draws one.
    ``n``: completions of the prompt, sharing its cache pages."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    seed: int | None = None
    n: int = 1
    ignore_eos: bool = False
    speculative: bool = False  # MTP drafting (an engine made with speculative=True)

    def __post_init__(self):
        problems = [
            (self.max_tokens < 1, f"max_tokens={self.max_tokens}: must be >= 1"),
            (self.temperature < 0, f"temperature={self.temperature}: must be >= 0"),
            (not 0 < self.top_p <= 1, f"top_p={self.top_p}: must be in (0, 1]"),
            (self.top_k < 0, f"top_k={self.top_k}: must be >= 0 (0: off)"),
            (self.n < 1, f"n={self.n}: must be >= 1"),
            (any(not s for s in self.stop), "stop: stop strings must not be empty"),
        ]
        for bad, message in problems:
            if bad:
                raise ValueError(message)


@dataclasses.dataclass
class RequestOutput:
    """What one step added to one sequence (``index`` of the request's ``n``)."""

    request_id: str
    index: int
    token_ids: list[int]  # new tokens this step
    text: str  # new text this step (held back while it may still turn into a stop string)
    finished: bool = False
    finish_reason: str | None = None  # "stop" (EOS or a stop string), "length", "abort"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    routes: np.ndarray | None = None  # record_routes, when finished: [L_moe, positions cached, K] experts


@dataclasses.dataclass
class _Sequence:
    request: _Request
    index: int
    tokens: list[int]  # prompt, then the tokens generated; the last is not cached yet
    pages: list[int]
    cached: int = 0  # positions 0 .. cached - 1 are in the cache
    slot: int = -1  # decode row
    sent: int = 0  # characters of text already returned
    finish_reason: str | None = None
    routes: list = dataclasses.field(default_factory=list)  # record_routes: [L_moe, W, K] per call
    drafts: list[int] = dataclasses.field(default_factory=list)  # speculative: D drafted next tokens
    hidden: np.ndarray | None = None  # speculative: h^0 of the D - 1 positions before the last cached

    @property
    def generated(self) -> list[int]:
        return self.tokens[len(self.request.prompt) :]


@dataclasses.dataclass
class _Request:
    id: str
    prompt: list[int]
    params: SamplingParams
    seed: int
    on_output: Callable[[RequestOutput], None] | None
    sequences: list[_Sequence] = dataclasses.field(default_factory=list)
    shared: int = 0  # prompt tokens found in the prefix cache
    spares: list[int] = dataclasses.field(default_factory=list)  # pages reserved for copies on write
    hidden: list = dataclasses.field(default_factory=list)  # speculative: h^0 of each prefill chunk


class Engine:
    def __init__(
        self,
        cfg: ModelConfig,
        variables,
        tokenizer,
        *,
        max_batch: int = 16,
        page_size: int = 16,
        num_pages: int | None = None,
        max_model_len: int | None = None,
        prefill_chunk: int = 128,
        prefill_rows: int = 4,
        record_routes: bool = False,
        speculative: bool = False,
    ):
        self.cfg, self.tokenizer = cfg, tokenizer
        self.max_model_len = max_model_len or cfg.max_position_embeddings
        if not 0 < self.max_model_len <= cfg.max_position_embeddings:
            raise ValueError(
                f"max_model_len={max_model_len}: must be in 1 .. max_position_embeddings={cfg.max_position_embeddings}"
            )
        if min(max_batch, page_size, prefill_chunk, prefill_rows) < 1:
            raise ValueError(
                f"max_batch={max_batch}, page_size={page_size}, prefill_chunk={prefill_chunk}, "
                f"prefill_rows={prefill_rows}: each must be >= 1"
            )
        self.max_batch, self.page_size, self.prefill_chunk = max_batch, page_size, prefill_chunk
        self.prefill_rows = min(prefill_rows, max_batch)
        self.pages_per_seq = -(-self.max_model_len // page_size)
        num_pages = num_pages or max_batch * self.pages_per_seq  # default: every slot at full length
        self.allocator = PageAllocator(num_pages, page_size)
        self.depth = cfg.num_nextn_predict_layers if speculative else 0  # D: drafts per step
        if speculative and not self.depth:
            raise ValueError("speculative=True drafts with the MTP modules: num_nextn_predict_layers is 0")
        if cfg.is_v4:
            raise ValueError(
                "the serving engine's paged latent cache is V3's; DeepSeek-V4 keeps per-layer-type caches "
                "(window, compressed entries, indexer keys) that it does not page yet: decode with dsjax.infer.generate"
            )
        if cfg.index_topk:
            raise ValueError(
                "the serving engine's paged cache does not hold DSA's indexer keys yet (index_topk > 0): "
                "decode DeepSeek-V3.2 models with dsjax.infer.generate"
            )
        if speculative and record_routes:
            raise ValueError("record_routes is for RL rollouts, which do not draft: not with speculative=True")
        self.variables = jax.device_put(variables)
        self.cache = init_paged_cache(cfg, num_pages, page_size, with_mtp=speculative)
        self.eos_id = getattr(tokenizer, "eos_id", None)
        self._inbox: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._ids = itertools.count()
        self._seeds = np.random.default_rng()
        self.waiting: collections.deque[_Request] = collections.deque()
        self.prefilling: collections.deque[_Request] = collections.deque()
        self.slots: list[_Sequence | None] = [None] * max_batch
        self.stats = collections.Counter()
        self.record_routes = record_routes and cfg.num_moe_layers > 0  # for RL: routing replay, mismatch

    # -- requests ------------------------------------------------------------------------------

    def add_request(
        self, prompt: list[int], params: SamplingParams, request_id: str | None = None, on_output=None
    ) -> str:
        """Queues a request (thread-safe); ValueError, before anything runs, if it cannot fit."""
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError("the prompt is empty: it needs at least one token")
        if any(not 0 <= t < self.cfg.vocab_size for t in prompt):
            raise ValueError(f"the prompt has token ids outside the vocabulary (0 .. {self.cfg.vocab_size - 1})")
        if len(prompt) + params.max_tokens > self.max_model_len:
            raise ValueError(
                f"the prompt ({len(prompt)} tokens) + max_tokens ({params.max_tokens}) exceeds the context "
                f"of {self.max_model_len} tokens"
            )
        if params.speculative and not self.depth:
            raise ValueError("speculative: this engine keeps no MTP caches (start it with speculative=True)")
        if params.n > self.max_batch:
            raise ValueError(f"n={params.n}: at most max_batch={self.max_batch} completions per request")
        if self._pages_needed(len(prompt), params, shared=0) > self.allocator.num_pages:
            raise ValueError(f"the request needs more cache pages than the pool's {self.allocator.num_pages}")
        rid = request_id or f"req-{next(self._ids)}"
        seed = params.seed if params.seed is not None else int(self._seeds.integers(2**31))
        request = _Request(rid, prompt, params, seed, on_output)
        with self._lock:
            self._inbox.append(("add", request))
        return rid

    def abort(self, request_id: str) -> None:
        """Ends a request (thread-safe): at the next step it finishes with finish_reason "abort"."""
        with self._lock:
            self._inbox.append(("abort", request_id))

    def has_work(self) -> bool:
        return bool(self._inbox or self.waiting or self.prefilling or any(self.slots))

    def warm_up(self) -> None:
        """Compiles every shape a step uses -- prefill [1 and prefill_rows, prefill_chunk], decode
        [b, 1] (speculative: [b, D + 1]) and first tokens [b] for each batch size b -- on empty rows,
        which write nothing. (A speculative request's drafting pass compiles per prompt chunk count.)"""
        c, cfg = self.prefill_chunk, self.cfg
        for r in sorted({1, self.prefill_rows}):
            empty = [None] * r
            tokens, positions = np.zeros((r, c), np.int32), np.full((r, c), -1, np.int32)
            _, self.cache, _, _ = _forward(
                cfg, self.variables, self.cache, tokens, positions, self._table(empty), tokens[:, 0]
            )
        b = 1
        while True:
            empty = [None] * b
            tokens, positions = np.zeros((b, 1), np.int32), np.full((b, 1), -1, np.int32)
            sampling = self._row_sampling(empty, b)
            _, self.cache, _, _ = _forward(
                cfg, self.variables, self.cache, tokens, positions, self._table(empty), tokens[:, 0], sampling
            )
            _sample(jnp.zeros((b, cfg.vocab_size), jnp.float32), sampling)  # a prompt's n first tokens
            if self.depth:
                self.cache = _without_pages(
                    _speculative_step(cfg, self.variables, sampling, self._decode_state(empty)).cache
                )
            if b == self.max_batch:
                return
            b = min(2 * b, self.max_batch)

    # -- the loop ------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Admit, prefill a chunk, decode a token for every running sequence; returns what changed."""
        outputs: list[tuple[_Request, RequestOutput]] = []
        self._read_inbox(outputs)
        self._admit()
        if self.prefilling:
            self._prefill(outputs)
        if any(self.slots):
            self._decode(outputs)
        for request, out in outputs:
            if request.on_output is not None:
                request.on_output(out)
        return [out for _, out in outputs]

    def run(self) -> dict[str, list[RequestOutput]]:
        """Steps until every queued request is finished; returns each request's outputs."""
        done: dict[str, list[RequestOutput]] = collections.defaultdict(list)
        while self.has_work():
            for out in self.step():
                done[out.request_id].append(out)
        return dict(done)

    def _read_inbox(self, outputs):
        with self._lock:
            items, self._inbox = list(self._inbox), collections.deque()
        for kind, item in items:
            if kind == "add":
                self.waiting.append(item)
            else:
                self._abort(item, outputs)

    def _abort(self, request_id: str, outputs):
        for queue in (self.waiting, self.prefilling):
            for request in list(queue):
                if request.id == request_id:
                    queue.remove(request)
                    for seq in request.sequences:
                        self._release(seq)
                    for i in range(request.params.n):
                        outputs.append(self._output(request, i, [], "", "abort"))
        for seq in self.slots:
            if seq is not None and seq.request.id == request_id:
                self._finish(seq, "abort", outputs)

    def _pages_needed(self, prompt_len: int, params: SamplingParams, shared: int) -> int:
        """Pages for the prompt (less ``shared`` cached ones), every sequence's completion, and the
        copies on write of the n sequences' shared prompt pages (``_spares``)."""
        s = self.page_size
        prompt_pages = -(-prompt_len // s)
        per_sequence = -(-(prompt_len + params.max_tokens) // s) - prompt_pages
        return prompt_pages - shared + params.n * per_sequence + self._spares(prompt_len, params)

    def _spares(self, prompt_len: int, params: SamplingParams) -> int:
        """Pages the n sequences of a request copy on write: each writes its own entries from
        position L (the partial last prompt page), and a speculative one its MTP entries from
        L - D (D = drafts); n - 1 of them copy each prompt page those spans touch."""
        s, d = self.page_size, self.depth if params.speculative else 0
        first = max(prompt_len - d, 0) // s
        return (params.n - 1) * max(0, -(-prompt_len // s) - first) if params.n > 1 else 0

    def _admit(self):
        free_slots = sum(seq is None for seq in self.slots) - sum(r.params.n for r in self.prefilling)
        while self.waiting and self.waiting[0].params.n <= free_slots:
            request = self.waiting[0]
            length, s = len(request.prompt), self.page_size
            d = self.depth if request.params.speculative else 0  # MTP entries from L - D are the request's own
            shared = self.allocator.lookup(request.prompt, max(length - 1 - d, 0) // s)  # the last token: run
            if self._pages_needed(length, request.params, len(shared)) > self.allocator.num_free:
                self.allocator.release(shared)
                return  # first come, first served: wait for pages to free
            self.waiting.popleft()
            own = self.allocator.allocate(-(-length // s) - len(shared))
            seq = _Sequence(request, 0, list(request.prompt), shared + own, cached=len(shared) * s)
            per_sequence = -(-(length + request.params.max_tokens) // s) - -(-length // s)
            seq.pages += self.allocator.allocate(per_sequence)
            request.spares = self.allocator.allocate(self._spares(length, request.params))
            request.sequences, request.shared = [seq], len(shared) * s
            self.stats["prefix_tokens_shared"] += len(shared) * s
            self.prefilling.append(request)
            free_slots -= request.params.n

    def _prefill(self, outputs):
        """The next chunk of each of the first ``prefill_rows`` requests reading their prompts, in
        one [prefill_rows, prefill_chunk] call; a request whose prompt is done forks and samples."""
        requests, c = list(self.prefilling)[: self.prefill_rows], self.prefill_chunk
        r = 1 if len(requests) == 1 else self.prefill_rows  # two compiled shapes
        tokens, positions = np.zeros((r, c), np.int32), np.full((r, c), -1, np.int32)
        last, chunks = np.zeros(r, np.int32), []
        for row, request in enumerate(requests):
            start = request.sequences[0].cached
            chunk = request.prompt[start : start + c]
            tokens[row, : len(chunk)], positions[row, : len(chunk)] = chunk, np.arange(start, start + len(chunk))
            last[row] = len(chunk) - 1
            chunks.append(len(chunk))
        seqs = [request.sequences[0] for request in requests] + [None] * (r - len(requests))
        logits, self.cache, experts, hidden = _forward(
            self.cfg, self.variables, self.cache, tokens, positions, self._table(seqs), last
        )
        experts = np.asarray(experts) if self.record_routes else None
        for row, (request, size) in enumerate(zip(requests, chunks)):
            seq = request.sequences[0]
            if request.params.speculative:
                request.hidden.append(hidden[row : row + 1])
            if experts is not None:
                seq.routes.append(experts[:, row, :size])
            seq.cached += size
            self.stats["prefill_tokens"] += size
            self.allocator.register(request.prompt, seq.pages, seq.cached // self.page_size)
            if seq.cached == len(request.prompt):
                self.prefilling.remove(request)
                self._start_decoding(request, logits[row], outputs)

    def _start_decoding(self, request: _Request, logits, outputs):
        """After the prompt: the request's n sequences (forks share every prompt page; a sequence
        copies one before writing there) sample their first tokens from the prompt's last logits."""
        seq, length, n = request.sequences[0], len(request.prompt), request.params.n
        for i in range(1, n):
            prompt_pages = seq.pages[: -(-length // self.page_size)]
            self.allocator.share(prompt_pages)
            own = self.allocator.allocate(len(seq.pages) - len(prompt_pages))
            fork = _Sequence(request, i, list(request.prompt), prompt_pages + own, cached=length)
            fork.routes = list(seq.routes)
            request.sequences.append(fork)
        first = self._sample(logits, request.sequences)
        for seq, token in zip(request.sequences, first):
            seq.slot = self.slots.index(None)
            self.slots[seq.slot] = seq
            self._append(seq, int(token), outputs)
        if request.params.speculative:
            self._draft_prompt(request)
        request.hidden = []

    def _decode(self, outputs):
        if any(seq is not None and seq.request.params.speculative for seq in self.slots):
            return self._speculative_decode(outputs)
        live = self._rows()
        for seq in live:
            self._own_page(seq, seq.cached // self.page_size)
        rows = live + [None] * (_bucket(len(live), self.max_batch) - len(live))
        b = len(rows)
        tokens, positions = np.zeros((b, 1), np.int32), np.full((b, 1), -1, np.int32)
        for row, seq in enumerate(live):
            tokens[row, 0], positions[row, 0] = seq.tokens[seq.cached], seq.cached
        sampled, self.cache, experts, _ = _forward(
            self.cfg, self.variables, self.cache, tokens, positions, self._table(rows), np.zeros(b, np.int32),
            self._row_sampling(rows, b),
        )  # fmt: skip
        sampled = np.asarray(sampled)
        experts = np.asarray(experts) if self.record_routes else None
        self.stats["decode_steps"] += 1
        for row, seq in enumerate(live):
            if experts is not None:
                seq.routes.append(experts[:, row])
            seq.cached += 1
            self._append(seq, int(sampled[row]), outputs)

    def _rows(self) -> list[_Sequence]:
        """The running sequences, in slot order: a decode step's rows, packed at the top of a batch
        of the smallest compiled size that holds them (``_bucket``)."""
        return [seq for seq in self.slots if seq is not None]

    def _draft_prompt(self, request: _Request):
        """After the prompt: each live sequence's MTP modules run over the prompt positions it
        computed (h^0 kept per chunk) and its first token, writing their caches and drafting D
        tokens (``generate``'s drafting pass)."""
        seqs = [seq for seq in request.sequences if seq.finish_reason is None]
        if not seqs:
            return
        length, d = len(request.prompt), self.depth
        for seq in seqs:
            for i in range(max(length - d, 0) // self.page_size, -(-length // self.page_size)):
                self._own_page(seq, i)  # its MTP entries near the prompt's end are its own
        h0 = jnp.concatenate(request.hidden, axis=1)
        h0 = jnp.broadcast_to(h0, (len(seqs), *h0.shape[1:]))
        state = self._decode_state(seqs)
        start = np.full(len(seqs), request.shared, np.int32)
        cache, state = state.cache, state.replace(cache={})
        self.cache, tokens, hidden = _draft_prompt(self.cfg, self.variables, cache, state, h0, start)
        tokens, hidden = np.asarray(tokens), np.asarray(hidden)
        for row, seq in enumerate(seqs):
            seq.drafts = tokens[row, length + 1 : length + 1 + d].tolist()
            seq.hidden = hidden[row]

    def _speculative_decode(self, outputs):
        """One speculative step over every row (``generate._speculative_step`` on the paged cache):
        a speculative row's drafts are verified and up to D + 1 tokens accepted; the other rows'
        drafts are -1, never accepted, so they take one token, as in a plain step."""
        live = self._rows()
        d, s = self.depth, self.page_size
        for seq in live:  # the step writes main entries at n .. n + D and MTP entries from n - D + 1
            for i in range(max(seq.cached - d + 1, 0) // s, min((seq.cached + d) // s + 1, len(seq.pages))):
                self._own_page(seq, i)
        rows = live + [None] * (_bucket(len(live), self.max_batch) - len(live))
        state = self._decode_state(rows)
        state = _speculative_step(self.cfg, self.variables, self._row_sampling(rows, len(rows)), state)
        self.cache = _without_pages(state.cache)
        tokens, lengths, hidden = np.asarray(state.tokens), np.asarray(state.lengths), np.asarray(state.hidden)
        self.stats["decode_steps"] += 1
        for row, seq in enumerate(live):
            n, new_n = seq.cached, int(lengths[row])
            if seq.request.params.speculative:
                self.stats["drafted"] += d
                self.stats["accepted"] += new_n - n - 1
                seq.drafts, seq.hidden = tokens[row, new_n + 1 : new_n + 1 + d].tolist(), hidden[row]
            seq.cached = new_n
            for token in tokens[row, n + 1 : new_n + 1].tolist():
                self._append(seq, token, outputs)
                if seq.finish_reason is not None:
                    break

    def _decode_state(self, seqs) -> DecodeState:
        """``generate``'s DecodeState for rows ``seqs`` (None: an empty row): each row's tokens, its
        drafts after them (-1 for a row that does not draft), cached positions, the paged cache read
        through the rows' page tables; ends, EOS and sampling are the engine's."""
        b, d = len(seqs), self.depth
        width = self.max_model_len + 2 * d + 2
        tokens, lengths = np.zeros((b, width), np.int32), np.zeros(b, np.int32)
        hidden = np.zeros((b, max(d - 1, 0), self.cfg.hidden_size), jnp.dtype(self.cfg.dtype))
        for row, seq in enumerate(seqs):
            if seq is not None:
                drafts = seq.drafts if seq.request.params.speculative else [-1] * d
                line = seq.tokens + drafts
                tokens[row, : len(line)], lengths[row] = line, seq.cached
                if seq.hidden is not None:
                    hidden[row] = seq.hidden
        return DecodeState(
            cache=with_pages(self.cache, self._table(seqs)),
            tokens=jnp.asarray(tokens),
            lengths=jnp.asarray(lengths),
            end=jnp.full(b, width, jnp.int32),
            eos=jnp.int32(-1),
            done=jnp.asarray([seq is None for seq in seqs]),
            rng=jax.random.key(0),  # unused: RowSampling keys each row
            hidden=jnp.asarray(hidden),
            drafted=jnp.zeros((), jnp.int32),
            accepted=jnp.zeros((), jnp.int32),
            routes=jnp.zeros((0,), jnp.int32),
        )

    def _own_page(self, seq: _Sequence, i: int):
        """Copy on write: before writing into page i, a sequence sharing it takes its own copy."""
        page = seq.pages[i]
        if self.allocator.refs[page] == 1:
            return
        copy = seq.request.spares.pop() if seq.request.spares else self.allocator.allocate(1)[0]
        self.cache = _copy_page(self.cache, page, copy)
        self.allocator.release([page])
        seq.pages[i] = copy
        self.stats["pages_copied"] += 1

    def _table(self, seqs) -> np.ndarray:
        """Page tables [len(seqs), pages_per_seq], padded with an id past the pool: writes there drop."""
        table = np.full((len(seqs), self.pages_per_seq), self.allocator.num_pages, np.int32)
        for row, seq in zip(table, seqs):
            if seq is not None:
                row[: len(seq.pages)] = seq.pages
        return table

    def _sample(self, logits, seqs) -> np.ndarray:
        """One token per sequence of ``seqs`` from the prompt's last logits [V], with its request's
        settings; rows padded to a compiled batch size."""
        r = _bucket(len(seqs), self.max_batch)
        rows = jnp.broadcast_to(logits, (r, logits.shape[-1]))
        return np.asarray(_sample(rows, self._row_sampling(list(seqs) + [None] * (r - len(seqs)), r)))[: len(seqs)]

    @staticmethod
    def _row_sampling(seqs, r: int) -> RowSampling:
        """Each row's request's settings and key (empty rows: greedy)."""
        temperature, top_p = np.zeros(r, np.float32), np.ones(r, np.float32)
        top_k, seeds, ids = np.zeros(r, np.int32), np.zeros(r, np.uint32), np.zeros((2, r), np.int32)
        for i, seq in enumerate(seqs):
            if seq is not None:
                p = seq.request.params
                temperature[i], top_p[i], top_k[i] = p.temperature, p.top_p, p.top_k
                seeds[i], ids[:, i] = seq.request.seed % 2**32, (seq.index, len(seq.generated))
        return RowSampling(temperature, top_k, top_p, seeds, *ids)

    # -- finishing -----------------------------------------------------------------------------

    def _append(self, seq: _Sequence, token: int, outputs):
        """Adds a sampled token (the next step caches it); returns the new text; finishes the sequence."""
        p = seq.request.params
        seq.tokens.append(token)
        reason = None
        if token == self.eos_id and not p.ignore_eos:
            reason = "stop"
        elif len(seq.generated) >= p.max_tokens:
            reason = "length"
        text = self.tokenizer.decode([t for t in seq.generated if t != self.eos_id or p.ignore_eos])
        cut = min((text.find(s) for s in p.stop if s in text), default=-1)
        if cut >= 0:
            text, reason = text[:cut], "stop"
        if reason is None:
            hold = max((len(s) - 1 for s in p.stop), default=0)  # a stop string may be starting
            ready = len(text) - hold
            while ready > seq.sent and text[ready - 1] == "\ufffd":  # an incomplete UTF-8 character
                ready -= 1
            delta, seq.sent = text[seq.sent : max(ready, seq.sent)], max(ready, seq.sent)
            outputs.append(self._output(seq.request, seq.index, [token], delta, None, seq))
        else:
            delta = text[seq.sent :]
            seq.sent = len(text)
            self._finish(seq, reason, outputs, [token], delta)

    def _finish(self, seq: _Sequence, reason: str, outputs, tokens=(), delta=""):
        seq.finish_reason = reason
        self._release(seq)
        if seq.slot >= 0:
            self.slots[seq.slot] = None
        request, out = self._output(seq.request, seq.index, list(tokens), delta, reason, seq)
        if self.record_routes and seq.routes:
            out.routes = np.concatenate(seq.routes, axis=1)
        outputs.append((request, out))

    def _release(self, seq: _Sequence):
        self.allocator.release(seq.pages)
        seq.pages = []
        request = seq.request
        if all(not s.pages for s in request.sequences):  # the request's last sequence: its unused spares
            self.allocator.release(request.spares)
            request.spares = []

    @staticmethod
    def _output(request, index, tokens, text, reason, seq=None) -> tuple[_Request, RequestOutput]:
        generated = 0 if seq is None else len(seq.generated)
        out = RequestOutput(request.id, index, tokens, text, reason is not None, reason, len(request.prompt), generated)
        return request, out


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def _forward(cfg, variables, cache, tokens, positions, table, last, sampling: RowSampling | None = None):
    """The model over tokens [R, W] at positions (-1: padding) through page ``table`` [R, n];
    returns the logits at window index ``last`` [R] of each row (with ``sampling``: a token drawn
    from them), the cache, the experts each token went to in the MoE layers ([L_moe, R, W, K], or
    None without MoE layers), and h^0 [R, W, H]."""
    model = Transformer(cfg)
    h, normed, cache, router = model.apply(variables, tokens, positions, with_pages(cache, table), method="decode")
    picked = jnp.take_along_axis(normed, last[:, None, None], axis=1)[:, 0]
    logits = model.apply(variables, picked, method="logits")
    out = logits if sampling is None else sampling(logits)
    return out, _without_pages(cache), None if router is None else router.expert_ids, h


@functools.partial(jax.jit, static_argnames=("cfg",), donate_argnames=("cache",))
def _draft_prompt(cfg, variables, cache, state: DecodeState, h0, start):
    """``generate``'s drafting pass after a prompt (``state`` with the paged ``cache``); returns the
    cache, the tokens with the drafts, and h^0 of the D - 1 positions before each row's last cached one."""
    state = _draft(cfg, variables, state.replace(cache=cache), h0, start)
    return _without_pages(state.cache), state.tokens, state.hidden


def _bucket(n: int, limit: int) -> int:
    """The smallest power of two >= n, at most ``limit``: the decode batch sizes compiled."""
    return min(1 << max(n - 1, 0).bit_length(), limit)


def _without_pages(cache: dict) -> dict:
    """The pools with an empty page table: one pytree structure between calls."""
    return {k: c.replace(pages=jnp.zeros((*c.pages.shape[:-2], 0, 0), jnp.int32)) for k, c in cache.items()}


@functools.partial(jax.jit, donate_argnames=("cache",))
def _copy_page(cache, source, target):
    """Page ``source``'s entries copied into page ``target``, in every layer and module."""

    def copy(x):
        return x.at[..., target, :, :].set(x[..., source, :, :])

    return {k: c.replace(c_kv=copy(c.c_kv), k_pe=copy(c.k_pe)) for k, c in cache.items()}


@jax.jit
def _sample(logits, sampling: RowSampling):
    return sampling(logits)
