// The results page of genret serve. Everything a response holds is written with textContent and DOM calls, never
// as HTML; thumbnails are fetched with the API key and shown as blob: URLs (an <img src> cannot send a header).
"use strict";

const $ = (id) => document.getElementById(id);
const KEY = "genret-api-key";
let image = null;       // the query image, a data: URL
let objectUrls = [];    // the thumbnails of the grid shown now, released when it is replaced

function el(tag, props = {}, children = []) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(props)) {
    if (name === "text") node.textContent = value;
    else if (name === "className") node.className = value;
    else node.setAttribute(name, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function headers(extra = {}) {
  const key = sessionStorage.getItem(KEY);
  return key ? { ...extra, Authorization: "Bearer " + key } : extra;
}

function showError(message) {
  $("error").textContent = message;
}

function setImage(dataUrl) {
  image = dataUrl;
  const preview = $("dropImage");
  preview.hidden = !dataUrl;
  if (dataUrl) preview.src = dataUrl; else preview.removeAttribute("src");
  $("dropLabel").textContent = dataUrl ? "image set" : "image…";
}

function asDataUrl(blob) {
  return new Promise((ok, fail) => {
    const reader = new FileReader();
    reader.onload = () => ok(reader.result);
    reader.onerror = () => fail(reader.error);
    reader.readAsDataURL(blob);
  });
}

async function readFile(file) {
  setImage(await asDataUrl(file));
}

async function api(path, body) {
  const response = await fetch(path, { method: "POST", headers: headers({ "Content-Type": "application/json" }),
                                       body: JSON.stringify(body) });
  let data = null;
  try { data = await response.json(); } catch (e) { data = null; }
  if (!response.ok) {
    if (response.status === 401) { $("key").classList.add("needed"); $("key").focus(); }
    const message = data && data.error ? data.error.message : response.status + " " + response.statusText;
    throw new Error(response.status === 401 ? message + " (enter the key in the field above)" : message);
  }
  return data;
}

async function thumbnail(url) {
  const response = await fetch(url, { headers: headers() });
  if (!response.ok) throw new Error("thumbnail " + response.status);
  return await response.blob();
}

async function search(push = true) {
  showError("");
  const text = $("q").value.trim();
  if (!text && !image) { showError("type a query or drop an image"); return; }
  const body = { k: parseInt($("k").value || "10", 10) };
  if (text) body.text = text;
  if (image) body.image = image;
  if ($("target").value) body.target = $("target").value;
  if (push && !image) {
    const params = new URLSearchParams({ q: text, k: body.k });
    if (body.target) params.set("target", body.target);
    history.pushState(null, "", "?" + params);
  }
  $("info").textContent = "searching…";
  try {
    const data = await api("/v1/search", body);
    $("key").classList.remove("needed");
    await render(data);
  } catch (err) {
    $("info").textContent = "";
    showError(err.message);
  }
}

function bars(results) {
  const stages = [...new Set(results.flatMap((r) => Object.keys(r.scores)))];
  const range = {};
  for (const s of stages) {
    const v = results.map((r) => r.scores[s]).filter((x) => x !== undefined);
    range[s] = [Math.min(...v), Math.max(...v)];
  }
  return (r) => stages.filter((s) => r.scores[s] !== undefined).map((s) => {
    const [lo, hi] = range[s];
    const fill = el("span", { className: "fill" });
    fill.style.width = (hi > lo ? 10 + 90 * (r.scores[s] - lo) / (hi - lo) : 100).toFixed(1) + "%";
    const bar = el("div", { className: "bar" }, [el("span", { className: "name", text: s }),
      el("span", { className: "track" }, [fill]), el("span", { className: "value", text: r.scores[s].toFixed(3) })]);
    bar.dataset.stage = s;
    return bar;
  });
}

async function render(data) {
  const info = $("info");
  info.replaceChildren();
  if (data.rewritten) info.append(el("div", { id: "rewritten" }, ["rewritten query: ", el("b", { text: data.rewritten })]));
  const seconds = Object.entries(data.seconds).map(([s, t]) => `${s} ${(1000 * t).toFixed(1)} ms`).join(", ");
  const batched = data.batch_size > 1 ? ` · batched with ${data.batch_size - 1} other requests` : "";
  info.append(el("div", { id: "timings", text: `${data.results.length} results · ${seconds}${batched}` }));
  if (data.note) info.append(el("div", { text: data.note }));

  // Every thumbnail first, so the grid appears whole.
  const blobs = data.target === "image"
    ? await Promise.all(data.results.map((r) => thumbnail(r.image).catch(() => null))) : [];
  for (const url of objectUrls) URL.revokeObjectURL(url);
  objectUrls = [];
  const bar = bars(data.results);
  const cards = data.results.map((r, i) => {
    const card = el("div", { className: "card result" }, [
      el("div", {}, [el("span", { className: "rank", text: "#" + r.rank }), el("span", { className: "id", text: r.id })])]);
    card.dataset.id = r.id;
    const button = el("button", { text: data.target === "image" ? "search with this image" : "search with this caption" });
    if (data.target === "image") {
      const img = el("img", { alt: "result " + r.rank });
      if (blobs[i]) { img.src = URL.createObjectURL(blobs[i]); objectUrls.push(img.src); }
      button.onclick = async () => {
        if (!blobs[i]) { showError("this image could not be loaded"); return; }
        setImage(await asDataUrl(blobs[i])); $("q").value = ""; search();
      };
      card.append(img, button);
    } else {
      button.onclick = () => { setImage(null); $("q").value = r.text; search(); };
      card.append(el("div", { className: "text", text: r.text }), button);
    }
    card.append(...bar(r));
    return card;
  });
  $("grid").replaceChildren(...cards);
}

function fromUrl() {
  const params = new URLSearchParams(location.search);
  if (params.get("k")) $("k").value = params.get("k");
  if (params.get("target")) $("target").value = params.get("target");
  if (params.get("q")) { $("q").value = params.get("q"); search(false); }
}

function start() {
  $("key").value = sessionStorage.getItem(KEY) || "";
  $("key").addEventListener("input", () => {
    const key = $("key").value.trim();
    if (key) sessionStorage.setItem(KEY, key); else sessionStorage.removeItem(KEY);
    $("key").classList.remove("needed");
  });
  $("file").addEventListener("change", (e) => e.target.files[0] && readFile(e.target.files[0]));
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault(); drop.classList.remove("over");
    if (e.dataTransfer.files[0]) readFile(e.dataTransfer.files[0]);
  });
  $("clear").addEventListener("click", () => setImage(null));
  $("q").addEventListener("keydown", (e) => { if (e.key === "Enter") search(); });
  $("go").addEventListener("click", () => search());
  window.addEventListener("popstate", fromUrl);
  fromUrl();
}

start();
