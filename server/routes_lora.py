"""POST /v1/load_lora_adapter and /v1/unload_lora_adapter (vLLM's runtime LoRA updating).

Included only with `--allow-runtime-lora-updating` (vLLM's VLLM_ALLOW_RUNTIME_LORA_UPDATING):
anyone who can reach the port could otherwise make the server read any folder it can see.
"""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse

from engine.lora import LoRAModule
from server.openapi import answers
from server.schemas import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest
from server.state import get_state, load_lora

router = APIRouter()


@router.post("/v1/load_lora_adapter", response_class=PlainTextResponse, responses=answers(None, (400, 401, 404)))
async def load_lora_adapter(body: LoadLoRAAdapterRequest, request: Request) -> Any:
    """Load a PEFT adapter folder; requests then name it as their `model`."""
    state = get_state(request)
    module = LoRAModule(body.lora_name, body.lora_path, body.base_model_name)
    await state.async_engine.call(lambda: load_lora(state.served, module))
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post("/v1/unload_lora_adapter", response_class=PlainTextResponse, responses=answers(None, (400, 401, 404)))
async def unload_lora_adapter(body: UnloadLoRAAdapterRequest, request: Request) -> Any:
    """Unload an adapter no request is running or waiting on."""
    state = get_state(request)
    engine = state.engine(body.lora_name)
    await state.async_engine.call(lambda: engine.remove_lora(body.lora_name))
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
