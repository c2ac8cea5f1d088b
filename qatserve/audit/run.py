"""Driving an audit: chunking and BOS as perplexity.cpp, the one engine call, the CLI, the plot."""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from qatserve.audit.kld import CHUNK_HEADER, AuditReport, KLDAccumulator, encode_logprobs, kld_rows, row_width
from qatserve.audit.logprob_file import RefFile, RefWriter, is_logprob_file
from qatserve.errors import RequestError
from qatserve.formats.gguf_reader import open_gguf

KV_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0")  # llama.cpp's names, accepted by -ctk/-ctv


def check_kv_types(cache_type_k: str, cache_type_v: str) -> None:
    """RequestError unless the engine can store K/V as these types (checked before any model loads)."""
    for t in (cache_type_k, cache_type_v):
        if t not in KV_TYPES:
            raise RequestError(f"unknown KV cache type {t!r}; expected one of {', '.join(KV_TYPES)}")


def score_tokens(model, tokens: list[int], cache_type_k: str = "f16", cache_type_v: str = "f16",
                 rotate: bool = True) -> torch.Tensor:
    """Logits float32 [T, V] at every position of `tokens` [T], from an empty cache whose K/V are
    stored as the engine stores them (type, llama.cpp's Hadamard rotation for quantised types unless
    rotate is False). The one place the audit calls the engine."""
    check_kv_types(cache_type_k, cache_type_v)
    from qatserve.engine.generate import score_tokens as engine_score
    from qatserve.engine.kv_cache import KVCacheOptions

    kv = KVCacheOptions(cache_type_k, cache_type_v, rotate=rotate, prefix_cache=False)
    return engine_score(model, list(tokens), kv, chunk=max(32, len(tokens)))


# ----------------------------------------------------------------------------- the audit
@dataclass
class AuditSetup:
    """What the audit scores: the token stream, chunking and the BOS policy."""

    tokens: np.ndarray  # int64 [n_chunk * n_ctx] (only whole chunks)
    n_ctx: int
    n_chunk: int
    bos: int | None  # replaces the first token of each chunk when the vocabulary adds BOS

    @property
    def first(self) -> int:
        return self.n_ctx // 2

    def chunk(self, i: int) -> tuple[list[int], np.ndarray]:
        """(model input [n_ctx] with BOS first, next tokens [n_ctx - 1 - first] of the scored rows)."""
        toks = self.tokens[i * self.n_ctx : (i + 1) * self.n_ctx]
        inp = toks.tolist()
        if self.bos is not None:
            inp[0] = self.bos
        return inp, toks[self.first + 1 :]


def make_setup(tokens: list[int] | np.ndarray, n_ctx: int, chunks: int, bos: int | None,
               min_tokens: int | None = None) -> AuditSetup:
    """Chunking as perplexity.cpp: n_chunk = min(chunks, len // n_ctx) (chunks < 0: all). A text must
    give at least `min_tokens` (default 2 * n_ctx, llama.cpp's rule; a saved reference holds whole chunks)."""
    if n_ctx < 3:
        raise RequestError(f"-c must be at least 3 (half of each chunk is context), got {n_ctx}")
    if chunks == 0 or chunks < -1:
        raise RequestError(f"--chunks must be -1 (all) or positive, got {chunks}")
    need = 2 * n_ctx if min_tokens is None else min_tokens
    if len(tokens) < need:
        raise RequestError(f"the text tokenizes to {len(tokens)} tokens; a context of {n_ctx} needs at least {need}")
    n_max = len(tokens) // n_ctx
    n_chunk = n_max if chunks < 0 else min(chunks, n_max)
    return AuditSetup(np.asarray(tokens[: n_chunk * n_ctx], dtype=np.int64), n_ctx, n_chunk, bos)


def audit_chunks(setup: AuditSetup, model, ref_rows, *, cache_type_k: str = "f16", cache_type_v: str = "f16",
                 rotate: bool = True) -> Iterator[tuple[int, KLDAccumulator]]:
    """Score every chunk; yields (chunk index, running accumulator) after each.

    ref_rows(i, inp) -> uint16 [rows, width] reference rows of chunk i (from a file or a reference model)."""
    acc = KLDAccumulator()
    lo, hi = setup.first, setup.n_ctx - 1
    for i in range(setup.n_chunk):
        inp, nxt = setup.chunk(i)
        base = ref_rows(i, inp)
        logits = score_tokens(model, inp, cache_type_k, cache_type_v, rotate)[lo:hi].float().numpy()
        if base.shape[1] != row_width(logits.shape[1]):
            raise RequestError(f"vocabulary mismatch: the model has {logits.shape[1]} logits, the reference "
                               f"rows {base.shape[1]} entries (expected {row_width(logits.shape[1])})")
        acc.add(kld_rows(logits, base, nxt), nxt)
        yield i, acc


def _load(path: Path):
    from qatserve.engine.loader import load_model_file

    return load_model_file(path)


def _read_text(path: str) -> str:
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as e:
        raise RequestError(f"cannot read text file {path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise RequestError(f"text file {path} is not UTF-8: {e}") from None
    return text[:-1] if text.endswith("\n") else text  # llama.cpp's -f drops one trailing newline


def _same(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


def run_audit(model_path: str | os.PathLike, ref: str | os.PathLike, text: str | None = None, *,
              n_ctx: int | None = None, chunks: int = -1, cache_type_k: str = "f16", cache_type_v: str = "f16",
              rotate: bool = True, save_ref: str | os.PathLike | None = None, log=None) -> AuditReport:
    """The whole audit (see the module docstring). log(str) receives progress lines."""
    log = log or (lambda s: None)
    check_kv_types(cache_type_k, cache_type_v)
    model_path, ref = Path(model_path), Path(ref)
    ref_is_file = is_logprob_file(ref)
    if ref_is_file and save_ref:
        raise RequestError("--save-ref needs a model as --ref (the reference is already a log-prob file)")
    if not ref_is_file:
        if text is None:
            raise RequestError("-f TEXT is needed when --ref is a model")
        text_str = _read_text(text)
        open_gguf(ref).close()  # a bad reference fails before the model is loaded
    writer = None
    loaded = _load(model_path)
    if ref_is_file:
        rf = RefFile(ref)
        if n_ctx is not None and n_ctx != rf.n_ctx:
            raise RequestError(f"{ref} was computed with -c {rf.n_ctx}, not {n_ctx}")
        if text is not None:
            log(f"qatserve: the text is not used: {ref.name} holds the tokens it was computed on")
        tok = _checked_tokenizer(loaded.tokenizer)
        setup = make_setup(rf.tokens, rf.n_ctx, chunks, _bos(tok), min_tokens=rf.n_ctx)

        def ref_rows(i: int, inp: list[int]) -> np.ndarray:
            return rf.chunk(i)
    else:
        ref_loaded = loaded if _same(ref, model_path) else _load(ref)
        tok = _checked_tokenizer(ref_loaded.tokenizer or loaded.tokenizer)
        ids = tok.encode(text_str, parse_special=False)
        setup = make_setup(ids, n_ctx or 512, chunks, _bos(tok))
        if save_ref:
            if any(_same(Path(save_ref), p) for p in (model_path, ref) if Path(save_ref).exists()):
                raise RequestError(f"--save-ref {save_ref} would overwrite an input")
            n_vocab = int(ref_loaded.model.config.n_vocab)
            writer = RefWriter(save_ref, setup.n_ctx, n_vocab, setup.tokens)

        def ref_rows(i: int, inp: list[int]) -> np.ndarray:
            # The reference keeps llama.cpp's default f16 K/V: "--ref MODEL -ctk q8_0" audits KV types alone.
            logits = score_tokens(ref_loaded.model, inp, "f16", "f16", rotate)[setup.first : setup.n_ctx - 1]
            rows = encode_logprobs(logits.float().numpy())
            if writer is not None:
                writer.add(rows)
            return rows

    log(f"qatserve: {setup.n_chunk} chunks of {setup.n_ctx} tokens, {setup.n_ctx - 1 - setup.first} scored per chunk")
    log(CHUNK_HEADER)
    acc = None
    try:
        for i, acc in audit_chunks(setup, loaded.model, ref_rows, cache_type_k=cache_type_k,
                                   cache_type_v=cache_type_v, rotate=rotate):
            log(acc.chunk_line(i + 1))
        if writer is not None:
            writer.close()
            writer = None
    finally:
        if writer is not None:
            writer.abort()
    assert acc is not None
    return acc.report()


def _checked_tokenizer(tok):
    """The vocabulary that tokenises the text and sets the BOS policy (llama.cpp: the model's own)."""
    if tok is None:
        raise RequestError("no tokenizer (tokenizer.ggml.*) in the model or the reference: the text and BOS "
                           "cannot be handled as llama-perplexity does")
    if tok.add_eos:
        raise RequestError("the vocabulary appends EOS to every text; llama-perplexity refuses such models too")
    return tok


def _bos(tok) -> int | None:
    return tok.bos_id if tok is not None and tok.add_bos and tok.bos_id is not None else None


def plot_kld(values: np.ndarray, path: str | os.PathLike, title: str = "") -> None:
    """Histogram of per-token KLD on log-spaced bins (values <= 0 counted in the legend)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RequestError(f"--plot needs matplotlib: {e}") from None
    v = np.asarray(values, dtype=np.float64)
    pos = v[v > 0]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    if len(pos):
        lo, hi = math.floor(math.log10(pos.min())), math.ceil(math.log10(pos.max()) + 1e-9)
        ax.hist(pos, bins=np.logspace(lo, max(hi, lo + 1), 80), color="#4477aa")
        ax.set_xscale("log")
    for q, style, name in ((v.mean(), "-", "mean"), (np.median(v), "--", "median"),
                           (np.quantile(v, 0.99), ":", "p99")):
        if q > 0:
            ax.axvline(q, color="k", linestyle=style, label=f"{name} {q:.3g}")
    ax.set_xlabel("KL divergence per token (nats)")
    ax.set_ylabel("tokens")
    ax.set_title(title or "per-token KLD")
    ax.legend(title=f"{len(v)} tokens, {len(v) - len(pos)} <= 0")
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except OSError as e:
        raise RequestError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        plt.close(fig)


def run_audit_cli(args) -> int:
    """`qatserve audit` (flags in cli.py). Report on stdout, progress on stderr."""
    from qatserve.default_model import default_model_path
    from qatserve.quant.linear import set_cpu_threads

    if args.threads is not None and args.threads < 1:
        raise RequestError(f"--threads must be at least 1, got {args.threads}")
    set_cpu_threads(args.threads or os.cpu_count() or 1)
    model = Path(args.model) if args.model else default_model_path()
    ctk, ctv = args.cache_type_k.lower(), args.cache_type_v.lower()
    report = run_audit(model, args.ref, args.file, n_ctx=args.ctx_size, chunks=args.chunks, cache_type_k=ctk,
                       cache_type_v=ctv, rotate=not args.no_kv_rotation, save_ref=args.save_ref,
                       log=lambda s: print(s, file=sys.stderr, flush=True))
    print(f"qatserve audit: {Path(model).name} (K {ctk}, V {ctv}) vs {Path(args.ref).name}, "
          f"{report.count} scored tokens\n")
    sys.stdout.write(report.format())
    if args.save_ref:
        print(f"qatserve: saved reference log-probs to {args.save_ref}", file=sys.stderr)
    if args.plot:
        plot_kld(report.kld_values, args.plot, f"{Path(model).name} vs {Path(args.ref).name}")
        print(f"qatserve: wrote {args.plot}", file=sys.stderr)
    return 0
