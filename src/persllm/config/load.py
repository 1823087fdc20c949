"""Loading a project: YAML, presets and overrides, validation into one-line errors, path checks.

Precedence is defaults < YAML < CLI overrides (dotted keys such as ``annotate.counts.ordinary``).
Every user mistake becomes a ``UserError`` naming the file, the key and the fix.
"""

import contextlib
import json
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import ValidationError

from persllm.config.llm import LLMConfig
from persllm.config.persona import PersonaConfig
from persllm.config.project import Project, ProjectConfig, expand_globs
from persllm.errors import UserError
from persllm.labels import reserved_labels
from persllm.schema import Section

M = TypeVar("M", bound="Section")


def load_project(
    path: str | Path, overrides: dict[str, Any] | None = None, preset: str | None = None
) -> Project:
    """Load and validate ``persllm.yaml`` and every persona it names.

    Precedence: defaults < the YAML < the named ``preset`` from its ``presets:`` block < ``overrides``.
    """
    config_path = Path(path)
    if config_path.is_dir():
        config_path = config_path / "persllm.yaml"
    raw = read_yaml(config_path)
    if preset is not None:
        presets = raw.get("presets") or {}
        if not isinstance(presets, dict) or not isinstance(presets.get(preset), dict):
            known = ", ".join(presets) if isinstance(presets, dict) and presets else "none defined"
            raise UserError(
                f"{config_path}: presets: no preset {preset!r} (known: {known}); add it or fix the name"
            )
        overrides = {**presets[preset], **(overrides or {})}
    for key, value in (overrides or {}).items():
        if value is not None:
            set_dotted(raw, key, value)
    config = validate(ProjectConfig, raw, config_path)
    config_path = config_path.resolve()
    resolve_model_paths(config, config_path)

    personas: dict[str, PersonaConfig] = {}
    persona_paths: dict[str, Path] = {}
    for index, pattern in enumerate(config.personas):
        matches = expand_globs([pattern], config_path.parent)
        if not matches:
            raise UserError(
                f"{config_path}: personas[{index}]: no file matches {pattern!r}; "
                "fix the path (relative to this file) or create the persona file"
            )
        for persona_path in matches:
            persona = validate(PersonaConfig, read_yaml(persona_path), persona_path)
            if persona.id in personas:
                raise UserError(
                    f"{persona_path}: id: persona id {persona.id!r} is also used by "
                    f"{persona_paths[persona.id]}; give each persona its own id"
                )
            check_stage_files(persona, persona_path)
            if config.stage_labels.kind == "reserved":
                use_reserved_labels(persona, persona_path, config.base_model.model)
            personas[persona.id] = persona
            persona_paths[persona.id] = persona_path
    return Project(config=config, config_path=config_path, personas=personas, persona_paths=persona_paths)


def model_blocks(config: ProjectConfig) -> list[tuple[str, LLMConfig]]:
    """Every model block of the project with its dotted name: annotator, base_model, judges, agents."""
    blocks = [("annotator", config.annotator), ("base_model", config.base_model)]
    blocks += [
        (f"eval.{name}", llm) for name in ("judge", "second_judge") if (llm := getattr(config.eval, name))
    ]
    blocks += [(f"eval.extra_systems.{name}", llm) for name, llm in config.eval.extra_systems.items()]
    if config.converse.judge is not None:
        blocks.append(("converse.judge", config.converse.judge))
    blocks += [(f"converse.agents.{n}.llm", a.llm) for n, a in config.converse.agents.items() if a.llm]
    return blocks


def resolve_model_paths(config: ProjectConfig, config_path: Path) -> None:
    """Relative ``model`` and ``adapter`` paths resolve against the config file's folder, as corpus globs
    do (whatever the current directory). Hub ids and served model names are left as they are; whether a
    path exists is checked by the commands that will load it (``persllm.checks``)."""
    for _, llm in model_blocks(config):
        for key in ("model", "adapter"):
            value = getattr(llm, key)
            if not value or value.startswith("bundled:") or (llm.backend == "openai" and key == "model"):
                continue
            path = Path(value).expanduser()
            if not path.is_absolute() and (looks_like_path(value) or (config_path.parent / path).exists()):
                setattr(llm, key, str((config_path.parent / path).resolve()))


def looks_like_path(value: str) -> bool:
    """A model name written as a file path (``./x``, ``../x``, ``/x``, ``~/x``, ``x.gguf``), not a hub id."""
    return value.startswith((".", "/", "~")) or value.endswith(".gguf")


def use_reserved_labels(persona: PersonaConfig, persona_path: Path, model: str) -> None:
    """Give each stage without its own label one of the base model's reserved tokens."""
    given = [stage.label if stage._label_given else None for stage in persona.stages]
    labels = reserved_labels(model, given, f"{persona_path}: stages")
    for stage, label in zip(persona.stages, labels, strict=True):
        stage.label = label


def check_stage_files(persona: PersonaConfig, persona_path: Path) -> None:
    """Every glob must be well formed and match something; every stage must have material."""
    for g_index, pattern in enumerate(persona.dialogue):
        check_glob(pattern, f"{persona_path}: dialogue[{g_index}]", persona_path)
    if persona.dialogue and not any(s.since or s.until for s in persona.stages):
        raise UserError(
            f"{persona_path}: dialogue: dated chats need stages with `since` / `until` dates; add them "
            "(YYYY-MM-DD), or list the files under a stage's `dialogue` instead"
        )
    for s_index, stage in enumerate(persona.stages):
        for kind in ("knowledge", "style", "dialogue"):
            for g_index, pattern in enumerate(getattr(stage, kind)):
                check_glob(pattern, f"{persona_path}: stages[{s_index}].{kind}[{g_index}]", persona_path)
        dated = persona.dialogue and (stage.since or stage.until)
        if not stage.knowledge and not stage.style and not stage.dialogue and not dated:
            raise UserError(
                f"{persona_path}: stages[{s_index}] ({stage.id}): no knowledge, style or dialogue files; "
                "add at least one glob"
            )


def check_glob(pattern: str, where: str, persona_path: Path) -> None:
    if pattern.count("[") != pattern.count("]") or "***" in pattern:
        raise UserError(f"{where}: {pattern!r} is not a valid glob; check brackets and stars")
    if not expand_globs([pattern], persona_path.parent):
        raise UserError(
            f"{where}: {pattern!r} matches no file; fix the pattern (relative to {persona_path.name})"
        )


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.exists():
        raise UserError(
            f"{path}: file not found; check the path (or create a project with `persllm init DIR`)"
        )
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise UserError(f"{path}{where}: {problem}; fix the YAML syntax") from None
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text; save it as UTF-8") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a mapping of keys at the top level; got {type(data).__name__}")
    return data


def set_dotted(raw: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``a.b.c`` in nested dicts; string values are parsed as YAML scalars (``3`` -> 3)."""
    if isinstance(value, str):
        with contextlib.suppress(yaml.YAMLError):
            value = yaml.safe_load(value) if value else value
    node = raw
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def parse_set_options(options: list[str] | None) -> dict[str, Any]:
    """``--set key.path=value`` options as a dict; a malformed one is a user error."""
    result: dict[str, Any] = {}
    for option in options or []:
        if "=" not in option:
            raise UserError(f"--set {option!r}: expected KEY=VALUE, e.g. --set annotate.counts.ordinary=8")
        key, value = option.split("=", 1)
        result[key.strip()] = value
    return result


def validate(model: type[M], raw: dict[str, Any], path: Path) -> M:
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        raise UserError(explain_validation_error(exc, model, path)) from None


def explain_validation_error(exc: ValidationError, model: type[Section], path: Path) -> str:
    """The first validation error as one line: file, key, problem, fix."""
    error = exc.errors()[0]
    loc = error["loc"]
    key = ".".join(f"[{part}]" if isinstance(part, int) else str(part) for part in loc).replace(".[", "[")
    kind = error["type"]
    if kind == "extra_forbidden":
        allowed = _allowed_keys(model, loc[:-1])
        hint = f" (allowed here: {', '.join(allowed)})" if allowed else ""
        return f"{path}: {key}: unknown key; remove it or fix the spelling{hint}"
    if kind == "missing":
        return f"{path}: {key}: required key is missing; add it"
    if kind == "too_short" and loc and loc[-1] == "stages":
        return f"{path}: stages: a persona needs at least one stage; add one with id, time and globs"
    if kind == "too_short":
        return f"{path}: {key}: must not be empty; add at least one entry"
    where = f"{path}: {key}" if key else str(path)
    message = error["msg"].removeprefix("Value error, ")
    if kind == "value_error" and "; " in message:  # our own validators already say what to fix
        return f"{where}: {message}"
    given = error.get("input")
    shown = json.dumps(given, default=str)[:60] if not isinstance(given, dict) else "a mapping"
    return f"{where}: {message} (got {shown}); fix the value"


def _allowed_keys(model: type[Section], loc: tuple[Any, ...]) -> list[str]:
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        fields = getattr(current, "model_fields", None)
        if not fields or part not in fields:
            return []
        annotation = fields[part].annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        current = next((c for c in candidates if isinstance(c, type) and issubclass(c, Section)), None)
        if current is None:
            return []
    fields = getattr(current, "model_fields", {})
    return sorted(fields)
