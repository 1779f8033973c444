"""What every route reads from `app.state.kv`: the async engine, served models, settings, metrics."""
from __future__ import annotations

import asyncio
import uuid
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from engine.async_engine import AsyncEngine
from engine.errors import InvalidRequestError, ModelNotFoundError
from engine.lora import LoRAModule
from server.metrics import ServerMetrics
from server.responses_store import ResponseStore
from server.settings import ServerSettings


def task_of(engine: Any) -> str:
    """"generate" | "embed" | "classify" | "translate" (the engine's ModelInfo.task, a str enum)."""
    task = engine.info.task
    return getattr(task, "value", task)


@dataclass
class ServerState:
    async_engine: AsyncEngine
    served: dict[str, Any]  # served name -> engine (with .info and .tokenizer)
    settings: ServerSettings
    metrics: ServerMetrics
    responses: ResponseStore  # stored /v1/responses answers
    # background /v1/responses still running, by response id (POST .../cancel cancels them)
    background: dict[str, asyncio.Task] = field(default_factory=dict)

    def engine(self, model: str) -> Any:
        """The engine serving `model` (a served model's name, or a LoRA adapter's that one of
        them has loaded); a 404 when none does."""
        engine = self.served.get(self.async_engine.serving(model))
        if engine is None:
            raise ModelNotFoundError(f"The model `{model}` does not exist. Served: {sorted(self.names())}", "model")
        return engine

    def names(self) -> list[str]:
        return served_names(self.served)

    def resolve(self, model: str | None, task: str | tuple[str, ...]) -> tuple[str, Any]:
        """The (name, engine) a request addresses; `None` picks the first model of the first task
        (in the order given) that one serves."""
        tasks = (task,) if isinstance(task, str) else task
        wanted = " or ".join(repr(t) for t in tasks)
        if model is None:
            for t in tasks:
                for name, engine in self.served.items():
                    if task_of(engine) == t:
                        return name, engine
            raise ModelNotFoundError(f"no model serving {wanted} is loaded; see GET /v1/models", "model")
        engine = self.engine(model)
        if task_of(engine) not in tasks:
            raise InvalidRequestError(f"model {model!r} serves {task_of(engine)!r} requests, not {wanted}", "model")
        return model, engine


def served_names(served: dict[str, Any]) -> list[str]:
    """Every name a request may use: the served models, then their LoRA adapters."""
    return list(served) + [a for e in served.values() for a in getattr(e, "lora_names", ())]


def load_lora(served: dict[str, Any], module: LoRAModule) -> None:
    """Load a LoRA adapter (--lora-modules, POST /v1/load_lora_adapter) under a name no model or
    adapter has, into the generation model it names (default: the first one served). Call it
    where the engines are stepped."""
    if module.name in served_names(served):
        raise InvalidRequestError(f"the name {module.name!r} is already served; unload it first", "lora_name")
    base = module.base_model_name
    if base is not None and base not in served:
        raise ModelNotFoundError(f"The model `{base}` does not exist. Served: {sorted(served)}", "base_model_name")
    bases = [name for name, engine in served.items() if hasattr(engine, "add_lora")]
    base = base or (bases[0] if bases else None)
    if base not in bases:
        raise InvalidRequestError(f"base model {base!r} is not a served generation model; served: {bases}",
                                  "base_model_name")
    served[base].add_lora(module.name, module.path)


def get_state(request: Request) -> ServerState:
    return request.app.state.kv


def lora_name(engine: Any, model: str) -> str | None:
    """The LoRA adapter a request's `model` names on `engine`; None: the base model."""
    return model if model in getattr(engine, "lora_names", ()) else None


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def new_item_id(prefix: str) -> str:
    """Ids in the Responses and Messages APIs' form (`resp_...`, `msg_...`, `fc_...`)."""
    return f"{prefix}_{uuid.uuid4().hex}"
