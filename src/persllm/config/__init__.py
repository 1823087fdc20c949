"""Settings: the project and persona files and each stage's section, as typed models, and their loading.

Every module here is a leaf: it imports nothing of persllm but ``schema``, ``errors``, ``labels`` and
``layout``, so any stage can import its settings without importing another stage (litgpt's ``args.py``,
TRL's ``*_config.py``). A stage's settings live in ``persllm.config.<stage>``.
"""

from persllm.config.annotate import AnnotateConfig
from persllm.config.curate import CurateConfig
from persllm.config.evaluate import EvalConfig
from persllm.config.interact import ConverseConfig, ServeConfig
from persllm.config.llm import LLMConfig
from persllm.config.load import load_project, looks_like_path, model_blocks, parse_set_options
from persllm.config.pairs import PairsConfig
from persllm.config.persona import TRAITS, PersonaConfig, StageConfig
from persllm.config.project import EmbedderConfig, Project, ProjectConfig, Workspace
from persllm.config.train import DPOConfig, SFTConfig

__all__ = [
    "TRAITS",
    "AnnotateConfig",
    "ConverseConfig",
    "CurateConfig",
    "DPOConfig",
    "EmbedderConfig",
    "EvalConfig",
    "LLMConfig",
    "PairsConfig",
    "PersonaConfig",
    "Project",
    "ProjectConfig",
    "SFTConfig",
    "ServeConfig",
    "StageConfig",
    "Workspace",
    "load_project",
    "looks_like_path",
    "model_blocks",
    "parse_set_options",
]
