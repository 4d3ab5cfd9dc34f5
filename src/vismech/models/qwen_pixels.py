"""Qwen2-VL's image processor, fast and exact, for the images it does not resize (every rendered scene).

The processor's work on such an image is arithmetic on each value alone (rescale, normalize: an output value is a
function of one channel's 8-bit value) and then a fixed rearrangement into patches, each patch repeated over the
temporal frames. Both are read off the processor itself, once: the arithmetic as a table of 256 values per channel
(the processor run on an image that holds every value in every channel), the rearrangement as, for each patch entry,
the index of its byte in the image (the processor's ``patchify`` run on the bytes' indices). A table is used only
after the processor and the look-up agree exactly on an image of random bytes. An image is then two look-ups
(``pixels``), several times faster than the processor's float pipeline and equal to it bit for bit
(``tests/test_plant_batch_speed.py``); a data worker takes the temporal frame once (``frame_dtype``) instead of
writing it twice and packing it after. Another processor class, an image the processor would resize or a mode
other than RGB gets None: the processor runs as before.
"""

from __future__ import annotations

import numpy as np
import torch

_CLASS = "Qwen2VLImageProcessorPil"  # the processor whose pipeline this reads (per value, then ``patchify``)
_CHANNEL = 256 * torch.arange(3, dtype=torch.int32)[:, None]  # value v of channel c: table entry c * 256 + v
_TABLES: dict = {}  # processor settings -> table, or None where the look-up does not reproduce the processor
_INDEX: dict = {}  # (height, width, patch, merge, frames) -> byte index of each entry of a frame


def _bounded(cache: dict, key, make):
    if key not in cache:
        if len(cache) >= 16:  # a few image sizes and processor settings are in use at a time
            cache.clear()
        cache[key] = make()
    return cache[key]


def _unresized(proc, height: int, width: int) -> bool:
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    if not proc.do_resize:
        return True
    lo, hi = proc.size.get("shortest_edge"), proc.size.get("longest_edge")
    if lo is None or hi is None:
        return False
    return smart_resize(height, width, factor=proc.patch_size * proc.merge_size, min_pixels=lo,
                        max_pixels=hi) == (height, width)


def _frame_index(proc, height: int, width: int) -> torch.Tensor | None:
    """[patches * 3 * patch**2] int32: for each entry of one temporal frame of an image's patches, in the
    processor's order, the index of its byte in the image (height, width, channel): ``patchify`` run on the
    indices. None if the temporal frames are not copies of one another."""
    p, m, t = proc.patch_size, proc.merge_size, proc.temporal_patch_size

    def make():
        if 3 * height * width >= 2 ** 24:  # patchify works in float32: indices from 2**24 on are not exact
            return None
        hwc = np.arange(3 * height * width, dtype=np.float32).reshape(height, width, 3)
        flat, _, _ = proc.patchify(hwc.transpose(2, 0, 1), patch_size=p, merge_size=m, temporal_patch_size=t)
        v = torch.from_numpy(np.ascontiguousarray(flat)).view(len(flat), 3, t, p * p)
        if not torch.equal(v, v[:, :, :1].expand_as(v)):
            return None
        return v[:, :, 0].reshape(-1).to(torch.int32)

    return _bounded(_INDEX, (height, width, p, m, t), make)


def _look_up(table: torch.Tensor, image, index: torch.Tensor, patch: int, out: torch.Tensor | None = None
             ) -> torch.Tensor:
    """One temporal frame of ``image``'s patches, flat (into ``out`` if given): its bytes in patch order
    (``index``), then the table."""
    raw = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)  # height, width, channel
    codes = raw.index_select(0, index).view(-1, 3, patch * patch).to(torch.int32) + _CHANNEL
    return torch.index_select(table, 0, codes.view(-1), out=out)


def _table(proc) -> torch.Tensor | None:
    """[3 * 256] float32: the processor's output for value v of channel c at c * 256 + v."""
    from PIL import Image

    side = proc.patch_size * proc.merge_size
    side *= -(-16 // side)  # at least 16 x 16 pixels: every value in every channel
    index = _frame_index(proc, side, side)
    if not _unresized(proc, side, side) or index is None:
        return None
    ramp = (np.arange(side * side)[:, None] + np.array([0, 85, 170])) % 256  # channels differ: a swap would show
    ramp = ramp.astype(np.uint8).reshape(side, side, 3)
    out = proc(images=[Image.fromarray(ramp, "RGB")], return_tensors="pt")["pixel_values"]
    frames = out.view(len(out), 3, proc.temporal_patch_size, -1)
    if out.dtype != torch.float32 or not torch.equal(frames, frames[:, :, :1].expand_as(frames)):
        return None
    code = (torch.from_numpy(ramp).view(-1)[index.long()].view(len(out), 3, -1).int() + _CHANNEL).view(-1).long()
    value = frames[:, :, 0].reshape(-1)
    table = torch.full((3 * 256,), float("nan"))
    table[code] = value
    if table.isnan().any() or not torch.equal(table[code], value):  # not one output per value
        return None
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8), "RGB")
    want = proc(images=[noise], return_tensors="pt")["pixel_values"].view(len(out), 3, -1, proc.patch_size ** 2)
    got = _look_up(table, noise, index, proc.patch_size).view(len(out), 3, 1, -1)
    return table if torch.equal(want, got.expand_as(want)) else None


def pixels(proc, images, frame_dtype: torch.dtype | None = None) -> dict | None:
    """``{"pixel_values", "image_grid_thw"}`` exactly as ``proc(images=images, return_tensors="pt")`` gives them, or
    None where the look-up does not apply (then call the processor). With ``frame_dtype``, the pixels as
    ``organism.transfer.pack_pixels`` packs them, cast to that dtype, in place of ``pixel_values``: ``pixel_frame``
    [patches, 3, patch**2] (one temporal frame) and ``pixel_repeat`` (the number of frames)."""
    if type(proc).__name__ != _CLASS or not images or (frame_dtype is not None and proc.temporal_patch_size < 2):
        return None
    if any(im.mode != "RGB" or not _unresized(proc, im.height, im.width) for im in images):
        return None
    table = _bounded(_TABLES, proc.to_json_string(), lambda: _table(proc))
    index = [_frame_index(proc, im.height, im.width) for im in images]
    if table is None or any(i is None for i in index):
        return None
    p, t = proc.patch_size, proc.temporal_patch_size
    counts = [len(i) // (3 * p * p) for i in index]
    if frame_dtype is not None:  # each value cast, as casting the pixels casts it
        table = table.to(frame_dtype)
    out = torch.empty(sum(counts), 3, 1 if frame_dtype is not None else t, p * p, dtype=table.dtype)
    start = 0
    for im, i, n in zip(images, index, counts):
        if frame_dtype is not None:
            _look_up(table, im, i, p, out=out[start:start + n].view(-1))
        else:  # the frame, and its copies
            out[start:start + n] = _look_up(table, im, i, p).view(n, 3, 1, p * p)
        start += n
    grids = torch.tensor([[1, im.height // p, im.width // p] for im in images], dtype=torch.long)
    if frame_dtype is not None:
        return {"pixel_frame": out.view(len(out), 3, p * p), "pixel_repeat": t, "image_grid_thw": grids}
    return {"pixel_values": out.view(len(out), -1), "image_grid_thw": grids}
