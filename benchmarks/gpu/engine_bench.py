"""qatserve's engine on a GPU, measured as llama-bench and llama-batched-bench measure llama.cpp.

    python benchmarks/gpu/engine_bench.py MODEL.gguf [--pp 1150] [--tg 128] [--slots 2] [-r 3] [--json OUT]
    python benchmarks/gpu/engine_bench.py MODEL.gguf --fusions none,all   # before/after the fused kernels

- pp: one prompt of P random tokens from an empty cache (prefix cache off), timed to its first token
  (one engine step: every prompt row in one forward, as llama-bench's -b 2048).
- tg: N tokens decoded one at a time after a 1-token prompt (llama-bench's tg: from an empty context),
  timed over the decode steps, CUDA graphs replaying after the first run; f16 K/V and q8_0 K/V.
- 2-slot aggregate: 2 requests of a 128-token prompt each, then N tokens each decoded together; tokens
  generated over the time of the decode steps (llama-batched-bench's S_TG at -npl 2).
Medians of -r runs after one warm-up run of each (which compiles the Triton kernels and captures the
graphs). The engine runs without a tokenizer, so no end-of-text token stops a run early.
--fusions A,B,...: the measurements once per setting of qatserve/quant/kernels/gpu_fusions.py ("none",
"all", or names joined by '+', e.g. kv_store+hadamard) on the one loaded model, each engine built inside
the setting (its CUDA graphs capture that setting's kernels); keys get the suffix "@SETTING".
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _prompt(n: int, vocab: int, seed: int) -> list[int]:
    return torch.randint(1, vocab, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def measure(path: Path, n_prompt: int, n_gen: int, slots: int, reps: int, device: str,
            fusions: list[str] | None = None) -> dict:
    from qatserve.engine.loader import load_model_file
    from qatserve.quant.linear import set_cpu_threads

    set_cpu_threads(2)  # host work per step is small; a wide pool only contends with the GPU's feeder
    t0 = time.perf_counter()
    loaded = load_model_file(path, device=device)
    _sync()
    out: dict = {"model": path.name, "load_s": time.perf_counter() - t0, "device": str(loaded.model.run_device)
                 if hasattr(loaded.model, "run_device") else "cpu"}
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
        out["weights_gib"] = torch.cuda.memory_allocated() / 2**30
    model, vocab = loaded.model, loaded.config.n_vocab
    if fusions:
        from qatserve.quant.kernels import gpu_fusions

        for setting in fusions:
            with gpu_fusions.use(setting.replace("+", ",")):
                res = _engine_figures(model, vocab, n_prompt, n_gen, slots, reps)
            out.update({f"{k}@{setting}": v for k, v in res.items()})
    else:
        out.update(_engine_figures(model, vocab, n_prompt, n_gen, slots, reps))
    if torch.cuda.is_available():
        out["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
    loaded.gguf.close()
    return out


def _engine_figures(model, vocab: int, n_prompt: int, n_gen: int, slots: int, reps: int) -> dict:
    """pp, tg (f16 and q8_0 K/V, with the GPU time of one replayed decode graph) and the slots aggregate."""
    from qatserve.engine.engine import Engine, EngineConfig
    from qatserve.engine.kv_cache import KVCacheOptions
    from qatserve.engine.sampler import SamplingParams

    out: dict = {}
    greedy = SamplingParams(temperature=0, max_tokens=1)
    seeds = iter(range(1000))

    def engine(n_ctx: int, n_slots: int, kv: str, batch: int) -> Engine:
        return Engine(model, None, EngineConfig(n_ctx=n_ctx, n_slots=n_slots, max_batch_tokens=batch,
                                                kv=KVCacheOptions(kv, kv, prefix_cache=False)))

    # pp: the whole prompt in one step.
    e = engine(n_prompt + 64, 1, "f16", -(-n_prompt // 32) * 32)

    def pp() -> float:
        e.add_request(_prompt(n_prompt, vocab, next(seeds)), greedy)
        _sync()
        t = time.perf_counter()
        e.run_until_done()
        _sync()
        return n_prompt / (time.perf_counter() - t)

    pp()
    out["pp"] = statistics.median([pp() for _ in range(reps)])

    def decode_rate(e: Engine, prompts: list[list[int]]) -> float:
        """Requests of n_gen + 1 tokens (the first comes from the prompt step); tok/s of the decode steps."""
        for p in prompts:
            e.add_request(p, SamplingParams(temperature=0, max_tokens=n_gen + 1))
        while any(r is None or r.in_prompt for r in e.slots) or e.waiting:
            e.step()
        _sync()
        t, n0 = time.perf_counter(), e.stats.generated_tokens
        e.run_until_done()
        _sync()
        return (e.stats.generated_tokens - n0) / (time.perf_counter() - t)

    for kv in ("f16", "q8_0"):
        e = engine(512, 1, kv, 512)
        decode_rate(e, [[1]])
        out[f"tg_{kv}"] = statistics.median([decode_rate(e, [[1]]) for _ in range(reps)])
        if e.gpu is not None:
            out[f"graphs_{kv}"] = e.gpu.graphs
            graphs = [sh.graph for sh in e.gpu._shapes.values() if sh.graph is not None]
            if graphs:  # GPU time of one decode forward alone (the rest of a step is host work)
                _sync()
                t = time.perf_counter()
                for _ in range(20):
                    graphs[0].replay()
                _sync()
                out[f"graph_ms_{kv}"] = (time.perf_counter() - t) / 20 * 1e3
    e = engine(slots * 512, slots, "f16", 512)
    batch = lambda: [_prompt(128, vocab, next(seeds)) for _ in range(slots)]  # noqa: E731
    decode_rate(e, batch())
    out[f"tg_{slots}slot"] = statistics.median([decode_rate(e, batch()) for _ in range(reps)])
    if e.gpu is not None:
        graphs = [sh.graph for sh in e.gpu._shapes.values() if sh.graph is not None]
        if graphs:
            _sync()
            t = time.perf_counter()
            for _ in range(20):
                graphs[0].replay()
            _sync()
            out[f"graph_ms_{slots}slot"] = (time.perf_counter() - t) / 20 * 1e3
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", type=Path)
    ap.add_argument("--pp", type=int, default=1150)
    ap.add_argument("--tg", type=int, default=128)
    ap.add_argument("--slots", type=int, default=2)
    ap.add_argument("-r", "--reps", type=int, default=3)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", type=Path, help="append the result as one JSON line")
    ap.add_argument("--fusions", help="comma list of gpu_fusions settings to measure in turn (none, default, all, a+b)")
    args = ap.parse_args()
    res = measure(args.model, args.pp, args.tg, args.slots, args.reps, args.device,
                  args.fusions.split(",") if args.fusions else None)
    line = json.dumps(res)
    print(line)
    if args.json:
        with args.json.open("a") as f:
            f.write(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
