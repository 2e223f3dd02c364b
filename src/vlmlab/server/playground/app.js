// vlmlab playground: a chat page over the server's own OpenAI-compatible API.
// Plain ES modules, no dependencies, no build step. Model text never reaches innerHTML: answers
// go through markdown.js, which builds DOM nodes and sets text with textContent only.

import { el, renderMarkdown } from "./markdown.js";

const $ = (id) => document.getElementById(id);
const STORE = "vlmlab.playground.v1";
const KEY_STORE = "vlmlab.apiKey";

const state = {
  models: [],            // cards from /v1/models
  conversations: [],     // [{id, title, system, messages}]
  current: null,         // the conversation shown
  pending: [],           // images of the message being written: {url, name, tokens}
  running: [],           // AbortControllers of the answers streaming now
  busy: false,           // a turn is being answered
  retry: null,           // what to do once the API key is given
};
const nodes = new WeakMap();  // answer -> its <article>, redrawn while it streams

// -- storage ---------------------------------------------------------------------------------

function newConversation() {
  return { id: `c${Date.now()}${Math.floor(Math.random() * 1e6)}`, title: "New chat", system: "", messages: [] };
}

function load() {
  try {
    const saved = JSON.parse(localStorage.getItem(STORE) || "null");
    if (saved && Array.isArray(saved.conversations) && saved.conversations.length) {
      state.conversations = saved.conversations;
      state.current = state.conversations.find((c) => c.id === saved.current) || state.conversations[0];
      return;
    }
  } catch (err) {
    notice(`Saved chats could not be read (${err.message}); starting afresh.`);
  }
  state.current = newConversation();
  state.conversations = [state.current];
}

function save() {
  try {
    localStorage.setItem(STORE, JSON.stringify({ conversations: state.conversations, current: state.current.id }));
  } catch (err) {
    notice(`This chat is not saved in the browser: ${err.message} (images take room; export it instead).`);
  }
}

function apiKey() { return sessionStorage.getItem(KEY_STORE) || ""; }

// -- the API ---------------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, message, retryAfter) {
    super(message);
    this.status = status;
    this.retryAfter = retryAfter;
  }
}

async function api(path, body, signal) {
  const headers = { "content-type": "application/json" };
  if (apiKey()) headers.authorization = `Bearer ${apiKey()}`;
  const response = await fetch(path, {
    method: body === undefined ? "GET" : "POST",
    headers,
    body: body === undefined ? undefined : JSON.stringify(body),
    signal,
  });
  if (!response.ok) throw await apiError(response);
  return response;
}

async function apiError(response) {
  let message = `HTTP ${response.status}`;
  try {
    const body = await response.json();
    message = (body.error && body.error.message) || body.detail || message;
  } catch { /* not JSON: keep the status line */ }
  return new ApiError(response.status, message, response.headers.get("retry-after"));
}

function errorText(err) {
  if (err.status === 429) {
    const wait = err.retryAfter ? ` Retry in ${err.retryAfter} s.` : "";
    return `The server is busy: ${err.message.replace(/\.$/, "")}.${wait}`;
  }
  return err.message;
}

function needKey(err, again) {
  if (!(err instanceof ApiError) || err.status !== 401) return false;
  state.retry = again;
  $("key-form").hidden = false;
  $("key-input").focus();
  return true;
}

// -- models ----------------------------------------------------------------------------------

async function loadModels() {
  try {
    const response = await api("/v1/models");
    state.models = (await response.json()).data || [];
  } catch (err) {
    if (!needKey(err, loadModels)) notice(`Models: ${errorText(err)}`);
    return;
  }
  const select = $("model");
  const chosen = select.value;
  select.replaceChildren(...state.models.map((m) => {
    const option = el("option", null, m.id);
    option.value = m.id;
    return option;
  }));
  if (state.models.some((m) => m.id === chosen)) select.value = chosen;
  const box = $("compare-models");
  box.replaceChildren(...state.models.map((m) => {
    const label = el("label", "check");
    const check = el("input");
    check.type = "checkbox";
    check.value = m.id;
    check.className = "compare-model";
    label.append(check, document.createTextNode(` ${m.id}`));
    return label;
  }));
  $("compare-box").hidden = state.models.length < 2;
  renderProcessorOptions();
  schedulePreview();
}

// -- processor options -----------------------------------------------------------------------

/** A control per option of the selected model's family (its card's processor_options): a select
 * for a closed set, a checkbox for a flag, a number or text box otherwise, showing the default. */
function renderProcessorOptions() {
  const options = modelCard($("model").value)?.processor_options || [];
  $("processor-options").replaceChildren(...options.map((option) => {
    let control;
    if (option.choices) {
      control = el("select");
      control.append(...option.choices.map((choice) => {
        const item = el("option", null, String(choice));
        item.value = String(choice);
        return item;
      }));
      control.value = String(option.default ?? option.choices[0]);
    } else if (option.kind === "bool") {
      control = el("input");
      control.type = "checkbox";
      control.checked = Boolean(option.default);
    } else {
      control = el("input");
      control.type = option.kind === "int" ? "number" : "text";
      if (option.kind === "int") control.step = "1";
      if (option.minimum !== undefined) control.min = String(option.minimum);
      control.value = option.default === null || option.default === undefined ? "" : String(option.default);
      control.placeholder = "default";
    }
    control.dataset.option = option.name;
    control.dataset.kind = option.kind;
    control.dataset.default = JSON.stringify(option.default ?? null);
    control.addEventListener("change", optionsChanged);
    const label = el("label", null, `${option.name} `);
    if (option.help) label.title = option.help;
    label.append(control);
    return label;
  }));
}

function optionValue(control) {
  if (control.dataset.kind === "bool") return control.checked;
  const text = control.value.trim();
  if (text === "") return null;
  if (control.dataset.kind === "int") return Number.isFinite(Number(text)) ? Math.round(Number(text)) : null;
  return text;
}

/** The request's mm_processor_kwargs for ``model``: the preprocessing mode (any model) and the
 * family options (only for the selected model, whose options the controls show) that differ
 * from their defaults; null when there is nothing to send. */
function processorKwargs(model) {
  const kwargs = {};
  if ($("preprocess-mode").value) kwargs.preprocess_mode = $("preprocess-mode").value;
  if (model === $("model").value) {
    for (const control of document.querySelectorAll("#processor-options [data-option]")) {
      const value = optionValue(control);
      if (value !== null && value !== JSON.parse(control.dataset.default)) kwargs[control.dataset.option] = value;
    }
  }
  return Object.keys(kwargs).length ? kwargs : null;
}

function processorBody(model) {
  const kwargs = processorKwargs(model);
  return kwargs ? { mm_processor_kwargs: kwargs } : {};
}

function optionsChanged() {
  schedulePreview();
  if (viewsShown) showViews(viewsShown);
}

function modelCard(id) { return state.models.find((m) => m.id === id); }

function compareModels() {
  const ids = [...document.querySelectorAll(".compare-model:checked")].map((c) => c.value);
  return ids.length >= 2 ? ids.slice(0, 4) : [$("model").value];
}

// -- images ----------------------------------------------------------------------------------

function readAsDataUrl(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result);
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function addFiles(files) {
  for (const file of files) {
    if (file.type && !file.type.startsWith("image/")) {
      notice(`${file.name} is not an image (${file.type}).`);
      continue;
    }
    state.pending.push({ url: await readAsDataUrl(file), name: file.name || "pasted image", tokens: null });
  }
  renderPending();
  schedulePreview();
}

function addUrl() {
  const input = $("image-url");
  const url = input.value.trim();
  if (!url) return;
  if (!/^(https?:|data:image\/)/i.test(url)) {
    notice("An image URL starts with http://, https:// or data:image/.");
    return;
  }
  state.pending.push({ url, name: url, tokens: null });
  input.value = "";
  renderPending();
  schedulePreview();
}

function thumbnail(url, name) {
  // Only data: images are shown (the page's CSP allows no other hosts); a URL shows where it is.
  if (url.startsWith("data:image/")) {
    const img = el("img", "thumb-img");
    img.alt = name;
    img.src = url;
    img.addEventListener("error", () => img.replaceWith(el("span", "thumb-url", "not an image?")));
    return img;
  }
  let where = url;
  try {
    const parsed = new URL(url);
    where = parsed.host + parsed.pathname;
  } catch { /* keep it whole */ }
  const span = el("span", "thumb-url", where);
  span.title = url;
  return span;
}

/** A thumbnail that, clicked, shows what ``model`` (null: the selected one) sees of the image. */
function viewsThumb(url, name, model) {
  const button = el("button", "thumb-button");
  button.type = "button";
  button.title = `What the model sees of ${name}`;
  button.setAttribute("aria-label", `What the model sees of ${name}`);
  button.append(thumbnail(url, name));
  button.addEventListener("click", () => showViews({ url, name, model }));
  return button;
}

function renderPending() {
  const list = $("pending");
  list.replaceChildren(...state.pending.map((image, index) => {
    const li = el("li", "thumb");
    li.append(viewsThumb(image.url, image.name, null));
    const cost = el("span", "cost", image.tokens === null ? "…" : `${image.tokens} tok`);
    if (image.tokens !== null) cost.dataset.tokens = image.tokens;
    const remove = el("button", "remove", "×");
    remove.type = "button";
    remove.title = `Remove ${image.name}`;
    remove.setAttribute("aria-label", `Remove ${image.name}`);
    remove.addEventListener("click", () => {
      state.pending.splice(index, 1);
      renderPending();
      schedulePreview();
    });
    li.append(cost, remove);
    return li;
  }));
}

// -- messages --------------------------------------------------------------------------------

function userContent(text, images) {
  if (!images.length) return text;
  const parts = images.map((image) => ({ type: "image_url", image_url: { url: image.url } }));
  if (text) parts.push({ type: "text", text });
  return parts;
}

/** The conversation as OpenAI messages. The first answer of a comparison stands for its turn;
 * a turn whose answer failed (a bad image, a busy server) is left out, question included. */
function wireMessages(conversation) {
  const messages = [];
  if (conversation.system.trim()) messages.push({ role: "system", content: conversation.system });
  const all = conversation.messages;
  all.forEach((message, index) => {
    if (message.role === "assistant") {
      const answer = message.answers[0];
      if (answer && !answer.error) messages.push({ role: "assistant", content: answer.content });
    } else if (!(all[index + 1]?.role === "assistant" && all[index + 1].answers[0]?.error)) {
      messages.push({ role: message.role, content: message.content });
    }
  });
  return messages;
}

function samplingBody() {
  const body = {};
  const number = (id) => ($(id).value.trim() === "" ? null : Number($(id).value));
  const temperature = number("temperature");
  const topP = number("top-p");
  const maxTokens = number("max-tokens");
  const seed = number("seed");
  if (temperature !== null) body.temperature = temperature;
  if (topP !== null) body.top_p = topP;
  if (maxTokens !== null) body.max_tokens = Math.round(maxTokens);
  if (seed !== null) body.seed = Math.round(seed);
  if ($("ignore-eos").checked) body.ignore_eos = true;
  return body;
}

function renderContent(content, parent, model) {
  if (typeof content === "string") {
    parent.append(el("div", "text", content));
    return;
  }
  const images = el("div", "images");
  for (const part of content) {
    if (part.type === "text") parent.append(el("div", "text", part.text));
    else if (part.type === "image_url") images.append(viewsThumb(part.image_url.url, `image ${images.childNodes.length + 1}`, model));
  }
  if (images.childNodes.length) parent.prepend(images);
}

function figuresText(answer) {
  const usage = answer.usage || {};
  const timings = answer.timings || {};
  const parts = [];
  if (usage.prompt_tokens !== undefined) parts.push(`prompt ${usage.prompt_tokens}`);
  const details = usage.prompt_tokens_details || {};
  if (details.image_tokens !== undefined && details.image_tokens !== null) parts.push(`image ${details.image_tokens}`);
  if (usage.completion_tokens !== undefined) parts.push(`completion ${usage.completion_tokens}`);
  if (timings.ttft_ms !== undefined && timings.ttft_ms !== null) parts.push(`TTFT ${Math.round(timings.ttft_ms)} ms`);
  else if (answer.firstTokenMs !== undefined) parts.push(`TTFT ${Math.round(answer.firstTokenMs)} ms (here)`);
  if (timings.decode_tokens_per_s) parts.push(`${timings.decode_tokens_per_s.toFixed(1)} tok/s`);
  if (timings.preprocess_cache_hits !== undefined) parts.push(`cache hits ${timings.preprocess_cache_hits}`);
  if (timings.response_cache_hit) parts.push("response cached");
  if (answer.stopped) parts.push("stopped");
  return parts.join(" · ");
}

function renderAnswer(answer, node) {
  node.replaceChildren();
  node.append(el("div", "model-name", answer.model));
  const body = el("div", "markdown");
  body.append(renderMarkdown(answer.content || ""));
  node.append(body);
  if (answer.error) node.append(el("div", "error", answer.error));
  const figures = el("div", "figures", figuresText(answer));
  const usage = answer.usage || {};
  if (usage.prompt_tokens_details) figures.dataset.imageTokens = usage.prompt_tokens_details.image_tokens ?? "";
  if (usage.completion_tokens !== undefined) figures.dataset.completionTokens = usage.completion_tokens;
  node.append(figures);
}

function renderMessages() {
  const list = $("messages");
  const conversation = state.current;
  list.replaceChildren();
  conversation.messages.forEach((message, index) => {
    const li = el("li", `message ${message.role}`);
    if (message.role === "user") {
      renderContent(message.content, li, conversation.messages[index + 1]?.answers?.[0]?.model || null);
      if (!state.busy) {
        const edit = el("button", "edit", "Edit");
        edit.type = "button";
        edit.setAttribute("aria-label", "Edit and resend this message");
        edit.addEventListener("click", () => editMessage(li, index));
        li.append(edit);
      }
    } else {
      const answers = el("div", message.answers.length > 1 ? "answers compare" : "answers");
      for (const answer of message.answers) {
        const node = el("article", "answer");
        renderAnswer(answer, node);
        nodes.set(answer, node);
        answers.append(node);
      }
      li.append(answers);
      if (index === conversation.messages.length - 1 && !state.busy) {
        const again = el("button", "regenerate", "Regenerate");
        again.type = "button";
        again.addEventListener("click", regenerate);
        li.append(again);
      }
    }
    list.append(li);
  });
  list.lastElementChild?.scrollIntoView({ block: "end" });
}

function refreshConversations() {
  const select = $("conversations");
  select.replaceChildren(...state.conversations.map((c) => {
    const option = el("option", null, c.title);
    option.value = c.id;
    return option;
  }));
  select.value = state.current.id;
  $("system").value = state.current.system;
}

let noticeTimer = null;
function notice(text) {
  let node = $("notice");
  if (!node) {
    node = el("div", "notice");
    node.id = "notice";
    node.setAttribute("role", "status");
    document.body.append(node);
  }
  node.textContent = text;
  node.hidden = false;
  clearTimeout(noticeTimer);
  noticeTimer = setTimeout(() => { node.hidden = true; }, 8000);
}

// -- token preview ---------------------------------------------------------------------------

let previewTimer = null;
let previewSerial = 0;

function schedulePreview() {
  clearTimeout(previewTimer);
  previewTimer = setTimeout(preview, 250);
}

async function preview() {
  const serial = ++previewSerial;
  const target = $("token-preview");
  const text = $("input").value;
  if (!text.trim() && !state.pending.length) { target.textContent = ""; delete target.dataset.count; return; }
  const model = $("model").value;
  const messages = [...wireMessages(state.current), { role: "user", content: userContent(text, state.pending) }];
  const pending = [...state.pending];
  try {
    const response = await api("/tokenize", { model: model || undefined, messages, ...processorBody(model) });
    const count = await response.json();
    if (serial !== previewSerial) return;
    const own = count.per_image_tokens.slice(count.per_image_tokens.length - pending.length);
    pending.forEach((image, i) => { image.tokens = own[i] ?? null; });
    renderPending();
    target.textContent = `${count.prompt_tokens} / ${count.max_model_len} tokens (images ${count.image_tokens})`;
    target.dataset.count = count.prompt_tokens;
    target.dataset.imageTokens = count.image_tokens;
    target.classList.toggle("over", count.prompt_tokens > count.max_model_len);
  } catch (err) {
    if (serial !== previewSerial) return;
    delete target.dataset.count;
    if (!needKey(err, preview)) target.textContent = `tokens: ${errorText(err)}`;
  }
}

// -- chat ------------------------------------------------------------------------------------

async function streamAnswer(answer, body, onUpdate) {
  const controller = new AbortController();
  state.running.push(controller);
  const started = performance.now();
  try {
    const response = await api("/v1/chat/completions", body, controller.signal);
    const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data:")) continue;
          const data = line.slice(5).trim();
          if (data === "[DONE]") continue;
          const chunk = JSON.parse(data);
          if (chunk.error) { answer.error = chunk.error.message; continue; }
          for (const choice of chunk.choices || []) {
            if (choice.delta && choice.delta.content) {
              if (!answer.content && answer.firstTokenMs === undefined) answer.firstTokenMs = performance.now() - started;
              answer.content += choice.delta.content;
            }
            if (choice.finish_reason) answer.finish = choice.finish_reason;
          }
          if (chunk.timings) answer.timings = chunk.timings;
          if (chunk.usage) answer.usage = chunk.usage;
        }
        onUpdate();
      }
    }
  } catch (err) {
    if (err.name === "AbortError") answer.stopped = true;
    else if (needKey(err, null)) answer.error = "The server needs an API key: enter it above, then Regenerate.";
    else answer.error = errorText(err);
  } finally {
    state.running = state.running.filter((c) => c !== controller);
    onUpdate();
  }
}

function setBusy(busy) {
  state.busy = busy;
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

async function answerTurn() {
  const conversation = state.current;
  const messages = wireMessages(conversation);
  const models = compareModels();
  const turn = { role: "assistant", answers: models.map((model) => ({ model, content: "", usage: null, timings: null })) };
  conversation.messages.push(turn);
  setBusy(true);
  renderMessages();
  let frame = 0;
  const draw = () => {
    if (frame) return;
    frame = requestAnimationFrame(() => {
      frame = 0;
      for (const answer of turn.answers) if (nodes.has(answer)) renderAnswer(answer, nodes.get(answer));
      $("messages").lastElementChild?.scrollIntoView({ block: "end" });
    });
  };
  await Promise.all(turn.answers.map((answer) => streamAnswer(answer, {
    model: answer.model,
    messages,
    stream: true,
    stream_options: { include_usage: true },
    ...samplingBody(),
    ...processorBody(answer.model),
  }, draw)));
  cancelAnimationFrame(frame);
  setBusy(false);
  save();
  renderMessages();
}

async function send() {
  if (state.busy) return;
  const text = $("input").value;
  if (!text.trim() && !state.pending.length) return;
  const conversation = state.current;
  conversation.system = $("system").value;
  conversation.messages.push({ role: "user", content: userContent(text, state.pending) });
  if (conversation.title === "New chat" && text.trim()) {
    conversation.title = text.trim().slice(0, 40);
    refreshConversations();
  }
  $("input").value = "";
  state.pending = [];
  renderPending();
  $("token-preview").textContent = "";
  delete $("token-preview").dataset.count;
  save();
  await answerTurn();
}

async function regenerate() {
  const conversation = state.current;
  if (state.busy || conversation.messages.at(-1)?.role !== "assistant") return;
  conversation.messages.pop();
  await answerTurn();
}

function messageText(content) {
  if (typeof content === "string") return content;
  return content.filter((part) => part.type === "text").map((part) => part.text).join("\n");
}

/** The message's text in a box with Resend and Cancel; its images stay as they are. */
function editMessage(li, index) {
  if (state.busy) return;
  const message = state.current.messages[index];
  const box = el("textarea", "edit-box");
  box.rows = 3;
  box.value = messageText(message.content);
  box.setAttribute("aria-label", "Edited message");
  const resendButton = el("button", "primary resend", "Resend");
  resendButton.type = "button";
  resendButton.addEventListener("click", () => resend(index, box.value));
  const cancel = el("button", "cancel-edit", "Cancel");
  cancel.type = "button";
  cancel.addEventListener("click", renderMessages);
  box.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      resend(index, box.value);
    } else if (event.key === "Escape") {
      event.stopPropagation();
      renderMessages();
    }
  });
  const row = el("div", "row");
  row.append(resendButton, cancel);
  li.querySelectorAll(".text, .edit").forEach((node) => node.remove());
  li.append(box, row);
  box.focus();
}

/** Message ``index`` with ``text`` instead of its text, answered again: everything after it in
 * the conversation is replaced by the new answer. */
async function resend(index, text) {
  const conversation = state.current;
  const old = conversation.messages[index];
  if (state.busy || !old || old.role !== "user") return;
  let content = text;
  if (Array.isArray(old.content)) {
    content = old.content.filter((part) => part.type !== "text");
    if (text) content.push({ type: "text", text });
    if (!content.some((part) => part.type === "image_url")) content = text;
  }
  if (!text.trim() && typeof content === "string") return;
  conversation.messages.splice(index);
  conversation.messages.push({ role: old.role, content });
  save();
  await answerTurn();
}

function stop() {
  for (const controller of state.running) controller.abort();
}

// -- what the model sees --------------------------------------------------------------------

let viewsShown = null;   // {url, name, model} shown in the panel; shown again when options change
let viewsSerial = 0;
const VIEWS_MIN_SIDE = 384;  // canvas pixels: the preview's longest side is drawn at least this large

function loadPicture(url) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("the preview is not an image"));
    img.src = url;
  });
}

/** The preview at its size on the canvas, with the grid's lines over it (patches or tiles,
 * spread evenly over the resized image, as the processor cuts it). The page's CSP allows no
 * inline styles, so the lines are drawn rather than laid out. */
async function drawViews(view) {
  const picture = await loadPicture(view.preview);
  const canvas = $("views-canvas");
  // A small picture (nano's 192 px) is drawn larger, so that its grid lines stay thin and sharp.
  const scale = Math.max(1, VIEWS_MIN_SIDE / Math.max(picture.naturalWidth, picture.naturalHeight));
  canvas.width = Math.round(picture.naturalWidth * scale);
  canvas.height = Math.round(picture.naturalHeight * scale);
  const context = canvas.getContext("2d");
  context.imageSmoothingEnabled = scale === 1;
  context.drawImage(picture, 0, 0, canvas.width, canvas.height);
  const [rows, cols] = view.grid;
  const lines = (count, length, along) => {
    for (let i = 1; i < count; i += 1) {
      const at = Math.round((i * length) / count) + 0.5;
      context.beginPath();
      if (along === "x") { context.moveTo(at, 0); context.lineTo(at, canvas.height); } else { context.moveTo(0, at); context.lineTo(canvas.width, at); }
      context.stroke();
    }
  };
  for (const [colour, width] of [["rgba(0,0,0,.55)", 3], ["rgba(255,255,255,.9)", 1]]) {
    context.strokeStyle = colour;
    context.lineWidth = view.unit === "tiles" ? width + 1 : width;
    lines(cols, canvas.width, "x");
    lines(rows, canvas.height, "y");
  }
}

function viewFacts(view) {
  const [rows, cols] = view.grid;
  return [
    ["Image", `${view.width} × ${view.height}`],
    ["Resized to", `${view.resized[0]} × ${view.resized[1]}`],
    ["Grid", `${rows} x ${cols} ${view.unit}`],
    ["Views", String(view.views)],
    ["Tokens", String(view.tokens)],
  ];
}

/** POST /views for one image (with the processor options) and the answer in the panel. */
async function showViews(image) {
  viewsShown = image;
  const serial = ++viewsSerial;
  const model = image.model || $("model").value;
  const panel = $("views");
  panel.hidden = false;
  for (const key of ["resized", "grid", "tokens", "views", "unit"]) delete panel.dataset[key];
  $("views-name").textContent = `${image.name} · ${model}`;
  const facts = $("views-facts");
  facts.replaceChildren(el("dd", null, "…"));
  try {
    const response = await api("/views", {
      model: model || undefined,
      messages: [{ role: "user", content: [{ type: "image_url", image_url: { url: image.url } }] }],
      ...processorBody(model),
    });
    const view = (await response.json()).images[0];
    if (serial !== viewsSerial) return;
    await drawViews(view);
    if (serial !== viewsSerial) return;
    facts.replaceChildren(...viewFacts(view).flatMap(([name, value]) => [el("dt", null, name), el("dd", null, value)]));
    Object.assign(panel.dataset, {
      resized: view.resized.join("x"), grid: view.grid.join("x"), tokens: view.tokens, views: view.views, unit: view.unit,
    });
  } catch (err) {
    if (serial !== viewsSerial) return;
    if (!needKey(err, () => showViews(image))) facts.replaceChildren(el("dd", "error", `views: ${errorText(err)}`));
  }
}

function closeViews() {
  viewsShown = null;
  viewsSerial += 1;
  $("views").hidden = true;
}

// -- export / import -------------------------------------------------------------------------

function exportConversation() {
  const json = JSON.stringify(wireMessages(state.current), null, 2);
  const link = el("a");
  link.href = URL.createObjectURL(new Blob([json], { type: "application/json" }));
  link.download = `${state.current.title.replace(/[^\w-]+/g, "_") || "chat"}.json`;
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(link.href), 1000);
}

async function importConversation(file) {
  let messages;
  try {
    const parsed = JSON.parse(await file.text());
    messages = Array.isArray(parsed) ? parsed : parsed.messages;
    const valid = (m) => m && typeof m.role === "string" && (typeof m.content === "string" || Array.isArray(m.content)
      || (m.role === "assistant" && m.content === null));
    if (!Array.isArray(messages) || !messages.every(valid)) {
      throw new Error("expected a JSON array of {role, content} messages (content a string or a list of parts)");
    }
  } catch (err) {
    notice(`Import failed: ${err.message}`);
    return;
  }
  const conversation = newConversation();
  conversation.title = file.name.replace(/\.json$/i, "");
  for (const message of messages) {
    if (message.role === "system" && !conversation.messages.length) conversation.system = String(message.content);
    else if (message.role === "assistant") {
      conversation.messages.push({ role: "assistant", answers: [{ model: "", content: String(message.content ?? ""), usage: null, timings: null }] });
    } else conversation.messages.push({ role: message.role, content: message.content });
  }
  state.conversations.push(conversation);
  state.current = conversation;
  save();
  refreshConversations();
  renderMessages();
}

// -- wiring ----------------------------------------------------------------------------------

function wire() {
  $("send").addEventListener("click", send);
  $("stop").addEventListener("click", stop);
  $("input").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    }
  });
  document.addEventListener("keydown", (event) => { if (event.key === "Escape") stop(); });
  $("input").addEventListener("input", schedulePreview);
  $("model").addEventListener("change", () => { renderProcessorOptions(); optionsChanged(); });
  $("preprocess-mode").addEventListener("change", optionsChanged);
  $("views-close").addEventListener("click", closeViews);
  $("system").addEventListener("change", () => { state.current.system = $("system").value; save(); schedulePreview(); });
  $("file").addEventListener("change", async (event) => {
    await addFiles([...event.target.files]);
    event.target.value = "";
  });
  $("add-url").addEventListener("click", addUrl);
  $("image-url").addEventListener("keydown", (event) => { if (event.key === "Enter") { event.preventDefault(); addUrl(); } });
  // Images dropped anywhere on the page join the message (and a stray drop never navigates away).
  const composer = $("composer");
  document.addEventListener("dragover", (event) => { event.preventDefault(); composer.classList.add("dropping"); });
  document.addEventListener("dragleave", (event) => { if (!event.relatedTarget) composer.classList.remove("dropping"); });
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    composer.classList.remove("dropping");
    const files = [...(event.dataTransfer?.files || [])];
    if (files.length) addFiles(files);
  });
  document.addEventListener("paste", (event) => {
    const files = [...(event.clipboardData?.files || [])].filter((f) => f.type.startsWith("image/"));
    if (files.length) {
      event.preventDefault();
      addFiles(files);
    }
  });
  $("new-chat").addEventListener("click", () => {
    state.current = newConversation();
    state.conversations.push(state.current);
    save();
    refreshConversations();
    renderMessages();
  });
  $("conversations").addEventListener("change", (event) => {
    state.current = state.conversations.find((c) => c.id === event.target.value) || state.current;
    save();
    refreshConversations();
    renderMessages();
  });
  $("export").addEventListener("click", exportConversation);
  $("import").addEventListener("change", async (event) => {
    if (event.target.files[0]) await importConversation(event.target.files[0]);
    event.target.value = "";
  });
  $("toggle-settings").addEventListener("click", () => {
    const hidden = $("settings").classList.toggle("collapsed");
    $("toggle-settings").setAttribute("aria-expanded", String(!hidden));
  });
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    sessionStorage.setItem(KEY_STORE, $("key-input").value.trim());
    $("key-input").value = "";
    $("key-form").hidden = true;
    $("forget-key").hidden = false;
    const again = state.retry;
    state.retry = null;
    loadModels();
    if (again && again !== loadModels) again();
  });
  $("forget-key").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORE);
    $("forget-key").hidden = true;
  });
  $("forget-key").hidden = !apiKey();
}

load();
wire();
refreshConversations();
renderMessages();
renderPending();
loadModels();
document.body.dataset.ready = "true";
