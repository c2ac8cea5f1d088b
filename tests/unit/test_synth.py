"""`qatserve synth`: shape registry vs published configs, sizes vs published files, written files vs
the real default model, and the writer's blocks (finite, small). Only small shapes are written."""

from __future__ import annotations

import math

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T

from qatserve.bench import synth as S
from qatserve.bench.shapes import SHAPES, VOCAB, file_bytes, n_params, tensor_specs, tensor_type
from qatserve.config import model_config_from_gguf
from qatserve.formats.gguf_reader import open_gguf
from qatserve.inspect_gguf import check_tensors
from qatserve.quant.blocks import dequantize

GEMMA4_NAMES = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.GEMMA4]}


def _meta(shape) -> dict:
    """The metadata synth writes for `shape`, without writing a file."""
    w = gguf.GGUFWriter(None, shape.arch)
    S._add_metadata(w, shape, T.Q4_0)
    return {k: v.value for k, v in w.kv_data[0].items()}


def _dims(shape) -> dict[str, tuple[int, ...]]:
    return {t.name: t.shape for t in tensor_specs(shape)}


# --- registry -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(SHAPES))
def test_tensor_list_matches_config(name: str) -> None:
    s = SHAPES[name]
    d = _dims(s)
    assert len(d) == len(tensor_specs(s)), "duplicate tensor names"
    H, L = s.hidden, s.layers
    assert d["token_embd.weight"] == (VOCAB, H) and d["output_norm.weight"] == (H,)
    expected = 2
    for il in range(L):
        p, full = f"blk.{il}.", s.full_layers[il]
        nkv, hd = (s.kv_heads_full, s.head_dim_full) if full and s.arch != "gemma3" else (s.kv_heads, s.head_dim)
        owns_kv = il < L - s.kv_shared
        has_v = owns_kv and not (s.k_eq_v and full)
        n = 10 + (2 if owns_kv else 0) + has_v + (s.arch != "gemma3") + (8 if s.experts else 0) + (3 if s.ple else 0)
        expected += n
        assert d[p + "attn_q.weight"] == (s.heads * hd, H)
        assert d[p + "attn_q_norm.weight"] == (hd,)
        assert d[p + "attn_output.weight"] == (H, s.heads * hd)
        assert (p + "attn_k.weight" in d) == owns_kv and (p + "attn_k_norm.weight" in d) == owns_kv
        assert (p + "attn_v.weight" in d) == has_v
        if owns_kv:
            assert d[p + "attn_k.weight"] == (nkv * hd, H)
        if has_v:
            assert d[p + "attn_v.weight"] == (nkv * hd, H)
        assert d[p + "ffn_gate.weight"] == d[p + "ffn_up.weight"] == (s.n_ff[il], H)
        assert d[p + "ffn_down.weight"] == (H, s.n_ff[il])
        if s.experts:
            E, I = s.experts, s.expert_ff
            assert d[p + "ffn_gate_inp.weight"] == (E, H) and d[p + "ffn_down_exps.scale"] == (E,)
            assert d[p + "ffn_gate_up_exps.weight"] == (E, 2 * I, H) and d[p + "ffn_down_exps.weight"] == (E, H, I)
        if s.arch != "gemma3":
            assert d[p + "layer_output_scale.weight"] == (1,)
    if s.arch != "gemma3":
        expected += 1  # rope_freqs
        assert d["rope_freqs.weight"] == (256,)
    if s.ple:
        expected += 3
        assert d["per_layer_token_embd.weight"] == (VOCAB, L * s.ple)
        assert d["per_layer_model_proj.weight"] == (L * s.ple, H)
    if s.arch == "gemma4-assistant":
        expected += 2
        assert d["nextn.pre_projection.weight"] == (H, 2 * s.backbone)
        assert d["nextn.post_projection.weight"] == (s.backbone, H)
    assert len(d) == expected
    # names: gguf's GEMMA4 tensor map (the assistant adds its two nextn projections)
    if s.arch != "gemma3":
        for t in d:
            base = t.rsplit(".", 1)[0]
            generic = ".".join("{bid}" if part.isdigit() else part for part in base.split("."))
            assert generic in GEMMA4_NAMES or base.startswith("nextn."), t
    # every matrix fits its block type
    for spec in tensor_specs(s):
        assert spec.shape[-1] % 32 == 0 or spec.role != "weight"


def test_published_configs() -> None:
    """Spot values from the published configs / spec tables."""
    e2b = SHAPES["gemma4-e2b"]
    assert [i for i, f in enumerate(e2b.full_layers) if f] == list(range(4, 35, 5))
    assert e2b.n_ff[14] == 6144 and e2b.n_ff[15] == 12288 and e2b.layers - e2b.kv_shared == 15
    for name, n_full in [("gemma4-e4b", 7), ("gemma4-12b", 8), ("gemma4-26b-a4b", 5), ("gemma4-31b", 10)]:
        s = SHAPES[name]
        assert [i for i, f in enumerate(s.full_layers) if f] == list(range(5, s.layers, 6)) and sum(s.full_layers) == n_full
    assert [SHAPES[n].full_layers for n in SHAPES if n.endswith("-assistant")] == [(False, False, False, True)] * 5
    # E2B assistant: ~79 M parameters with its (dropped) centroid table of 2048 x 256
    assert abs(n_params(SHAPES["gemma4-e2b-assistant"]) + 2048 * 256 - 79e6) < 2e6


@pytest.mark.parametrize("name", [n for n, s in SHAPES.items() if s.arch == "gemma3"])
def test_gemma3_metadata_reads_as_published_config(name: str) -> None:
    s = SHAPES[name]
    cfg = model_config_from_gguf(_meta(s), VOCAB)
    assert (cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.n_head_kv, cfg.head_dim, cfg.n_ff) == (
        s.hidden, s.layers, s.heads, s.kv_heads, s.head_dim, s.n_ff[0])
    assert cfg.sliding_window == s.window and cfg.context_length == s.context
    assert cfg.rope_freq_scale == pytest.approx(1 / s.rope_scaling if s.rope_scaling else 1.0)
    assert math.isclose(cfg.attn_scale, 1 / math.sqrt(s.query_pre_attn_scalar), rel_tol=1e-9)
    assert cfg.swa_layers == tuple(not f for f in s.full_layers)


@pytest.mark.parametrize("name", [n for n, s in SHAPES.items() if s.arch != "gemma3"])
def test_gemma4_metadata_keys(name: str) -> None:
    """The keys llama.cpp's gemma4 / gemma4-assistant loaders require or read (spec 4.2)."""
    s = SHAPES[name]
    m, a = _meta(s), s.arch + "."
    required = ["context_length", "embedding_length", "block_count", "attention.sliding_window",
                "attention.sliding_window_pattern", "attention.layer_norm_rms_epsilon",
                "attention.key_length_swa", "attention.value_length_swa"]
    required += ["embedding_length_per_layer_input"] if s.arch == "gemma4" else ["embedding_length_out", "nextn_predict_layers"]
    for key in required:
        assert a + key in m, key
    assert m["general.architecture"] == s.arch
    assert m[a + "attention.sliding_window_pattern"] == [not f for f in s.full_layers]
    assert m[a + "attention.key_length"] == 512 and m[a + "rope.dimension_count_swa"] == 256
    kv = m[a + "attention.head_count_kv"]
    assert (kv if isinstance(kv, list) else [kv] * s.layers) == [s.kv(i)[0] for i in range(s.layers)]
    ff = m[a + "feed_forward_length"]
    assert (ff if isinstance(ff, list) else [ff] * s.layers) == list(s.n_ff)
    if s.arch == "gemma4-assistant":
        assert m[a + "embedding_length_out"] != m[a + "embedding_length"]  # llama.cpp rejects equal
        assert m[a + "nextn_predict_layers"] == m[a + "block_count"] == 4
    if s.experts:
        assert (m[a + "expert_count"], m[a + "expert_used_count"], m[a + "expert_feed_forward_length"]) == (128, 8, 704)


@pytest.mark.parametrize("name,gb", [("gemma4-26b-a4b", 14.44), ("gemma4-31b", 17.65), ("gemma4-12b", 6.98),
                                     ("gemma3-1b", 1.00), ("gemma3-4b", 3.16), ("gemma3-12b", 8.07), ("gemma3-27b", 17.2)])
def test_sizes_match_published_files(name: str, gb: float) -> None:
    assert abs(file_bytes(SHAPES[name]) / 1e9 / gb - 1) < 0.03


def test_types_follow_qat_q4_0_files() -> None:
    g3, g4 = SHAPES["gemma3-12b"], SHAPES["gemma4-26b-a4b"]
    types = {t.name: tensor_type(t, g4.arch, T.Q4_0) for t in tensor_specs(g4)}
    assert types["token_embd.weight"] == T.Q6_K and types["blk.0.ffn_gate_inp.weight"] == T.F32
    assert types["blk.0.ffn_gate_up_exps.weight"] == T.Q4_0 and types["blk.0.attn_norm.weight"] == T.F32
    assert {tensor_type(t, g3.arch, T.Q4_0) for t in tensor_specs(g3) if t.name == "token_embd.weight"} == {T.F16}
    assert {tensor_type(t, g4.arch, T.Q8_0) for t in tensor_specs(g4) if t.role in ("weight", "embd")} == {T.Q8_0}


# --- blocks ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("qtype", sorted(S._BLOCK_FIELDS, key=int) + [T.F16, T.BF16, T.F32])
def test_random_blocks_are_finite_and_small(qtype: T) -> None:
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    pool = S.block_pool(qtype, np.random.default_rng(1), 1 << 16)
    w = dequantize(pool, qtype, (pool.size // size * block,))
    assert torch.isfinite(w).all()
    assert w.abs().max() < 0.1 and w.std() > 1e-3


# --- written files --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_270m():
    from tests.conftest import gemma3_270m_path

    with open_gguf(gemma3_270m_path()) as f:
        yield {n: (t.ggml_type, t.shape) for n, t in f.tensors.items()}, dict(f.metadata), gemma3_270m_path()


@pytest.fixture(scope="module")
def mirror_270m(tmp_path_factory, real_270m):
    """gemma3-270m written with the real file's per-tensor types."""
    types = {n: qt for n, (qt, _) in real_270m[0].items()}
    return S.synth("gemma3-270m", tmp_path_factory.mktemp("synth") / "mirror.gguf", types=types, seed=3).path


def test_270m_mirror_equals_real_file(mirror_270m, real_270m) -> None:
    real, real_meta, _ = real_270m
    with open_gguf(mirror_270m) as f:
        assert list(f.tensors) == list(real)  # same names, same order
        assert {n: (t.ggml_type, t.shape) for n, t in f.tensors.items()} == real
        for key, value in real_meta.items():
            if key.startswith(("gemma3.", "tokenizer.")):
                got = f.metadata[key]
                assert (np.array_equal(got, value) if isinstance(value, np.ndarray) else got == value), key


def test_270m_mirror_loads_and_generates(mirror_270m) -> None:
    from qatserve.engine.generate import Generator
    from qatserve.engine.loader import load_model_file
    from qatserve.engine.sampler import SamplingParams

    loaded = load_model_file(mirror_270m)
    try:
        gen = Generator(loaded.model, loaded.tokenizer, n_ctx=64)
        ids = loaded.tokenizer.encode("The benchmark prompt")
        assert torch.isfinite(gen.logits_all(ids)).all()
        out = gen.generate(ids, SamplingParams(temperature=0, max_tokens=3, seed=0))
        assert len(out.tokens) == 3 and all(0 <= t < VOCAB for t in out.tokens)
    finally:
        loaded.gguf.close()


def test_270m_default_q4_0(tmp_path) -> None:
    r = S.synth("gemma3-270m", tmp_path / "q4.gguf")
    assert abs(r.nbytes - file_bytes(SHAPES["gemma3-270m"])) < 100_000
    with open_gguf(r.path) as f:
        kinds = {t.ggml_type for n, t in f.tensors.items() if n.endswith(("attn_q.weight", "ffn_down.weight"))}
        assert kinds == {T.Q4_0} and f.tensors["token_embd.weight"].ggml_type == T.F16
        assert f.metadata["general.file_type"] == gguf.LlamaFileType.MOSTLY_Q4_0
        assert not check_tensors(f)


def test_assistant_file_structure(tmp_path) -> None:
    s = SHAPES["gemma4-e2b-assistant"]
    r = S.synth(s.name, tmp_path / "a.gguf", "Q8_0", seed=7)
    with open_gguf(r.path) as f:
        assert {n: t.shape for n, t in f.tensors.items()} == _dims(s)
        assert f.tensors["blk.0.attn_q.weight"].ggml_type == T.Q8_0 and f.tensors["token_embd.weight"].ggml_type == T.Q8_0
        assert f.metadata["general.architecture"] == "gemma4-assistant"
        assert f.metadata["gemma4-assistant.embedding_length_out"] == 1536
        assert len(f.metadata["tokenizer.ggml.tokens"]) == VOCAB
        ff = np.frombuffer(f.tensor_bytes("rope_freqs.weight"), np.float32)
        assert (ff[:64] == 1).all() and (ff[64:] == np.float32(1e30)).all()
        assert not check_tensors(f)


def test_type_override_must_name_a_tensor(tmp_path) -> None:
    from qatserve.errors import RequestError

    with pytest.raises(RequestError, match="blk.9.attn_k.weight"):
        S.synth("gemma4-e2b-assistant", tmp_path / "a.gguf", types={"blk.9.attn_k.weight": T.Q8_0})
    assert not list(tmp_path.iterdir())


def test_seed_is_deterministic(tmp_path) -> None:
    a = S.synth("gemma4-e2b-assistant", tmp_path / "a.gguf", "F16", seed=5).path.read_bytes()
    b = S.synth("gemma4-e2b-assistant", tmp_path / "b.gguf", "F16", seed=5).path.read_bytes()
    assert a == b


# --- CLI ------------------------------------------------------------------------------------------

def test_cli_errors_and_list(tmp_path, capsys) -> None:
    from qatserve.cli import main

    assert main(["synth", "gemma5-1b", str(tmp_path / "x.gguf")]) == 64
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "gemma4-31b-assistant" in err
    assert main(["synth", "gemma3-270m", str(tmp_path / "x.gguf"), "--type", "Q3_K"]) == 64
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Q4_0, Q8_0, F16, BF16, F32" in err
    assert not (tmp_path / "x.gguf").exists()
    assert main(["synth", "--list"]) == 0
    table = capsys.readouterr().out
    assert all(name in table for name in SHAPES)
