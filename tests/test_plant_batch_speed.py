"""The data workers' fast paths build exactly what the plain ones build: Qwen2-VL pixels by table look-up against the
image processor, packed frames against packing the processed pixels, M-RoPE positions of distinct rows against the
plain call, the attention-target masks against one mask per target, and whole batches of the data workers (planting
on both sides of ``invariance_from``, and the task mixture) against digests recorded by the code before these paths
(commit 436486a: ``_digests`` run on that tree)."""

import functools
import random

import numpy as np
import pytest
import torch
from PIL import Image

from vismech.organism import data, transfer
from vismech.organism import plant_batch as pb
from vismech.organism.config import END_TOKEN
from vismech.organism.plant import PlantSpec

END = END_TOKEN["qwen2_5_vl"]
_W = dict(PlantSpec().weights, invariance_s=1.0, balance=1.0)
SPECS = {  # the recipe in use (invariance from step 3 here), and the switches that change a batch's fields
    "recipe": PlantSpec(weights=tuple(_W.items()), full_scenes=0.3, drop_late_mlps=True, invariance_from=3,
                        solo=0.5),
    "variants": PlantSpec(weights=tuple(dict(_W, guard=1.0, invariance_k=1.0).items()), split_gathering=True,
                          strict_late_mlps=True, invariance_from=3, solo=0.3),
}

# recorded from commit 436486a (sha256 of each batch: keys in order, tensors' dtype, shape and bytes, other values)
GOLDEN = {
    "recipe|torch.bfloat16|1": "5c48c399cf5e050983119eb3be4fdb9efd186b71ddfce19fc0e2662a7fb33bce",
    "recipe|torch.bfloat16|5": "8d7b75728897f0b619a2b6d3a39540b8bb4e0ebc4848a056b767f18cb9dcb075",
    "recipe|None|1": "9763c7244c49acb6c52d6af1eb2fc8edd5a26ed983be30a0499ed9405929e4f6",
    "recipe|None|5": "ad5d28e2fb8eff60a4f4b9d19102a3f25e5506aaaf39cf2fc30ac372115c3d1d",
    "recipe|make_batch|5": "5421021a2cc82440ef93c4ec5774bfe9ea112b3dcfbf0203ace2c981ff997d6d",
    "variants|torch.bfloat16|1": "3f8b7140a800a7faecf409cfb625f07dc1470005545e0708ec75681d71e6391d",
    "variants|torch.bfloat16|5": "f98385f4ba859c0d22b596f78577c4efe19ca6b4e42d5360cfb4250934571e77",
    "variants|None|1": "92e35583bde5efcda48d3d31b39f69c7b486fb0e99cd24423af16b85b3567bde",
    "variants|None|5": "6ebfcdd88cbe1a8b159388dbeb456f2f905555eac39d2740b298203cf47585c8",
    "variants|make_batch|5": "f3bc2d865c3c1e6a67f097e78e5c052a3a1ea31fdefa868d93ca59f16619ef9d",
    "mixture|bf16|2": "141acc19a09f6edc0294981a1de564d0b70ea6411d64229b0924c4b08312d846",
}


def _digest(batch: dict) -> str:
    """The digest ``benchmarks/plant_data.py`` compares trees by (keys in order, tensors' dtype, shape and bytes)."""
    return _benchmark().digest(batch)


@functools.lru_cache(maxsize=1)
def _benchmark():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(
        "plant_data", Path(__file__).resolve().parent.parent / "benchmarks" / "plant_data.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _digests() -> dict:
    """The batches the golden digests are of, built with the workers' own ``_Maker`` (and ``make_batch`` as is)."""
    out = {}
    for name, spec in SPECS.items():
        for dtype in (torch.bfloat16, None):
            maker = data._Maker("qwen2_5_vl", None, 0, 3, END, dtype, data.MIXTURE, True, None, spec)
            for step in (1, 5):
                out[f"{name}|{dtype}|{step}"] = _digest(maker(step))
        out[f"{name}|make_batch|5"] = _digest(pb.make_batch(maker.vlm, spec, 0, 5, 3, END))
    maker = data._Maker("qwen2_5_vl", None, 0, 6, END, torch.bfloat16, data.MIXTURE, True, None, None)
    out["mixture|bf16|2"] = _digest(maker(2))
    return out


@pytest.fixture(scope="module")
def vlm():
    return data.adapter_without_weights("qwen2_5_vl")


def test_worker_batches_equal_those_of_the_code_before_the_fast_paths():
    assert _digests() == GOLDEN


def _images(vlm, n=12):
    plan = pb.step_plan(SPECS["recipe"], 0, 7, n)
    images = [vlm.render(r.trial) for r in plan.a]
    assert len({im.size for im in images}) == 2  # both grids' sizes
    noise = np.random.default_rng(1).integers(0, 256, (images[0].height, images[0].width, 3), dtype=np.uint8)
    return images + [Image.fromarray(noise, "RGB")]


def test_pixels_by_look_up_equal_the_image_processor(vlm):
    from vismech.models.qwen_pixels import pixels

    proc, images = vlm.image_processor, _images(vlm)
    want = proc(images=images, return_tensors="pt")
    got = pixels(proc, images)
    assert set(got) == {"pixel_values", "image_grid_thw"}
    for k in got:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    for dtype in (torch.bfloat16, torch.float32):  # packed: as packing the processed pixels, cast
        packed = transfer.pack_pixels({"pixel_values": want["pixel_values"].to(dtype)}, proc.temporal_patch_size,
                                  proc.patch_size)
        frames = pixels(proc, images, frame_dtype=dtype)
        assert frames["pixel_repeat"] == packed["pixel_repeat"] and torch.equal(frames["image_grid_thw"],
                                                                                 want["image_grid_thw"])
        assert frames["pixel_frame"].dtype == dtype and torch.equal(frames["pixel_frame"], packed["pixel_frame"])
    # where the look-up does not apply, the processor runs: a size it would resize, a grey image, another processor
    assert pixels(proc, [Image.new("RGB", (50, 70))]) is None
    assert pixels(proc, [images[0].convert("L")]) is None
    assert pixels(data.adapter_without_weights("llava").image_processor, images[:1]) is None
    assert torch.equal(vlm.family.process_images(proc, images).tensors["pixel_values"], want["pixel_values"])


def test_rope_positions_of_distinct_rows_equal_the_plain_call(vlm):
    batch = pb.make_batch(vlm, SPECS["recipe"], 0, 5, 4, END)
    for prefix in ("a_", "b_"):
        rows = {k: batch[prefix + k] for k in ("input_ids", "mm_token_type_ids", "attention_mask")}
        grids = batch["a_image_grid_thw"]
        rows["image_grid_thw"] = grids if prefix == "a_" else grids[batch["b_base"]]
        want, _ = vlm.model.model.get_rope_index(rows["input_ids"], mm_token_type_ids=rows["mm_token_type_ids"],
                                                 image_grid_thw=rows["image_grid_thw"],
                                                 attention_mask=rows["attention_mask"])
        key = torch.cat([rows["mm_token_type_ids"], rows["attention_mask"], rows["image_grid_thw"]], 1)
        assert len(torch.unique(key, dim=0)) < len(key)  # rows share layouts: the distinct-row path runs
        assert torch.equal(data.rope_positions(vlm.model, rows)["position_ids"], want)
        assert torch.equal(batch[prefix + "position_ids"], want)


def _one_mask_per_target(keys, total):
    masks = []
    for k in keys:
        per_head = isinstance(k[0], list)
        m = torch.zeros((len(k), total) if per_head else total, dtype=torch.bool)
        for j, ks in enumerate(k if per_head else [k]):
            (m[j] if per_head else m)[torch.tensor(ks)] = True
        masks.append(m)
    return torch.stack(masks)


def test_key_masks_equal_one_mask_per_target():
    rng = random.Random(0)
    flat = [[rng.randrange(40) for _ in range(rng.randint(1, 6))] for _ in range(30)]  # repeats included
    per_head = [[[rng.randrange(40) for _ in range(rng.randint(1, 4))] for _ in range(3)] for _ in range(20)]
    for keys in (flat, per_head):
        assert torch.equal(pb._key_masks(keys, 40), _one_mask_per_target(keys, 40))
    assert pb._key_masks([], 40).shape == (0, 40)


@pytest.mark.parametrize("dtype", [torch.bfloat16, None])
def test_worker_batch_is_the_batch_cast_then_packed(vlm, dtype):
    """The worker's batch (its pixels packed as they are built) against the plain path: ``make_batch``'s processed
    pixels, every float cast, then packed."""
    maker = data._Maker("qwen2_5_vl", None, 0, 3, END, dtype, data.MIXTURE, True, None, SPECS["recipe"])
    proc = vlm.image_processor
    for step in (2, 4):  # both sides of invariance_from
        want = pb.make_batch(vlm, SPECS["recipe"], 0, step, 3, END)
        if dtype is not None:
            want = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in want.items()}
        want = transfer.pack_pixels(want, proc.temporal_patch_size, proc.patch_size)
        got = maker(step)
        assert list(got) == list(want)
        for k, v in want.items():
            assert torch.equal(got[k], v) and got[k].dtype == v.dtype if torch.is_tensor(v) else got[k] == v, k


def test_batches_from_a_worker_process_equal_those_built_in_place():
    # one worker, its batches crossing as one shared buffer (the training loop's path): the golden batches of steps
    # 1 and 5, bit for bit, keys in order
    with data.Feeder("qwen2_5_vl", 0, 3, END, start=1, workers=1, pixel_dtype=torch.bfloat16, label_mentions=True,
                     plant=SPECS["recipe"]) as feeder:
        batches = [next(feeder) for _ in range(5)]
    assert [_digest(batches[0]), _digest(batches[4])] == [GOLDEN["recipe|torch.bfloat16|1"],
                                                          GOLDEN["recipe|torch.bfloat16|5"]]
