"""The fleet: live (and recently gone) workers from their heartbeats, and control of one
worker's model: swap it for another configured model, or unload it."""

from __future__ import annotations

from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from api.errors import ApiError, from_validation
from api.jobs import parse_json, read_body
from broker import control
from broker.fleet import fleet_view

Body = TypeVar("Body", bound=BaseModel)
CONTROL_WAIT_S = 15.0  # the worker answers at once: it checks, then swaps in the background


class LoadModel(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, description="a configured model name")
    requeue: bool = Field(False, description="requeue the jobs in flight instead of waiting")


class Unload(BaseModel):
    model_config = ConfigDict(extra="forbid")

    requeue: bool = False


async def fleet(state: Any) -> list[dict[str, Any]]:
    beats = await fleet_view(state.redis, state.keys, state.settings.heartbeat_ttl_s,
                             state.settings.worker_gone_retention_s)
    return sorted(beats, key=lambda b: (not b["live"], b["name"]))


async def list_workers(request: Request) -> JSONResponse:
    return JSONResponse({"object": "list", "data": await fleet(request.app.state)})


async def worker_of(request: Request) -> dict[str, Any]:
    name = request.path_params["name"]
    for beat in await fleet(request.app.state):
        if beat["name"] == name:
            return beat
    raise ApiError(404, "not_found", f"no worker {name!r} (live or recently gone)", "name")


async def get_worker(request: Request) -> JSONResponse:
    return JSONResponse(await worker_of(request))


async def body_of(request: Request, model: type[Body]) -> Body:
    raw = await read_body(request, request.app.state.settings.max_body_bytes)
    try:
        return model.model_validate(parse_json(raw) if raw.strip() else {})
    except ValidationError as exc:
        raise from_validation(exc) from None


async def command_worker(request: Request, cmd: dict[str, Any], field: str) -> JSONResponse:
    beat = await worker_of(request)
    if not beat["live"]:
        raise ApiError(409, "worker_gone", f"worker {beat['name']!r} is {beat['state']}", "name")
    state = request.app.state
    reply = await control.send(state.redis, state.keys, beat["name"], cmd, CONTROL_WAIT_S)
    if reply is None:
        raise ApiError(504, "worker_unresponsive", f"worker {beat['name']!r} did not answer "
                       f"in {CONTROL_WAIT_S:g}s")
    if not reply["accepted"]:
        error = reply["error"]
        raise ApiError(reply["status"], error["type"], error["message"], field)
    return JSONResponse({"worker": beat["name"], **reply}, 202)


async def load_model(request: Request) -> JSONResponse:
    body = await body_of(request, LoadModel)
    if body.model not in request.app.state.settings.models:
        known = ", ".join(sorted(request.app.state.settings.models))
        raise ApiError(400, "unknown_model", f"no model {body.model!r}; configured: {known}",
                       "model")
    cmd = control.command("load", model=body.model, requeue=body.requeue)
    return await command_worker(request, cmd, "model")


async def unload(request: Request) -> JSONResponse:
    body = await body_of(request, Unload)
    return await command_worker(request, control.command("unload", requeue=body.requeue), "name")


routes = [
    Route("/v1/workers", list_workers, methods=["GET"]),
    Route("/v1/workers/{name}", get_worker, methods=["GET"]),
    Route("/v1/workers/{name}/model", load_model, methods=["POST"]),
    Route("/v1/workers/{name}/unload", unload, methods=["POST"]),
]
