"""A model's block stack and running it one block at a time (``tnsurgery.blocks``):
the stack is found (or named), the inputs each block receives are captured with
only the first block run, blocks run on a stream, and the modules after the stack
finish the output: block by block equals the model's own forward, whether blocks
take their hidden states by position or by keyword, and return a tensor or a tuple."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tnsurgery.blocks import capture, find_stack, finish, run_block


class Block(nn.Module):
    def __init__(self, d: int, as_tuple: bool) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)
        self.as_tuple = as_tuple

    def forward(self, hidden_states, scale=None):
        out = hidden_states + torch.tanh(self.fc(hidden_states)) * scale
        return (out, None) if self.as_tuple else out


class Stacked(nn.Module):
    """Embedding, then blocks given a per-block ``scale`` the model computes, then a
    head; the hidden states go by position or by keyword."""

    def __init__(self, keyword: bool, as_tuple: bool, blocks: int = 4, d: int = 16) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, d)
        self.layers = nn.ModuleList(Block(d, as_tuple) for _ in range(blocks))
        self.head = nn.Linear(d, 3)
        self.keyword, self.as_tuple = keyword, as_tuple

    def forward(self, ids):
        h = self.embed(ids)
        for i, block in enumerate(self.layers):
            scale = torch.tensor(1.0 / (i + 1))
            out = block(hidden_states=h, scale=scale) if self.keyword else block(h, scale=scale)
            h = out[0] if self.as_tuple else out
        return self.head(h)


@pytest.mark.parametrize("keyword", [False, True])
@pytest.mark.parametrize("as_tuple", [False, True])
def test_block_by_block_equals_the_forward(keyword, as_tuple):
    torch.manual_seed(0)
    model = Stacked(keyword, as_tuple).eval()
    ids = torch.randint(0, 10, (2, 5))
    stack = find_stack(model)
    assert stack.name == "layers" and stack.blocks == [f"layers.{i}" for i in range(4)]
    captured = capture(model, stack, ids)
    assert [float(c.kwargs["scale"]) for c in captured.calls] == pytest.approx(
        [1, 0.5, 1 / 3, 0.25]
    )
    h = captured.hidden
    torch.testing.assert_close(h, model.embed(ids))
    for i, name in enumerate(stack.blocks):
        h = run_block(model.get_submodule(name), captured.calls[i], h)
    with torch.no_grad():
        torch.testing.assert_close(finish(model, stack, ids, captured, h), model(ids))
    # the blocks are left as they were: the model runs as before
    with torch.no_grad():
        torch.testing.assert_close(model(ids), Stacked.forward(model, ids))


def test_only_the_first_block_needs_its_weights():
    torch.manual_seed(0)
    model = Stacked(False, False).eval()
    for block in list(model.layers)[1:]:
        block.to("meta")
    captured = capture(model, find_stack(model), torch.randint(0, 10, (1, 3)))
    assert len(captured.calls) == 4


def test_two_stacks_are_no_single_stack_unless_named():
    class EncoderDecoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))
            self.decoder = nn.ModuleList(nn.Linear(8, 8) for _ in range(3))

    model = EncoderDecoder()
    assert find_stack(model) is None
    named = find_stack(model, "decoder.*")
    assert named.name == "decoder" and len(named.blocks) == 3
    assert find_stack(model, "nothing.*") is None
    assert named.index_of("decoder.2") == 2 and named.index_of("encoder.1") is None


def test_a_small_list_is_not_the_stack():
    class Mostly(nn.Module):
        def __init__(self):
            super().__init__()
            self.big = nn.Linear(256, 256)
            self.heads = nn.ModuleList(nn.Linear(4, 4) for _ in range(2))

    assert find_stack(Mostly()) is None
