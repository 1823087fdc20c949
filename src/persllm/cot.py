"""The one inline chain-of-thought format shared by curation, chat, serve and evaluation.

A personified model trained with ``cot: inline`` answers ``<think>\\n{analysis}\\n</think>\\n{response}``:
the convention reasoning models on the Hugging Face hub already use, so tools that know it can hide
the analysis. ``split_inline`` also accepts text with no analysis block (``cot: none`` models).
"""

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


def render_inline(analysis: str, response: str) -> str:
    """The assistant target for ``cot: inline``."""
    return f"{THINK_OPEN}\n{analysis.strip()}\n{THINK_CLOSE}\n{response.strip()}"


def split_inline(text: str) -> tuple[str, str]:
    """Split model output into (analysis, response).

    An unterminated analysis (generation cut off inside it) yields an empty response.
    """
    stripped = text.strip()
    if not stripped.startswith(THINK_OPEN):
        return "", stripped
    body = stripped[len(THINK_OPEN) :]
    if THINK_CLOSE not in body:
        return body.strip(), ""
    analysis, response = body.split(THINK_CLOSE, 1)
    return analysis.strip(), response.strip()
