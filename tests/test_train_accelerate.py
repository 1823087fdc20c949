"""Multi-GPU launch files and the ``python -m persllm.train`` entry point that ``accelerate launch`` runs."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.test_train import DPO_TRL, SFT_TRL, make_project

pytestmark = pytest.mark.slow  # subprocesses that start accelerate: `make test-fast` skips it

REPO = Path(__file__).resolve().parent.parent
CONFIGS = REPO / "configs" / "accelerate"


@pytest.mark.parametrize(
    ("name", "kind"), [("ddp", "MULTI_GPU"), ("deepspeed_zero3", "DEEPSPEED"), ("fsdp", "FSDP")]
)
def test_accelerate_configs_load_with_accelerates_own_loader(name: str, kind: str) -> None:
    from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

    config = load_config_from_file(str(CONFIGS / f"{name}.yaml"))
    assert isinstance(config, ClusterConfig)
    assert config.distributed_type.value == kind
    assert config.num_machines == 1 and config.num_processes >= 2 and config.mixed_precision == "bf16"
    if kind == "DEEPSPEED":
        assert config.deepspeed_config["zero_stage"] == 3
    if kind == "FSDP":
        assert config.fsdp_config["fsdp_version"] == 2


def test_unknown_accelerate_key_is_rejected_by_the_same_loader(tmp_path: Path) -> None:
    from accelerate.commands.config.config_args import load_config_from_file

    data = yaml.safe_load((CONFIGS / "ddp.yaml").read_text())
    data["num_gpus"] = 4
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ValueError, match="num_gpus"):
        load_config_from_file(str(path))


def test_module_entry_point_help() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "persllm.train", "sft", "--help"], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert "--resume" in out.stdout and "Example: persllm train sft" in out.stdout


def test_module_entry_point_user_error_exits_2(tmp_path: Path, tiny_model_dir: Path) -> None:
    config = make_project(tmp_path, tiny_model_dir, {"lernin_rate": 1e-3}, DPO_TRL)
    out = subprocess.run(
        [sys.executable, "-m", "persllm.train", "sft", str(config)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 2
    assert "sft.trl.lernin_rate: unknown TRL SFTConfig argument" in out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_accelerate_launch_runs_ddp_on_two_cpu_processes(tmp_path: Path, tiny_model_dir: Path) -> None:
    """Real DDP over gloo: both ranks train, only the main one writes the model and prints."""
    from transformers import AutoTokenizer

    from persllm.jsonl import read_jsonl

    accelerate = Path(sys.executable).with_name("accelerate")
    base = shutil.copytree(tiny_model_dir, tmp_path / "base")
    trl = {**SFT_TRL, "max_steps": 3, "per_device_train_batch_size": 2}
    config = make_project(tmp_path, base, trl, DPO_TRL)
    # Without GPUs the DDP file still starts two processes (torchrun); persllm's use_cpu default on a
    # GPU-less machine makes them one gloo process group.
    command = [str(accelerate), "launch", "--config_file", str(CONFIGS / "ddp.yaml"), "--num_processes", "2"]
    command += ["-m", "persllm.train", "sft", str(config), "--persona", "elsie"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run(command, capture_output=True, text=True, timeout=900, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("elsie: sft 3 steps") == 1
    model_dir = tmp_path / "runs" / "traintest" / "models" / "elsie" / "sft"
    assert (model_dir / "adapter_model.safetensors").exists()
    info = json.loads((model_dir / "training.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    rows = read_jsonl(tmp_path / "runs" / "traintest" / "data" / "elsie" / "sft_train.jsonl")
    lengths = [len(tokenizer.apply_chat_template(r["messages"], return_dict=True)["input_ids"]) for r in rows]
    # 3 steps x 2 rows x 2 ranks: more tokens than one process could have seen in 3 steps.
    assert info["tokens"] >= 12 * min(lengths) > 6 * max(lengths)
