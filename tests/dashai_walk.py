"""What a DashAI user does in DashAI's own front end, in a real browser: the generative chat, start to end.

`walk_generative_chat` drives DashAI 0.10.0's built front end wherever it is
served: by this server at `/app/` (tests/test_dashai_ui.py), or by DashAI itself
with the project's plugin (`make test-dashai`, integrations/dashai/e2e.py). It
opens the app, goes to Generative, creates a session with the given task and
model, sends a prompt and waits for the picture, changes a parameter and
presses UPDATE, sends a second prompt, renames the session and deletes it.

Throughout, it records what a user would see go wrong: every error toast, every
form field shown in red (with its message) and every console error; the caller
asserts on them (`Walk.problems`). DASHAI_CONSOLE_NOISE lists DashAI's own
console errors that have nothing to do with the server behind it.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from pathlib import Path

# DashAI's own console errors, seen with any back end:
# - "false": its parameter panel hands `console.error` as the form's error callback, which the
#   form calls with `false` whenever a field is valid (ParamsBar.jsx: setError).
DASHAI_CONSOLE_NOISE = (re.compile(r"^false$"),)

# Tours start on each page a user has not seen; DashAI keeps the seen ones in localStorage.
NO_TOURS = """localStorage.setItem("dashai_tours_completed", JSON.stringify(
  {home: true, datasets: true, datasetView: true, notebook: true, models: true, modelsSession: true, generative: true}));"""
# Records what a user sees go wrong, as it appears (a toast lasts seconds; a red field may be
# fixed by the next render): error toasts (notistack) and fields marked in error (MUI).
WATCH_PROBLEMS = """
window.__problems = {toasts: [], fields: []};
new MutationObserver(() => {
  for (const toast of document.querySelectorAll(".notistack-MuiContent-error:not([data-seen])")) {
    toast.dataset.seen = "1";
    window.__problems.toasts.push(toast.innerText);
  }
  for (const helper of document.querySelectorAll("p.Mui-error:not([data-seen])")) {
    helper.dataset.seen = "1";
    window.__problems.fields.push(helper.innerText || "(marked in red)");
  }
}).observe(document, {subtree: true, childList: true, attributes: true, attributeFilter: ["class"]});
"""
IMAGE = "img[src*='/generative-process/file/']"
STEP_TIMEOUT_MS = 60_000
INPUT_DEBOUNCE_MS = 300  # DashAI's InputWithDebounce delay


@dataclass
class Walk:
    session_id: int | None = None
    session_before_delete: dict = field(default_factory=dict)  # the session as its API answered after UPDATE
    renamed_to: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    toasts: list[str] = field(default_factory=list)
    red_fields: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    screenshots: list[Path] = field(default_factory=list)

    @property
    def problems(self) -> list[str]:
        """What went wrong that a user would see, and console errors that are not DashAI's own noise."""
        console = [text for text in self.console_errors if not any(p.search(text) for p in DASHAI_CONSOLE_NOISE)]
        return ([f"error toast: {text}" for text in self.toasts] + [f"field in red: {text}" for text in self.red_fields]
                + [f"console error: {text}" for text in console])


def walk_generative_chat(browser, app_url: str, task: str, model: str, screenshots: Path, name_prefix: str = "walk",
                         parameters: tuple[tuple[str, str], ...] = (("seed", "42"),)) -> Walk:
    """Drive DashAI's front end at `app_url` (its `/app/` page) through one chat session, as described above.

    `task` and `model` are the labels DashAI shows (the task chip, the model card);
    `parameters` are the fields changed before UPDATE and their new values. A field that may be
    empty (null) is switched from "Null" to "String" first, as a user does: DashAI's panel keeps a
    null field's box disabled until then.
    """
    from playwright.sync_api import expect

    screenshots.mkdir(parents=True, exist_ok=True)
    walk = Walk()
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.add_init_script(NO_TOURS)
    context.add_init_script(WATCH_PROBLEMS)
    context.set_default_timeout(STEP_TIMEOUT_MS)
    page = context.new_page()
    page.on("console", lambda message: message.type == "error" and walk.console_errors.append(message.text))
    page.on("pageerror", lambda error: walk.console_errors.append(f"uncaught: {error}"))
    started = time.monotonic()

    def step(name: str) -> None:
        walk.timings[name] = round(time.monotonic() - started, 1)
        shot = screenshots / f"{len(walk.screenshots) + 1:02d}-{name}.png"
        page.screenshot(path=shot)
        walk.screenshots.append(shot)

    def images_shown(count: int) -> None:
        expect(page.locator(IMAGE)).to_have_count(count)
        for image in page.locator(IMAGE).all():  # loaded, not a broken link
            expect(image).to_have_js_property("complete", True)
            assert image.evaluate("image => image.naturalWidth") > 0, image.get_attribute("src")

    try:
        page.goto(app_url, wait_until="domcontentloaded")
        expect(page.get_by_text("Welcome to dashAI!")).to_be_visible()
        step("home")
        page.get_by_role("link", name="Generative", exact=True).click()
        page.get_by_role("button", name="Create a new session").click()
        page.get_by_role("button", name=re.compile(rf"^{re.escape(task)} \(\d+\)$")).click()
        page.get_by_role("heading", name=model, exact=True).click()
        page.get_by_role("button", name="NEXT").click()
        name_box = page.get_by_label("Session Name")
        expect(name_box).not_to_have_value("")
        name = f"{name_prefix}-{int(time.time() * 1000) % 10**8}"
        name_box.fill(name)
        step("configure")
        page.get_by_role("button", name="CREATE A SESSION").click()
        page.wait_for_url(re.compile(r"/app/generative/sessions/\d+$"))
        walk.session_id = int(page.url.rsplit("/", 1)[1])
        expect(page.get_by_role("button", name="UPDATE")).to_be_visible()
        step("session")

        message = page.get_by_placeholder("Type a message")
        message.fill("a red circle on a blue background")
        message.press("Enter")
        images_shown(1)
        step("picture")

        for key, value in parameters:
            box = page.locator(f"input[name='{key}']")
            if box.is_disabled():  # a null field: its card's type selector turns it into a text box
                card = box.locator("xpath=ancestor::*[.//*[@aria-label='type selector']][1]")
                card.get_by_role("button", name="String", exact=True).click()
                expect(box).to_be_enabled()
            box.fill(value)
            # DashAI's inputs hand a value to the form 300 ms after the last key (InputWithDebounce);
            # UPDATE is already enabled by an earlier field, so it cannot tell us this one arrived.
            page.wait_for_timeout(INPUT_DEBOUNCE_MS + 200)
        update = page.get_by_role("button", name="UPDATE")
        expect(update).to_be_enabled()  # the form saw the change (its inputs wait 300 ms)
        update.click()
        for key, value in parameters:
            expect(page.get_by_text(re.compile(rf"Parameters updated:.*{re.escape(key)}:.*{re.escape(value)}"))
                   ).to_be_visible()
        expect(update).to_be_disabled()
        step("updated")

        message.fill("a small green triangle on a white background")
        message.press("Enter")
        images_shown(2)
        step("second-picture")
        api = app_url.split("/app/")[0]
        walk.session_before_delete = page.request.get(f"{api}/api/v1/generative-session/{walk.session_id}").json()

        def session_menu(session_name: str):
            # The "more options" button of that session's row in the session list.
            row = page.get_by_text(session_name, exact=True).first.locator(
                "xpath=ancestor::*[.//button[@aria-label='more options']][1]")
            row.get_by_role("button", name="more options").click()

        walk.renamed_to = f"{name}-renamed"
        session_menu(name)
        page.get_by_role("menuitem", name="Edit").click()
        page.locator(f"input[value='{name}']").fill(walk.renamed_to)
        page.keyboard.press("Enter")  # the box is found by its value, which has just changed
        expect(page.get_by_text(walk.renamed_to, exact=True).first).to_be_visible()
        step("renamed")

        session_menu(walk.renamed_to)
        page.get_by_role("menuitem", name="Delete").click()
        page.get_by_role("button", name="Delete", exact=True).click()  # in "Confirm Deletion"
        expect(page.get_by_text(walk.renamed_to, exact=True)).to_have_count(0)
        step("deleted")
    except Exception:
        page.screenshot(path=screenshots / "failed.png")
        raise
    finally:
        try:
            seen = page.evaluate("window.__problems")
            walk.toasts, walk.red_fields = seen["toasts"], seen["fields"]
        finally:
            context.close()
    return walk
