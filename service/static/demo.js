/* The live demo page: classify an image on the server and run its controller in the browser.
 *
 * Every image goes to POST /classify (the server's answer: label, top-k, the architecture
 * that ran, its cost and measured latency) and, at the same time, through the controller of
 * the same operating point here (onnxruntime-web, WebAssembly), on the image as
 * preprocess.js prepares it. Both choices are shown with an "agree" / "differ" badge.
 *
 * With INSTANAS_API_TOKEN set, the model's manifest and controllers need the token: the page
 * asks for it, keeps it for this tab only (sessionStorage) and sends it as a bearer token to
 * those endpoints; it asks again when the server refuses it.
 *
 * For tests and the curious, window.instanasDemo holds the state: `ready`, `needsToken`,
 * `results` (one summary per image: both codes, the browser's probabilities and input pixels),
 * `classify(blob, name)` and `setOperatingPoint(name)`.
 */
(function () {
  "use strict";

  const P = window.InstanasPreprocess, A = window.InstanasArchitecture;
  const ORT_PATH = "/static/vendor/onnxruntime-web/";
  const CHART_POINTS = 40;
  const NEAR_THRESHOLD = 0.01;
  const SERVER_TYPES = new Set(["image/jpeg", "image/png", "image/webp", "image/bmp", "image/gif", "image/tiff"]);
  const TOKEN_KEY = "instanas.apiToken";  // sessionStorage: this tab only

  const state = {
    manifest: null, space: null, modules: 0, point: null, sessions: new Map(), history: [], seq: 0,
    queue: Promise.resolve(), galleries: new Map(),
  };
  const demo = (window.instanasDemo = {
    ready: false, error: null, results: [], ortError: null, needsToken: false,
    classify: (blob, name) => enqueue(blob, name),
    setOperatingPoint: (name) => selectPoint(name),
  });

  /* ---------- small helpers ---------- */

  const $ = (id) => document.getElementById(id);

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (value === undefined || value === null || value === false) continue;
      if (key === "class") node.className = value;
      else if (key === "text") node.textContent = value;
      else if (key === "style") Object.assign(node.style, value);  // CSSOM: allowed under a strict CSP
      else if (key.startsWith("on")) node.addEventListener(key.slice(2), value);
      else node.setAttribute(key, value === true ? "" : String(value));
    }
    for (const child of children.flat(Infinity)) {
      if (child !== null && child !== undefined && child !== false) {
        node.append(child instanceof Node ? child : document.createTextNode(String(child)));
      }
    }
    return node;
  }

  const fmt = (v, digits = 2) => (v === null || v === undefined || Number.isNaN(v) ? "–" : Number(v).toFixed(digits));
  const pct = (v, digits = 1) => `${(100 * v).toFixed(digits)}%`;
  const signed = (v, digits = 2) => `${v > 0 ? "+" : v < 0 ? "−" : "±"}${Math.abs(v).toFixed(digits)}`;

  /** The Authorization header for the endpoints behind INSTANAS_API_TOKEN, once the user gave it. */
  function authHeaders() {
    const token = sessionStorage.getItem(TOKEN_KEY);
    return token ? { Authorization: `Bearer ${token}` } : {};
  }

  class TokenNeeded extends Error {}

  async function getJSON(url) {
    const response = await fetch(url, { headers: authHeaders() });
    const body = await response.json().catch(() => null);
    if (response.status === 401) throw new TokenNeeded(`${url} needs the server's API token (INSTANAS_API_TOKEN)`);
    if (!response.ok) throw new Error(body?.error?.message || `${url}: HTTP ${response.status}`);
    return body;
  }

  /** Ask for the API token below the status line; resolves once one is given (kept for this tab). */
  function askToken(refused) {
    demo.needsToken = true;
    setStatus(refused ? "The server did not accept that token." : "This server needs its API token to show the model.",
      refused ? "error" : "warn");
    return new Promise((resolve) => {
      const input = el("input", { id: "token", type: "password", autocomplete: "off", required: true });
      const form = el("form", { id: "token-form", class: "token" },
        el("label", { for: "token", text: "API token (INSTANAS_API_TOKEN), kept for this tab only:" }),
        input, el("button", { type: "submit", text: "Use it" }));
      form.addEventListener("submit", (event) => {
        event.preventDefault();
        const token = input.value.trim();
        if (!token) return;
        sessionStorage.setItem(TOKEN_KEY, token);
        form.remove();
        demo.needsToken = false;
        setStatus("");
        resolve();
      });
      $("status").insertAdjacentElement("afterend", form);
      input.focus();
    });
  }

  function setStatus(text, kind = "") {
    const node = $("status");
    node.textContent = text;
    node.className = `status ${kind}`;
  }

  /* ---------- model and operating points ---------- */

  function controllerOf(name) {
    return state.manifest.controllers.find((c) => c.name === name) || null;
  }

  function cascadeOf(name) {
    return (state.manifest.cascades || []).find((c) => c.name === name) || null;
  }

  function pointsOf() {
    return [...state.manifest.controllers, ...(state.manifest.cascades || [])];
  }

  function stagesText(cascade) {
    return cascade.stages.map((st) => `${st.network || "own graphs"}` +
      (st.threshold === null ? "" : ` (answers where its ${st.confidence.replace("_", " ")} ≥ ${fmt(st.threshold, 3)})`)).join(" → ");
  }

  function pointLabel(c) {
    const e = c.evaluation;
    const ms = e ? (e.mean_measured_latency_ms ?? e.mean_estimated_latency_ms) : c.latency_ms;
    const parts = [c.name];
    if (e) parts.push(`top-1 ${pct(e.top1)}`, `${fmt(ms, 3)} ms/image`);
    if (c.name === state.manifest.default_controller) parts.push("(default)");
    return parts.join(" · ");
  }

  function renderModel() {
    const m = state.manifest;
    const space = m.search_space;
    $("model-info").replaceChildren(
      el("strong", { text: m.name }), " ", el("span", { class: "muted", text: m.version }), el("br"),
      `${space.cells.length} cells × ${state.modules} modules · input ${m.preprocessing.input_size}×` +
      `${m.preprocessing.input_size} · ${m.classes.length} classes (${m.dataset})`);
    const select = $("operating-point");
    select.replaceChildren();
    if (!pointsOf().length) {
      select.append(el("option", { value: "", text: `static: ${m.fixed_architecture}` }));
      select.disabled = true;
      $("point-info").textContent = "A static bundle: one fixed architecture for every image.";
      return;
    }
    for (const c of pointsOf()) select.append(el("option", { value: c.name, text: pointLabel(c) }));
    select.disabled = false;
    select.value = state.point;
    select.addEventListener("change", () => selectPoint(select.value));
    renderPointInfo();
  }

  function renderPointInfo() {
    const c = controllerOf(state.point), cascade = cascadeOf(state.point);
    const rows = pointsOf().map((p) => {
      const e = p.evaluation;
      return el("tr", { class: p.name === state.point ? "selected" : "" },
        el("td", { text: p.name }),
        el("td", { text: e ? pct(e.top1) : "–" }),
        el("td", { text: e ? fmt(e.mean_measured_latency_ms ?? e.mean_estimated_latency_ms, 3) : "–" }),
        el("td", { text: e ? fmt(e.mean_mflops, 1) : "–" }),
        el("td", { text: e ? fmt(e.mean_modules_executed, 1) : "–" }));
    });
    const e = c && c.evaluation;
    $("point-info").replaceChildren(
      el("table", { class: "points" },
        el("thead", {}, el("tr", {}, ["point", "top-1", "ms/img", "MFLOPs", "modules"].map((h) => el("th", { text: h })))),
        el("tbody", {}, rows)),
      el("p", { class: "muted", "data-testid": "point-rule" }, cascade
        ? `${state.point}, a cascade: ${stagesText(cascade)}` + (cascade.evaluation
          ? `; ${pct(cascade.evaluation.escalated ?? 0)} of ${cascade.evaluation.images} ${cascade.evaluation.dataset} ` +
            `${cascade.evaluation.split} images escalated.` : ".")
        : e
          ? `${state.point}: measured on ${e.images} ${e.dataset} ${e.split} images; a module runs where p ≥ ${c.threshold}.`
          : `${state.point}: a module runs where p ≥ ${c ? c.threshold : 0.5}.`));
  }

  async function selectPoint(name) {
    if (!controllerOf(name) && !cascadeOf(name)) throw new Error(`no operating point ${name}`);
    state.point = name;
    $("operating-point").value = name;
    renderPointInfo();
    if (controllerOf(name)) controllerSession(name).catch(() => {});  // start loading it now; errors show on use
    await loadGallery();
  }

  /* ---------- the controller in the browser ---------- */

  function ortReady() {
    if (!window.ort) throw new Error("onnxruntime-web did not load");
    ort.env.wasm.wasmPaths = ORT_PATH;
    ort.env.wasm.numThreads = 1;  // no cross-origin isolation, so no shared memory for threads
    ort.env.wasm.proxy = false;
    return window.ort;
  }

  function controllerSession(name) {
    if (!state.sessions.has(name)) {
      const loading = (async () => {
        const runtime = ortReady();
        const response = await fetch(`/model/controllers/${encodeURIComponent(name)}.onnx`, { headers: authHeaders() });
        if (!response.ok) throw new Error(`controller ${name}: HTTP ${response.status}`);
        const bytes = new Uint8Array(await response.arrayBuffer());
        return runtime.InferenceSession.create(bytes, { executionProviders: ["wasm"] });
      })();
      loading.catch(() => state.sessions.delete(name));
      state.sessions.set(name, loading);
    }
    return state.sessions.get(name);
  }

  async function runLocal(blob, point) {
    const pre = state.manifest.preprocessing, size = pre.input_size;
    const prepared = await P.prepare(blob, pre);
    const local = { pixels: prepared.pixels, width: prepared.width, height: prepared.height, draft: prepared.draft };
    if (!point || !controllerOf(point)) return local;  // a static bundle or a cascade: no controller to run
    const session = await controllerSession(point);
    const input = new ort.Tensor("float32", prepared.input, [1, 3, size, size]);
    const t0 = performance.now();
    const outputs = await session.run({ [session.inputNames[0]]: input });
    local.controller_ms = performance.now() - t0;
    const probabilities = Array.from(outputs[session.outputNames[0]].data);
    const threshold = controllerOf(point).threshold;
    const executed = A.applyEmptyCellRule(A.policy(probabilities, state.space, threshold), state.space);
    return Object.assign(local, {
      probabilities, threshold, executed, code: A.encode(executed), margin: A.margin(probabilities, threshold),
    });
  }

  /* ---------- the server ---------- */

  async function runServer(blob, point) {
    const params = new URLSearchParams({ top_k: String(Math.min(5, state.manifest.classes.length)) });
    if (point) params.set("operating_point", point);
    const type = SERVER_TYPES.has(blob.type) ? blob.type : "application/octet-stream";
    const t0 = performance.now();
    const response = await fetch(`/classify?${params}`, { method: "POST", body: blob, headers: { "content-type": type } });
    const body = await response.json().catch(() => null);
    if (!response.ok) throw new Error(body?.error?.message || `HTTP ${response.status}`);
    body.round_trip_ms = performance.now() - t0;
    return body;
  }

  /* ---------- one image ---------- */

  function enqueue(blob, name) {
    const job = state.queue.then(() => classify(blob, name));
    state.queue = job.catch(() => {});
    return job;
  }

  async function classify(blob, name) {
    const point = state.point;
    const seq = ++state.seq;
    setStatus(`Classifying ${name}…`);
    const [server, local] = await Promise.allSettled([runServer(blob, point), runLocal(blob, point)]);
    const result = {
      seq, name, point, url: URL.createObjectURL(blob),
      server: server.status === "fulfilled" ? server.value : null,
      serverError: server.status === "rejected" ? String(server.reason.message || server.reason) : null,
      local: local.status === "fulfilled" ? local.value : null,
      localError: local.status === "rejected" ? String(local.reason.message || local.reason) : null,
    };
    if (result.server) result.executed = A.decode(result.server.architecture.code, state.space.cells.length, state.modules);
    if (result.server && result.local && result.local.code) result.agree = result.local.code === result.server.architecture.code;
    const previous = state.history.length ? state.history[state.history.length - 1] : null;
    state.history.push(result);
    if (state.history.length > 200) URL.revokeObjectURL(state.history.shift().url);
    renderCard($("current"), result, previous, "This image");
    if (previous) renderCard($("previous"), previous, null, "Previous image");
    drawChart();
    if (result.serverError) setStatus(`${name}: the server refused it: ${result.serverError}`, "error");
    else if (result.localError) setStatus(`${name}: classified; the browser's controller failed: ${result.localError}`, "warn");
    else setStatus(`${name}: classified.`);
    const summary = {
      seq, name, point,
      server_code: result.server?.architecture.code ?? null, label: result.server?.prediction.label ?? null,
      server_point: result.server?.operating_point?.name ?? null,
      resolution: result.server?.architecture.resolution ?? null,
      stages: result.server?.cascade ? result.server.cascade.stages.map((st) => st.resolution) : null,
      local_code: result.local?.code ?? null, agree: result.agree ?? null, margin: result.local?.margin ?? null,
      probabilities: result.local?.probabilities ?? null, threshold: result.local?.threshold ?? null,
      pixels: result.local ? Array.from(result.local.pixels) : null, draft: result.local?.draft ?? null,
      width: result.local?.width ?? null, height: result.local?.height ?? null,
      server_error: result.serverError, local_error: result.localError,
    };
    demo.results.push(summary);
    return summary;
  }

  /* ---------- drawing an architecture ---------- */

  function moduleShort(name) {
    return name.replace(/^ir_/, "").replace(/_/g, " ");
  }

  /* cells x modules: one column per cell, one row per module; `compare` marks what changed. */
  function gridElement(executed, { compare = null, mini = false, chosen = null } = {}) {
    const space = state.space, cells = space.cells.length;
    const grid = el("div", { class: `grid${mini ? " mini" : ""}`, role: "img" });
    grid.style.gridTemplateColumns = `${mini ? "" : "auto "}repeat(${cells}, var(--sq))`;
    const skippedCells = executed.filter((row) => !row.some(Boolean)).length;
    grid.setAttribute("aria-label", `${executed.flat().filter(Boolean).length} modules in ${cells - skippedCells} of ${cells} cells`);
    if (!mini) {
      grid.append(el("span", { class: "corner", text: "cell" }));
      space.cells.forEach((cell, c) => grid.append(el("span", {
        class: `head${A.skippable(cell) ? "" : " fixed"}`, text: String(c),
        title: A.skippable(cell) ? `cell ${c}: skippable` : `cell ${c}: stride ${cell.stride}, ${cell.in_channels}→${cell.out_channels} channels: cannot be skipped`,
      })));
    }
    for (let m = 0; m < state.modules; m++) {
      if (!mini) grid.append(el("span", { class: "label", text: moduleShort(space.cells[0].modules[m]?.name || `m${m}`) }));
      for (let c = 0; c < cells; c++) {
        const on = executed[c][m], skipped = !executed[c].some(Boolean);
        let cls = on ? "sq on" : "sq";
        if (skipped) cls += " skip";
        if (compare) {
          if (on && !compare[c][m]) cls += " added";
          if (!on && compare[c][m]) cls += " removed";
        }
        if (chosen && on && !chosen[c][m]) cls += " forced";
        grid.append(el("span", {
          class: cls,
          title: `cell ${c}, ${space.cells[c].modules[m]?.name}: ${on ? "ran" : skipped ? "cell skipped (identity)" : "off"}`,
        }));
      }
    }
    return grid;
  }

  function legend() {
    return el("div", { class: "legend" },
      el("span", {}, el("i", { class: "sq on" }), "ran"),
      el("span", {}, el("i", { class: "sq" }), "off"),
      el("span", {}, el("i", { class: "sq skip" }), "cell skipped (identity)"),
      el("span", {}, el("i", { class: "sq on forced" }), "ran: empty cell that cannot be skipped"),
      el("span", {}, el("i", { class: "head-mark" }), "cell that cannot be skipped"),
      el("span", {}, el("i", { class: "sq on added" }), "added vs previous"),
      el("span", {}, el("i", { class: "sq removed" }), "removed"));
  }

  /* ---------- one result card ---------- */

  function renderCard(node, r, previous, title) {
    const children = [el("h2", {}, title, el("span", { class: "name", text: ` ${r.name}` }),
      r.point ? el("span", { class: "tag", text: `point ${r.point}` }) : null)];
    const pictures = el("div", { class: "pictures" },
      el("figure", {}, el("img", { src: r.url, alt: r.name, class: "original" }),
        el("figcaption", { text: r.local ? `${r.local.width}×${r.local.height}` : "uploaded" })));
    if (r.local) {
      const size = state.manifest.preprocessing.input_size;
      const canvas = el("canvas", { width: size, height: size, class: "model-input" });
      const ctx = canvas.getContext("2d");
      const image = ctx.createImageData(size, size);
      for (let i = 0; i < size * size; i++) {
        image.data.set([r.local.pixels[i * 3], r.local.pixels[i * 3 + 1], r.local.pixels[i * 3 + 2], 255], i * 4);
      }
      ctx.putImageData(image, 0, 0);
      pictures.append(el("figure", {}, canvas,
        el("figcaption", { text: `model input ${size}×${size}${r.local.draft > 1 ? ` (JPEG at 1/${r.local.draft})` : ""}` })));
    }
    children.push(pictures);
    if (r.server) {
      const s = r.server, a = s.architecture, lat = s.latency_ms;
      const truth = trueLabel(r.name);
      children.push(el("div", { class: "label-row" },
        el("span", { class: "label-name", "data-testid": "label", text: s.prediction.label }),
        el("span", { class: "label-prob", text: pct(s.prediction.probability) }),
        truth ? el("span", { class: `truth ${truth === s.prediction.label ? "ok" : "bad"}`,
          text: truth === s.prediction.label ? "✓ correct" : `✗ is ${truth}` }) : null));
      children.push(el("ol", { class: "topk" }, s.top_k.map((t) => el("li", {},
        el("span", { class: "k-label", text: t.label }),
        el("span", { class: "bar" }, el("span", { style: { width: `${(100 * t.probability).toFixed(1)}%` } })),
        el("span", { class: "k-prob", text: pct(t.probability) })))));
      const measured = (lat.controller ?? 0) + (lat.backbone ?? 0);
      const stats = [
        ["MFLOPs", fmt(a.mflops, 2)],
        ["estimated", `${fmt(a.estimated_latency_ms, 3)} ms`],
        ["measured", `${fmt(measured, 3)} ms`],
        ["vs MobileNetV2", `${fmt(a.relative_to_baseline, 2)}×`],
        ["modules", String(a.modules_executed)],
        ["request", `${fmt(lat.total, 1)} ms (${fmt(r.server.round_trip_ms, 0)} ms round trip)`],
      ];
      children.push(el("dl", { class: "stats" }, stats.map(([k, v]) => [el("dt", { text: k }), el("dd", { text: v })])));
      if (previous && previous.server) {
        const pa = previous.server.architecture;
        const changed = r.executed.flat().filter((on, i) => on !== previous.executed.flat()[i]).length;
        children.push(el("p", { class: "delta" },
          `vs previous: ${signed(a.mflops - pa.mflops)} MFLOPs, ${signed(a.estimated_latency_ms - pa.estimated_latency_ms, 3)} ms estimated, `,
          `${changed} module${changed === 1 ? "" : "s"} differ${changed === 1 ? "s" : ""}`));
      }
      if (s.cascade) {
        /* every stage that ran, each at its resolution: the last one answered */
        children.push(el("div", { class: "stages", "data-testid": "stages" }, s.cascade.stages.map((st) =>
          el("div", { class: `stage ${st.answered ? "answered" : "passed"}`, "data-resolution": String(st.resolution) },
            el("div", { class: "code" }, `${st.resolution}×${st.resolution} `, el("code", { text: st.code }),
              ` ${st.network || ""}: ${st.confidence.toFixed(3)}` +
              (st.threshold === null ? "" : st.answered ? ` ≥ ${fmt(st.threshold, 3)}, answered` : ` < ${fmt(st.threshold, 3)}, escalated`) +
              (st.threshold === null ? " (last stage, answered)" : "")),
            gridElement(A.decode(st.code, state.space.cells.length, state.modules), { mini: true })))));
      }
      children.push(el("div", { class: "arch" },
        el("div", { class: "code" }, "architecture ", el("code", { "data-testid": "code", text: a.code }),
          ` at ${a.resolution}×${a.resolution}`),
        gridElement(r.executed, { compare: previous && previous.executed ? previous.executed : null,
          chosen: r.local && r.local.code === a.code ? A.policy(r.local.probabilities, state.space, r.local.threshold) : null }),
        legend()));
    } else {
      children.push(el("p", { class: "error", text: `server: ${r.serverError}` }));
    }
    children.push(localBox(r));
    node.replaceChildren(...children);
  }

  function localBox(r) {
    if (r.localError) return el("div", { class: "local" }, el("span", { class: "badge differ", text: "no browser result" }), ` ${r.localError}`);
    if (!r.local || !r.local.code) {
      return el("div", { class: "local muted", text: cascadeOf(r.point)
        ? "cascade: its stages run on the server, no controller runs in the browser"
        : "static bundle: no controller to run in the browser" });
    }
    const near = r.local.margin < NEAR_THRESHOLD;
    return el("div", { class: "local" },
      el("span", { class: `badge ${r.agree ? "agree" : "differ"}`, "data-testid": "badge", text: r.agree ? "agree" : "differ" }),
      " In this browser (onnxruntime-web, WebAssembly): ",
      el("code", { text: r.local.code }),
      ` in ${fmt(r.local.controller_ms, 1)} ms. `,
      el("span", { class: near ? "warn" : "muted" },
        `Closest module to the threshold: |p − ${r.local.threshold}| = ${r.local.margin.toExponential(1)}` +
        (near ? " (within 0.01: tiny numeric differences can flip it)" : "")));
  }

  function trueLabel(name) {
    const stem = String(name).replace(/\.[^.]*$/, "");
    const guess = stem.includes("-") ? stem.slice(0, stem.lastIndexOf("-")) : null;
    return guess && state.manifest.classes.includes(guess) ? guess : null;
  }

  /* ---------- the running chart (canvas, drawn by hand) ---------- */

  function niceStep(max, ticks) {
    const raw = max / ticks, mag = 10 ** Math.floor(Math.log10(raw));
    const n = raw / mag;
    return (n <= 1 ? 1 : n <= 2 ? 2 : n <= 5 ? 5 : 10) * mag;
  }

  function drawChart() {
    const canvas = $("chart"), dpr = window.devicePixelRatio || 1;
    const cssW = canvas.clientWidth || 800, cssH = 220;
    canvas.width = Math.round(cssW * dpr);
    canvas.height = Math.round(cssH * dpr);
    canvas.style.height = `${cssH}px`;
    const ctx = canvas.getContext("2d");
    ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
    ctx.clearRect(0, 0, cssW, cssH);
    const styles = getComputedStyle(document.documentElement);
    const color = (name) => styles.getPropertyValue(name).trim();
    ctx.font = "12px system-ui, sans-serif";
    const data = state.history.filter((r) => r.server).slice(-CHART_POINTS);
    if (!data.length) {
      ctx.fillStyle = color("--muted");
      ctx.fillText("Classify an image to start the chart.", 12, cssH / 2);
      return;
    }
    const series = data.map((r) => {
      const a = r.server.architecture, lat = r.server.latency_ms;
      return { est: a.estimated_latency_ms, measured: (lat.controller ?? 0) + (lat.backbone ?? 0),
        base: a.estimated_latency_ms / a.relative_to_baseline, seq: r.seq, point: r.point };
    });
    const left = 48, right = 12, top = 28, bottom = 28;
    const w = cssW - left - right, h = cssH - top - bottom;
    // A cold or queued request can take many times the rest: the axis follows the estimates and
    // typical measurements, and a measurement beyond it is drawn at the top, with its value.
    const sorted = series.map((s) => s.measured).sort((a, b) => a - b);
    const typical = sorted[Math.floor(sorted.length / 2)];
    const maxV = Math.max(...series.flatMap((s) => [s.est, s.base]), Math.min(sorted[sorted.length - 1], 3 * typical)) * 1.1 || 1;
    const step = niceStep(maxV, 4), yMax = Math.ceil(maxV / step) * step;
    const y = (v) => top + h - (Math.min(v, yMax) / yMax) * h;
    const slot = w / CHART_POINTS, x = (i) => left + (i + 0.5) * slot;
    // axes and grid lines
    ctx.strokeStyle = color("--rule");
    ctx.fillStyle = color("--muted");
    ctx.lineWidth = 1;
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    for (let v = 0; v <= yMax + 1e-9; v += step) {
      ctx.beginPath();
      ctx.moveTo(left, Math.round(y(v)) + 0.5);
      ctx.lineTo(left + w, Math.round(y(v)) + 0.5);
      ctx.stroke();
      ctx.fillText(v.toFixed(step < 0.1 ? 2 : step < 1 ? 1 : 0), left - 6, y(v));
    }
    ctx.save();
    ctx.translate(12, top + h / 2);
    ctx.rotate(-Math.PI / 2);
    ctx.textAlign = "center";
    ctx.fillText("ms per image", 0, 0);
    ctx.restore();
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    series.forEach((s, i) => {
      if (series.length <= 12 || i % Math.ceil(series.length / 12) === 0) ctx.fillText(`#${s.seq}`, x(i), top + h + 6);
    });
    // estimated latency: bars
    ctx.fillStyle = color("--accent");
    series.forEach((s, i) => {
      const bw = Math.max(2, slot * 0.6);
      ctx.fillRect(x(i) - bw / 2, y(s.est), bw, top + h - y(s.est));
    });
    // MobileNetV2 in the same space: dashed line
    ctx.strokeStyle = color("--base");
    ctx.setLineDash([5, 4]);
    ctx.beginPath();
    series.forEach((s, i) => (i ? ctx.lineTo(x(i) + slot / 2, y(s.base)) : ctx.moveTo(x(i) - slot / 2, y(s.base))));
    ctx.stroke();
    ctx.setLineDash([]);
    // measured controller + backbone: line with dots
    ctx.strokeStyle = color("--measured");
    ctx.fillStyle = color("--measured");
    ctx.lineWidth = 2;
    ctx.beginPath();
    series.forEach((s, i) => (i ? ctx.lineTo(x(i), y(s.measured)) : ctx.moveTo(x(i), y(s.measured))));
    ctx.stroke();
    series.forEach((s, i) => {
      ctx.beginPath();
      if (s.measured > yMax) {  // off the axis: a triangle pointing up, and the value
        ctx.moveTo(x(i), top - 6);
        ctx.lineTo(x(i) - 5, top + 3);
        ctx.lineTo(x(i) + 5, top + 3);
        ctx.closePath();
        ctx.fill();
        ctx.textAlign = "left";
        ctx.textBaseline = "middle";
        ctx.fillText(`${fmt(s.measured, 1)} ms`, x(i) + 7, top);
      } else {
        ctx.arc(x(i), y(s.measured), 3, 0, 2 * Math.PI);
        ctx.fill();
      }
    });
    // legend
    const items = [["--accent", "estimated (architecture)", "bar"], ["--measured", "measured (controller + backbone)", "line"],
      ["--base", "MobileNetV2, estimated", "dash"]];
    ctx.textAlign = "left";
    ctx.textBaseline = "middle";
    let lx = left;
    for (const [name, text, kind] of items) {
      ctx.fillStyle = ctx.strokeStyle = color(name);
      if (kind === "bar") ctx.fillRect(lx, 8, 12, 10);
      else {
        ctx.lineWidth = 2;
        ctx.setLineDash(kind === "dash" ? [5, 4] : []);
        ctx.beginPath();
        ctx.moveTo(lx, 13);
        ctx.lineTo(lx + 16, 13);
        ctx.stroke();
        ctx.setLineDash([]);
      }
      ctx.fillStyle = color("--ink");
      ctx.fillText(text, lx + 20, 13);
      lx += 30 + ctx.measureText(text).width;
    }
  }

  /* ---------- the gallery ---------- */

  async function loadGallery() {
    const point = state.point;
    $("gallery-info").textContent = "classifying the gallery…";
    try {
      if (!state.galleries.has(point)) {
        const query = point ? `?operating_point=${encodeURIComponent(point)}` : "";
        state.galleries.set(point, await getJSON(`/demo/gallery${query}`));
      }
    } catch (error) {
      $("gallery-info").textContent = `gallery unavailable: ${error.message}`;
      return;
    }
    if (point !== state.point) return;  // another point was chosen meanwhile
    renderGallery(state.galleries.get(point));
  }

  function renderGallery(g) {
    const acc = g.accuracy === null ? "" : `, ${pct(g.accuracy)} correct`;
    $("gallery-info").textContent = `${g.images} images, ${g.architectures} architecture${g.architectures === 1 ? "" : "s"}${acc}` +
      `${g.operating_point ? ` (operating point ${g.operating_point})` : ""}; heaviest first. Click an image to classify it.`;
    $("gallery").replaceChildren(...g.groups.map((group) => {
      const executed = state.space.cells.map((_, c) => Array.from({ length: state.modules }, (_, m) => group.cells[c].includes(m)));
      return el("div", { class: "row", "data-code": group.code },
        el("div", { class: "row-arch" },
          el("code", { text: group.code }),
          group.network ? el("span", { class: "muted", text: ` ${group.resolution}×${group.resolution} ${group.network}` +
            (group.stages > 1 ? ` (after ${group.stages - 1} stage${group.stages > 2 ? "s" : ""})` : "") }) : null,
          gridElement(executed, { mini: true }),
          el("div", { class: "muted", text: `${group.images.length} image${group.images.length === 1 ? "" : "s"} · ` +
            `${fmt(group.mflops, 1)} MFLOPs · ${fmt(group.estimated_latency_ms, 3)} ms · ${fmt(group.relative_to_baseline, 2)}× MobileNetV2 · ` +
            `${group.modules_executed} modules` })),
        el("div", { class: "row-images" }, group.images.map((image) => {
          const ok = image.label === null ? "" : image.label === image.prediction ? " ok" : " bad";
          return el("button", {
            class: `thumb${ok}`, type: "button",
            title: `${image.name}: ${image.prediction} (${pct(image.probability)})${image.label ? `, is ${image.label}` : ""}`,
            onclick: () => pickUrl(image.url, image.name),
          }, el("img", { src: image.url, alt: image.name }), el("span", { text: image.prediction }));
        })));
    }));
  }

  /* ---------- input: drop, pick, samples ---------- */

  async function pickUrl(url, name) {
    try {
      const response = await fetch(url);
      if (!response.ok) throw new Error(`HTTP ${response.status}`);
      await enqueue(await response.blob(), name);
    } catch (error) {
      setStatus(`${name}: ${error.message}`, "error");
    }
  }

  function wireInput() {
    const drop = $("drop"), file = $("file");
    file.addEventListener("change", () => {
      for (const f of file.files) enqueue(f, f.name);
      file.value = "";
    });
    drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); file.click(); } });
    drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
    drop.addEventListener("dragleave", () => drop.classList.remove("over"));
    drop.addEventListener("drop", (e) => {
      e.preventDefault();
      drop.classList.remove("over");
      const files = [...(e.dataTransfer?.files || [])].filter((f) => f.type.startsWith("image/") || !f.type);
      if (!files.length) setStatus("Drop an image file.", "warn");
      for (const f of files) enqueue(f, f.name);
    });
  }

  async function loadSamples() {
    const { samples } = await getJSON("/demo/samples");
    $("samples").replaceChildren(...samples.map((s) => el("button", {
      class: "sample", type: "button", title: s.name, onclick: () => pickUrl(s.url, s.name),
    }, el("img", { src: s.url, alt: s.label || s.name }))));
  }

  /* ---------- start ---------- */

  /** The manifest, asking for the API token as long as the server refuses the request without it. */
  async function loadManifest() {
    for (;;) {
      try {
        return await getJSON("/model");
      } catch (error) {
        if (!(error instanceof TokenNeeded)) throw error;
        const refused = sessionStorage.getItem(TOKEN_KEY) !== null;
        sessionStorage.removeItem(TOKEN_KEY);
        await askToken(refused);
      }
    }
  }

  async function init() {
    try {
      wireInput();
      state.manifest = await loadManifest();
      state.space = state.manifest.search_space;
      state.modules = A.numModules(state.space);
      state.point = pointsOf().length ? state.manifest.default_controller : null;
      renderModel();
      drawChart();
      window.addEventListener("resize", drawChart);
      await loadSamples();
      if (controllerOf(state.point)) {
        try {
          await controllerSession(state.point);
        } catch (error) {
          demo.ortError = String(error.message || error);
          setStatus(`The browser's controller is unavailable (${demo.ortError}); the server still answers.`, "warn");
        }
      }
      demo.ready = true;
      await loadGallery();
    } catch (error) {
      demo.error = String(error.message || error);
      setStatus(`The demo could not start: ${demo.error}`, "error");
    }
  }

  init();
})();
