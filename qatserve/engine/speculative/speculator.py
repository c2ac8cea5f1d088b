"""`Speculator`: what the engine calls to draft and verify. It owns the drafter, each request's drafting
state (`Request.spec`) and the acceptance accounting.

Per engine step (engine.py):
1. `propose(generating requests, budget)`: each slot's controller picks its block; the block is cut to the
   slot's fair share of the step's row budget (every slot drafts as well as the first), to the tokens the
   request may still emit (max_tokens - 1: the last emitted token is always the target's own) and to its
   context; the drafter proposes for every slot at once; drafts shorter than n_min are dropped.
2. the engine runs [newest token, d1..dk] as one generating segment (k + 1 rows, `prompt=False`).
3. `verify(request, logits rows, draft)`: the tokens to emit (verify.py), counted into the request's
   timings, the engine's stats and the slot's controller.
4. `observe(request, hidden row)`: the MTP assistant's seed state for the next round.
"""

from __future__ import annotations

from pathlib import Path

import torch

from qatserve.engine.kv_cache import KVCacheOptions
from qatserve.engine.sampler import SampleResult
from qatserve.engine.speculative import config as C
from qatserve.engine.speculative.controller import BlockController
from qatserve.engine.speculative.drafter import Draft, Drafter, new_state
from qatserve.engine.speculative.verify import verify

ROW_COST = 0.2  # one more verification row relative to a decode step, dense target: measured 0.15-0.25 by
# benchmarks/spec_lookup.py (Gemma 3 270M, CPU, 1 thread; its 262k-row head runs for every row)
ROW_COST_MOE = 0.5  # an extra row of a MoE target reads its own experts' weights as well


def decode_weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of weight matrices one token's forward reads (every QuantLinear once; MoE experts all counted)."""
    from qatserve.quant.blocks import row_bytes
    from qatserve.quant.linear import QuantLinear

    return sum(m.out_features * row_bytes(m.qtype, m.in_features)
               for m in model.modules() if isinstance(m, QuantLinear))


class Speculator:
    def __init__(self, cfg: C.SpeculativeConfig, drafter: Drafter, row_cost: float, draft_cost: float, stats=None):
        self.cfg, self.drafter, self.stats = cfg, drafter, stats
        self.row_cost = cfg.row_cost if cfg.row_cost is not None else row_cost
        self.draft_cost = cfg.draft_cost if cfg.draft_cost is not None else draft_cost
        self.assistant = None  # the loaded assistant file (kept open while the engine lives)
        self.draft_file = None

    @classmethod
    def build(cls, cfg: C.SpeculativeConfig, model, tokenizer=None, *, n_ctx: int, n_seq: int,
              kv: KVCacheOptions, stats=None, backend: str = "auto") -> "Speculator":
        """Load and bind the drafter `cfg` names to the target `model` (its engine: n_ctx over n_seq slots,
        K/V types `kv`)."""
        n_expert = getattr(model.config, "n_expert", 0) or 0
        row_cost = ROW_COST_MOE if n_expert > 0 else ROW_COST
        if cfg.type == C.NGRAM:
            from qatserve.engine.speculative.ngram import NgramLookup

            return cls(cfg, NgramLookup(cfg.ngram_min, cfg.ngram_max), row_cost, 0.0, stats)
        target_bytes = max(decode_weight_bytes(model), 1)
        if cfg.type == C.MTP:
            from qatserve.engine.loader import load_assistant_file
            from qatserve.engine.speculative.assistant import AssistantDrafter

            # -inf outside the centroid head's candidates: sampled drafts must give them q = 0.
            loaded = load_assistant_file(Path(cfg.assistant), model, backend=backend, mask_fill="-inf")
            spec = cls(cfg, AssistantDrafter(loaded.model, cfg.p_min), row_cost,
                       decode_weight_bytes(loaded.model) / target_bytes, stats)
            spec.assistant = loaded
            return spec
        if cfg.type == C.DRAFT:
            from qatserve.engine.loader import load_model_file
            from qatserve.engine.speculative.draft_model import DraftModelDrafter, check_vocab

            loaded = load_model_file(Path(cfg.draft_model), backend=backend)
            try:
                check_vocab(model, tokenizer, loaded.model, loaded.tokenizer)
                drafter = DraftModelDrafter(loaded.model, n_ctx, n_seq, kv, cfg.p_min)
            except BaseException:
                loaded.gguf.close()
                raise
            spec = cls(cfg, drafter, row_cost, decode_weight_bytes(loaded.model) / target_bytes, stats)
            spec.draft_file = loaded
            return spec
        raise ValueError(f"speculative type {cfg.type!r} has no drafter")

    def close(self) -> None:
        for f in (self.assistant, self.draft_file):
            if f is not None:
                f.gguf.close()

    # -- per step ------------------------------------------------------------------------------------
    def _state(self, r):
        if r.spec is None:
            c = self.cfg.with_overrides(getattr(r, "spec_overrides", None))
            r.spec = new_state(r, BlockController(c.n_max, c.auto, c.auto_max, c.auto_off,
                                                  self.row_cost + self.draft_cost))
            r.spec.n_min, r.spec.p_min = c.n_min, c.p_min
        return r.spec

    def propose(self, requests: list, budget: int, n_ctx_slot: int) -> dict[str, Draft]:
        """Drafts for this step's generating requests, keyed by request id (requests without one absent).
        `budget`: the step's row budget; generating rows come first, each slot gets an equal share."""
        if not requests:
            return {}
        share = max(0, budget - len(requests)) // len(requests)
        reqs, ks = [], []
        for r in requests:
            k = self._state(r).controller.block()
            k = min(k, share, r.params.max_tokens - len(r.generated) - 1,
                    n_ctx_slot - len(r.prompt) - len(r.generated))
            if k > 0:
                reqs.append(r)
                ks.append(k)
        if not reqs:
            return {}
        out = {}
        for r, k, d in zip(reqs, ks, self.drafter.propose(reqs, ks)):
            d.tokens, d.q = d.tokens[:k], None if d.q is None else d.q[:k]
            if d.tokens and len(d.tokens) >= r.spec.n_min:
                out[r.id] = d
        return out

    def verify(self, r, logits: torch.Tensor, draft: Draft) -> list[SampleResult]:
        """logits [k + 1, V] of the request's segment -> the tokens to emit (accepted drafts + one)."""
        results = verify(r.sampler, logits, r.history, draft)
        n, acc = len(draft.tokens), len(results) - 1
        r.spec.controller.update(n, acc)
        t = r.timings
        t.draft_n += n
        t.draft_n_accepted += acc
        t.draft_steps += 1
        if self.stats is not None:
            self.stats.draft_tokens += n
            self.stats.draft_accepted += acc
            self.stats.draft_steps += 1
        return results

    def observe(self, r, hidden: torch.Tensor) -> None:
        if self.drafter.needs_hidden:
            self._state(r)
            self.drafter.observe(r, hidden)

    def release(self, r) -> None:
        if r.spec is not None:
            self.drafter.release(r)

    def slot_state(self, r) -> dict:
        """A request's drafting as /slots shows it: the drafter, the block the slot asks for now, its
        acceptance estimate, whether it drafts at all (off: slower than plain decoding), and its counts."""
        c = self.cfg.with_overrides(getattr(r, "spec_overrides", None))
        t = r.timings
        d = {"type": c.type, "n_max": "auto" if c.auto else c.n_max, "n_min": c.n_min, "p_min": c.p_min,
             "draft_n": t.draft_n, "draft_n_accepted": t.draft_n_accepted,
             "acceptance_rate": t.draft_acceptance_rate, "mean_accepted_length": t.draft_mean_accepted_length}
        st = r.spec
        if st is not None:
            block = st.controller.best_block()
            d.update(block=block, drafting=block > 0, acceptance_estimate=st.controller.acceptance)
        return d
