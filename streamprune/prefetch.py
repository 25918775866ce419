"""Read-ahead of the next decoder layer on a background thread."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor

import torch


class LayerPrefetcher:
    """Reads the next layer on a background thread while the current one is computed.

    The caller says when to start (`read_ahead`). On a GPU the pruning pass starts it as soon as the
    layer is on the device, to overlap the whole layer. On CPU the layer shares host memory with
    the read-ahead copy, so the pass starts it once the layer's weights are released (only its
    output and activations remain): the copy then never adds to the layer's peak, and it still
    overlaps the output write and the hidden-state checkpoint. At most two layers are in host memory.
    Safetensors reads and torch copies release the GIL, so one worker thread is enough.
    """

    def __init__(self, read_layer, num_layers: int, enabled: bool = True):
        self.read_layer, self.num_layers, self.enabled = read_layer, num_layers, enabled
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="streamprune-read") if enabled else None
        self._pending: dict[int, Future] = {}

    def read_ahead(self, i: int) -> None:
        """Start reading layer i in the background (no-op when disabled, past the end or started)."""
        if self._pool is not None and i < self.num_layers and i not in self._pending:
            self._pending[i] = self._pool.submit(self.read_layer, i)

    def get(self, i: int) -> dict[str, torch.Tensor]:
        """Layer i's tensors: the read-ahead result if one was started, else a read now."""
        future = self._pending.pop(i, None)
        return future.result() if future is not None else self.read_layer(i)

    def close(self) -> None:
        if self._pool is not None:
            for future in self._pending.values():
                future.cancel()
            self._pool.shutdown(wait=True)
        self._pending.clear()
