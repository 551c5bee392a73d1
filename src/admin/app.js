// The taas admin page. Every /api/ request carries the token the server put in
// the page; data from the server is only ever set as text, never as HTML.
"use strict";

const TOKEN = document.querySelector('meta[name="taas-token"]').content;
const $ = (id) => document.getElementById(id);

// Calls the admin API; throws an Error whose message is the server's words.
async function api(method, path, body) {
  const opts = { method, headers: { "X-Taas-Token": TOKEN }, cache: "no-store" };
  if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  let res;
  try {
    res = await fetch(path, opts);
  } catch (e) {
    throw new Error("The admin server did not answer: is `taas admin` still running?");
  }
  if (!res.ok) {
    let message = `The server answered ${res.status} ${res.statusText}.`;
    try {
      const j = await res.json();
      if (j && j.error) message = j.error;
    } catch (e) { /* not JSON: keep the status */ }
    throw new Error(message);
  }
  return res;
}

function accountPath(id) {
  return "/api/accounts/" + encodeURIComponent(id);
}

// An element with attributes and children (strings become text nodes).
function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (k === "className") e.className = v;
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c);
  return e;
}

function showError(node, error) {
  node.textContent = error ? error.message || String(error) : "";
  node.hidden = !error;
}

// ---- the list ----

async function refresh() {
  try {
    const res = await api("GET", "/api/accounts");
    const { accounts } = await res.json();
    render(accounts);
    showError($("list-error"), null);
  } catch (e) {
    showError($("list-error"), e);
  }
}

function render(accounts) {
  const tbody = $("accounts").querySelector("tbody");
  tbody.replaceChildren(...accounts.map(row));
  $("count").textContent = `(${accounts.length})`;
  $("empty").hidden = accounts.length > 0;
  $("accounts").hidden = accounts.length === 0;
}

function row(a) {
  const error = el("p", { className: "error", role: "alert" });
  error.hidden = true;
  const secret = el("code", { className: "secret" });
  secret.hidden = true;

  const chips = a.labels.map((l) =>
    el("span", { className: "chip" }, l,
      el("button", {
        type: "button", className: "chip-x", title: `Remove label ${l}`,
        "aria-label": `Remove label ${l}`,
        onclick: () => act(error, () => api("DELETE", `${accountPath(a.id)}/labels/${encodeURIComponent(l)}`)),
      }, "\u00d7")));

  const input = el("input", { placeholder: "add label", spellcheck: "false", "aria-label": `New label for ${a.id}` });
  const addForm = el("form", {
    className: "add-label",
    onsubmit: (ev) => {
      ev.preventDefault();
      act(error, () => api("POST", `${accountPath(a.id)}/labels`, { label: input.value }));
    },
  }, input, el("button", { type: "submit" }, "Add"));

  const reveal = el("button", {
    type: "button", className: "reveal",
    onclick: async () => {
      if (!secret.hidden) {
        secret.hidden = true;
        secret.textContent = "";
        reveal.textContent = "Reveal secret";
        return;
      }
      try {
        const res = await api("GET", `${accountPath(a.id)}/secret`);
        secret.textContent = (await res.json()).base32;
        secret.hidden = false;
        reveal.textContent = "Hide secret";
        showError(error, null);
      } catch (e) {
        showError(error, e);
      }
    },
  }, "Reveal secret");

  const provisioning = el("button", {
    type: "button", className: "provisioning", onclick: () => showProvision(a.id),
  }, "Provisioning");

  const del = el("button", {
    type: "button", className: "danger delete",
    onclick: () => {
      const what = `Delete account ${a.id} (${a.labels.join(", ")})?\n\n` +
        "Its hidden server will no longer be able to register. This cannot be undone.";
      if (!confirm(what)) return;
      act(error, async () => {
        const res = await api("DELETE", accountPath(a.id));
        if ($("prov-id").textContent === a.id) closeProvision();
        return res;
      });
    },
  }, "Delete");

  return el("tr", { "data-id": a.id },
    el("td", {}, el("code", { className: "id" }, a.id), el("br"), secret),
    el("td", {}, el("div", { className: "chips" }, ...chips), addForm, error),
    el("td", {}, a.algorithm),
    el("td", {}, String(a.digits)),
    el("td", {}, `${a.step} s`),
    el("td", { className: "actions" }, reveal, provisioning, del));
}

// Runs a change; on success the list is reloaded, on failure the row says why.
async function act(errorNode, change) {
  try {
    await change();
    showError(errorNode, null);
    await refresh();
  } catch (e) {
    showError(errorNode, e);
  }
}

// ---- creating ----

$("create-form").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const button = $("create");
  button.disabled = true;
  try {
    const body = { label: $("new-label").value };
    const id = $("new-id").value.trim();
    if (id) body.id = id;
    const res = await api("POST", "/api/accounts", body);
    const { account, certificate } = await res.json();
    $("create-form").reset();
    showError($("create-error"), null);
    await refresh();
    await showProvision(account.id, certificate);
  } catch (e) {
    showError($("create-error"), e);
  } finally {
    button.disabled = false;
  }
});

// ---- provisioning: files and QR code, fetched with the token ----

let blobUrls = [];

function download(link, text, type, name) {
  const url = URL.createObjectURL(new Blob([text], { type }));
  blobUrls.push(url);
  link.href = url;
  link.download = name;
  link.textContent = `Download ${name}`;
}

// The label certificate and its key as ID.crt and ID.key downloads (CERT of
// the API; null when the relay has no CA and runs without TLS).
function showCertificate(id, certificate) {
  $("cert-files").hidden = !certificate;
  if (!certificate) return;
  download($("dl-crt"), certificate.cert, "application/x-pem-file", `${id}.crt`);
  download($("dl-key"), certificate.key, "application/x-pem-file", `${id}.key`);
  $("cert-names").textContent = certificate.names.join(", ");
}

async function showProvision(id, certificate) {
  closeProvision();
  try {
    const base = accountPath(id);
    const [json, js, svg] = await Promise.all([
      api("GET", `${base}/provision.json`).then((r) => r.text()),
      api("GET", `${base}/provision.js`).then((r) => r.text()),
      api("GET", `${base}/qr.svg`).then((r) => r.text()),
    ]);
    $("prov-id").textContent = id;
    download($("dl-json"), json, "application/json", `${id}.json`);
    download($("dl-js"), js, "text/javascript", `${id}.js`);
    $("prov-qr").src = "data:image/svg+xml;charset=utf-8," + encodeURIComponent(svg);
    $("prov-file").textContent = json;
    showCertificate(id, certificate);
    $("expose-cmd").textContent = certificate
      ? `taas expose ${id}.json --to 127.0.0.1:PORT --tls`
      : `taas expose ${id}.json --to 127.0.0.1:PORT`;
    $("provision").hidden = false;
    $("provision").scrollIntoView({ block: "nearest" });
  } catch (e) {
    showError($("list-error"), e);
  }
}

function closeProvision() {
  for (const url of blobUrls) URL.revokeObjectURL(url);
  blobUrls = [];
  $("provision").hidden = true;
  $("prov-id").textContent = "";
  $("prov-file").textContent = "";
  $("prov-file").hidden = true;
  $("show-file").textContent = "Show the file";
  $("prov-qr").removeAttribute("src");
  $("cert-files").hidden = true;
  $("cert-names").textContent = "";
  showError($("cert-error"), null);
}

$("show-file").addEventListener("click", () => {
  const pre = $("prov-file");
  pre.hidden = !pre.hidden;
  $("show-file").textContent = pre.hidden ? "Show the file" : "Hide the file";
});
$("close-provision").addEventListener("click", closeProvision);
// Each click makes a new key: the relay keeps none.
$("issue-cert").addEventListener("click", async () => {
  const id = $("prov-id").textContent;
  const button = $("issue-cert");
  button.disabled = true;
  try {
    const res = await api("POST", `${accountPath(id)}/certificate`);
    const { certificate } = await res.json();
    showCertificate(id, certificate);
    $("expose-cmd").textContent = `taas expose ${id}.json --to 127.0.0.1:PORT --tls`;
    showError($("cert-error"), null);
  } catch (e) {
    showError($("cert-error"), e);
  } finally {
    button.disabled = false;
  }
});

refresh();
