"""``nn.DataParallel``'s replication (what Trainer uses on several GPUs without a launcher): a
replica runs its own modules and parameters, the shared routing modules included.

torch's ``replicate`` runs as DataParallel runs it; only its CUDA broadcast is replaced by copies
on the CPU, and the copies are CHANGED (each parameter plus a perturbation, still differentiable
back to the original as the broadcast is): a replica that ran any of the original's modules
instead of its own would compute with the unchanged values."""

from __future__ import annotations

import copy
import importlib

import pytest
import torch
from test_routers import build, ids, perturb, rel_err

# The module: torch.nn.parallel exports its function under the same name.
replicate_module = importlib.import_module("torch.nn.parallel.replicate")



def _changed_copies(deltas: dict[torch.Tensor, torch.Tensor]):
    def broadcast(tensors, devices, detach=False):
        copies = [t.detach() + deltas[t] if detach else t * 1.0 + deltas[t] for t in tensors]
        return [copies for _ in devices]

    return broadcast


@torch.no_grad()
def _deltas(model: torch.nn.Module, seed: int = 7) -> dict[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    deltas = {}
    for tensor in [*model.parameters(), *model.buffers()]:
        change = torch.randn(tensor.shape, generator=generator) * 0.05 * tensor.abs().mean()
        deltas[tensor] = change.to(tensor.dtype) if tensor.is_floating_point() else \
            torch.zeros_like(tensor)
    return deltas


@pytest.mark.parametrize(("router", "granularity"), [
    ("topk", "linear"), ("rmoe", "linear"), ("hypermoe", "linear"), ("graphmoe", "block"),
])
def test_replica_runs_its_own_modules(monkeypatch: pytest.MonkeyPatch, router: str,
                                      granularity: str) -> None:
    model = perturb(build(router, granularity)).train()
    tokens = ids(2, 9, seed=12)
    deltas = _deltas(model)
    # What the replica must compute: a model holding the changed values.
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for mine, theirs in zip([*model.parameters(), *model.buffers()],
                                [*reference.parameters(), *reference.buffers()], strict=True):
            theirs.add_(deltas[mine])
    torch.manual_seed(0)  # HyperMoE's noisy gate draws the same noise in both
    want = reference(tokens, labels=tokens)
    want.loss.backward()
    with torch.no_grad():
        original = model(tokens).logits

    monkeypatch.setattr(replicate_module, "_broadcast_coalesced_reshape", _changed_copies(deltas))
    # "device 0": the patched broadcast makes its copies on the CPU.
    (replica,) = replicate_module.replicate(model, [0])
    torch.manual_seed(0)
    got = replica(tokens, labels=tokens)
    assert rel_err(got.logits, want.logits) < 1e-6
    assert rel_err(got.logits, original) > 1e-3  # the changes show in the output
    assert rel_err(got.aux_loss, want.aux_loss) < 1e-6
    with torch.no_grad():  # and the original still computes with its own values
        assert torch.equal(model(tokens).logits, original)
    # Gradients reach the original parameters through the replica's copies, as in DataParallel.
    got.loss.backward()
    for (name, param), theirs in zip(model.named_parameters(), reference.parameters(),
                                     strict=True):
        if theirs.grad is None:
            assert param.grad is None, name
            continue
        assert rel_err(param.grad, theirs.grad) < 1e-5, name
