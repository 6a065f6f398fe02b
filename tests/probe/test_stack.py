"""Heads stacked for a sweep train exactly as each would alone under torch's AdamW and clip_grad_norm_."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from probe.stack import LinearStack, ModuleStack
from training.heads import LinearHead
from training.recipe import param_groups, warmup_then_constant

LRS = [1e-3, 3e-2, 1e-1]
WEIGHT_DECAYS = [0.0, 1e-2, 0.5]


def heads(dim: int = 6, classes: int = 3, alike: bool = False) -> list[LinearHead]:
    """Heads that standardize their input alike (a sweep's), or one of them differently."""
    torch.manual_seed(0)
    made = [LinearHead(dim, classes) for _ in LRS]
    for head in made if alike else made[1:2]:
        head.standardize(torch.linspace(-1, 1, dim), torch.linspace(0.5, 2, dim))
    return made


def train_alone(head: LinearHead, lr: float, wd: float, batches: list, clip: float) -> LinearHead:
    """The reference: torch's AdamW with the recipe's groups and torch's clipping, one head."""
    optimizer = torch.optim.AdamW([dict(g, lr=lr) for g in param_groups(head, wd)], lr=lr)
    scheduler = warmup_then_constant(optimizer, 3)
    for x, y in batches:
        optimizer.zero_grad()
        nn.functional.cross_entropy(head(x), y).backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), clip)
        optimizer.step()
        scheduler.step()
    return head


@pytest.mark.parametrize("alike", [True, False])  # one input for all heads, or one per head
@pytest.mark.parametrize("clip", [1e-3, 1e3])  # clipping that bites on every step, and that never does
def test_linear_stack_with_stacked_adamw_equals_each_head_trained_alone(clip, alike):
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(8, 6, generator=generator) * 3, torch.randint(0, 3, (8,), generator=generator)) for _ in range(8)]
    alone = [train_alone(copy.deepcopy(h), lr, wd, batches, clip) for h, lr, wd in zip(heads(alike=alike), LRS, WEIGHT_DECAYS, strict=True)]

    stack = LinearStack(heads(alike=alike))
    assert stack.shared_input == alike
    optimizer = stack.optimizer(LRS, WEIGHT_DECAYS)
    scheduler = warmup_then_constant(optimizer, 3)
    for x, y in batches:
        optimizer.zero_grad()
        logits = stack(x)  # [H, B, C]
        sum(nn.functional.cross_entropy(logits[k], y) for k in range(len(LRS))).backward()
        stack.clip_grad_norm_(clip)
        optimizer.step()
        scheduler.step()

    for k, reference in enumerate(alone):
        state = stack.head_state(k)
        torch.testing.assert_close(state, reference.state_dict(), rtol=1e-5, atol=1e-6)
        assert stack.head_lr(optimizer, k) == pytest.approx(LRS[k])
    moved = [float((s.linear.weight - r.linear.weight).abs().max().detach()) for s, r in zip(heads(alike=alike), alone, strict=True)]
    assert min(moved) > 1e-4  # every head actually trained


@pytest.mark.parametrize("alike", [True, False])
def test_head_state_round_trips_into_a_linear_head_and_back(alike):
    stack = LinearStack(heads(alike=alike))
    state = stack.head_state(1)
    head = LinearHead(6, 3)
    head.load_state_dict(state)
    x = torch.randn(4, 6)
    torch.testing.assert_close(head(x), stack(x)[1])
    stack.load_head_state(0, state)
    torch.testing.assert_close(stack(x)[0], stack(x)[1])


def test_module_stack_gives_each_head_its_own_groups_and_state():
    stack = ModuleStack(heads())
    optimizer = stack.optimizer(LRS, WEIGHT_DECAYS)
    assert [stack.head_lr(optimizer, k) for k in range(3)] == LRS
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.0, 0.0, 1e-2, 0.0, 0.5, 0.0]
    assert stack(torch.randn(5, 6)).shape == (3, 5, 3)
    assert set(stack.head_state(2)) == set(LinearHead(6, 3).state_dict())


def test_loading_a_differently_standardized_head_leaves_the_shared_input_path():
    stack = LinearStack(heads(alike=True))
    other = LinearHead(6, 3)
    stack.load_head_state(2, other.state_dict())
    x = torch.randn(4, 6)
    assert not stack.shared_input
    torch.testing.assert_close(stack(x)[2], other(x))
