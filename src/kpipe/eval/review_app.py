"""The clickable review page that `kpipe review` serves: one HTML file, its script and style inline.

The page holds no data of its own: it asks the server for the rows (GET api/rows), shows each
suspect beside examples of its given and suggested class (GET img?id=...), and POSTs every
decision at once (POST api/decide), so a reload shows what relabels.csv holds. Every user string
is put into the page with textContent / dataset, never as HTML.
Usage: ``html = render_app("tiny")``
"""

from __future__ import annotations

import html

APP_CSS = """body{font-family:sans-serif;margin:1.2em}section{border-top:1px solid #ccc;padding:.5em;display:flex;
gap:1.5em;align-items:flex-start}section.cur{background:#eef4ff;outline:2px solid #58f}
img{width:96px;height:96px;object-fit:contain;image-rendering:pixelated;background:#eee;margin:2px}
.ex img{width:64px;height:64px}.d{font-weight:bold}.d.accept{color:#070}.d.drop{color:#b00}.d.keep{color:#555}
#bar{position:sticky;top:0;background:#fff;padding:.4em 0;border-bottom:1px solid #999;z-index:1}
#status.err{color:#b00}button{margin:1px}kbd{border:1px solid #aaa;border-radius:3px;padding:0 3px}"""

APP_JS = r"""
const S = {rows: [], classes: [], examples: {}, cur: null};
const $ = (id) => document.getElementById(id);
function el(tag, props, ...kids) {
  const e = document.createElement(tag);
  Object.assign(e, props || {});
  for (const k of kids) e.append(k);
  return e;
}
function img(id, cls) {
  return el("img", {src: "img?id=" + encodeURIComponent(id), alt: id, title: id, className: cls || ""});
}
function visible() {
  const c = $("f-class").value, min = parseFloat($("f-score").value) || 0, und = $("f-undecided").checked;
  return S.rows.filter(r => (!c || r.given === c || r.suggested === c) && (r.score === null || r.score >= min)
                            && (!und || r.decision === ""));
}
function counter() {
  const n = S.rows.length, done = S.rows.filter(r => r.decision !== "").length;
  const by = {accept: 0, drop: 0, keep: 0};
  for (const r of S.rows) if (r.decision) by[r.decision] += 1;
  $("counter").textContent = `${done} of ${n} decided (${by.accept} accept, ${by.drop} drop, ${by.keep} keep)`;
}
function examples(what, cls) {
  const box = el("div", {className: "ex"}, el("div", {}, what + " ", el("b", {textContent: cls})));
  const ids = S.examples[cls] || [];
  if (!ids.length) box.append(el("i", {textContent: "no examples"}));
  for (const id of ids) box.append(img(id));
  return box;
}
function section(r, rank) {
  const s = el("section", {});
  s.dataset.id = r.id;
  if (r.id === S.cur) s.classList.add("cur");
  const score = r.score === null ? "–" : r.score.toFixed(4);
  const info = el("div", {},
    el("div", {}, `#${rank} `, el("b", {textContent: r.id})),
    el("div", {textContent: `given ${r.given} → suggested ${r.suggested}, score ${score}, ${r.source}`}),
    el("div", {}, "decision ", el("span", {className: "d " + r.decision, textContent: r.decision || "undecided"})));
  const buttons = el("div", {});
  for (const [act, label] of [["accept", "accept (a)"], ["drop", "drop (d)"], ["keep", "keep (k)"],
                              ["", "undecide (u)"]]) {
    const b = el("button", {textContent: label});
    b.dataset.act = act || "undecide";
    b.onclick = (ev) => { ev.stopPropagation(); decide(r.id, act); };
    buttons.append(b);
  }
  const move = el("select", {title: "accept as another class"});
  move.append(el("option", {value: "", textContent: "move to class…"}));
  S.classes.forEach((c, i) => move.append(el("option", {value: c, textContent: `${i + 1}: ${c}`})));
  move.onchange = () => { if (move.value) decide(r.id, "accept", move.value); };
  move.onclick = (ev) => ev.stopPropagation();
  buttons.append(move);
  info.append(buttons);
  s.append(img(r.id), info, examples("given", r.given), examples("suggested", r.suggested));
  s.onclick = () => { S.cur = r.id; render(); };
  return s;
}
function render() {
  const rows = visible();
  if (!rows.some(r => r.id === S.cur)) S.cur = rows.length ? rows[0].id : null;
  $("rows").replaceChildren(...rows.map((r, i) => section(r, i + 1)));
  counter();
}
function load(data) {
  S.rows = data.rows; S.classes = data.classes; S.examples = data.examples;
  const f = $("f-class"), keep = f.value;
  f.replaceChildren(el("option", {value: "", textContent: "all classes"}),
                    ...S.classes.map(c => el("option", {value: c, textContent: c})));
  f.value = keep;
  render();
}
function status(text, bad) { $("status").textContent = text; $("status").className = bad ? "err" : ""; }
async function refresh() {
  const r = await fetch("api/rows");
  if (!r.ok) { status(`could not read the rows: ${r.status} ${await r.text()}`, true); return; }
  load(await r.json());
}
async function decide(id, decision, suggested) {
  const body = {id: id, decision: decision};
  if (suggested !== undefined) body.suggested = suggested;
  const r = await fetch("api/decide", {method: "POST", headers: {"Content-Type": "application/json"},
                                       body: JSON.stringify(body)});
  if (!r.ok) { status(`not saved (${r.status}): ${await r.text()}`, true); return; }
  const vis = visible().map(x => x.id), at = vis.indexOf(id);
  load(await r.json());
  const next = visible().map(x => x.id), after = vis.slice(at + 1).find(x => next.includes(x));
  S.cur = after !== undefined ? after : id;
  render();
  status(`saved: ${id} → ${decision || "undecided"}${suggested ? " as " + suggested : ""}`, false);
  $("rows").querySelector("section.cur")?.scrollIntoView({block: "nearest"});
}
function step(d) {
  const ids = visible().map(r => r.id), i = ids.indexOf(S.cur);
  if (!ids.length) return;
  S.cur = ids[Math.min(ids.length - 1, Math.max(0, i + d))];
  render();
  $("rows").querySelector("section.cur")?.scrollIntoView({block: "nearest"});
}
document.addEventListener("keydown", (ev) => {
  if (ev.ctrlKey || ev.metaKey || ev.altKey || ["INPUT", "SELECT"].includes(ev.target.tagName)) return;
  const acts = {a: "accept", d: "drop", k: "keep", u: ""};
  if (ev.key in acts && S.cur !== null) decide(S.cur, acts[ev.key]);
  else if (/^[1-9]$/.test(ev.key) && S.cur !== null && S.classes[+ev.key - 1] !== undefined)
    decide(S.cur, "accept", S.classes[+ev.key - 1]);
  else if (ev.key === "ArrowDown" || ev.key === "n") step(1);
  else if (ev.key === "ArrowUp" || ev.key === "p") step(-1);
  else return;
  ev.preventDefault();
});
for (const id of ["f-class", "f-score", "f-undecided"])
  for (const ev of ["input", "change"]) $(id).addEventListener(ev, render);
refresh();
"""


def render_app(title: str) -> str:
    """The page; the competition name is the only server-side text in it, and it is escaped."""
    t = html.escape(title)
    return (
        f'<!doctype html><html><head><meta charset="utf-8"><title>kpipe review: {t}</title>'
        f"<style>{APP_CSS}</style></head><body><h1>Suspected label errors: {t}</h1>"
        '<div id="bar"><span id="counter">loading…</span> · class <select id="f-class"></select> '
        'score ≥ <input id="f-score" type="number" min="0" max="1" step="0.05" value="0" style="width:5em"> '
        '<label><input id="f-undecided" type="checkbox"> undecided only</label> · <span id="status"></span>'
        "<div>Keys: <kbd>a</kbd> accept, <kbd>d</kbd> drop, <kbd>k</kbd> keep, <kbd>u</kbd> undecide, "
        "<kbd>1</kbd>–<kbd>9</kbd> accept as that class, <kbd>n</kbd>/<kbd>p</kbd> or arrows: next/previous. "
        "Every decision is saved to relabels.csv at once; then <code>kpipe relabel ... --apply</code>."
        '</div></div><div id="rows"></div>'
        f"<script>{APP_JS}</script></body></html>\n"
    )
