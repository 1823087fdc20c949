"""The web chat page of `persllm serve` in headless Chromium: pick a persona, send, see a streamed reply."""

import shutil
from pathlib import Path

import pytest

from persllm.config import load_project
from persllm.interact.serve import create_app
from tests.fake_openai import FakeOpenAI
from tests.test_chat_project import build_project
from tests.test_serve import Server

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def browser():  # type: ignore[no-untyped-def]
    if not Path(CHROMIUM).exists() and shutil.which("chromium") is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield launched
        launched.close()


def test_page_streams_a_persona_reply(browser, tmp_path: Path, tiny_model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    project = load_project(build_project(tmp_path, tiny_model_dir, variants=("sft", "dpo")))
    with Server(create_app(project, api_key="page-key")) as server:
        page = browser.new_page()
        page.goto(server.url + "/")
        page.fill("#key", "page-key")
        page.dispatch_event("#key", "change")  # the page lists the models once it has the key
        page.wait_for_function("document.querySelectorAll('#persona option').length >= 3")
        personas = page.eval_on_selector_all("#persona option", "options => options.map(o => o.value)")
        assert personas == ["base", "elsie", "jonah"]
        page.select_option("#persona", "jonah")
        stages = page.eval_on_selector_all("#stage option", "options => options.map(o => o.value)")
        assert stages == ["schoolmaster", "mayor"]
        page.select_option("#stage", "mayor")
        assert page.eval_on_selector_all("#variant option", "os => os.map(o => o.value)") == ["sft", "prompt"]
        page.fill("#input", "Is the sea kind?")
        page.click("#send")
        page.wait_for_function("document.querySelector('.assistant .text')?.textContent.length > 0")
        page.wait_for_function("!document.querySelector('#send').disabled")
        assert page.text_content(".user .text") == "Is the sea kind?"
        assert page.text_content(".assistant .who") == "jonah:mayor:sft"
        assert page.text_content(".assistant .text")
        assert page.query_selector(".error") is None
        page.close()


def test_page_shows_the_analysis_when_asked(browser, tmp_path: Path, tiny_model_dir: Path) -> None:  # type: ignore[no-untyped-def]
    reply = "<think>\nThe user asks about the lamp.\n</think>\nThe lamp burns paraffin, every night."
    with FakeOpenAI(default_reply=reply, stream_delay=0.01) as upstream:
        overrides = {"base_model.backend": "openai", "base_model.base_url": upstream.base_url}
        project = load_project(build_project(tmp_path, tiny_model_dir, variants=()), overrides)
        with Server(create_app(project)) as server:
            page = browser.new_page()
            page.goto(server.url + "/")
            page.wait_for_function("document.querySelectorAll('#persona option').length >= 3")
            page.select_option("#persona", "elsie")
            page.check("#analysis")
            page.fill("#input", "The lamp?")
            page.keyboard.press("Enter")  # Enter sends
            page.wait_for_function(
                "!document.querySelector('#send').disabled && document.querySelector('.assistant')"
            )
            assert page.text_content(".assistant .text") == "The lamp burns paraffin, every night."
            assert (
                page.text_content(".assistant .analysis") or ""
            ).strip() == "The user asks about the lamp."
            assert len(upstream.requests) == 1 and upstream.requests[0]["stream"] is True
            page.close()
