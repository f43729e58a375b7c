"""Grow a trained language model without changing what it computes, so a bigger model continues from trained weights.

Depth: new decoder layers are copies of the layer before them with their two output projections (attention o_proj,
MLP down_proj) set to zero, so each new layer adds nothing to the residual stream until training moves those
projections (block expansion, as LLaMA Pro does). Width: new MLP units get fresh gate / up rows and zero down_proj
columns, so they too add nothing at first. Everything outside the language model's layers is copied unchanged.
"""

from __future__ import annotations

import re

import torch

GROWABLE = ("num_hidden_layers", "intermediate_size")  # the text_config entries grow() can change
_LAYER = re.compile(r"^(.*language_model\.layers\.)(\d+)(\..*)$")
_ZEROED = (".self_attn.o_proj.", ".mlp.down_proj.")  # a new layer's outputs into the residual stream


def layer_sources(old: int, new: int) -> list[tuple[int, bool]]:
    """For each of `new` layers, (old layer it starts from, whether it is an inserted copy). The copies are spread
    evenly: 8 -> 12 inserts one after layers 1, 3, 5 and 7."""
    if not 0 <= new - old <= old:
        raise ValueError(f"cannot grow {old} layers to {new}: grow by 0 to {old} layers")
    after = {(k + 1) * old // (new - old) - 1 for k in range(new - old)} if new > old else set()
    sources = []
    for i in range(old):
        sources.append((i, False))
        if i in after:
            sources.append((i, True))
    return sources


def _depth(state: dict) -> int:
    return 1 + max(int(m.group(2)) for k in state if (m := _LAYER.match(k)))


def grow(small: torch.nn.Module, big: torch.nn.Module, seed: int, std: float = 0.02) -> None:
    """Load `small`'s weights into `big` (the same architecture with more layers and / or a wider MLP), so that
    `big` computes what `small` does. `big`'s own weights are overwritten except the fresh MLP rows."""
    small_state, big_state = small.state_dict(), big.state_dict()
    sources = layer_sources(_depth(small_state), _depth(big_state))
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, target in big_state.items():
            m = _LAYER.match(name)
            copy = False
            if m:
                old, copy = sources[int(m.group(2))]
                name_small = f"{m.group(1)}{old}{m.group(3)}"
            else:
                name_small = name
            source = small_state[name_small]
            if copy and any(part in name for part in _ZEROED):
                target.zero_()
                continue
            if source.shape == target.shape:
                target.copy_(source)
            elif any(s > t for s, t in zip(source.shape, target.shape)):
                raise ValueError(f"{name}: cannot shrink {tuple(source.shape)} to {tuple(target.shape)}")
            elif name.endswith((".mlp.gate_proj.weight", ".mlp.up_proj.weight")):  # [I', H]: fresh rows
                target.copy_(torch.randn(target.shape, generator=generator) * std)
                target[: source.shape[0]] = source
            elif name.endswith(".mlp.down_proj.weight"):  # [H, I']: zero columns, the new units add nothing
                target.zero_()
                target[:, : source.shape[1]] = source
            else:
                raise ValueError(f"{name}: {tuple(source.shape)} cannot grow to {tuple(target.shape)}")
