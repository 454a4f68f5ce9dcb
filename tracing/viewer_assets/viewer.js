"use strict";
// The trace viewer's page logic: list, filters, step slider, grids with diff overlays, charts.
// Records are parsed from their <script type="application/json"> chunk only when shown.
(function () {
  const PALETTE = ["#000000", "#0074D9", "#FF4136", "#2ECC40", "#FFDC00",
    "#AAAAAA", "#F012BE", "#FF851B", "#7FDBFF", "#870C25"];
  const $ = (id) => document.getElementById(id);
  const CACHE_SIZE = 48;

  function showError(message) {
    const box = $("error");
    box.hidden = false;
    box.textContent = message;
  }

  const INDEX = JSON.parse($("trace-index").textContent);
  const H = INDEX.halt_max_steps;
  const ITEMS = INDEX.items;
  const PERTURB = new Map((INDEX.perturbations || []).map((p) => [p.tag, p]));
  const cache = new Map();
  const state = { visible: [], item: null, variant: "clean", step: 1, overlay: "prev", sub: null };

  // ---- grids -------------------------------------------------------------------------------
  function parseGrid(text) {
    if (text === "") return { h: 0, w: 0, cells: new Uint8Array(0), text: "" };
    const rows = text.split("|");
    const h = rows.length, w = rows[0].length;
    const cells = new Uint8Array(h * w);
    for (let r = 0; r < h; r++) {
      const row = rows[r];
      for (let c = 0; c < w; c++) cells[r * w + c] = row.charCodeAt(c) - 48;
    }
    return { h, w, cells, text };
  }

  function gridText(g) {
    const rows = [];
    for (let r = 0; r < g.h; r++) rows.push(Array.from(g.cells.subarray(r * g.w, (r + 1) * g.w)).join(""));
    return rows.join("|");
  }

  function applyDiff(base, changes) {
    const cells = base.cells.slice();
    for (let i = 0; i < changes.length; i += 2) cells[changes[i]] = changes[i + 1];
    const g = { h: base.h, w: base.w, cells, text: null };
    g.text = gridText(g);
    return g;
  }

  function loadRecord(id) {
    if (cache.has(id)) {
      const hit = cache.get(id);
      cache.delete(id);
      cache.set(id, hit);
      return hit;
    }
    const el = $("rec-" + id);
    if (!el) throw new Error("record " + id + " is missing from the page");
    const raw = JSON.parse(el.textContent);
    const grids = [];
    for (const e of raw.g) grids.push(typeof e === "string" ? parseGrid(e) : applyDiff(grids[e[0]], e[1]));
    const G = (i) => (i === null || i === undefined ? null : grids[i]);
    const rec = {
      id,
      demos: raw.demos.map(([a, b]) => [G(a), G(b)]),
      input: G(raw.input),
      target: G(raw.target),
      perturbation: raw.perturbation,
      s: raw.s,
      pred: raw.s.pred.map(G),
      hc: raw.hc.map((cycles) => cycles.map(([p, probes]) => ({ pred: G(p), probes: probes.map(G) }))),
    };
    cache.set(id, rec);
    if (cache.size > CACHE_SIZE) cache.delete(cache.keys().next().value);
    return rec;
  }

  function diffMask(a, b) {
    if (!a || !b) return null;
    if (a.h !== b.h || a.w !== b.w) return "shape";
    const mask = new Uint8Array(a.cells.length);
    let n = 0;
    for (let i = 0; i < mask.length; i++) if (a.cells[i] !== b.cells[i]) { mask[i] = 1; n++; }
    mask.count = n;
    return mask;
  }

  function drawGrid(canvas, g, maxPx, mask) {
    const h = g ? g.h : 0, w = g ? g.w : 0;
    canvas.dataset.grid = g ? g.text : "";
    canvas.dataset.diffCells = mask && mask !== "shape" ? String(mask.count) : (mask === "shape" ? "shape" : "0");
    if (!g || h === 0) {
      canvas.width = 24; canvas.height = 24;
      const ctx = canvas.getContext("2d");
      ctx.fillStyle = "#ddd"; ctx.fillRect(0, 0, 24, 24);
      ctx.fillStyle = "#888"; ctx.font = "10px sans-serif"; ctx.fillText("∅", 8, 16);
      return;
    }
    const cell = Math.max(2, Math.min(22, Math.floor(maxPx / Math.max(h, w))));
    const gap = cell >= 6 ? 1 : 0;
    canvas.width = w * cell + gap; canvas.height = h * cell + gap;
    const ctx = canvas.getContext("2d");
    ctx.fillStyle = "#555"; ctx.fillRect(0, 0, canvas.width, canvas.height);
    for (let r = 0; r < h; r++) {
      for (let c = 0; c < w; c++) {
        ctx.fillStyle = PALETTE[g.cells[r * w + c]];
        ctx.fillRect(c * cell + gap, r * cell + gap, cell - gap, cell - gap);
      }
    }
    if (mask === "shape") {
      ctx.strokeStyle = "#ff00ff"; ctx.lineWidth = 3;
      ctx.strokeRect(1.5, 1.5, canvas.width - 3, canvas.height - 3);
    } else if (mask) {
      ctx.lineWidth = Math.max(1, Math.floor(cell / 6));
      for (let i = 0; i < mask.length; i++) {
        if (!mask[i]) continue;
        const x = (i % w) * cell + gap, y = Math.floor(i / w) * cell + gap, s = cell - gap;
        ctx.strokeStyle = "#ffffff";
        ctx.strokeRect(x + ctx.lineWidth / 2, y + ctx.lineWidth / 2, s - ctx.lineWidth, s - ctx.lineWidth);
        ctx.beginPath(); ctx.moveTo(x, y + s); ctx.lineTo(x + s, y);
        ctx.strokeStyle = "rgba(255,255,255,0.8)"; ctx.stroke();
      }
    }
  }

  function gridCanvas(g, maxPx, testid) {
    const c = document.createElement("canvas");
    if (testid) c.dataset.testid = testid;
    drawGrid(c, g, maxPx, null);
    return c;
  }

  // ---- the list and its filters ------------------------------------------------------------
  function stepOptions(select) {
    const opts = [["any", "any"], ["never", "never"]];
    for (let t = 1; t <= H; t++) opts.push([String(t), "step " + t]);
    for (const [v, label] of opts) {
      const o = document.createElement("option");
      o.value = v; o.textContent = label; select.appendChild(o);
    }
  }

  function status(item) {
    if (item.final_exact === null || item.final_exact === undefined) return "unknown";
    if (item.solved_then_lost) return "lost";
    return item.final_exact ? "solved" : "unsolved";
  }

  function stepMatches(value, want) {
    if (want === "any") return true;
    if (want === "never") return value === null || value === undefined;
    return value === Number(want);
  }

  function itemPasses(item) {
    const st = $("filter-status").value;
    if (st !== "all" && status(item) !== st) return false;
    if (!stepMatches(item.first_correct_step, $("filter-first-correct").value)) return false;
    if (!stepMatches(item.first_halt_step, $("filter-halt").value)) return false;
    const rec = $("filter-recovered").value;
    if (rec === "recovered" && item.recovered !== true) return false;
    if (rec === "not-recovered" && item.recovered !== false) return false;
    const q = $("filter-search").value.trim().toLowerCase();
    return !q || item.puzzle_id.toLowerCase().includes(q);
  }

  function itemLabel(item) {
    let s = item.puzzle_id;
    if (item.test_index) s += " #" + item.test_index;
    if (item.aug !== "identity") s += " " + item.aug;
    return s;
  }

  function renderList() {
    const list = $("puzzle-list");
    list.textContent = "";
    state.visible = [];
    const frag = document.createDocumentFragment();
    ITEMS.forEach((item, k) => {
      if (!itemPasses(item)) return;
      state.visible.push(k);
      const li = document.createElement("li");
      li.dataset.testid = "puzzle-item";
      li.dataset.item = String(k);
      li.className = status(item) + (k === state.item ? " selected" : "");
      const mark = document.createElement("span"); mark.className = "mark";
      const pid = document.createElement("span"); pid.className = "pid"; pid.textContent = itemLabel(item);
      const meta = document.createElement("span"); meta.className = "meta";
      meta.textContent = "✓" + (item.first_correct_step ?? "–") + " · halt " + (item.first_halt_step ?? "–");
      meta.title = "first correct step, first halt step";
      li.append(mark, pid, meta);
      li.addEventListener("click", () => selectItem(k));
      frag.appendChild(li);
    });
    list.appendChild(frag);
    const count = $("puzzle-count");
    const puzzles = new Set(ITEMS.map((it) => it.puzzle_id)).size;
    count.dataset.shown = String(state.visible.length);
    count.dataset.total = String(ITEMS.length);
    count.dataset.puzzles = String(puzzles);
    count.textContent = state.visible.length + " of " + ITEMS.length + " shown (" + puzzles + " puzzles)";
  }

  function moveItem(delta) {
    if (!state.visible.length) return;
    let pos = state.visible.indexOf(state.item);
    pos = pos < 0 ? 0 : Math.max(0, Math.min(state.visible.length - 1, pos + delta));
    selectItem(state.visible[pos]);
  }

  // ---- the main pane -----------------------------------------------------------------------
  function currentRecord() {
    const item = ITEMS[state.item];
    return loadRecord(item.variants[state.variant]);
  }

  function selectItem(k) {
    state.item = k;
    const item = ITEMS[k];
    if (!(state.variant in item.variants)) state.variant = Object.keys(item.variants)[0];
    state.sub = null;
    for (const li of $("puzzle-list").children) li.classList.toggle("selected", Number(li.dataset.item) === k);
    const sel = $("puzzle-list").querySelector("li.selected");
    if (sel) sel.scrollIntoView({ block: "nearest" });
    renderItem();
  }

  function badge(text, cls) {
    const b = document.createElement("span");
    b.className = "badge" + (cls ? " " + cls : "");
    b.textContent = text;
    return b;
  }

  function renderBadges(item) {
    // The shown variant's own summary; the list and its filters use the clean run's.
    const sum = item.summaries[state.variant];
    const badges = $("badges");
    badges.textContent = "";
    const st = status(sum);
    badges.append(
      badge({ solved: "solved", unsolved: "unsolved", lost: "solved then lost", unknown: "no target" }[st],
        { solved: "good", unsolved: "bad", lost: "warn" }[st]),
      badge("first correct: " + (sum.first_correct_step ?? "never")),
      badge("first halt: " + (sum.first_halt_step ?? "never")),
    );
    if (sum.recovered !== null && sum.recovered !== undefined) {
      badges.append(badge(sum.recovered ? "recovered from the clean run's miss" : "not recovered", sum.recovered ? "good" : ""));
    }
    badges.dataset.variant = state.variant;
  }

  function renderItem() {
    const item = ITEMS[state.item];
    const rec = currentRecord();
    $("puzzle-title").textContent = itemLabel(item);
    renderBadges(item);
    const vbox = $("variants");
    vbox.textContent = "";
    for (const tag of Object.keys(item.variants)) {
      const b = document.createElement("button");
      b.type = "button";
      b.dataset.testid = "variant-button";
      b.dataset.variant = tag;
      const p = PERTURB.get(tag);
      b.textContent = tag === "clean" ? "clean" : tag;
      if (p) b.title = "+" + p.sigma_rel + "·RMS noise on " + p.target + " at step " + p.step + " (seed " + p.seed + ")";
      b.className = tag === state.variant ? "active" : "";
      b.addEventListener("click", () => setVariant(tag));
      vbox.appendChild(b);
    }
    const demos = $("demos");
    demos.textContent = "";
    rec.demos.forEach(([a, b]) => {
      const pair = document.createElement("div");
      pair.className = "pair";
      const arrow = document.createElement("span"); arrow.className = "arrow"; arrow.textContent = "→";
      pair.append(gridCanvas(a, 110, "demo-input"), arrow, gridCanvas(b, 110, "demo-output"));
      demos.appendChild(pair);
    });
    if (!rec.demos.length) demos.textContent = "not recorded";
    drawGrid($("test-input"), rec.input, 200, null);
    drawGrid($("target-grid"), rec.target, 200, null);
    renderTicks(rec);
    renderStep();
  }

  function injectionStep(rec) {
    return rec.perturbation ? rec.perturbation.step : null;
  }

  function renderTicks(rec) {
    const ticks = $("slider-ticks");
    ticks.textContent = "";
    const inj = injectionStep(rec);
    for (let t = 1; t <= H; t++) {
      const s = document.createElement("span");
      s.style.left = (H === 1 ? 50 : ((t - 1) / (H - 1)) * 100) + "%";
      s.textContent = t === inj ? "▲" + t : (t === 1 || t === H || t % 4 === 0 ? String(t) : "·");
      if (t === inj) { s.className = "inject"; s.id = "inject-mark"; s.title = "noise injected at this step"; }
      ticks.appendChild(s);
    }
  }

  function fmt(x, digits) {
    if (x === null || x === undefined) return "–";
    if (typeof x === "boolean") return x ? "yes" : "no";
    return Number(x).toFixed(digits === undefined ? 4 : digits);
  }

  function shownGrid(rec) {
    const t = state.step;
    if (state.sub) {
      const cyc = rec.hc[t - 1][state.sub[0]];
      return state.sub[1] === null ? cyc.pred : cyc.probes[state.sub[1]];
    }
    return rec.pred[t - 1];
  }

  function previousGrid(rec) {
    // The sub-step before the shown one, or the previous ACT step's answer.
    const t = state.step;
    if (state.sub) {
      const [h, l] = state.sub;
      const cycles = rec.hc[t - 1];
      if (l !== null && l > 0) return cycles[h].probes[l - 1];
      if (l === null && cycles[h].probes.length) return cycles[h].probes[cycles[h].probes.length - 1];
      if (h > 0) return cycles[h - 1].pred;
    }
    return t > 1 ? rec.pred[t - 2] : null;
  }

  function subName() {
    if (!state.sub) return "answer";
    return "H" + (state.sub[0] + 1) + (state.sub[1] === null ? "" : " · L probe " + (state.sub[1] + 1));
  }

  function renderStep() {
    const rec = currentRecord();
    const t = state.step;
    $("step-slider").value = String(t);
    $("step-label").textContent = "step " + t + " / " + H;
    $("step-label").dataset.step = String(t);
    const g = shownGrid(rec);
    let ref = null, refName = "";
    if (state.overlay === "prev") { ref = previousGrid(rec); refName = state.sub ? "the previous sub-step" : "step " + (t - 1); }
    if (state.overlay === "target") { ref = rec.target; refName = "the target"; }
    const mask = diffMask(g, ref);
    drawGrid($("current-grid"), g, 300, mask);
    $("current-caption").textContent = (state.variant === "clean" ? "" : state.variant + ": ") + subName() + " at step " + t;
    let info = "";
    if (state.overlay !== "none") {
      if (!ref) info = "nothing to compare with";
      else if (mask === "shape") info = "shape differs from " + refName + " (" + ref.h + "×" + ref.w + ")";
      else info = mask.count + (mask.count === 1 ? " cell differs" : " cells differ") + " from " + refName + " (outlined)";
    }
    $("diff-info").textContent = info;
    const cleanBox = $("clean-box");
    const item = ITEMS[state.item];
    if (state.variant !== "clean" && "clean" in item.variants) {
      const clean = loadRecord(item.variants.clean);
      cleanBox.hidden = false;
      drawGrid($("clean-grid"), clean.pred[t - 1], 300, diffMask(clean.pred[t - 1], rec.pred[t - 1]));
      $("clean-caption").textContent = "clean at step " + t + " (outlined: differs from " + state.variant + ")";
    } else {
      cleanBox.hidden = true;
    }
    renderMetrics(rec, t);
    renderSubsteps(rec, t);
    renderCharts(rec);
  }

  function renderMetrics(rec, t) {
    const s = rec.s, i = t - 1;
    const rows = [
      ["q_halt", fmt(s.q_halt[i], 3)], ["q_continue", fmt(s.q_continue[i], 3)],
      ["halt_prob", fmt(s.halt_prob[i], 3)], ["would_halt", fmt(s.would_halt[i])],
      ["h_cos_dist", fmt(s.h_cos_dist[i])], ["l_cos_dist", fmt(s.l_cos_dist[i])],
      ["dz_rel_h", fmt(s.dz_rel_h[i])], ["dz_rel_l", fmt(s.dz_rel_l[i])],
      ["cells_changed", s.cells_changed[i] ?? "–"], ["token_acc", fmt(s.token_acc[i], 3)],
      ["exact", fmt(s.exact[i])],
    ];
    const table = $("step-metrics");
    table.textContent = "";
    for (const [k, v] of rows) {
      const tr = table.insertRow();
      tr.insertCell().textContent = k;
      tr.insertCell().textContent = String(v);
    }
  }

  function renderSubsteps(rec, t) {
    const body = $("substeps-body");
    body.textContent = "";
    $("substeps-summary").textContent = "H-cycles and L probes of step " + t;
    const cycles = rec.hc[t - 1];
    if (!cycles.length) { body.textContent = "not recorded"; return; }
    cycles.forEach((cyc, h) => {
      const row = document.createElement("div");
      row.className = "hrow";
      const label = document.createElement("span"); label.className = "hlabel"; label.textContent = "H" + (h + 1);
      row.appendChild(label);
      cyc.probes.forEach((p, l) => row.appendChild(subCell(p, "L" + (l + 1), [h, l])));
      row.appendChild(subCell(cyc.pred, "H" + (h + 1), [h, null]));
      body.appendChild(row);
    });
  }

  function subCell(g, caption, key) {
    const box = document.createElement("div");
    box.className = "sub";
    box.dataset.testid = "substep";
    box.dataset.sub = key[0] + ":" + (key[1] === null ? "H" : key[1]);
    if (state.sub && state.sub[0] === key[0] && state.sub[1] === key[1]) box.classList.add("active");
    box.appendChild(gridCanvas(g, 70));
    const cap = document.createElement("div"); cap.className = "cap"; cap.textContent = caption;
    box.appendChild(cap);
    box.addEventListener("click", () => {
      const same = state.sub && state.sub[0] === key[0] && state.sub[1] === key[1];
      state.sub = same ? null : key;
      renderStep();
    });
    return box;
  }

  // ---- charts ------------------------------------------------------------------------------
  const SVGNS = "http://www.w3.org/2000/svg";
  function svgEl(tag, attrs) {
    const e = document.createElementNS(SVGNS, tag);
    for (const k in attrs) e.setAttribute(k, attrs[k]);
    return e;
  }

  function chart(svg, series, opts) {
    const W = 300, Hh = 110, padL = 34, padR = 8, padT = 8, padB = 16;
    svg.setAttribute("viewBox", "0 0 " + W + " " + Hh);
    svg.textContent = "";
    let lo = opts.lo, hi = opts.hi;
    for (const s of series) for (const v of s.values) {
      if (v === null || v === undefined) continue;
      lo = lo === undefined ? v : Math.min(lo, v);
      hi = hi === undefined ? v : Math.max(hi, v);
    }
    if (lo === undefined) { lo = 0; hi = 1; }
    if (opts.zero) { lo = Math.min(lo, 0); hi = Math.max(hi, 0); }
    if (hi - lo < 1e-9) { hi = lo + 1; }
    const x = (t) => padL + (H === 1 ? 0.5 : (t - 1) / (H - 1)) * (W - padL - padR);
    const y = (v) => padT + (1 - (v - lo) / (hi - lo)) * (Hh - padT - padB);
    svg.appendChild(svgEl("line", { class: "axis", x1: padL, y1: Hh - padB, x2: W - padR, y2: Hh - padB }));
    svg.appendChild(svgEl("line", { class: "axis", x1: padL, y1: padT, x2: padL, y2: Hh - padB }));
    for (const [v, yy] of [[hi, padT + 7], [lo, Hh - padB]]) {
      const tx = svgEl("text", { x: 2, y: yy }); tx.textContent = Number(v.toPrecision(3)).toString(); svg.appendChild(tx);
    }
    for (const t of [1, H]) {
      const tx = svgEl("text", { x: x(t) - 3, y: Hh - 4 }); tx.textContent = String(t); svg.appendChild(tx);
    }
    if (opts.zero) svg.appendChild(svgEl("line", { class: "zero", x1: padL, y1: y(0), x2: W - padR, y2: y(0) }));
    if (opts.inject) svg.appendChild(svgEl("line", { class: "inject", x1: x(opts.inject), y1: padT, x2: x(opts.inject), y2: Hh - padB }));
    for (const s of series) {
      let d = "", pen = false;
      s.values.forEach((v, i) => {
        if (v === null || v === undefined) { pen = false; return; }
        d += (pen ? "L" : "M") + x(i + 1).toFixed(1) + " " + y(v).toFixed(1);
        pen = true;
      });
      const attrs = { class: s.ghost ? "ghost" : "line", d: d || "M0 0" };
      if (!s.ghost) attrs.stroke = s.color;
      if (s.dash) attrs["stroke-dasharray"] = s.dash;
      svg.appendChild(svgEl("path", attrs));
      s.values.forEach((v, i) => {
        if (v === null || v === undefined || s.ghost) return;
        svg.appendChild(svgEl("circle", { cx: x(i + 1), cy: y(v), r: 1.8, fill: s.color }));
      });
    }
    svg.appendChild(svgEl("line", { class: "cursor", x1: x(state.step), y1: padT, x2: x(state.step), y2: Hh - padB }));
    svg.onclick = (ev) => {
      const r = svg.getBoundingClientRect();
      const px = ((ev.clientX - r.left) / r.width) * W;
      const t = Math.round(((px - padL) / (W - padL - padR)) * (H - 1)) + 1;
      setStep(t);
    };
  }

  function renderCharts(rec) {
    const item = ITEMS[state.item];
    const clean = state.variant !== "clean" && "clean" in item.variants ? loadRecord(item.variants.clean) : null;
    const inject = injectionStep(rec);
    const ghost = (key) => (clean ? [{ values: clean.s[key], ghost: true }] : []);
    chart($("chart-hcos"), ghost("h_cos_dist").concat([
      { values: rec.s.h_cos_dist, color: "#0074D9" },
      { values: rec.s.l_cos_dist, color: "#F012BE", dash: "2 2" },
    ]), { inject, lo: 0 });
    chart($("chart-halt"), ghost("q_halt").concat([{ values: rec.s.q_halt, color: "#FF851B" }]), { zero: true, inject });
    chart($("chart-acc"), ghost("token_acc").concat([{ values: rec.s.token_acc, color: "#2ECC40" }]), { lo: 0, hi: 1, inject });
  }

  // ---- state changes -----------------------------------------------------------------------
  function setStep(t) {
    t = Math.max(1, Math.min(H, t));
    if (t === state.step && !state.sub) return;
    state.step = t;
    state.sub = null;
    renderStep();
  }

  function setVariant(tag) {
    const item = ITEMS[state.item];
    if (!(tag in item.variants)) return;
    state.variant = tag;
    state.sub = null;
    for (const b of $("variants").children) b.classList.toggle("active", b.dataset.variant === tag);
    renderBadges(item);
    renderTicks(currentRecord());
    renderStep();
  }

  function cycleVariant() {
    const tags = Object.keys(ITEMS[state.item].variants);
    setVariant(tags[(tags.indexOf(state.variant) + 1) % tags.length]);
  }

  function renderRun() {
    const run = INDEX.run || {};
    const info = $("run-info");
    info.textContent = "";
    for (const k of ["checkpoint", "arch", "conditioner", "config_hash", "created"]) {
      const div = document.createElement("div");
      const code = document.createElement("code");
      code.textContent = run[k] === undefined ? "–" : String(run[k]);
      div.append(k + ": ", code);
      info.appendChild(div);
    }
    const cyc = document.createElement("div");
    cyc.textContent = "halt_max_steps " + H + ", H_cycles " + INDEX.H_cycles + ", L_cycles " + INDEX.L_cycles;
    info.appendChild(cyc);
    const ps = INDEX.per_step;
    const box = $("per-step");
    box.textContent = "";
    if (!ps || !ps.steps) return;
    const table = document.createElement("table");
    table.className = "results";
    const head = table.insertRow();
    head.insertCell().textContent = "answer taken at step";
    for (const t of ps.steps) head.insertCell().textContent = String(t);
    head.insertCell().textContent = "first halt";
    for (const key of ["exact_by_step", "pass@1_by_step", "pass@2_by_step"]) {
      if (!ps[key]) continue;
      const tr = table.insertRow();
      tr.insertCell().textContent = key.replace("_by_step", "");
      for (const v of ps[key]) tr.insertCell().textContent = fmt(v, 3);
      const fh = ps.first_halt ? ps.first_halt[key.replace("_by_step", "")] : null;
      tr.insertCell().textContent = fmt(fh, 3);
    }
    box.appendChild(table);
    const pert = ps.perturbations || {};
    for (const tag of Object.keys(pert)) {
      const p = pert[tag];
      const div = document.createElement("div");
      div.textContent = tag + ": changed " + fmt(p.changed, 3) + ", recovered " + fmt(p.recovered, 3) + ", lost " + fmt(p.lost, 3);
      box.appendChild(div);
    }
  }

  function onKey(ev) {
    const tag = ev.target && ev.target.tagName;
    if (tag === "SELECT" || (tag === "INPUT" && ev.target.type !== "range")) return;
    if (ev.altKey || ev.ctrlKey || ev.metaKey || state.item === null) return;
    // The slider moves itself on arrow keys; handling them again would move two steps.
    const onSlider = ev.target === $("step-slider");
    const actions = {
      ArrowLeft: () => setStep(state.step - 1), ArrowRight: () => setStep(state.step + 1),
      ArrowUp: () => moveItem(-1), ArrowDown: () => moveItem(1),
      Home: () => setStep(1), End: () => setStep(H),
      j: () => moveItem(1), k: () => moveItem(-1),
      p: cycleVariant,
      d: () => {
        const order = ["prev", "target", "none"];
        state.overlay = order[(order.indexOf(state.overlay) + 1) % order.length];
        $("overlay-select").value = state.overlay;
        renderStep();
      },
      s: () => { $("substeps").open = !$("substeps").open; },
    };
    const act = actions[ev.key];
    if (!act || (onSlider && ["ArrowLeft", "ArrowRight", "ArrowUp", "ArrowDown", "Home", "End"].includes(ev.key))) return;
    ev.preventDefault();
    act();
  }

  function init() {
    $("trace-title").textContent = INDEX.folder + " · " + (INDEX.run && INDEX.run.arch ? INDEX.run.arch : "");
    const slider = $("step-slider");
    slider.max = String(H);
    slider.addEventListener("input", () => setStep(Number(slider.value)));
    $("step-prev").addEventListener("click", () => setStep(state.step - 1));
    $("step-next").addEventListener("click", () => setStep(state.step + 1));
    $("overlay-select").addEventListener("change", (e) => { state.overlay = e.target.value; renderStep(); });
    stepOptions($("filter-first-correct"));
    stepOptions($("filter-halt"));
    for (const id of ["filter-status", "filter-first-correct", "filter-halt", "filter-recovered"]) {
      $(id).addEventListener("change", onFilter);
    }
    $("filter-search").addEventListener("input", onFilter);
    document.addEventListener("keydown", onKey);
    renderRun();
    renderList();
    if (state.visible.length) selectItem(state.visible[0]);
    else $("puzzle-title").textContent = ITEMS.length ? "no puzzle matches the filters" : "the trace is empty";
  }

  function onFilter() {
    renderList();
    if (state.visible.length && !state.visible.includes(state.item)) selectItem(state.visible[0]);
  }

  try {
    init();
    document.documentElement.dataset.ready = "1";
    window.viewerReadyMs = performance.now();
  } catch (err) {
    showError("The viewer failed: " + err.message);
    throw err;
  }
})();
