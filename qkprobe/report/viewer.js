/* qkprobe per-mode viewer: renders every .qkv root from the JSON block named by its data-source.
   Payload: see qkprobe/report/viewer.py. Items are "grid" (image: prefix tokens + gh x gw patches)
   or "seq" (text: one string per token). Numbers shown are also left in data-value attributes. */
(function () {
  "use strict";
  var PANEL_PX = 240;

  function bytes(b64) {
    var s = atob(b64), u = new Uint8Array(s.length);
    for (var i = 0; i < s.length; i++) u[i] = s.charCodeAt(i);
    return u;
  }
  function int16Matrix(b64, scale) {          // (rows, cols) row-major, value = int16 * scale[col]
    var u = bytes(b64), dv = new DataView(u.buffer), cols = scale.length, n = u.length / 2;
    var out = new Float64Array(n);
    for (var i = 0; i < n; i++) out[i] = dv.getInt16(2 * i, true) * scale[i % cols];
    return out;
  }
  function probRows(b64, peaksB64, nk) {      // P_ij = byte / 255 * rowmax_i
    var u = bytes(b64), m = bytes(peaksB64), dv = new DataView(m.buffer), out = new Float64Array(u.length);
    for (var i = 0; i < u.length; i++) out[i] = u[i] / 255 * dv.getFloat32(4 * Math.floor(i / nk), true);
    return out;
  }
  function el(tag, cls, text) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  }
  function fmt(v) { return v === null || v === undefined || !isFinite(v) ? "–" : Number(v).toPrecision(4); }
  /* colours over the range [lo, hi] of the shown values: "range" centres on the middle of the range
     (red high, blue low: softmax ignores a constant over keys), "prob" runs from 0 (clear) to hi */
  function rangeColor(v, lo, hi) {
    var half = (hi - lo) / 2, t = half > 0 ? Math.max(-1, Math.min(1, (v - lo - half) / half)) : 0;
    return t >= 0 ? "rgba(214,39,40," + (0.8 * t).toFixed(3) + ")" : "rgba(31,90,220," + (-0.8 * t).toFixed(3) + ")";
  }
  function probColor(v, lo, hi) {
    var t = hi > 0 ? Math.max(0, Math.min(1, v / hi)) : 0;
    return "rgba(0,150,70," + (0.85 * t).toFixed(3) + ")";
  }

  /* token layout of one item: {root, cells[token] -> element} */
  function tokenView(item) {
    var root = el("div", "qkv-tokens"), cells = [], prefix = item.prefix || 0, i, c;
    if (item.kind === "seq") {
      root.classList.add("qkv-seq");
      for (i = 0; i < item.tokens.length; i++) {
        c = el("span", "qkv-tok", item.tokens[i]);
        c.dataset.token = i;
        if (i < prefix) c.classList.add("qkv-prefix-tok");
        root.appendChild(c); cells.push(c);
      }
      return {root: root, cells: cells};
    }
    var pre = el("div", "qkv-prefix");
    for (i = 0; i < prefix; i++) {
      c = el("span", "qkv-tok", i === 0 ? "cls" : "prefix " + i);
      c.dataset.token = i; pre.appendChild(c); cells.push(c);
    }
    var box = el("div", "qkv-img"), h = Math.round(PANEL_PX * item.gh / item.gw);
    box.style.width = PANEL_PX + "px"; box.style.height = h + "px";
    picture(box, item);
    var grid = el("div", "qkv-cells");
    grid.style.gridTemplateColumns = "repeat(" + item.gw + ", 1fr)";
    grid.style.gridTemplateRows = "repeat(" + item.gh + ", 1fr)";
    for (i = 0; i < item.gh * item.gw; i++) {
      c = el("div", "qkv-tok"); c.dataset.token = prefix + i;
      c.title = "patch row " + Math.floor(i / item.gw) + ", col " + (i % item.gw);
      grid.appendChild(c); cells.push(c);
    }
    box.appendChild(grid); root.appendChild(pre); root.appendChild(box);
    return {root: root, cells: cells};
  }
  /* images are CSS backgrounds, not <img> elements: the report's own checks count its figures */
  function picture(node, item) {
    node.style.backgroundImage = 'url("' + item.src + '")';
    node.setAttribute("role", "img");
    node.setAttribute("aria-label", item.name);
    return node;
  }
  function tokenName(item, t) {
    if (item.kind === "seq") return "token " + t + " “" + item.tokens[t] + "”";
    if (t < item.prefix) return t === 0 ? "token 0 (cls)" : "token " + t + " (prefix)";
    var p = t - item.prefix;
    return "token " + t + " (patch row " + Math.floor(p / item.gw) + ", col " + (p % item.gw) + ")";
  }
  function paint(view, values, color) {
    var lo = Infinity, hi = -Infinity, i;
    for (i = 0; i < values.length; i++) { lo = Math.min(lo, values[i]); hi = Math.max(hi, values[i]); }
    for (i = 0; i < view.cells.length; i++) {
      var v = values[i];
      view.cells[i].style.background = color(v, lo, hi);
      view.cells[i].dataset.value = String(v);
    }
    view.legend.textContent = (color === probColor ? "0 (clear) … " + fmt(hi) + " (green)" :
                               fmt(lo) + " (blue) … " + fmt(hi) + " (red)");
    view.legend.dataset.min = String(lo); view.legend.dataset.max = String(hi);
  }

  function Viewer(root, data) {
    this.root = root; this.data = data; this.cache = {};
    this.state = {head: 0, mode: 0, item: null, query: null, key: null, keyPinned: false};
    this.build();
    this.selectHead(0);
  }
  Viewer.prototype.build = function () {
    var self = this, root = this.root;
    var controls = el("div", "qkv-controls");
    var hl = el("label", null, "head "), ml = el("label", null, "mode ");
    this.headSel = el("select"); this.headSel.dataset.role = "head";
    this.data.heads.forEach(function (h, i) {
      var o = el("option", null, "L" + h.layer + " H" + h.head + " — " + h.name);
      o.value = i; self.headSel.appendChild(o);
    });
    this.modeSel = el("select"); this.modeSel.dataset.role = "mode";
    hl.appendChild(this.headSel); ml.appendChild(this.modeSel);
    controls.appendChild(hl); controls.appendChild(ml);
    this.modeInfo = el("span", "muted"); controls.appendChild(this.modeInfo);
    this.headSel.addEventListener("change", function () { self.selectHead(+self.headSel.value); });
    this.modeSel.addEventListener("change", function () { self.selectMode(+self.modeSel.value); });
    this.tops = el("div", "qkv-tops");
    this.panels = el("div", "qkv-panels");
    this.readout = el("div", "qkv-readout");
    this.readout.innerHTML =
      '<div>query <span data-field="query"></span>: a_i = <span data-field="a"></span>, ' +
      's_r = <span data-field="s"></span>, scale = <span data-field="scale"></span>; largest s_r·a_i·b_j at ' +
      '<span data-field="argmax-contrib"></span>, largest P_ij at <span data-field="argmax-attn"></span></div>' +
      '<div>key <span data-field="key"></span>: b_j = <span data-field="b"></span>, s_r·a_i·b_j = ' +
      '<span data-field="contrib"></span>, P_ij = <span data-field="attn"></span></div>';
    root.innerHTML = "";
    [controls, this.tops, this.panels, this.readout].forEach(function (e) { root.appendChild(e); });
  };
  Viewer.prototype.head = function () { return this.data.heads[this.state.head]; };
  Viewer.prototype.tokens = function () {   // decoded arrays of the current (head, item)
    var key = this.state.head + ":" + this.state.item;
    if (!this.cache[key]) {
      var t = this.head().tokens[String(this.state.item)];
      this.cache[key] = {n: t.n, nk: t.nk, m: t.a_scale.length, a: int16Matrix(t.a, t.a_scale),
                         b: int16Matrix(t.b, t.b_scale), p: t.p ? probRows(t.p, t.p_max, t.nk) : null};
    }
    return this.cache[key];
  };
  Viewer.prototype.selectHead = function (hi) {
    var self = this, h = this.data.heads[hi];
    this.state.head = hi; this.headSel.value = hi;
    this.modeSel.innerHTML = "";
    h.modes.forEach(function (m, i) {
      var o = el("option", null, "M" + m.mode + "  s=" + fmt(m.s) + "  cos=" + fmt(m.cosine) +
                 (m.share === null ? "" : "  share=" + fmt(m.share)));
      o.value = i; self.modeSel.appendChild(o);
    });
    this.modeInfo.textContent = "modes ranked by " + h.ranked_by;
    this.state.item = null;
    this.selectMode(0);
  };
  Viewer.prototype.selectMode = function (mi) {
    var h = this.head(), tops = h.top[mi];
    this.state.mode = mi; this.modeSel.value = mi;
    if (this.state.item === null || !h.tokens[String(this.state.item)])
      this.state.item = tops[0].length ? tops[0][0] : tops[1].length ? tops[1][0] : +Object.keys(h.tokens)[0];
    this.renderTops();
    this.selectItem(this.state.item);
  };
  Viewer.prototype.renderTops = function () {
    var self = this, h = this.head(), mi = this.state.mode, noun = this.data.noun || "images";
    this.tops.innerHTML = "";
    [0, 1].forEach(function (sign) {
      var row = el("div", "qkv-toprow");
      row.dataset.sign = sign;
      row.appendChild(el("span", null, sign === 0 ? "top " + noun + ", sign + (max a·max b)" :
                                                    "top " + noun + ", sign − (min a·min b)"));
      h.top[mi][sign].forEach(function (k, r) {
        var item = self.data.items[k], b = el("button", "qkv-thumb");
        b.type = "button"; b.dataset.item = k; b.title = item.id + (item.label ? " [" + item.label + "]" : "");
        if (item.kind === "seq") b.appendChild(el("span", "qkv-snip", item.text || item.tokens.join(" ")));
        else b.appendChild(picture(el("span", "qkv-thumbimg"), item));
        b.appendChild(el("span", null, fmt(h.scores[mi][sign][r])));
        b.addEventListener("click", function () { self.selectItem(k); });
        row.appendChild(b);
      });
      self.tops.appendChild(row);
    });
  };
  Viewer.prototype.selectItem = function (k) {
    var self = this, item = this.data.items[k];
    this.state.item = k;
    this.tops.querySelectorAll(".qkv-thumb").forEach(function (b) {
      b.classList.toggle("qkv-current", +b.dataset.item === k);
    });
    this.panels.innerHTML = "";
    this.views = {};
    var m = this.head().modes[this.state.mode].mode;
    [["query", "query coordinate a_i of mode M" + m + " (hover a token)"],
     ["contrib", "s_r·a_i·b_j over keys j for the hovered query"],
     ["attn", "actual attention P_ij of the head"]].forEach(function (p) {
      var panel = el("div", "qkv-panel"), view = tokenView(item);
      panel.dataset.panel = p[0];
      panel.appendChild(el("div", "qkv-title", p[1]));
      panel.appendChild(view.root);
      view.legend = el("div", "qkv-legend");
      panel.appendChild(view.legend);
      view.root.addEventListener("mouseover", function (e) {
        var c = e.target.closest(".qkv-tok");
        if (!c) return;
        if (p[0] === "query") self.setQuery(+c.dataset.token);
        else { self.state.keyPinned = true; self.setKey(+c.dataset.token); }
      });
      self.views[p[0]] = view; self.panels.appendChild(panel);
    });
    var t = this.tokens(), a = this.column(t.a, t.m, t.n), best = item.prefix || 0;
    for (var i = best; i < t.n; i++) if (Math.abs(a[i]) > Math.abs(a[best])) best = i;
    paint(this.views.query, a, rangeColor);
    this.state.keyPinned = false;
    this.setQuery(best);
  };
  Viewer.prototype.column = function (mat, cols, rows) {
    var out = new Float64Array(rows), c = this.state.mode;
    for (var i = 0; i < rows; i++) out[i] = mat[i * cols + c];
    return out;
  };
  Viewer.prototype.rows = function () {     // contribution and attention rows of the current query
    var t = this.tokens(), i = this.state.query, s = this.head().modes[this.state.mode].s;
    var a = t.a[i * t.m + this.state.mode], b = this.column(t.b, t.m, t.nk);
    var contrib = new Float64Array(t.nk), attn = t.p ? t.p.slice(i * t.nk, (i + 1) * t.nk) : null;
    for (var j = 0; j < t.nk; j++) contrib[j] = s * a * b[j];
    return {a: a, b: b, s: s, contrib: contrib, attn: attn};
  };
  function argmax(v) { var k = 0; for (var i = 1; i < v.length; i++) if (v[i] > v[k]) k = i; return k; }
  Viewer.prototype.field = function (name, text, value) {
    var f = this.readout.querySelector('[data-field="' + name + '"]');
    f.textContent = text;
    f.dataset.value = value === undefined ? "" : String(value);
  };
  Viewer.prototype.setQuery = function (i) {
    var item = this.data.items[this.state.item];
    this.state.query = i;
    this.views.query.cells.forEach(function (c, j) { c.classList.toggle("qkv-sel", j === i); });
    var r = this.rows();
    paint(this.views.contrib, r.contrib, rangeColor);
    if (r.attn) paint(this.views.attn, r.attn, probColor);
    this.root.dataset.query = i;
    this.field("query", tokenName(item, i), i);
    this.field("a", fmt(r.a), r.a);
    this.field("s", fmt(r.s), r.s);
    this.field("scale", fmt(this.head().scale), this.head().scale);
    var jc = argmax(r.contrib);
    this.field("argmax-contrib", tokenName(item, jc), jc);
    if (r.attn) { var ja = argmax(r.attn); this.field("argmax-attn", tokenName(item, ja), ja); }
    else this.field("argmax-attn", "not recorded");
    this.setKey(this.state.keyPinned ? this.state.key : jc);   // the strongest key until one is hovered
  };
  Viewer.prototype.setKey = function (j) {
    var item = this.data.items[this.state.item], r = this.rows();
    this.state.key = j;
    ["contrib", "attn"].forEach(function (p) {
      this.views[p].cells.forEach(function (c, k) { c.classList.toggle("qkv-key", k === j); });
    }, this);
    this.field("key", tokenName(item, j), j);
    this.field("b", fmt(r.b[j]), r.b[j]);
    this.field("contrib", fmt(r.contrib[j]), r.contrib[j]);
    if (r.attn) this.field("attn", fmt(r.attn[j]), r.attn[j]); else this.field("attn", "not recorded");
  };

  function initAll() {
    document.querySelectorAll(".qkv[data-source]").forEach(function (root) {
      if (root.dataset.ready) return;
      var src = document.getElementById(root.dataset.source);
      if (!src) return;
      root.dataset.ready = "1";
      root.qkprobeViewer = new Viewer(root, JSON.parse(src.textContent));
    });
  }
  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", initAll);
  else initAll();
})();
