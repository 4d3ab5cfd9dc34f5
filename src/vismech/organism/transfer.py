"""How a training batch gets from a data worker to the device, with as little as possible in the training loop's way.

A model organism's training step is short (tens of milliseconds of GPU work, launched from Python), so whatever the
training process does per batch besides launching it slows the loop: receiving the batch from a worker, freeing it,
touching its pages and copying it to the device. Three remedies:

- ``pack_pixels`` / ``to_device``: a Qwen-family still image crosses as one of its temporal frames, not the equal
  copies the model reads, and ``to_device`` restores them on the device (half of the pixels to send and copy).

- ``pack`` / ``unpack``: a batch crosses processes as one shared-memory buffer, not as a few dozen tensors (each of
  which costs the receiving process a file descriptor, a mapping, an unpickling, and an unmapping when freed). The
  tensors come back as views of the buffer at offsets aligned to ``ALIGN`` bytes: the same bytes, dtypes and shapes,
  the keys in their order and the other values as they were.
- ``Ahead``: a helper thread takes the next batch from the data workers and moves it to the device while the step
  before it runs (the copy, the page faults and the freeing happen there; torch's copies release the interpreter
  lock). Only for batches built in other processes: the thread consumes no random numbers, so a run's results do not
  depend on it.

``benchmarks/feeder_transfer.py`` measures what receiving a batch costs the training process;
``tests/test_transfer.py`` and ``tests/test_organism.py`` hold the remedies to the plain path.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterator

import torch


def pack_pixels(batch: dict, frames: int, patch: int, dtype: torch.dtype | None = None) -> dict:
    """``batch`` with each ``*pixel_values`` [patches, channels * frames * patch**2] whose ``frames`` temporal copies
    are equal (a Qwen-family still image repeats over the temporal patch) replaced by one copy, ``*pixel_frame``
    [patches, channels, patch**2] (cast to ``dtype`` if given), and the count, ``*pixel_repeat``: half of what
    crosses from a data worker and then to the device (in place). ``to_device`` restores them exactly; other
    batches are returned as they are."""
    for key in [k for k in batch if k.endswith("pixel_values")] if frames > 1 and patch else ():
        x = batch[key]
        v = x.view(x.shape[0], -1, frames, patch * patch)  # HF's patch layout: channel, frame, row, column
        if all(torch.equal(v[:, :, 0], v[:, :, f]) for f in range(1, frames)):
            del batch[key]
            batch[key.replace("pixel_values", "pixel_frame")] = v[:, :, 0].to(dtype or v.dtype).contiguous()
            batch[key.replace("pixel_values", "pixel_repeat")] = frames
    return batch


def to_device(batch: dict, device) -> dict:
    """The tensors of a training batch on ``device`` (without waiting), packed pixels (``pack_pixels``) restored
    there."""
    out = {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
    for key in [k for k in out if k.endswith("pixel_frame")]:
        x, frames = out.pop(key), out.pop(key.replace("pixel_frame", "pixel_repeat"))
        out[key.replace("pixel_frame", "pixel_values")] = x.unsqueeze(2).expand(-1, -1, frames, -1).reshape(
            x.shape[0], -1)
    return out


ALIGN = 64  # bytes: a multiple of every dtype's size, so that each slice can be viewed as its dtype


def pack(batch: dict) -> tuple:
    """``batch`` as (buffer, layout, other values, key order), its tensors' bytes in one shared-memory buffer."""
    layout, size = [], 0
    for key, value in batch.items():
        if torch.is_tensor(value):
            nbytes = value.numel() * value.element_size()
            layout.append((key, value.dtype, tuple(value.shape), size, nbytes))
            size += -(-nbytes // ALIGN) * ALIGN
    buffer = torch.empty(max(size, ALIGN), dtype=torch.uint8).share_memory_()
    for key, _, _, offset, nbytes in layout:
        if nbytes:
            buffer[offset:offset + nbytes].copy_(batch[key].detach().contiguous().reshape(-1).view(torch.uint8))
    other = {key: value for key, value in batch.items() if not torch.is_tensor(value)}
    return buffer, layout, other, list(batch)


def unpack(packed: tuple) -> dict:
    """The batch that ``pack`` packed: its tensors are views of the buffer."""
    buffer, layout, other, keys = packed
    tensors = {key: buffer[offset:offset + nbytes].view(dtype).view(shape)
               for key, dtype, shape, offset, nbytes in layout}
    return {key: tensors[key] if key in tensors else other[key] for key in keys}


class Ahead:
    """``move(batch)`` of each batch of ``batches``, in order; with ``thread``, prepared by a helper thread up to two
    batches ahead of the caller (one waiting, one in hand). An error in the helper is raised in the caller at the
    batch where it happened. ``close`` (or leaving the ``with`` block) stops the helper; it is a daemon thread, so a
    helper still waiting for a worker never holds up the interpreter's exit."""

    def __init__(self, batches: Iterator[dict], move: Callable[[dict], dict], thread: bool = True):
        self.batches, self.move = batches, move
        self.helper = None
        if thread:
            self.ready: queue.Queue = queue.Queue(maxsize=1)
            self.stop = threading.Event()
            self.helper = threading.Thread(target=self._run, name="vismech-batches", daemon=True)
            self.helper.start()

    def _run(self) -> None:
        try:
            for batch in self.batches:
                if not self._put(self.move(batch)):
                    return
        except BaseException as error:  # handed to the caller, which raises it
            self._put(error)
            return
        self._put(StopIteration())

    def _put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        if self.helper is None:
            return self.move(next(self.batches))
        if self.stop.is_set():
            raise StopIteration
        item = self.ready.get()
        if isinstance(item, BaseException):
            self._put(item)  # every later call raises it too
            raise item
        return item

    def close(self) -> None:
        if self.helper is not None:
            self.stop.set()
            self.helper.join(timeout=2)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
