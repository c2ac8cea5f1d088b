"""`qatserve quantize IN.gguf OUT.gguf TYPE`: post-training quantisation of a GGUF model, tensor by tensor.

Targets: F32, F16, BF16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0. Tensors are dequantised from any type
`quant.blocks` decodes (bit-exact with ggml) and re-encoded with llama.cpp's reference rounding
(`quantize_row_*_ref`, bit-exact with `gguf.quants`), so a file made here holds the bytes llama-quantize
would write for the same type choices (we never use an importance matrix).

Which type each tensor gets follows llama.cpp's `src/llama-quant.cpp` (build b1-0c1e570):
- Only tensors whose name ends in "weight", with at least 2 dimensions, are converted; norms
  ("_norm.weight"), MoE routers ("ffn_gate_inp"), altup/laurel, per_layer_model_proj, positional and
  token-type embeddings, conv1d and a few other small tensors keep their type (`_KEEP_SUBSTRINGS`).
- For a quantised TYPE, `--tensor-type REGEX=TYPE` overrides (the first pattern that `re.search`es the
  tensor name wins; patterns are lowercased, as llama-quantize does); otherwise output.weight, and
  token_embd.weight when the model has no output.weight (tied embeddings), get Q6_K in llama.cpp
  unless TYPE is Q8_0 or the row length does not fit TYPE's block (then Q8_0). We cannot write Q6_K
  bit-exactly, so we use Q8_0 there: the type llama.cpp itself falls back to when the row length is not
  a multiple of 256 (e.g. Gemma 3 270M, 640 columns, where both tools write Q8_0). Larger file, not
  worse fidelity; `--tensor-type '^output\\.weight$=q4_0'` (or `--keep-embeddings`) overrides.
- A row length that is not a multiple of the chosen type's block size (32) falls back to F16.
- `--keep-embeddings TYPE` is llama-quantize's --token-embedding-type: token_embd.weight (and
  per_layer_token_embd.weight unless a --tensor-type pattern names it) gets TYPE, no fallback.
- With a float TYPE (F32/F16/BF16) every convertible tensor gets TYPE and --tensor-type is ignored,
  as in llama.cpp (its overrides apply only when the target is a quantised type).
- A tensor already in its target type is copied byte for byte. Unlike llama-quantize, quantised input
  is accepted without --allow-requantize (dequantisation is exact; requantising still loses accuracy).
Metadata is copied key by key in order; general.file_type is set to TYPE's llama_ftype and
general.quantization_version to 2, as llama-quantize does.

The output is written to a temporary file next to OUT, re-opened with the validating reader, and only
then renamed to OUT: a failure never leaves a half-written OUT.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import gguf
import numpy as np
from gguf import GGMLQuantizationType as T
from gguf import GGUFValueType as V
from gguf.constants import GGML_QUANT_SIZES

from qatserve.errors import GGUFError, RequestError
from qatserve.formats.gguf_reader import GGUFFile, TensorInfo, open_gguf

__all__ = ["TARGET_TYPES", "parse_type", "parse_tensor_type", "plan_types", "quantize_file", "QuantizeResult"]


def __getattr__(name: str):
    # `quant.blocks` (and torch with it) is imported when quantising, not when the CLI's parser reads
    # TARGET_TYPES for every command; `qatserve.quantize.blocks` still names it.
    if name == "blocks":
        from qatserve.quant import blocks

        return blocks
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

# Target type -> llama_ftype written to general.file_type.
TARGET_TYPES: dict[T, gguf.LlamaFileType] = {
    T.F32: gguf.LlamaFileType.ALL_F32,
    T.F16: gguf.LlamaFileType.MOSTLY_F16,
    T.BF16: gguf.LlamaFileType.MOSTLY_BF16,
    T.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
    T.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1,
    T.Q5_0: gguf.LlamaFileType.MOSTLY_Q5_0,
    T.Q5_1: gguf.LlamaFileType.MOSTLY_Q5_1,
    T.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0,
}
_FLOAT = frozenset({T.F32, T.F16, T.BF16})
# tensor_allows_quantization: names containing these keep their type (arch-independent part of the list).
_KEEP_SUBSTRINGS = (
    "_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel", "per_layer_model_proj",
    "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight", "indexer.q_proj.weight",
    "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight", "time_mix_w2.weight",
    "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight", "time_mix_a0.weight",
    "time_mix_a1.weight", "time_mix_a2.weight", "time_mix_g1.weight", "time_mix_g2.weight",
    "time_mix_decay_w1.weight", "time_mix_decay_w2.weight", "time_mix_lerp_fused.weight", "attn_rel_b.weight",
    ".position_embd", "sam.pos_embd", "sam.neck.", "sam.net_", ".rel_pos", ".patch_embd", ".patch_merger",
    "a.rvq.codebook", "mm.a.code_embd",
)
_KEEP_NAMES = frozenset({"position_embd.weight", "token_types.weight"})
_TOKEN_EMBD = frozenset({"token_embd.weight", "per_layer_token_embd.weight"})
_OUTPUT = "output.weight"
# Values converted per slab: bounds the float32 working set (~4 B/value plus the output) on any tensor.
_SLAB_VALUES = 1 << 24


def parse_type(name: str, what: str = "type") -> T:
    """A target type by name, case-insensitive ("q8_0", "F16"). RequestError when we cannot write it."""
    key = name.strip().upper()
    for qt in TARGET_TYPES:
        if qt.name == key:
            return qt
    known = ", ".join(t.name for t in TARGET_TYPES)
    raise RequestError(f"unknown or unsupported {what} {name!r}; supported: {known}")


def parse_tensor_type(spec: str) -> tuple[re.Pattern[str], T]:
    """'REGEX=TYPE' -> (compiled lowercased regex, type), as llama-quantize's --tensor-type parses it."""
    pattern, sep, tname = spec.rpartition("=")
    if not sep or not pattern:
        raise RequestError(f"--tensor-type {spec!r}: expected REGEX=TYPE, e.g. attn_v=q8_0")
    try:
        rx = re.compile(pattern.lower())
    except re.error as e:
        raise RequestError(f"--tensor-type {spec!r}: bad regular expression: {e}") from None
    return rx, parse_type(tname, "--tensor-type type")


@dataclass(frozen=True)
class TensorPlan:
    info: TensorInfo
    target: T
    note: str = ""  # why the target differs from the requested type (fallback, substitution)


def _n_dims(info: TensorInfo) -> int:
    """ggml_n_dims: trailing dimensions of size 1 do not count."""
    n = len(info.ne)
    while n > 1 and info.ne[n - 1] == 1:
        n -= 1
    return n


def _allows_quantization(info: TensorInfo) -> bool:
    name = info.name
    return (_n_dims(info) >= 2 and name.endswith("weight") and name not in _KEEP_NAMES
            and not any(s in name for s in _KEEP_SUBSTRINGS))


def _fits(qt: T, ncols: int) -> bool:
    return ncols % GGML_QUANT_SIZES[qt][0] == 0


def plan_types(f: GGUFFile, qtype: T, keep_embeddings: T | None = None,
               tensor_types: tuple[tuple[re.Pattern[str], T], ...] = ()) -> list[TensorPlan]:
    """The target type of every tensor of `f` (file order), by llama-quantize's rules (module docstring).

    Raises RequestError for a choice we cannot write (a block type that does not fit the row length
    through --keep-embeddings, or a source type we cannot decode that would need converting)."""
    from qatserve.quant import blocks  # torch: imported when quantising, not by the CLI's parser

    tied = _OUTPUT not in f.tensors
    plans = []
    for info in f.tensors.values():
        plan = _plan_one(info, qtype, keep_embeddings, tensor_types, tied)
        if plan.target != info.ggml_type:
            if info.ggml_type not in blocks.DEQUANT_TYPES:
                raise RequestError(f"tensor {info.name!r} is {info.ggml_type.name}, which qatserve cannot decode "
                                   f"to convert it to {plan.target.name}")
            if not _fits(plan.target, info.ne[0]):
                raise RequestError(f"tensor {info.name!r}: row length {info.ne[0]} is not a multiple of the "
                                   f"{plan.target.name} block size {GGML_QUANT_SIZES[plan.target][0]}")
        plans.append(plan)
    return plans


def _plan_one(info: TensorInfo, qtype: T, keep_embd: T | None, patterns, tied: bool) -> TensorPlan:
    name, ncols = info.name, info.ne[0]
    if not _allows_quantization(info):
        return TensorPlan(info, info.ggml_type)
    if keep_embd is not None and name in _TOKEN_EMBD:
        named = name == "per_layer_token_embd.weight" and any(rx.search(name) for rx, _ in patterns)
        if not named:
            return TensorPlan(info, keep_embd)
    if qtype in _FLOAT:
        return TensorPlan(info, qtype)
    target, note = qtype, ""
    manual = next((t for rx, t in patterns if rx.search(name)), None)
    if manual is not None:
        target = manual
    elif name == _OUTPUT or (tied and name in _TOKEN_EMBD):
        # llama.cpp: Q8_0 stays, a row that does not fit stays/becomes Q8_0, anything else Q6_K, which
        # we substitute with Q8_0 (see the module docstring).
        if qtype != T.Q8_0:
            target = T.Q8_0
            if not _fits(qtype, ncols) or not _fits(T.Q6_K, ncols):
                note = "output/tied embedding -> Q8_0, as llama.cpp (Q6_K does not fit the row length)"
            else:
                note = "output/tied embedding: llama.cpp would use Q6_K (no bit-exact Q6_K encoder here) -> Q8_0"
    if target not in _FLOAT and not _fits(target, ncols):
        note = f"row length {ncols} is not a multiple of {GGML_QUANT_SIZES[target][0]} -> F16, as llama.cpp"
        target = T.F16
    return TensorPlan(info, target, note)


def _slabs(f: GGUFFile, plan: TensorPlan) -> Iterator[np.ndarray]:
    """The tensor's bytes in `plan.target`, a few rows at a time (uint8 arrays, in order)."""
    from qatserve.quant import blocks

    info = plan.info
    raw = f.tensor_bytes(info.name)
    if plan.target == info.ggml_type:
        yield raw
        return
    ncols = info.ne[0]
    nrows = info.nbytes // blocks.row_bytes(info.ggml_type, ncols)
    src_rb = blocks.row_bytes(info.ggml_type, ncols)
    step = max(1, _SLAB_VALUES // ncols)
    for r0 in range(0, nrows, step):
        r1 = min(nrows, r0 + step)
        x = blocks.dequantize(raw[r0 * src_rb: r1 * src_rb], info.ggml_type, (r1 - r0, ncols))
        yield blocks.quantize(x, plan.target).reshape(-1)


class _Writer(gguf.GGUFWriter):
    """GGUFWriter that can also write an empty metadata array (valid GGUF; gguf-py refuses it)."""

    def _pack_val(self, val, vtype, add_vtype, sub_type=None):
        if vtype == V.ARRAY and sub_type is not None and len(val) == 0:
            head = self._pack("I", vtype) if add_vtype else b""
            return head + self._pack("I", sub_type) + self._pack("Q", 0)
        return super()._pack_val(val, vtype, add_vtype, sub_type)


def _copy_metadata(w: gguf.GGUFWriter, f: GGUFFile, ftype: gguf.LlamaFileType) -> None:
    for key, value in f.metadata.items():
        vtype = f.metadata_types[key]
        if key == "general.architecture":
            continue  # GGUFWriter writes it first from its constructor argument
        if key == "general.alignment":
            w.add_custom_alignment(int(value))  # also sets the writer's data alignment
            continue
        if isinstance(vtype, tuple):  # (ARRAY, element type)
            items = value.tolist() if isinstance(value, np.ndarray) else list(value)
            w.add_key_value(key, items, V.ARRAY, sub_type=vtype[1])
        else:
            w.add_key_value(key, value, vtype)
    # Overwrite in place (keeps the key's position when the input has it), as llama-quantize sets them.
    w.kv_data[0]["general.quantization_version"] = gguf.GGUFValue(gguf.GGML_QUANT_VERSION, V.UINT32)
    w.kv_data[0]["general.file_type"] = gguf.GGUFValue(int(ftype), V.UINT32)


@dataclass
class QuantizeResult:
    path: Path
    plans: list[TensorPlan]
    bytes_in: int
    bytes_out: int


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def quantize_file(inp: str | os.PathLike, out: str | os.PathLike, qtype: T | str, *,
                  keep_embeddings: T | str | None = None, tensor_types: tuple[str, ...] = (),
                  progress: Callable[[int, int, TensorPlan], None] | None = None) -> QuantizeResult:
    """Write `inp` re-encoded as `qtype` to `out` (see the module docstring for the per-tensor rules).

    tensor_types: 'REGEX=TYPE' strings. progress(i, n, plan) is called before each tensor is written.
    Raises RequestError (bad arguments, unwritable output) or GGUFError (bad input)."""
    inp, out = Path(inp), Path(out)
    qt = qtype if isinstance(qtype, T) else parse_type(qtype)
    if qt not in TARGET_TYPES:
        raise RequestError(f"cannot quantize to {qt.name}")
    keep = keep_embeddings if keep_embeddings is None or isinstance(keep_embeddings, T) \
        else parse_type(keep_embeddings, "--keep-embeddings type")
    patterns = tuple(parse_tensor_type(s) for s in tensor_types)
    if _same_file(inp, out):
        raise RequestError(f"output {out} is the input file; choose another path")
    if out.is_dir():
        raise RequestError(f"output {out} is a directory")
    with open_gguf(inp) as f:
        arch = f.get("general.architecture")
        if not isinstance(arch, str):
            raise GGUFError(f"{inp}: no general.architecture: not a model file")
        plans = plan_types(f, qt, keep, patterns)
        tmp = out.with_name(f".{out.name}.{os.getpid()}.partial")
        try:
            bytes_out = _write(f, plans, arch, TARGET_TYPES[qt], tmp, progress)
            open_gguf(tmp).close()  # the validating reader must accept what we wrote before it becomes OUT
            os.replace(tmp, out)
        except OSError as e:
            raise RequestError(f"cannot write {out}: {e.strerror or e}") from None
        finally:
            tmp.unlink(missing_ok=True)
        return QuantizeResult(out, plans, sum(t.nbytes for t in f.tensors.values()), bytes_out)


def _write(f: GGUFFile, plans: list[TensorPlan], arch: str, ftype: gguf.LlamaFileType, path: Path,
           progress) -> int:
    from qatserve.quant import blocks

    w = _Writer(path, arch)
    try:
        _copy_metadata(w, f, ftype)
        sizes = []
        for p in plans:
            nrows = p.info.nbytes // blocks.row_bytes(p.info.ggml_type, p.info.ne[0])
            nbytes = nrows * blocks.row_bytes(p.target, p.info.ne[0])
            # tensor_dtype is only consulted when raw_dtype is None; shape is torch order (GGUFWriter reverses it).
            w.add_tensor_info(p.info.name, p.info.shape, np.dtype(np.float32), nbytes, raw_dtype=p.target)
            sizes.append(nbytes)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        fout = w.fout[0]
        # Tensor data slab by slab: GGUFWriter.write_tensor_data wants each tensor whole, so we do its two
        # paddings ourselves (align the start, pad the end), which yields the offsets the header holds.
        for i, (p, nbytes) in enumerate(zip(plans, sizes)):
            if progress is not None:
                progress(i, len(plans), p)
            w.write_padding(fout, fout.tell())
            written = 0
            for slab in _slabs(f, p):
                fout.write(memoryview(np.ascontiguousarray(slab)))
                written += slab.size
            if written != nbytes:  # pragma: no cover - row_bytes arithmetic above guarantees it
                raise RuntimeError(f"{p.info.name}: wrote {written} bytes, header says {nbytes}")
            w.write_padding(fout, nbytes)
        fout.flush()
        os.fsync(fout.fileno())
        return sum(sizes)
    finally:
        w.close()
