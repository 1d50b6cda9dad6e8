// The page: a prompt becomes a process in a DashAI session (PUT its parameters, POST the
// process), the process's event stream feeds the progress bar, and the finished process's
// images go to the gallery. Sessions are the history.

import { apiKey, call, events, setApiKey } from "./api.js";
import { GenerationForm } from "./form.js";
import { ERROR, FINISHED, Gallery } from "./gallery.js";
import { History, showBatches } from "./history.js";

const TASK = "TextToImageGenerationTask";
const BATCHES_REFRESH_MS = 10_000;
const PREVIEWS = 2; // partial images of each picture, sent on the process's event stream
const $ = (selector) => document.querySelector(selector);

const state = { session: null, running: null }; // running: {id, cancelled}
const status = $("#status");
const progress = $("#progress");
const form = new GenerationForm($("#generate"));
const gallery = new Gallery($("#gallery"), { onUse: (settings) => form.use(settings), onChange: () => {}, onError: report });
const history = new History($("#sessions"), $("#no-sessions"), {
  onOpen: (session) => openSession(session).catch(report),
  onDelete: (id) => state.session?.id === id && newSession(),
  onError: report,
});

function say(text, kind = "") {
  status.textContent = text;
  status.className = kind;
}

function report(problem) {
  if (problem.name === "AbortError") return;
  if (problem.needsKey) showKeyForm();
  const label = problem.status === 422 && form.markInvalid(problem.field);
  say(label ? `Check ${label}: ${problem.detail}` : problem.message, "error");
}

function showKeyForm() {
  $("#key-form").hidden = false;
  $("#api-key").focus();
}

async function boot() {
  try {
    const [components, models] = await Promise.all([
      call("GET", `/api/v1/component/?related_component=${TASK}&select_types=GenerativeModel`),
      call("GET", "/v1/models"),
    ]);
    form.setModels(components, models.data);
    const sessions = await history.refresh();
    if (sessions.length) await openSession(sessions[0]);
    else newSession();
    await refreshBatches();
    say("");
  } catch (problem) {
    report(problem);
  } finally {
    $("#generate").setAttribute("aria-busy", "false"); // loaded: models, history (tests wait for this)
  }
}

async function refreshBatches() {
  await showBatches($("#batches-section"), $("#batches"), report);
}

async function openSession(session) {
  state.session = session;
  history.markCurrent(session.id);
  $("#session-title").textContent = `Session: ${session.name}`;
  if (form.models.has(session.model_name)) form.use({ ...session.parameters, model: session.model_name });
  await gallery.showSession(session.id);
}

function newSession() {
  state.session = null;
  history.markCurrent(null);
  gallery.clear();
  $("#session-title").textContent = "New session: the next prompt starts one.";
}

// The session this prompt goes to: the open one with the form's parameters, or a new one when
// none is open or the model changed.
async function sessionFor(model, parameters, prompt) {
  if (state.session && state.session.model_name === model) {
    state.session = await call("PUT", `/api/v1/generative-session/${state.session.id}/parameters`, parameters);
    return state.session;
  }
  const name = `${prompt.slice(0, 40)} · ${new Date().toLocaleString()}`;
  const body = { name, task_name: TASK, model_name: model, parameters };
  let session;
  try {
    session = await call("POST", "/api/v1/generative-session/", body);
  } catch (problem) {
    if (problem.status !== 409) throw problem; // the name is taken: one more try
    session = await call("POST", "/api/v1/generative-session/", { ...body, name: `${name} (${Date.now() % 1000})` });
  }
  state.session = session;
  gallery.clear();
  $("#session-title").textContent = `Session: ${session.name}`;
  await history.refresh();
  history.markCurrent(session.id);
  return session;
}

function setRunning(running) {
  $("#generate-button").disabled = running;
  $("#cancel-button").disabled = !running;
  $("#generate").setAttribute("aria-busy", String(running));
}

async function generate(event) {
  event.preventDefault();
  if (state.running) return;
  const prompt = form.form.elements.prompt.value.trim();
  if (!prompt) {
    form.markInvalid("prompt");
    say("Type a prompt first.", "error");
    return;
  }
  setRunning(true);
  say("Sending…");
  try {
    const session = await sessionFor(form.model, form.parameters(), prompt);
    const process = await call("POST", "/api/v1/generative-process/",
      { session_id: session.id, input: [prompt], partial_images: PREVIEWS });
    await follow(process);
  } catch (problem) {
    report(problem);
  } finally {
    state.running = null;
    setRunning(false);
  }
}

// The process's events until it ends, then its images.
async function follow(process) {
  state.running = { id: process.id, cancelled: false };
  progress.hidden = false;
  progress.value = 0;
  say("Waiting for the model…");
  const preview = $("#preview");
  try {
    for await (const event of events(`/api/v1/generative-process/${process.id}/events`)) {
      if (event.progress) {
        progress.max = event.progress.total;
        progress.value = event.progress.step;
        if (event.progress.step > 0) say(`Step ${event.progress.step} of ${event.progress.total}`);
      }
      if (event.preview) {
        preview.querySelector("img").src = event.preview;
        preview.querySelector("figcaption").textContent = `Preview at step ${event.progress?.step ?? "?"}`;
        preview.hidden = false;
      }
      if (event.status === FINISHED || event.status === ERROR) break;
    }
  } finally {
    preview.hidden = true;
  }
  const ended = await call("GET", `/api/v1/generative-process/${process.id}`);
  await gallery.add(ended);
  if (ended.status === FINISHED) {
    const count = ended.output.filter((row) => row.data_type === "Image").length;
    say(`Done: ${count} image${count === 1 ? "" : "s"}.`);
  } else if (state.running.cancelled) {
    say("Cancelled.");
  } else {
    say(`Failed: ${ended.output.map((row) => row.data).join(" ").replace(/^Error details:\s*/, "")}`, "error");
  }
}

async function cancel() {
  if (!state.running) return;
  state.running.cancelled = true;
  say("Cancelling…");
  try {
    await call("POST", `/api/v1/generative-process/${state.running.id}/cancel`);
  } catch (problem) {
    if (problem.status !== 409) report(problem); // 409: it ended meanwhile
  }
}

$("#generate").addEventListener("submit", generate);
$("#prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    form.form.requestSubmit();
  }
});
$("#cancel-button").addEventListener("click", cancel);
$("#new-session").addEventListener("click", newSession);
$("#key-form").addEventListener("submit", (event) => {
  event.preventDefault();
  setApiKey($("#api-key").value.trim());
  boot();
});
$("#api-key").value = apiKey();
setInterval(() => document.visibilityState === "visible" && refreshBatches().catch(() => {}), BATCHES_REFRESH_MS);
boot();
