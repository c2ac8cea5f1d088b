"""Real models against llama.cpp: prompt tokens, 32 greedy tokens and first-8 top-5 log-probs.

Fixtures were recorded once with llama.cpp's llama-server (the build is named in each file).
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
LOGPROB_TOL = 0.02


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
    cases = json.loads((FIXTURES / fixture).read_text())["cases"]
    yield loaded, cases
    loaded.gguf.close()


def test_prompt_tokens_match(model_and_fixture):
    loaded, cases = model_and_fixture
    for case in cases:
        assert loaded.tokenizer.encode(case["prompt"]) == case["prompt_tokens"], case["prompt"]


def test_greedy_tokens_and_logprobs_match(model_and_fixture):
    loaded, cases = model_and_fixture
    gen = Generator(loaded.model, loaded.tokenizer, n_ctx=512)
    params = SamplingParams(temperature=0.0, max_tokens=32, n_probs=0)
    worst = 0.0
    for case in cases:
        # Teacher-forced log-probs at the first 8 generated positions, from one forward pass.
        seq = case["prompt_tokens"] + case["tokens"][:8]
        logp = torch.log_softmax(gen.logits_all(seq)[len(case["prompt_tokens"]) - 1 :], dim=-1)
        for i, top5 in enumerate(case["top5_logprobs_first8"]):
            for token, _piece, ref in top5:
                diff = abs(float(logp[i, token]) - ref)
                worst = max(worst, diff)
                assert diff < LOGPROB_TOL, f"{case['prompt']!r} pos {i} token {token}: {float(logp[i, token]):.5f} vs {ref}"
        result = gen.generate(case["prompt_tokens"], params)
        assert result.tokens == case["tokens"], case["prompt"]
        assert result.text == case["text"]
    print(f"worst top-5 log-prob difference vs llama.cpp: {worst:.4f}")
