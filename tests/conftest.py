"""Shared fixtures: offline mode, a tiny real model, the bundled example project."""

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tests.tiny import build_tiny_model, pretrain_tiny_model

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "demo"

TINY_DIALOGUES = [
    [
        {"role": "user", "content": "Who keeps the light?"},
        {"role": "assistant", "content": "I keep the light at Skerrow Point."},
    ],
    [
        {"role": "user", "content": "What do you teach?"},
        {"role": "assistant", "content": "I teach reading and patience."},
    ],
    [
        {"role": "user", "content": "Is the sea kind?"},
        {"role": "assistant", "content": "The sea does not forgive vanity."},
    ],
]


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama, fully trained for a few steps on short chats, saved as a real HF folder."""
    path = tmp_path_factory.mktemp("tiny") / "model"
    build_tiny_model(path)
    pretrain_tiny_model(path, TINY_DIALOGUES)
    return path


@pytest.fixture()
def example_project(tmp_path: Path) -> Path:
    """A private copy of the bundled example project (so runs write into tmp, not the repo)."""
    target = tmp_path / "demo"
    shutil.copytree(EXAMPLE, target, ignore=shutil.ignore_patterns("runs"))
    return target / "persllm.yaml"
