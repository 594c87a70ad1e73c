'use strict';
// The sluice dashboard: reads the admin API every few seconds and renders it; its buttons call
// the API's mutating routes with the token entered once (kept for this browser tab only).
// No framework: small helpers build DOM elements, and text always goes in as text.

const POLL_MS = 2000;
const OVERVIEW_EVERY = 5; // polls between two reads of /api/overview
const TOKEN_KEY = 'sluice-admin-token';

const app = {
  token: sessionStorage.getItem(TOKEN_KEY) || '',
  overview: null,
  polls: 0,
  busy: false,
  pools: new Map(), // pool name -> its card's elements
  charts: new Map(), // pool name -> its chart row's elements
};

// ---------------------------------------------------------------------------- helpers

/** An element with attributes (`class`, `data-*`, ... or properties such as `onclick`). */
function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v == null) continue;
    if (k.startsWith('on') || k === 'value' || k === 'hidden' || k === 'disabled') e[k] = v;
    else e.setAttribute(k, v);
  }
  for (const c of children) {
    if (c != null) e.append(c instanceof Node ? c : String(c));
  }
  return e;
}

/** A table with a header row and one row per item of `rows` (arrays of cell contents). */
function table(className, headers, rows) {
  const t = el('table', { class: className });
  t.append(el('tr', {}, ...headers.map((h) => el('th', {}, h))));
  for (const r of rows) t.append(el('tr', {}, ...r.map((c) => el('td', {}, c))));
  return t;
}

/** A coloured label: `state` picks the colour (see style.css), `text` defaults to it. */
function badge(state, text) {
  return el('span', { class: `state state-${state}` }, text || state);
}

function duration(ms) {
  if (ms == null) return '';
  if (ms < 1000) return `${ms} ms`;
  if (ms < 120000) return `${(ms / 1000).toFixed(1)} s`;
  return `${Math.round(ms / 60000)} min`;
}

function clock(unixMs) {
  return new Date(unixMs).toLocaleTimeString();
}

function showMessage(text, kind) {
  const m = document.getElementById('message');
  m.textContent = text;
  m.className = kind;
}

// ---------------------------------------------------------------------------- the API

/** Calls the admin API; throws an Error carrying the API's own reason on a non-2xx answer. */
async function api(method, path, { body, contentType } = {}) {
  const headers = {};
  if (app.token) headers.Authorization = `Bearer ${app.token}`;
  if (contentType) headers['Content-Type'] = contentType;
  const r = await fetch(path, { method, headers, body, cache: 'no-store' });
  const text = await r.text();
  let data = null;
  try {
    data = JSON.parse(text);
  } catch (_) {
    // Not JSON: the reason is the text itself.
  }
  if (!r.ok) {
    const reason = data && data.error ? data.error : text.trim();
    const hint = r.status === 401 ? ' (enter the admin token above)' : '';
    throw new Error(`${method} ${path}: ${r.status} ${reason}${hint}`);
  }
  return data;
}

/** Runs an operator's action, reports its outcome, and refreshes the page. */
async function act(label, method, path, options) {
  try {
    await api(method, path, options);
    showMessage(`${label}: done`, 'ok');
  } catch (e) {
    showMessage(e.message, 'error');
  }
  await refresh(true);
}

function backendPath(pool, addr, what) {
  return `/api/pools/${encodeURIComponent(pool)}/backends/${encodeURIComponent(addr)}/${what}`;
}

// ---------------------------------------------------------------------------- token

function showToken() {
  const needed = app.overview ? app.overview.token_required : true;
  document.getElementById('token-form').hidden = !needed || !!app.token;
  document.getElementById('token-set').hidden = !app.token;
}

document.getElementById('token-form').addEventListener('submit', (ev) => {
  ev.preventDefault();
  const input = document.getElementById('token');
  app.token = input.value.trim();
  input.value = '';
  sessionStorage.setItem(TOKEN_KEY, app.token);
  showToken();
  showMessage('token set for this tab', 'ok');
  refresh(true);
});

document.getElementById('token-forget').addEventListener('click', () => {
  app.token = '';
  sessionStorage.removeItem(TOKEN_KEY);
  showToken();
});

document.getElementById('reload').addEventListener('click', async () => {
  try {
    const r = await api('POST', '/api/reload');
    const rep = r.report || {};
    const parts = ['added', 'removed', 'changed']
      .filter((k) => rep[k] && rep[k].length)
      .map((k) => `${k}: ${rep[k].join(', ')}`);
    const warnings = (rep.warnings || []).concat(rep.tls || []);
    showMessage(`config reloaded${parts.length ? ' (' + parts.join('; ') + ')' : ', nothing changed'}`
      + (warnings.length ? ' — ' + warnings.join('; ') : ''), 'ok');
  } catch (e) {
    showMessage(e.message, 'error');
  }
  refresh(true);
});

// ---------------------------------------------------------------------------- pools

function pluginLine(kind, p) {
  if (!p) return el('div', {}, `${kind}: none`);
  const faults = Object.entries(p.faults || {}).filter(([, n]) => n > 0)
    .map(([reason, n]) => `${reason} ${n}`);
  return el('div', { class: `plugin-${kind}` },
    `${kind}: `, el('code', {}, p.name), ` generation ${p.generation}, sha256 `,
    el('code', { title: p.sha256 }, p.sha256.slice(0, 12) + '…'),
    `, faults: ${faults.length ? faults.join(', ') : 'none'}`);
}

/** The upload form of a pool: a .wasm file and its JSON config, for its strategy or health check. */
function uploadForm(pool) {
  const kind = el('select', { name: 'kind' },
    el('option', { value: 'strategy' }, 'strategy'), el('option', { value: 'health' }, 'health check'));
  const file = el('input', { type: 'file', accept: '.wasm,application/wasm', name: 'wasm' });
  const config = el('textarea', { name: 'config', placeholder: 'config (JSON object; empty keeps the current one)' });
  // On a clustered proxy the plugin can go to every proxy of the cluster (gossip rollout).
  const everywhere = el('input', { type: 'checkbox', name: 'cluster' });
  const scope = el('label', { class: 'cluster-only' }, everywhere, ' to every proxy of the cluster');
  scope.hidden = !(app.overview && app.overview.clustered);
  const form = el('form', { class: 'upload' }, 'upload plugin: ', kind, file, config, scope,
    el('button', { type: 'submit' }, 'upload'));
  form.addEventListener('submit', async (ev) => {
    ev.preventDefault();
    if (!file.files.length) {
      showMessage('choose a .wasm file to upload first', 'error');
      return;
    }
    let query = '';
    const text = config.value.trim();
    if (text) {
      let parsed;
      try {
        parsed = JSON.parse(text);
      } catch (e) {
        showMessage(`the config is not JSON: ${e.message}`, 'error');
        return;
      }
      if (parsed === null || typeof parsed !== 'object' || Array.isArray(parsed)) {
        showMessage('the config must be a JSON object, like {"zones": 2}', 'error');
        return;
      }
      query = '?config=' + encodeURIComponent(JSON.stringify(parsed));
    }
    const bytes = await file.files[0].arrayBuffer();
    if (everywhere.checked && !scope.hidden) {
      await rollOut(pool, kind.value, query, bytes);
      file.value = '';
      refresh(true);
      return;
    }
    const path = `/api/pools/${encodeURIComponent(pool)}/${kind.value}${query}`;
    try {
      const r = await api('PUT', path, { body: bytes, contentType: 'application/wasm' });
      showMessage(`${r.kind} of pool ${r.pool} is now generation ${r.generation} (sha256 ${r.sha256.slice(0, 12)}…)`, 'ok');
      file.value = '';
    } catch (e) {
      showMessage(e.message, 'error');
    }
    refresh(true);
  });
  return form;
}

/** Rolls a plugin out to every proxy of the cluster and shows each proxy's result. */
async function rollOut(pool, kind, query, bytes) {
  const path = `/api/cluster/plugins/${encodeURIComponent(pool)}/${kind}${query}`;
  showMessage(`rolling the ${kind} of pool ${pool} out to the cluster…`, 'ok');
  try {
    const r = await api('POST', path, { body: bytes, contentType: 'application/wasm' });
    const nodes = r.nodes.map((n) => `${n.name}: ${n.result}${n.error ? ` (${n.error})` : ''}`).join('; ');
    showMessage(`cluster rollout of sha256 ${r.sha256.slice(0, 12)}…: ${nodes}`, r.ok ? 'ok' : 'error');
  } catch (e) {
    showMessage(e.message, 'error');
  }
}

/** The action buttons of one backend row (made once; `update` sets their labels). */
function backendActions(pool, addr) {
  const drain = el('button', { type: 'button', 'data-action': 'drain' });
  const disable = el('button', { type: 'button', 'data-action': 'disable' });
  const weight = el('input', { class: 'weight', type: 'number', min: 1, placeholder: 'weight' });
  const setWeight = el('button', { type: 'button', 'data-action': 'weight' }, 'set weight');
  const reset = el('button', { type: 'button', 'data-action': 'weight-reset' }, 'reset');
  let mode = 'active';
  drain.onclick = () => {
    const what = mode === 'draining' ? 'undrain' : 'drain';
    act(`${what} ${addr}`, 'POST', backendPath(pool, addr, what));
  };
  disable.onclick = () => {
    const what = mode === 'disabled' ? 'enable' : 'disable';
    act(`${what} ${addr}`, 'POST', backendPath(pool, addr, what));
  };
  setWeight.onclick = () => {
    const w = weight.value.trim();
    if (!/^[0-9]+$/.test(w)) {
      showMessage('the weight must be a whole number, like 5', 'error');
      return;
    }
    act(`weight ${w} for ${addr}`, 'PUT', backendPath(pool, addr, 'weight'),
      { body: w, contentType: 'application/json' });
  };
  reset.onclick = () => act(`configured weight for ${addr}`, 'DELETE', backendPath(pool, addr, 'weight'));
  const cell = el('td', { class: 'actions' }, drain, ' ', disable, ' ', weight, setWeight, ' ', reset);
  cell.update = (adminMode) => {
    mode = adminMode;
    drain.textContent = mode === 'draining' ? 'undrain' : 'drain';
    disable.textContent = mode === 'disabled' ? 'enable' : 'disable';
  };
  return cell;
}

const BACKEND_COLUMNS = ['backend', 'state', 'health', 'weight', 'zone', 'in flight',
  'latency (µs)', '2xx', '5xx', 'errors', 'ejection', 'actions'];

function healthText(h) {
  if (!h) return '–';
  let t = h.state;
  if (h.weight_percent < 100) t += ` (${h.weight_percent}%)`;
  if (h.last_result) t += ` · ${h.last_result}`;
  if (h.next_check_in_ms != null) t += ` · next check in ${duration(h.next_check_in_ms)}`;
  return t;
}

/** Updates (or makes) the row of backend `b` in `card`. Rows are kept across polls, so a weight
 * being typed is not lost. */
function backendRow(card, pool, b) {
  let row = card.rows.get(b.addr);
  if (!row) {
    row = el('tr', { class: 'backend', 'data-pool': pool, 'data-addr': b.addr });
    row.cells_ = BACKEND_COLUMNS.slice(0, -1).map(() => el('td'));
    row.actions = backendActions(pool, b.addr);
    row.append(...row.cells_, row.actions);
    card.rows.set(b.addr, row);
  }
  row.className = `backend ${b.state}`;
  const weight = b.weight_override != null ? `${b.weight_override} (set; configured ${b.weight})` : b.weight;
  const ejection = b.ejected_for_ms > 0
    ? `ejected ${duration(b.ejected_for_ms)} more (${b.ejections}×)`
    : (b.ejections ? `${b.ejections} recent` : '');
  const values = [b.addr, null, healthText(b.health), weight, b.zone, b.inflight, b.latency_ewma_us,
    b.requests['2xx'], b.requests['5xx'], b.requests.error, ejection];
  values.forEach((v, i) => {
    if (i === 1) return;
    row.cells_[i].textContent = v == null ? '' : String(v);
  });
  row.cells_[1].textContent = b.state;
  row.cells_[1].className = `state state-${b.state}`;
  row.actions.update(b.admin_mode);
  return row;
}

function swapRows(p) {
  const all = [];
  for (const [kind, plugin] of [['strategy', p.strategy], ['health', p.health_check]]) {
    for (const s of (plugin && plugin.swaps) || []) all.push({ kind, ...s });
  }
  all.sort((a, b) => b.at_unix_ms - a.at_unix_ms);
  return all.map((s) => [clock(s.at_unix_ms), s.kind,
    badge(s.result === 'rejected' ? 'unhealthy' : 'healthy', s.result), s.name || '',
    s.generation != null ? s.generation : '', s.sha256 ? s.sha256.slice(0, 12) + '…' : '', s.error || '']);
}

function poolCard(p) {
  let card = app.pools.get(p.name);
  if (!card) {
    card = {
      root: el('div', { class: 'pool', 'data-pool': p.name }),
      title: el('h2'),
      plugins: el('div', { class: 'plugins' }),
      backends: el('table', { class: 'backends' }),
      swaps: el('div', { class: 'swaps' }),
      rows: new Map(),
    };
    card.backends.append(el('tr', {}, ...BACKEND_COLUMNS.map((c) => el('th', {}, c))));
    card.root.append(card.title, card.plugins, card.backends, uploadForm(p.name),
      el('h3', {}, 'plugin loads and swaps'), card.swaps);
    app.pools.set(p.name, card);
  }
  card.title.textContent = `pool ${p.name} — strategy ${p.strategy.name} (generation ${p.strategy.generation})`;
  card.title.title = `sha256 ${p.strategy.sha256}`;
  const extra = [];
  if (p.panic_mode) extra.push('PANIC MODE: balancing over every member');
  extra.push(`table generation ${p.table_generation}, retries ${p.retries}, connect timeout ${p.connect_timeout_ms} ms`);
  card.plugins.replaceChildren(pluginLine('strategy', p.strategy), pluginLine('health', p.health_check),
    el('div', { class: 'muted' }, extra.join(' · ')));
  const seen = new Set();
  for (const b of p.backends) {
    seen.add(b.addr);
    const row = backendRow(card, p.name, b);
    if (row.parentNode !== card.backends) card.backends.append(row);
  }
  for (const [addr, row] of card.rows) {
    if (!seen.has(addr)) {
      row.remove();
      card.rows.delete(addr);
    }
  }
  card.swaps.replaceChildren(table('swaps', ['time', 'kind', 'result', 'plugin', 'generation', 'sha256', 'reason'],
    swapRows(p)));
  return card;
}

function renderPools(data) {
  const root = document.getElementById('pools');
  if (root.firstChild && root.firstChild.nodeType === Node.TEXT_NODE) root.textContent = '';
  const names = new Set(data.pools.map((p) => p.name));
  for (const [name, card] of app.pools) {
    if (!names.has(name)) {
      card.root.remove();
      app.pools.delete(name);
    }
  }
  for (const p of data.pools) {
    const card = poolCard(p);
    if (card.root.parentNode !== root) root.append(card.root);
  }
  if (!data.pools.length) root.textContent = 'no pools';
}

// ---------------------------------------------------------------------------- charts

const METRICS = [
  { key: 'rps', title: 'requests/s', format: (v) => v.toFixed(v < 10 ? 1 : 0) },
  { key: 'error_rate', title: 'error rate', format: (v) => `${(v * 100).toFixed(v < 0.1 ? 1 : 0)}%`, floor: 0.01 },
  { key: 'p50_ms', title: 'p50 latency', format: (v) => `${v.toFixed(v < 1 ? 2 : v < 10 ? 1 : 0)} ms` },
  { key: 'p99_ms', title: 'p99 latency', format: (v) => `${v.toFixed(v < 1 ? 2 : v < 10 ? 1 : 0)} ms` },
];

function renderCharts(h) {
  const root = document.getElementById('charts');
  const names = new Set(h.pools.map((p) => p.name));
  for (const [name, c] of app.charts) {
    if (!names.has(name)) {
      c.root.remove();
      app.charts.delete(name);
    }
  }
  for (const p of h.pools) {
    let c = app.charts.get(p.name);
    if (!c) {
      c = {
        root: el('div', { class: 'pool-charts', 'data-pool': p.name }),
        legend: el('div', { class: 'legend' }),
        canvases: METRICS.map((m) => el('canvas', { 'data-metric': m.key })),
      };
      c.root.append(el('h3', {}, `pool ${p.name}`), c.legend,
        el('div', { class: 'chart-row' }, ...c.canvases));
      root.append(c.root);
      app.charts.set(p.name, c);
    }
    const lines = [{ label: `${p.name} (pool)`, data: p, color: '#222', width: 2.5 }]
      .concat(p.backends.map((b, i) => ({ label: b.addr, data: b, color: PALETTE[i % PALETTE.length], width: 1.2 })));
    c.legend.replaceChildren(...lines.map((l) => {
      const s = el('span', {}, l.label);
      s.style.setProperty('--c', l.color);
      return s;
    }));
    METRICS.forEach((m, i) => drawChart(c.canvases[i], {
      title: m.title,
      times: h.times,
      format: m.format,
      floor: m.floor,
      series: lines.map((l) => ({ values: l.data[m.key], color: l.color, width: l.width })),
    }));
  }
}

// ---------------------------------------------------------------------------- overview, cluster

function renderOverview(o) {
  document.getElementById('version').textContent = `${o.version}${o.zone ? ' · zone ' + o.zone : ''}`;
  document.getElementById('reload').disabled = !o.reloadable;
  document.getElementById('reload').title = o.reloadable
    ? 'POST /api/reload: re-read the config file'
    : 'started without a config file: nothing to reload';
  // The last reload, whoever asked for it (SIGHUP, the API, this page): a refused one stays in
  // view until a later reload is applied.
  const last = o.last_reload;
  const lastReload = document.getElementById('last-reload');
  lastReload.className = last ? (last.result === 'ok' ? 'muted' : 'rejected') : '';
  lastReload.textContent = !last ? ''
    : last.result === 'ok' ? `last reload applied at ${clock(last.unix_ms)}`
      : `last reload rejected at ${clock(last.unix_ms)}, the running config stays: ${last.error}`;
  document.getElementById('routes').replaceChildren(table('routes',
    ['host', 'path prefix', 'conditions', 'goes to'],
    o.routes.map((r) => {
      const cond = [];
      if (r.path_regex) cond.push(`path ~ ${r.path_regex}`);
      if (r.methods) cond.push(`methods ${r.methods.join(', ')}`);
      if (r.scheme) cond.push(`scheme ${r.scheme}`);
      return [r.host || '*', r.path_prefix || '/', cond.join('; '), r.action === 'pool' ? `pool ${r.pool}` : r.action];
    })));
  document.getElementById('listeners').replaceChildren(table('listeners',
    ['address', 'protocol', 'client certificates', 'max connections'],
    o.listeners.map((l) => [l.address, l.tls ? 'TLS' : 'plain', l.tls ? l.client_auth : '', l.max_connections])));
  const now = Date.now();
  document.getElementById('certificates').replaceChildren(o.certificates.length
    ? table('certificates', ['names', 'file', 'expires', 'state'], o.certificates.map((c) => {
      const left = c.not_after_unix_ms - now;
      const days = left / 86400000;
      const state = left < 0 ? 'expired' : days < 14 ? 'expiring' : 'valid';
      const span = Math.abs(days) < 2 ? `${Math.round(Math.abs(left) / 3600000)} hours`
        : `${Math.floor(Math.abs(days))} days`;
      const when = `${new Date(c.not_after_unix_ms).toISOString().slice(0, 16).replace('T', ' ')} UTC`
        + (left < 0 ? ` (${span} ago)` : ` (in ${span})`);
      return [c.names.join(', ') + (c.default ? ' (default)' : ''), c.cert, when, badge(state)];
    }))
    : el('p', { class: 'muted' }, 'no TLS listener'));
  document.getElementById('cluster-section').hidden = !o.clustered;
}

function renderCluster(c) {
  const members = c.members || [];
  document.getElementById('cluster').replaceChildren(table('members',
    ['name', 'role', 'zone', 'address', 'state', 'services', 'last change'],
    members.map((m) => [m.name + (m.self ? ' (this proxy)' : ''), m.role, m.zone, m.address, badge(m.state),
      m.services.map((s) => `${s.pool}=${s.addr}`).join(' '), `${duration(m.last_change_ms_ago)} ago`])));
  document.getElementById('cluster-map').replaceChildren(clusterMap(members));
}

// ---------------------------------------------------------------------------- polling

/** Reads everything the page shows. `now`: an operator acted, show the outcome at once. */
async function refresh(now) {
  if (app.busy && !now) return;
  app.busy = true;
  try {
    if (!app.overview || app.polls % OVERVIEW_EVERY === 0 || now) {
      app.overview = await api('GET', '/api/overview');
      renderOverview(app.overview);
      showToken();
    }
    app.polls += 1;
    renderPools(await api('GET', '/api/pools'));
    renderCharts(await api('GET', '/api/history'));
    // Only a clustered proxy has /api/cluster; the overview says which this is.
    if (app.overview.clustered) renderCluster(await api('GET', '/api/cluster'));
  } catch (e) {
    showMessage(e.message, 'error');
    showToken();
  } finally {
    app.busy = false;
  }
}

refresh();
setInterval(refresh, POLL_MS);
