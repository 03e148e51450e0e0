// The review page: asks the server for the next item, sends each choice as it is made.
// No model name reaches this page before every item is rated (the server draws A and B).
"use strict";

let current = null;  // the item on screen: {prompt, pair, question, reference, A, B}
let busy = false;

const $ = (id) => document.getElementById(id);

function renderTags(tags) {
  for (const box of document.querySelectorAll(".tags")) {
    box.textContent = "";
    for (const [id, label] of tags) {  // [id, label] pairs, in the server's order
      const l = document.createElement("label");
      const c = document.createElement("input");
      c.type = "checkbox";
      c.value = id;
      c.id = `tag-${box.dataset.side}-${id}`;
      c.addEventListener("change", () => l.classList.toggle("on", c.checked));
      l.append(c, label);
      box.append(l);
    }
  }
}

function show(state) {
  $("evaluation").textContent = state.evaluation;
  $("who").textContent = `reviewer ${state.reviewer}`;
  $("count").textContent = `${state.done} of ${state.total} rated`;
  $("bar").style.width = `${state.total ? (100 * state.done) / state.total : 100}%`;
  if (state.finished) {
    $("rating").hidden = true;
    current = null;
    reveal();
    return;
  }
  if (!document.querySelector(".tags input")) renderTags(state.tags);
  $("note").maxLength = state.max_note;
  const item = state.item;
  current = item;
  $("question").textContent = item.question;
  $("answer-A").textContent = item.A;
  $("answer-B").textContent = item.B;
  $("reference-switch").hidden = item.reference === null;
  $("reference").textContent = item.reference ?? "";
  $("reference").hidden = item.reference === null || !$("show-reference").checked;
  $("note").value = "";
  for (const c of document.querySelectorAll(".tags input")) {
    c.checked = false;
    c.parentElement.classList.remove("on");
  }
  $("rating").hidden = false;
  window.scrollTo(0, 0);
}

async function load() {
  const response = await fetch("/api/state", { cache: "no-store" });
  show(await response.json());
}

async function rate(choice) {
  if (busy || !current) return;
  busy = true;
  for (const b of document.querySelectorAll(".buttons button")) b.disabled = true;
  const tags = { A: [], B: [] };
  for (const c of document.querySelectorAll(".tags input:checked")) tags[c.closest(".tags").dataset.side].push(c.value);
  try {
    const response = await fetch("/api/rate", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ prompt: current.prompt, pair: current.pair, choice, tags, note: $("note").value }),
    });
    const body = await response.json();
    if (!response.ok) {
      $("error").textContent = body.error;
      await load();  // e.g. rated already in another tab: show what is next
    } else {
      $("error").textContent = "";
      show(body);
    }
  } catch (err) {
    $("error").textContent = `not saved: the server did not answer (${err}); start it again and press the key again`;
  } finally {
    busy = false;
    for (const b of document.querySelectorAll(".buttons button")) b.disabled = false;
  }
}

async function reveal() {
  const response = await fetch("/api/reveal", { cache: "no-store" });
  if (!response.ok) return;
  const body = await response.json();
  const rows = $("reveal");
  rows.textContent = "";
  for (const r of body.ratings) {
    const tr = document.createElement("tr");
    const preferred = r.choice === "A" ? r.a : r.choice === "B" ? r.b : r.choice;
    const tags = [...r.tags.A.map((t) => `A: ${t}`), ...r.tags.B.map((t) => `B: ${t}`)].join(", ");
    for (const text of [r.prompt, r.a, r.b, preferred, tags, r.note]) {
      const td = document.createElement("td");
      td.textContent = text;
      tr.append(td);
    }
    rows.append(tr);
  }
  $("finished").hidden = false;
}

for (const b of document.querySelectorAll(".buttons button")) b.addEventListener("click", () => rate(b.dataset.choice));
$("show-reference").addEventListener("change", (e) => { $("reference").hidden = !e.target.checked || !current?.reference; });

const KEYS = { a: "A", 1: "A", t: "tie", 2: "tie", "=": "tie", b: "B", 3: "B", s: "skip" };
document.addEventListener("keydown", (e) => {
  if (e.target.tagName === "TEXTAREA" || e.ctrlKey || e.metaKey || e.altKey) return;  // typing a note
  const key = e.key.toLowerCase();
  if (key === "r") {
    $("show-reference").click();
  } else if (KEYS[key]) {
    e.preventDefault();
    rate(KEYS[key]);
  }
});

load();
