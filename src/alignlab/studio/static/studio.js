// alignlab studio: the page's script. Every model answer and every typed text is put in the page with
// textContent, never as HTML. State-changing requests carry the page's CSRF token.
"use strict";

const $ = (id) => document.getElementById(id);
const meta = (name) => document.querySelector(`meta[name="${name}"]`).getAttribute("content");
const CSRF = meta("csrf-token");
const LETTERS = "abcd";
const store = window.localStorage;
let tab = window.sessionStorage.getItem("alignlab-studio:tab");
if (!tab) {
  tab = Math.random().toString(36).slice(2) + Date.now().toString(36);
  window.sessionStorage.setItem("alignlab-studio:tab", tab);
}

const state = {
  view: "label",
  labeller: store.getItem("alignlab-studio:labeller") || meta("default-labeller"),
  item: null, order: [], tiePending: false, allBad: false, busy: false,
  abRound: Number(store.getItem("alignlab-studio:ab-round")) || null, abItem: null, abBusy: false,
};

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = String(text);
  return node;
}

async function api(path, body) {
  const options = body === undefined ? {} : {
    method: "POST", body: JSON.stringify(body),
    headers: { "Content-Type": "application/json", "X-CSRF-Token": CSRF },
  };
  const response = await fetch(path, options);
  let data = {};
  try { data = await response.json(); } catch (e) { data = { error: `HTTP ${response.status}` }; }
  if (!response.ok) {
    const detail = data.error || (Array.isArray(data.detail) ? data.detail.map((d) => d.msg).join("; ") : data.detail);
    throw new Error(detail || `HTTP ${response.status}`);
  }
  return data;
}

function q(params) { return new URLSearchParams(params).toString(); }

// ------------------------------------------------------------------------------------------------ views

function show(view) {
  state.view = view;
  for (const button of document.querySelectorAll("nav button")) {
    button.classList.toggle("active", button.dataset.view === view);
  }
  for (const name of ["label", "train", "ab", "people"]) $(`view-${name}`).hidden = name !== view;
  if (view === "ab") nextAB();
}

function renderPrompt(node, messages) {
  node.replaceChildren();
  for (const message of messages) {
    const line = el("div", `msg ${message.role}`);
    if (messages.length > 1) line.append(el("span", "role", `${message.role}: `));
    line.append(el("span", "content", message.content));
    node.append(line);
  }
}

// ------------------------------------------------------------------------------------------------ label

function draftKey(item) { return `alignlab-studio:draft:${state.labeller}:${item}`; }

function saveDraft() {
  if (!state.item) return;
  store.setItem(draftKey(state.item.id), JSON.stringify(
    { order: state.order, allBad: state.allBad, better: $("better").value }));
}

function loadDraft() {
  const raw = store.getItem(draftKey(state.item.id));
  state.order = []; state.allBad = false; state.tiePending = false; $("better").value = "";
  if (!raw) return;
  try {
    const draft = JSON.parse(raw);
    state.order = draft.order || []; state.allBad = !!draft.allBad; $("better").value = draft.better || "";
  } catch (e) { /* a damaged draft is dropped */ }
}

function rankOf(position) {
  for (let i = 0; i < state.order.length; i++) if (state.order[i].includes(position)) return i + 1;
  return null;
}

function renderRanking() {
  const item = state.item;
  if (!item) return;
  const cards = $("answers").children;
  for (let i = 0; i < cards.length; i++) {
    const rank = rankOf(i);
    cards[i].querySelector(".rank").textContent = state.allBad ? "bad" : rank ? `#${rank}` : "";
    cards[i].classList.toggle("ranked", rank !== null && !state.allBad);
    cards[i].classList.toggle("bad", state.allBad);
  }
  let text;
  if (state.allBad) text = "all bad";
  else if (!state.order.length) text = "(press the letters, best first)";
  else {
    text = state.order.map((tier) => tier.map((p) => LETTERS[p].toUpperCase()).join(" = ")).join(" > ");
    const rest = item.answers.map((_, i) => i).filter((i) => rankOf(i) === null);
    if (rest.length) {
      text += ` > ${rest.map((p) => LETTERS[p].toUpperCase()).join(" = ")} (unranked: ${rest.length > 1 ? "tied " : ""}last)`;
    }
  }
  if (state.tiePending) text += "  (next one ties)";
  $("ranking").textContent = text;
  $("allbad").classList.toggle("on", state.allBad);
  $("tie").classList.toggle("on", state.tiePending);
}

function pick(position, tie) {
  if (!state.item || position >= state.item.answers.length || rankOf(position) !== null) return;
  state.allBad = false;
  if ((tie || state.tiePending) && state.order.length) state.order[state.order.length - 1].push(position);
  else state.order.push([position]);
  state.tiePending = false;
  renderRanking(); saveDraft();
}

function undo() {
  if (!state.order.length) return;
  const last = state.order[state.order.length - 1];
  last.pop();
  if (!last.length) state.order.pop();
  renderRanking(); saveDraft();
}

function showItem(item) {
  state.item = item;
  $("label-error").textContent = "";
  if (!item) {
    $("label-item").hidden = true; $("label-empty").hidden = false;
    return;
  }
  renderPrompt($("prompt"), item.messages);
  const answers = $("answers");
  answers.replaceChildren();
  answers.className = `answers k${item.answers.length}`;
  item.answers.forEach((text, i) => {
    const card = el("div", "answer");
    card.dataset.position = String(i);
    const head = el("div", "head");
    head.append(el("span", "letter", LETTERS[i].toUpperCase()), el("span", "rank"));
    if (item.unfinished[i]) head.append(el("span", "cut", "cut off at the length limit"));
    card.append(head, el("div", "text", text));
    card.addEventListener("click", (event) => pick(i, event.shiftKey));
    answers.append(card);
  });
  loadDraft();
  $("label-item").hidden = false; $("label-empty").hidden = true;
  renderRanking();
}

async function nextItem() {
  try {
    const data = await api(`/api/next?${q({ labeller: state.labeller, tab })}`);
    showProgress(data.counts, data.sampler);
    if (!state.item || !data.item || data.item.id !== state.item.id) showItem(data.item);
  } catch (error) { $("label-error").textContent = error.message; }
}

async function submit() {
  const item = state.item;
  if (!item || state.busy) return;
  if (!state.allBad && !state.order.length) {
    $("label-error").textContent = "Rank the answers first (press A, B, …) or mark them all bad (X).";
    return;
  }
  const n = item.answers.length;
  const tiers = Array.from({ length: n }, (_, i) => (state.allBad ? 1 : rankOf(i) || state.order.length + 1));
  state.busy = true;
  try {
    const data = await api("/api/judge", {
      item: item.id, labeller: state.labeller, tiers, all_bad: state.allBad, better: $("better").value,
    });
    store.removeItem(draftKey(item.id));
    showItem(null);  // the judged item leaves the page at once: keys pressed before the next one arrives do nothing
    showProgress(data.counts);
    await nextItem();
  } catch (error) {
    $("label-error").textContent = `Not saved: ${error.message}`;
  } finally { state.busy = false; }
}

function showProgress(counts, sampler) {
  if (counts) {
    $("progress").textContent = `labelled ${counts.labelled} · queued ${counts.pending} · ` +
      `${counts.judgements} judgements by everyone`;
  }
  if (sampler) {
    const words = { starting: "starting", loading: "loading the model…", ready: "sampler ready", error: "sampler error" };
    $("sampler").textContent = words[sampler.state] || sampler.state;
    $("sampler").title = sampler.error || "";
    if (sampler.state === "error") $("label-empty").textContent = `The sampler stopped: ${sampler.error}`;
  }
}

// ------------------------------------------------------------------------------------------------ train

function fillKinds() {
  const kinds = JSON.parse(meta("job-kinds"));
  for (const [kind, title] of Object.entries(kinds)) {
    const option = el("option", "", title);
    option.value = kind;
    $("kind").append(option);
  }
  $("steps").value = meta("train-steps");
  $("lr").placeholder = `${meta("train-lr")} (default)`;
}

async function startTrain() {
  $("train-error").textContent = "";
  const body = { kind: $("kind").value, steps: Number($("steps").value) || null };
  if ($("lr").value) body.lr = Number($("lr").value);
  try {
    await api("/api/train", body);
    await refresh();
  } catch (error) { $("train-error").textContent = error.message; }
}

function renderJobs(jobs) {
  const body = $("jobs");
  body.replaceChildren();
  const select = $("ab-job");
  const ready = jobs.filter((job) => job.model_ready);
  const key = ready.map((job) => job.id).join(",");
  if (select.dataset.key !== key) {  // rebuilt only when the list changes, so an open dropdown stays open
    const chosen = select.value;
    select.replaceChildren();
    for (const job of ready) {
      const option = el("option", "", `${job.id}: ${job.title}`);
      option.value = job.id;
      select.append(option);
    }
    if (chosen && ready.some((job) => job.id === chosen)) select.value = chosen;
    select.dataset.key = key;
  }
  for (const job of jobs) {
    const row = el("tr");
    row.dataset.job = job.id;
    row.dataset.state = job.state;
    const bar = el("div", "bar");
    const fill = el("div", "fill");
    fill.style.width = `${Math.round(job.fraction * 100)}%`;
    bar.append(fill);
    const progress = el("td");
    progress.append(bar, el("span", "step",
      `${job.stage} (${job.stage_index}/${job.stages}): step ${job.step}/${job.total}`));
    const metrics = Object.entries(job.metrics).map(([k, v]) => `${k} ${Number(v).toPrecision(3)}`).join(", ");
    const stateCell = el("td", `state ${job.state}`, job.state);
    if (job.log_tail) stateCell.title = job.log_tail;
    row.append(el("td", "", job.id), el("td", "", job.title), stateCell, progress, el("td", "", metrics),
      el("td", "data", job.data));
    body.append(row);
    if (job.log_tail) {
      const logRow = el("tr");
      const cell = el("td", "log", job.log_tail);
      cell.colSpan = 6;
      logRow.append(cell);
      body.append(logRow);
    }
  }
  $("start-ab").disabled = !select.options.length;
}

// --------------------------------------------------------------------------------------------------- A/B

async function startAB() {
  $("ab-error").textContent = "";
  try {
    const data = await api("/api/ab", { job: $("ab-job").value });
    state.abRound = data.round;
    store.setItem("alignlab-studio:ab-round", String(data.round));
    state.abItem = null;
    await nextAB();
  } catch (error) { $("ab-error").textContent = error.message; }
}

async function nextAB() {
  if (!state.abRound) {
    $("ab-status").textContent = "Train a model first, then start a round: you judge pairs of answers without " +
      "knowing which model wrote which.";
    return;
  }
  try {
    const data = await api(`/api/ab/next?${q({ labeller: state.labeller, tab, round: state.abRound })}`);
    const result = data.result;
    if (data.item) {
      if (!state.abItem || state.abItem.id !== data.item.id) {
        state.abItem = data.item;
        renderPrompt($("ab-prompt"), data.item.messages);
        const answers = $("ab-answers");
        answers.replaceChildren();
        data.item.answers.forEach((text, i) => {
          const card = el("div", "answer");
          const head = el("div", "head");
          head.append(el("span", "letter", LETTERS[i].toUpperCase()));
          card.append(head, el("div", "text", text));
          answers.append(card);
        });
      }
      $("ab-item").hidden = false;
      $("ab-status").textContent = `Round ${state.abRound}: ${result.votes} of ${result.items} judged`;
      $("ab-result").replaceChildren();
    } else {
      state.abItem = null;
      $("ab-item").hidden = true;
      const sampling = data.status !== "ready";
      $("ab-status").textContent = sampling ? `Round ${state.abRound}: sampling answers from both models (${data.status})…`
        : `Round ${state.abRound}: done, ${result.votes} of ${result.items} judged.`;
      if (!sampling) renderABResult(result);
    }
  } catch (error) { $("ab-error").textContent = error.message; }
}

function pct(x) { return `${Math.round(x * 100)}%`; }

function renderABResult(r) {
  const node = $("ab-result");
  node.replaceChildren();
  if (!r.votes) return;
  node.append(el("div", "big", `The trained model wins ${pct(r.win_rate)}`),
    el("div", "interval", `95% interval ${pct(r.low)}–${pct(r.high)} over ${r.votes} blind judgements ` +
      `(${r.after_wins} after, ${r.before_wins} before, ${r.ties} ties; a tie counts half)`),
    el("div", "note", `run ${r.job}: ${r.win_rate > 0.5 && r.low > 0.5 ? "it learned what you prefer"
      : r.high < 0.5 ? "training made it worse for you" : "no clear difference yet: label more or train longer"}`));
}

async function judgeAB(choice) {
  const item = state.abItem;
  if (!item || state.abBusy) return;
  const tiers = choice === "tie" ? [1, 1] : choice === 0 ? [1, 2] : [2, 1];
  state.abBusy = true;
  try {
    await api("/api/judge", { item: item.id, labeller: state.labeller, tiers, all_bad: false, better: "" });
    state.abItem = null;
    await nextAB();
  } catch (error) { $("ab-error").textContent = `Not saved: ${error.message}`; }
  finally { state.abBusy = false; }
}

// ------------------------------------------------------------------------------------------------ people

function renderPeople(data) {
  $("people").textContent = data.labellers.length ? data.labellers.join(", ") : "nobody has labelled yet";
  const a = data.agreement;
  const node = $("agreement");
  node.replaceChildren();
  if (!a.comparisons) {
    node.textContent = `No item ranked by two people yet (${a.shared_items} shared items).`;
    return;
  }
  node.append(el("div", "", `Kendall tau-b ${a.mean_tau.toFixed(2)} on average over ${a.comparisons} ` +
    `comparisons of ${a.shared_items} items ranked by two or more people (1 = same order, -1 = reversed)`));
  for (const pair of a.pairs) {
    node.append(el("div", "pair", `${pair.labellers.join(" & ")}: tau ${pair.mean_tau.toFixed(2)} over ${pair.items} items`));
  }
}

function updateExportLinks() {
  const names = $("export-filter").value.split(",").map((s) => s.trim()).filter(Boolean);
  for (const format of ["ranking", "trl", "sft"]) {
    const params = new URLSearchParams({ format });
    for (const name of names) params.append("labeller", name);
    $(`export-${format}`).href = `/api/export?${params.toString()}`;
  }
}

// ------------------------------------------------------------------------------------------------- loop

async function refresh() {
  try {
    const data = await api(`/api/state?${q({ labeller: state.labeller })}`);
    showProgress(data.counts, data.sampler);
    renderJobs(data.jobs);
    renderPeople(data);
    if (!state.item && state.view === "label") await nextItem();
    if (state.view === "ab" && !state.abItem) await nextAB();
  } catch (error) { $("sampler").textContent = `server: ${error.message}`; }
}

function onKey(event) {
  const typing = ["TEXTAREA", "INPUT", "SELECT"].includes(document.activeElement.tagName);
  if (typing) {
    if (event.key === "Escape") document.activeElement.blur();
    if (event.key === "Enter" && event.ctrlKey && state.view === "label" && document.activeElement.id === "better") {
      event.preventDefault(); submit();
    }
    return;
  }
  if (event.ctrlKey || event.metaKey || event.altKey) return;
  const key = event.key.toLowerCase();
  if (state.view === "label") {
    if (LETTERS.includes(key) && key.length === 1) pick(LETTERS.indexOf(key), false);
    else if (key === "=") { state.tiePending = !state.tiePending; renderRanking(); }
    else if (key === "backspace") undo();
    else if (key === "x") { state.allBad = !state.allBad; if (state.allBad) state.order = []; renderRanking(); saveDraft(); }
    else if (key === "enter") submit();
    else return;
    event.preventDefault();
  } else if (state.view === "ab") {
    if (key === "a") judgeAB(0);
    else if (key === "b") judgeAB(1);
    else if (key === "=") judgeAB("tie");
    else return;
    event.preventDefault();
  }
}

function init() {
  $("labeller").value = state.labeller;
  $("labeller").addEventListener("change", () => {
    const name = $("labeller").value.trim();
    if (!name) { $("labeller").value = state.labeller; return; }
    state.labeller = name;
    store.setItem("alignlab-studio:labeller", name);
    showItem(null);  // the judged item leaves the page at once: keys pressed before the next one arrives do nothing
    nextItem(); refresh();
  });
  for (const button of document.querySelectorAll("nav button")) {
    button.addEventListener("click", () => show(button.dataset.view));
  }
  $("tie").addEventListener("click", () => { state.tiePending = !state.tiePending; renderRanking(); });
  $("undo").addEventListener("click", undo);
  $("allbad").addEventListener("click", () => {
    state.allBad = !state.allBad; if (state.allBad) state.order = []; renderRanking(); saveDraft();
  });
  $("submit").addEventListener("click", submit);
  $("better").addEventListener("input", saveDraft);
  $("start-train").addEventListener("click", startTrain);
  $("start-ab").addEventListener("click", startAB);
  $("ab-a").addEventListener("click", () => judgeAB(0));
  $("ab-b").addEventListener("click", () => judgeAB(1));
  $("ab-tie").addEventListener("click", () => judgeAB("tie"));
  $("export-filter").addEventListener("input", updateExportLinks);
  document.addEventListener("keydown", onKey);
  fillKinds();
  refresh();
  nextItem();
  setInterval(refresh, 1500);
}

init();
