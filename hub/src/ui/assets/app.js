// unitsync dashboard: live updates. Pages read fine without this script;
// with it, the hub's event stream says when something changed and the
// page fetches its live region again (no reload, scroll kept, open
// <details> kept, nothing replaced while you type in it).
"use strict";
(() => {
  const live = document.getElementById("live");
  const state = document.getElementById("live-state");
  if (!live || !window.EventSource || !window.fetch) return;
  let timer = null;
  let busy = false;
  let again = false;
  // The server says how often this page may refresh (a promotion plan
  // costs more than the fleet matrix).
  const every = Number(live.dataset.refreshMs) || 250;
  let last = 0;

  const show = (text, cls) => {
    if (!state) return;
    state.textContent = text;
    state.className = cls;
    state.title = text === "live" ? "Updates as the fleet changes" : "Reconnecting to the hub";
  };

  const typing = () => {
    const a = document.activeElement;
    return a && live.contains(a) && /^(INPUT|SELECT|TEXTAREA)$/.test(a.tagName);
  };

  const refresh = async () => {
    if (busy) { again = true; return; }
    busy = true;
    try {
      const r = await fetch(window.location.href, {
        headers: { "X-Partial": "1" },
        credentials: "same-origin",
        cache: "no-store",
      });
      if (r.status === 401) { window.location.reload(); return; }
      if (!r.ok) return;
      last = Date.now();
      const html = await r.text();
      if (typing()) { again = true; return; }
      const open = Array.from(live.querySelectorAll("details[open][id]"), (d) => d.id);
      live.innerHTML = html;
      for (const id of open) {
        const d = document.getElementById(id);
        if (d) d.open = true;
      }
      document.body.dataset.updated = String(Date.now());
    } catch (_) {
      // The stream's reconnection brings the next update.
    } finally {
      busy = false;
      if (again) { again = false; schedule(); }
    }
  };

  const schedule = () => {
    clearTimeout(timer);
    timer = setTimeout(refresh, Math.max(100, last + every - Date.now()));
  };

  // One stream per visible page. A page left for another is closed so its
  // connection is free (plain HTTP allows a browser six per host), and
  // opened again if the browser brings the page back from its cache.
  let events = null;
  const connect = () => {
    events = new EventSource("/ui/events");
    events.addEventListener("change", schedule);
    events.onopen = () => { show("live", "live-on"); document.body.dataset.live = "on"; };
    events.onerror = () => { show("reconnecting…", "live-off"); document.body.dataset.live = "off"; };
  };
  connect();
  window.addEventListener("pagehide", () => {
    if (events) { events.close(); events = null; }
  });
  window.addEventListener("pageshow", (e) => {
    if (e.persisted && !events) connect();
  });
})();
