"""The serving baseline: transformers `generate()` per request behind kvserve's API shape.

What a team gets by wrapping `model.generate()` in FastAPI: `POST /v1/completions` (token-id or
text prompt, `max_tokens`, `stream` as OpenAI SSE chunks, one per token, `usage` at the end).
Requests run one at a time under a lock: concurrent `generate()` calls on a CPU only fight for
the same cores (measured: slower than serial), so serial is the baseline's best case.

    python benchmarks/hf_baseline_server.py --folder HF_FOLDER --port 8001
"""
from __future__ import annotations

import argparse
import asyncio
import json
import threading
from collections.abc import AsyncIterator
from typing import Any

import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.streamers import BaseStreamer


class _QueueStreamer(BaseStreamer):
    """Hands each new token id to the event loop as generate() produces it."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> None:
        self.loop, self.queue, self.skipped_prompt = loop, queue, False

    def put(self, value: torch.Tensor) -> None:
        if not self.skipped_prompt:  # generate() first "streams" the prompt
            self.skipped_prompt = True
            return
        for token in value.reshape(-1).tolist():
            self.loop.call_soon_threadsafe(self.queue.put_nowait, token)

    def end(self) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, None)


def create_app(folder: str) -> FastAPI:
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    lock = threading.Lock()
    app = FastAPI()

    def generate(ids: list[int], max_tokens: int, streamer: BaseStreamer | None) -> list[int]:
        with lock, torch.inference_mode():
            out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                 max_new_tokens=max_tokens, min_new_tokens=max_tokens, do_sample=False,
                                 pad_token_id=tokenizer.eos_token_id, streamer=streamer)
        return out[0, len(ids):].tolist()

    @app.get("/health")
    async def health() -> dict:
        return {}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await request.json()
        prompt = body["prompt"]
        ids = tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
        max_tokens = int(body.get("max_tokens", 16))
        loop = asyncio.get_running_loop()
        if not body.get("stream"):
            tokens = await loop.run_in_executor(None, generate, ids, max_tokens, None)
            return JSONResponse({"object": "text_completion", "choices": [
                {"index": 0, "text": tokenizer.decode(tokens), "finish_reason": "length"}],
                "usage": {"prompt_tokens": len(ids), "completion_tokens": len(tokens)}})
        queue: asyncio.Queue = asyncio.Queue()
        task = loop.run_in_executor(None, generate, ids, max_tokens, _QueueStreamer(loop, queue))

        async def events() -> AsyncIterator[str]:
            n = 0
            while (token := await queue.get()) is not None:
                n += 1
                chunk = {"object": "text_completion", "choices": [
                    {"index": 0, "text": tokenizer.decode([token]), "finish_reason": None}]}
                yield f"data: {json.dumps(chunk)}\n\n"
            await task
            usage = {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}
            yield f"data: {json.dumps({'object': 'text_completion', 'choices': [], 'usage': usage})}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--folder", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8001)
    args = ap.parse_args()
    uvicorn.run(create_app(args.folder), host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
