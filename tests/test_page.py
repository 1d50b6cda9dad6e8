"""The page for a person at `/` (t2i_task/ui/, served by t2i_task/api/page.py), in Debian's Chromium.

Every test watches what the page does: no request leaves the server's origin, and the console
shows no error. The server is the shipped configuration (both models, the ring adapter), with
the test gate (tests/gate.py) so that a generation can be held part-way: progress is seen and
a job is cancelled at a step the test chose, not at whatever step this machine reached.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field

import httpx
import openai
import pytest

from t2i_task.local_server import start_server, write_config
from tests.browser import SCREENSHOTS, VIEWPORT
from tests.gate import wait_for

PROMPT = "a red circle on a blue background"
PHONE = {"width": 390, "height": 844}
SHOTS = SCREENSHOTS / "page"
TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def page_server(server_folder, gate):
    server = start_server(write_config(server_folder), env=gate.env())
    yield server
    server.stop()


@dataclass
class Watched:
    """A page and what it did that it should not: requests to another host, console errors."""

    page: object
    offsite: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        return [f"request to another host: {url}" for url in self.offsite] + self.console_errors


@pytest.fixture
def open_page(browser, page_server):
    """open_page(path, viewport=..., storage=...) -> Watched; contexts are closed after the test."""
    from playwright.sync_api import expect

    expect.set_options(timeout=TIMEOUT_MS)
    contexts = []

    def opener(path: str = "/", viewport: dict = VIEWPORT, server=page_server) -> Watched:
        context = browser.new_context(viewport=viewport)
        context.set_default_timeout(TIMEOUT_MS)
        contexts.append(context)
        page = context.new_page()
        watched = Watched(page)
        page.on("request", lambda request: request.url.startswith((server.url, "blob:", "data:"))
                or watched.offsite.append(request.url))
        page.on("console", lambda message: message.type == "error" and watched.console_errors.append(message.text))
        page.on("pageerror", lambda error: watched.console_errors.append(f"uncaught: {error}"))
        page.goto(server.url + path)
        if path == "/":  # the page has loaded the models and the history
            expect(page.locator("#generate")).to_have_attribute("aria-busy", "false")
        return watched

    yield opener
    for context in contexts:
        context.close()


def prompt_box(page):
    return page.get_by_label("Prompt", exact=True)


def generate(page, prompt: str = PROMPT, press_enter: bool = False) -> None:
    prompt_box(page).fill(prompt)
    if press_enter:
        prompt_box(page).press("Enter")
    else:
        page.get_by_role("button", name="Generate").click()


def test_the_page_and_the_api_reference_load_with_nothing_from_another_host(open_page, page_server):
    """`/` is the page (its Content Security Policy allows this origin only) and `/docs` renders Swagger UI
    from files this server serves; DashAI's front end stays at /app/."""
    from playwright.sync_api import expect

    answer = httpx.get(f"{page_server.url}/", timeout=30)
    assert answer.status_code == 200 and "Content-Security-Policy" in answer.headers
    assert "default-src 'self'" in answer.headers["Content-Security-Policy"]
    assert httpx.get(f"{page_server.url}/app/", timeout=30).status_code == 200

    watched = open_page("/")
    expect(prompt_box(watched.page)).to_be_visible()
    expect(watched.page.locator("#model option")).to_have_count(2)  # the served models
    expect(watched.page.locator("#key-form")).to_be_hidden()  # this server needs no key

    docs = open_page("/docs")
    expect(docs.page.locator(".swagger-ui .info .title")).to_contain_text("t2i-task")
    expect(docs.page.get_by_text("/v1/images/generations").first).to_be_visible()
    docs.page.screenshot(path=SHOTS / "api-reference.png")
    assert watched.problems == [] and docs.problems == []


def test_a_person_generates_sees_progress_and_finds_the_picture_after_a_reload(open_page, gate):
    """Enter in the prompt box generates; the progress bar follows the process's steps and a preview shows
    while it is drawn; the picture shows with the parameters that made it; after a reload and in another
    browser it is in the history."""
    from playwright.sync_api import expect

    SHOTS.mkdir(parents=True, exist_ok=True)
    watched = open_page("/")
    page = watched.page
    page.get_by_label("Seed").fill("7")
    with gate.holding_after_step(4):  # the page asks for 2 previews of 10 steps: after steps 4 and 7
        generate(page, press_enter=True)
        expect(page.locator("#status")).to_have_text("Step 4 of 10")
        expect(page.get_by_role("progressbar")).to_have_attribute("value", "4")
        expect(page.get_by_role("button", name="Cancel")).to_be_enabled()
        preview = page.get_by_role("img", name="The picture being drawn")
        expect(preview).to_have_attribute("src", re.compile(r"^data:image/png;base64,"))
        expect(page.locator("#preview figcaption")).to_have_text("Preview at step 4")
        page.screenshot(path=SHOTS / "progress.png")
    expect(page.locator("#status")).to_have_text("Done: 1 image.")
    expect(preview).to_be_hidden()
    result = page.locator(".result").first
    expect(result.get_by_role("img", name=PROMPT)).to_be_visible()
    expect(result.locator("dd").first).to_have_text("7")  # its seed, read from the PNG itself
    expect(result.get_by_role("link", name="Download")).to_have_attribute("download", re.compile(r"\.png$"))
    page.screenshot(path=SHOTS / "desktop.png")

    page.reload()
    expect(page.locator(".result").first.get_by_role("img", name=PROMPT)).to_be_visible()
    other = open_page("/")  # another browser: nothing of this one's storage
    session = other.page.locator("#sessions li").filter(has_text=PROMPT[:20]).first
    session.get_by_role("button").first.click()
    expect(other.page.locator(".result").first.get_by_role("img", name=PROMPT)).to_be_visible()
    assert watched.problems == [] and other.problems == []


def test_cancel_stops_a_running_job_and_says_so(open_page, gate):
    from playwright.sync_api import expect

    watched = open_page("/")
    page = watched.page
    with gate.holding_after_step(2):
        generate(page, "a long job: a green square on a white background")
        expect(page.locator("#status")).to_have_text("Step 2 of 10")
        page.get_by_role("button", name="Cancel").click()
        expect(page.locator("#status")).to_have_text("Cancelled.")
    cancelled = page.locator(".result").first
    expect(cancelled).to_contain_text("a long job")
    expect(cancelled).to_contain_text("Cancelled.")
    expect(cancelled.get_by_role("img")).to_have_count(0)
    expect(page.get_by_role("button", name="Generate")).to_be_enabled()
    assert watched.problems == []


def test_switching_model_takes_its_limits_and_use_these_settings_again_fills_the_form(open_page):
    """shapes-32's defaults replace shapes-64's; its picture is 32x32; "Use these settings again" puts an
    image's own seed and model back; an adapter ticked is sent and shown with the picture."""
    from playwright.sync_api import expect

    watched = open_page("/")
    page = watched.page
    page.get_by_label("Model").select_option("shapes-32")
    expect(page.get_by_label("Width")).to_have_value("32")
    expect(page.locator("#adapters")).to_be_hidden()  # shapes-32 has none
    generate(page, "a blue triangle on a white background")
    expect(page.locator("#status")).to_have_text("Done: 1 image.")
    picture = page.locator(".result").first.get_by_role("img")
    expect(picture).to_be_visible()
    assert picture.evaluate("img => [img.naturalWidth, img.naturalHeight]") == [32, 32]
    seed = page.locator(".result").first.locator("dd").first.inner_text()

    page.get_by_label("Model").select_option("shapes-64")
    page.get_by_label("ring", exact=True).check()
    generate(page, "a yellow ring on a blue background")
    expect(page.locator("#status")).to_have_text("Done: 1 image.")
    expect(page.locator(".result").first).to_contain_text("ring:1")

    page.get_by_role("button", name="New session").click()
    expect(page.locator(".result")).to_have_count(0)
    page.locator("#sessions li").filter(has_text="a blue triangle").get_by_role("button").first.click()
    page.get_by_role("button", name="Use these settings again").first.click()
    expect(page.get_by_label("Model")).to_have_value("shapes-32")
    expect(page.get_by_label("Seed")).to_have_value(seed)
    expect(prompt_box(page)).to_have_value("a blue triangle on a white background")
    assert watched.problems == []


def test_errors_are_told_in_words(open_page):
    """A 422 names the field (marked invalid); a 429 says the server is busy and when to retry."""
    from playwright.sync_api import expect

    watched = open_page("/")
    page = watched.page
    page.get_by_label("Steps").fill("500")
    generate(page)
    expect(page.locator("#status")).to_contain_text("Check Steps: num_inference_steps must be between 1 and 50")
    expect(page.get_by_label("Steps")).to_have_attribute("aria-invalid", "true")

    page.get_by_label("Steps").fill("10")
    page.route("**/api/v1/generative-process/", lambda route: route.fulfill(
        status=429, headers={"Retry-After": "7"}, content_type="application/json",
        body='{"detail": "Too many generations are waiting."}'))
    generate(page)
    expect(page.locator("#status")).to_have_text(
        "The server is busy: Too many generations are waiting. Try again in 7 s.")
    # The browser logs a failed fetch as a console error: the 422 and the 429 were answers the page told.
    assert [error for error in watched.problems if "status of 4" not in error] == []


def test_the_page_at_phone_width_needs_no_sideways_scrolling(open_page):
    from playwright.sync_api import expect

    watched = open_page("/", viewport=PHONE)
    page = watched.page
    generate(page)
    expect(page.locator("#status")).to_have_text("Done: 1 image.")
    expect(page.locator(".result img").first).to_be_visible()
    assert page.evaluate("document.documentElement.scrollWidth") <= PHONE["width"]
    page.screenshot(path=SHOTS / "phone.png", full_page=True)
    assert watched.problems == []


def test_with_api_keys_the_page_asks_for_one_and_sends_it(open_page, tmp_path_factory):
    """The key field appears only when the server requires keys; the key is kept in the browser and sent as
    the Bearer header, and the images are fetched with it."""
    from playwright.sync_api import expect

    folder = tmp_path_factory.mktemp("page-keys")
    server = start_server(write_config(folder), env={"T2I_API_KEYS": "page-key-1"})
    try:
        watched = open_page("/", server=server)
        page = watched.page
        expect(page.get_by_label("API key")).to_be_visible()
        expect(page.locator("#status")).to_contain_text("needs an API key")
        page.get_by_label("API key").fill("page-key-1")
        page.get_by_role("button", name="Save key").click()
        expect(page.get_by_label("Model")).to_have_value("shapes-64")
        generate(page)
        expect(page.locator("#status")).to_have_text("Done: 1 image.")
        expect(page.locator(".result img").first).to_have_attribute("src", re.compile(r"^blob:"))
        assert page.evaluate("localStorage.getItem('t2i.apiKey')") == "page-key-1"
        page.reload()
        expect(page.locator(".result img").first).to_be_visible()  # the stored key is sent after a reload
        assert [error for error in watched.problems if "status of 401" not in error] == []
    finally:
        server.stop()


def test_bulk_jobs_are_listed_with_progress_and_their_results_download(open_page, page_server):
    from playwright.sync_api import expect

    client = openai.OpenAI(base_url=f"{page_server.url}/v1", api_key="unused", max_retries=0)
    lines = [{"custom_id": f"line-{n}", "method": "POST", "url": "/v1/images/generations",
              "body": {"prompt": f"a green square on a black background {n}", "num_inference_steps": 2}}
             for n in range(2)]
    content = "".join(json.dumps(line) + "\n" for line in lines).encode()
    uploaded = client.files.create(file=("lines.jsonl", content), purpose="batch")
    batch = client.batches.create(input_file_id=uploaded.id, endpoint="/v1/images/generations",
                                  completion_window="24h")
    wait_for(lambda: client.batches.retrieve(batch.id).status == "completed", what=f"batch {batch.id} completed")

    watched = open_page("/")
    page = watched.page
    row = page.locator("#batches li").filter(has_text=batch.id)
    expect(row).to_contain_text("completed · 2 of 2")
    expect(row.get_by_role("progressbar")).to_have_attribute("value", "2")
    with page.expect_download() as download:
        row.get_by_role("button", name="Results (JSONL)").click()
    assert download.value.suggested_filename == f"{batch.id}.jsonl"
    results = [json.loads(line) for line in open(download.value.path()).read().splitlines()]
    assert sorted(result["custom_id"] for result in results) == ["line-0", "line-1"]
    assert watched.problems == []
