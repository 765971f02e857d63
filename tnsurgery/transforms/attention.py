"""The built-in split ``multihead_attention``: an ``nn.MultiheadAttention`` whose
projections a spec rule targets becomes a
:class:`~tnsurgery.layers.attention.SplitMultiheadAttention` (the same function, its
``q_proj``, ``k_proj``, ``v_proj`` and ``out_proj`` ordinary ``nn.Linear`` children), so
that every transform that takes a Linear (``factorize``, ``tt``, ``tucker``, ``qat``...)
compresses them. Registered through the ``tnsurgery`` entry-point group like any
plugin (see :class:`tnsurgery.hookspecs.Split` for what surgery does with it)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from tnsurgery.hookspecs import Split, hookimpl
from tnsurgery.layers.attention import PARTS, SplitMultiheadAttention


def split_attention(module: nn.Module) -> SplitMultiheadAttention | None:
    """The exact split equivalent of an ``nn.MultiheadAttention``; ``None`` for a
    subclass with a forward of its own (it may compute something else)."""
    if not isinstance(module, nn.MultiheadAttention):
        return None
    if type(module).forward is not nn.MultiheadAttention.forward:
        return None
    return SplitMultiheadAttention.from_mha(module)


MULTIHEAD_ATTENTION = Split(
    name="multihead_attention",
    module_types=(nn.MultiheadAttention,),
    parts=PARTS,
    split=split_attention,
    layers=(SplitMultiheadAttention,),
    description="nn.MultiheadAttention -> q_proj, k_proj, v_proj, out_proj (nn.Linear)",
)


@hookimpl
def register_splits(register: Callable[[Split], None]) -> None:
    """Register the ``multihead_attention`` split."""
    register(MULTIHEAD_ATTENTION)
