// Batchery's page: drop, pick or paste images; each becomes a job; its answer shows when it lands.
// Plain JavaScript, no build step and nothing from outside this gateway. Server text is only
// ever set as textContent, never parsed as HTML.
"use strict";

const PER_REQUEST = 64;   // images per POST: a multipart request each
const WAIT_S = 25;        // each poll waits server-side for the answer (GET ?wait=)
const $ = (id) => document.getElementById(id);
const drop = $("drop"), picker = $("files"), jobs = $("jobs"), message = $("message");
const keyRow = $("key-row"), keyInput = $("key");

keyInput.value = localStorage.getItem("batchery-key") || "";
if (keyInput.value) keyRow.hidden = false;
keyInput.addEventListener("change", () => {
  localStorage.setItem("batchery-key", keyInput.value.trim());
  loadModels();
});

function headers() {
  const key = keyInput.value.trim();
  return key ? { Authorization: "Bearer " + key } : {};
}

function say(text) {
  message.textContent = text || "";
  message.hidden = !text;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return body.error || response.statusText;
  } catch (e) {
    return response.status + " " + response.statusText;
  }
}

function needKey() {
  keyRow.hidden = false;
  say("This gateway needs an API key: enter it above.");
  keyInput.focus();
}

async function loadModels() {
  const response = await fetch("/v1/models", { headers: headers() });
  if (response.status === 401) return needKey();
  if (!response.ok) return;
  const select = $("model");
  while (select.options.length > 1) select.remove(1);
  for (const row of await response.json()) {
    const option = document.createElement("option");
    option.value = row.name + "@" + row.version;
    option.textContent = row.name + " v" + row.version + (row.promoted ? " (promoted)" : "");
    select.appendChild(option);
  }
}

function newCard(file, into) {
  const card = $("job-card").content.firstElementChild.cloneNode(true);
  card.querySelector(".name").textContent = file.name || "pasted image";
  card.dataset.file = file.name || "";
  const thumb = card.querySelector(".thumb");
  thumb.src = URL.createObjectURL(file);
  thumb.alt = file.name || "pasted image";
  into.appendChild(card);
  return card;
}

function setState(card, status, text) {
  card.dataset.status = status;
  card.querySelector(".state").textContent = text || status.toLowerCase();
}

function fail(card, status, text) {
  setState(card, status);
  const error = card.querySelector(".error");
  error.textContent = text;
  error.hidden = false;
}

function render(card, result) {
  if (result.status !== "SUCCESS") {
    return fail(card, result.status, result.error || result.status);
  }
  setState(card, "SUCCESS", "done");
  card.querySelector(".label").textContent = result.label;
  card.querySelector(".score").textContent = (result.score * 100).toFixed(1) + "%";
  const list = card.querySelector(".topk");
  list.replaceChildren();
  for (const guess of result.top_k || []) {
    const row = document.createElement("li");
    const name = document.createElement("span");
    name.textContent = guess.label;
    const bar = document.createElement("span");
    bar.className = "bar";
    const fill = document.createElement("span");
    fill.style.width = Math.max(0, Math.min(100, guess.score * 100)).toFixed(1) + "%";
    bar.appendChild(fill);
    const pct = document.createElement("span");
    pct.className = "pct";
    pct.textContent = (guess.score * 100).toFixed(1) + "%";
    row.append(name, bar, pct);
    list.appendChild(row);
  }
  const explanation = result.explanation;
  if (explanation && explanation.png) {
    const heatmap = card.querySelector(".heatmap");
    heatmap.src = "data:image/png;base64," + explanation.png;
    heatmap.hidden = false;
  } else if (explanation && explanation.error) {
    const note = card.querySelector(".error");
    note.textContent = explanation.error;
    note.hidden = false;
  }
}

const sleep = (ms) => new Promise((done) => setTimeout(done, ms));

async function follow(card, location) {
  let pause = 500;
  for (;;) {
    let response;
    try {
      response = await fetch(location + "?wait=" + WAIT_S, { headers: headers() });
    } catch (e) {
      await sleep(pause);
      pause = Math.min(pause * 2, 8000);
      continue;
    }
    if (response.ok) {
      const result = await response.json();
      if (result.status !== "PENDING") return render(card, result);
      setState(card, "PENDING", "queued");
      pause = 500;
      continue;
    }
    if (response.status === 401) return needKey();
    if (response.status === 404) return fail(card, "FAILURE", await errorText(response));
    const after = Number(response.headers.get("Retry-After"));
    await sleep(after > 0 ? after * 1000 : pause);
    pause = Math.min(pause * 2, 8000);
  }
}

async function send(files) {
  const batch = document.createDocumentFragment();
  const cards = files.map((file) => newCard(file, batch));
  jobs.prepend(batch);  // newest request first, its images in the order they were given
  const form = new FormData();
  files.forEach((file, i) => form.append("images", file, file.name || "pasted-" + i + ".png"));
  const [model, version] = $("model").value.split("@");
  if (model) form.append("model", model);
  if (version) form.append("version", version);
  form.append("priority", $("priority").value);
  if ($("explain").checked) form.append("explain", "true");
  let response;
  try {
    response = await fetch("/v1/jobs", { method: "POST", body: form, headers: headers() });
  } catch (e) {
    return cards.forEach((card) => fail(card, "REFUSED", "the gateway can't be reached"));
  }
  if (response.status !== 202) {
    const text = await errorText(response);
    if (response.status === 401) needKey();
    return cards.forEach((card) => fail(card, "REFUSED", text));
  }
  const accepted = await response.json();
  accepted.jobs.forEach((job, i) => {
    cards[i].dataset.jobId = job.job_id;
    setState(cards[i], "PENDING", "queued");
    follow(cards[i], job.location);
  });
}

function take(fileList) {
  const files = Array.from(fileList || []).filter((f) => f.type === "" || f.type.startsWith("image/"));
  if (!files.length) return say("No image in what was dropped.");
  say("");
  for (let i = 0; i < files.length; i += PER_REQUEST) send(files.slice(i, i + PER_REQUEST));
}

drop.addEventListener("click", (event) => { if (event.target !== picker) picker.click(); });
drop.addEventListener("keydown", (event) => {
  if (event.key === "Enter" || event.key === " ") { event.preventDefault(); picker.click(); }
});
picker.addEventListener("change", () => { take(picker.files); picker.value = ""; });
drop.addEventListener("dragover", (event) => { event.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (event) => {
  event.preventDefault();
  drop.classList.remove("over");
  take(event.dataTransfer.files);
});
document.addEventListener("paste", (event) => take(event.clipboardData && event.clipboardData.files));

loadModels();
