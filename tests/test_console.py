"""The web console at ``/``, in a real headless browser (Debian's Chromium driven by Playwright)
against a real server process.

The server serves a scripted tiny model (``build_scripted_model``): its reply is the markup
``<img src=x onerror=alert(1)>`` followed by ``a`` forever, so one model shows both that output
stays text and that a stream grows token by token until the Stop button cancels it.

Set ``CONSOLE_SCREENSHOT=docs/console.png`` to write the README's screenshot from this browser.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import Browser, ConsoleMessage, Dialog, Page, expect, sync_playwright

from service.api.console import CONTENT_SECURITY_POLICY
from service.metrics import REQUESTS_CANCELLED_TOTAL
from tests.server_process import ServerProcess, running_server
from tests.tiny_models import build_scripted_model

#: Debian's Chromium (Playwright's own browser download needs the network).
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",  # tests run as root in CI
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
MARKUP = "<img src=x onerror=alert(1)>"
WAIT_MS = 60_000  # generous: a loaded 2-core machine
#: max_tokens of the reply the Stop test cancels: ~75 s of the scripted model, within its 32768 positions.
LONG_REPLY = 30_000
expect.set_options(timeout=WAIT_MS)

pytestmark = pytest.mark.skipif(
    not Path(CHROMIUM).exists(),
    reason="chromium missing: install the chromium Debian package (make test does)",
)


@pytest.fixture(scope="module")
def scripted_model(models_root: Path) -> Path:
    return build_scripted_model(models_root / "scripted", first_reply_token=MARKUP, then="a")


@pytest.fixture(scope="module")
def corrupt_model(models_root: Path, tiny_model_b: Path) -> Path:
    target = models_root / "console-corrupt"
    shutil.copytree(tiny_model_b, target, dirs_exist_ok=True)
    (target / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}garbage")
    return target


@pytest.fixture(scope="module")
def admin_token() -> str:
    return secrets.token_hex(16)


@pytest.fixture(scope="module")
def server(
    tmp_path_factory: pytest.TempPathFactory, scripted_model: Path, models_root: Path, admin_token: str
) -> Iterator[ServerProcess]:
    with running_server(
        tmp_path_factory.mktemp("console"),
        model=str(scripted_model),
        args=("--model-root", str(models_root)),
        # A stream long enough to outlast a busy machine before Stop is clicked (the scripted model
        # runs at ~400 tokens/s: 4096 tokens once ended before the click arrived).
        env={"SERVING_ADMIN_TOKEN": admin_token, "SERVING_MAX_TOKENS_LIMIT": str(LONG_REPLY)},
    ) as server:
        yield server


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


class Console:
    """The page, with what the browser reported: console errors, page errors, dialogs."""

    def __init__(self, page: Page) -> None:
        self.page = page
        self.errors: list[str] = []
        self.dialogs: list[str] = []
        page.on("console", self._console)
        page.on("pageerror", lambda error: self.errors.append(f"page error: {error}"))
        page.on("dialog", self._dialog)

    def _console(self, message: ConsoleMessage) -> None:
        if message.type == "error":
            self.errors.append(f"console: {message.text} at {message.location}")

    def _dialog(self, dialog: Dialog) -> None:
        self.dialogs.append(dialog.message)
        dialog.dismiss()

    def chat(self, text: str, *, max_tokens: int, temperature: float = 0.0) -> None:
        self.page.get_by_label("Max tokens").fill(str(max_tokens))
        self.page.get_by_label("Temperature").fill(str(temperature))
        message = self.page.get_by_label("Message", exact=True)
        message.fill(text)
        message.press("Enter")  # the keyboard path: Enter sends, Shift+Enter starts a new line

    def deploy(self, model_id: str, token: str = "") -> None:
        self.page.get_by_label("Model id").fill(model_id)
        self.page.get_by_label("Admin token").fill(token)
        self.page.get_by_role("button", name="Deploy").click()


@pytest.fixture
def console(browser: Browser, server: ServerProcess) -> Iterator[Console]:
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()
    console = Console(page)
    response = page.goto(server.base_url + "/")
    assert response is not None and response.ok
    expect(page.locator("#readiness")).to_have_text("ready")
    yield console
    context.close()


def cancelled(server: ServerProcess) -> float:
    text = httpx.get(f"{server.base_url}/metrics").text
    match = re.search(rf'^{REQUESTS_CANCELLED_TOTAL}{{reason="client_disconnected"}} (\S+)$', text, re.M)
    assert match, text
    return float(match[1])


def test_page_loads_without_errors_and_shows_the_serving_model(
    console: Console, server: ServerProcess, scripted_model: Path
) -> None:
    page = console.page
    expect(page.locator("#serving")).to_contain_text(str(scripted_model))
    expect(page.locator("#serving")).to_contain_text("float")  # the dtype
    # The scripted model is not a GGUF's conversion: the kernel line gives PyTorch and the reason.
    expect(page.locator("#serving")).to_contain_text("PyTorch (no GGUF blocks beside the weights")
    expect(page.locator("#deployment [data-phase]")).to_have_text("ready")
    expect(page.locator("#history tbody tr")).to_have_count(1)
    expect(page.locator("#load")).to_contain_text("tokens/s")
    assert console.errors == []
    unlabelled = page.evaluate(
        "() => [...document.querySelectorAll('input, textarea, select')]"
        ".filter((e) => e.labels.length === 0).map((e) => e.id)"
    )
    assert unlabelled == []
    headers = httpx.get(server.base_url + "/").headers
    assert headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert headers["x-content-type-options"] == "nosniff"


def test_chat_streams_token_by_token_and_stop_cancels(console: Console, server: ServerProcess) -> None:
    page = console.page
    before = cancelled(server)
    page.evaluate(
        """() => {
            window.lengths = new Set();
            new MutationObserver(() => {
                const replies = document.querySelectorAll('#transcript li.assistant .content');
                if (replies.length) window.lengths.add(replies[replies.length - 1].textContent.length);
            }).observe(document.getElementById('transcript'),
                       {childList: true, subtree: true, characterData: true});
        }"""
    )
    console.chat("Count for me", max_tokens=LONG_REPLY)
    stop = page.get_by_role("button", name="Stop")
    expect(stop).to_be_enabled()
    page.wait_for_function("() => window.lengths.size >= 5")
    stop.click()
    expect(page.locator("#chat-figures")).to_contain_text("cancelled")
    expect(stop).to_be_disabled()
    expect(page.get_by_role("button", name="Send")).to_be_enabled()
    # The server saw the disconnect and counted a cancellation (at its next engine step).
    deadline = time.monotonic() + WAIT_MS / 1000
    while cancelled(server) <= before:
        assert time.monotonic() < deadline, "the server never counted the stopped request as cancelled"
        time.sleep(0.1)


def test_model_output_is_text_never_markup(console: Console) -> None:
    page = console.page
    console.chat("Say something", max_tokens=3)
    reply = page.locator("#transcript li.assistant .content").last
    expect(reply).to_have_text(MARKUP + "aa")
    expect(page.locator("#chat-figures")).to_contain_text("length")
    expect(page.locator("#chat-figures")).to_contain_text("3 completion")
    assert page.locator("#transcript img").count() == 0
    assert console.dialogs == []


def test_the_next_turn_shows_the_prompt_tokens_the_prefix_cache_held(console: Console) -> None:
    figures = console.page.locator("#chat-figures")
    console.chat("Tell me about the quick brown fox and the lazy dog, please", max_tokens=3)
    expect(figures).to_contain_text("3 completion")
    console.chat("And once more", max_tokens=2)
    expect(figures).to_contain_text("2 completion")
    expect(figures).to_contain_text(re.compile(r"\d+ prompt \(\d+ cached\) \+ 2 completion"))


def test_deploy_without_the_admin_token_shows_the_401(console: Console) -> None:
    console.deploy("tiny-b")
    message = console.page.locator("#deploy-message")
    expect(message).to_contain_text("401 unauthorized")
    expect(message).to_contain_text("Authorization: Bearer")


def test_failed_deploy_shows_the_reason_and_the_old_model(
    console: Console, admin_token: str, corrupt_model: Path, scripted_model: Path
) -> None:
    page = console.page
    console.deploy(corrupt_model.name, admin_token)
    message = page.locator("#deploy-message")
    expect(message).to_contain_text("failed")
    expect(message).to_contain_text("safetensors")
    expect(message).to_contain_text(f"{scripted_model} still serves")
    expect(page.locator("#deployment .error")).to_contain_text("safetensors")
    expect(page.locator("#serving")).to_contain_text(str(scripted_model))


def test_deploy_follows_the_phases_to_ready(
    console: Console, server: ServerProcess, admin_token: str, tiny_model_b: Path, scripted_model: Path
) -> None:
    page = console.page
    screenshot = os.environ.get("CONSOLE_SCREENSHOT")
    if screenshot:  # a reply of the scripted model beside the deployment
        console.chat("Hello!", max_tokens=12)
        expect(page.locator("#chat-figures")).to_contain_text("usage")
    console.deploy(tiny_model_b.name, admin_token)
    expect(page.locator("#deploy-message")).to_contain_text(f"ready: {tiny_model_b} now serves")
    expect(page.locator("#serving")).to_contain_text(str(tiny_model_b))
    phases = page.locator("#deployment ol.phases li")
    expect(phases).to_contain_text(
        [re.compile(p) for p in ("pending", "resolving", "loading", "warming", "ready")]
    )
    if screenshot:
        page.get_by_label("Admin token").fill("")
        page.get_by_label("Admin token").blur()
        page.set_viewport_size({"width": 1280, "height": 700})
        page.screenshot(path=screenshot)
    # Put the scripted model back for whichever test runs next.
    httpx.post(
        f"{server.base_url}/model",
        json={"model_id": scripted_model.name},
        headers={"Authorization": f"Bearer {admin_token}"},
    ).raise_for_status()
    expect(page.locator("#serving")).to_contain_text(str(scripted_model))
