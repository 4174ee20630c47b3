// The sidecar's console. Reads only routes documented in openapi.json; every value reaches
// the page through textContent (never innerHTML), whether it came from the log, from an
// error message or from what the user typed.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const FIRST_IDS = 20;

  const state = {
    segments: [],
    sortKey: "segment",
    sortDir: 1,
    prev: null, // {at, totals: Map("transport op" -> count)} of the last refresh
    timer: null,
    busy: false,
  };

  // -- helpers ---------------------------------------------------------------------------------
  function el(tag, text, className) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (className) node.className = className;
    return node;
  }

  function row(cells) {
    const tr = document.createElement("tr");
    for (const cell of cells) tr.append(cell instanceof Node ? cell : el("td", cell));
    return tr;
  }

  function numCell(value) {
    const td = el("td", fmtInt(value), "num");
    td.dataset.value = String(value);
    return td;
  }

  function fmtInt(n) {
    return typeof n === "number" ? n.toLocaleString("en-US") : "–";
  }

  function fmtAge(ms) {
    if (typeof ms !== "number" || !Number.isFinite(ms)) return "–";
    const s = Math.max(0, ms) / 1000;
    if (s < 1) return `${Math.round(ms)} ms`;
    if (s < 90) return `${s.toFixed(s < 10 ? 1 : 0)} s`;
    if (s < 5400) return `${Math.round(s / 60)} min`;
    if (s < 172800) return `${(s / 3600).toFixed(1)} h`;
    return `${(s / 86400).toFixed(1)} d`;
  }

  function show(node, visible) {
    node.hidden = !visible;
  }

  function say(node, message) {
    node.textContent = message || "";
    show(node, Boolean(message));
  }

  // fetch a documented route (relative, so the page also works behind a path prefix)
  async function call(path, kind = "json") {
    const resp = await fetch(path, { cache: "no-store", headers: { Accept: kind === "json" ? "application/json" : "text/plain" } });
    const type = resp.headers.get("Content-Type") || "";
    let body = null;
    if (type.includes("json")) {
      try {
        body = await resp.json();
      } catch {
        body = null;
      }
    } else {
      body = await resp.text();
    }
    return { status: resp.status, ok: resp.ok, body, headers: resp.headers };
  }

  function errorText(res, what) {
    const msg = res.body && typeof res.body === "object" && typeof res.body.error === "string" ? res.body.error : `HTTP ${res.status}`;
    return `${what}: ${msg}`;
  }

  // -- status: readiness, lag, fallback, request rates -------------------------------------------
  function renderStatus(st) {
    const badge = $("ready-badge");
    badge.textContent = st.ready ? "ready" : "not ready";
    badge.className = `badge ${st.ready ? "good" : "bad"}`;
    $("log-name").textContent = typeof st.log === "string" ? st.log : "";
    $("c-ready").textContent = st.ready ? "ready" : "catching up";
    $("c-ready").className = `big ${st.ready ? "good-text" : "bad-text"}`;
    const notes = [];
    if (st.started_from) notes.push(`started from ${st.started_from}`);
    if (st.partial) notes.push("holds some segments only (--segments)");
    if (st.error) notes.push(`error: ${st.error}`);
    $("c-ready-note").textContent = notes.join(" · ");

    $("c-segments").textContent = fmtInt(st.segments);
    const unhealthy = Array.isArray(st.unhealthy) ? st.unhealthy : [];
    $("c-unhealthy").textContent = unhealthy.length ? `unhealthy: ${unhealthy.join(", ")}` : "all fresh";
    $("c-unhealthy").className = unhealthy.length ? "bad-text" : "muted";
    $("c-memberships").textContent = fmtInt(st.memberships);
    $("c-uptime").textContent = typeof st.uptime_s === "number" ? `up ${fmtAge(st.uptime_s * 1000)}` : "";

    const fb = st.fallback && typeof st.fallback === "object" ? st.fallback : {};
    const kind = typeof fb.kind === "string" ? fb.kind : "none";
    $("c-fallback").textContent = kind === "none" ? "none" : kind;
    const breaker = $("c-breaker");
    if (typeof fb.breaker === "string") {
      const opened = typeof fb.breaker_opened === "number" ? ` (opened ${fb.breaker_opened}×)` : "";
      breaker.textContent = `breaker ${fb.breaker.replace("_", "-")}${opened}`;
      breaker.className = fb.breaker === "closed" ? "good-text" : "bad-text";
    } else {
      breaker.textContent = kind === "none" ? "not configured: what the replica cannot answer is unknown" : "no breaker";
      breaker.className = "muted";
    }
    breaker.dataset.state = typeof fb.breaker === "string" ? fb.breaker : "";

    renderLag(st.lag && typeof st.lag === "object" ? st.lag : {});
    renderRates(st.requests && typeof st.requests === "object" ? st.requests : {});
  }

  function renderLag(lag) {
    const body = $("lag").tBodies[0];
    const parts = Object.keys(lag).sort((a, b) => Number(a) - Number(b));
    body.replaceChildren(
      ...parts.map((p) => {
        const tr = row([p, numCell(lag[p])]);
        if (lag[p] > 0) tr.className = "behind";
        return tr;
      }),
    );
    if (!parts.length) body.append(row([el("td", "no partitions yet", "muted"), ""]));
  }

  function renderRates(requests) {
    const now = performance.now();
    const totals = new Map();
    const rows = [];
    for (const transport of Object.keys(requests).sort()) {
      const ops = requests[transport] || {};
      for (const op of Object.keys(ops).sort()) {
        const counts = ops[op] || {};
        const total = Object.values(counts).reduce((a, b) => a + (typeof b === "number" ? b : 0), 0);
        const key = `${transport} ${op}`;
        totals.set(key, total);
        let rate = "–";
        if (state.prev && state.prev.totals.has(key) && now > state.prev.at) {
          const per = ((total - state.prev.totals.get(key)) * 1000) / (now - state.prev.at);
          rate = per >= 10 ? per.toFixed(0) : per.toFixed(1);
        }
        const shares = Object.keys(counts)
          .sort((a, b) => counts[b] - counts[a])
          .map((k) => `${k} ${total ? Math.round((100 * counts[k]) / total) : 0}%`)
          .join(" · ");
        const rateCell = el("td", rate, "num");
        rows.push(row([transport, op, rateCell, numCell(total), shares]));
      }
    }
    state.prev = { at: now, totals };
    const body = $("rates").tBodies[0];
    body.replaceChildren(...rows);
    $("rates-note").textContent = rows.length ? "req/s over the last refresh interval" : "no requests served yet";
  }

  // -- segments table -----------------------------------------------------------------------------
  function compare(a, b) {
    const k = state.sortKey;
    let x = a[k];
    let y = b[k];
    if (k === "updated_at") {
      x = Date.parse(x);
      y = Date.parse(y);
    }
    if (typeof x === "number" && typeof y === "number") return (x - y) * state.sortDir || a.segment.localeCompare(b.segment);
    return String(x).localeCompare(String(y)) * state.sortDir || a.segment.localeCompare(b.segment);
  }

  function renderSegments() {
    const text = $("filter").value.trim().toLowerCase();
    const health = $("health-filter").value;
    const shown = state.segments.filter((s) => {
      if (text && !String(s.segment).toLowerCase().includes(text)) return false;
      if (health === "unhealthy") return s.health !== "fresh";
      if (health === "expiring") return s.ttl === true;
      return !health || s.health === health;
    });
    shown.sort(compare);
    const now = Date.now();
    const body = $("segments").tBodies[0];
    body.replaceChildren(
      ...shown.map((s) => {
        const name = el("td");
        const pick = el("button", s.segment, "link");
        pick.type = "button";
        pick.title = "check a user in this segment";
        pick.addEventListener("click", () => {
          $("check-segment").value = s.segment;
          $("check-user").focus();
        });
        name.append(pick);
        const updated = el("td");
        const time = el("time", fmtAge(now - Date.parse(s.updated_at)) + " ago");
        time.dateTime = s.updated_at;
        time.title = s.updated_at;
        updated.append(time);
        const h = el("td");
        h.append(el("span", s.health || "?", `badge ${s.health === "fresh" ? "good" : "bad"}`));
        if (s.ttl === true) {
          // a TTL segment: its memberships lapse on this replica's clock unless republished
          const exp = el("span", "expiring", "badge ttl");
          exp.title = s.next_expiry_at
            ? `memberships expire (ttl_seconds); next expiry in ${fmtAge(Date.parse(s.next_expiry_at) - now)} (${s.next_expiry_at})`
            : "memberships expire (ttl_seconds); none pending";
          h.append(" ", exp);
        }
        const tr = row([name, numCell(s.version), numCell(s.cardinality), updated, h]);
        tr.dataset.segment = s.segment;
        return tr;
      }),
    );
    const empty = $("seg-empty");
    if (!state.segments.length) say(empty, "This sidecar holds no segments yet.");
    else if (!shown.length) say(empty, `No segment matches “${$("filter").value}”.`);
    else say(empty, "");
    $("seg-count").textContent = `${shown.length} of ${state.segments.length}`;
    for (const th of $("segments").tHead.rows[0].cells) {
      const key = th.firstElementChild.dataset.key;
      if (key === state.sortKey) th.setAttribute("aria-sort", state.sortDir > 0 ? "ascending" : "descending");
      else th.removeAttribute("aria-sort");
    }
  }

  function renderNames() {
    const list = $("segment-names");
    list.replaceChildren(
      ...state.segments.map((s) => {
        const o = document.createElement("option");
        o.value = s.segment;
        return o;
      }),
    );
  }

  // -- refresh loop ------------------------------------------------------------------------------
  async function refresh() {
    if (state.busy) return;
    state.busy = true;
    try {
      const [st, segs] = await Promise.all([call("v1/status"), call("v1/segments")]);
      if (!st.ok) throw new Error(errorText(st, "status"));
      if (!segs.ok) throw new Error(errorText(segs, "segments"));
      renderStatus(st.body);
      const before = state.segments.map((s) => s.segment).join(",");
      state.segments = Array.isArray(segs.body.segments) ? segs.body.segments : [];
      renderSegments();
      if (state.segments.map((s) => s.segment).join(",") !== before) renderNames();
      say($("problem"), "");
      $("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
    } catch (err) {
      say($("problem"), `Cannot read the sidecar: ${err && err.message ? err.message : err}`);
      $("ready-badge").textContent = "unreachable";
      $("ready-badge").className = "badge bad";
    } finally {
      state.busy = false;
    }
  }

  function schedule() {
    clearTimeout(state.timer);
    if (!$("auto").checked) return;
    state.timer = setTimeout(async () => {
      if (!document.hidden) await refresh(); // a background tab waits (visibilitychange)
      schedule();
    }, Number($("interval").value) || 2000);
  }

  // -- check a user ------------------------------------------------------------------------------
  async function explain(event) {
    event.preventDefault();
    const user = $("check-user").value.trim();
    const segment = $("check-segment").value.trim();
    show($("check-result"), false);
    say($("check-error"), "");
    const q = new URLSearchParams({ user, segment });
    let res;
    let all;
    try {
      [res, all] = await Promise.all([call(`v1/explain?${q}`), call(`v1/users/${encodeURIComponent(user)}/segments`)]);
    } catch (err) {
      say($("check-error"), `Cannot reach the sidecar: ${err.message}`);
      return;
    }
    if (!res.ok || !res.body) {
      say($("check-error"), errorText(res, "Not answered"));
      return;
    }
    const r = res.body;
    const member = $("check-member");
    member.textContent = r.member === true ? "yes" : r.member === false ? "no" : "unknown";
    member.className = r.member === true ? "good-text" : r.member === false ? "" : "bad-text";
    member.dataset.member = String(r.member);
    $("check-source").textContent = r.source;
    $("check-version").textContent = r.version === null ? "–" : String(r.version);
    $("check-age").textContent = r.age_ms === null ? "–" : fmtAge(r.age_ms);
    const expires = typeof r.expires_at === "number" ? new Date(r.expires_at) : null;
    $("check-expires").textContent = expires === null ? "–" : `in ${fmtAge(r.expires_at - Date.now())} (${expires.toISOString()})`;
    if (expires !== null) $("check-expires").dataset.expiresAt = String(r.expires_at);
    else delete $("check-expires").dataset.expiresAt;
    $("check-reason").textContent = r.reason === null ? "answered by this replica" : r.reason;
    const segs = all.ok && all.body && Array.isArray(all.body.segments) ? all.body.segments : null;
    $("check-all").textContent = segs === null ? "–" : (segs.join(", ") || "none") + (all.body.complete === false ? " (incomplete: the fallback could not answer for all)" : "");
    show($("check-result"), true);
  }

  // -- audience (only when the sidecar documents the routes) -------------------------------------
  async function audience(event) {
    event.preventDefault();
    const expr = $("audience-expr").value.trim();
    show($("audience-result"), false);
    say($("audience-error"), "");
    const q = new URLSearchParams({ expr });
    let count;
    let ids;
    try {
      [count, ids] = await Promise.all([
        call(`v1/audience/count?${q}`),
        call(`v1/audience?${new URLSearchParams({ expr, limit: String(FIRST_IDS) })}`, "text"),
      ]);
    } catch (err) {
      say($("audience-error"), `Cannot reach the sidecar: ${err.message}`);
      return;
    }
    if (count.status === 404 && !(count.body && count.body.segments)) {
      show($("audience-panel"), false); // this sidecar has no audience routes
      return;
    }
    if (!count.ok) {
      say($("audience-error"), errorText(count, "Not counted")); // a 409's message names the segments
      return;
    }
    $("audience-count").textContent = fmtInt(count.body.count);
    const versions = count.body.versions && typeof count.body.versions === "object" ? count.body.versions : {};
    $("audience-versions").textContent =
      Object.keys(versions)
        .sort()
        .map((s) => `${s} v${versions[s]}`)
        .join(", ") || "–";
    const list = $("audience-ids");
    const lines = ids.ok && typeof ids.body === "string" ? ids.body.split("\n").filter(Boolean).slice(0, FIRST_IDS) : [];
    list.replaceChildren(...lines.map((id) => el("li", id)));
    if (!ids.ok) list.append(el("li", errorText({ status: ids.status, body: null }, "ids"), "bad-text"));
    const more = typeof count.body.count === "number" ? count.body.count - lines.length : 0;
    $("audience-more").textContent = ids.ok && more > 0 ? `and ${fmtInt(more)} more` : "";
    show($("audience-result"), true);
  }

  async function detectAudience() {
    try {
      const spec = await call("openapi.json");
      const paths = spec.ok && spec.body && spec.body.paths ? spec.body.paths : {};
      show($("audience-panel"), "/v1/audience/count" in paths && "/v1/audience" in paths);
    } catch {
      show($("audience-panel"), false);
    }
  }

  // -- wiring ----------------------------------------------------------------------------------
  for (const button of document.querySelectorAll("#segments thead button")) {
    button.addEventListener("click", () => {
      const key = button.dataset.key;
      state.sortDir = state.sortKey === key ? -state.sortDir : key === "segment" || key === "health" ? 1 : -1;
      state.sortKey = key;
      renderSegments();
    });
  }
  $("filter").addEventListener("input", renderSegments);
  $("health-filter").addEventListener("change", renderSegments);
  $("check-form").addEventListener("submit", explain);
  $("audience-form").addEventListener("submit", audience);
  $("refresh").addEventListener("click", () => refresh().then(schedule));
  $("auto").addEventListener("change", schedule);
  $("interval").addEventListener("change", schedule);
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) refresh().then(schedule);
  });

  detectAudience();
  refresh().then(schedule);
})();
