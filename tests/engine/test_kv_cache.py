"""The paged cache: storage bit-identical with gguf.quants, memory equal to the theoretical figure,
sliding layers bounded by their window, prefix blocks shared and evicted, clear errors when full."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch

from qatserve.bench.synth import get_shape
from qatserve.engine.batch import Segment, StepBatch
from qatserve.engine.kv_cache import KVCacheOptions, KVLayout, PagedKVCache
from qatserve.engine.engine import Engine, EngineConfig
from qatserve.engine.sampler import SamplingParams
from qatserve.errors import RequestError
from qatserve.quant.kernels import kv_quant
from tests.engine.conftest import WINDOW, random_prompts

QTYPES = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}


@pytest.mark.parametrize("kind", ["q8_0", "q4_0"])
@pytest.mark.parametrize("rotate", [True, False])
def test_quantised_blocks_bit_identical_to_gguf(kind, rotate):
    layout = KVLayout(((2, 64, 64), (2, 64, 64)), (0, 16))
    cache = PagedKVCache(layout, n_ctx=256, options=KVCacheOptions(kind, kind, rotate=rotate))
    seq = cache.new_sequence()
    g = torch.Generator().manual_seed(3)
    T = 40
    k = torch.randn(T, 2, 64, generator=g) * 3
    v = torch.randn(T, 2, 64, generator=g)
    k[:, :, 5] *= 40  # an outlier channel, which the rotation spreads out
    batch = StepBatch(cache, [Segment(seq, 0, 0, T, True)])
    q = torch.randn(T, 4, 64, generator=g)
    for layer in (0, 1):
        batch.attend(layer, q, k, v, batch.positions, scale=0.125, window=layout.windows[layer],
                     attention=lambda *a, **kw: torch.zeros(a[0].shape[0], 4 * 64))
        st = cache.layers[layer]
        assert (st.rot_k, st.rot_v) == ((64, 64) if rotate else (0, 0))
        kk = kv_quant.hadamard(k, 64) if rotate else k
        vv = kv_quant.hadamard(v, 64) if rotate else v
        slots = batch.new_slots(st.group)
        for stored, x in ((st.k, kk), (st.v, vv)):
            want = gguf.quants.quantize(x.numpy().reshape(T * 2, 64), QTYPES[kind])
            assert np.array_equal(stored[slots].numpy().reshape(T * 2, -1), want)



@pytest.mark.parametrize("kind,rotate", [("f16", True), ("bf16", True), ("q8_0", True), ("q8_0", False),
                                         ("q4_0", True)])
def test_attention_gets_query_in_the_k_types_dot_type(kind, rotate):
    # What the attention kernel is handed: Q rotated like K, then rounded as llama.cpp's CPU attention
    # rounds it for this K type (q8_0 blocks for q8_0/q4_0 keys, bf16 for bf16, float32 for f16 keys).
    layout = KVLayout(((2, 64, 64),), (0,))
    cache = PagedKVCache(layout, n_ctx=64, options=KVCacheOptions(kind, kind, rotate=rotate))
    g = torch.Generator().manual_seed(5)
    T = 8
    q, k, v = torch.randn(T, 4, 64, generator=g), torch.randn(T, 2, 64, generator=g), torch.randn(T, 2, 64, generator=g)
    batch = StepBatch(cache, [Segment(cache.new_sequence(), 0, 0, T, True)])
    seen = []

    def capture(qq, *a, **kw):
        seen.append(qq.clone())
        return torch.zeros(qq.shape[0], 4 * 64)

    batch.attend(0, q, k, v, batch.positions, scale=0.125, attention=capture)
    got = torch.cat(seen)
    qr = kv_quant.hadamard(q, 64) if cache.layers[0].rot_k else q
    if kind == "f16":
        assert torch.equal(got, q)
    elif kind == "bf16":
        assert torch.equal(got, q.to(torch.bfloat16).float())
    else:
        assert torch.equal(got, kv_quant.query_for_keys(qr, "q8_0"))
        assert (got - qr).abs().max() <= qr.abs().max() / 127

def test_k_rotation_size_is_llamacpps():
    assert [kv_quant.k_rotation_group(d) for d in (64, 128, 192, 256, 320, 512)] == [64, 128, 64, 256, 64, 512]


def _theory(shapes, windows, tk, tv):
    elem = {"f32": 4, "f16": 2, "bf16": 2, "q8_0": 34 / 32, "q4_0": 18 / 32}
    full = sliding = 0
    for s, w in zip(shapes, windows):
        if s is not None:
            b = s[0] * (s[1] * elem[tk] + s[2] * elem[tv])
            if w:
                sliding += b
            else:
                full += b
    return full, sliding


@pytest.mark.parametrize("types", [("f16", "f16"), ("q8_0", "q8_0"), ("q4_0", "q4_0"), ("q8_0", "f16")])
def test_memory_per_token_is_theoretical(gemma_path, types):
    from qatserve.engine.loader import load_model_file

    loaded = load_model_file(gemma_path)
    try:
        layout = KVLayout.of_model(loaded.model)
    finally:
        loaded.gguf.close()
    # The default model (Gemma 3 270M): 18 layers, 1 KV head of 256, every 6th layer full.
    assert layout.shapes == ((1, 256, 256),) * 18
    assert layout.windows == tuple(0 if (i + 1) % 6 == 0 else 512 for i in range(18))
    # The shape table's layout for the same model agrees with the file's.
    assert KVLayout(*get_shape("gemma3-270m").kv_layout()) == layout
    for shape in ("gemma3-270m", "gemma4-31b", "gemma4-e2b"):
        lay = KVLayout(*get_shape(shape).kv_layout())
        full, sliding = _theory(lay.shapes, lay.windows, *types)
        got = lay.bytes_per_token(*types)
        assert (got.get("full", 0), got.get("sliding", 0)) == (full, sliding)
        # What the cache allocates: every slot of a group holds one token of each of its layers.
        cache = PagedKVCache(lay, n_ctx=4096, options=KVCacheOptions(*types))
        for g, w in enumerate(cache.group_windows):
            slots = cache.pools[g].n_blocks * cache.block_size
            per = sum(st.k.numel() * st.k.element_size() + st.v.numel() * st.v.element_size()
                      for st in cache.layers if st is not None and st.group == g) / slots
            assert per == (sliding if w else full)
    # gemma4-31b: 50 sliding layers (16 x 256) and 10 full layers (4 x 512), f16: 819200 + 81920 B/token.
    assert KVLayout(*get_shape("gemma4-31b").kv_layout()).bytes_per_token("f16", "f16") == {
        "sliding": 819200, "full": 81920, "total": 901120}


def test_sliding_layers_keep_only_their_window(tiny_gemma3):
    eng = Engine(tiny_gemma3.model, None, EngineConfig(n_ctx=1024, n_slots=1, max_batch_tokens=32))
    g_sliding = eng.cache.group_windows.index(WINDOW)
    pool = eng.cache.pools[g_sliding]
    req = eng.add_request(random_prompts([300], seed=8)[0], SamplingParams(temperature=0.0, max_tokens=200))
    held = []
    while eng.has_work():
        eng.step()
        if req.seq is not None:
            held.append(sum(b is not None for b in req.seq.tables[g_sliding]))
    # window 16 + one step (<= 64 rows) + one extra block: never more than 4 blocks of 32 in use,
    # while the full-attention group holds all 500 positions.
    assert max(held) <= 4
    assert pool.n_blocks <= 6
    assert req.result.finish_reason == "length"


def test_prompt_too_long_and_context_full(tiny_gemma3):
    eng = Engine(tiny_gemma3.model, None, EngineConfig(n_ctx=128, n_slots=2))
    with pytest.raises(RequestError, match="does not fit in a slot context of 64"):
        eng.add_request(list(range(1, 65)), SamplingParams())
    req = eng.add_request(list(range(1, 61)), SamplingParams(temperature=0.0, max_tokens=100))
    eng.run_until_done()
    assert req.result.finish_reason == "context"
    assert len(req.result.tokens) == 4  # positions 60..63 fill the slot's 64


def test_blocks_return_to_the_pool(tiny_gemma3):
    eng = Engine(tiny_gemma3.model, None, EngineConfig(n_ctx=512, n_slots=2,
                                                        kv=KVCacheOptions(prefix_cache=False)))
    total = [p.n_available() for p in eng.cache.pools]
    for p in random_prompts([50, 120, 7], seed=9):
        eng.add_request(p, SamplingParams(temperature=0.0, max_tokens=5))
    r = eng.add_request(random_prompts([90], seed=10)[0], SamplingParams(temperature=0.0, max_tokens=50))
    eng.step()
    eng.step()
    assert eng.abort(r.id)
    assert r.result.finish_reason == "abort"
    eng.run_until_done()
    assert [p.n_available() for p in eng.cache.pools] == total
    assert all(s is None for s in eng.slots)


def test_prefix_blocks_are_evicted_lru_when_needed(tiny_gemma3):
    eng = Engine(tiny_gemma3.model, None, EngineConfig(n_ctx=256, n_slots=1))
    full = eng.cache.pools[eng.cache.group_windows.index(0)]
    a, b = random_prompts([200, 200], seed=11)
    eng.add_request(a, SamplingParams(temperature=0.0, max_tokens=1))
    eng.run_until_done()
    assert len(full.by_hash) == 6  # 6 whole prompt blocks registered
    eng.add_request(b, SamplingParams(temperature=0.0, max_tokens=1))
    eng.run_until_done()  # needs 7 of the 8 blocks: most of a's are evicted
    assert full.n_available() == full.n_blocks
    hit = eng.add_request(a, SamplingParams(temperature=0.0, max_tokens=1))
    eng.run_until_done()
    assert hit.result.timings.cache_n == 0  # a's first block was evicted first (LRU)
