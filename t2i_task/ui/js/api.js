// Calls to this server: DashAI's process API (/api/v1/...) and OpenAI's (/v1/...), with the API
// key the person gave (kept in this browser's storage, sent as the Bearer header), and errors
// turned into sentences.

const KEY_STORAGE = "t2i.apiKey";

export class ApiProblem extends Error {
  constructor(status, message, field = null, retryAfterS = null, detail = "") {
    super(message);
    this.status = status;
    this.detail = detail; // the server's own words
    this.field = field; // the request field the server named, if any
    this.retryAfterS = retryAfterS;
  }

  get needsKey() {
    return this.status === 401;
  }
}

export function apiKey() {
  return localStorage.getItem(KEY_STORAGE) || "";
}

export function setApiKey(key) {
  if (key) localStorage.setItem(KEY_STORAGE, key);
  else localStorage.removeItem(KEY_STORAGE);
}

function headers(extra = {}) {
  const key = apiKey();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

// What a person reads for an error answer: busy servers say when to retry, 422s name the field.
async function problem(response) {
  let detail = "";
  let field = null;
  try {
    const body = await response.json();
    detail = body.detail ?? body.error?.message ?? "";
    field = body.field ?? body.error?.param ?? null;
  } catch {
    detail = response.statusText;
  }
  const retry = Number.parseInt(response.headers.get("Retry-After") || "", 10);
  const retryAfterS = Number.isFinite(retry) ? retry : null;
  const when = retryAfterS ? `Try again in ${retryAfterS} s.` : "Try again in a moment.";
  let message;
  if (response.status === 429) message = `The server is busy: ${detail} ${when}`;
  else if (response.status === 503) message = `The server cannot take this now: ${detail} ${when}`;
  else if (response.status === 401) message = "This server needs an API key: enter yours at the top of the page.";
  else if (response.status === 422 && field) message = `Check ${field}: ${detail}`;
  else message = detail || `The server answered ${response.status}.`;
  return new ApiProblem(response.status, message.trim(), field, retryAfterS, detail);
}

// One call; JSON in and out. Answers without a body (204) give null.
export async function call(method, path, body = undefined, { signal } = {}) {
  const init = { method, headers: headers(body === undefined ? {} : { "Content-Type": "application/json" }), signal };
  if (body !== undefined) init.body = JSON.stringify(body);
  const response = await fetch(path, init);
  if (!response.ok) throw await problem(response);
  return response.status === 204 ? null : response.json();
}

// The bytes of a file the server keeps (an image, a batch's results), fetched with the key.
export async function bytes(path) {
  const response = await fetch(path, { headers: headers() });
  if (!response.ok) throw await problem(response);
  return response.blob();
}

// A server-sent event stream, read with fetch so that it carries the key (EventSource cannot):
// yields each event's parsed JSON data until the server closes the stream.
export async function* events(path, { signal } = {}) {
  const response = await fetch(path, { headers: headers({ Accept: "text/event-stream" }), signal });
  if (!response.ok) throw await problem(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffered = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffered += value;
    const blocks = buffered.split(/\r\n\r\n|\n\n|\r\r/);
    buffered = blocks.pop();
    for (const block of blocks) {
      const data = block.split(/\r\n|\n|\r/).filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).trimStart()).join("\n");
      if (data) yield JSON.parse(data);
    }
  }
}
