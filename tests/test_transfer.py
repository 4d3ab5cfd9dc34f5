"""``transfer``: a batch packed into one shared buffer unpacks to the same keys in the same order, the same tensors
(dtype, shape, bytes) and the same other values; ``Ahead`` hands over every batch in order, errors at their batch,
and never holds up a close; a planting run whose batches come that way trains exactly as one without."""

import json
import pickle
import threading
import time
from multiprocessing.reduction import ForkingPickler

import pytest
import torch

from vismech.organism import transfer


def _batch():
    g = torch.Generator().manual_seed(0)
    wide = torch.randn(4, 6, generator=g)
    return {
        "ids": torch.randint(0, 1000, (3, 5), generator=g),
        "mask": torch.rand(3, 5, generator=g) > 0.5,
        "pixels": torch.randn(7, 3, generator=g).to(torch.bfloat16),
        "repeat": 2,
        "strided": wide[:, ::2],  # not contiguous
        "scalar": torch.tensor(3.5, dtype=torch.float64),
        "empty": torch.zeros(0, 4, dtype=torch.int32),
        "odd": torch.arange(5, dtype=torch.int8),  # 5 bytes: the next tensor starts at the next aligned offset
        "half": torch.randn(2, 3, generator=g).half(),
        "kinds": ("a", "b"),
    }


def test_unpack_gives_back_every_value_exactly():
    batch = _batch()
    packed = transfer.pack(batch)
    buffer, layout, _, _ = packed
    assert buffer.is_shared() and buffer.dtype == torch.uint8
    assert [off % transfer.ALIGN for _, _, _, off, _ in layout] == [0] * 8
    # bytes: 15 x 8, 15 x 1, 21 x 2, 12 x 4, 1 x 8, 0, 5 x 1, 6 x 2; each slot rounded up to 64 (the empty one: 0)
    assert [nbytes for *_, nbytes in layout] == [120, 15, 42, 48, 8, 0, 5, 12]
    assert [off for _, _, _, off, _ in layout] == [0, 128, 192, 256, 320, 384, 384, 448]
    assert buffer.numel() == 512
    out = transfer.unpack(pickle.loads(ForkingPickler.dumps(packed)))  # as it crosses processes
    assert list(out) == list(batch)
    for key, value in batch.items():
        if torch.is_tensor(value):
            assert out[key].dtype == value.dtype and out[key].shape == value.shape
            assert torch.equal(out[key], value), key
        else:
            assert out[key] == value
    assert out["scalar"].item() == 3.5 and out["empty"].shape == (0, 4)


def test_unpacked_tensors_do_not_overlap():
    out = transfer.unpack(transfer.pack(_batch()))
    out["odd"].fill_(-1)
    out["mask"].fill_(False)
    fresh = _batch()
    assert torch.equal(out["half"], fresh["half"]) and torch.equal(out["ids"], fresh["ids"])
    assert torch.equal(out["pixels"], fresh["pixels"])


def _slow(items, fail_at=None, wait=0.0):
    for i, item in enumerate(items):
        if i == fail_at:
            raise ValueError(f"item {i} is bad")
        time.sleep(wait)
        yield item


@pytest.mark.parametrize("thread", [True, False])
def test_ahead_gives_every_moved_batch_in_order_then_stops(thread):
    with transfer.Ahead(_slow(range(7), wait=0.01), lambda b: b * 10, thread=thread) as batches:
        assert list(batches) == [0, 10, 20, 30, 40, 50, 60]
        with pytest.raises(StopIteration):
            next(batches)


@pytest.mark.parametrize("thread", [True, False])
def test_an_error_while_preparing_reaches_the_caller_at_its_batch(thread):
    with transfer.Ahead(_slow(range(7), fail_at=3), lambda b: b + 1, thread=thread) as batches:
        assert [next(batches) for _ in range(3)] == [1, 2, 3]
        for _ in range(2 if thread else 1):  # the helper's error stays raised
            with pytest.raises(ValueError, match="item 3 is bad"):
                next(batches)


def test_closing_does_not_wait_for_a_stuck_source():
    gate = threading.Event()

    def stuck():
        yield 1
        gate.wait()  # a worker that never answers
        yield 2

    t = time.perf_counter()
    with transfer.Ahead(stuck(), lambda b: b) as batches:
        assert next(batches) == 1
    assert time.perf_counter() - t < 4 and batches.helper.daemon and batches.stop.is_set()
    gate.set()
    batches.helper.join(timeout=2)
    assert not batches.helper.is_alive()  # it saw the stop instead of handing over the late batch


def test_a_planting_run_with_a_data_worker_trains_exactly_as_one_without(tmp_path):
    """The worker's batch crosses as one buffer and reaches the model through the helper thread: the same losses,
    gradient norms and weights as batches built in the training process."""
    from vismech.organism import plant
    from vismech.organism.resume import STATE
    from vismech.organism.train import train_organism

    sizes = {"text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=7, num_attention_heads=8,
                          num_key_value_heads=4, head_dim=8),
             "vision": dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                            projection_dim=16)}
    logs, states, threads = [], [], torch.get_num_threads()
    torch.set_num_threads(1)  # two threads' reductions differ from run to run in the last bit, with or without workers
    try:
        for workers in (0, 1):
            out = tmp_path / f"w{workers}"
            kw = dict(steps=3, batch_size=1, eval_n=1, progress=False, device="cpu", sizes=sizes, log_every=1)
            # stopped after step 2 of 3: the state is saved, the checkpoint and its validity are not (saves 9 s)
            train_organism("llava", out, stop_at=2, plant=plant.PlantSpec(), workers=workers, **kw)
            logs.append([{k: r.get(k) for k in ("step", "loss", "grad_norm")}
                         for r in map(json.loads, (out / "train_log.jsonl").read_text().splitlines())])
            states.append(torch.load(out / STATE, weights_only=True)["model"])
    finally:
        torch.set_num_threads(threads)
    assert [r["step"] for r in logs[0]] == [0, 1, 2] and logs[0] == logs[1]
    assert all(r["loss"] > 0 for r in logs[0][1:])
    assert states[0].keys() == states[1].keys()
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
