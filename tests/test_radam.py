"""flowdiag's RAdam: torch.optim.RAdam(foreach=True)'s numbers bit for bit, and its state dicts."""

from __future__ import annotations

import copy

import torch

from flowdiag.train.radam import RAdam


def _params(seed: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(50, generator=generator), torch.randn(3, 4, generator=generator)]


def _train(optimizer, params: list[torch.Tensor], steps: int, seed: int) -> None:
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=generator)
        optimizer.step()


def test_the_same_updates_as_torch_radam_bit_for_bit() -> None:
    ours, theirs = _params(0), _params(0)
    for p in ours + theirs:
        p.requires_grad_()
    # 30 steps cross rho_t > 5 (step 6): both the momentum-only and the rectified updates are compared.
    _train(RAdam(ours, lr=1e-3), ours, 30, seed=1)
    _train(torch.optim.RAdam(theirs, lr=1e-3, foreach=True), theirs, 30, seed=1)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)


def test_state_dicts_load_into_either_and_resume_the_same() -> None:
    reference = _params(2)
    torch_opt = torch.optim.RAdam(reference, lr=1e-2, foreach=True)
    _train(torch_opt, reference, 8, seed=3)

    # torch's state into ours (a checkpoint from before this optimizer), then both go on alike.
    resumed = [p.detach().clone() for p in reference]
    ours = RAdam(resumed, lr=123.0)
    ours.load_state_dict(torch_opt.state_dict())
    assert ours.param_groups[0]["lr"] == 1e-2 and float(ours.state[resumed[0]]["step"]) == 8
    _train(torch_opt, reference, 5, seed=4)
    _train(ours, resumed, 5, seed=4)
    for a, b in zip(resumed, reference, strict=True):
        assert torch.equal(a, b)

    # ours into torch's.
    again = [p.detach().clone() for p in resumed]
    torch_again = torch.optim.RAdam(again, lr=1.0, foreach=True)
    torch_again.load_state_dict(copy.deepcopy(ours.state_dict()))  # torch keeps what it is given
    _train(torch_again, again, 3, seed=5)
    _train(ours, resumed, 3, seed=5)
    for a, b in zip(resumed, again, strict=True):
        assert torch.equal(a, b)


def test_zero_grad_and_parameters_without_gradients() -> None:
    params = _params(6)
    optimizer = RAdam(params, lr=1e-3)
    before = [p.clone() for p in params]
    params[0].grad = torch.ones_like(params[0])
    optimizer.step()  # params[1] has no gradient: left alone, no state made for it
    assert not torch.equal(params[0], before[0]) and torch.equal(params[1], before[1])
    assert params[1] not in optimizer.state
    optimizer.zero_grad(set_to_none=False)
    assert params[0].grad is not None and not params[0].grad.any()
    optimizer.zero_grad()
    assert params[0].grad is None
