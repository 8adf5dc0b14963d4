"""Dense Hugging Face model -> MoE-LoRA checkpoint that loads with plain transformers.

The dense weights are never loaded as a model: the MoE-LoRA model is built on the meta device to
learn its parameter names, every base shard is rewritten under those names by streaming its bytes
(``safetensors_io``), and only the new expert and router tensors are materialised. Everything is
written into a temporary sibling of OUT that is renamed into place at the very end, so an error or
an interrupt leaves no OUT behind.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .checkpoint import (
    ADAPTER_WEIGHTS,
    TOKENIZER_PATTERNS,
    check_output,
    copy_code,
    dense_weight_files,
    publish,
    staging_dir,
    write_index,
)
from .dense_names import NamePlan, convert_tensors, plan_names
from .errors import MoEHubError
from .gguf_source import gguf_provenance, parsed_once
from .hub_ids import download_snapshot, is_hub_id
from .modeling import MoELoraConfig, MoELoraForCausalLM
from .modeling.routing import ROUTERS
from .options_file import is_finite_number, read_options_file
from .progress import hub_tqdm, third_party_progress, transformers_bars_off
from .safetensors_io import read_header, rewrite_shard, tensor_names, write_tensors
from .skeleton import model_skeleton

DTYPE_NAMES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ConvertOptions:
    """What `moe-hub convert` accepts besides BASE and OUT (also readable from YAML/JSON)."""

    router: str = "topk"
    router_config: dict[str, Any] = field(default_factory=dict)
    experts: int | None = None  # None: 8, or one per adapter with from_adapters
    top_k: int = 2
    rank: int | None = None  # None: 16, or the largest adapter rank with from_adapters
    alpha: float | None = None  # None: 2 * rank, the usual LoRA choice
    dropout: float = 0.05
    targets: list[str] | None = None  # None: every linear inside the decoder layers
    granularity: str = "linear"
    normalize_expert_weights: bool = True
    aux_loss_coef: float = 0.001
    z_loss_coef: float = 0.0
    expert_kernel: str = "auto"
    dtype: str = "auto"  # auto keeps the base's stored dtypes
    seed: int = 0
    revision: str | None = None
    allow_pickle: bool = False
    trust_remote_code: bool = False  # run Python code that BASE ships (config.json auto_map)
    adapter_only: bool = False
    overwrite: bool = False
    from_adapters: list[str] | None = None  # PEFT LoRA adapters: adapter i -> expert i
    check_adapter_base: bool = True

    @classmethod
    def from_file(cls, path: str | Path, **overrides: Any) -> ConvertOptions:
        """Options from a YAML or JSON file; ``overrides`` (e.g. CLI flags) win."""
        path = Path(path)
        data = read_options_file(path)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise MoEHubError(f"unknown option(s) {unknown} in {path}; valid: {sorted(known)}")
        return cls(**{**data, **overrides})

    def check_router(self) -> None:
        """The router exists and takes ``router_config`` (checked before any download)."""
        if self.router not in ROUTERS:
            raise MoEHubError(
                f"unknown router {self.router!r}: pass --router one of {sorted(ROUTERS)}"
            )
        try:
            ROUTERS[self.router].validate_options(self.router_config)
        except ValueError as err:
            raise MoEHubError(str(err)) from None

    def check_numbers(self) -> None:
        """Refuse counts and scales no model can use, naming the flag. The config's own checks
        know no flags, and an infinite or NaN alpha or init_std would pass them and only show
        as NaN outputs (or a torch error half-way through writing OUT)."""
        for flag, value in (("--experts", self.experts), ("--top-k", self.top_k),
                            ("--rank", self.rank)):
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise MoEHubError(f"{flag} takes a whole number, got {value!r}")
            if value < 1:
                raise MoEHubError(f"{flag} must be at least 1 (got {value})")
        # top-k above the expert count is the config's check (its message names both flags),
        # after --from-adapters has said whether there are fewer experts than adapters.
        if self.alpha is not None and not (is_finite_number(self.alpha) and self.alpha > 0):
            raise MoEHubError(f"--alpha must be a finite number above 0 (got {self.alpha!r}); "
                              f"omit it for 2 * rank")
        if not (is_finite_number(self.dropout) and 0.0 <= self.dropout < 1.0):
            raise MoEHubError(f"--dropout must be in [0, 1) (got {self.dropout!r})")
        for name in ("aux_loss_coef", "z_loss_coef"):
            value = getattr(self, name)
            if not (is_finite_number(value) and value >= 0):
                raise MoEHubError(f"{name} must be a finite number >= 0 (got {value!r})")
        for key, value in self.router_config.items():
            # Types were checked by the router; a float option is never meant to be inf or NaN.
            if isinstance(value, float) and not math.isfinite(value):
                raise MoEHubError(f"--router-opt {key} must be finite (got {value})")
            if key == "init_std" and is_finite_number(value) and value < 0:
                raise MoEHubError(f"--router-opt init_std must be >= 0 (got {value}): it is the "
                                  f"standard deviation of the router's initial weights")

    def validate(self) -> None:
        """Check the options on their own, before any BASE is read; raise naming the fix."""
        self.check_router()
        self.check_numbers()
        if self.dtype != "auto" and self.dtype not in DTYPE_NAMES:
            raise MoEHubError(f"unknown dtype {self.dtype!r}: pass --dtype auto, "
                              f"{', '.join(DTYPE_NAMES)}")
        if self.targets is not None and not self.targets:
            raise MoEHubError("--targets is empty: name at least one module, or omit it")
        if self.from_adapters:
            # Before the generic top-k check, which would blame --top-k for too few experts.
            from .from_adapters import check_expert_count

            check_expert_count(self.experts, len(self.from_adapters))
        self.model_config(None, None, None)

    def model_config(self, text_config: Any, base: str | None,
                     revision: str | None) -> MoELoraConfig:
        self.check_router()
        rank = self.rank if self.rank is not None else 16
        try:
            return MoELoraConfig(
                text_config=text_config,
                router=self.router,
                # Options whose default changed are recorded by the config itself.
                router_config=dict(self.router_config),
                num_experts=self.experts if self.experts is not None else 8,
                num_experts_per_tok=self.top_k,
                lora_rank=rank,
                lora_alpha=self.alpha if self.alpha is not None else 2.0 * rank,
                lora_dropout=self.dropout,
                target_modules=self.targets,
                routing_granularity=self.granularity,
                normalize_expert_weights=self.normalize_expert_weights,
                router_aux_loss_coef=self.aux_loss_coef,
                router_z_loss_coef=self.z_loss_coef,
                expert_kernel=self.expert_kernel,
                base_model_name_or_path=base,
                base_model_revision=revision,
                adapter_only=self.adapter_only,
            )
        except (ValueError, TypeError) as err:
            raise MoEHubError(str(err)) from None



def convert(
    base: str | os.PathLike,
    out: str | os.PathLike,
    options: ConvertOptions | None = None,
    *,
    progress: bool = True,
    **option_overrides: Any,
) -> Path:
    """Convert the dense causal LM ``base`` (Hub id, local directory or ``.gguf`` file) into a
    MoE-LoRA checkpoint at ``out`` and return its path.

    Example::

        from moe_hub import convert
        convert("HuggingFaceTB/SmolLM2-135M-Instruct", "smol-moe", router="rmoe", experts=8)
    """
    options = options or ConvertOptions()
    if option_overrides:
        options = ConvertOptions(**{**asdict(options), **option_overrides})
    out = Path(out)
    # Everything that can be checked without BASE is checked before BASE is read or OUT made.
    options.validate()
    check_output(out, options.overwrite,
                 [("BASE", base), *(("--from-adapters adapter", adapter)
                                    for adapter in options.from_adapters or ())])
    source = _classify_base(base, options)
    adapters = None
    if options.from_adapters:
        from . import from_adapters

        options, adapters = from_adapters.prepare(options)
    # Scratch data (a dequantised GGUF, pickle shards re-saved as safetensors) lives in its own
    # sibling folder: never inside OUT, always removed.
    with third_party_progress(progress), staging_dir(out, ".scratch") as scratch, \
            staging_dir(out) as staging:
        gguf = _gguf_file(source)
        # A GGUF is parsed once for its config, tensors and tokenizer (see parsed_once), and its
        # config, read first, is handed to the later stages.
        with parsed_once(gguf) if gguf else nullcontext():
            gguf_config = _gguf_config(gguf) if gguf else None
            # --targets and the model's other options are checked against BASE's architecture
            # from its config alone, before any weight is downloaded, dequantised or read.
            early_config = _early_text_config(source, options, gguf_config)
            if early_config is not None:
                _skeleton(options, early_config, None, None, adapters)
            dense_dir, origin, revision, provenance = _materialise_base(source, options, scratch,
                                                                        gguf, gguf_config)
        text_config = _dense_config(dense_dir, options.trust_remote_code)
        config, model = _skeleton(options, text_config, origin, revision, adapters)
        weight_files = dense_weight_files(dense_dir, options.allow_pickle, scratch / "pickle")
        experts_from = adapters and from_adapters.AdapterPlan(adapters, model, origin,
                                                              options.check_adapter_base)
        if experts_from:
            config.source_adapters = experts_from.records()
        dtype = None if options.dtype == "auto" else DTYPE_NAMES[options.dtype]
        # Read from the skeleton before the adapter thread starts materialising its parameters.
        names = model.checkpoint_names_by_dense_name()
        # Every BASE header is checked (against itself and the model's shapes) even when only
        # adapters are written: a checkpoint of a base that cannot load is no checkpoint.
        plan = _check_base_weights(model, names, weight_files, dense_dir,
                                   options.trust_remote_code)
        if options.adapter_only:
            plan = None
        weight_map: dict[str, str] = {}
        with ThreadPoolExecutor(max_workers=1) as pool:
            # Adapters are initialised and saved while the kernel copies the base shards.
            adapter_names = pool.submit(_write_adapters, model, options.seed, staging,
                                        experts_from)
            if plan is not None:
                weight_map.update(_write_base_shards(plan, names, weight_files, staging, dtype,
                                                     progress))
            weight_map.update(dict.fromkeys(adapter_names.result(), ADAPTER_WEIGHTS))
        write_index(staging, weight_map)
        _write_config(config, text_config, dtype, staging, provenance)
        copy_code(staging)
        _copy_tokenizer_and_generation_config(dense_dir, text_config, staging,
                                              options.trust_remote_code)
        from .model_card import write_model_card

        # The card is rendered in the staging folder but names the final one.
        write_model_card(staging, repo_id=out.name)
        publish(staging, out, options.overwrite)
    return out


def _skeleton(options: ConvertOptions, text_config: Any, origin: str | None,
              revision: str | None, adapters: Any) -> tuple[MoELoraConfig, MoELoraForCausalLM]:
    """The checkpoint's config and its model on the meta device; raises naming the option that
    does not fit BASE's architecture (e.g. a --targets name no module has)."""
    config = options.model_config(text_config, origin, revision)
    try:
        return config, model_skeleton(config)
    except ValueError as err:
        from . import from_adapters

        if adapters and options.targets == from_adapters.adapter_targets(adapters):
            raise MoEHubError(f"the adapters target {options.targets}, but BASE has no such "
                              f"routable linear: were they trained on another model?") from None
        raise MoEHubError(str(err)) from None


def _early_text_config(source: _BaseSource, options: ConvertOptions,
                       gguf_config: Any = None) -> Any:
    """BASE's text config read without its weights (a GGUF's metadata, read once by
    ``_gguf_config``; a Hub repository's config.json alone), or None where that is not possible:
    then the checks run once the base is at hand, as before."""
    if source.kind == "dir":
        return _dense_config(Path(source.location).expanduser(), options.trust_remote_code)
    if options.targets is None and options.granularity == "linear":
        # The defaults fit every decoder with linears; a Hub repository's config read twice
        # would only slow down a good conversion.
        return None
    if source.kind == "gguf":
        # A copy: the skeleton built from it must not touch the config the weights load with.
        return copy.deepcopy(gguf_config).get_text_config() if gguf_config is not None else None
    folder = download_snapshot(source.location, options.revision, ["config.json"],
                               kind="model", role="BASE")
    if not (folder / "config.json").is_file():
        return None  # reported by the full download
    _refuse_moe_hub_checkpoint(folder, source.location)
    _refuse_custom_code(folder, source.location, options.trust_remote_code)
    return _dense_config(folder, options.trust_remote_code)


@dataclass(frozen=True)
class _BaseSource:
    """What BASE names, found without reading any weights: ``kind`` is gguf, dir or hub."""

    kind: str
    location: str  # a local path for gguf and dir, the repo id for hub
    default_model: bool = False  # the embedded default's GGUF
    alias: bool = False  # BASE was 'smollm2' / 'default': fetch (or reuse) the cached GGUF


def _classify_base(base: str | os.PathLike, options: ConvertOptions) -> _BaseSource:
    """Say what BASE is and refuse what cannot work, before anything is downloaded or written."""
    from .default_model import DEFAULT_GGUF_NAME, is_default_alias

    text = os.fspath(base)
    path = Path(text).expanduser()
    if not path.exists() and is_default_alias(text):
        source = _BaseSource("gguf", text, default_model=True, alias=True)
    elif path.exists():
        if not os.access(path, os.R_OK):
            raise MoEHubError(f"BASE {path} is not readable: check its permissions")
        if path.is_file() and path.suffix == ".gguf":
            source = _BaseSource("gguf", str(path), default_model=path.name == DEFAULT_GGUF_NAME)
        elif path.is_file():
            raise MoEHubError(
                f"BASE {path} is a file but not a .gguf: pass a model directory, a .gguf file "
                f"or a Hub model id"
            )
        elif not (path / "config.json").is_file():
            raise MoEHubError(
                f"BASE {path} has no config.json: point BASE at a transformers model directory"
            )
        else:
            _refuse_moe_hub_checkpoint(path, text)
            _refuse_custom_code(path, text, options.trust_remote_code)
            source = _BaseSource("dir", text)
    else:
        looks_local = text.startswith((".", "/", "~")) or text.endswith(".gguf") or (
            os.sep in text and text.count("/") > 1)
        if looks_local or not is_hub_id(text):
            raise MoEHubError(f"BASE {text} does not exist: pass an existing directory, .gguf "
                              f"file, a Hub model id (user/model) or 'smollm2' (the embedded "
                              f"default model)")
        source = _BaseSource("hub", text)
    if source.kind == "gguf" and options.adapter_only:
        raise MoEHubError(
            "--adapter-only needs a base that loads from its own safetensors weights, and a GGUF "
            "file has none (it is dequantised at conversion): drop --adapter-only, or convert "
            "the original Hub model instead"
        )
    return source


def _refuse_moe_hub_checkpoint(directory: Path, shown: str) -> None:
    """Read config.json as plain JSON: asking transformers would first prompt to trust the
    checkpoint's code."""
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # _dense_config reports an unreadable config with its own message
    if isinstance(config, dict) and config.get("model_type") == "moe_lora":
        dense = config.get("base_model_name_or_path") or "its dense base"
        raise MoEHubError(
            f"BASE {shown} is already a moe-hub checkpoint: fine-tune it with `moe-hub finetune "
            f"{shown} --output OUT`, or convert its dense base ({dense}) to change the router or "
            f"experts"
        )


def _refuse_custom_code(directory: Path, shown: str, trust: bool) -> None:
    """Without ``trust``, a base that only loads through the Python files it ships is refused
    here, in one line: transformers would otherwise ask "run the custom code? [y/N]" (and run it
    when stdin says y). A base whose architecture transformers knows loads with transformers' own
    code, whatever its ``auto_map`` says."""
    if trust:
        return
    try:
        config = json.loads((directory / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return  # _dense_config reports an unreadable config with its own message
    auto_map = config.get("auto_map") if isinstance(config, dict) else None
    if not auto_map:
        return
    from transformers import CONFIG_MAPPING

    if config.get("model_type") in CONFIG_MAPPING:
        return
    modules = sorted({str(ref).split("--")[-1].rsplit(".", 1)[0] + ".py"
                      for value in (auto_map.values() if isinstance(auto_map, dict) else [])
                      for ref in (value if isinstance(value, list) else [value]) if ref})
    raise MoEHubError(
        f"BASE {shown} needs its own Python code to load (config.json auto_map names "
        f"{', '.join(modules) or auto_map!r}, for model_type {config.get('model_type')!r}, which "
        f"transformers does not know): moe-hub never runs a base's code unless you pass "
        f"--trust-remote-code"
    )


def _gguf_file(source: _BaseSource) -> Path | None:
    """The GGUF file BASE names (the embedded default is downloaded on first use), else None."""
    if source.kind != "gguf":
        return None
    from .default_model import default_model_path

    return default_model_path() if source.alias else Path(source.location).expanduser()


def _gguf_config(gguf: Path) -> Any:
    """The model config in a GGUF's metadata, or None where transformers cannot read it (then
    dequantising reports why, in moe-hub's words)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                          trust_remote_code=False)
    except Exception:
        return None


def _materialise_base(
    source: _BaseSource, options: ConvertOptions, scratch: Path, gguf: Path | None,
    gguf_config: Any,
) -> tuple[Path, str, str | None, dict[str, str]]:
    """Return (local dense directory, name recorded as the base, revision recorded with it,
    provenance of a GGUF base).

    A GGUF file (``gguf``, with its config when it could be read) is dequantised into
    ``scratch``. A Hub base records the commit it was downloaded at, so an adapter-only
    checkpoint stays pinned to it."""
    if gguf is not None:
        dense = scratch / "gguf-dense"
        _gguf_to_dense(gguf, dense, gguf_config)
        return dense, gguf.name, None, gguf_provenance(gguf, source.default_model)
    if source.kind == "dir":
        return Path(source.location).expanduser(), source.location, options.revision, {}
    snapshot = _download(source.location, options.revision, options.trust_remote_code)
    _refuse_moe_hub_checkpoint(snapshot, source.location)
    _refuse_custom_code(snapshot, source.location, options.trust_remote_code)
    # snapshot_download returns .../snapshots/<commit sha>: pin the base to that commit.
    pinned = snapshot.name if re.fullmatch(r"[0-9a-f]{40}", snapshot.name) else options.revision
    return snapshot, source.location, pinned, {}


def _download(repo_id: str, revision: str | None, trust_remote_code: bool = False) -> Path:
    # The base's own code only when it may run.
    patterns = ["*.json", "*.safetensors", *TOKENIZER_PATTERNS, *(["*.py"] if trust_remote_code
                                                                  else [])]
    return download_snapshot(repo_id, revision, patterns, kind="model", role="BASE")


def _gguf_to_dense(gguf: Path, target: Path, config: Any = None) -> None:
    """Dequantise a GGUF file with transformers (needs the ``gguf`` package) into a safetensors
    directory. GGUF is one file, read whole by transformers: this path is not streamed.
    ``config``: the file's config already read (None: transformers reads it)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # One bar for this stage: the GGUF reader's (dequantising is what takes the time), not
    # also transformers' weight-loading and shard-writing bars.
    with transformers_bars_off():
        try:
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                         config=config, trust_remote_code=False)
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                      trust_remote_code=False)
        except (ValueError, OSError, KeyError, RuntimeError) as err:  # RuntimeError: shapes
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise MoEHubError(
                f"cannot read {gguf} as a transformers GGUF model: {reason}") from None
        # transformers refuses to save a model that still carries its GGUF quantizer.
        model.hf_quantizer = None
        for holder in (model.config, model.config.get_text_config()):
            if hasattr(holder, "quantization_config"):
                del holder.quantization_config
        model.save_pretrained(target)
    tokenizer.save_pretrained(target)
    del model


def _dense_config(dense_dir: Path, trust_remote_code: bool = False) -> Any:
    from transformers import AutoConfig

    try:
        # Explicit: None would let transformers prompt on stdin.
        config = AutoConfig.from_pretrained(dense_dir, trust_remote_code=trust_remote_code)
    except (ValueError, OSError, KeyError) as err:
        raise MoEHubError(f"cannot read {dense_dir / 'config.json'}: {err}") from None
    if getattr(config, "model_type", None) == "moe_lora":
        raise MoEHubError(f"{dense_dir} is already a moe-hub checkpoint: convert its dense base")
    return config.get_text_config()


# Sizes every causal LM's config states: transformers fills a missing one with its class
# default (Llama's hidden_size is 4096), which the stored weights of another model disagree with.
_REQUIRED_SIZES = ("hidden_size", "num_hidden_layers", "vocab_size")


def _missing_size(dense_dir: Path, text_config: Any) -> str | None:
    """The first of ``_REQUIRED_SIZES`` that BASE's config.json leaves out (None: all there)."""
    try:
        raw = json.loads((dense_dir / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if isinstance(raw, dict) and raw.get("model_type") != text_config.model_type:
        raw = raw.get("text_config")  # a multimodal config: the language model's part
    if not isinstance(raw, dict):
        return None
    aliases = getattr(text_config, "attribute_map", {}) or {}
    for name in _REQUIRED_SIZES:
        if hasattr(text_config, name) and name not in raw and aliases.get(name) not in raw:
            return name
    return None


def _disagreement(dense_dir: Path, text_config: Any, what: str) -> MoEHubError:
    missing = _missing_size(dense_dir, text_config)
    if missing:
        return MoEHubError(f"BASE {dense_dir / 'config.json'} has no {missing}: add the "
                           f"model's {missing} (transformers' default "
                           f"{getattr(text_config, missing)} does not fit its weights)")
    return MoEHubError(what)


def _check_base_weights(model: MoELoraForCausalLM, names: dict[str, str],
                        weight_files: list[Path], dense_dir: Path,
                        trust_remote_code: bool = False) -> NamePlan:
    """Read every shard's header (each tensor checked against itself: ``read_header``), map its
    names through transformers' conversion rules (``names``: dense module name -> model name),
    check every tensor's shape against the model built from BASE's config, and that together
    the shards hold every dense weight the model needs, before anything is written."""
    headers = {path: read_header(path)[0] for path in weight_files}
    text_config = model.config.text_config
    plan = plan_names(text_config, names, {path: tensor_names(h) for path, h in headers.items()},
                      trust_remote_code)
    shapes = {name: list(value.shape) for name, value in model.state_dict().items()}
    dense = plan.dense_model
    vocab_modules = [dense.get_input_embeddings(), dense.get_output_embeddings()]
    vocab_rows = {names.get(f"{name}.weight") for name, module in dense.named_modules()
                  if any(module is m for m in vocab_modules if m is not None)}
    for key, ours in plan.renames.items():
        path = plan.files[key]
        stored, expected = headers[path][key]["shape"], shapes.get(ours)
        if expected is None or stored == expected:
            continue
        if ours in vocab_rows and stored[1:] == expected[1:] \
                and not _missing_size(dense_dir, text_config):
            raise MoEHubError(
                f"BASE {dense_dir / 'config.json'} gives vocab_size {text_config.vocab_size}, "
                f"but {path} tensor {key!r} has {stored[0]} rows: set vocab_size to {stored[0]}"
            )
        raise _disagreement(dense_dir, text_config, (
            f"BASE {path} tensor {key!r} has shape {stored}, but BASE's config.json makes it "
            f"{expected}: the weights and config.json (hidden_size, intermediate_size, heads ...) "
            f"disagree; re-download the base model"))
    missing = sorted(set(names.values()) - plan.covered(names)
                     - set(model.tied_parameter_names()))
    if missing:
        raise _disagreement(dense_dir, text_config, (
            f"BASE lacks {len(missing)} weight(s) the model needs (e.g. {missing[0]}): the "
            f"checkpoint is incomplete or is not a {text_config.model_type} model"))
    return plan


def _write_base_shards(
    plan: NamePlan, names: dict[str, str], weight_files: list[Path], staging: Path,
    dtype: torch.dtype | None, progress: bool,
) -> dict[str, str]:
    weight_map: dict[str, str] = {}
    total = sum(path.stat().st_size for path in weight_files)
    # huggingface_hub's tqdm: the style of every other bar of a conversion (downloads, the GGUF
    # reader), and silenced by the same switches (HF_HUB_DISABLE_PROGRESS_BARS, --no-progress).
    with hub_tqdm(total=total, desc="writing base shards", unit="B", unit_scale=True,
                  unit_divisor=1024, disable=not progress) as bar:
        count = len(weight_files) + bool(plan.converted)
        for number, src in enumerate(weight_files, start=1):
            # Never "model.safetensors": transformers prefers that name over the index and would
            # not see the adapters.
            name = f"model-{number:05d}-of-{count:05d}.safetensors"
            sizes = rewrite_shard(src, staging / name, plan.renames.get, dtype,
                                  on_bytes=bar.update)
            weight_map.update(dict.fromkeys(sizes, name))
        if plan.converted:
            # Tensors a conversion rule changes (not only renames) are computed one target at a
            # time into one more shard.
            name = f"model-{count:05d}-of-{count:05d}.safetensors"
            text_config = plan.dense_model.config
            batches = (convert_tensors(item, plan, text_config, names)
                       for item in plan.converted.values())
            sizes = write_tensors(staging / name, batches, dtype)
            weight_map.update(dict.fromkeys(sizes, name))
    return weight_map


def _write_adapters(model: MoELoraForCausalLM, seed: int, staging: Path,
                    experts_from: Any = None) -> list[str]:
    """Materialise the expert and router tensors of a meta model on the CPU, initialise them
    deterministically, save them; return their names.

    The generator is seeded once and parameters are initialised in module order, so the same seed
    gives byte-identical adapters.
    """
    names = model.adapter_parameter_names()
    for name in names:
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        meta = getattr(module, attr)
        setattr(module, attr, torch.nn.Parameter(torch.empty(meta.shape, dtype=torch.float32)))
    torch.manual_seed(seed)
    model.reset_adapter_parameters()
    if experts_from:
        experts_from.apply(model)  # experts from PEFT adapters overwrite their initialised slots
    params = dict(model.named_parameters())
    adapters = {name: params[name].detach().contiguous() for name in names}
    save_file(adapters, staging / ADAPTER_WEIGHTS, metadata={"format": "pt"})
    return names


def _write_config(config: MoELoraConfig, text_config: Any, dtype: torch.dtype | None,
                  staging: Path, provenance: dict[str, str] | None = None) -> None:
    config.architectures = ["MoELoraForCausalLM"]
    config.auto_map = {
        "AutoConfig": "configuration_moe_lora.MoELoraConfig",
        "AutoModel": "modeling_moe_lora.MoELoraModel",
        "AutoModelForCausalLM": "modeling_moe_lora.MoELoraForCausalLM",
    }
    from .modeling.configuration_moe_lora import CHECKPOINT_LAYOUT

    config.checkpoint_layout = CHECKPOINT_LAYOUT  # the names _write_base_shards wrote
    base_dtype = dtype or getattr(text_config, "dtype", None) or torch.float32
    config.dtype = base_dtype
    text_config.dtype = base_dtype
    from . import __version__
    from .modeling.transformers_compat import TESTED_TRANSFORMERS

    config.moe_hub_version = __version__
    # What the shipped code names when a future transformers changes an internal it relies on.
    config.tested_transformers = list(TESTED_TRANSFORMERS)
    for key, value in (provenance or {}).items():
        # Where a GGUF base came from: the model card's base_model and license metadata.
        setattr(config, key, value)
    # The dense config remembers the folder it was read from: for a GGUF base that is this run's
    # scratch folder, a temporary path that would make every conversion's config.json differ.
    # It names the base as the checkpoint records it instead.
    text_config._name_or_path = config.base_model_name_or_path
    config.save_pretrained(staging)


def _copy_tokenizer_and_generation_config(dense_dir: Path, text_config: Any, staging: Path,
                                          trust_remote_code: bool = False) -> None:
    from transformers import AutoTokenizer, GenerationConfig

    try:
        AutoTokenizer.from_pretrained(dense_dir, trust_remote_code=trust_remote_code
                                      ).save_pretrained(staging)
    except (OSError, ValueError, TypeError, KeyError):
        pass  # tiny test models and some bases ship no tokenizer; the checkpoint works without
    if (dense_dir / "generation_config.json").is_file():
        shutil.copy2(dense_dir / "generation_config.json", staging / "generation_config.json")
    else:
        GenerationConfig.from_model_config(text_config).save_pretrained(staging)


__all__ = ["ConvertOptions", "convert"]
