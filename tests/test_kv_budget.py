"""KV-cache sizing from the memory budget: CPU GiB per model, GPU free memory shared by the models
that hold a cache (a GPU's memory counter simulated, so this runs on CPU)."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from engine.config import CacheConfig, EngineConfig
from engine.engine import resolve_num_blocks
from engine.errors import InvalidRequestError
from engine.model_runner import kv_block_bytes
from models.spec import KVCacheSpec
from server.cli import kv_shares

GIB = 2**30
SPEC = KVCacheSpec(num_layers=30, num_kv_heads=3, head_dim=64)  # SmolLM2-135M
PER_BLOCK = kv_block_bytes(SPEC, 16, torch.bfloat16)


def loaded(name: str = "m") -> SimpleNamespace:
    return SimpleNamespace(model=SimpleNamespace(kv_cache_spec=SPEC), info=SimpleNamespace(name=name))


class FakeGPU:
    """torch.cuda.mem_get_info over a counter that allocations made through `take` lower."""

    def __init__(self, total: float, used: float) -> None:
        self.total, self.free, self.devices = total, total - used, []

    def mem_get_info(self, device: torch.device) -> tuple[float, float]:
        self.devices.append(device)
        return self.free, self.total

    def take(self, nbytes: float) -> None:
        self.free -= nbytes


def config(**cache) -> EngineConfig:
    return EngineConfig(model="m", dtype="bfloat16", device="cuda:0", cache=CacheConfig(**cache))


def test_cpu_budget_is_gib_per_model_and_an_explicit_count_wins():
    cpu = EngineConfig(model="m", cache=CacheConfig(kv_cache_memory_gib=0.5))
    assert resolve_num_blocks(loaded(), cpu, torch.float32) == int(0.5 * GIB // kv_block_bytes(SPEC, 16, torch.float32))
    assert resolve_num_blocks(loaded(), config(num_blocks=7), torch.bfloat16) == 7


def test_one_model_takes_what_is_free_less_the_kept_back_share(monkeypatch):
    gpu = FakeGPU(total=80 * GIB, used=2 * GIB)
    monkeypatch.setattr(torch.cuda, "mem_get_info", gpu.mem_get_info)
    blocks = resolve_num_blocks(loaded(), config(gpu_memory_utilization=0.9), torch.bfloat16)
    assert blocks == int((78 - 8) * GIB // PER_BLOCK)
    assert gpu.devices == [torch.device("cuda:0")]  # the engine's own device, not the current one


@pytest.mark.parametrize("tasks", [
    ["generate", "translate"],
    ["generate", "embed", "generate", "classify", "translate"],
])
def test_models_loaded_one_after_another_get_equal_caches(monkeypatch, tasks):
    gpu = FakeGPU(total=80 * GIB, used=1 * GIB)
    monkeypatch.setattr(torch.cuda, "mem_get_info", gpu.mem_get_info)
    caches = []
    for task, share in zip(tasks, kv_shares(tasks)):
        gpu.take(0.25 * GIB)  # the model's weights, loaded before its cache is sized
        if task in ("embed", "classify"):  # encoders hold no KV cache
            assert share == 1.0
            continue
        blocks = resolve_num_blocks(loaded(task), config(gpu_kv_share=share), torch.bfloat16)
        gpu.take(blocks * PER_BLOCK)
        caches.append(blocks)
    assert len(caches) == sum(task not in ("embed", "classify") for task in tasks)
    # equal, but for the weights of models loaded after a cache was sized (without shares the first
    # would take all 70 GiB and the next none)
    assert max(caches) - min(caches) <= len(tasks) * 0.25 * GIB // PER_BLOCK
    assert gpu.free >= 8 * GIB - PER_BLOCK  # the kept-back 10 % is still free after the last cache


def test_a_budget_that_holds_no_block_is_an_error_naming_the_flags(monkeypatch):
    gpu = FakeGPU(total=80 * GIB, used=75 * GIB)  # another process holds the GPU
    monkeypatch.setattr(torch.cuda, "mem_get_info", gpu.mem_get_info)
    with pytest.raises(InvalidRequestError, match="no GPU memory left for smol.*--gpu-memory-utilization"):
        resolve_num_blocks(loaded("smol"), config(), torch.bfloat16)


@pytest.mark.parametrize("cache", [
    dict(gpu_memory_utilization=0.0), dict(gpu_memory_utilization=1.5), dict(gpu_kv_share=0.0),
    dict(kv_cache_memory_gib=-1.0),
])
def test_budget_settings_out_of_range_are_refused(cache):
    with pytest.raises(InvalidRequestError):
        CacheConfig(**cache)


def test_offline_llm_takes_the_gpu_budget_setting(tmp_path):
    from engine.llm import LLM

    with pytest.raises(InvalidRequestError, match="gpu_memory_utilization"):  # checked before any load
        LLM(str(tmp_path / "never-read"), gpu_memory_utilization=1.5)
