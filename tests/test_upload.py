"""kvtier.upload.to_device: small uploads that do not queue behind a tier load's copies."""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from kvtier.upload import _MAX_LIVE, to_device


@pytest.mark.parametrize("values", [[3, 1, 4, 1, 5], np.arange(7), torch.tensor([9, 8]), []])
def test_cpu_values_and_dtype(values):
    t = to_device(values, "cpu")
    assert t.dtype == torch.long and t.device.type == "cpu"
    assert t.tolist() == list(np.asarray(values, dtype=np.int64))


def test_cpu_dtype_override():
    t = to_device([1.5, 2.5], "cpu", dtype=torch.float32)
    assert t.dtype == torch.float32 and t.tolist() == [1.5, 2.5]


@pytest.mark.gpu
@pytest.mark.parametrize("n", [0, 1, 3, 5000])  # empty, under 16 bytes, unaligned tail, many pieces
def test_gpu_values(gpu, n):
    values = np.random.default_rng(n).integers(-(2**62), 2**62, n)
    t = to_device(values, gpu)
    assert t.device.type == "cuda" and t.dtype == torch.long
    assert t.cpu().tolist() == values.tolist()


@pytest.mark.gpu
def test_gpu_many_uploads_keep_their_sources(gpu):
    """More uploads than the module keeps live: each still reads its own bytes (a pinned source
    freed early would be reused by a later upload and read back wrong)."""
    outs = [to_device([i] * 33, gpu) for i in range(_MAX_LIVE + 200)]
    torch.cuda.synchronize()
    assert all(o.cpu().tolist() == [i] * 33 for i, o in enumerate(outs))


@pytest.mark.gpu
def test_gpu_upload_does_not_wait_behind_a_load(gpu):
    """2 GiB of host-to-device copies queued on another stream (a tier load's shape: many large
    copies from pinned memory, tens of ms): an upload on the current stream queued after them is
    done while they are still running, not after them."""
    src = torch.empty(256 << 20, dtype=torch.uint8).pin_memory()
    dst = torch.empty(256 << 20, dtype=torch.uint8, device=gpu)
    load = torch.cuda.Stream(gpu)
    torch.cuda.synchronize()
    with torch.cuda.stream(load):
        for _ in range(8):
            dst.copy_(src, non_blocking=True)
        load_done = torch.cuda.Event()
        load_done.record(load)
    t = to_device(list(range(100)), gpu)
    up_done = torch.cuda.Event()
    up_done.record()
    up_done.synchronize()
    still_loading = not load_done.query()
    load_done.synchronize()
    assert t.cpu().tolist() == list(range(100))
    assert still_loading, "the upload finished only after the 2 GiB load on the other stream"


class _Event:
    """A stand-in for a CUDA event: done once ``done`` is set."""

    def __init__(self, done: bool) -> None:
        self.done = done

    def query(self) -> bool:
        return self.done


def test_prune_drops_only_finished_uploads_in_order(monkeypatch):
    from kvtier import upload

    u = upload._KernelUploads()
    evs = [_Event(True), _Event(True), _Event(False), _Event(True)]
    u._live.extend((f"src{i}", e) for i, e in enumerate(evs))
    u._prune(block=True)  # 4 live, under the cap: no wait; drops the finished head only
    assert [s for s, _ in u._live] == ["src2", "src3"]  # src3 is done but behind an unfinished one


def test_prune_over_the_cap_waits_with_a_deadline_and_frees_nothing_early(monkeypatch):
    from kvtier import upload
    from kvtier.errors import DeadlineExceededError

    monkeypatch.setattr(upload, "_MAX_LIVE", 2)
    monkeypatch.setattr(upload, "_WAIT_S", 0.05)
    u = upload._KernelUploads()
    stuck = _Event(False)
    u._live.extend([("a", stuck), ("b", _Event(False)), ("c", _Event(False))])
    with pytest.raises(DeadlineExceededError, match="did not complete within"):
        u._prune(block=True)
    assert [s for s, _ in u._live] == ["a", "b", "c"]  # the stuck one's source is still held
    stuck.done = True
    u._prune(block=True)  # the oldest finished: dropped; now at the cap, no more waiting
    assert [s for s, _ in u._live] == ["b", "c"]
