"""`kvserve serve`: load models, wrap them in an AsyncEngine, serve the OpenAI API with uvicorn.

Every flag can also come from an environment variable `KVSERVE_<FLAG>` (e.g. KVSERVE_PORT=9000,
KVSERVE_MODEL=smollm2,minilm); a flag on the command line wins. Each model is served by the task
its architecture implies (generation, embeddings, translation), all from one process.
SIGTERM: uvicorn stops accepting, in-flight requests get --shutdown-timeout seconds, the rest
are aborted by AsyncEngine.shutdown.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import re
import sys
from typing import Any

DEFAULT_MODELS = ("smollm2", "minilm")
DTYPES = ("float32", "bfloat16", "float16")
ENCODER_TASKS = ("embed", "classify")  # served by the embedding engine; no KV cache

log = logging.getLogger("kvserve")


def _env_name(flag: str) -> str:
    return "KVSERVE_" + flag.upper().replace("-", "_")


def _env(flag: str, default: Any) -> Any:
    return os.environ.get(_env_name(flag), default)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kvserve", description="kvserve inference server")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("serve", help="serve models over an OpenAI-compatible HTTP API")

    def opt(flag: str, typ: type, default: Any, help_: str) -> None:
        serve.add_argument(f"--{flag}", type=typ, default=_env(flag, default), help=f"{help_} (env {_env_name(flag)})")

    def switch(flag: str, help_: str) -> None:
        """Off unless given, or unless its environment variable is set to anything but 0."""
        serve.add_argument(f"--{flag}", action="store_true", default=_env(flag, "0") not in ("0", ""),
                           help=f"{help_} (env {_env_name(flag)}=1)")

    env_models = _env("model", None)
    serve.add_argument("--model", action="append", default=None,
                       help="path (HF folder or .gguf) or alias; repeat to serve several "
                            f"(env KVSERVE_MODEL, comma-separated; default {', '.join(DEFAULT_MODELS)})")
    serve.set_defaults(env_models=env_models.split(",") if env_models else None)
    env_names = _env("served-model-name", None)
    serve.add_argument("--served-model-name", nargs="+", action="extend", default=None, metavar="NAME",
                       help="the name requests use for each --model, in --model order (default: the alias, or the "
                            "folder's or GGUF file's name; env KVSERVE_SERVED_MODEL_NAME, comma-separated)")
    serve.set_defaults(env_served_model_names=env_names.split(",") if env_names else None)
    opt("host", str, "127.0.0.1", "address to bind")
    opt("port", int, 8000, "port to bind")
    opt("dtype", str, "auto", "model dtype: auto (bfloat16 on a GPU, float32 on CPU), float32, bfloat16, float16")
    opt("device", str, "auto", "auto (cuda where a GPU is found, else cpu), cpu or cuda[:N]")
    opt("num-kv-blocks", int, None, "KV-cache blocks per model (default: from the memory budget)")
    opt("kv-cache-memory-gib", float, 1.0, "CPU KV-cache budget per model")
    opt("gpu-memory-utilization", float, 0.9, "share of GPU memory for weights + KV cache")
    opt("max-num-batched-tokens", int, 2048, "token budget of one engine step")
    opt("max-num-seqs", int, 64, "sequences running at once")
    serve.add_argument("--scheduling-policy", choices=("fcfs", "priority"), default=_env("scheduling-policy", "fcfs"),
                       help="fcfs: first come, first served; priority: requests' `priority` first (lower first, "
                            "then arrival), preempting running requests a waiting one outranks "
                            "(env KVSERVE_SCHEDULING_POLICY)")
    opt("max-model-len", int, None, "context limit (default: the model's own)")
    switch("no-enable-prefix-caching", "compute every prompt in full, even where its start is cached "
           "(prefix caching is on by default for generation)")
    switch("enforce-eager", "CUDA: run decode steps eagerly, no CUDA graphs")
    switch("no-run-ahead", "CUDA: read each step's tokens before launching the next")
    opt("gemv-max-rows", int, 0, "CUDA: decode batches of up to this many sequences run their matmuls "
        "as fused Triton GEMVs (0: cuBLAS)")
    switch("enable-pdl", "CUDA, Hopper or newer: decoder layers' Triton kernels launch while the previous one "
           "drains (programmatic dependent launch)")
    opt("speculative-config", str, None, "n-gram speculative decoding for generation models, as vLLM's JSON: "
        '\'{"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}\' '
        "(drafts copied from the prompt and output, verified in one step; off by default)")
    switch("enable-lora", "generation models serve PEFT LoRA adapters, which requests name as their model")
    serve.add_argument("--lora-modules", nargs="+", action="extend", default=None, metavar="MODULE",
                       help="adapters to load at start, as name=path or JSON {\"name\", \"path\", "
                            "\"base_model_name\"} (vLLM's forms; implies --enable-lora; env KVSERVE_LORA_MODULES, "
                            "space-separated name=path)")
    serve.set_defaults(env_lora_modules=(_env("lora-modules", "") or "").split() or None)
    opt("max-loras", int, 4, "distinct LoRA adapters running at once (others' requests wait)")
    opt("max-lora-rank", int, 16, "largest LoRA rank an adapter may have")
    switch("allow-runtime-lora-updating", "serve POST /v1/load_lora_adapter and /v1/unload_lora_adapter "
           "(any folder the server can read may then be loaded)")
    opt("tool-call-parser", str, None, "how tool_choice auto answers are read: hermes (<tool_call> JSON "
        "</tool_call>, Qwen2.5/Hermes), llama3_json (the answer is JSON calls, Llama 3.1-3.3), pythonic "
        "([f(a=1)], Llama 3.2/4) or mistral ([TOOL_CALLS] then the calls); unset, auto is refused (required and named functions work)")
    opt("reasoning-parser", str, None, "split a chat answer's <think> block into the message's reasoning: "
        "deepseek_r1 (the template opens the block: DeepSeek-R1, QwQ) or qwen3 (the answer opens it)")
    opt("generation-config", str, "auto", "auto: a model's generation_config.json sampling settings (temperature, "
        "top_p, top_k, min_p, repetition_penalty, max_new_tokens) are the defaults of requests that set none, as "
        "vLLM applies them; vllm: the API's own defaults")
    opt("responses-store-size", int, 1024, "Responses API answers kept in memory (the oldest go first) for "
        "GET /v1/responses/{id} and previous_response_id; 0 keeps none")
    opt("api-key", str, None, "requests other than health, metrics and version must send "
        "'Authorization: Bearer <key>' (prefer the environment variable: flags show in ps)")
    opt("max-waiting", int, 256, "waiting requests per model before 503")
    opt("max-body-bytes", int, 4 * 1024 * 1024, "largest request body (413 beyond)")
    opt("shutdown-timeout", float, 10.0, "seconds in-flight requests get on SIGTERM")
    opt("log-level", str, "info", "uvicorn log level")
    return parser


def resolve_placement(device: str, dtype: str, cuda_devices: int) -> tuple[str, str]:
    """The concrete (device, dtype) for the flags, given how many CUDA devices torch sees.

    Like vLLM's defaults: a GPU where one is found, in bfloat16 (the dtype SmolLM2, LLaMA and
    MiniLM train in; the Triton kernels take it), and CPU in float32 (oneDNN's packed Linears)
    everywhere else. Raises ValueError with the reason for a value that cannot run here.
    """
    if device == "auto":
        device = "cuda" if cuda_devices else "cpu"
    match = re.fullmatch(r"cpu|cuda(?::(\d+))?", device)
    if match is None:
        raise ValueError(f"--device must be auto, cpu or cuda[:N], got {device!r}")
    if device.startswith("cuda"):
        index = int(match.group(1) or 0)
        if index >= cuda_devices:
            found = f"{cuda_devices} CUDA device(s)" if cuda_devices else "no CUDA device"
            raise ValueError(f"--device {device}: torch sees {found}")
    if dtype == "auto":
        dtype = "bfloat16" if device.startswith("cuda") else "float32"
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be auto or one of {', '.join(DTYPES)}, got {dtype!r}")
    return device, dtype


def speculative_config(text: str | None) -> Any:
    """--speculative-config's JSON as a SpeculativeConfig (None: off); ValueError names what is wrong."""
    from engine.errors import InvalidRequestError
    from engine.speculative import SpeculativeConfig

    if not text:
        return None
    try:
        fields = json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f"--speculative-config must be a JSON object: {err}") from None
    if not isinstance(fields, dict):
        raise ValueError("--speculative-config must be a JSON object")
    try:
        return SpeculativeConfig.from_dict(fields)
    except (InvalidRequestError, TypeError) as err:
        raise ValueError(f"--speculative-config: {err}") from None


def _cuda_devices() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def engine_config(model: str, args: argparse.Namespace, gpu_kv_share: float = 1.0,
                  served_name: str | None = None) -> Any:
    from engine.config import CacheConfig, EngineConfig, SchedulerConfig

    return EngineConfig(
        model=model,
        served_name=served_name,
        dtype=args.dtype,
        device=args.device,
        max_model_len=args.max_model_len,
        decode_graphs=False if args.enforce_eager else None,
        run_ahead=False if args.no_run_ahead else None,
        gemv_max_rows=args.gemv_max_rows,
        enable_pdl=args.enable_pdl,
        speculative=speculative_config(args.speculative_config),
        cache=CacheConfig(num_blocks=args.num_kv_blocks, kv_cache_memory_gib=args.kv_cache_memory_gib,
                          gpu_memory_utilization=args.gpu_memory_utilization, gpu_kv_share=gpu_kv_share,
                          enable_prefix_caching=not args.no_enable_prefix_caching),
        scheduler=SchedulerConfig(max_num_batched_tokens=args.max_num_batched_tokens,
                                  max_num_seqs=args.max_num_seqs, policy=args.scheduling_policy),
    )


def model_task(model: str) -> str:
    """The task a model's architecture implies, read from its config.json (GGUFs are converted first)."""
    from models.loader import resolve
    from models.registry import lookup

    _, folder = resolve(model)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    entry, _ = lookup(config.get("architectures") or [], folder)
    return entry.task.value


def kv_shares(tasks: list[str]) -> list[float]:
    """Each model's share of the GPU memory left for KV caches when it loads, in load order.

    Embedding models hold no cache. Of n models that do, the first takes 1/n of what is left, the
    next 1/(n-1) of what is left then, ..., the last all of it: equal parts, whatever each one's
    weights took before its cache was sized.
    """
    caches = [task not in ENCODER_TASKS for task in tasks]
    left = sum(caches)
    shares = []
    for cache in caches:
        shares.append(1.0 / left if cache else 1.0)
        left -= cache
    return shares


def served_model_names(args: argparse.Namespace, num_models: int) -> list[str | None]:
    """--served-model-name's names (or its environment variable's), one per model; None where a
    model keeps its own. SystemExit when they do not pair one to one with the models."""
    names = args.served_model_name or args.env_served_model_names
    if not names:
        return [None] * num_models
    if len(names) != num_models or not all(n.strip() for n in names):
        raise SystemExit(f"kvserve: --served-model-name gives {len(names)} name(s) for {num_models} model(s): "
                         "give one non-empty name per --model, in the same order")
    return [n.strip() for n in names]


def lora_modules(args: argparse.Namespace) -> list[Any]:
    """--lora-modules (or its environment variable) as LoRAModules; ValueError names a bad one."""
    from engine.errors import InvalidRequestError
    from engine.lora import LoRAModule

    try:
        return [LoRAModule.parse(text) for text in args.lora_modules or args.env_lora_modules or []]
    except InvalidRequestError as err:
        raise ValueError(f"--lora-modules: {err}") from None


def build_engine(model: str, task: str, args: argparse.Namespace, gpu_kv_share: float,
                 served_name: str | None = None) -> Any:
    config = engine_config(model, args, gpu_kv_share, served_name)
    if task == "generate":
        from engine.engine import LLMEngine
        from engine.lora import LoRAConfig

        if args.enable_lora:  # its adapters are loaded once every model is (they name their base by served name)
            config = dataclasses.replace(config, lora=LoRAConfig(max_loras=args.max_loras,
                                                                 max_lora_rank=args.max_lora_rank))
        return LLMEngine.from_config(config)
    if task in ENCODER_TASKS:  # embeddings and classifiers: one flat encoder pass per step
        from engine.embedding_engine import EmbeddingEngine

        return EmbeddingEngine.from_config(config)
    from engine.translation_engine import TranslationEngine  # type: ignore[import-not-found]

    return TranslationEngine.from_config(config)


def serve(args: argparse.Namespace) -> None:
    import uvicorn
    from prometheus_client import CollectorRegistry

    from engine.async_engine import AsyncEngine
    from engine.compute_thread import ComputeThread
    from engine.errors import InvalidRequestError, KVServeError
    from server import generation as gen
    from server.app import create_app
    from server.metrics import ServerMetrics
    from server.settings import ServerSettings
    from server.state import load_lora, task_of

    models = args.model or args.env_models or list(DEFAULT_MODELS)
    names = served_model_names(args, len(models))
    # the thread that loads the engines is the one that steps them (see engine/async_engine.py)
    compute = ComputeThread()
    served: dict[str, Any] = {}
    tasks = [model_task(model) for model in models]
    for model, task, share, served_name in zip(models, tasks, kv_shares(tasks), names):
        try:
            engine = compute.submit(build_engine, model, task, args, share, served_name).result()
        except InvalidRequestError as err:  # a budget or setting that cannot serve: say which, no traceback
            raise SystemExit(f"kvserve: cannot serve {model}: {err}") from None
        name = engine.info.name
        if name in served:
            raise SystemExit(f"two models would be served as {name!r}; serve one of them")
        served[name] = engine
        log.info("loaded %s (%s) from %s; %d KV-cache blocks", name, engine.info.task, engine.info.path,
                 engine.stats().num_blocks_total)
    for module in lora_modules(args):
        try:
            compute.submit(load_lora, served, module).result()
        except KVServeError as err:  # a name taken, a base not served, an adapter that does not fit
            raise SystemExit(f"kvserve: cannot load LoRA adapter {module.name!r}: {err}") from None
        log.info("loaded LoRA adapter %s from %s", module.name, module.path)
    settings = ServerSettings(host=args.host, port=args.port, max_body_bytes=args.max_body_bytes,
                              max_waiting=args.max_waiting, shutdown_timeout_s=args.shutdown_timeout,
                              tool_call_parser=args.tool_call_parser, reasoning_parser=args.reasoning_parser,
                              api_key=args.api_key or None,
                              allow_runtime_lora_updating=args.allow_runtime_lora_updating,
                              responses_store_size=args.responses_store_size,
                              generation_config=args.generation_config)
    for name, engine in served.items():
        defaults = gen.defaults_for(engine, settings) if task_of(engine) == "generate" else {}
        if defaults:  # as vLLM warns: answers differ from the API's defaults without the request saying so
            log.info("%s: requests that leave them unset take its generation_config.json's %s", name, defaults)
    metrics = ServerMetrics(CollectorRegistry())
    async_engine = AsyncEngine(served, max_waiting=settings.max_waiting, on_step=metrics.on_step,
                               executor=compute)
    app = create_app(async_engine, served, settings, metrics)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=args.log_level,
                timeout_graceful_shutdown=max(1, int(settings.shutdown_timeout_s)))


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command != "serve":
        return
    try:
        args.device, args.dtype = resolve_placement(args.device, args.dtype, _cuda_devices())
    except ValueError as err:
        parser.error(str(err))
    try:  # refused here, with the usage line, rather than when the first model loads
        speculative_config(args.speculative_config)
    except ValueError as err:
        parser.error(str(err))
    try:
        if lora_modules(args):
            args.enable_lora = True
    except ValueError as err:
        parser.error(str(err))
    if args.enable_lora:
        from engine.errors import InvalidRequestError
        from engine.lora import LoRAConfig

        try:
            LoRAConfig(max_loras=args.max_loras, max_lora_rank=args.max_lora_rank)
        except InvalidRequestError as err:
            parser.error(str(err))
    from server.settings import check_generation_config, check_parsers

    try:  # the settings' own check, run before any model loads
        check_parsers(args.tool_call_parser, args.reasoning_parser, ("--tool-call-parser", "--reasoning-parser"))
    except ValueError as err:
        parser.error(str(err))
    if args.allow_runtime_lora_updating and not args.enable_lora:
        parser.error("--allow-runtime-lora-updating needs --enable-lora")
    try:
        check_generation_config(args.generation_config, "--generation-config")
    except ValueError as err:
        parser.error(str(err))
    for flag, given in (("--gemv-max-rows", args.gemv_max_rows), ("--enable-pdl", args.enable_pdl)):
        if given and not args.device.startswith("cuda"):
            parser.error(f"{flag} runs Triton kernels on a GPU: it needs --device cuda")
    log.info("serving on %s in %s", args.device, args.dtype)
    serve(args)


if __name__ == "__main__":
    sys.exit(main())
