"""Real models against references: llama.cpp's greedy output (fixtures) and transformers' float math.

Fixtures were recorded once with llama.cpp's llama-server (the build is named in each file; CPU,
2 threads, flash attention auto = on, F16 KV cache): prompt tokens, 32 greedy tokens, top-5
log-probs of the first 8 generated positions.

Why llama.cpp is matched loosely and transformers exactly. These small models are chaotic at the
float32 rounding level: two equally exact float32 evaluations of gemma3-270m (int8 activations summed
in float32 vs float64) differ by 0.3-1.0 in later log-probs, because one ulp moves an int8 or fp16
rounding a few layers on and that grows ~100x in four layers. Token-for-token identity with llama.cpp
therefore needs its CPU numerics bit for bit (kernel accumulation orders, glibc's expf/tanhf, the
fp16 GELU table, fp16 flash-attention accumulators). `backend="ggml"` (quant/kernels/ggml_*.py)
emulates them op by op: every tensor of gemma's layers 0-16 then matches llama-eval-callback's dump,
but layer 17 attention and longer prompts still differ, giving 3/8 identical continuations (worst
0.70) at ~0.25 s per token, so it is kept as a tool, not as this test (measured 2026-11).
What is asserted instead:
- tokenisation identical to llama.cpp's;
- the first greedy token identical for every prompt, first-token top-5 log-probs within 0.5 (measured
  worst: gemma 0.45, smollm 0.33), and a floor on fully identical 32-token continuations (measured:
  gemma 4/8, smollm 6/8) so that a regression shows;
- qatserve's logits on the real file equal transformers' (which dequantises the same GGUF itself) to
  float32 rounding: the model semantics are exact; only rounding differs from llama.cpp.
"""

from __future__ import annotations

import json
import pathlib

import pytest
import torch

from qatserve.engine.generate import Generator
from qatserve.engine.loader import load_model_file
from qatserve.engine.sampler import SamplingParams
from tests.conftest import gemma3_270m_path, smollm2_path

FIXTURES = pathlib.Path(__file__).parent.parent / "fixtures"
FIRST_TOKEN_LOGPROB_TOL = 0.5
# Floors measured with the batch-invariant kernels (a lone row runs MLAS's M >= 2 4-bit path since
# 2026-11-23, which moved smollm from 6/8 to 4/8; with an f16 K/V cache it is 5/8 but gemma's
# "To make a cup of tea" first token flips): whole-continuation identity is rounding luck (issue 2).
MIN_IDENTICAL = {"gemma3-270m": 3, "smollm2-135m": 4}

MODELS = {
    "gemma3-270m": (gemma3_270m_path, "llamacpp-greedy-gemma3-270m.json"),
    "smollm2-135m": (smollm2_path, "llamacpp-greedy-smollm2-135m.json"),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model_and_fixture(request):
    path_fn, fixture = MODELS[request.param]
    path = path_fn()
    if path is None:
        pytest.skip(f"{request.param} is not installed")
    loaded = load_model_file(path)
    yield request.param, loaded, json.loads((FIXTURES / fixture).read_text())["cases"]
    loaded.gguf.close()


def test_prompt_tokens_match(model_and_fixture):
    _, loaded, cases = model_and_fixture
    for case in cases:
        assert loaded.tokenizer.encode(case["prompt"]) == case["prompt_tokens"], case["prompt"]


def test_greedy_agrees_with_llamacpp(model_and_fixture):
    name, loaded, cases = model_and_fixture
    gen = Generator(loaded.model, loaded.tokenizer, n_ctx=512)
    params = SamplingParams(temperature=0.0, max_tokens=32)
    identical, report = 0, []
    for case in cases:
        logp = torch.log_softmax(gen.logits_all(case["prompt_tokens"])[-1], dim=-1)
        worst = max(abs(float(logp[t]) - ref) for t, _piece, ref in case["top5_logprobs_first8"][0])
        result = gen.generate(case["prompt_tokens"], params)
        same = result.tokens == case["tokens"]
        identical += same
        if same:  # the same tokens must also detokenise to llama.cpp's text
            assert result.text == case["text"], case["prompt"]
        report.append(f"{case['prompt'][:30]!r:34} first-token top-5 diff {worst:.3f} identical {same}")
        assert result.tokens[0] == case["tokens"][0], case["prompt"]
        assert worst < FIRST_TOKEN_LOGPROB_TOL, case["prompt"]
    print(f"{name} vs llama.cpp: {identical}/{len(cases)} identical 32-token continuations\n" + "\n".join(report))
    assert identical >= MIN_IDENTICAL[name], "\n".join(report)


def test_gemma_logits_equal_transformers_on_the_same_file():
    """transformers dequantises the GGUF with gguf-py and runs its own Gemma 3: same logits."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")  # transformers needs it to load GGUF files
    path = gemma3_270m_path()
    ref_model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32).eval()
    case = json.loads((FIXTURES / MODELS["gemma3-270m"][1]).read_text())["cases"][1]
    tokens = case["prompt_tokens"] + case["tokens"]
    with torch.no_grad():
        ref = ref_model(torch.tensor([tokens])).logits[0]
    loaded = load_model_file(path, backend="torch")  # dequantised float32 weights: no activation quantisation
    try:
        ours = Generator(loaded.model, None, n_ctx=256).logits_all(tokens)
    finally:
        loaded.gguf.close()
    torch.testing.assert_close(ours, ref, atol=2e-4, rtol=0)
