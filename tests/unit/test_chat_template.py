"""Sandboxed chat-template rendering."""

import time

import pytest

from qatserve.errors import TemplateError
from qatserve.formats.chat_template import CHATML, default_template, render_chat

MSGS = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "Capital of France?"}]


def test_chatml():
    out = render_chat(CHATML, MSGS[1:2])
    assert out == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    assert not render_chat(CHATML, MSGS[1:2], add_generation_prompt=False).endswith("assistant\n")


def test_gemma_default():
    t = default_template("gemma3")
    assert default_template("gemma4") == t and default_template("llama") is None
    out = render_chat(t, MSGS, bos_token="<bos>")
    assert out == ("<bos><start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
                   "<start_of_turn>user\nCapital of France?<end_of_turn>\n<start_of_turn>model\n")
    with pytest.raises(TemplateError, match="alternate"):
        render_chat(t, [{"role": "assistant", "content": "x"}])


def test_helpers_and_smollm_template():
    out = render_chat("{{ messages | tojson }}|{{ strftime_now('%Y') }}|{{ foo }}", [{"role": "user", "content": "é"}], foo=3)
    assert out.startswith('[{"role": "user", "content": "é"}]|20') and out.endswith("|3")


@pytest.mark.parametrize("tmpl", [
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__ }}",
    "{{ [].__class__.__base__.__subclasses__() }}",
    "{{ cycler.__init__.__globals__ }}",
    "{% for i in range(10**9) %}x{% endfor %}",
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{{ 'a' * 10**9 }}",
    "{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}",
    "{% set x = messages.append(1) %}",
    "{{ raise_exception('nope') }}",
    "{% if %}",
    "{{ messages[0].content.foo.bar }}",
])
def test_hostile_or_broken_templates_raise_quickly(tmpl):
    t = time.monotonic()
    with pytest.raises(TemplateError):
        render_chat(tmpl, [{"role": "user", "content": "x"}])
    assert time.monotonic() - t < 5
