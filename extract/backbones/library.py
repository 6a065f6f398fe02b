"""A library's vision model behind medfm's `Backbone`, with what the family modules declare by hand worked out from
the model itself (`extract/backbones/by_name.py` builds one for `timm:`, `open_clip:` and `hf:` names).

- The last block's features are the library's own forward (`run`): its pooled feature (CLS, mean, attention pool,
  projection: whatever the model's head does) and its final token sequence or feature map.
- Block K's features are the same forward with the model cut after block K: every block slot is replaced, for that
  forward, by a stand-in that returns block K's output (captured by a hook during the full pass), so the library's own
  code applies its final norm, pooling and projection to it. Only the stem and the tail run again. Where the tail
  cannot take block K's output (a hierarchical model whose head expects the last stage's width), block K's pooled
  feature is the mean of its tokens, said once.
- Tokens are patch tokens only: the leading prefix tokens (CLS, distillation, registers) are dropped; a feature map
  is flattened row-major.
- `readout=cls|mean` and `prefix_tokens=N` (constructor overrides, `--override` on the command line) replace what
  was worked out, for a model whose output structure cannot be read.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

from common.errors import MedfmError
from extract.backbones.base import Backbone, DataConfig, Features

READOUTS = ("model", "cls", "mean")
MEDFM_OPTIONS = ("readout", "prefix_tokens")  # constructor overrides that are medfm's, never the library's


class Outputs(NamedTuple):
    """What the library's own forward gives: the pooled feature [B, D] and the final sequence [B, T, D] or feature
    map ([B, C, H, W] or [B, H, W, C]); `final` None: the last block's output is the final one (no norm after it);
    `pooled` None: the model has no pooled output, and medfm takes the CLS token where there is a prefix token, else
    the mean of the patch tokens."""

    pooled: torch.Tensor | None
    final: torch.Tensor | None


Run = Callable[[nn.Module, torch.Tensor], Outputs]


class Inject(nn.Module):
    """Stands in for a block while the model is cut: returns block K's captured output, whatever it is given."""

    def __init__(self, value: Any) -> None:
        super().__init__()
        self.value = value

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.value


@dataclass
class Worked:
    """What `LibraryBackbone.work_out` found, for `describe` and the check receipt."""

    pooled_dim: int = 0
    token_dim: int = 0
    tokens: int = 0
    prefix_tokens: int = 0
    mean_pooled_blocks: tuple[int, ...] = ()  # blocks whose pooled feature is the mean of their tokens


def take_medfm_options(overrides: dict[str, Any]) -> dict[str, Any]:
    """Pop medfm's own options out of the constructor overrides (the rest reach the library), checked."""
    options = {k: overrides.pop(k) for k in MEDFM_OPTIONS if k in overrides}
    readout = options.get("readout", "model")
    if readout not in READOUTS:
        raise MedfmError(f"readout={readout} is not a readout; use one of {', '.join(READOUTS)}")
    if "prefix_tokens" in options:
        try:
            options["prefix_tokens"] = int(options["prefix_tokens"])
        except (TypeError, ValueError):
            raise MedfmError(f"prefix_tokens={options['prefix_tokens']} must be a whole number of tokens") from None
        if options["prefix_tokens"] < 0:
            raise MedfmError(f"prefix_tokens={options['prefix_tokens']} must be 0 or more")
    return options


def first_tensor(value: Any) -> torch.Tensor:
    """A block's output as a tensor: the tensor itself, or the first of a tuple (older HF layers) or a model output."""
    while not isinstance(value, torch.Tensor):
        if isinstance(value, (tuple, list)) and value:
            value = value[0]
        elif hasattr(value, "last_hidden_state"):
            value = value.last_hidden_state
        else:
            raise MedfmError(f"a block returned {type(value).__name__}, not a tensor; medfm cannot read its output")
    return value


def find_input_conv(model: nn.Module, preferred: str | None = None) -> str:
    """The path of the 3-channel input convolution: `preferred` when it is one, else the first such conv; "" if none."""
    if preferred:
        try:
            conv = model.get_submodule(preferred)
        except AttributeError:
            conv = None
        if isinstance(conv, nn.Conv2d) and conv.in_channels == 3:
            return preferred
    return next((path for path, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.in_channels == 3), "")


_SAID: set[str] = set()


def say_once(key: str, line: str) -> None:
    """One line on stderr, once per process for `key` (what a library backbone's features are, said where it is built)."""
    if key not in _SAID:
        _SAID.add(key)
        print(line, file=sys.stderr)


class LibraryBackbone(Backbone):
    """A library model as medfm's Backbone: `run` is the library's own forward, `slots` the paths of its blocks in order."""

    def __init__(self, model: nn.Module, *, name: str, data_config: DataConfig, run: Run, slots: Sequence[str],
                 first_conv: str, patch_size: int | None = None, prefix_tokens: int | None = None,
                 map_format: str = "NCHW", readout: str = "model", pooled_rule: str = "", library_kwargs: dict | None = None,
                 protocol: str = "medfm") -> None:
        super().__init__(data_config, 0, 0, protocol)
        self.model = model
        self.name = name
        self.run = run
        self.slots = tuple(slots)
        self.first_conv = f"model.{first_conv}" if first_conv else "model"
        self.patch_size = patch_size
        self.declared_prefix = prefix_tokens  # the library's own count (timm's num_prefix_tokens), or the user's
        self.prefix_tokens = prefix_tokens or 0
        self.map_format = map_format
        self.readout_rule = readout
        self.pooled_rule = pooled_rule if readout == "model" else {"cls": "the first token of the final sequence (readout=cls)",
                                                                    "mean": "the mean of the patch tokens (readout=mean)"}[readout]
        self.library_kwargs = dict(library_kwargs or {})  # what the library's constructor got (the check's reference too)
        self.worked = Worked()
        self._mean_pooled: set[int] = set()

    # --- blocks ----------------------------------------------------------------------------------------------------
    @property
    def blocks(self) -> list[nn.Module]:  # type: ignore[override]
        """The model's blocks in order (`--layers`, `finetune --freeze last-K`); the whole model when none were found."""
        return [self.model.get_submodule(p) for p in self.slots] if self.slots else [self.model]

    def _set_slot(self, path: str, module: nn.Module) -> None:
        parent, _, attr = path.rpartition(".")
        setattr(self.model.get_submodule(parent) if parent else self.model, attr, module)

    @contextmanager
    def _cut_after(self, value: Any) -> Iterator[None]:
        """The model as if it ended at the block whose output is `value`: every slot returns it."""
        originals = [self.model.get_submodule(p) for p in self.slots]
        try:
            for path in self.slots:
                self._set_slot(path, Inject(value))
            yield
        finally:
            for path, module in zip(self.slots, originals, strict=True):
                self._set_slot(path, module)

    # --- features --------------------------------------------------------------------------------------------------
    def tokens_of(self, final: torch.Tensor) -> torch.Tensor:
        """Patch tokens [B, T, D] of a final sequence (prefix tokens dropped) or feature map (flattened row-major)."""
        if final.ndim == 3:
            return final[:, self.prefix_tokens:]
        if final.ndim == 4:
            return final.flatten(1, 2) if self.map_format == "NHWC" else final.flatten(2).transpose(1, 2)
        raise MedfmError(f"{self.name}'s final output has shape {tuple(final.shape)}, neither tokens nor a feature map; "
                         "medfm cannot tell its tokens: use `extract run --no-tokens` and a linear head")

    def _features(self, out: Outputs, raw_last: Any) -> Features:
        final = out.final if out.final is not None else first_tensor(raw_last)
        tokens = self.tokens_of(final)
        if self.readout_rule == "cls":
            pooled = final[:, 0] if final.ndim == 3 else tokens.mean(1)
        elif self.readout_rule == "mean":
            pooled = tokens.mean(1)
        elif out.pooled is None:  # the model pools nothing itself
            pooled = final[:, 0] if final.ndim == 3 and self.prefix_tokens > 0 else tokens.mean(1)
        else:
            pooled = out.pooled
            if pooled.ndim == 4 and pooled.shape[-2:] == (1, 1):  # a pooled map (HF CNNs): [B, C, 1, 1]
                pooled = pooled.flatten(1)
        return Features(pooled, tokens)

    def _block_features(self, x: torch.Tensor, index: int, raw: Any) -> Features:
        if index not in self._mean_pooled:
            with self._cut_after(raw):
                return self._features(self.run(self.model, x), raw)
        tokens = self.tokens_of(first_tensor(raw))
        return Features(tokens.mean(1), tokens)

    def forward_layers(self, x: torch.Tensor, layers: Sequence[int] = (-1,)) -> dict[int, Features]:
        """One pass of the library's forward with hooks on the wanted blocks; block K < last then runs the model cut after K."""
        wanted = self.resolve_layers(layers)
        last = self.num_layers - 1
        raw: dict[int, Any] = {}
        hooks = []
        if self.slots:
            for i in wanted:
                hooks.append(self.blocks[i].register_forward_hook(lambda _m, _a, out, i=i: raw.__setitem__(i, out)))
        try:
            out = self.run(self.model, x)
        finally:
            for hook in hooks:
                hook.remove()
        return {i: self._features(out, raw.get(i)) if i == last else self._block_features(x, i, raw[i]) for i in wanted}

    def stem(self, x: torch.Tensor) -> torch.Tensor:  # forward_layers runs the library's own forward instead
        raise NotImplementedError("a library backbone runs its library's forward (forward_layers)")

    def readout(self, h: torch.Tensor, index: int) -> Features:
        raise NotImplementedError("a library backbone runs its library's forward (forward_layers)")

    # --- one channel -----------------------------------------------------------------------------------------------
    def use_one_channel(self) -> None:
        """The pretrained R-channel kernel (the study's recipe), and the embedding told it now takes one channel."""
        if self.first_conv == "model":
            raise MedfmError(f"{self.name} has no 3-channel input convolution medfm can rebuild; use --in-chans 3")
        super().use_one_channel()
        parent = self.get_submodule(self.first_conv.rpartition(".")[0])
        if isinstance(getattr(parent, "num_channels", None), int):  # HF patch embeddings check the channel count
            parent.num_channels = 1

    # --- working out -----------------------------------------------------------------------------------------------
    def work_out(self) -> LibraryBackbone:
        """Run the model once on zeros at its input size: dims, prefix tokens, which blocks the tail can read; or one
        line saying what cannot be worked out and which option to give."""
        size = self.data_config.input_size
        device = next(self.model.parameters()).device
        x = torch.zeros(1, 3, size, size, device=device)
        with torch.inference_mode():
            try:
                raw: dict[int, Any] = {}
                hooks = [b.register_forward_hook(lambda _m, _a, out, i=i: raw.__setitem__(i, out))
                         for i, b in enumerate(self.blocks)] if self.slots else []
                try:
                    out = self.run(self.model, x)
                finally:
                    for hook in hooks:
                        hook.remove()
            except (RuntimeError, ValueError, AssertionError, TypeError) as err:
                raise MedfmError(f"{self.name} cannot take {size}-px inputs ({_first_line(err)}); "
                                 "use --image-size with the model's own size") from None
            final = out.final if out.final is not None else first_tensor(raw.get(self.num_layers - 1))
            self.prefix_tokens = self._prefix(final, size)
            if out.pooled is None and self.readout_rule == "model":
                self.pooled_rule = ("the first (CLS) token of the final sequence" if final.ndim == 3 and self.prefix_tokens else
                                    "the mean of the patch tokens") + " (the model has no pooled output)"
            last = self._features(out, raw.get(self.num_layers - 1))
            if last.pooled.ndim != 2:
                raise MedfmError(f"{self.name}'s pooled output has shape {tuple(last.pooled.shape)}, not [batch, dim]; "
                                 "pass --override readout=cls or readout=mean")
            for i in range(self.num_layers - 1):
                try:
                    with self._cut_after(raw[i]):
                        f = self._features(self.run(self.model, x), raw[i])
                    ok = f.pooled.ndim == 2
                except (RuntimeError, ValueError, AssertionError, TypeError, IndexError):
                    ok = False
                if not ok:
                    self._mean_pooled.add(i)
        self.pooled_dim, self.token_dim = last.pooled.shape[-1], last.tokens.shape[-1]
        self.worked = Worked(self.pooled_dim, self.token_dim, last.tokens.shape[1], self.prefix_tokens, tuple(sorted(self._mean_pooled)))
        return self

    def _prefix(self, final: torch.Tensor, size: int) -> int:
        if final.ndim != 3:
            return 0
        count = final.shape[1]
        grid = (size // self.patch_size) ** 2 if self.patch_size else None
        if self.declared_prefix is not None:
            if grid is not None and count - self.declared_prefix != grid:
                raise MedfmError(f"{self.name} returns {count} tokens, and {self.declared_prefix} prefix tokens leave "
                                 f"{count - self.declared_prefix}, not its {grid} patches; pass --override prefix_tokens="
                                 f"{count - grid if count >= grid else 'N'}")
            return self.declared_prefix
        if grid is None or count < grid:
            raise MedfmError(f"medfm cannot tell which of {self.name}'s {count} output tokens are patch tokens; "
                             "pass --override prefix_tokens=N (N leading tokens are dropped)")
        return count - grid

    def describe(self) -> str:
        """What was worked out, in one line (said once when built, and written in the check receipt)."""
        w = self.worked
        prefix = f" ({w.prefix_tokens} prefix token{'s' if w.prefix_tokens != 1 else ''} dropped)" if w.prefix_tokens else ""
        mean_blocks = (f"; blocks {', '.join(map(str, w.mean_pooled_blocks))}: pooled = mean of their tokens (the head "
                       "takes only the last block's output)") if w.mean_pooled_blocks else ""
        cfg = self.data_config
        return (f"{self.name}: pooled {w.pooled_dim} = {self.pooled_rule}; tokens {w.tokens} x {w.token_dim}, patch tokens "
                f"only{prefix}; {self.num_layers} blocks{mean_blocks}; input {cfg.input_size} px, mean "
                f"{tuple(round(v, 4) for v in cfg.mean)}, std {tuple(round(v, 4) for v in cfg.std)}, {cfg.interpolation}")


def _first_line(err: BaseException) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= 300 else text[:300] + " ..."
