"""`qatserve synth`: a GGUF with random, well-formed weights in the exact layout of a released model.

The GPU benchmarks need files of every released size, and most of them cannot be downloaded here.
A synthetic file has the published model's tensor names, shapes, types and metadata (`shapes.py`),
a real tokenizer (copied from the embedded default model), and random blocks whose scales are forced
small, so every dequantised weight is finite with |w| < 0.1 and a forward pass stays finite.

Writing is streamed and memory-bounded: the header goes through `gguf.GGUFWriter`, then each
tensor's data is written in chunks cut from a small pool of random blocks per type (a few MiB,
read at a random block offset per tensor), so a 17 GB file costs a few MiB of memory and runs at
about disk speed.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as V

from qatserve.bench.shapes import SHAPES, WEIGHT_TYPES, Shape, TensorSpec, tensor_nbytes, tensor_specs, tensor_type
from qatserve.errors import RequestError

# Per type: fp16 fields of a block (byte offset, low, high value) and byte ranges whose bits are masked.
# The bounds keep |w| < 0.1 for every code the random bits can hold (formulas: ggml's dequantize_row_*):
_BLOCK_FIELDS: dict[T, tuple[list[tuple[int, float, float]], list[tuple[int, int, int]]]] = {
    T.Q4_0: ([(0, 3e-3, 1.2e-2)], []),  # w = d (q - 8), |q - 8| <= 8
    T.Q4_1: ([(0, 1e-3, 4e-3), (2, -3.5e-2, 0.0)], []),  # w = d q + m, q <= 15
    T.Q5_0: ([(0, 1.5e-3, 6e-3)], []),  # w = d (q - 16), |q - 16| <= 16
    T.Q5_1: ([(0, 5e-4, 2e-3), (2, -3e-2, 0.0)], []),  # w = d q + m, q <= 31
    T.Q8_0: ([(0, 2e-4, 7e-4)], []),  # w = d q, |q| <= 128
    # w = d sc q - dmin m; the 12 packed 6-bit sub-scales/mins masked to 4 bits each (<= 15), q <= 15
    T.Q4_K: ([(0, 1e-4, 3e-4), (2, 5e-4, 2e-3)], [(4, 16, 0x0F)]),
    T.Q5_K: ([(0, 6.2e-5, 1.4e-4), (2, 5e-4, 2e-3)], [(4, 16, 0x0F)]),  # q <= 31
    # w = d sc (q - 32); int8 sub-scales masked to 0..15 (bytes 192..207), d at byte 208
    T.Q6_K: ([(208, 6.2e-5, 2e-4)], [(192, 208, 0x0F)]),
}
_FLOAT_DTYPES = {T.F32: np.float32, T.F16: np.float16}
_POOL_BYTES = 8 << 20  # random blocks kept per type; also the write chunk size
_FILE_TYPES = {T.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0, T.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
               T.F16: gguf.LlamaFileType.MOSTLY_F16, T.BF16: gguf.LlamaFileType.MOSTLY_BF16,
               T.F32: gguf.LlamaFileType.ALL_F32}


def get_shape(name: str) -> Shape:
    """The registered shape `name`, or a RequestError naming the valid ones."""
    if name not in SHAPES:
        raise RequestError(f"unknown shape {name!r}; choose one of: {', '.join(SHAPES)}")
    return SHAPES[name]


def get_weight_type(name: str) -> T:
    """The GGML type for --type `name` (case-insensitive), or a RequestError naming the valid ones."""
    qt = WEIGHT_TYPES.get(name.upper())
    if qt is None:
        raise RequestError(f"unknown --type {name!r}; choose one of: {', '.join(WEIGHT_TYPES)}")
    return qt


def block_pool(qtype: T, rng: np.random.Generator, nbytes: int = _POOL_BYTES) -> np.ndarray:
    """About `nbytes` of random, well-formed `qtype` blocks as a flat uint8 array (whole blocks)."""
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    n = max(1, nbytes // size)
    if qtype in _FLOAT_DTYPES or qtype == T.BF16:
        w = np.clip(rng.standard_normal(n, dtype=np.float32) * 0.02, -0.09, 0.09)
        if qtype == T.BF16:  # round to nearest even on the top 16 bits of the fp32 pattern
            u = w.view(np.uint32)
            return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype("<u2").view(np.uint8)
        return w.astype(_FLOAT_DTYPES[qtype]).view(np.uint8)
    if qtype not in _BLOCK_FIELDS:
        raise RequestError(f"synthetic blocks of type {qtype.name} are not supported; "
                           f"supported: {', '.join(t.name for t in _BLOCK_FIELDS)}, F16, BF16, F32")
    pool = rng.integers(0, 256, size=(n, size), dtype=np.uint8)
    halves, masks = _BLOCK_FIELDS[qtype]
    for off, lo, hi in halves:
        pool[:, off : off + 2] = rng.uniform(lo, hi, n).astype("<f2").view(np.uint8).reshape(n, 2)
    for a, b, mask in masks:
        pool[:, a:b] &= mask
    return pool.reshape(-1)


def _f32_values(spec: TensorSpec, rng: np.random.Generator) -> np.ndarray:
    if spec.role == "rope_freqs":
        # Gemma 4 proportional RoPE (spec 2.6): the first quarter of the 512-dim head rotates, the rest
        # gets factor 1e30, i.e. angle ~0.
        n = spec.shape[0]
        return np.where(np.arange(n) < n // 4, 1.0, 1e30).astype(np.float32)
    n = int(np.prod(spec.shape))
    if spec.role == "router":
        return np.clip(rng.standard_normal(n, dtype=np.float32) * 0.02, -0.09, 0.09)
    # norms (llama.cpp's Gemma files store the effective weight, ~1) and per-layer / per-expert scales
    return rng.uniform(0.9, 1.1, n).astype(np.float32)


def tokenizer_metadata(source: str | os.PathLike | None = None) -> list[tuple[str, object, V, V | None]]:
    """Every `tokenizer.*` key of `source` (default: the embedded Gemma 3 270M) as (key, value, type, subtype).

    Gemma 4 files get this Gemma 3 vocabulary too: the same 262144 ids, but Gemma 4's own tokenizer is
    a BPE ("gemma4") with different special tokens (e.g. <turn|> = 106). That does not matter for
    benchmarks, which need a loadable, promptable file, not meaningful text.
    """
    from qatserve.formats.gguf_reader import open_gguf

    if source is None:
        from qatserve.default_model import default_model_path

        source = default_model_path()
    out = []
    with open_gguf(source) as f:
        for key, value in f.metadata.items():
            if not key.startswith("tokenizer."):
                continue
            vt = f.metadata_types[key]
            if isinstance(vt, tuple):
                out.append((key, value.tolist() if isinstance(value, np.ndarray) else list(value), vt[0], vt[1]))
            else:
                out.append((key, value, vt, None))
    return out


def _add_metadata(w: gguf.GGUFWriter, s: Shape, weight_type: T) -> None:
    w.add_type("model")
    w.add_name(f"synthetic {s.name}")
    w.add_description(f"qatserve synth: random weights in the layout of {s.name} (not a trained model)")
    if s.size_label:
        w.add_size_label(s.size_label)
    w.add_context_length(s.context)
    w.add_embedding_length(s.hidden)
    w.add_block_count(s.layers)
    ff = list(s.n_ff)
    w.add_feed_forward_length(ff[0] if len(set(ff)) == 1 else ff)
    w.add_head_count(s.heads)
    if s.arch == "gemma3":  # llama.cpp's gemma3 converter, key for key
        w.add_layer_norm_rms_eps(1e-6)
        w.add_key_length(s.head_dim)
        w.add_value_length(s.head_dim)
        w.add_rope_freq_base(1e6)
        w.add_sliding_window(s.window)
        w.add_head_count_kv(s.kv_heads)
        if s.rope_scaling:
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(s.rope_scaling)
    else:  # spec 4.2
        kv = [s.kv(il)[0] for il in range(s.layers)]
        w.add_head_count_kv(kv[0] if len(set(kv)) == 1 else kv)
        w.add_layer_norm_rms_eps(1e-6)
        w.add_key_length(s.head_dim_full)
        w.add_value_length(s.head_dim_full)
        w.add_key_length_swa(s.head_dim)
        w.add_value_length_swa(s.head_dim)
        w.add_rope_dimension_count(s.head_dim_full)
        w.add_rope_dimension_count_swa(s.head_dim)
        w.add_rope_freq_base(1e6)
        w.add_rope_freq_base_swa(1e4)
        w.add_sliding_window(s.window)
        w.add_sliding_window_pattern([not full for full in s.full_layers])  # true = sliding
        w.add_shared_kv_layers(s.kv_shared)
        if s.arch == "gemma4":
            w.add_embedding_length_per_layer_input(s.ple)
            w.add_final_logit_softcapping(30.0)
            if s.experts:
                w.add_expert_count(s.experts)
                w.add_expert_used_count(s.experts_used)
                w.add_expert_feed_forward_length(s.expert_ff)
        else:
            w.add_embedding_length_out(s.backbone)
            w.add_nextn_predict_layers(s.layers)  # = block_count: every block is an MTP block
    w.add_file_type(_FILE_TYPES[weight_type])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)


@dataclass(frozen=True)
class SynthResult:
    path: Path
    nbytes: int
    n_tensors: int
    seconds: float


def synth(shape: str | Shape, out: str | os.PathLike, weight_type: str | T = "Q4_0", seed: int = 0, *,
          types: Mapping[str, T] | None = None, tokenizer_from: str | os.PathLike | None = None,
          progress: Callable[[int, int], None] | None = None) -> SynthResult:
    """Write a synthetic GGUF of `shape` to `out` (atomically, via `out.part`) and validate it.

    weight_type: type of the weight matrices (Q4_0, Q8_0, F16, BF16, F32); the rest follows
        `shapes.tensor_type`.
    types: per-tensor type overrides by name (e.g. to mirror an existing file's mixture).
    progress: called as progress(bytes_written, total_bytes) after each tensor.
    """
    from qatserve.formats.gguf_reader import open_gguf

    t0 = time.perf_counter()
    s = get_shape(shape) if isinstance(shape, str) else shape
    wt = get_weight_type(weight_type) if isinstance(weight_type, str) else weight_type
    rng = np.random.default_rng(seed)
    specs = tensor_specs(s)
    unknown = sorted(set(types or {}) - {spec.name for spec in specs})
    if unknown:
        raise RequestError(f"{s.name} has no tensor {unknown[0]!r} (type override)")
    plan: list[tuple[TensorSpec, T, int]] = []
    for spec in specs:
        qt = (types or {}).get(spec.name, tensor_type(spec, s.arch, wt))
        try:
            plan.append((spec, qt, tensor_nbytes(spec, qt)))
        except ValueError as e:
            raise RequestError(f"{s.name}: tensor {spec.name} {spec.shape} cannot be stored as {qt.name}: {e}") from e
    total = sum(n for _, _, n in plan)

    out = Path(out)
    part = out.with_name(out.name + ".part")
    w = gguf.GGUFWriter(part, s.arch)
    _add_metadata(w, s, wt)
    for key, value, vt, sub in tokenizer_metadata(tokenizer_from):
        w.add_key_value(key, value, vt, sub)
    for spec, qt, n in plan:
        w.add_tensor_info(spec.name, spec.shape, np.dtype(np.float32), n, raw_dtype=qt)
    pools: dict[T, np.ndarray] = {}
    written = 0
    try:
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        f = w.fout[0]
        w.write_padding(f, f.tell())
        for spec, qt, n in plan:
            if qt == T.F32 and spec.role != "weight" and spec.role != "embd":
                f.write(_f32_values(spec, rng).tobytes())
            else:
                if qt not in pools:
                    p = block_pool(qt, rng)
                    pools[qt] = np.concatenate([p, p])  # doubled: any pool-sized window is one slice
                _write_blocks(f, pools[qt], gguf.GGML_QUANT_SIZES[qt][1], n, rng)
            w.write_padding(f, n)
            written += n
            if progress is not None:
                progress(written, total)
        w.close()
    except BaseException:
        w.close()
        part.unlink(missing_ok=True)
        raise
    os.replace(part, out)
    with open_gguf(out) as g:  # our own validating reader: header, metadata, offsets, sizes
        if len(g.tensors) != len(plan):
            raise RuntimeError(f"{out}: wrote {len(plan)} tensors, the reader sees {len(g.tensors)}")
    return SynthResult(out, out.stat().st_size, len(plan), time.perf_counter() - t0)


def _write_blocks(f, pool2: np.ndarray, block_bytes: int, nbytes: int, rng: np.random.Generator) -> None:
    """Write `nbytes` (whole blocks) cut from the doubled pool, starting at a random block."""
    n_pool = pool2.size // 2 // block_bytes
    start = int(rng.integers(n_pool))
    left = nbytes // block_bytes
    view = memoryview(pool2)
    while left:
        k = min(left, n_pool)
        f.write(view[start * block_bytes : (start + k) * block_bytes])
        start = (start + k) % n_pool
        left -= k


def shape_table(weight_type: T = T.Q4_0) -> str:
    """The `--list` table: every shape with parameters and computed file size beside the published Q4_0 one."""
    from qatserve.bench.shapes import file_bytes, n_params

    rows = [f"{'shape':26s} {'arch':17s} {'layers':>6s} {'hidden':>6s} {'params':>8s} {'tensors':>7s} "
            f"{weight_type.name + ' GB':>8s} {'published':>9s} {'diff':>6s}"]
    for s in SHAPES.values():
        size = file_bytes(s, weight_type) / 1e9
        pub = f"{s.published_gb:.2f}" if s.published_gb else "?"
        diff = f"{(size / s.published_gb - 1) * 100:+.1f}%" if s.published_gb and weight_type == T.Q4_0 else ""
        rows.append(f"{s.name:26s} {s.arch:17s} {s.layers:6d} {s.hidden:6d} {n_params(s) / 1e9:7.3f}B "
                    f"{len(tensor_specs(s)):7d} {size:8.3f} {pub:>9s} {diff:>6s}")
    rows.append("sizes in GB (1e9 bytes): tensor data + the copied tokenizer header; published = Google's QAT "
                "Q4_0 GGUF where known (Gemma 3: gemma-3-*-it-qat-q4_0-gguf; Gemma 4: issue 3), '?' = not known")
    return "\n".join(rows) + "\n"
