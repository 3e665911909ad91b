"""Batches written straight into (shared) memory by the loader workers."""

from __future__ import annotations

import math
import warnings
from typing import Optional

import numpy as np
import torch

# BatchBuilder only reads images through torch.from_numpy(np.asarray(pil_image)), which is read-only.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable", module=__name__)


class BatchBuilder:
    """Collects transformed samples into one batch, writing each image straight into the batch tensor.

    In a loader worker that tensor is allocated in shared memory, so handing the batch to the trainer moves
    no pixels (torch.stack plus the DataLoader's copy into shared memory were two copies of every batch).
    PIL images (HWC uint8) are written as CHW in channels-last memory, so each one is a plain copy of its
    pixels (a transposing copy into CHW memory cost ~10% of a loader worker at 224 px; the device-side
    normalisation makes the float batch contiguous again); tensors of any shape are copied as they are.

    ``recycle``: reuse a ring of that many shared buffers instead of a fresh one per batch. Fresh shared
    memory is paid for in page faults on first write (measured: ~20% of a worker's time at 224 px), but a
    buffer may only be reused once the consumer is done with it: see ``StreamSpec.recycle_buffers``.
    """

    def __init__(self, batch_size: int, shared: bool, recycle: int = 0):
        self.batch_size, self.shared, self.recycle = batch_size, shared, recycle
        self.images: Optional[torch.Tensor] = None
        self.labels: list[int] = []
        self.keys: list[str] = []
        self.ring: list[torch.Tensor] = []
        self.batches = 0

    def __len__(self) -> int:
        return len(self.labels)

    def add(self, item, label: int, key: str = "") -> None:
        tensor = _as_tensor(item)
        if self.images is None:
            channels_last = tensor.ndim == 3 and not isinstance(item, torch.Tensor)  # HWC pixels
            self.images = self._buffer((self.batch_size, *tensor.shape), tensor.dtype, channels_last)
        self.images[len(self.labels)].copy_(tensor)
        self.labels.append(label)
        self.keys.append(key)

    def _buffer(self, shape: tuple, dtype: torch.dtype, channels_last: bool = False) -> torch.Tensor:
        slot = self.batches % self.recycle if self.recycle else None
        self.batches += 1
        # (B, C, H, W) with channels-last strides: the memory holds (B, H, W, C)
        layout = (shape[0], *shape[2:], shape[1]) if channels_last else shape
        if slot is not None and slot < len(self.ring):
            held = self.ring[slot]
            if held.shape == shape and held.dtype == dtype and held.stride() == _strides(layout, channels_last):
                return held
        if self.shared:  # allocated in shared memory directly, as torch's default_collate does
            storage = torch.UntypedStorage._new_shared(math.prod(shape) * torch.empty(0, dtype=dtype).element_size())
            buffer = torch.empty(0, dtype=dtype).set_(storage).view(layout)
        else:
            buffer = torch.empty(layout, dtype=dtype)
        if channels_last:
            buffer = buffer.permute(0, 3, 1, 2)
        if slot is not None:
            self.ring[slot : slot + 1] = [buffer]
        return buffer

    def take(self) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
        """The batch so far (a partial one is a view of the first rows) and its keys; the builder starts anew."""
        if self.images is None:  # nothing was added (every sample of this part was undecodable)
            self.images = self._buffer((self.batch_size, 3, 1, 1), torch.uint8)
        images, labels, keys = self.images[: len(self.labels)], torch.tensor(self.labels, dtype=torch.long), self.keys
        self.images, self.labels, self.keys = None, [], []
        return images, labels, keys


def _strides(layout: tuple, channels_last: bool) -> tuple:
    """The strides of a (B, C, H, W) view of contiguous memory laid out as ``layout``."""
    strides = tuple(math.prod(layout[i + 1 :]) for i in range(len(layout)))
    return (strides[0], strides[3], strides[1], strides[2]) if channels_last else strides


def _as_tensor(item) -> torch.Tensor:
    if isinstance(item, torch.Tensor):
        return item
    array = np.asarray(item)  # read-only (Pillow's bytes): only read, by the copy into the batch
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array).permute(2, 0, 1)
