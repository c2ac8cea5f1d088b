"""The Gemma 4 MTP assistant as a drafter (`--assistant PATH.gguf`, llama.cpp's `draft-mtp`).

The assistant has no weights of the target and no cache of its own: it borrows the target's embedding
and reads the target's committed K/V through each request's SeqKV (models/gemma4_assistant.py). A round
of k drafts for a request whose newest token t0 sits at position P (not yet in the cache; keys 0..P-1
are committed) is k assistant steps at the constant position P, seeded with h0 = the target's post-norm
hidden state of the row whose logits produced t0 (spec 5.4), which the engine hands over in `observe`:
after a prompt, its last row; after a verification that accepted n drafts, row n of that segment. All
requests drafting in a step run as rows of one assistant call per draft position.

Rollback needs nothing here: rejected positions leave the target cache (SeqKV.truncate) before the next
round reads it, and the recurrent state restarts from the target's hidden state every round.
E2B/E4B checkpoints converted with their centroid data get the sparse centroid head (the module picks it
from the file); the masked-out tokens get -inf, so sampled drafts never pick them (q = 0 there).
"""

from __future__ import annotations

import torch

from qatserve.engine.speculative.drafter import Draft, Drafter, pick
from qatserve.models.gemma4_assistant import DraftState as RoundState


class AssistantDrafter(Drafter):
    name = "draft-mtp"
    needs_hidden = True

    def __init__(self, assistant, p_min: float = 0.0):
        self.asst = assistant
        self.p_min = p_min

    def observe(self, request, hidden: torch.Tensor) -> None:
        request.spec.hidden = hidden.detach().reshape(-1).clone()

    def release(self, request) -> None:
        if request.spec is not None:
            request.spec.hidden = None

    @torch.inference_mode()
    def propose(self, requests: list, ks: list[int]) -> list[Draft]:
        out = [Draft([]) for _ in requests]
        rows = [i for i, (r, k) in enumerate(zip(requests, ks)) if k > 0 and r.spec.hidden is not None]
        if not rows:
            return out
        reqs = [requests[i] for i in rows]
        positions = torch.tensor([r.computed for r in reqs])  # P: the newest token's position
        caches = [r.seq for r in reqs]
        round_state = self.asst.begin_round(positions, caches)
        tokens = torch.tensor([r.history[-1] for r in reqs])
        hidden = torch.stack([r.spec.hidden for r in reqs])
        histories = [r.history for r in reqs]
        want = [ks[i] for i in rows]
        active = list(range(len(reqs)))  # rows still drafting, in order
        while active:
            idx = torch.tensor(active)
            sub = RoundState(positions[idx], [round_state.kv[a] for a in active])
            logits, nxt = self.asst.draft_step(tokens[idx], hidden[idx], positions[idx],
                                               [caches[a] for a in active], sub)
            still = []
            for j, a in enumerate(active):
                got = pick(logits[j], histories[a], reqs[a].spec, self.p_min)
                if got is None:
                    continue
                d = out[rows[a]]
                d.tokens.append(got[0])
                if got[1] is not None:
                    d.q = (d.q or []) + [got[1]]
                histories[a] = histories[a] + [got[0]]
                tokens[a], hidden[a] = got[0], nxt[j]
                if len(d.tokens) < want[a]:
                    still.append(a)
            active = still
        return out
