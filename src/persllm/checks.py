"""What ``persllm run`` checks before its first stage: every setting a selected stage will use.

Loading the project already checked the config's shape, the persona files, the corpus globs and the
model paths; here come the checks that need a stage's own knowledge: the TRL and PEFT blocks (built as
real objects), the systems and judge of the evaluation, and that the models a stage needs can be used
the way it needs them. A typo found after hours of annotation is the failure this prevents.
"""

from pathlib import Path

from persllm.config import Project, looks_like_path, model_blocks
from persllm.errors import UserError
from persllm.evaluate.systems import BUILTIN
from persllm.llm.llamacpp_backend import gguf_path
from persllm.train.common import base_model_name, validate_trl_blocks

# The model blocks each stage loads (their paths must exist before the run starts).
STAGE_MODELS = {
    "annotate": ("annotator",),
    "pairs": ("annotator", "base_model"),
    "sft": ("base_model",),
    "dpo": ("base_model",),
    "eval": ("base_model", "eval."),
}


def check_before_run(project: Project, stages: list[str]) -> None:
    """Raise a UserError naming file, key and fix for the first setting a selected stage cannot use."""
    cfg = project.config
    wanted = {prefix for stage in stages for prefix in STAGE_MODELS.get(stage, ())}
    check_model_paths(project, tuple(wanted))
    if "annotate" in stages and cfg.annotator.backend == "llamacpp":
        gguf_path(cfg.annotator.model)
    if {"sft", "dpo"} & set(stages):
        base_model_name(project.workspace, project.config.base_model)
        validate_trl_blocks(project)
    if "eval" in stages:
        check_eval(project)


def check_model_paths(project: Project, prefixes: tuple[str, ...]) -> None:
    """Every local model or adapter path of the blocks named by ``prefixes`` exists."""
    for where, llm in model_blocks(project.config):
        if not where.startswith(prefixes):
            continue
        for key in ("model", "adapter"):
            value = getattr(llm, key)
            if value and looks_like_path(value) and not Path(value).expanduser().exists():
                raise UserError(
                    f"{project.config_path}: {where}.{key}: {value} does not exist (relative paths start at "
                    "this file's folder); fix the path"
                )


def check_eval(project: Project) -> None:
    """The evaluation's systems are known names."""

    cfg = project.config.eval
    known = [*BUILTIN, *cfg.extra_systems]
    for name in cfg.systems:
        if name not in known:
            choices = ", ".join(known)
            raise UserError(
                f"{project.config_path}: eval.systems: unknown system {name!r}; use one of: {choices}"
            )
