// The generation form: its fields take each model's defaults and limits from the model's own
// parameter schema (the one DashAI's forms are built from), and its adapter picker the
// model's usable LoRA adapters.

const NUMBER_FIELDS = ["width", "height", "num_inference_steps", "guidance_scale", "seed", "num_images_per_prompt"];
const MAX_ADAPTER_SCALE = 2; // t2i_task/config/parameters.py, MAX_LORA_SCALE

export class GenerationForm {
  constructor(form) {
    this.form = form;
    this.models = new Map(); // name -> {schema, adapters}
    this.modelSelect = form.querySelector("#model");
    this.adapters = form.querySelector("#adapters");
    this.adapterList = form.querySelector("#adapter-list");
    this.modelSelect.addEventListener("change", () => this.applyModel(this.modelSelect.value));
    form.addEventListener("input", (event) => event.target.removeAttribute("aria-invalid"));
  }

  // `components`: DashAI's model components (name, schema); `openaiModels`: /v1/models' list
  // (served order, the default first; each with its adapters).
  setModels(components, openaiModels) {
    const schemas = new Map(components.map((component) => [component.name, component.schema]));
    this.models.clear();
    this.modelSelect.replaceChildren();
    for (const model of openaiModels) {
      if (!schemas.has(model.id)) continue;
      const usable = (model.adapters || []).filter((adapter) => adapter.status === "ok").map((adapter) => adapter.name);
      this.models.set(model.id, { schema: schemas.get(model.id), adapters: usable });
      this.modelSelect.append(new Option(model.id, model.id));
    }
    if (this.models.size) this.applyModel(this.modelSelect.value);
  }

  get model() {
    return this.modelSelect.value;
  }

  // The model's limits as the inputs' bounds, its defaults as their values.
  applyModel(name) {
    const model = this.models.get(name);
    if (!model) return;
    this.modelSelect.value = name;
    const properties = model.schema.properties;
    for (const field of NUMBER_FIELDS) {
      const input = this.form.elements[field];
      const property = properties[field] || {};
      for (const [attribute, key] of [["min", "minimum"], ["max", "maximum"], ["step", "multipleOf"]]) {
        if (property[key] !== undefined) input.setAttribute(attribute, property[key]);
        else if (attribute !== "step") input.removeAttribute(attribute);
      }
      input.value = property.default ?? "";
      input.title = property.description || "";
    }
    const negative = this.form.elements.negative_prompt;
    negative.value = "";
    negative.maxLength = properties.negative_prompt?.anyOf?.find((option) => option.maxLength)?.maxLength ?? 1000;
    this.renderAdapters(model.adapters);
  }

  renderAdapters(names) {
    this.adapters.hidden = names.length === 0;
    this.adapterList.replaceChildren(...names.map((name) => {
      const row = document.createElement("div");
      row.className = "adapter";
      row.innerHTML = `<label><input type="checkbox" name="adapter"> <span></span></label>
        <label class="scale">scale <input type="number" name="adapter-scale" value="1" step="0.1"
          min="${-MAX_ADAPTER_SCALE}" max="${MAX_ADAPTER_SCALE}"></label>`;
      row.querySelector("span").textContent = name;
      row.querySelector("[name=adapter]").value = name;
      row.querySelector("[name=adapter-scale]").setAttribute("aria-label", `Scale of ${name}`);
      return row;
    }));
  }

  // DashAI's session parameters: `loras` is the text "name:scale, ..." (null for none).
  parameters() {
    const values = {};
    for (const field of NUMBER_FIELDS) values[field] = Number(this.form.elements[field].value);
    values.negative_prompt = this.form.elements.negative_prompt.value.trim() || null;
    const chosen = [...this.adapterList.querySelectorAll(".adapter")]
      .filter((row) => row.querySelector("[name=adapter]").checked)
      .map((row) => `${row.querySelector("[name=adapter]").value}:${row.querySelector("[name=adapter-scale]").value || 1}`);
    values.loras = chosen.join(", ") || null;
    return values;
  }

  // "Use these settings again": an image's own parameters (from its PNG) back into the form.
  use(settings) {
    if (settings.model && this.models.has(settings.model)) this.applyModel(settings.model);
    this.form.elements.prompt.value = settings.prompt ?? this.form.elements.prompt.value;
    this.form.elements.negative_prompt.value = settings.negative_prompt ?? "";
    const values = { ...settings };
    if (settings.size) [values.width, values.height] = settings.size.split("x"); // an image's PNG says "64x64"
    for (const field of NUMBER_FIELDS) {
      if (values[field] !== undefined && values[field] !== "") this.form.elements[field].value = values[field];
    }
    const scales = new Map((settings.loras || "").split(",").map((part) => part.trim().split(":"))
      .filter(([name]) => name).map(([name, scale]) => [name, scale ?? "1"]));
    for (const row of this.adapterList.querySelectorAll(".adapter")) {
      const name = row.querySelector("[name=adapter]").value;
      row.querySelector("[name=adapter]").checked = scales.has(name);
      if (scales.has(name)) row.querySelector("[name=adapter-scale]").value = scales.get(name);
    }
    this.form.elements.prompt.focus();
  }

  // The field a 422 named, marked for eyes and screen readers; its label, or null if no field has that name.
  markInvalid(field) {
    const input = field && this.form.elements[field.split(".").pop()];
    if (!(input instanceof HTMLElement)) return null;
    input.setAttribute("aria-invalid", "true");
    input.focus();
    return input.labels?.[0]?.textContent || field;
  }
}
