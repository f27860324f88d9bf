"""`dsvl serve --ui`: one static page at ``/`` that chats with the server's own API.

No framework and nothing loaded from elsewhere: the page sends the conversation to
``/v1/chat/completions`` like any OpenAI client (images as data: URLs, the whole history every
round, `stream: true`) and shows the answer as it streams. Drop images on the page or pick them
(they attach to the next question, as ``/image`` does in `dsvl chat`); "Clear" starts a new
conversation. When the server has an API key, the page asks for it and sends it as a bearer
token; it never stores it.
"""

from __future__ import annotations

import html
import json
from typing import TYPE_CHECKING

from fastapi.responses import HTMLResponse

if TYPE_CHECKING:
    from fastapi import FastAPI

    from dsvl_cli.serve.options import ServeOptions

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>dsvl: __TITLE__</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body{font-family:system-ui,sans-serif;max-width:52rem;margin:1rem auto;padding:0 1rem}
#log .turn{border-bottom:1px solid #ddd;padding:.5rem 0}
.user{color:#234}.assistant{white-space:pre-wrap;color:#000;margin-top:.3rem}
.error{color:#b00}img.thumb{height:4rem;margin:.2rem;border:1px solid #ccc}
#drop{border:2px dashed #aaa;padding:.6rem;margin:.5rem 0;text-align:center;color:#555}
#drop.over{background:#eef}textarea{width:100%;box-sizing:border-box}
</style></head><body>
<h1>dsvl: __TITLE__</h1>
<p id="keyrow" hidden><label>API key <input id="key" type="password" size="30"></label></p>
<div id="log"></div>
<div id="drop">Drop images here, or <input id="files" type="file" multiple
 accept="image/png,image/jpeg,image/webp"><div id="pending"></div></div>
<textarea id="question" rows="3" placeholder="Ask about the images"></textarea>
<p><button id="send">Send</button> <button id="clear">Clear</button> <span id="status"></span></p>
<script>
const MODEL = __MODEL__, NEEDS_KEY = __NEEDS_KEY__;
const $ = (id) => document.getElementById(id);
let messages = [], pending = [], busy = false;
$("keyrow").hidden = !NEEDS_KEY;
function readUrl(file) {
  return new Promise((ok, fail) => {
    const r = new FileReader(); r.onload = () => ok(r.result); r.onerror = fail;
    r.readAsDataURL(file);
  });
}
async function attach(files) {
  for (const f of files) {
    const url = await readUrl(f); pending.push(url);
    const img = document.createElement("img"); img.src = url; img.className = "thumb";
    $("pending").appendChild(img);
  }
}
$("files").onchange = async () => { await attach($("files").files); $("files").value = ""; };
const drop = $("drop");
drop.ondragover = (e) => { e.preventDefault(); drop.classList.add("over"); };
drop.ondragleave = () => drop.classList.remove("over");
drop.ondrop = (e) => { e.preventDefault(); drop.classList.remove("over");
  attach(e.dataTransfer.files); };
$("clear").onclick = () => { if (busy) return; messages = []; pending = [];
  $("log").innerHTML = ""; $("pending").innerHTML = ""; $("status").textContent = ""; };
function turn(text, images) {
  const div = document.createElement("div"); div.className = "turn";
  const q = document.createElement("div"); q.className = "user"; q.textContent = text;
  div.appendChild(q);
  for (const url of images) { const img = document.createElement("img");
    img.src = url; img.className = "thumb"; div.appendChild(img); }
  const a = document.createElement("div"); a.className = "assistant"; div.appendChild(a);
  $("log").appendChild(div); return a;
}
async function send() {
  const text = $("question").value.trim();
  if (busy || (!text && !pending.length)) return;
  busy = true; $("status").textContent = "answering...";
  const images = pending; pending = []; $("pending").innerHTML = "";
  const content = images.map((url) => ({type: "image_url", image_url: {url}}));
  content.push({type: "text", text});
  const answerBox = turn(text, images);
  const body = {model: MODEL, stream: true, messages: [...messages, {role: "user", content}]};
  const headers = {"Content-Type": "application/json"};
  if (NEEDS_KEY) headers["Authorization"] = "Bearer " + $("key").value;
  let answer = "", error = null;
  try {
    const r = await fetch("/v1/chat/completions",
                          {method: "POST", headers, body: JSON.stringify(body)});
    if (!r.ok) { error = (await r.json()).error.message; }
    else { ({answer, error} = await readStream(r, answerBox)); }
  } catch (e) { error = String(e); }
  if (error) { answerBox.className = "assistant error"; answerBox.textContent = error;
    $("status").textContent = "not answered; the conversation is unchanged"; }
  else { messages = body.messages.concat([{role: "assistant", content: answer}]);
    $("question").value = ""; $("status").textContent = "done"; }
  busy = false;
}
async function readStream(r, box) {
  const reader = r.body.getReader(), dec = new TextDecoder();
  let buf = "", answer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return {answer, error: "the stream ended early"};
    buf += dec.decode(value, {stream: true});
    let i;
    while ((i = buf.indexOf("\\n\\n")) >= 0) {
      const line = buf.slice(0, i).trim(); buf = buf.slice(i + 2);
      if (!line.startsWith("data: ")) continue;
      const data = line.slice(6);
      if (data === "[DONE]") return {answer, error: null};
      const event = JSON.parse(data);
      if (event.error) return {answer, error: event.error.message};
      for (const c of event.choices) { if (c.delta.content) {
        answer += c.delta.content; box.textContent = answer; } }
    }
  }
}
$("send").onclick = send;
$("question").onkeydown = (e) => { if (e.key === "Enter" && !e.shiftKey) {
  e.preventDefault(); send(); } };
</script></body></html>
"""


def render_page(options: ServeOptions) -> str:
    """The page for this server: its model id, and whether it asks for a key."""
    return (
        PAGE.replace("__TITLE__", html.escape(options.model_id))
        .replace("__MODEL__", json.dumps(options.model_id).replace("<", "\\u003c"))
        .replace("__NEEDS_KEY__", "true" if options.api_key else "false")
    )


def add_ui(app: FastAPI, options: ServeOptions) -> None:
    """Serve the page at ``/`` (no key needed for the page itself)."""
    page = render_page(options)

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)
