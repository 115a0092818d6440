"""Webhook signing (checked by the official openai package's verifier), where a webhook may go,
and the event body."""

from __future__ import annotations

import base64
import json

import openai
import pytest

from broker.settings import Settings
from broker.webhooks import (
    UnsafeTarget,
    check_target,
    delivery_id,
    member_of,
    payload,
    record_fields,
    signed_headers,
)

SECRET = "whsec_" + base64.b64encode(b"sixteen byte key and more").decode()


def test_a_signed_delivery_passes_the_openai_packages_verification_and_a_changed_one_fails(
) -> None:
    body = json.dumps({"id": "msg_x_0", "type": "job.succeeded", "data": {}}).encode()
    headers = signed_headers(SECRET, "msg_x_0", body)
    client = openai.OpenAI(api_key="unused", webhook_secret=SECRET)
    event = client.webhooks.unwrap(body, headers)
    assert event.type == "job.succeeded"  # type: ignore[comparison-overlap]
    with pytest.raises(openai.InvalidWebhookSignatureError):
        client.webhooks.unwrap(body.replace(b"succeeded", b"failed"), headers)
    old = signed_headers(SECRET, "msg_x_0", body, now=1_000_000)
    with pytest.raises(openai.InvalidWebhookSignatureError, match="too old"):
        client.webhooks.unwrap(body, old)


@pytest.mark.parametrize("url", [
    "http://127.0.0.1:9/hook", "http://localhost/hook", "http://10.1.2.3/x",
    "http://192.168.0.10/x", "http://169.254.169.254/latest/meta-data", "http://[::1]/x",
    "ftp://example.com/x", "http://user:pw@93.184.216.34/x", "http://224.0.0.1/x",
])
def test_private_link_local_and_odd_urls_are_refused(url: str) -> None:
    with pytest.raises(UnsafeTarget):
        check_target(url, Settings(webhook_secret=SECRET))


def test_allowed_networks_and_hosts_let_named_private_targets_through() -> None:
    settings = Settings(webhook_secret=SECRET, webhook_allow_networks=["127.0.0.0/8"],
                        webhook_allow_hosts=["receiver.internal"])
    check_target("http://127.0.0.1:9000/hook", settings)
    check_target("https://receiver.internal/hook", settings)  # never resolved
    check_target("http://93.184.216.34/hook", settings)  # a public address needs nothing
    with pytest.raises(UnsafeTarget):
        check_target("http://10.0.0.1/hook", settings)


def test_a_jobs_targets_are_its_own_url_then_the_endpoints_and_ids_round_trip() -> None:
    settings = Settings(webhook_secret=SECRET, webhook_endpoints=[
        {"url": "https://ops.example/hook", "events": ["job.failed"]}])
    fields = record_fields("https://me.example/hook", settings)
    targets = json.loads(fields["webhooks"])
    assert [t["url"] for t in targets] == ["https://me.example/hook", "https://ops.example/hook"]
    assert targets[1]["events"] == ["job.failed"] and fields["hooks"] == "2"
    assert record_fields(None, Settings()) == {}
    member = f"{'a' * 32}|1"
    assert member_of(delivery_id(member)) == member
    record = {"id": "a" * 32, "kind": "embed", "model": "embed", "status": "cancelled",
              "finished_at": 1.8e9}
    body = payload(member, record)
    assert body["type"] == "job.cancelled" and body["id"] == delivery_id(member)
    assert body["created_at"] == 1_800_000_000 and payload(member, record) == body


def test_a_batch_delivery_id_round_trips_and_a_response_is_told_in_openais_names() -> None:
    member = f"batch:{'b' * 32}:2|0"
    assert delivery_id(member) == f"msg_batch_{'b' * 32}_2_0"
    assert member_of(delivery_id(member)) == member
    response = {"id": "c" * 32, "kind": "generate", "model": "chat", "status": "succeeded",
                "response": {"store": True}, "result": {"finish_reason": "length"}}
    body = payload(f"{'c' * 32}|0", response)
    assert body["type"] == "response.incomplete" and body["data"]["id"] == f"resp_{'c' * 32}"


def test_a_keys_endpoints_come_after_the_jobs_own_url_and_only_for_events_they_want() -> None:
    settings = Settings(webhook_secret=SECRET, webhook_endpoints=[
        {"url": "https://ops.example/hook", "events": ["batch.completed"]}])
    key_hooks = json.dumps([{"url": "https://team.example/hook", "events": ["job.failed"],
                             "secret_key": "abc"},
                            {"url": "https://team.example/batches",
                             "events": ["batch.completed"], "secret_key": "abc"}])
    jobs = json.loads(record_fields("https://me.example/x", settings,
                                    key_hooks=key_hooks)["webhooks"])
    assert [t["url"] for t in jobs] == ["https://me.example/x", "https://team.example/hook"]
    assert jobs[1]["secret_key"] == "abc"
    batches = json.loads(record_fields(None, settings, ("batch.completed", "batch.cancelled"),
                                       key_hooks)["webhooks"])
    assert [t["url"] for t in batches] == ["https://team.example/batches",
                                           "https://ops.example/hook"]
