"""The engine core: slots, continuous batching, chunked prefill, prefix caching, stop conditions.

One `step()` = one model forward over a mixed batch: one row for every slot that is generating, then
prompt chunks of the slots still reading their prompt (oldest first) up to `max_batch_tokens` rows.
Requests join (from a FIFO queue, when a slot is free) and leave between steps, so a long prompt is
read over several steps while other slots keep generating. Single-threaded by design: the server's
AsyncEngine runs `step()` on its own thread and hands requests and cancellations over between steps.

Output does not depend on the batch (engine/batch.py says how): a request's tokens are identical alone
or among others, with or without prefix caching.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from dataclasses import dataclass, field

import torch

from qatserve.engine import slot_cache
from qatserve.engine.batch import PROMPT_SUBBLOCK, Segment, StepBatch
from qatserve.engine.device import uses_gpu_kernels
from qatserve.engine.kv_cache import KVCacheOptions, PagedKVCache
from qatserve.engine.request import GenerationResult, Request, State, TokenOut
from qatserve.engine.sampler import SampleResult, SamplingParams
from qatserve.engine.speculative.config import SpeculativeConfig, SpeculativeOverrides
from qatserve.errors import RequestError


class QueueFull(RequestError):
    """Every slot is busy and the waiting queue is at its limit (HTTP 503 / 429)."""


@dataclass(frozen=True)
class EngineConfig:
    """llama.cpp's names: -c (n_ctx, total over all slots; 0 = the model's trained context), -np
    (n_slots), -b (max_batch_tokens), -ctk/-ctv and rotation (kv); spec: speculative decoding (None = off);
    keep_slots: an idle slot keeps its last request's reusable K/V (llama.cpp's slot cache, which slot
    save/restore works on; engine/slot_cache.py)."""

    n_ctx: int = 4096
    n_slots: int = 1
    max_batch_tokens: int = 512
    max_queue: int = 256
    kv: KVCacheOptions = field(default_factory=KVCacheOptions)
    spec: SpeculativeConfig | None = None
    cuda_graphs: bool = True  # decode steps of a GPU model replay CUDA graphs (engine/gpu_runner.py)
    keep_slots: bool = False

    def __post_init__(self):
        if self.n_slots < 1:
            raise RequestError(f"-np (parallel slots) must be at least 1, got {self.n_slots}")
        if self.max_batch_tokens < PROMPT_SUBBLOCK:
            raise RequestError(f"batch size must be at least {PROMPT_SUBBLOCK} tokens, got {self.max_batch_tokens}")
        if self.max_queue < 0:
            raise RequestError(f"queue limit must be >= 0, got {self.max_queue}")


@dataclass
class EngineStats:
    """Counters for /metrics (monotonic) and gauges read by the server."""

    prompt_tokens: int = 0  # prompt rows computed (not counting prefix-cache hits)
    cached_tokens: int = 0
    generated_tokens: int = 0
    requests_finished: int = 0
    steps: int = 0
    busy_seconds: float = 0.0
    draft_tokens: int = 0
    draft_accepted: int = 0
    draft_steps: int = 0  # verification forwards that carried a draft


class Engine:
    def __init__(self, model, tokenizer=None, config: EngineConfig | None = None):
        self.model = model
        self.tokenizer = tokenizer
        cfg = config or EngineConfig()
        n_ctx = cfg.n_ctx if cfg.n_ctx > 0 else model.config.context_length
        self.config = cfg
        self.n_vocab = model.config.n_vocab
        self.cache = PagedKVCache(model, n_ctx, cfg.n_slots, cfg.kv, max_step_tokens=cfg.max_batch_tokens)
        self.n_ctx_slot = self.cache.n_ctx_seq
        self.gpu = None
        if uses_gpu_kernels(model):
            from qatserve.engine.gpu_runner import GPURunner

            self.gpu = GPURunner(model, self.cache, cfg.max_batch_tokens, cuda_graphs=cfg.cuda_graphs)
        self.slots: list[Request | None] = [None] * cfg.n_slots
        self.waiting: deque[Request] = deque()
        self.requests: dict[str, Request] = {}
        self.stats = EngineStats()
        self._ids = itertools.count()
        # What each idle slot keeps of its last request (keep_slots; engine/slot_cache.py), and the
        # drafting summary of its last request for /slots.
        self.kept: list[slot_cache.KeptSlot | None] = [None] * cfg.n_slots
        self.slot_spec: list[dict | None] = [None] * cfg.n_slots
        # Speculative decoding (engine/speculative): the drafter and per-slot block control; drafts of the
        # step being planned, by request id.
        self.spec = None
        self._drafts: dict = {}
        if cfg.spec is not None and cfg.spec.enabled:
            from qatserve.engine.speculative.speculator import Speculator

            self.spec = Speculator.build(cfg.spec, model, tokenizer, n_ctx=self.cache.n_ctx, n_seq=cfg.n_slots,
                                         kv=cfg.kv, stats=self.stats)

    # -- requests ----------------------------------------------------------------------------------
    def add_request(self, prompt: list[int], params: SamplingParams | None = None,
                    request_id: str | None = None, *, slot: int = -1,
                    speculative: SpeculativeOverrides | None = None) -> Request:
        """Validate and queue a request. Raises RequestError (bad prompt) or QueueFull. `slot`: the slot it
        must run in (llama.cpp's id_slot; -1 = any); `speculative`: its own drafting block settings."""
        params = params or SamplingParams()
        if not -1 <= slot < self.config.n_slots:
            raise RequestError(f"slot {slot} does not exist (this engine has slots 0..{self.config.n_slots - 1})")
        if speculative is not None and self.config.spec is not None:
            self.config.spec.with_overrides(speculative)  # bad values fail here, not on the step that drafts
        if not prompt:
            raise RequestError("empty prompt: nothing to condition on")
        bad = [t for t in prompt if not (isinstance(t, int) and 0 <= t < self.n_vocab)]
        if bad:
            raise RequestError(f"prompt token id {bad[0]} is outside the vocabulary (0..{self.n_vocab - 1})")
        if len(prompt) >= self.n_ctx_slot:
            raise RequestError(f"prompt of {len(prompt)} tokens does not fit in a slot context of "
                               f"{self.n_ctx_slot} (-c {self.cache.n_ctx} / -np {self.config.n_slots})")
        # Slots fill at the next step, so free slots count as room for requests arriving in between.
        if len(self.waiting) >= self.config.max_queue + sum(s is None for s in self.slots):
            raise QueueFull(f"server busy: {len(self.waiting)} requests already waiting")
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        if rid in self.requests:
            raise RequestError(f"request id {rid!r} is already in use")
        req = Request(rid, prompt, params, self.n_vocab, self.tokenizer)
        req.slot_wanted, req.spec_overrides = slot, speculative
        self.requests[rid] = req
        self.waiting.append(req)
        return req

    def abort(self, request_id: str) -> bool:
        """Cancel a request now; its slot and KV blocks are free when this returns."""
        req = self.requests.get(request_id)
        if req is None or req.state is State.FINISHED:
            return False
        if req.state is State.WAITING:
            self.waiting.remove(req)
        self._finish(req, "abort", flush=False)
        return True

    def has_work(self) -> bool:
        return bool(self.waiting) or any(s is not None for s in self.slots)

    def n_running(self) -> int:
        return sum(s is not None for s in self.slots)

    # -- one step ----------------------------------------------------------------------------------
    def _admit(self) -> None:
        free = [i for i, s in enumerate(self.slots) if s is None]
        for req in list(self.waiting) if free and self.waiting else ():
            i = self._pick_slot(req, free)
            if i is None:
                continue  # it waits for its own slot; the requests behind it go ahead
            self.waiting.remove(req)
            free.remove(i)
            req.seq = self.cache.new_sequence()
            req.computed = req.seq.match_prefix(req.prompt)
            if self.kept[i] is not None:  # the slot's kept state: lend its prefix, then let it go
                req.computed = slot_cache.adopt(self.kept[i], req.seq, req.prompt, req.computed)
                self.kept[i].seq.free()
                self.kept[i] = None
            req.timings.cache_n = req.computed
            self.stats.cached_tokens += req.computed
            req.state, req.slot = State.RUNNING, i
            self.slots[i] = req
            if not free:
                break

    def _pick_slot(self, req: Request, free: list[int]) -> int | None:
        """The free slot `req` goes to: the one it asked for (None while busy); else a slot whose restored
        state covers most of its prompt; else one that keeps nothing; else the first free one."""
        if req.slot_wanted >= 0:
            return req.slot_wanted if req.slot_wanted in free else None
        best = max(free, key=lambda i: (slot_cache.local_match(self.kept[i], req.prompt), self.kept[i] is None, -i))
        return best

    def _plan(self) -> list[tuple[Request, int, bool]]:
        """(request, rows, prompt?) for this step: generating slots first, then prompt chunks."""
        budget = self.config.max_batch_tokens
        plan = []
        running = [r for r in self.slots if r is not None]
        generating = [r for r in running if not r.in_prompt]
        # A generating slot with a draft gets 1 + k rows: its newest token, then the draft to verify.
        self._drafts = self.spec.propose(generating, budget, self.n_ctx_slot) if self.spec is not None else {}
        for r in generating:
            d = self._drafts.get(r.id)
            n = 1 + (len(d.tokens) if d is not None else 0)
            plan.append((r, n, False))
            budget -= n
        first = True
        for r in sorted((r for r in running if r.in_prompt), key=lambda r: r.arrival):
            if budget <= 0 and not first:
                break
            end = min(len(r.prompt), r.computed + max(budget, 0))
            if end < len(r.prompt):
                end -= end % PROMPT_SUBBLOCK  # chunks end on sub-block boundaries (batch invariance)
            if end <= r.computed:
                if not first:
                    continue
                # Generating rows left less than a sub-block: the oldest prompt still advances by one
                # (the batch overshoots by < 32 rows) instead of starving behind them.
                end = min(len(r.prompt), r.computed + PROMPT_SUBBLOCK - r.computed % PROMPT_SUBBLOCK)
            first = False
            plan.append((r, end - r.computed, True))
            budget -= end - r.computed
        return plan

    @torch.inference_mode()
    def step(self) -> list[Request]:
        """Run one forward; returns the requests that produced output or finished in it."""
        self._admit()
        plan = self._plan()
        if not plan:
            return []
        t0 = time.perf_counter()
        segments, tokens, sample_rows, sample_reqs = [], [], [], []
        row = 0
        for r, n, prompt in plan:
            if r.t_prompt_start is None:
                r.t_prompt_start = t0
            toks = r.prompt[r.computed : r.computed + n] if prompt else [r.history[-1]] + self._draft_tokens(r)
            segments.append(Segment(r.seq, row, r.computed, n, prompt))
            tokens.extend(toks)
            row += n
            if not prompt or r.computed + n == len(r.prompt):
                m = 1 if prompt else n  # rows that sample: a prompt's last row, every row of a verification
                sample_reqs.append((r, len(sample_rows), m, row - m))
                sample_rows.extend(range(row - m, row))
        if self.gpu is not None:  # engine/gpu_runner.py: decode rows in CUDA graphs, prompt rows eagerly
            hidden, logits = self.gpu.forward(segments, tokens, sample_rows)
        else:
            batch = StepBatch(self.cache, segments)
            hidden = self.model.hidden_states(torch.tensor(tokens, dtype=torch.long), batch.positions, batch)
            logits = self.model.logits(hidden, rows=torch.tensor(sample_rows)) if sample_rows else None
        for r, n, prompt in plan:
            if prompt or n == 1:  # a verification commits once it knows how many rows were accepted
                r.computed += n
                r.seq.commit(r.computed, len(r.prompt))
            if prompt:
                self.stats.prompt_tokens += n
        t1 = time.perf_counter()
        for r, j, m, h in sample_reqs:
            if m == 1:
                self._sample(r, logits[j], t1)
                accepted = 0
            else:
                accepted = self._verify(r, logits[j : j + m], t1)
            if self.spec is not None and r.state is State.RUNNING:
                # the row whose logits produced the newest token (the MTP assistant's seed state)
                self.spec.observe(r, hidden[h + accepted])
        self.stats.steps += 1
        self.stats.busy_seconds += time.perf_counter() - t0
        return [r for r, _, _ in plan]

    def _draft_tokens(self, r: Request) -> list[int]:
        d = self._drafts.get(r.id)
        return list(d.tokens) if d is not None else []

    def _verify(self, r: Request, logits: torch.Tensor, now: float) -> int:
        """Emit what verification of r's draft yields; roll the rejected rows out of r's cache. Returns
        the number of drafts accepted (-1 if the request finished)."""
        results = self.spec.verify(r, logits, self._drafts[r.id])
        for res in results:
            if not self._emit(r, res, now):
                return -1  # finished mid-draft (stop, length, context): its cache is freed already
        accepted = len(results) - 1
        r.computed += 1 + accepted
        r.seq.commit(r.computed, len(r.prompt))
        r.seq.truncate(r.computed)
        return accepted

    def _sample(self, r: Request, logits: torch.Tensor, now: float) -> None:
        self._emit(r, r.sampler.sample(logits, r.history), now)

    def _emit(self, r: Request, res: SampleResult, now: float) -> bool:
        """Append one sampled token: stop conditions, text, emission. False once the request finished."""
        if r.t_first_token is None:
            r.t_first_token = now
            r.timings.prompt_n = len(r.prompt) - r.timings.cache_n
            r.timings.prompt_ms = 1000 * (now - r.t_prompt_start)
        r.generated.append(res.token)
        r.timings.predicted_n += 1
        self.stats.generated_tokens += 1
        if res.token in r.stop_ids:
            r.stop_reason = res.token
            self._finish(r, "stop")
            return False
        text = r.stops.push(r.decoder.push(res.token)) if r.decoder else ""
        r.text_parts.append(text)
        r.emit(TokenOut(res.token, text, res.logprob, res.top))
        if r.stops.stopped:
            r.stop_reason = r.stops.hit
            self._finish(r, "stop", flush=False)
        elif len(r.generated) >= r.params.max_tokens:
            self._finish(r, "length")
        elif len(r.prompt) + len(r.generated) >= self.n_ctx_slot:
            self._finish(r, "context")
        return r.state is not State.FINISHED

    def _finish(self, r: Request, reason: str, flush: bool = True) -> None:
        now = time.perf_counter()
        if flush and r.decoder is not None and not r.stops.stopped:
            tail = r.stops.push(r.decoder.flush()) + r.stops.flush()
            if tail:
                r.text_parts.append(tail)
                r.emit(TokenOut(-1, tail, 0.0))
        if r.t_first_token is not None:
            r.timings.predicted_ms = 1000 * (now - r.t_first_token)
        r.finish_reason = reason
        r.state = State.FINISHED
        if self.spec is not None:
            self.spec.release(r)
        if self.spec is not None and 0 <= r.slot < len(self.slots):
            self.slot_spec[r.slot] = self.spec.slot_state(r)
        if r.seq is not None:
            if self.config.keep_slots and 0 <= r.slot < len(self.slots):
                self.kept[r.slot] = slot_cache.keep(r.seq, r.history[: max(r.computed, 0)])
            else:
                r.seq.free()
            r.seq = None
        if 0 <= r.slot < len(self.slots) and self.slots[r.slot] is r:
            self.slots[r.slot] = None
        r.result = GenerationResult(list(r.generated), "".join(r.text_parts), reason, r.timings,
                                    len(r.prompt), r.stop_reason, r.id)
        self.requests.pop(r.id, None)
        self.stats.requests_finished += 1
        r.emit(None)

    def stream(self, req: Request):
        """Step the engine until `req` finishes, yielding its TokenOuts as they come (other requests run
        alongside). Closing the iterator early cancels the request."""
        try:
            while req.result is None:
                self.step()
                while req.outputs:
                    yield req.outputs.popleft()
        finally:
            if req.result is None:
                self.abort(req.id)
        while req.outputs:
            yield req.outputs.popleft()

    def run_until_done(self) -> None:
        while self.has_work():
            self.step()

    # -- introspection -----------------------------------------------------------------------------
    def slot_info(self) -> list[dict]:
        out = []
        for i, r in enumerate(self.slots):
            d = {"id": i, "n_ctx": self.n_ctx_slot, "speculative": self.spec is not None,
                 "is_processing": r is not None}
            if r is not None:
                d.update(id_task=r.id, n_prompt_tokens=len(r.prompt), n_past=r.computed,
                         n_decoded=len(r.generated), state="prompt" if r.in_prompt else "generating")
            if self.spec is not None:
                # the running request's drafting, else the last one's
                d["speculative_state"] = self.spec.slot_state(r) if r is not None else self.slot_spec[i]
            kept = self.kept[i]
            if self.config.keep_slots:
                d["cache"] = {"n_tokens": len(kept.tokens) if kept else 0, "n_reusable": kept.n_reuse if kept else 0,
                              "restored": bool(kept and kept.seq.private)}
            out.append(d)
        return out

    # -- slot cache: save / restore / erase (keep_slots; call between steps, e.g. AsyncEngine.call) ----
    def _idle_slot(self, i: int) -> None:
        if not self.config.keep_slots:
            raise RequestError("slots keep no state in this engine (keep_slots / --slot-save-path is off)")
        if not 0 <= i < len(self.slots):
            raise RequestError(f"slot {i} does not exist (this engine has slots 0..{len(self.slots) - 1})")
        if self.slots[i] is not None:
            raise slot_cache.SlotBusy(f"slot {i} is processing a request; retry when it is idle")

    def save_slot(self, i: int) -> slot_cache.SlotImage:
        """A copy of what idle slot i keeps (tokens and the K/V of its reusable prefix)."""
        self._idle_slot(i)
        return slot_cache.snapshot(self.cache, self.kept[i])

    def restore_slot(self, i: int, image: slot_cache.SlotImage) -> int:
        """Replace idle slot i's kept state with `image` (validated against this cache by slot_file);
        nothing changes when it does not fit. Returns the tokens restored."""
        self._idle_slot(i)
        slot_cache.check_room(self.cache, image, self.kept[i])
        if self.kept[i] is not None:
            self.kept[i].seq.free()
            self.kept[i] = None
        self.kept[i] = slot_cache.install(self.cache, image)
        return len(image.tokens)

    def erase_slot(self, i: int) -> int:
        """Forget idle slot i's kept state, its blocks leaving the prefix cache too; the tokens erased."""
        self._idle_slot(i)
        kept, self.kept[i] = self.kept[i], None
        if kept is None:
            return 0
        kept.seq.free(forget=True)
        return len(kept.tokens)
