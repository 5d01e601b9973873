"""align's own rollout worker over HTTP (`align rollout serve --engine hf`): one HF engine,
loopback by default, token ids in and out. It is the engine that records MoE routes on CPU.

Routes: `GET /health` (model, engine, dtype, weight_version, and `update`: where a weight update
stands), `POST /generate` (JSON: prompt_token_ids, n, sampling, return_routes),
`POST /prompt_logprobs` (the sync check's probe), `POST /sleep`, `POST /wake`, and the
weight-update lifecycle of vLLM's RL routes:

- `POST /init_weight_transfer_engine {"init_info": {master_address, master_port, world_size,
  timeout_s}}`: join the trainer's gloo group as rank 1 (rollout.gloo_group); answers once joined.
  The group's id (`address:port`) names it in the next calls;
- `POST /start_weight_update {"group": id, "update_info": GroupLayout}`: check the layout fits the
  model (names, shapes; on meta tensors) before any tensor moves, refuse generation from now on
  (503, retried elsewhere: the weights are about to be half new). 409 when this worker is not in
  that group (it restarted): the trainer joins it anew;
- `POST /update_weights`: receive the layout's tensors group by group while the trainer broadcasts
  them, each layer group loaded into the model before the next is received, so the transfer
  holds one layer group, never the model;
- `POST /finish_weight_update {"weight_version": V}`: the trainer's count (authoritative across
  workers) becomes this worker's version; generation resumes.

No weights travel in HTTP bodies. Engine calls are serialised with a lock: engines are not
re-entrant. A failed receive leaves the worker refusing generation until a whole update lands.

`return_routes: true` (MoE routing replay) is per request, so one worker serves runs with and
without replay: the HF engine records each completion token's experts for that request only
(format in rollout.wire); a dense model refuses the request (HTTP 400) with the reason, which
the client raises as AlignError.
"""

from __future__ import annotations

import threading

from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, Field

from align.errors import AlignError
from rollout.gloo_group import GroupLayout, open_group, receive_groups
from rollout.hf import HFEngine
from rollout.wire import sample_to_json, sampling_from_json


class GenerateRequest(BaseModel):
    prompt_token_ids: list[list[int]]
    n: int = Field(1, ge=1)
    sampling: dict = Field(default_factory=dict)  # rollout.base.SamplingParams fields
    return_routes: bool = False  # MoE expert ids per completion token (routing replay)


class ProbeRequest(BaseModel):
    token_ids: list[int] = Field(min_length=2)


class InitInfo(BaseModel):
    master_address: str
    master_port: int
    world_size: int = Field(2, ge=2)
    rank: int = Field(1, ge=1)
    timeout_s: float = Field(600.0, gt=0)


class InitRequest(BaseModel):
    init_info: InitInfo


class StartRequest(BaseModel):
    group: str
    update_info: dict  # rollout.gloo_group.GroupLayout fields


class FinishRequest(BaseModel):
    weight_version: int


class Receiver:
    """The worker's end of the weight transfer: its group, and where the update stands:
    serving → started (layout checked) → receiving → received → serving (finish). Only a
    serving worker generates; one whose receive failed stays `receiving` until an update lands."""

    def __init__(self) -> None:
        self.group = None
        self.group_id: str | None = None
        self.layout: GroupLayout | None = None
        self.stage = "serving"

    def refuse_generation(self) -> None:
        if self.stage != "serving":
            raise HTTPException(status_code=503, detail=f"weight update {self.stage}: this worker serves "
                                                        "again once a whole update has landed")

    def expect(self, stage: str, call: str) -> None:
        if self.stage != stage:
            raise HTTPException(status_code=400, detail=f"weight update is {self.stage}, not {stage}: "
                                                        f"call {call} first")


def create_app(engine: HFEngine, model_name: str) -> FastAPI:
    app = FastAPI(title="align rollout worker")
    lock = threading.Lock()
    receiver = Receiver()
    dtype = str(next(engine.model.parameters()).dtype).removeprefix("torch.")

    def health() -> dict:
        return {"model": model_name, "engine": "hf", "dtype": dtype, "weight_version": engine.weight_version,
                "update": receiver.stage}

    @app.get("/health")
    def get_health() -> dict:
        return health()

    @app.post("/generate")
    def generate(req: GenerateRequest) -> dict:
        try:
            sampling = sampling_from_json(req.sampling)
            with lock:  # checked under the lock: no generate call sees half-received weights
                receiver.refuse_generation()
                engine.record_routes = req.return_routes  # a dense model then refuses (no routers)
                groups = engine.generate(req.prompt_token_ids, req.n, sampling)
        except (AlignError, TypeError, ValueError) as exc:  # the request's fault: do not retry
            raise HTTPException(status_code=400, detail=str(exc)) from exc
        return {"groups": [[sample_to_json(s) for s in g] for g in groups],
                "weight_version": engine.weight_version}

    @app.post("/prompt_logprobs")
    def prompt_logprobs(req: ProbeRequest) -> dict:
        with lock:
            receiver.refuse_generation()
            return {"logprobs": engine.prompt_logprobs(req.token_ids), "weight_version": engine.weight_version}

    @app.post("/init_weight_transfer_engine")
    def init_transfer(req: InitRequest) -> dict:
        info = req.init_info
        group = open_group(info.master_address, info.master_port, info.rank, info.world_size, info.timeout_s)
        receiver.group, receiver.group_id = group, f"{info.master_address}:{info.master_port}"
        return health()

    @app.post("/start_weight_update")
    def start_update(req: StartRequest) -> dict:
        if receiver.group is None or req.group != receiver.group_id:
            raise HTTPException(status_code=409, detail=f"not in transfer group {req.group} (this worker is in "
                                                        f"{receiver.group_id}): call /init_weight_transfer_engine")
        try:
            layout = GroupLayout(**req.update_info)
            engine.check_weights(spec for specs in layout.groups() for spec in specs)
        except (AlignError, TypeError, ValueError, AttributeError) as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from exc
        with lock:  # a generate call under way finishes on the old weights first
            receiver.layout, receiver.stage = layout, "started"
        return health()

    @app.post("/update_weights")
    def update_weights() -> dict:
        receiver.expect("started", "/start_weight_update")
        receiver.stage, error = "receiving", None
        with lock:
            for pairs in receive_groups(receiver.group, receiver.layout):
                try:  # checked at start; still, a group that fails to load must not stall the sender
                    if error is None:
                        engine.load_weights(pairs)
                except AlignError as exc:
                    error = exc
        if error is not None:
            raise HTTPException(status_code=400, detail=str(error))
        receiver.stage = "received"
        return health()

    @app.post("/finish_weight_update")
    def finish_update(req: FinishRequest) -> dict:
        receiver.expect("received", "/update_weights")
        engine.weight_version, receiver.stage = req.weight_version, "serving"
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
