"""Checkpoint reads, the read-ahead and the memory helpers."""

from __future__ import annotations

import shutil
import sys
import threading

import pytest
import torch
from safetensors.torch import load_file

from streamprune.checkpoint import CheckpointReader
from streamprune.memory import peak_rss_mb, return_freed_memory_promptly
from streamprune.prefetch import LayerPrefetcher


@pytest.mark.parametrize("name", ["llama-sharded", "qwen2-gqa", "llama-fp16"])
def test_read_returns_the_stored_tensors(models, name):
    folder = models(name)
    reader = CheckpointReader(folder)
    expected = {}
    for shard in folder.glob("*.safetensors"):
        expected.update(load_file(str(shard)))
    names = sorted(expected, reverse=True)  # any order in, the same order out
    got = reader.read(names)
    assert list(got) == names
    for n in names:
        assert got[n].dtype == expected[n].dtype and torch.equal(got[n], expected[n]), n


def test_read_copies_the_bytes_instead_of_mapping_the_file(models, tmp_path):
    """A read-ahead must really read: tensors own their memory, so overwriting the shard in place
    afterwards (which a private memory map would show) leaves them unchanged."""
    folder = tmp_path / "model"
    shutil.copytree(models("llama-mha"), folder)
    reader = CheckpointReader(folder)
    name = "model.layers.1.mlp.down_proj.weight"
    tensor = reader.read([name])[name]
    before = tensor.clone()
    shard = folder / reader.weight_map[name]
    with open(shard, "r+b") as fh:  # same inode, same size: zero every byte after the header
        header = 8 + int.from_bytes(fh.read(8), "little")
        fh.seek(header)
        fh.write(b"\0" * (shard.stat().st_size - header))
    assert torch.equal(tensor, before)
    assert not torch.equal(reader.read([name])[name], before)  # a new read sees the new bytes


def test_read_ahead_runs_in_the_background_only_when_asked():
    calls: list[tuple[int, str]] = []

    def read_layer(i: int) -> dict:
        calls.append((i, threading.current_thread().name))
        return {"layer": torch.tensor(i)}

    prefetcher = LayerPrefetcher(read_layer, num_layers=3)
    try:
        assert int(prefetcher.get(0)["layer"]) == 0  # nothing started: read now, on this thread
        assert calls == [(0, threading.current_thread().name)]
        prefetcher.read_ahead(1)
        prefetcher.read_ahead(1)  # already started: not read twice
        prefetcher.read_ahead(3)  # past the end: ignored
        assert int(prefetcher.get(1)["layer"]) == 1
        assert [i for i, _ in calls] == [0, 1] and calls[1][1].startswith("streamprune-read")
    finally:
        prefetcher.close()

    calls.clear()
    disabled = LayerPrefetcher(read_layer, num_layers=3, enabled=False)
    disabled.read_ahead(1)
    assert calls == [] and int(disabled.get(1)["layer"]) == 1
    disabled.close()


def test_memory_helpers():
    before = peak_rss_mb()
    block = torch.ones(300 * 2**20 // 4)  # 300 MB, touched: the peak must rise by about that much
    assert peak_rss_mb() - before > 250
    del block
    if sys.platform.startswith("linux"):
        import platform

        if platform.libc_ver()[0] == "glibc":
            assert return_freed_memory_promptly() is True
