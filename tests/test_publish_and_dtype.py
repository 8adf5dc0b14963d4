"""Failures outside the code's control leave the user's files and the process's state as they
were: a failed publish puts the old checkpoint back, and building a model never touches torch's
process-wide default dtype, which other threads read."""

from __future__ import annotations

import os
import threading
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import tiny_config
from torch.overrides import TorchFunctionMode

from moe_hub.checkpoint import publish
from moe_hub.errors import MoEHubError
from moe_hub.modeling import MoELoraConfig, MoELoraForCausalLM


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_publish_puts_the_old_checkpoint_back_when_the_new_one_cannot_move_in(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out, staging = tmp_path / "out", tmp_path / ".out.staging"
    (out / "sub").mkdir(parents=True)
    (out / "config.json").write_text('{"old": true}')
    (out / "sub" / "weights.bin").write_bytes(b"\x00old")
    staging.mkdir()
    (staging / "config.json").write_text('{"new": true}')
    before = _tree(out)
    real_replace, calls = os.replace, []

    def replace(src: os.PathLike, dst: os.PathLike) -> None:
        calls.append((Path(src), Path(dst)))
        if len(calls) == 2:  # moving the new checkpoint in: what a full disk or EXDEV does
            raise OSError(28, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="No space left"):
        publish(staging, out, overwrite=True)
    assert calls[1] == (staging, out)
    assert _tree(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [".out.staging", "out"]


def test_publish_replaces_an_old_checkpoint_and_refuses_without_overwrite(
        tmp_path: Path) -> None:
    out, staging = tmp_path / "out", tmp_path / ".out.staging"
    out.mkdir()
    (out / "config.json").write_text("old")
    staging.mkdir()
    (staging / "config.json").write_text("new")
    with pytest.raises(MoEHubError, match="--overwrite"):
        publish(staging, out, overwrite=False)
    publish(staging, out, overwrite=True)
    assert (out / "config.json").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


class _ProbeFactories(TorchFunctionMode):
    """In the thread that enters it, hands over to ``probe`` before every tensor factory call
    that takes torch's default dtype (TorchFunctionMode stacks are per thread)."""

    def __init__(self, probe: Callable[[], None]) -> None:
        super().__init__()
        self.probe = probe

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _FACTORIES and kwargs.get("dtype") is None:
            self.probe()
        return func(*args, **kwargs)


_FACTORIES = {torch.empty, torch.zeros, torch.ones, torch.rand, torch.randn, torch.full}


def test_building_a_model_never_changes_the_default_dtype_other_threads_see() -> None:
    """A model built under default dtype bfloat16 still gets float32 routers, and another thread
    creating tensors meanwhile gets bfloat16 ones throughout: the default dtype is process-wide,
    so switching it, even briefly, changes what every other thread creates. The builder stops
    before each of its factory calls while the main thread creates a tensor, so every moment of
    the build where the default dtype matters is sampled."""
    previous = torch.get_default_dtype()
    config = MoELoraConfig(text_config=tiny_config("llama").to_dict(), router="rmoe",
                           router_config={"hidden_size": 16}, num_experts=4, lora_rank=4)
    turn = threading.Barrier(2, timeout=120)
    state: dict = {"done": False, "model": None, "error": None}

    def probe() -> None:
        turn.wait()  # the main thread creates its tensor now
        turn.wait()

    def build() -> None:
        try:
            with _ProbeFactories(probe):
                state["model"] = MoELoraForCausalLM(config)
        except BaseException as err:  # reported by the main thread
            state["error"] = err
        finally:
            state["done"] = True
            turn.wait()

    seen: list[torch.dtype] = []
    torch.set_default_dtype(torch.bfloat16)
    try:
        builder = threading.Thread(target=build)
        builder.start()
        while True:
            turn.wait()
            if state["done"]:
                break
            seen.append(torch.empty(0).dtype)
            turn.wait()
        builder.join()
    finally:
        torch.set_default_dtype(previous)
    if state["error"] is not None:
        raise state["error"]
    model = state["model"]
    assert len(seen) >= len(model.routing_sites) and set(seen) == {torch.bfloat16}, Counter(seen)
    routing = {n: p for n, p in model.named_parameters()
               if ".router." in n or n.startswith("moe_shared.")}
    assert routing and {p.dtype for p in routing.values()} == {torch.float32}
    # Initialised in float32, as in a float32 process: not bfloat16 values widened.
    random = [n for n, p in routing.items() if p.detach().abs().sum() > 0]
    assert random and all(torch.ne(routing[n].detach(), routing[n].detach().bfloat16().float())
                          .any() for n in random)
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
