"""align's own rollout worker over HTTP (`align rollout serve --engine hf`): one HF engine,
loopback by default, token ids in and out. It is the engine that records MoE routes on CPU.

Routes: `GET /health` (model, engine, weight_version), `POST /generate` (JSON: prompt_token_ids,
n, sampling, return_routes), `POST /update_weights?version=V` (body: a safetensors payload, see
rollout.wire), `POST /sleep`, `POST /wake`. Engine calls are serialised with a lock: engines are
not re-entrant.

`return_routes: true` (MoE routing replay) is per request, so one worker serves runs with and
without replay: the HF engine records each completion token's experts for that request only
(format in rollout.wire); a dense model refuses the request (HTTP 400) with the reason, which
the client raises as AlignError.

Weights travel in the HTTP body: fine for one machine and small models. vLLM rollout servers
(`--engine vllm`) are stock `vllm serve` instead (rollout.vllm_launch), with weights over a
torch.distributed group (rollout.transfer_gloo).
"""

from __future__ import annotations

import threading

from fastapi import FastAPI, HTTPException, Request
from pydantic import BaseModel, Field

from align.errors import AlignError
from rollout.hf import HFEngine
from rollout.wire import sample_to_json, sampling_from_json, unpack_weights


class GenerateRequest(BaseModel):
    prompt_token_ids: list[list[int]]
    n: int = Field(1, ge=1)
    sampling: dict = Field(default_factory=dict)  # rollout.base.SamplingParams fields
    return_routes: bool = False  # MoE expert ids per completion token (routing replay)


def create_app(engine: HFEngine, model_name: str) -> FastAPI:
    app = FastAPI(title="align rollout worker")
    lock = threading.Lock()

    def health() -> dict:
        return {"model": model_name, "engine": "hf", "weight_version": engine.weight_version}

    @app.get("/health")
    def get_health() -> dict:
        return health()

    @app.post("/generate")
    def generate(req: GenerateRequest) -> dict:
        try:
            sampling = sampling_from_json(req.sampling)
            with lock:
                engine.record_routes = req.return_routes  # a dense model then refuses (no routers)
                groups = engine.generate(req.prompt_token_ids, req.n, sampling)
        except (AlignError, TypeError, ValueError) as exc:  # the request's fault: do not retry
            raise HTTPException(status_code=400, detail=str(exc)) from exc
        return {"groups": [[sample_to_json(s) for s in g] for g in groups],
                "weight_version": engine.weight_version}

    @app.post("/update_weights")
    async def update_weights(request: Request, version: int | None = None) -> dict:
        payload = await request.body()
        with lock:
            try:
                engine.update_weights(unpack_weights(payload))
            except AlignError as exc:
                raise HTTPException(status_code=400, detail=str(exc)) from exc
            if version is not None:  # the trainer's count is authoritative across workers
                engine.weight_version = version
        return health()

    @app.post("/sleep")
    def sleep() -> dict:
        with lock:
            engine.sleep()
        return health()

    @app.post("/wake")
    def wake() -> dict:
        with lock:
            engine.wake()
        return health()

    return app


def serve(model_dir: str, host: str, port: int, dtype: str = "auto") -> None:
    """Load the engine, then serve until killed (samples are seeded per request)."""
    import uvicorn

    engine = HFEngine.from_pretrained(model_dir, dtype="float32" if dtype == "auto" else dtype)
    uvicorn.run(create_app(engine, str(model_dir)), host=host, port=port, log_level="warning")
