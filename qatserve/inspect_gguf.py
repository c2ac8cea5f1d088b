"""`qatserve inspect`: a readable report of a GGUF file (summary, metadata, tensor table)."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import torch

from qatserve.formats.gguf_reader import GGUFFile

_ARRAY_PREVIEW = 8


def _fmt_value(value, all_metadata: bool) -> str:
    if isinstance(value, (list, np.ndarray)):
        n = len(value)
        items = list(value if all_metadata else value[:_ARRAY_PREVIEW])
        shown = ", ".join(repr(v.item() if hasattr(v, "item") else v) for v in items)
        more = "" if all_metadata or n <= _ARRAY_PREVIEW else f", ... ({n} items)"
        return f"[{shown}{more}]"
    text = repr(value)
    if not all_metadata and len(text) > 120:
        text = text[:117] + "..."
    return text


def _compact(value) -> str:
    """Per-layer arrays as runs ("6144 x15, 12288 x20"); scalars as they are."""
    if not isinstance(value, (list, np.ndarray)):
        return str(value)
    runs: list[list] = []
    for v in (x.item() if hasattr(x, "item") else x for x in value):
        if runs and runs[-1][0] == v:
            runs[-1][1] += 1
        else:
            runs.append([v, 1])
    return ", ".join(f"{v} x{n}" if n > 1 else str(v) for v, n in runs)


def _summary(f: GGUFFile) -> list[str]:
    m = f.metadata
    arch = m.get("general.architecture", "?")
    p = f"{arch}."
    n_params = sum(math.prod(t.ne) for t in f.tensors.values())
    n_bytes = sum(t.nbytes for t in f.tensors.values())
    types = Counter(t.ggml_type.name for t in f.tensors.values())
    rows = [
        ("name", m.get("general.name", "?")),
        ("architecture", arch),
        ("layers", m.get(p + "block_count", "?")),
        ("embedding", m.get(p + "embedding_length", "?")),
        ("heads (q / kv)", f"{_compact(m.get(p + 'attention.head_count', '?'))} / "
                           f"{_compact(m.get(p + 'attention.head_count_kv', '?'))}"),
        ("head dim (k / v)", f"{m.get(p + 'attention.key_length', '?')} / {m.get(p + 'attention.value_length', '?')}"),
        ("feed-forward", _compact(m.get(p + "feed_forward_length", "?"))),
        ("context (train)", m.get(p + "context_length", "?")),
    ]
    if p + "attention.sliding_window" in m:
        rows.append(("sliding window", m[p + "attention.sliding_window"]))
    if p + "attention.key_length_swa" in m:
        rows.append(("head dim, sliding (k / v)",
                     f"{m[p + 'attention.key_length_swa']} / {m.get(p + 'attention.value_length_swa', '?')}"))
    if p + "attention.sliding_window_pattern" in m:
        pattern = m[p + "attention.sliding_window_pattern"]
        if isinstance(pattern, (list, np.ndarray)):
            rows.append(("layer pattern", "".join("S" if x else "F" for x in pattern)))
    if p + "attention.shared_kv_layers" in m:
        rows.append(("KV-shared layers", m[p + "attention.shared_kv_layers"]))
    if p + "embedding_length_per_layer_input" in m:
        rows.append(("per-layer input", m[p + "embedding_length_per_layer_input"]))
    if p + "expert_count" in m:
        rows.append(("experts (used / total)", f"{m.get(p + 'expert_used_count', '?')} / {m[p + 'expert_count']}"))
    if "tokenizer.ggml.tokens" in m:
        rows.append(("vocabulary", f"{len(m['tokenizer.ggml.tokens'])} ({m.get('tokenizer.ggml.model', '?')})"))
    rows += [
        ("parameters", f"{n_params / 1e6:.2f} M"),
        ("tensor data", f"{n_bytes / 2**20:.2f} MiB, {8 * n_bytes / max(n_params, 1):.2f} bits/weight"),
        ("tensor types", ", ".join(f"{k} x{v}" for k, v in types.most_common())),
    ]
    width = max(len(k) for k, _ in rows)
    return [f"{k:<{width}}  {v}" for k, v in rows]


def describe(f: GGUFFile, all_metadata: bool = False) -> str:
    lines = [f"{f.path}: GGUF v{f.version}, {len(f.metadata)} metadata keys, {len(f.tensors)} tensors", ""]
    lines += _summary(f)
    lines += ["", "metadata:"]
    for key, value in f.metadata.items():
        lines.append(f"  {key} = {_fmt_value(value, all_metadata)}")
    lines += ["", f"  {'tensor':<40} {'type':<6} {'shape (ne)':<24} {'bytes':>12}"]
    for t in f.tensors.values():
        lines.append(f"  {t.name:<40} {t.ggml_type.name:<6} {str(list(t.ne)):<24} {t.nbytes:>12}")
    return "\n".join(lines) + "\n"


def check_tensors(f: GGUFFile) -> list[str]:
    """Dequantise every tensor and name those holding NaN or Inf (e.g. from a corrupt scale)."""
    from qatserve.quant.blocks import dequantize

    bad = []
    for t in f.tensors.values():
        try:
            values = dequantize(f.tensor_bytes(t.name), t.ggml_type, t.shape)
        except (ValueError, NotImplementedError) as e:
            bad.append(f"{t.name}: cannot dequantise ({e})")
            continue
        n_bad = int((~torch.isfinite(values)).sum())
        if n_bad:
            bad.append(f"{t.name}: {n_bad} non-finite values")
    return bad
