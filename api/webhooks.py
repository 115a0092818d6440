"""Webhook dead letters: deliveries that failed webhook_max_attempts times. An operator lists
them and delivers one again (its tries counted afresh, the same webhook-id)."""

from __future__ import annotations

import functools
import re

import anyio
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from api.errors import ApiError
from broker.webhooks import member_of

DELIVERY_ID = re.compile(r"^msg_(batch_[0-9a-f]{32}_\d{1,6}|[0-9a-f]{32})_\d{1,3}$")


async def dead_deliveries(request: Request) -> JSONResponse:
    found = await anyio.to_thread.run_sync(request.app.state.outbox.dead)
    return JSONResponse({"object": "list", "data": found})


async def redeliver(request: Request) -> JSONResponse:
    delivery = request.path_params["delivery_id"]
    if not DELIVERY_ID.match(delivery):
        raise ApiError(404, "not_found", f"no dead webhook delivery {delivery!r}", "id")
    again = functools.partial(request.app.state.outbox.redeliver, member_of(delivery))
    if not await anyio.to_thread.run_sync(again):
        raise ApiError(404, "not_found", f"no dead webhook delivery {delivery!r}", "id")
    return JSONResponse({"id": delivery, "status": "due"}, 202)


routes = [
    Route("/v1/webhooks/dead-letters", dead_deliveries, methods=["GET"]),
    Route("/v1/webhooks/dead-letters/{delivery_id}/redeliver", redeliver, methods=["POST"]),
]
