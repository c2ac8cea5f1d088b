"""Gemma 4 MTP assistant (GGUF arch `gemma4-assistant`; HF Gemma4AssistantForCausalLM and the 12B's
Gemma4UnifiedAssistantForCausalLM, which has the same weights and math).

A drafter, not a standalone model (spec section 5): one draft step takes the newest token t and a
backbone-width state h, and returns draft logits plus the next state.

    x = pre_projection(cat(E_target[t] * sqrt(H_backbone), h))      # the *target's* embedding
    4 Gemma 4 layers whose attention is Q-only: the sliding layers read the K/V of the target's last
      KV-owning sliding layer, the full layer that of its last KV-owning full layer (committed
      positions 0..P-1 only; the assistant has no cache of its own)
    g = rms(x, output_norm);  logits = head(g);  h_next = post_projection(g)

A block of k drafts is k steps at the same position P with h_{i+1} = h_next of step i (5.4).
Heads: dense (g @ E_asst^T, what llama.cpp does) or centroid-masked (E2B/E4B: only the tokens of the
top-k centroid clusters get logits, 5.5). Where the references disagree (query position, sliding-window
extent: spec 8) `DraftSemantics` chooses; the default reproduces transformers.

Loading: `registry.build_assistant(gguf, target)` (or `engine.loader.load_assistant_file`); the target
must be loaded first because the assistant borrows its embedding table and reads its KV cache.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Mapping, Protocol, Sequence

import torch

from qatserve.errors import ModelError
from qatserve.formats.gguf_reader import GGUFFile
from qatserve.models.common import Rope, StepInputs, attention, fuse_linears, gelu_tanh_glu, rms_norm
from qatserve.models.gemma4 import Gemma4, Gemma4Config, _full_rope, _num, gemma4_config_from_gguf
from qatserve.models.weights import WeightLoader

ARCHES = ("gemma4-assistant", "gemma4_assistant")  # upstream spelling, then a variant seen in the wild
# Pre/post projection names: upstream llama.cpp first, then variants of non-upstream converters (4.1).
PRE_NAMES = ("nextn.pre_projection.weight", "mtp.pre_projection.weight", "assist_pre_proj.weight")
POST_NAMES = ("nextn.post_projection.weight", "mtp.post_projection.weight", "assist_post_proj.weight")
# Centroid head tensors (dropped by llama.cpp's converter; qatserve's keeps them).
CENTROIDS = "masked_embd_centroids.weight"
ORDERING = ("masked_embd_ordering", "masked_embd_ordering.weight")


class SharedKVReader(Protocol):
    """What the assistant needs from the target's cache (engine.kv_cache.SeqKV and engine.batch.SequenceView have it)."""

    def read(self, layer: int, end: int, n: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """K/V of `layer` at positions [max(0, end - n), end) (n = 0: from 0): keys [S, Hkv, D],
        values [S, Hkv, Dv], positions [S]."""
        ...


@dataclass(frozen=True)
class DraftSemantics:
    """The two choices the references make differently (spec 5.3 and 8).

    query_offset: RoPE position of the draft query relative to P, the position of the newest token:
        0 in transformers and llama.cpp, -1 in vLLM/SGLang ("last written slot").
    sliding_extra: the sliding layers see the last `window + sliding_extra` committed keys:
        +1 in transformers (its flipped bidirectional mask), 0 in vLLM, -1 in llama.cpp.
    """

    query_offset: int = 0
    sliding_extra: int = 1


HF = DraftSemantics(0, 1)
LLAMA_CPP = DraftSemantics(0, -1)
VLLM = DraftSemantics(-1, 0)


@dataclass(frozen=True)
class Gemma4AssistantConfig:
    """The assistant's layer stack (a Gemma4Config) plus what only an assistant has."""

    body: Gemma4Config
    backbone: int  # the target's hidden size; the pre-projection reads 2 * backbone
    pre_name: str
    post_name: str
    num_centroids: int  # 0: the file has no centroid head
    centroid_top_k: int
    use_ordered_embeddings: bool  # the checkpoint's own choice of head (the HF config flag)


def _meta_prefix(meta: Mapping[str, Any]) -> str:
    arch = meta.get("general.architecture")
    if arch in ARCHES:
        return arch
    if arch == "gemma4" and meta.get("gemma4.assistant.type") == "mtp":
        return "gemma4"
    return ""


def is_assistant(gguf: GGUFFile) -> bool:
    """True for an MTP assistant file in any of the spellings `assistant_config_from_gguf` accepts."""
    return bool(_meta_prefix(gguf.metadata)) or any(n in gguf.tensors for n in PRE_NAMES)


def _first(meta: Mapping[str, Any], keys: Sequence[str]) -> Any:
    return next((meta[k] for k in keys if k in meta), None)


def assistant_config_from_gguf(gguf: GGUFFile) -> Gemma4AssistantConfig:
    """Read an assistant's hyper-parameters: llama.cpp's `gemma4-assistant` keys (spec 4.2), or the
    lenient variants of 4.1; ModelError names what is missing."""
    meta, tensors = gguf.metadata, gguf.tensors
    arch = meta.get("general.architecture")
    prefix = _meta_prefix(meta)
    if not prefix:
        if arch == "gemma4" and any(n in tensors for n in PRE_NAMES):
            prefix = "gemma4"  # assistant tensors under the target's arch, without the assistant.type key
        else:
            raise ModelError(f"not a Gemma 4 MTP assistant: architecture {arch!r} (expected 'gemma4-assistant', "
                             f"or 'gemma4' with 'gemma4.assistant.type' = 'mtp') and no {PRE_NAMES[0]!r} tensor")
    pre = next((n for n in PRE_NAMES if n in tensors), None)
    post = next((n for n in POST_NAMES if n in tensors), None)
    if pre is None or post is None:
        raise ModelError(f"assistant file lacks its {'pre' if pre is None else 'post'}-projection tensor "
                         f"(looked for {', '.join(PRE_NAMES if pre is None else POST_NAMES)})")
    embd = tensors.get("token_embd.weight")
    if embd is None or len(embd.ne) != 2:
        raise ModelError("missing required tensor 'token_embd.weight' (the assistant's tied head)")
    p = prefix + "."
    # The assistant's own stack: a Gemma 4 decoder without PLE, experts or KV sharing of its own
    # (all its layers read the target's cache, which this module routes itself).
    body_meta = {**meta, "general.architecture": prefix, p + "attention.shared_kv_layers": 0, p + "expert_count": 0,
                 p + "embedding_length_per_layer_input": 0}
    body = gemma4_config_from_gguf(body_meta, n_vocab=int(embd.ne[1]))
    body = replace(body, arch=arch, final_softcap=0.0)  # spec 5.2.5: never soft-capped (llama.cpp never reads it)
    pre_in = int(tensors[pre].ne[0])
    backbone = _int_key(meta, (p + "embedding_length_out", p + "backbone_hidden_size",
                               p + "assistant.backbone_hidden_size"), 0)
    if not backbone:
        if pre_in % 2:
            raise ModelError(f"{pre!r} reads {pre_in} features: not [embedding, hidden] of one backbone width")
        backbone = pre_in // 2  # the robust fallback of 4.1
    if backbone == body.n_embd:  # llama.cpp rejects this too: it could not tell the widths apart
        raise ModelError(f"'{p}embedding_length_out' ({backbone}) equals the assistant's embedding_length")
    n_cent, top_k = 0, 0
    if CENTROIDS in tensors:
        info = tensors[CENTROIDS]
        n_cent = int(info.ne[1]) if len(info.ne) == 2 else 0
        top_k = _int_key(meta, (p + "assistant.centroid_intermediate_top_k", p + "centroid_intermediate_top_k"), 32)
        if not 1 <= top_k <= n_cent:
            raise ModelError(f"centroid top-k {top_k} is outside 1..{n_cent} (number of centroids)")
        want = _int_key(meta, (p + "assistant.num_centroids", p + "num_centroids"), n_cent)
        if want != n_cent:
            raise ModelError(f"metadata says {want} centroids, {CENTROIDS!r} has {n_cent}")
    ordered = _first(meta, (p + "assistant.use_ordered_embeddings", p + "use_ordered_embeddings"))
    return Gemma4AssistantConfig(body, backbone, pre, post, n_cent, top_k,
                                 bool(n_cent) if ordered is None else bool(ordered))


def _int_key(meta: Mapping[str, Any], keys: Sequence[str], default: int) -> int:
    """The first of `keys` present (checked to be an integer), else `default`."""
    key = next((k for k in keys if k in meta), None)
    return default if key is None else int(_num(meta, key))


class DraftState:
    """What stays fixed through one drafting round (positions, visible target K/V): per row, for the
    sliding (True) and full (False) layer types, (keys [S, Hkv, D], values [S, Hkv, D])."""

    def __init__(self, positions: torch.Tensor, kv: list[dict[bool, tuple[torch.Tensor, torch.Tensor]]]):
        self.positions = positions
        self.kv = kv


class AssistantLayer(torch.nn.Module):
    """A Gemma 4 layer (spec 2.3, no PLE/MoE) whose attention has only a query projection."""

    def __init__(self, cfg: Gemma4Config, w: WeightLoader, il: int, rope: Rope):
        super().__init__()
        p, e, ff = f"blk.{il}.", cfg.n_embd, cfg.n_ff[il]
        self.sliding = cfg.swa_layers[il]
        self.n_head, self.head_dim = cfg.n_head[il], cfg.head_dim[il]
        self.eps, self.rope = cfg.norm_eps, rope
        self.attn_norm = w.vector(p + "attn_norm.weight", e)
        self.wq = w.linear(p + "attn_q.weight", e, self.n_head * self.head_dim)
        self.q_norm = w.vector(p + "attn_q_norm.weight", self.head_dim)
        self.wo = w.linear(p + "attn_output.weight", self.n_head * self.head_dim, e)
        self.post_attn_norm = w.vector(p + "post_attention_norm.weight", e)
        self.ffn_norm = w.vector(p + "ffn_norm.weight", e)
        self.gate_up = fuse_linears([w.linear(p + "ffn_gate.weight", e, ff), w.linear(p + "ffn_up.weight", e, ff)])
        self.down = w.linear(p + "ffn_down.weight", ff, e)
        self.post_ffn_norm = w.vector(p + "post_ffw_norm.weight", e)
        self.out_scale = w.vector(p + "layer_output_scale.weight", 1)  # required for assistants (4.4)

    def forward(self, x: torch.Tensor, step: StepInputs, state: DraftState) -> torch.Tensor:
        """x [B, n_embd] -> [B, n_embd]; row b attends to the K/V of row b of `state`."""
        B = x.shape[0]
        q = self.wq(rms_norm(x, self.attn_norm, self.eps)).view(B, self.n_head, self.head_dim)
        q = self.rope.apply(rms_norm(q, self.q_norm, self.eps), step.rope_tables(self.rope))
        rows = []
        for b in range(B):
            k, v = state.kv[b][self.sliding]
            # One query against exactly the keys it may see (the state holds just those): no mask.
            # The target's K/V are normed and roped already; scale 1 as in the target.
            rows.append(attention(q[b : b + 1], k, v, step.positions[b : b + 1], step.positions[b : b + 1], scale=1.0))
        x = x + rms_norm(self.wo(torch.cat(rows)), self.post_attn_norm, self.eps)
        m = self.down(gelu_tanh_glu(*self.gate_up(rms_norm(x, self.ffn_norm, self.eps)).chunk(2, dim=-1)))
        x = x + rms_norm(m, self.post_ffn_norm, self.eps)
        return x * self.out_scale


class Gemma4Assistant(torch.nn.Module):
    """The MTP drafter bound to one loaded target (whose embedding it borrows and whose cache it reads).

    head: "dense" (full vocabulary, llama.cpp) or "centroid" (E2B/E4B sparse head, needs the centroid
        tensors); None = what the checkpoint was made for (its use_ordered_embeddings flag).
    mask_fill: for the centroid head, the value of tokens outside the selected clusters: "min-1" (the
        row's smallest selected logit minus 1, as transformers; fine for greedy drafting) or "-inf"
        (vLLM; use it when drafts are sampled, so masked tokens get zero draft probability).
    """

    arch = "gemma4-assistant"

    @staticmethod
    def config_from_gguf(gguf: GGUFFile) -> Gemma4AssistantConfig:
        return assistant_config_from_gguf(gguf)

    def __init__(self, cfg: Gemma4AssistantConfig, w: WeightLoader, target: Gemma4, *,
                 semantics: DraftSemantics = HF, head: str | None = None, mask_fill: str = "min-1"):
        super().__init__()
        body, tcfg = cfg.body, target.config
        if not isinstance(tcfg, Gemma4Config):
            raise ModelError(f"a Gemma 4 assistant needs a Gemma 4 target, got {type(target).__name__}")
        if tcfg.n_embd != cfg.backbone:
            raise ModelError(f"assistant was made for a target of hidden size {cfg.backbone}, "
                             f"this target has {tcfg.n_embd}")
        if tcfg.n_vocab != body.n_vocab:
            raise ModelError(f"assistant vocabulary {body.n_vocab} != target vocabulary {tcfg.n_vocab}")
        head = head or ("centroid" if cfg.use_ordered_embeddings and cfg.num_centroids else "dense")
        if head not in ("dense", "centroid") or mask_fill not in ("min-1", "-inf"):
            raise ValueError(f"head {head!r} / mask_fill {mask_fill!r}: expected dense|centroid, min-1|-inf")
        if head == "centroid" and not cfg.num_centroids:
            raise ModelError(f"centroid head requested but the file has no {CENTROIDS!r} (convert with centroids)")
        self.config, self.semantics, self.head, self.mask_fill = cfg, semantics, head, mask_fill
        self.eps = body.norm_eps
        # Which target layer each layer type reads: its last layer of that type that owns K/V (5.3).
        src = tcfg.kv_source
        self.source: dict[bool, int] = {}
        for sliding in (True, False):
            owners = [il for il in range(tcfg.n_layer) if src[il] == il and tcfg.swa_layers[il] == sliding]
            if owners:
                self.source[sliding] = owners[-1]
        for il in range(body.n_layer):
            s = body.swa_layers[il]
            if s not in self.source:
                kind = "sliding" if s else "full"
                raise ModelError(f"assistant layer {il} is {kind} but the target has no {kind} layer with K/V")
            t = self.source[s]
            if body.head_dim[il] != tcfg.head_dim[t] or body.n_head[il] % tcfg.n_head_kv[t]:
                raise ModelError(f"assistant layer {il} ({body.n_head[il]} heads of {body.head_dim[il]}) cannot read "
                                 f"target layer {t} ({tcfg.n_head_kv[t]} KV heads of {tcfg.head_dim[t]})")
        self.window = tcfg.sliding_window
        # Borrowed, not copied: the target's (scaled) embedding lookup. A bound method, so the target's
        # table is not registered as a submodule of the assistant either.
        self._embed = target.embed
        e, b = body.n_embd, cfg.backbone
        self.pre = w.linear(cfg.pre_name, 2 * b, e)
        self.post = w.linear(cfg.post_name, e, b)
        ropes = {True: Rope(body.rope_dim_swa, body.rope_base_swa, 1.0, neox=True), False: _full_rope(body, w)}
        self.layers = torch.nn.ModuleList(AssistantLayer(body, w, il, ropes[body.swa_layers[il]])
                                          for il in range(body.n_layer))
        self.output_norm = w.vector("output_norm.weight", e)
        if head == "dense":
            self.output = w.linear("token_embd.weight", e, body.n_vocab)
        else:
            self.rows = w.embedding("token_embd.weight", body.n_vocab, e)
            self.centroids = w.linear(CENTROIDS, e, cfg.num_centroids)
            if body.n_vocab % cfg.num_centroids:
                raise ModelError(f"vocabulary {body.n_vocab} does not split into {cfg.num_centroids} clusters")
            name = next((n for n in ORDERING if w.has(n)), ORDERING[0])
            order = w.index_vector(name, body.n_vocab)
            if not torch.equal(order.sort().values, torch.arange(body.n_vocab)):
                raise ModelError(f"tensor {name!r} is not a permutation of the vocabulary")
            self.clusters = order.view(cfg.num_centroids, -1)  # row j: the token ids of cluster j
        # Tensors a head we do not use would take: mark them used so the registry's check stays quiet.
        for n in (CENTROIDS, *ORDERING, "token_embd.weight"):
            if w.has(n):
                w.used.add(n)

    def begin_round(self, positions: torch.Tensor, cache: SharedKVReader | Sequence[SharedKVReader]) -> DraftState:
        """Gather, for rows at positions [B] (the position P of each row's newest token), the target K/V
        each layer type sees: committed positions 0..P-1, the sliding type only its last
        window + semantics.sliding_extra. `cache`: one cache for all rows (rows of one sequence) or one
        per row. Valid until the target's cache changes."""
        caches = list(cache) if isinstance(cache, (list, tuple)) else [cache] * positions.shape[0]
        if len(caches) != positions.shape[0]:
            raise ValueError(f"{len(caches)} caches for {positions.shape[0]} rows")
        n_swa = max(1, self.window + self.semantics.sliding_extra)
        kv = []
        for c, p in zip(caches, positions.tolist()):
            if p < 1:
                raise ValueError("a draft step needs at least one committed target position (P >= 1)")
            kv.append({s: c.read(il, p, n_swa if s else 0)[:2] for s, il in self.source.items()})
        return DraftState(positions, kv)

    @torch.inference_mode()
    def draft_step(self, tokens: torch.Tensor, hidden: torch.Tensor, positions: torch.Tensor,
                   cache: SharedKVReader | Sequence[SharedKVReader], state: DraftState | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """One draft step (spec 5.2) for B rows.

        tokens [B] int64: each row's newest token (the target's bonus token, then the previous draft);
        hidden [B, H_backbone]: the target's post-final-norm state of the row before it (step 0) or the
        previous step's `next_hidden`; positions [B]: P, the position of the newest token (keys 0..P-1
        are committed in `cache`). `state` (from `begin_round`) skips re-reading the cache on steps 2..k.
        Returns (logits [B, n_vocab], next_hidden [B, H_backbone]).
        """
        if state is None or not torch.equal(state.positions, positions):
            state = self.begin_round(positions, cache)
        x = self.pre(torch.cat((self._embed(tokens), hidden.to(torch.float32)), dim=-1))
        step = StepInputs(positions + self.semantics.query_offset)
        for layer in self.layers:
            x = layer(x, step, state)
        g = rms_norm(x, self.output_norm, self.eps)
        return self._logits(g), self.post(g)

    def _logits(self, g: torch.Tensor) -> torch.Tensor:
        """g [B, n_embd] -> [B, n_vocab] through the dense or the centroid-masked head (spec 5.5)."""
        if self.head == "dense":
            return self.output(g)
        # Raw centroid scores pick the clusters (no softmax: top-k is order-only); only their tokens
        # get a dot product, ~num_centroids / top_k times less head work.
        top = self.centroids(g).topk(self.config.centroid_top_k, dim=-1).indices  # [B, k]
        ids = self.clusters[top].flatten(1)  # [B, k * tokens_per_cluster]
        sel = torch.einsum("bnd,bd->bn", self.rows(ids), g)
        if self.mask_fill == "-inf":
            fill = torch.full((g.shape[0], 1), float("-inf"))
        else:  # transformers: finite, below every selected logit (per row here; HF takes the batch minimum)
            fill = sel.min(dim=-1, keepdim=True).values - 1.0
        out = fill.expand(-1, self.config.body.n_vocab).clone()
        return out.scatter_(1, ids, sel)

    def draft(self, token: int, hidden: torch.Tensor, position: int, cache: SharedKVReader, k: int
              ) -> tuple[list[int], torch.Tensor]:
        """Greedy block of k drafts for one sequence (spec 5.4): returns (draft tokens, logits [k, n_vocab])."""
        pos = torch.tensor([position])
        state = self.begin_round(pos, cache)
        tok, h, out, logits = torch.tensor([token]), hidden.reshape(1, -1), [], []
        for _ in range(k):
            lg, h = self.draft_step(tok, h, pos, cache, state)
            tok = lg.argmax(dim=-1)
            out.append(int(tok))
            logits.append(lg[0])
        return out, torch.stack(logits) if logits else torch.empty(0, self.config.body.n_vocab)
