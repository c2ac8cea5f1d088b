"""Typed errors. Each maps to a process exit code (CLI) and, later, an HTTP status (server)."""


class QatserveError(Exception):
    """Base of every error qatserve raises on purpose; the CLI prints it as one line."""

    exit_code = 1


class GGUFError(QatserveError):
    """A GGUF file is missing, truncated, malformed or hostile. The message names the field/offset."""

    exit_code = 2


class ModelError(QatserveError):
    """A well-formed GGUF does not describe a model we can build (missing tensor, shape mismatch, ...)."""

    exit_code = 3


class TokenizerError(QatserveError):
    """The vocabulary in the GGUF cannot be turned into a tokenizer."""

    exit_code = 3


class TemplateError(QatserveError):
    """A chat template failed to render (syntax, sandbox violation, render cap)."""

    exit_code = 4


class RequestError(QatserveError):
    """A user request (CLI flags, later HTTP body) is invalid."""

    exit_code = 64
