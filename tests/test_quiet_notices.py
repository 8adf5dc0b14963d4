"""Library notices a user of moe-hub should not see: bitsandbytes' advice to fetch a Hub kernel
(that one message only), transformers' use_cache notice under gradient checkpointing, and the
``is_gradient_checkpointing`` FutureWarning that PEFT and TRL trigger."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import pytest
from helpers_finetune import tiny_checkpoint

from moe_hub.finetune import FinetuneOptions, load_for_training
from moe_hub.modeling import MoELoraForCausalLM
from moe_hub.progress import quiet_library_notices

BNB_LOGGER = "bitsandbytes.backends.cpu.ops"


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("quiet"))


def test_only_the_kernels_advice_is_filtered(caplog: pytest.LogCaptureFixture) -> None:
    quiet_library_notices()
    logger = logging.getLogger(BNB_LOGGER)
    with caplog.at_level(logging.WARNING, logger=BNB_LOGGER):
        # bitsandbytes' own format string and argument (backends/cpu/ops.py, at import)
        logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: %s. Please "
                       "make sure you already `pip install kernels` and the kernels >= 0.11.1",
                       "Kernel repository could not verify publisher trust status")
        logger.warning("some other CPU backend warning")
    assert [r.getMessage() for r in caplog.records] == ["some other CPU backend warning"]


def test_training_model_runs_without_cache_under_gradient_checkpointing(
        checkpoint: Path) -> None:
    """transformers reads use_cache from the dense config the backbone holds: with it on, every
    checkpointed forward prints that it turns it off."""
    options = FinetuneOptions(quantize="none", gradient_checkpointing=True)
    model = load_for_training(checkpoint, options)
    assert model.config.use_cache is False
    assert model.config.get_text_config().use_cache is False
    assert model.model.config.use_cache is False


def test_is_gradient_checkpointing_answers_without_a_future_warning(checkpoint: Path) -> None:
    model = MoELoraForCausalLM.from_pretrained(checkpoint)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert model.is_gradient_checkpointing is False
        enable = getattr(model, "activation_checkpointing_enable", None)
        (enable or model.gradient_checkpointing_enable)()
        assert model.is_gradient_checkpointing is True
    assert not [w for w in caught if issubclass(w.category, FutureWarning)], \
        [str(w.message) for w in caught]


@pytest.mark.parametrize("quiet", [True, False])
def test_deepspeed_cpu_notice_stays_off_stdout(quiet: bool) -> None:
    """DeepSpeed (a test extra; accelerate and transformers import it wherever it is installed)
    prints its CPU fallback to stdout, where `finetune --no-progress` writes its JSON report.
    The unquieted run is the control: it shows this DeepSpeed still prints the notice."""
    import os
    import subprocess
    import sys

    code = ("from moe_hub.progress import quiet_library_notices\n"
            + ("quiet_library_notices()\n" if quiet else "")
            + "from deepspeed.accelerator import get_accelerator\n"
            "print(get_accelerator().device_name())\n")
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[-1] == "cpu"
    assert ("Setting accelerator to CPU" in run.stdout) is not quiet, run.stdout
