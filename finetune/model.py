"""The finetuned model: extract's Backbone + probe's head, and which parts of it train.

Freeze policies (the study's scenarios and its partial unfreezing, docs/protocol.md §4):
- `none`: everything trains (the unfrozen scenarios);
- `all`: only the head trains (the frozen scenarios, trained end to end on live images);
- `last-K`: the head and the last K of `backbone.blocks` train; the stem, earlier blocks and the
  readout (e.g. a ViT's final norm) stay as loaded.
An adapter (`--adapter`, `training.adapters`) goes with `all`: the backbone stays as loaded, and the adapter's layers and
the head train. Frozen parts are kept in eval mode whatever `train()` is called with, so BatchNorm statistics
and dropout of a frozen part never change; an adapter's layers follow `train()` (LoRA's dropout).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from common.errors import MedfmError
from extract.backbones import Backbone
from training.adapters import AdapterSpec, adapter_keys, attach, saved_keys
from training.heads import build_head, get_head


@dataclass(frozen=True)
class FreezePolicy:
    """`none`, `all` or `last-K`, parsed once; `trainable_blocks` is K (None: every block, 0: none)."""

    text: str
    trainable_blocks: int | None

    @classmethod
    def parse(cls, text: str) -> FreezePolicy:
        if text == "none":
            return cls(text, None)
        if text == "all":
            return cls(text, 0)
        match = re.fullmatch(r"last-(\d+)", text)
        if not match or int(match.group(1)) < 1:
            raise MedfmError(f"--freeze must be none, all or last-K with K >= 1 (e.g. last-2), got '{text}'")
        return cls(text, int(match.group(1)))

    @property
    def frozen_backbone(self) -> bool:
        """True when the backbone does not train at all (the study's frozen scenarios)."""
        return self.trainable_blocks == 0


class FinetuneModel(nn.Module):
    """images -> backbone -> pooled (linear head) or tokens (DeiT head) -> logits."""

    def __init__(self, backbone: Backbone, head: nn.Module, head_kind: str, freeze: FreezePolicy) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.head_input = get_head(head_kind).reads
        self.freeze = freeze
        self._trainable_backbone = _trainable_backbone_parts(backbone, freeze)
        for p in backbone.parameters():
            p.requires_grad_(False)
        for part in self._trainable_backbone:
            for p in part.parameters():
                p.requires_grad_(True)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        features = self.backbone(images)
        return self.head(getattr(features, self.head_input))

    def adapt(self, spec: AdapterSpec, name: str) -> None:
        """Attach an adapter to the (frozen) backbone: its layers train, the backbone's own weights stay as loaded."""
        if not self.freeze.frozen_backbone:
            raise MedfmError(f"--adapter trains the adapter and the head on a frozen backbone; --freeze {self.freeze.text} cannot "
                             "go with it (leave --freeze out)")
        self._trainable_backbone = attach(self.backbone, spec, name)

    @property
    def adapter_params(self) -> set[str]:
        """Names of the adapter's parameters (empty without one)."""
        keys = {f"backbone.{k}" for k in adapter_keys(self.backbone)} if hasattr(self.backbone, "attached_adapter") else set()
        return {n for n, _ in self.named_parameters() if n in keys}

    def saved_state(self) -> dict[str, torch.Tensor]:
        """What a checkpoint and best.pt keep: everything, or with an adapter only the adapter and the head (the base
        weights are the run's own weights file, or its seeded random start)."""
        state = self.state_dict()
        if not hasattr(self.backbone, "attached_adapter"):
            return state
        keep = saved_keys(self)
        return {k: v for k, v in state.items() if k in keep}

    def train(self, mode: bool = True) -> FinetuneModel:
        """Train mode for the trainable parts only: frozen backbone parts always run in eval mode."""
        super().train(mode)
        self.backbone.eval()
        for part in self._trainable_backbone:
            part.train(mode)
        return self


def _trainable_backbone_parts(backbone: Backbone, freeze: FreezePolicy) -> list[nn.Module]:
    if freeze.trainable_blocks is None:
        return [backbone]
    blocks = list(backbone.blocks)
    if freeze.trainable_blocks > len(blocks):
        raise MedfmError(f"--freeze {freeze.text}: this backbone has only {len(blocks)} blocks; use last-{len(blocks)} or none")
    return blocks[len(blocks) - freeze.trainable_blocks:] if freeze.trainable_blocks else []


def build_model(backbone: Backbone, head_kind: str, num_outputs: int, freeze: FreezePolicy, protocol: str = "medfm",
                adapter: AdapterSpec | None = None, name: str = "the backbone", **head_options: Any) -> FinetuneModel:
    """The backbone with a head (from probe's registry) sized from the feature it reads; `head_options` are the head's own;
    `adapter` is attached after the head is built (`name`: the backbone's, for messages)."""
    row_shape = (backbone.pooled_dim,) if get_head(head_kind).reads == "pooled" else backbone.token_shape()
    head = build_head(head_kind, row_shape, num_outputs, protocol=protocol, **head_options)
    model = FinetuneModel(backbone, head, head_kind, freeze)
    if adapter is not None:
        model.adapt(adapter, name)
    return model


def freeze_unused(model: nn.Module, example: torch.Tensor) -> list[str]:
    """Stop training parameters that get no gradient from this head (e.g. a CLIP projection when the DeiT
    head reads the tokens); DDP requires every trained parameter to take part. Returns their names.

    One forward/backward in eval mode on `example`: nothing is updated and no running statistic moves.
    """
    was_training = model.training
    model.eval()
    model(example).float().sum().backward()
    unused = []
    for name, p in model.named_parameters():
        if p.requires_grad and p.grad is None:
            p.requires_grad_(False)
            unused.append(name)
        p.grad = None
    model.train(was_training)
    return unused
