"""ShardWriter: tensors on disk as they come, shards safetensors and transformers read."""

from __future__ import annotations

import json
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import _TYPES, load_file, save_file  # _TYPES: safetensors' own names

from tnsurgery.io.manifests import DTYPE_BYTES, TensorInfo
from tnsurgery.io.shards import SAFETENSORS_DTYPES, ShardWriter


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = {}
    for dt in SAFETENSORS_DTYPES:
        x = torch.randn(3, 5, generator=g) * 10
        if dt == torch.bool:
            x = x > 0
        elif dt == torch.complex64:
            x = torch.complex(x, -x)
        out[f"t.{str(dt).removeprefix('torch.')}"] = x.to(dt)
    out["scalar"] = torch.tensor(3.0)
    out["empty"] = torch.zeros(0, 4)
    out["column"] = torch.randn(10, 10, generator=g)[:, 2]  # a non-contiguous view
    out["big"] = torch.randn(40, 40, generator=g)
    return out


def _read(directory) -> dict[str, torch.Tensor]:
    index = directory / "model.safetensors.index.json"
    if not index.exists():
        return load_file(directory / "model.safetensors")
    weight_map = json.loads(index.read_text())["weight_map"]
    out = {}
    for f in sorted(set(weight_map.values())):
        out.update(load_file(directory / f))
    assert set(out) == set(weight_map)
    return out


@pytest.mark.parametrize("shard_bytes", [100, 1000, 1 << 20])
def test_every_dtype_round_trips_bit_for_bit(tmp_path, shard_bytes):
    tensors = _tensors()
    w = ShardWriter(tmp_path, shard_bytes)
    for k, v in tensors.items():
        w.add(k, v)
    names = w.finish()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(names)  # no spool left
    got = _read(tmp_path)
    assert set(got) == set(tensors)
    for k, v in tensors.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        assert torch.equal(_bytes(got[k]), _bytes(v)), k
    if shard_bytes == 1 << 20:
        assert names == ["model.safetensors"]
    else:
        index = json.loads((tmp_path / names[-1]).read_text())
        assert index["metadata"]["total_size"] == sum(
            v.numel() * v.element_size() for v in tensors.values()
        )
        # shards of at most the size asked (a larger tensor is one of its own)
        for name in names[:-1]:
            with safe_open(tmp_path / name, "pt") as f:
                sizes = [f.get_tensor(k).numel() * f.get_tensor(k).element_size() for k in f.keys()]  # noqa: SIM118
            assert sum(sizes) <= shard_bytes or len(sizes) == 1


def test_tensors_are_aligned_and_metadata_is_pt(tmp_path):
    w = ShardWriter(tmp_path, 1 << 20)
    w.add("a_byte", torch.ones(3, dtype=torch.uint8))  # 3 bytes: would misalign what follows
    w.add("b_half", torch.ones(3, dtype=torch.float16))
    w.add("c_double", torch.ones(3, dtype=torch.float64))
    w.finish()
    raw = (tmp_path / "model.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert (8 + n) % 8 == 0
    header = json.loads(raw[8 : 8 + n])
    assert header["__metadata__"] == {"format": "pt"}
    for k, width in (("a_byte", 1), ("b_half", 2), ("c_double", 8)):
        assert header[k]["data_offsets"][0] % width == 0, k
    # the same bytes safetensors writes, but for the order
    save_file(load_file(tmp_path / "model.safetensors"), tmp_path / "ref.safetensors")
    ref = load_file(tmp_path / "ref.safetensors")
    got = load_file(tmp_path / "model.safetensors")
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def test_nothing_is_held_in_memory(tmp_path):
    w = ShardWriter(tmp_path, 1 << 30)
    t = torch.randn(256, 256)
    w.add("x", t)
    spools = list(tmp_path.glob(".shard-*"))
    assert [p.stat().st_size for p in spools] == [t.numel() * 4]  # on disk already
    assert not any(isinstance(v, torch.Tensor) for v in vars(w).values())
    w.finish()
    assert not list(tmp_path.glob(".shard-*"))


def test_twice_and_unknown_dtype_refused_and_close_cleans(tmp_path):
    w = ShardWriter(tmp_path, 1 << 20)
    w.add("x", torch.ones(2))
    with pytest.raises(ValueError, match="written twice"):
        w.add("x", torch.ones(2))
    with pytest.raises(ValueError, match="no safetensors name"):
        w.add("q", torch.ones(2, dtype=torch.complex128))
    w.close()
    assert list(tmp_path.iterdir()) == []


def test_empty_writer_writes_an_empty_file(tmp_path):
    assert ShardWriter(tmp_path).finish() == ["model.safetensors"]
    assert load_file(tmp_path / "model.safetensors") == {}


def test_one_dtype_table_serves_the_writer_and_the_header_sizes():
    for dtype, tag in SAFETENSORS_DTYPES.items():
        assert _TYPES[tag] == dtype
        assert DTYPE_BYTES[tag] == dtype.itemsize
    assert TensorInfo((3, 2), "I16").nbytes == 12 and TensorInfo((2,), "C64").nbytes == 16
