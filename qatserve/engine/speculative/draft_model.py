"""A separate draft model with the target's vocabulary (`-md PATH.gguf`, llama.cpp's `draft-simple`).

The draft model keeps its own paged KV cache (same K/V types as the target, one sequence per request,
no prefix cache) and a record of which tokens that cache holds (`DraftState.done`). A round for a request
whose history is H (L tokens) and whose draft cache holds `done`:

1. keep the longest common prefix of `done` and H (at most L - 1, so the newest token is run): positions
   after it are drafts the target rejected, or tokens it replaced; they are rolled back (SeqKV.truncate),
   and positions before it are final (SeqKV.commit, which also hands back sliding blocks out of view);
2. run H's missing tail (the whole prompt the first time, in chunks) and take a draft from the last row;
3. run each draft token as one more row, k - 1 times, every requesting slot in one forward per position.

`done` then ends with the drafts whose K/V were computed; the next round keeps what the target accepted.
"""

from __future__ import annotations

import torch

from qatserve.engine.batch import Segment, StepBatch
from qatserve.engine.kv_cache import KVCacheOptions, PagedKVCache
from qatserve.engine.speculative.drafter import Draft, Drafter, pick
from qatserve.errors import ModelError

CHUNK = 512  # draft-model prompt rows per forward when catching up


def check_vocab(target_model, target_tok, draft_model, draft_tok) -> None:
    """The draft must speak the target's vocabulary: the same logits width and, when both files carry a
    vocabulary, the same token strings and BOS/EOS ids. ModelError names the first difference."""
    nt, nd = target_model.config.n_vocab, draft_model.config.n_vocab
    if nt != nd:
        raise ModelError(f"draft model vocabulary has {nd} tokens, the target's {nt}: drafts need the same vocabulary")
    if target_tok is None or draft_tok is None:
        return
    if target_tok.n_vocab != draft_tok.n_vocab:
        raise ModelError(f"draft tokenizer has {draft_tok.n_vocab} tokens, the target's {target_tok.n_vocab}")
    for i in range(target_tok.n_vocab):
        if target_tok.token_piece(i) != draft_tok.token_piece(i):
            raise ModelError(f"draft model vocabulary differs from the target's at token {i}: "
                             f"{draft_tok.token_piece(i)!r} vs {target_tok.token_piece(i)!r}")
    for name in ("bos_id", "eos_id"):
        if getattr(target_tok, name) != getattr(draft_tok, name):
            raise ModelError(f"draft model {name} {getattr(draft_tok, name)} != the target's {getattr(target_tok, name)}")


class DraftModelDrafter(Drafter):
    name = "draft-simple"

    def __init__(self, model, n_ctx: int, n_seq: int, kv: KVCacheOptions, p_min: float = 0.0):
        self.model = model
        self.p_min = p_min
        opts = KVCacheOptions(kv.type_k, kv.type_v, rotate=kv.rotate, prefix_cache=False)
        self.cache = PagedKVCache(model, n_ctx, n_seq, opts, max_step_tokens=CHUNK + 64)

    def release(self, request) -> None:
        st = request.spec
        if st is not None and st.seq is not None:
            st.seq.free()
            st.seq, st.done = None, []

    def _forward(self, segments: list[Segment], tokens: list[int]) -> torch.Tensor:
        """One draft-model forward; logits [len(segments), V] of each segment's last row."""
        batch = StepBatch(self.cache, segments)
        hidden = self.model.hidden_states(torch.tensor(tokens, dtype=torch.long), batch.positions, batch)
        for s in segments:
            s.seq.length = s.pos0 + s.n  # K/V now there (speculative: committed only once H confirms it)
        return self.model.logits(hidden, rows=torch.tensor([s.row0 + s.n - 1 for s in segments]))

    def _resume(self, r) -> int:
        """Roll the request's draft sequence back to what is still valid; returns its length."""
        st, hist = r.spec, r.history
        if st.seq is None:
            st.seq, st.done = self.cache.new_sequence(), []
        m, limit = 0, min(len(st.done), len(hist) - 1)
        while m < limit and st.done[m] == hist[m]:
            m += 1
        st.seq.commit(m, 0)
        st.seq.truncate(m)
        st.done = st.done[:m]
        # Catch up on long tails (first round: the prompt) alone, in chunks, leaving < CHUNK rows.
        while len(hist) - m > CHUNK:
            self._forward([Segment(st.seq, 0, m, CHUNK, True)], hist[m : m + CHUNK])
            st.done += hist[m : m + CHUNK]
            m += CHUNK
            st.seq.commit(m, 0)  # final positions: sliding blocks out of view go back to the pool
        return m

    @torch.inference_mode()
    def propose(self, requests: list, ks: list[int]) -> list[Draft]:
        out = [Draft([]) for _ in requests]
        active = [i for i, k in enumerate(ks) if k > 0]
        histories = {i: requests[i].history for i in active}
        first = True
        while active:
            segments, tokens, row = [], [], 0
            for i in active:
                st, hist = requests[i].spec, histories[i]
                if first:
                    m = self._resume(requests[i])
                    tail = hist[m:]
                else:
                    m, tail = len(hist) - 1, hist[-1:]  # the previous draft token, one row
                segments.append(Segment(st.seq, row, m, len(tail), len(tail) > 1))
                tokens += tail
                st.done = st.done + tail
                row += len(tail)
            logits = self._forward(segments, tokens)
            first = False
            still = []
            for j, i in enumerate(active):
                r = requests[i]
                got = pick(logits[j], histories[i], r.spec, self.p_min)
                if got is None:
                    continue
                d = out[i]
                d.tokens.append(got[0])
                if got[1] is not None:
                    d.q = (d.q or []) + [got[1]]
                histories[i] = histories[i] + [got[0]]
                if len(d.tokens) < ks[i]:
                    still.append(i)
            active = still
        return out
