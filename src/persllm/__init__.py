"""persllm: turn what is known about a person into a personified LLM."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("persllm")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"
