"""Flower, as an operator sees it: in a real headless Chromium, behind basic auth, showing the
live workers and a finished task by kind, model and job id, never the prompt."""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Page

from broker.redis_server import EmbeddedRedis, free_port
from cli.supervisor import Supervisor, tokenpool_argv
from tests.conftest import Stack, stack_env

ARTIFACTS = Path(os.environ.get("TOKENPOOL_TEST_ARTIFACTS", "test-artifacts"))
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Headless Chromium as root on a box with no outside network: no sandbox, no background calls.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync"]
USER, PASSWORD = "operator", "flower-test-secret"


@pytest.fixture(scope="module")
def flower(redis_server: EmbeddedRedis, config_file: Path,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    env = stack_env(redis_server.url, config_file, TOKENPOOL_FLOWER_USER=USER,
                    TOKENPOOL_FLOWER_PASSWORD=PASSWORD)
    sup = Supervisor(env=env, log_dir=tmp_path_factory.mktemp("flower-logs"))
    sup.add("flower", tokenpool_argv("flower", "--port", str(port)))
    sup.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert sup.children[0].alive(), f"flower died; log in {sup.log_dir}"
            try:
                if httpx.get(url, timeout=2).status_code == 401:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "flower did not come up"
            time.sleep(0.3)
        yield url
    finally:
        sup.stop()


WORKER_NAMES = ("chat-cpu", "summary-cpu", "embed-cpu")


def page_showing(page: Page, url: str, names: tuple[str, ...], timeout_s: float = 30) -> str:
    """The page's text once every name is on it (Flower fills its tables from script, and
    learns workers from their heartbeat events every few seconds), or its text at the end."""
    deadline = time.monotonic() + timeout_s
    page.goto(url)
    loaded = time.monotonic()
    while True:
        text = page.text_content("body") or ""
        if all(name in text for name in names) or time.monotonic() > deadline:
            return text
        if time.monotonic() - loaded > 5:
            page.reload()
            loaded = time.monotonic()
        time.sleep(0.5)


def test_flower_wants_a_password(flower: str) -> None:
    assert httpx.get(f"{flower}/workers").status_code == 401
    assert httpx.get(f"{flower}/workers", auth=(USER, "wrong")).status_code == 401
    assert httpx.get(f"{flower}/workers", auth=(USER, PASSWORD)).status_code == 200


def test_an_operator_logs_in_and_sees_the_workers_and_a_finished_task(
    stack: Stack, flower: str
) -> None:
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "Debian's chromium is needed (make test installs it)"
    secret = "the prompt is private 7f3a"
    job_id = stack.submit({"kind": "generate", "prompt": secret, "max_tokens": 4})
    assert stack.wait_final(job_id)["status"] == "succeeded"
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            with pytest.raises(PlaywrightError, match="AUTH"):  # no login, no page
                browser.new_page().goto(f"{flower}/workers")
            context = browser.new_context(http_credentials={"username": USER,
                                                            "password": PASSWORD})
            page = context.new_page()
            workers_text = page_showing(page, f"{flower}/workers", WORKER_NAMES)
            page.screenshot(path=str(ARTIFACTS / "flower-workers.png"), full_page=True)
            page.goto(f"{flower}/task/{job_id}")
            page.wait_for_selector("text=SUCCESS", timeout=30_000)
            task_text = page.text_content("body") or ""
            page.screenshot(path=str(ARTIFACTS / "flower-task.png"), full_page=True)
        finally:
            browser.close()
    assert all(name in workers_text for name in WORKER_NAMES), workers_text
    assert "tokenpool.generate" in task_text
    assert f"job={job_id} model=chat dispatch=1" in task_text
    assert secret not in task_text
    assert (ARTIFACTS / "flower-task.png").stat().st_size > 10_000
