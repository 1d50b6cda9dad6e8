// Past sessions (DashAI's generative sessions, kept by the server: there after a reload and in
// another browser) and bulk jobs (OpenAI batches) with their progress and results.

import { bytes, call } from "./api.js";
import { element } from "./dom.js";


export class History {
  // `onOpen(session)`: show that session; `onDelete(id)`: it is gone.
  constructor(list, empty, { onOpen, onDelete, onError }) {
    this.list = list;
    this.empty = empty;
    this.onOpen = onOpen;
    this.onDelete = onDelete;
    this.onError = onError;
    this.current = null;
  }

  // Newest first.
  async refresh() {
    const sessions = (await call("GET", "/api/v1/generative-session/")).reverse();
    this.empty.hidden = sessions.length > 0;
    this.list.replaceChildren(...sessions.map((session) => this.row(session)));
    return sessions;
  }

  row(session) {
    const row = element("li");
    row.dataset.session = session.id;
    const open = element("button", { type: "button", className: "session-open" });
    open.append(element("span", { className: "session-name" }, session.name),
      element("span", { className: "muted" }, ` ${session.model_name} · ${new Date(session.created).toLocaleString()}`));
    if (session.id === this.current) open.setAttribute("aria-current", "true");
    open.addEventListener("click", () => this.onOpen(session));
    const remove = element("button", { type: "button", className: "link" }, "Delete");
    remove.setAttribute("aria-label", `Delete session ${session.name}`);
    remove.addEventListener("click", async () => {
      try {
        await call("DELETE", `/api/v1/generative-session/${session.id}`);
        row.remove();
        this.empty.hidden = this.list.children.length > 0;
        this.onDelete(session.id);
      } catch (problem) {
        this.onError(problem);
      }
    });
    row.append(open, remove);
    return row;
  }

  markCurrent(sessionId) {
    this.current = sessionId;
    for (const button of this.list.querySelectorAll(".session-open")) {
      const isCurrent = Number(button.parentElement.dataset.session) === sessionId;
      if (isCurrent) button.setAttribute("aria-current", "true");
      else button.removeAttribute("aria-current");
    }
  }
}

// Bulk jobs: shown only where there are some.
export async function showBatches(section, list, onError) {
  const batches = (await call("GET", "/v1/batches?limit=20")).data;
  section.hidden = batches.length === 0;
  list.replaceChildren(...batches.map((batch) => {
    const counts = batch.request_counts || { total: 0, completed: 0, failed: 0 };
    const row = element("li");
    row.append(element("span", {}, `${batch.id} · ${batch.status} · ${counts.completed + counts.failed} of ${counts.total}`));
    const bar = element("progress", { max: Math.max(counts.total, 1), value: counts.completed + counts.failed });
    bar.setAttribute("aria-label", `Progress of ${batch.id}`);
    row.append(bar);
    const downloads = [["Results (JSONL)", batch.output_file_id && `/v1/files/${batch.output_file_id}/content`, `${batch.id}.jsonl`],
      ["Images (zip)", batch.output_file_id && `/v1/batches/${batch.id}/images`, `${batch.id}.zip`]];
    for (const [label, path, filename] of downloads) {
      if (!path) continue;
      const link = element("button", { type: "button", className: "link" }, label);
      link.addEventListener("click", () => download(path, filename).catch(onError));
      row.append(link);
    }
    return row;
  }));
}

// A download through fetch, so that it carries the key.
async function download(path, filename) {
  const url = URL.createObjectURL(await bytes(path));
  const link = element("a", { href: url, download: filename });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
}
