'use strict';
// Drawing by hand, no library: line charts on <canvas> and the cluster map as inline SVG.

const PALETTE = ['#1f77b4', '#ff7f0e', '#2ca02c', '#d62728', '#9467bd',
  '#8c564b', '#e377c2', '#7f7f7f', '#bcbd22', '#17becf'];

/** The smallest "round" number (1, 2, 2.5, 5 times a power of ten) at or above v. */
function niceCeil(v) {
  const e = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 2.5, 5, 10]) {
    if (m * e >= v) return m * e;
  }
  return 10 * e;
}

/**
 * Draws one chart: `times` are Unix milliseconds, each series has `values` (numbers or null for
 * "no data", drawn as a gap), a `color` and a line `width`. `format` labels the y axis.
 */
function drawChart(canvas, { title, times, series, format, floor }) {
  const dpr = window.devicePixelRatio || 1;
  const w = canvas.clientWidth || 300;
  const h = canvas.clientHeight || 140;
  canvas.width = Math.round(w * dpr);
  canvas.height = Math.round(h * dpr);
  const g = canvas.getContext('2d');
  g.setTransform(dpr, 0, 0, dpr, 0, 0);
  g.clearRect(0, 0, w, h);
  const pad = { left: 52, right: 8, top: 20, bottom: 16 };
  const plotW = w - pad.left - pad.right;
  const plotH = h - pad.top - pad.bottom;

  let max = 0;
  for (const s of series) {
    for (const v of s.values) if (v != null && v > max) max = v;
  }
  max = niceCeil(Math.max(max, floor || 0) || 1);

  g.font = '12px system-ui, sans-serif';
  g.fillStyle = '#333';
  g.fillText(title, pad.left, 13);
  g.font = '10px system-ui, sans-serif';
  g.strokeStyle = '#e6e6e6';
  g.lineWidth = 1;
  for (let i = 0; i <= 4; i++) {
    const y = pad.top + (plotH * i) / 4;
    g.beginPath();
    g.moveTo(pad.left, y);
    g.lineTo(w - pad.right, y);
    g.stroke();
    g.fillStyle = '#666';
    g.fillText(format((max * (4 - i)) / 4), 2, y + 3);
  }

  if (times.length < 2) {
    g.fillText('collecting…', pad.left + 6, pad.top + plotH / 2);
    return;
  }
  const t0 = times[0];
  const span = Math.max(1, times[times.length - 1] - t0);
  const x = (t) => pad.left + (plotW * (t - t0)) / span;
  const y = (v) => pad.top + plotH * (1 - Math.min(v, max) / max);
  g.fillStyle = '#666';
  g.fillText('-' + Math.round(span / 1000) + ' s', pad.left, h - 3);
  g.fillText('now', w - pad.right - 20, h - 3);

  for (const s of series) {
    g.strokeStyle = s.color;
    g.fillStyle = s.color;
    g.lineWidth = s.width;
    g.beginPath();
    let penDown = false;
    s.values.forEach((v, i) => {
      if (v == null) {
        penDown = false;
        return;
      }
      if (penDown) g.lineTo(x(times[i]), y(v));
      else g.moveTo(x(times[i]), y(v));
      penDown = true;
    });
    g.stroke();
    // A point with no neighbour draws no line: show it as a dot.
    s.values.forEach((v, i) => {
      if (v != null && s.values[i - 1] == null && s.values[i + 1] == null) {
        g.fillRect(x(times[i]) - s.width, y(v) - s.width, 2 * s.width + 1, 2 * s.width + 1);
      }
    });
  }
}

const SVG_NS = 'http://www.w3.org/2000/svg';

function svg(tag, attrs, text) {
  const e = document.createElementNS(SVG_NS, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text != null) e.textContent = text;
  return e;
}

const STATE_COLORS = {
  alive: '#2ca02c', suspect: '#e69500', draining: '#e69500', down: '#d62728', left: '#999',
};

/**
 * The cluster as a picture: proxies on the left, backends on the right sorted by zone, an edge
 * from each proxy to each backend service labelled with its pool (what `sluice cluster map`
 * draws with Graphviz). Node outlines are coloured by state.
 */
function clusterMap(members) {
  const proxies = members.filter((m) => m.role === 'proxy');
  const backends = members.filter((m) => m.role !== 'proxy')
    .sort((a, b) => (a.zone || '').localeCompare(b.zone || '') || a.name.localeCompare(b.name));
  const rowH = 64;
  const height = Math.max(proxies.length, backends.length, 1) * rowH + 30;
  const width = 760;
  const root = svg('svg', { width, height, viewBox: `0 0 ${width} ${height}`, role: 'img',
    'aria-label': 'cluster map' });
  const nodeW = 200;
  const nodeH = 44;
  const place = (list, x) => list.map((m, i) => {
    const top = 15 + i * rowH + (height - 30 - list.length * rowH) / 2;
    return { m, x, y: top, cx: x + nodeW / 2, cy: top + nodeH / 2 };
  });
  const left = place(proxies, 20);
  const right = place(backends, width - nodeW - 20);

  for (const p of left) {
    for (const b of right) {
      for (const s of b.m.services || []) {
        root.appendChild(svg('line', { x1: p.x + nodeW, y1: p.cy, x2: b.x, y2: b.cy,
          stroke: '#bbb', 'stroke-width': 1.2 }));
        root.appendChild(svg('text', { x: (p.x + nodeW + b.x) / 2, y: (p.cy + b.cy) / 2 - 3,
          'font-size': 11, fill: '#555', 'text-anchor': 'middle' }, s.pool));
      }
    }
  }
  for (const n of [...left, ...right]) {
    const color = STATE_COLORS[n.m.state] || '#999';
    const g = svg('g', { class: 'member', 'data-name': n.m.name });
    const shape = n.m.role === 'proxy'
      ? svg('rect', { x: n.x, y: n.y, width: nodeW, height: nodeH, rx: 4 })
      : svg('ellipse', { cx: n.cx, cy: n.cy, rx: nodeW / 2, ry: nodeH / 2 });
    shape.setAttribute('fill', '#fff');
    shape.setAttribute('stroke', color);
    shape.setAttribute('stroke-width', n.m.self ? 3 : 2);
    g.appendChild(shape);
    g.appendChild(svg('text', { x: n.cx, y: n.cy - 4, 'font-size': 12, 'text-anchor': 'middle',
      'font-weight': 600 }, n.m.name));
    const zone = n.m.zone ? ` · ${n.m.zone}` : '';
    g.appendChild(svg('text', { x: n.cx, y: n.cy + 11, 'font-size': 10, 'text-anchor': 'middle',
      fill: '#555' }, `${n.m.role}${zone} · ${n.m.state}`));
    root.appendChild(g);
  }
  return root;
}
