//! The dashboard page served at `GET /` of the admin listener: a single self-contained HTML page
//! that polls `/api/pools` and renders pools, strategies and backends.

/// The page.
pub const PAGE: &str = r#"<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>sluice</title>
<style>
body{font:14px system-ui,sans-serif;margin:2em;color:#222}
h1{font-size:20px} h2{font-size:16px;margin-top:1.5em}
table{border-collapse:collapse;min-width:40em} td,th{border-bottom:1px solid #ddd;padding:4px 10px;text-align:left}
code{background:#f4f4f4;padding:1px 4px}
</style></head>
<body><h1>sluice</h1><div id="pools">loading…</div><div id="cluster"></div>
<script>
async function refresh(){
  const r = await fetch('/api/pools'); const data = await r.json();
  const el = document.getElementById('pools'); el.innerHTML = '';
  for (const p of data.pools) {
    const h = document.createElement('h2');
    h.textContent = `pool ${p.name} — strategy ${p.strategy.name} (generation ${p.strategy.generation})`;
    h.title = 'sha256 ' + p.strategy.sha256; el.appendChild(h);
    const t = document.createElement('table'); t.className = 'backends';
    t.innerHTML = '<tr><th>backend</th><th>state</th><th>health</th><th>weight</th><th>zone</th><th>in flight</th><th>latency (µs)</th><th>2xx</th><th>5xx</th><th>errors</th></tr>';
    for (const b of p.backends) {
      const tr = document.createElement('tr'); tr.className = 'backend ' + b.state;
      const health = b.health ? b.health.state + (b.health.weight_percent < 100 ? ' (' + b.health.weight_percent + '%)' : '') : '–';
      for (const v of [b.addr, b.state, health, b.weight, b.zone, b.inflight, b.latency_ewma_us, b.requests['2xx'], b.requests['5xx'], b.requests.error]) {
        const td = document.createElement('td'); td.textContent = v; tr.appendChild(td);
      }
      t.appendChild(tr);
    }
    el.appendChild(t);
  }
  const c = await fetch('/api/cluster');
  const cl = document.getElementById('cluster'); cl.innerHTML = '';
  if (c.ok) {
    const data = await c.json();
    const h = document.createElement('h2'); h.textContent = 'cluster'; cl.appendChild(h);
    const t = document.createElement('table'); t.className = 'members';
    t.innerHTML = '<tr><th>name</th><th>role</th><th>zone</th><th>address</th><th>state</th><th>services</th></tr>';
    for (const m of data.members) {
      const tr = document.createElement('tr');
      const services = m.services.map(s => s.pool + '=' + s.addr).join(' ');
      for (const v of [m.name, m.role, m.zone, m.address, m.state, services]) {
        const td = document.createElement('td'); td.textContent = v; tr.appendChild(td);
      }
      t.appendChild(tr);
    }
    cl.appendChild(t);
  }
}
refresh(); setInterval(refresh, 2000);
</script></body></html>
"#;
