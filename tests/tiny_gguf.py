"""Writes small, well-formed GGUF model files directly (no transformers), for fault and CLI tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import gguf
import numpy as np

LLAMA = dict(n_vocab=64, n_embd=32, n_layer=2, n_head=4, n_head_kv=2, n_ff=48)


def llama_tensors(seed: int = 0, **dims: int) -> dict[str, np.ndarray]:
    """Random float32 tensors (numpy order [out, in]) of a tiny llama."""
    d = {**LLAMA, **dims}
    rng = np.random.default_rng(seed)
    e, hd = d["n_embd"], d["n_embd"] // d["n_head"]

    def mat(o: int, i: int) -> np.ndarray:
        return (rng.standard_normal((o, i)) * 0.1).astype(np.float32)

    t = {"token_embd.weight": mat(d["n_vocab"], e), "output_norm.weight": np.ones(e, np.float32)}
    for il in range(d["n_layer"]):
        p = f"blk.{il}."
        t[p + "attn_norm.weight"] = np.ones(e, np.float32)
        t[p + "attn_q.weight"] = mat(d["n_head"] * hd, e)
        t[p + "attn_k.weight"] = mat(d["n_head_kv"] * hd, e)
        t[p + "attn_v.weight"] = mat(d["n_head_kv"] * hd, e)
        t[p + "attn_output.weight"] = mat(e, d["n_head"] * hd)
        t[p + "ffn_norm.weight"] = np.ones(e, np.float32)
        t[p + "ffn_gate.weight"] = mat(d["n_ff"], e)
        t[p + "ffn_up.weight"] = mat(d["n_ff"], e)
        t[p + "ffn_down.weight"] = mat(e, d["n_ff"])
    return t


def write_llama(path: Path, *, meta: dict[str, Any] | None = None, tensors: dict[str, np.ndarray] | None = None,
                arch: str = "llama", raw: dict[str, tuple[np.ndarray, gguf.GGMLQuantizationType]] | None = None) -> Path:
    """A tiny llama GGUF; `meta` overrides/extends the hyper-parameters (value None deletes a key)."""
    d = LLAMA
    keys: dict[str, Any] = {
        f"{arch}.block_count": d["n_layer"], f"{arch}.embedding_length": d["n_embd"],
        f"{arch}.feed_forward_length": d["n_ff"], f"{arch}.attention.head_count": d["n_head"],
        f"{arch}.attention.head_count_kv": d["n_head_kv"], f"{arch}.context_length": 128,
        f"{arch}.attention.layer_norm_rms_epsilon": 1e-5, f"{arch}.vocab_size": d["n_vocab"],
    }
    keys.update(meta or {})
    w = gguf.GGUFWriter(str(path), arch)
    for k, v in keys.items():
        if v is None:
            continue
        if isinstance(v, bool):
            w.add_bool(k, v)
        elif isinstance(v, int):
            w.add_uint32(k, v) if 0 <= v < 2**32 else w.add_uint64(k, v)
        elif isinstance(v, float):
            w.add_float32(k, v)
        elif isinstance(v, (list, tuple)):
            w.add_array(k, list(v))  # element type from the first item: str, int32 or float32
        else:
            w.add_string(k, v)
    for name, arr in (llama_tensors() if tensors is None else tensors).items():
        w.add_tensor(name, arr)
    for name, (arr, qtype) in (raw or {}).items():
        w.add_tensor(name, arr, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
