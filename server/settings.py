"""Frozen settings of the HTTP layer (the engines have their own EngineConfig)."""
from __future__ import annotations

from dataclasses import dataclass

from server import reasoning
from server.tool_parsers import PARSERS


def check_parsers(tool_call_parser: str | None, reasoning_parser: str | None,
                  names: tuple[str, str] = ("tool_call_parser", "reasoning_parser")) -> None:
    """ValueError naming the parser setting that holds an unknown name (`names`: the CLI names its flags)."""
    for name, given, known in zip(names, (tool_call_parser, reasoning_parser), (PARSERS, reasoning.PARSERS)):
        if given is not None and given not in known:
            raise ValueError(f"{name} must be one of {', '.join(known)}, got {given!r}")


def check_generation_config(value: str, name: str = "generation_config") -> None:
    """ValueError unless `value` is one of --generation-config's: auto (the model's) or vllm (the API's)."""
    if value not in ("auto", "vllm"):
        raise ValueError(f"{name} must be auto or vllm, got {value!r}")


@dataclass(frozen=True)
class ServerSettings:
    """What the HTTP front needs: where to listen, request limits, and how to shut down."""

    host: str = "127.0.0.1"
    port: int = 8000
    max_body_bytes: int = 4 * 1024 * 1024  # bigger bodies get 413 before any JSON parsing
    max_waiting: int = 256  # per model; beyond it requests get 503 + Retry-After
    retry_after_s: int = 1
    shutdown_timeout_s: float = 10.0  # in-flight requests get this long on SIGTERM, then are aborted
    max_prompts_per_request: int = 64  # /v1/completions accepts a list of prompts
    max_embedding_inputs: int = 2048  # OpenAI's limit on inputs per /v1/embeddings call
    tool_call_parser: str | None = None  # how `tool_choice: auto` answers are read (server/tools.py); None: refused
    reasoning_parser: str | None = None  # how a chat answer's thinking block is split off (server/reasoning.py)
    api_key: str | None = None  # requests must send `Authorization: Bearer <key>` (server/auth.py); None: open
    allow_runtime_lora_updating: bool = False  # POST /v1/load_lora_adapter and /v1/unload_lora_adapter exist
    responses_store_size: int = 1024  # /v1/responses answers kept for retrieval and previous_response_id; 0: none
    # vLLM's --generation-config: "auto" takes each model's generation_config.json sampling settings as the
    # defaults of requests that leave them unset (server/generation.py); "vllm" keeps the API's own defaults
    generation_config: str = "auto"

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in [0, 65535], got {self.port}")
        if self.max_body_bytes < 1024:
            raise ValueError(f"max_body_bytes must be at least 1024, got {self.max_body_bytes}")
        check_parsers(self.tool_call_parser, self.reasoning_parser)
        if self.api_key == "":
            raise ValueError("api_key must not be empty (leave it unset for an open server)")
        check_generation_config(self.generation_config)
        if self.responses_store_size < 0:
            raise ValueError(f"responses_store_size must be >= 0, got {self.responses_store_size}")
        if self.max_waiting < 1:
            raise ValueError(f"max_waiting must be positive, got {self.max_waiting}")
