// The status page: polls api/status every second and redraws. Builds DOM nodes with
// textContent only (no HTML from data). The token, when the face needs one, comes from the
// URL fragment (#token=...), which browsers never send to a server.
"use strict";
(function () {
  const fragment = new URLSearchParams(location.hash.replace(/^#/, ""));
  const token = fragment.get("token");
  // #period=MS polls faster (a wall screen during a big run; the tests); never below 100 ms
  const PERIOD_MS = Math.max(100, Number(fragment.get("period")) || 1000);
  const headers = token ? { Authorization: "Bearer " + token } : {};

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") node.className = v; else node.setAttribute(k, v);
    }
    for (const c of children) node.append(c instanceof Node ? c : document.createTextNode(String(c)));
    return node;
  }
  function utc(iso) { return iso ? iso.slice(0, 19).replace("T", " ") + " UTC" : "-"; }
  function zoned(iso, zone) {
    if (!iso || !zone || zone === "UTC") return "";
    try {
      return new Intl.DateTimeFormat("en-GB", { timeZone: zone, weekday: "short", hour: "2-digit", minute: "2-digit",
        timeZoneName: "short" }).format(new Date(iso));
    } catch (e) { return ""; }
  }
  function span(seconds) {
    const s = Math.max(0, Math.round(Math.abs(seconds)));
    const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
    if (d) return d + "d " + h + "h"; if (h) return h + "h " + m + "min"; if (m) return m + "min " + r + "s"; return r + "s";
  }
  function replace(id, nodes, empty) {
    const box = document.getElementById(id);
    box.replaceChildren(...(nodes.length ? nodes : [empty]));
  }

  function workflowCard(w, now) {
    const next = w.next_fire ? new Date(w.next_fire) : null;
    const nextText = next ? utc(w.next_fire) + " (in " + span((next - now) / 1000) + ")" : "not scheduled";
    const local = zoned(w.next_fire, w.timezone);
    return el("article", { class: "card", "data-workflow": w.name },
      el("h3", {}, w.name, w.paused ? el("span", { class: "pill warn" }, "paused") : "",
        w.running ? el("span", { class: "pill ok" }, "running") : ""),
      el("dl", {},
        el("dt", {}, "schedule"), el("dd", {}, w.cron ? w.cron + " (" + w.timezone + ", overlap " + w.overlap + ")" : "by hand only"),
        el("dt", {}, "next fire"), el("dd", { class: "next-fire", "data-next-fire": w.next_fire || "" },
          w.paused && next ? "paused (would be " + utc(w.next_fire) + ")" : nextText + (local ? " · " + local : "")),
        el("dt", {}, "last run"), el("dd", { class: "last-run" }, w.last_run
          ? el("span", {}, el("span", { class: "result-" + w.last_result }, w.last_result), " · " + utc(w.last_fire) + " · " + w.last_run)
          : "never")));
  }

  function runCard(r) {
    const chips = Object.entries(r.units).map(([state, n]) =>
      el("span", { class: "chip", "data-state": state }, state + " " + n));
    const pct = r.copy.total ? Math.floor((100 * r.copy.done) / r.copy.total) : null;
    return el("article", { class: "card", "data-run": r.run_id },
      el("h3", {}, r.workflow),
      el("div", { class: "muted" }, r.run_id + " · " + r.total + " unit(s) · started " + utc(r.started)),
      el("div", { class: "chips units" }, ...chips),
      pct === null ? el("div", { class: "muted copy" }, "no background copy being waited for")
        : el("div", { class: "copy" }, "background copy " + pct + "% (" + r.copy.done + " of " + r.copy.total + " tracks)",
            el("div", { class: "bar" }, el("span", { style: "width:" + pct + "%" }))));
  }

  function render(doc) {
    const now = new Date(doc.now);
    const s = doc.service;
    const pill = document.getElementById("service-state");
    pill.textContent = s.stopping ? "stopping" : s.ready ? "ready" : "resuming";
    pill.className = "pill " + (s.stopping ? "warn" : s.ready ? "ok" : "warn");
    document.getElementById("updated").textContent = "as of " + utc(doc.now) + " · pid " + s.pid;
    replace("in-flight", doc.in_flight.map(runCard), el("p", { class: "muted" }, "none"));
    replace("workflows", doc.workflows.map((w) => workflowCard(w, now)), el("p", { class: "muted" }, "no workflow loaded"));
    replace("failures", doc.failures.map((f) =>
      el("li", { class: "failure", "data-workflow": f.workflow },
        el("strong", {}, f.workflow), " · " + utc(f.at) + (f.vms.length ? " · " + f.vms.join(", ") : "") + ": ",
        el("span", { class: "reason" }, f.reason))), el("li", { class: "muted" }, "none"));
    document.getElementById("run-counts").textContent = doc.runs.total + " run(s) in the journal: " +
      Object.entries(doc.runs.states).map(([k, n]) => k + " " + n).join(", ");
    replace("recent", doc.recent.map((r) =>
      el("li", { class: r.state === "succeeded" ? "" : "not-ok", "data-run": r.run_id },
        el("span", { class: "result-" + r.state }, r.state), " · " + r.workflow + " · " + utc(r.started) + " · " +
        Object.entries(r.units).map(([k, n]) => k + " " + n).join(", ") + (r.verified ? " · verified" : ""))),
      el("li", { class: "muted" }, "none"));
  }

  async function tick() {
    try {
      const reply = await fetch("api/status", { headers, cache: "no-store" });
      if (!reply.ok) throw new Error(reply.status === 401 ? "token needed (#token=...)" : "HTTP " + reply.status);
      render(await reply.json());
    } catch (e) {
      const pill = document.getElementById("service-state");
      pill.textContent = "unreachable: " + e.message;
      pill.className = "pill bad";
    } finally {
      setTimeout(tick, PERIOD_MS);
    }
  }
  tick();
})();
