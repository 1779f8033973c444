"""engine.host_copy.to_device: lists and CPU tensors to a device, in the dtype asked for."""
import torch

from engine.host_copy import to_device


def test_lists_and_tensors_arrive_with_their_values_in_the_dtype_asked_for():
    assert to_device([3, 1, 2], "cpu", torch.int32).dtype == torch.int32
    assert to_device([3, 1, 2], "cpu").tolist() == [3, 1, 2]
    t = torch.arange(5)
    moved = to_device(t, "cpu", torch.int32)
    assert moved.dtype == torch.int32 and moved.tolist() == t.tolist()
    assert to_device([0.5, 1.0], "cpu").dtype == torch.float32
    if torch.cuda.is_available():  # through pinned memory, asynchronously
        assert to_device([7, 8], "cuda", torch.int32).cpu().tolist() == [7, 8]
