"""The chat page in a real headless Chromium (Debian's, driven by Playwright) against the real
served app: auth on, an image uploaded, answers streamed in, the conversation continued, errors
from the API shown as readable messages. A screenshot is kept as a test artifact."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
from pathlib import Path

import httpx
import pytest
from PIL import Image
from playwright.sync_api import expect

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Without these, Chromium's background connections are refused by the closed network, many at a time.
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = Path(os.environ.get("LLAVA_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / ".test-artifacts"))
TIMEOUT_MS = 60_000
expect.set_options(timeout=TIMEOUT_MS)  # a busy 2-core machine answers slowly


def _png(path: Path, size: tuple[int, int], colour=(200, 30, 30)) -> Path:
    Image.new("RGB", size, colour).save(path, "PNG")
    return path


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.fail("Debian's chromium is required for the chat-page test: run tools/install_chromium.sh")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture()
def page(browser, serve_app):
    context = browser.new_context(viewport={"width": 1100, "height": 800})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(serve_app["url"] + "/")  # the root redirects to the page
    yield page
    context.close()


def _ask(page, question: str) -> None:
    page.fill("#question", question)
    page.click("#send")


def _error_text(page) -> str:
    page.wait_for_selector("#error:not([hidden])")
    return page.inner_text("#error")


def test_chat_page_streams_answers_and_continues_the_conversation(page, serve_app, tmp_path):
    assert page.url.endswith("/ui")
    # Auth is on: without a key the page says so, in the server's words.
    assert "HTTP 401" in _error_text(page)
    assert "API key" in page.inner_text("#error")

    page.fill("#api-key", serve_app["key"])
    page.dispatch_event("#api-key", "change")
    expect(page.locator("#model-info")).to_contain_text("version")
    assert serve_app["name"] in page.inner_text("#model-info")
    assert page.is_hidden("#error")

    sent: list[dict] = []
    page.on("request", lambda r: sent.append(json.loads(r.post_data)) if r.url.endswith("/chat/completions") else None)
    image = _png(tmp_path / "red.png", (48, 32))
    page.set_input_files("#image-input", str(image))
    page.wait_for_selector("#image-preview:not([hidden])")
    page.fill("#max-tokens", "12")
    page.eval_on_selector("#temperature", "el => { el.value = '0'; el.dispatchEvent(new Event('input')); }")
    _ask(page, "What colour is the shape?")
    page.wait_for_selector(".message.assistant[data-done='true']")

    answer = page.locator(".message.assistant").nth(0)
    text = answer.locator(".text").inner_text()
    assert text, "the answer stayed empty"
    # Streamed: the text arrived as several deltas, not in one piece.
    assert int(answer.get_attribute("data-deltas")) >= 2
    footer = answer.locator("footer").inner_text()
    assert "version" in footer and "tokens" in footer
    tokens = int(footer.split(" tokens")[0].split(" · ")[-1])
    assert 1 <= tokens <= 12  # the max-tokens setting reached the server

    # What the page sent is a plain API request: the same request without streaming gives the same
    # greedy answer, and the image went first in the user turn, as the chat template places it.
    request = sent[0]
    assert request["max_tokens"] == 12 and request["temperature"] == 0 and request["stream"] is True
    parts = request["messages"][0]["content"]
    assert [p["type"] for p in parts] == ["image_url", "text"]
    assert base64.b64decode(parts[0]["image_url"]["url"].split(",", 1)[1]) == image.read_bytes()
    direct = httpx.post(serve_app["url"] + "/v1/chat/completions", timeout=60,
                        headers={"Authorization": f"Bearer {serve_app['key']}"},
                        json={k: v for k, v in request.items() if k not in ("stream", "stream_options")})
    assert direct.status_code == 200
    assert direct.json()["choices"][0]["message"]["content"].strip() == text.strip()

    # The conversation continues: the second request carries the first turn and its answer.
    _ask(page, "Is it large?")
    page.wait_for_selector(".message.assistant:nth-of-type(4)[data-done='true']")
    roles = [m["role"] for m in sent[1]["messages"]]
    assert roles == ["user", "assistant", "user"]
    assert sent[1]["messages"][1]["content"] == text
    assert isinstance(sent[1]["messages"][2]["content"], str)  # the image is sent once, with its turn
    assert page.locator(".message").count() == 4

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "chat-page.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000


def test_chat_page_shows_api_errors_and_keeps_the_question(page, serve_app, tmp_path):
    page.fill("#api-key", serve_app["key"])
    page.dispatch_event("#api-key", "change")
    expect(page.locator("#model-info")).to_contain_text("version")

    # A file that is not an image: the server's 400 is shown, and nothing enters the conversation.
    bad = tmp_path / "notes.png"
    bad.write_text("this is not an image")
    page.set_input_files("#image-input", str(bad))
    page.wait_for_selector("#image-preview:not([hidden])")
    _ask(page, "What is this?")
    message = _error_text(page)
    assert message.startswith("HTTP 400") and "image" in message.lower()
    assert page.locator(".message").count() == 0
    assert page.input_value("#question") == "What is this?"  # kept, so it can be resent

    # An image over the server's pixel limit (4M in this app): a readable 4xx, not a broken page.
    big = _png(tmp_path / "big.png", (2100, 2100))
    page.set_input_files("#image-input", str(big))
    expect(page.locator("#image-preview")).to_have_attribute("src", re.compile(r"^data:image/png;base64,.{1000}"))
    page.click("#send")
    expect(page.locator("#error")).to_contain_text(re.compile("too large", re.IGNORECASE))
    assert page.inner_text("#error").startswith("HTTP 4")
    assert page.locator(".message").count() == 0
