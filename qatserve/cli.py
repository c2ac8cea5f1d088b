"""`qatserve` command line: run, serve, bench, inspect, convert, synth, quantize, audit.

stdout carries only generated text (or the inspect report); progress and timings go to stderr, so
`qatserve run -n 32 --temp 0 "prompt"` is scriptable. Every expected failure is one line on stderr
and a non-zero exit code; no tracebacks for bad files or flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

from qatserve import __version__
from qatserve.errors import QatserveError, RequestError


def _model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", metavar="MODEL.gguf", help="GGUF model file (default: embedded Gemma 3 270M)")


def _sampling_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("sampling (llama.cpp names and defaults)")
    g.add_argument("-n", "--n-predict", type=int, default=256, metavar="N", help="tokens to generate (default 256)")
    g.add_argument("--temp", type=float, default=0.8, help="temperature; 0 = greedy (default 0.8)")
    g.add_argument("--top-k", type=int, default=40, help="top-k, 0 = off (default 40)")
    g.add_argument("--top-p", type=float, default=0.95, help="nucleus, 1.0 = off (default 0.95)")
    g.add_argument("--min-p", type=float, default=0.05, help="min-p, 0 = off (default 0.05)")
    g.add_argument("--repeat-penalty", type=float, default=1.0, help="default 1.0 (off)")
    g.add_argument("--repeat-last-n", type=int, default=64, help="penalty window; -1 = whole context (default 64)")
    g.add_argument("--presence-penalty", type=float, default=0.0)
    g.add_argument("--frequency-penalty", type=float, default=0.0)
    g.add_argument("-s", "--seed", type=int, default=None, help="RNG seed (default: random)")
    g.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true",
                   help="never draw end-of-generation tokens: generate exactly -n tokens (llama.cpp's flag)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qatserve", description="Inference for QAT GGUF language models.")
    parser.add_argument("--version", action="version", version=f"qatserve {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    run = sub.add_parser("run", help="generate text from a prompt, streamed to stdout")
    _model_arg(run)
    _sampling_args(run)
    run.add_argument("prompt", nargs="?", help="prompt text ('-' reads stdin)")
    run.add_argument("-p", "--prompt", dest="prompt_opt", metavar="TEXT", help="prompt text (alternative to the positional)")
    run.add_argument("-f", "--file", metavar="FILE", help="read the prompt from a file")
    run.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn with the model's chat template")
    run.add_argument("-sys", "--system", metavar="TEXT", help="system message (with --chat)")
    run.add_argument("-c", "--ctx-size", type=int, default=4096, help="context size in tokens (default 4096)")
    run.add_argument("-ctk", "--cache-type-k", default="f16", metavar="T", help="K cache type: f32, f16, bf16, q8_0, q4_0 (default f16)")
    run.add_argument("-ctv", "--cache-type-v", default="f16", metavar="T", help="V cache type (default f16)")
    run.add_argument("--no-kv-rotation", action="store_true", help="store quantised K/V without the Hadamard rotation")
    run.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all cores)")
    run.add_argument("--device", default="auto", metavar="D",
                     help="auto (the CUDA GPU when present), cpu or cuda (default auto)")
    run.add_argument("--verbose-prompt", action="store_true", help="print the prompt's token ids to stderr")
    from qatserve.engine.speculative.flags import add_speculative_args  # speculative decoding (issue 5)

    add_speculative_args(run)

    ins = sub.add_parser("inspect", help="print a GGUF file's metadata and tensor table")
    ins.add_argument("path", metavar="MODEL.gguf")
    ins.add_argument("--check-tensors", action="store_true", help="dequantise every tensor and report NaN/Inf")
    ins.add_argument("--all-metadata", action="store_true", help="do not shorten long arrays")

    conv = sub.add_parser("convert", help="convert a Hugging Face safetensors checkpoint to GGUF")
    conv.add_argument("hf_dir", metavar="HF_DIR")
    conv.add_argument("out", metavar="OUT.gguf")
    conv.add_argument("--type", default="F32", choices=["F32", "F16", "BF16", "Q8_0", "Q4_0"])

    _quantize_parser(sub)
    _audit_parser(sub)
    _serve_parser(sub)
    from qatserve.bench.command import add_parser as add_bench_parser  # light: flags only

    add_bench_parser(sub)

    syn = sub.add_parser("synth", help="write a GGUF with random weights in the exact layout of a released model")
    syn.add_argument("shape", nargs="?", metavar="SHAPE", help="e.g. gemma3-27b, gemma4-31b, gemma4-e2b-assistant (see --list)")
    syn.add_argument("out", nargs="?", metavar="OUT.gguf")
    syn.add_argument("--type", default="Q4_0", help="weight matrices: Q4_0 (default), Q8_0, F16, BF16, F32")
    syn.add_argument("--list", action="store_true", help="print every shape with its computed size and exit")
    syn.add_argument("--seed", type=int, default=0, help="RNG seed of the random blocks (default 0)")
    syn.add_argument("--tokenizer-from", metavar="FILE.gguf", default=None,
                     help="copy the tokenizer.* metadata from this GGUF (default: the embedded Gemma 3 270M)")
    return parser


def _quantize_parser(sub) -> None:
    from qatserve.quantize import TARGET_TYPES

    types = ", ".join(t.name for t in TARGET_TYPES)
    q = sub.add_parser(
        "quantize", help="re-encode a GGUF model's weights (PTQ) with llama-quantize's type rules",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=f"Post-training quantisation of IN.gguf to OUT.gguf. TYPE: {types}.\n"
        "Tensors are chosen as llama-quantize chooses them (norms and 1-D tensors keep their type; a row\n"
        "that does not fit the block size falls back to F16). Difference: where llama.cpp gives output.weight\n"
        "(or token_embd.weight when tied) Q6_K, qatserve writes Q8_0 (no bit-exact Q6_K encoder); llama.cpp\n"
        "uses Q8_0 there too when the row length is not a multiple of 256 (e.g. Gemma 3 270M).")
    q.add_argument("inp", metavar="IN.gguf")
    q.add_argument("out", metavar="OUT.gguf")
    q.add_argument("type", metavar="TYPE", help=types)
    q.add_argument("--keep-embeddings", metavar="TYPE", help="type of token_embd.weight (llama-quantize's --token-embedding-type)")
    q.add_argument("--tensor-type", action="append", default=[], metavar="REGEX=TYPE",
                   help="override tensors whose name matches REGEX (re.search; first match wins; repeatable; "
                        "ignored for a float TYPE, as in llama.cpp)")


def _audit_parser(sub) -> None:
    a = sub.add_parser(
        "audit", help="KL-divergence / perplexity audit against a reference, as llama-perplexity --kl-divergence",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Scores the second half of each n_ctx-token chunk of the text (first token of a chunk\n"
        "replaced by BOS, as llama-perplexity) with MODEL and with the reference, and prints llama-perplexity's\n"
        "KLD summary (PPL of both, PPL ratio, KLD mean/median/percentiles/max, delta-p, same top-1) plus\n"
        "flips (positions where the greedy answer turns right<->wrong). --ref is a GGUF model (may be MODEL\n"
        "itself: the reference then uses an f16 KV cache) or a log-prob file from --save-ref or from\n"
        "llama-perplexity --kl-divergence-base (the same format; it stores the tokens, so -f is not needed).")
    _model_arg(a)
    a.add_argument("--ref", required=True, metavar="REF", help="reference: GGUF model or saved log-prob file")
    a.add_argument("-f", "--file", metavar="TEXT", help="text file to score (not needed with a saved reference)")
    a.add_argument("-c", "--ctx-size", type=int, default=None, help="tokens per chunk (default 512, or the saved reference's)")
    a.add_argument("--chunks", type=int, default=-1, help="chunks to score; -1 = all (default)")
    a.add_argument("-ctk", "--cache-type-k", default="f16", metavar="T", help="K cache type: f32, f16, bf16, q8_0, q4_0 (default f16; the audit scores f32/f16 today)")
    a.add_argument("-ctv", "--cache-type-v", default="f16", metavar="T", help="V cache type (default f16)")
    a.add_argument("--no-kv-rotation", action="store_true", help="store quantised K/V without the Hadamard rotation")
    a.add_argument("--save-ref", metavar="FILE", help="write the reference log-probs (llama.cpp's --kl-divergence-base format)")
    a.add_argument("--plot", metavar="PNG", help="write a histogram of the per-token KL-divergence")
    a.add_argument("-t", "--threads", type=int, default=None, help="CPU threads (default: all cores)")


def _serve_parser(sub) -> None:
    from qatserve.server.command import add_parser  # flags live beside the server (llama-server's names)

    add_parser(sub)


def _read_prompt(args: argparse.Namespace) -> str:
    given = [x for x in (args.prompt, args.prompt_opt, args.file) if x is not None]
    if len(given) > 1:
        raise RequestError("give the prompt once: positional, -p or -f")
    if args.file is not None:
        try:
            return Path(args.file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise RequestError(f"cannot read prompt file {args.file}: {e}") from e
    text = args.prompt if args.prompt is not None else args.prompt_opt
    if text == "-" or (text is None and not sys.stdin.isatty()):
        return sys.stdin.read()
    if text is None:
        raise RequestError("no prompt: pass it as an argument, with -p, -f FILE, or on stdin")
    return text


def cmd_run(args: argparse.Namespace) -> int:
    from qatserve.engine.kv_cache import KVCacheOptions
    from qatserve.engine.llm import LLM
    from qatserve.engine.loader import load_model_file
    from qatserve.engine.sampler import SamplingParams
    from qatserve.formats.chat_template import chat_prompt_ids
    from qatserve.quant.linear import set_cpu_threads

    prompt_text = _read_prompt(args)
    params = SamplingParams(
        temperature=args.temp, top_k=args.top_k, top_p=args.top_p, min_p=args.min_p,
        repeat_penalty=args.repeat_penalty, repeat_last_n=args.repeat_last_n,
        presence_penalty=args.presence_penalty, frequency_penalty=args.frequency_penalty,
        seed=args.seed, max_tokens=args.n_predict, stop=tuple(args.stop),
    )
    KVCacheOptions(args.cache_type_k, args.cache_type_v)  # flag errors before the model loads
    from qatserve.engine.speculative.flags import speculative_config_from_args

    spec = speculative_config_from_args(args)
    if args.threads is not None and args.threads < 1:
        raise RequestError(f"--threads must be at least 1, got {args.threads}")
    set_cpu_threads(args.threads or os.cpu_count() or 1)
    path = _resolve_model(args.model)
    loaded = load_model_file(path, device=args.device)
    if loaded.tokenizer is None:
        raise RequestError(f"{path}: the file has no tokenizer (tokenizer.ggml.*), so text cannot be generated")
    tok = loaded.tokenizer
    if args.ignore_eos:
        params = dataclasses.replace(params, suppressed=tuple(sorted(tok.stop_ids)))
    print(f"qatserve: loaded {path.name} ({loaded.config.arch}, {loaded.config.n_layer} layers) "
          f"in {loaded.load_seconds:.2f} s", file=sys.stderr)
    if args.chat:
        messages = ([{"role": "system", "content": args.system}] if args.system else [])
        messages.append({"role": "user", "content": prompt_text})
        ids = chat_prompt_ids(tok, loaded.config.arch, messages)
    else:
        ids = tok.encode(prompt_text)
    if args.verbose_prompt:
        print(f"qatserve: prompt tokens {ids}", file=sys.stderr)
    llm = LLM(loaded, n_ctx=args.ctx_size, cache_type_k=args.cache_type_k, cache_type_v=args.cache_type_v,
              kv_rotation=not args.no_kv_rotation, speculative=spec)
    out = sys.stdout
    for step in llm.stream(ids, params):
        if step.text:
            out.write(step.text)
            out.flush()
    out.write("\n")
    out.flush()
    res = llm.last_result
    if res is not None:
        t = res.timings
        print(f"qatserve: prompt {t.prompt_n} tokens, {t.prompt_per_second:.1f} tok/s | "
              f"generated {t.predicted_n} tokens, {t.predicted_per_second:.1f} tok/s | "
              f"stop: {res.finish_reason}", file=sys.stderr)
        if spec is not None:
            print(f"qatserve: draft ({spec.type}) {t.draft_n} tokens, {t.draft_n_accepted} accepted "
                  f"({100 * t.draft_acceptance_rate:.1f}%), {t.draft_mean_accepted_length:.2f} tokens per "
                  "verification", file=sys.stderr)
    return 0


def _resolve_model(model: str | None) -> Path:
    from qatserve.default_model import default_model_path

    return Path(model) if model else default_model_path()


def cmd_inspect(args: argparse.Namespace) -> int:
    from qatserve.inspect_gguf import check_tensors, describe
    from qatserve.formats.gguf_reader import open_gguf

    with open_gguf(args.path) as f:
        sys.stdout.write(describe(f, all_metadata=args.all_metadata))
        if args.check_tensors:
            bad = check_tensors(f)
            for line in bad:
                print(line)
            print(f"check-tensors: {len(f.tensors) - len(bad)}/{len(f.tensors)} tensors finite")
            return 1 if bad else 0
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from qatserve.convert.hf_to_gguf import convert

    stats: dict[str, int] = {}
    out = convert(args.hf_dir, args.out, args.type, stats=stats)
    print(f"qatserve: wrote {out} ({args.type})", file=sys.stderr)
    if stats.get("q4_0_blocks"):
        share = stats["q4_0_exact_blocks"] / stats["q4_0_blocks"]
        print(f"qatserve: Q4_0 blocks exactly on their 4-bit grid: {stats['q4_0_exact_blocks']}/"
              f"{stats['q4_0_blocks']} ({100 * share:.2f}%)", file=sys.stderr)
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from qatserve.bench.synth import get_shape, get_weight_type, shape_table, synth

    if args.list:
        sys.stdout.write(shape_table(get_weight_type(args.type)))
        return 0
    if args.shape is None or args.out is None:
        raise RequestError("synth needs SHAPE and OUT.gguf (or --list)")
    shape, qtype = get_shape(args.shape), get_weight_type(args.type)
    step = [0]

    def progress(done: int, total: int) -> None:
        if done * 10 // total > step[0]:  # every 10 %
            step[0] = done * 10 // total
            print(f"qatserve: {done / 1e9:.2f} / {total / 1e9:.2f} GB", file=sys.stderr)

    try:
        r = synth(shape, args.out, qtype, seed=args.seed, progress=progress, tokenizer_from=args.tokenizer_from)
    except OSError as e:
        raise RequestError(f"cannot write {args.out}: {e}") from e
    print(f"qatserve: wrote {r.path} ({shape.name}, {qtype.name}, {r.n_tensors} tensors, "
          f"{r.nbytes / 1e9:.2f} GB in {r.seconds:.1f} s)", file=sys.stderr)
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from qatserve.quantize import quantize_file

    def progress(i: int, n: int, plan) -> None:
        if plan.note:
            print(f"qatserve: {plan.info.name}: {plan.note}", file=sys.stderr)

    r = quantize_file(args.inp, args.out, args.type, keep_embeddings=args.keep_embeddings,
                      tensor_types=tuple(args.tensor_type), progress=progress)
    counts: dict[str, int] = {}
    for p in r.plans:
        counts[p.target.name] = counts.get(p.target.name, 0) + 1
    kinds = ", ".join(f"{k} x{v}" for k, v in sorted(counts.items()))
    print(f"qatserve: wrote {r.path} ({args.type.upper()}): {len(r.plans)} tensors ({kinds}), "
          f"{r.bytes_in / 2**20:.2f} MiB -> {r.bytes_out / 2**20:.2f} MiB", file=sys.stderr)
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    from qatserve.audit import run_audit_cli

    return run_audit_cli(args)


def cmd_serve(args: argparse.Namespace) -> int:
    from qatserve.server.command import run

    return run(args)


def cmd_bench(args: argparse.Namespace) -> int:
    from qatserve.bench.command import run

    return run(args)


COMMANDS = {"run": cmd_run, "inspect": cmd_inspect, "convert": cmd_convert, "synth": cmd_synth,
            "quantize": cmd_quantize, "audit": cmd_audit, "serve": cmd_serve,
            "bench": cmd_bench}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except QatserveError as e:
        print(f"qatserve: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("qatserve: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # stdout closed by the reader (e.g. `| head`): not an error of ours.
        sys.stderr.close()
        return 0
