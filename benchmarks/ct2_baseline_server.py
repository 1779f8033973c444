"""The translation serving baseline: CTranslate2 behind kvserve's `/v1/translations` shape.

What a team gets by putting `ctranslate2.Translator` behind FastAPI the usual way, with dynamic
batching: requests that arrive while a batch runs wait, then go together in the next
`translate_batch` call (at most --max-batch). CTranslate2 has no continuous batching: a batch
runs until its longest output ends, and newcomers wait for it.

    python benchmarks/ct2_baseline_server.py --folder HF_MARIAN_FOLDER --port 8002
"""
from __future__ import annotations

import argparse
import asyncio
import queue
import sys
import tempfile
import threading
from pathlib import Path

import ctranslate2
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from models.loader import load_model  # noqa: E402  (same tokenizer and ids as kvserve)

Job = tuple[list[str], int, int, asyncio.AbstractEventLoop, asyncio.Future]


def _worker(translator: ctranslate2.Translator, jobs: queue.Queue, max_batch: int) -> None:
    while True:
        batch: list[Job] = [jobs.get()]
        while len(batch) < max_batch:
            try:
                batch.append(jobs.get_nowait())
            except queue.Empty:
                break
        groups: dict[tuple[int, int], list[Job]] = {}
        for job in batch:  # one translate_batch per (beams, max_tokens)
            groups.setdefault((job[1], job[2]), []).append(job)
        for (beams, max_tokens), group in groups.items():
            results = translator.translate_batch([j[0] for j in group], beam_size=beams,
                                                 max_decoding_length=max_tokens, max_batch_size=max_batch)
            for (_, _, _, loop, fut), res in zip(group, results):
                loop.call_soon_threadsafe(fut.set_result, res.hypotheses[0])


def build_app(folder: str, max_batch: int) -> FastAPI:
    out_dir = Path(tempfile.mkdtemp(prefix="kvserve-ct2-server-"))
    ctranslate2.converters.TransformersConverter(folder).convert(str(out_dir), quantization="float32", force=True)
    translator = ctranslate2.Translator(str(out_dir), device="cpu", compute_type="float32", intra_threads=0)
    tok = load_model(folder).tokenizer
    jobs: queue.Queue = queue.Queue()
    threading.Thread(target=_worker, args=(translator, jobs, max_batch), daemon=True).start()
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.post("/v1/translations")
    async def translate(request: Request) -> JSONResponse:
        body = await request.json()
        texts = [body["input"]] if isinstance(body["input"], str) else body["input"]
        loop = asyncio.get_running_loop()
        futures = []
        for text in texts:
            fut = loop.create_future()
            pieces = [tok.id_to_token(i) for i in tok.encode(text)]
            jobs.put((pieces, int(body.get("num_beams") or 1), int(body.get("max_tokens") or 64), loop, fut))
            futures.append(fut)
        hyps = await asyncio.gather(*futures)
        data = [{"index": i, "text": "".join(h).replace("\u2581", " ").strip()} for i, h in enumerate(hyps)]
        tokens = sum(len(h) for h in hyps)
        return JSONResponse({"object": "translation", "data": data,
                             "usage": {"prompt_tokens": 0, "completion_tokens": tokens, "total_tokens": tokens}})

    return app


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--folder", required=True)
    ap.add_argument("--port", type=int, default=8002)
    ap.add_argument("--max-batch", type=int, default=32)
    args = ap.parse_args()
    uvicorn.run(build_app(args.folder, args.max_batch), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
