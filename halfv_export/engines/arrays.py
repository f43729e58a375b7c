"""The two array namespaces runners keep their tensors in (`Runner.arrays`, see engines/base.py).

NumpyArrays   host numpy arrays: ONNX Runtime's CPU provider takes and returns them, so nothing is converted.
TorchArrays   torch tensors on one device: TensorRT reads and writes CUDA buffers that torch owns, so the outputs of
              one graph (embeds, the K/V cache) are fed to the next where they already are, and only what the host
              needs (token ids, logits for a report) crosses to the host.

Dtypes are named as torch and numpy both spell them ("float32", "float16", "bfloat16", "int64", ...). numpy has no
bfloat16: NumpyArrays refuses it, and `to_host` widens bfloat16 tensors to float32 (exact: every bf16 value is an
fp32 value).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..base.errors import BadInput


def _is_torch(array: Any) -> bool:
    return type(array).__module__.startswith("torch")


class NumpyArrays:
    name = "numpy"

    def asarray(self, host: Any, dtype: str | None = None) -> np.ndarray:
        if dtype == "bfloat16":
            raise BadInput("bfloat16 has no numpy dtype; these graphs need a runner that keeps torch tensors "
                           "(--target tensorrt), or export with --precision fp16 / fp32")
        if _is_torch(host):
            host = host.detach().cpu().numpy()
        array = np.asarray(host)
        return array if dtype is None or array.dtype == dtype else array.astype(dtype)

    def to_host(self, array: Any) -> np.ndarray:
        return np.asarray(array)

    def concat(self, arrays: list, axis: int) -> np.ndarray:
        return np.concatenate(arrays, axis=axis)

    def ones(self, shape: tuple, like: np.ndarray) -> np.ndarray:
        return np.ones(shape, dtype=like.dtype)

    def argmax(self, array: np.ndarray, axis: int) -> np.ndarray:
        return array.argmax(axis).astype(np.int64)


class TorchArrays:
    """Torch tensors on `device` (CUDA for TensorRT; a CPU device only where a test stands in for TensorRT)."""

    name = "torch"

    def __init__(self, device):
        import torch

        self.torch = torch
        self.device = torch.device(device)

    def dtype(self, name: str):
        dtype = getattr(self.torch, name, None)
        if not isinstance(dtype, self.torch.dtype):
            raise BadInput(f"torch has no dtype '{name}'")
        return dtype

    def asarray(self, host: Any, dtype: str | None = None):
        """A numpy array or a tensor anywhere -> a contiguous tensor on this device (one copy at most)."""
        torch = self.torch
        if not isinstance(host, torch.Tensor):
            host = torch.from_numpy(np.ascontiguousarray(host))
        tensor = host.to(device=self.device, dtype=self.dtype(dtype) if dtype else None)
        return tensor.contiguous()

    def to_host(self, array) -> np.ndarray:
        if not isinstance(array, self.torch.Tensor):
            return np.asarray(array)
        array = array.detach()
        if array.dtype == self.torch.bfloat16:
            array = array.float()
        return array.cpu().numpy()

    def concat(self, arrays: list, axis: int):
        return self.torch.cat(arrays, dim=axis)

    def ones(self, shape: tuple, like):
        return self.torch.ones(shape, dtype=like.dtype, device=like.device)

    def argmax(self, array, axis: int):
        return array.argmax(dim=axis)


NUMPY = NumpyArrays()
