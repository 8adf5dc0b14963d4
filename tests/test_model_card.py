"""README.md model cards rendered from a checkpoint's own files."""

from __future__ import annotations

import json
import re
import struct
import zlib
from pathlib import Path

import pytest
from conftest import save_tiny_dense, tiny_config
from huggingface_hub import ModelCard

from moe_hub.convert import convert
from moe_hub.errors import MoEHubError
from moe_hub.model_card import HEATMAP_FILE, TRAINING_FILE, write_model_card
from moe_hub.modeling import MoELoraConfig

HUB_BASE = "HuggingFaceTB/SmolLM2-135M-Instruct"
EXPECTED_TAGS = {"moe", "lora", "moe-lora", "moe-hub", "custom_code"}


def _checkpoint_config(path: Path, **overrides) -> Path:
    """A checkpoint directory holding only config.json: all a card is rendered from."""
    options = dict(text_config=tiny_config("qwen2"), router="topk", num_experts=6,
                   num_experts_per_tok=2, lora_rank=8, lora_alpha=16.0,
                   target_modules=["q_proj", "v_proj", "down_proj"],
                   base_model_name_or_path=HUB_BASE, base_model_revision="a1b2c3d")
    options.update(overrides)
    MoELoraConfig(**options).save_pretrained(path)
    return path


def _png(path: Path, width: int = 4, height: int = 3) -> None:
    """A real (tiny, grey) PNG file."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(
            ">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    rows = b"".join(b"\x00" + bytes([128] * width) for _ in range(height))
    path.write_bytes(b"\x89PNG\r\n\x1a\n"
                     + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_converted_checkpoint_card(tmp_path: Path) -> None:
    dense = save_tiny_dense(tmp_path / "dense")
    (dense / "README.md").write_text("---\nlicense: apache-2.0\nlanguage: en\n---\n# base\n")
    checkpoint = convert(dense, tmp_path / "moe", experts=4, top_k=2, rank=4, progress=False)
    card = ModelCard.load(checkpoint / "README.md")
    data = card.data.to_dict()
    assert data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "text-generation"
    assert data["license"] == "apache-2.0"  # inherited from the base's front matter
    assert set(data["tags"]) == EXPECTED_TAGS | {"topk"}
    # A local base path is not Hub metadata.
    assert "base_model" not in data and "base_model_relation" not in data
    assert "datasets" not in data
    text = card.text
    for snippet in ("trust_remote_code=True", "BitsAndBytesConfig(load_in_4bit=True",
                    'pipeline("text-generation"', "| Experts per routing site | 4 |",
                    "| Experts per token (top-k) | 2 |", "## Limits"):
        assert snippet in text
    assert "## Training" not in text and "## Routing" not in text
    assert "start as a no-op" in text


@pytest.fixture
def empty_hf_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    import huggingface_hub.constants as constants

    cache = tmp_path / "hf-cache"
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    return cache


def test_hub_base_metadata_full_and_adapter_only(tmp_path: Path, empty_hf_cache: Path) -> None:
    full = ModelCard.load(write_model_card(_checkpoint_config(tmp_path / "full"),
                                           repo_id="alice/smol-moe"))
    assert full.data.base_model == HUB_BASE
    assert full.data.to_dict()["base_model_relation"] == "finetune"
    assert "license" not in full.data.to_dict()  # unknown: the base is not cached locally
    assert 'from_pretrained("alice/smol-moe", trust_remote_code=True)' in full.text
    assert "revision `a1b2c3d`" in full.text
    assert "`q_proj`, `v_proj`, `down_proj`" in full.text

    adapter_dir = _checkpoint_config(tmp_path / "adapter", adapter_only=True, router="rmoe",
                                     router_config={"hidden_size": 32})
    adapter = ModelCard.load(write_model_card(adapter_dir))
    data = adapter.data.to_dict()
    assert data["base_model_relation"] == "adapter"
    assert "rmoe" in data["tags"]
    assert "| Router option `hidden_size` | `32` |" in adapter.text
    assert "dense weights are fetched from the base repository" in adapter.text
    assert "Checkpoint format | adapter-only" in adapter.text


def test_fine_tuned_card_with_training_record_and_heatmap(tmp_path: Path) -> None:
    checkpoint = _checkpoint_config(tmp_path / "tuned")
    record = {
        "data": {"path": "tatsu-lab/alpaca", "format": "prompt/completion", "rows": 512},
        "steps": 120,
        "hyperparameters": {"learning_rate": 0.0002, "per_device_train_batch_size": 4,
                            "quantize": "nf4"},
        "metrics": {"train_loss": 1.234, "eval_loss": 1.456},
        "expert_load": {"coefficient_of_variation": 0.12},
    }
    (checkpoint / TRAINING_FILE).write_text(json.dumps(record))
    _png(checkpoint / HEATMAP_FILE)
    card = ModelCard.load(write_model_card(checkpoint, license="mit"))
    data = card.data.to_dict()
    assert data["datasets"] == ["tatsu-lab/alpaca"]
    assert data["license"] == "mit"
    assert data["base_model"] == HUB_BASE
    text = card.text
    assert "## Training" in text and "Optimizer steps: 120" in text
    assert "| learning_rate | `0.0002` |" in text and "| quantize | `nf4` |" in text
    assert "| eval_loss | 1.456 |" in text
    assert "coefficient_of_variation" in text
    assert f"![Routing heatmap]({HEATMAP_FILE})" in text
    assert "start as a no-op" not in text

    # Re-rendering (e.g. before a push) keeps the license found earlier.
    again = ModelCard.load(write_model_card(checkpoint))
    assert again.data.license == "mit"


def test_license_of_a_cached_hub_base(tmp_path: Path, empty_hf_cache: Path) -> None:
    """The base's README, once downloaded into the Hub cache, gives the card its license."""
    from hub_server import serve_hub
    from huggingface_hub import CommitOperationAdd, HfApi, hf_hub_download

    with serve_hub({"tok": "org"}) as hub:
        api = HfApi(endpoint=hub.endpoint, token="tok")
        api.create_repo("org/base")
        readme = b"---\nlicense: llama3.2\ntags: [text]\n---\n# A base model\n"
        api.create_commit("org/base", operations=[CommitOperationAdd("README.md", readme)],
                          commit_message="card")
        hf_hub_download("org/base", "README.md", endpoint=hub.endpoint, token="tok")
    checkpoint = _checkpoint_config(tmp_path / "ckpt", base_model_name_or_path="org/base",
                                    base_model_revision=None)
    card = ModelCard.load(write_model_card(checkpoint))
    assert card.data.license == "llama3.2"
    assert card.data.base_model == "org/base"


def test_bad_input(tmp_path: Path) -> None:
    with pytest.raises(MoEHubError, match=r"no config\.json.*moe-hub convert"):
        write_model_card(tmp_path)
    dense = save_tiny_dense(tmp_path / "dense")
    with pytest.raises(MoEHubError, match="not a moe-hub checkpoint"):
        write_model_card(dense)
    assert not (dense / "README.md").exists()
    checkpoint = _checkpoint_config(tmp_path / "ckpt")
    (checkpoint / TRAINING_FILE).write_text("{not json")
    with pytest.raises(ValueError, match=f"{TRAINING_FILE} is not valid JSON"):
        write_model_card(checkpoint)
    assert sorted(p.name for p in checkpoint.iterdir()) == ["config.json", TRAINING_FILE]


def test_gguf_base_card_names_its_origin_and_no_local_paths(tmp_path: Path) -> None:
    """A checkpoint converted from a GGUF links the Hub model the GGUF was made from (recorded
    at conversion) instead of `(#)`, carries its license, and a fine-tuned card shows a local
    data file by its name only, with short numbers."""
    checkpoint = _checkpoint_config(
        tmp_path / "smol-moe", base_model_name_or_path="SmolLM2-135M-Instruct.Q4_1.gguf",
        base_model_revision=None, base_model_origin=HUB_BASE, base_model_license="apache-2.0")
    record = {
        "data": str(tmp_path / "home" / "me" / "secret-project" / "train.jsonl"),
        "steps": 30,
        "hyperparameters": {"lr": 0.0002, "eval_data": str(tmp_path / "home" / "eval.jsonl")},
        "final_metrics": {"train_loss": 1.7123456789012345, "global_step": 30},
        "expert_load_stats": {"overall_load": [0.12345678901, 0.87654321099]},
    }
    (checkpoint / TRAINING_FILE).write_text(json.dumps(record))
    card = ModelCard.load(write_model_card(checkpoint))
    data = card.data.to_dict()
    assert data["base_model"] == HUB_BASE and data["license"] == "apache-2.0"
    text = card.text
    assert "(#)" not in text
    assert f"`SmolLM2-135M-Instruct.Q4_1.gguf`, a GGUF copy of [{HUB_BASE}]" \
           f"(https://huggingface.co/{HUB_BASE})" in text
    assert "Data: `train.jsonl` (local file)" in text
    assert str(tmp_path) not in text and "secret-project" not in text
    assert "| train_loss | 1.712 |" in text and "[0.1235, 0.8765]" in text
    assert not re.search(r"\d\.\d{6,}", text)


def write_gguf(writer) -> None:
    """Write what a ``gguf.GGUFWriter`` holds (header, metadata, no tensors) and close it."""
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_gguf_metadata_gives_origin_and_license(tmp_path: Path) -> None:
    """general.source.url / general.license of a real GGUF header (written by the gguf
    package) are what conversion records; the embedded default falls back to its known origin."""
    from gguf import GGUFWriter

    from moe_hub.gguf_source import LICENSE_KEY, ORIGIN_KEY, gguf_provenance

    path = tmp_path / "model.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_string("general.source.url", "https://huggingface.co/org/original-model")
    writer.add_string("general.license", "mit")
    write_gguf(writer)
    assert gguf_provenance(path) == {ORIGIN_KEY: "org/original-model", LICENSE_KEY: "mit"}
    bare = tmp_path / "bare.gguf"
    writer = GGUFWriter(str(bare), "llama")
    write_gguf(writer)
    assert gguf_provenance(bare) == {}
    assert gguf_provenance(bare, default_model=True) == {ORIGIN_KEY: HUB_BASE,
                                                         LICENSE_KEY: "apache-2.0"}


def test_gguf_provenance_reads_the_header_as_gguf_does(tmp_path: Path) -> None:
    """The ``general.*`` strings are read from the header alone, stepping over the vocabulary
    and other arrays (GGUFReader decodes them all, seconds for SmolLM2): the same fields gguf's
    own reader finds, in either byte order, and none from a file cut short."""
    from gguf import GGUFEndian, GGUFReader, GGUFValueType, GGUFWriter

    from moe_hub.gguf_source import LICENSE_KEY, ORIGIN_KEY, _read_fields, gguf_provenance

    for endian in (GGUFEndian.LITTLE, GGUFEndian.BIG):
        path = tmp_path / f"{endian.name}.gguf"
        writer = GGUFWriter(str(path), "llama", endianess=endian)
        # Arrays, numbers and nested arrays before and between the strings looked for.
        writer.add_array("tokenizer.ggml.tokens", [f"tok{i}" for i in range(3000)])
        writer.add_array("tokenizer.ggml.scores", [0.5] * 100)
        writer.add_key_value("general.nested", [[1, 2], [3]], GGUFValueType.ARRAY)
        writer.add_uint32("general.quantization_version", 2)
        writer.add_string("general.base_model.0.repo_url",
                          "https://huggingface.co/org/fine-tuned-from")
        writer.add_array("general.tags", ["a", "b"])
        writer.add_string("general.license", "llama3.2 ünïcode")
        writer.add_string("tokenizer.chat_template", "{{ general.license }}")
        write_gguf(writer)
        theirs = {name: field.contents() for name, field in GGUFReader(path).fields.items()
                  if name.startswith("general.") and isinstance(field.contents(), str)}
        assert _read_fields(path) == theirs and len(theirs) == 3, endian
        assert gguf_provenance(path) == {ORIGIN_KEY: "org/fine-tuned-from",
                                         LICENSE_KEY: "llama3.2 ünïcode"}
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:20000])  # inside the token array
    assert gguf_provenance(cut) == {}


def test_card_of_a_run_on_the_shipped_set_names_no_hub_dataset(tmp_path: Path) -> None:
    """``--data default`` is moe-hub's shipped set, not a Hub data set called "default": the
    card's metadata names none (the Hub would link one), its text says what was used."""
    checkpoint = _checkpoint_config(tmp_path / "tuned")
    record = {"data": {"path": "default", "format": "messages", "rows": 300}, "steps": 30}
    (checkpoint / TRAINING_FILE).write_text(json.dumps(record))
    card = ModelCard.load(write_model_card(checkpoint))
    assert "datasets" not in card.data.to_dict()
    assert "moe-hub's shipped multi-task chat set" in card.text
