"""Chat templates (Jinja, as in HF tokenizer_config / GGUF tokenizer.chat_template) rendered in a sandbox.

The environment is jinja2's ImmutableSandboxedEnvironment (no attribute access to dunders, no mutation
of lists/dicts), with the helpers HF templates use (raise_exception, strftime_now, tojson). Rendering is
bounded: output is capped at MAX_OUTPUT chars, and a trace hook stops the render after MAX_SECONDS, so
a template cannot loop forever or build a huge string.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import jinja2
from jinja2.exceptions import SecurityError, TemplateError as JinjaTemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from qatserve.errors import TemplateError

MAX_OUTPUT = 1 << 20  # chars of rendered prompt
MAX_SECONDS = 2.0  # wall time of one render

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Gemma's official template: the system message is folded into the first user turn; assistant -> model.
GEMMA = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set first_user_prefix = messages[0]['content'] + '\n\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_user_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') + message['content'] | trim"
    " + '<end_of_turn>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)


class _Abort(Exception):
    """Raised from the trace hook to stop a render that ran past its limits."""


def _raise_exception(message: str) -> None:
    raise TemplateError(f"template raised: {message}")


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, **_: Any) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii)


def _strftime_now(fmt: str) -> str:
    return time.strftime(fmt)


class _SandboxEnv(ImmutableSandboxedEnvironment):
    """Unsafe attribute access raises at once (jinja's default returns a silent Undefined), and
    `*` / `**` are checked before they can allocate a huge string/list or a huge integer."""

    intercepted_binops = frozenset({"*", "**"})

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        raise SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} object is unsafe")

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_OUTPUT:
                    raise _Abort(f"sequence repetition beyond {MAX_OUTPUT} items")
        if operator == "**" and isinstance(right, (int, float)) and abs(right) > 64:
            raise _Abort("exponent too large")
        return super().call_binop(context, operator, left, right)


def _env() -> ImmutableSandboxedEnvironment:
    env = _SandboxEnv(trim_blocks=True, lstrip_blocks=True, undefined=jinja2.Undefined,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


_ENV = _env()


def _render_bounded(tmpl: jinja2.Template, ctx: dict[str, Any]) -> str:
    """Render chunk by chunk, stopping at MAX_OUTPUT chars or MAX_SECONDS (checked on every traced
    line of the compiled template, so also inside loops that emit nothing)."""
    deadline = time.monotonic() + MAX_SECONDS
    template_file = tmpl.root_render_func.__code__.co_filename

    def tracer(frame, event, arg):  # only frames of the compiled template are traced line by line
        if frame.f_code.co_filename != template_file:
            return None

        def local(frame, event, arg):
            if time.monotonic() > deadline:
                raise _Abort(f"render exceeded {MAX_SECONDS}s")
            return local

        return local

    out: list[str] = []
    size = 0
    old = sys.gettrace()
    sys.settrace(tracer)
    try:
        for chunk in tmpl.generate(**ctx):
            size += len(chunk)
            if size > MAX_OUTPUT:
                raise _Abort(f"rendered prompt exceeds {MAX_OUTPUT} characters")
            if time.monotonic() > deadline:
                raise _Abort(f"render exceeded {MAX_SECONDS}s")
            out.append(chunk)
    finally:
        sys.settrace(old)
    return "".join(out)


def render_chat(template: str, messages: list[dict], *, add_generation_prompt: bool = True,
                bos_token: str = "", eos_token: str = "", **extra: Any) -> str:
    """Render `messages` with a Jinja chat template in a sandbox. Any template failure (syntax,
    sandbox violation, undefined access, raise_exception, size/time cap) raises TemplateError."""
    ctx = dict(extra)
    ctx.update(messages=messages, add_generation_prompt=add_generation_prompt, bos_token=bos_token,
               eos_token=eos_token)
    try:
        tmpl = _ENV.from_string(template)
        return _render_bounded(tmpl, ctx)
    except TemplateError:
        raise
    except _Abort as e:
        raise TemplateError(f"chat template aborted: {e}") from None
    except SecurityError as e:
        raise TemplateError(f"chat template violates the sandbox: {e}") from None
    except JinjaTemplateError as e:  # syntax, undefined, ...
        raise TemplateError(f"chat template error: {type(e).__name__}: {e}") from None
    except (RecursionError, MemoryError, OverflowError) as e:
        raise TemplateError(f"chat template aborted: {type(e).__name__}") from None
    except Exception as e:  # TypeError/ValueError/... from expressions inside the template
        raise TemplateError(f"chat template failed: {type(e).__name__}: {e}") from None


def default_template(arch: str) -> str | None:
    """Built-in template for GGUFs without tokenizer.chat_template (as llama.cpp picks by arch);
    None means the caller uses CHATML."""
    if arch in ("gemma", "gemma2", "gemma3", "gemma3n", "gemma4"):
        return GEMMA
    return None


def chat_prompt_ids(tokenizer, arch: str, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """Render `messages` with the model's template (the GGUF's, else the built-in one for `arch`, else
    ChatML) and tokenise it. The template writes BOS itself when it wants one, so none is added twice."""
    tok = tokenizer
    template = tok.chat_template or default_template(arch) or CHATML
    bos = tok.token_piece(tok.bos_id) if tok.bos_id is not None else ""
    eos = tok.token_piece(tok.eos_id) if tok.eos_id is not None else ""
    rendered = render_chat(template, messages, add_generation_prompt=add_generation_prompt, bos_token=bos,
                           eos_token=eos)
    return tok.encode(rendered, add_bos=False if bos and rendered.startswith(bos) else None)
