// A session's results: each prompt's images with the parameters that made them (read from each
// image's own PNG), a download link, "Use these settings again", and delete.

import { bytes, call } from "./api.js";
import { element } from "./dom.js";
import { pngText } from "./png.js";

export const FINISHED = 3; // DashAI's process statuses
export const ERROR = 4;
const SHOWN_SETTINGS = [["seed", "seed"], ["num_inference_steps", "steps"], ["guidance_scale", "guidance"],
  ["size", "size"], ["model", "model"], ["loras", "adapters"], ["negative_prompt", "negative"]];

const images = new Map(); // file name -> {url, settings}: each image is fetched once

export async function image(name) {
  if (!images.has(name)) {
    const blob = await bytes(`/api/v1/generative-process/file/${encodeURIComponent(name)}`);
    images.set(name, { url: URL.createObjectURL(blob), settings: pngText(await blob.arrayBuffer()) });
  }
  return images.get(name);
}


export class Gallery {
  // `onUse(settings)`: fill the form; `onChange()`: the gallery's session changed (a delete).
  constructor(list, { onUse, onChange, onError }) {
    this.list = list;
    this.onUse = onUse;
    this.onChange = onChange;
    this.onError = onError;
  }

  clear() {
    this.list.replaceChildren();
  }

  // Every process of a session, newest first.
  async showSession(sessionId) {
    const processes = await call("GET", `/api/v1/generative-process/session/${sessionId}`);
    const items = await Promise.all(processes.reverse().map((process) => this.item(process)));
    this.list.replaceChildren(...items);
  }

  // A process that just ended goes on top.
  async add(process) {
    this.list.prepend(await this.item(process));
  }

  async item(process) {
    const prompt = process.input.map((row) => row.data).join(" ");
    const item = element("li", { className: "result" });
    item.dataset.process = process.id;
    const heading = element("div", { className: "result-head" });
    heading.append(element("p", { className: "prompt" }, prompt));
    const remove = element("button", { type: "button", className: "link" }, "Delete");
    remove.setAttribute("aria-label", `Delete the images of "${prompt}"`);
    remove.addEventListener("click", () => this.remove(process.id, item));
    heading.append(remove);
    item.append(heading);
    if (process.status === ERROR) {
      const reason = process.output.map((row) => row.data).join(" ").replace(/^Error details:\s*/, "");
      item.append(element("p", { className: reason === "cancelled" ? "muted" : "error" },
        reason === "cancelled" ? "Cancelled." : `Failed: ${reason}`));
      return item;
    }
    if (process.status !== FINISHED) {
      item.append(element("p", { className: "muted" }, "Still running on the server."));
      return item;
    }
    const figures = element("div", { className: "figures" });
    for (const row of process.output.filter((output) => output.data_type === "Image")) {
      figures.append(await this.figure(row.data, prompt));
    }
    item.append(figures);
    return item;
  }

  async figure(name, prompt) {
    const figure = element("figure");
    try {
      const { url, settings } = await image(name);
      figure.append(element("img", { src: url, alt: prompt, width: 256, height: 256 }));
      const caption = element("figcaption");
      const list = element("dl");
      for (const [key, label] of SHOWN_SETTINGS) {
        if (settings[key] === undefined || settings[key] === "") continue;
        list.append(element("dt", {}, label), element("dd", {}, settings[key]));
      }
      const actions = element("div", { className: "figure-actions" });
      actions.append(element("a", { href: url, download: name }, "Download"));
      const again = element("button", { type: "button", className: "link" }, "Use these settings again");
      again.addEventListener("click", () => this.onUse(settings));
      actions.append(again);
      caption.append(list, actions);
      figure.append(caption);
    } catch (problem) {
      figure.append(element("p", { className: "error" }, `Image ${name}: ${problem.message}`));
    }
    return figure;
  }

  async remove(processId, item) {
    try {
      await call("DELETE", `/api/v1/generative-process/${processId}`);
      item.remove();
      this.onChange();
    } catch (problem) {
      this.onError(problem);
    }
  }
}
