"""The live expert-utilization page served at /dashboard: self-contained (no external resources).

It polls `v1/expert-load` (relative, so it works under any route prefix) every 2 s and draws a
layer x expert heatmap, balancedness per layer and per-rank load, and the experts' specialization
by token class since start (per MoE layer, a class x expert map of each expert's share of a class
over the class's share of all tokens; engine/token_classes.py). From the engine's stats in the
same reply it shows a banner while the engine replaces failed ranks, and the failure and
recovery counters.

API key (serve/auth.py): the page itself holds no data and loads without a key. When a poll gets
a 401 it shows a login form; the key entered there (or given in the URL fragment,
`/dashboard#key=...`, which browsers never send to the server; the page removes it from the
address bar) is kept in the tab's sessionStorage and sent as `Authorization: Bearer` on every
poll. `<body data-auth>` says where it stands: "none" (no key needed), "needed" or "ok".
"""

DASHBOARD_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>maverick-ray expert load</title>
<style>
 body { font-family: system-ui, sans-serif; margin: 16px; background: #fafafa; color: #222; }
 h1 { font-size: 20px; margin: 0 0 8px; } h2 { font-size: 15px; margin: 16px 0 6px; }
 .row { display: flex; gap: 24px; flex-wrap: wrap; } .card { background: #fff; border: 1px solid #ddd;
 border-radius: 6px; padding: 10px; } #status { color: #666; font-size: 13px; }
 table { border-collapse: collapse; font-size: 13px; } td, th { padding: 2px 8px; text-align: right; }
 #recovery-banner { background: #f5a623; color: #222; font-weight: 600; padding: 8px 12px; border-radius: 6px;
 margin: 8px 0; }
 #specialization-note { font-size: 13px; color: #555; }
 table.spec { margin: 4px 0 8px; } table.spec th { font-weight: 500; font-size: 11px; }
 td.specialised { outline: 2px solid #222; outline-offset: -2px; }
 #login { background: #fff; border: 1px solid #ddd; border-radius: 6px; padding: 10px; margin: 8px 0; }
</style></head>
<body>
<h1>maverick-ray: expert routing load</h1>
<div id="status">loading...</div>
<form id="login" hidden><label>This server needs its API key: <input id="api-key" type="password"
 autocomplete="current-password" size="40"></label> <button type="submit">Show</button>
 <span id="login-msg"></span></form>
<div id="recovery-banner" hidden></div>
<div class="row">
 <div class="card"><h2>Tokens per expert (rows: MoE layers, window)</h2>
  <canvas id="heatmap" width="768" height="200"></canvas></div>
 <div class="card"><h2>Balancedness per layer (1 = even)</h2><canvas id="balance" width="360" height="200"></canvas>
  <table id="layers"></table></div>
 <div class="card"><h2>Tokens per EP rank (all MoE layers)</h2><canvas id="ranks" width="360" height="200"></canvas></div>
 <div class="card"><h2>Rank failures and recoveries</h2><table id="recovery"></table></div>
 <div class="card"><h2>KV cache</h2><table id="kv"></table></div>
 <div class="card"><h2>Expert rebalancing (EPLB)</h2><table id="eplb"></table></div>
</div>
<div class="card" id="specialization-card"><h2>Expert specialization by token class (since start)</h2>
 <div id="specialization-note"></div><div id="specialization"></div></div>
<script>
const KEY = 'maverick-ray-api-key';
const fragmentKey = new URLSearchParams(location.hash.slice(1)).get('key');
if (fragmentKey) {
  sessionStorage.setItem(KEY, fragmentKey);
  history.replaceState(null, '', location.pathname + location.search);
}
function authHeaders() {
  const key = sessionStorage.getItem(KEY);
  return key ? {Authorization: 'Bearer ' + key} : {};
}
function showLogin(refused) {
  document.getElementById('login').hidden = false;
  document.getElementById('login-msg').textContent = refused ? 'that key was refused' : '';
  document.getElementById('status').textContent = 'waiting for the API key';
  document.body.dataset.auth = 'needed';
}
document.getElementById('login').addEventListener('submit', ev => {
  ev.preventDefault();
  sessionStorage.setItem(KEY, document.getElementById('api-key').value.trim());
  refresh();
});
function color(v) {  // 0..1 -> white..deep blue
  const r = Math.round(255 - 215 * v), g = Math.round(255 - 175 * v), b = Math.round(255 - 55 * v);
  return `rgb(${r},${g},${b})`;
}
function bars(canvas, values, max, labels, fmt) {
  const c = canvas.getContext('2d'); c.clearRect(0, 0, canvas.width, canvas.height);
  const w = canvas.width / Math.max(values.length, 1);
  values.forEach((v, i) => {
    const h = max > 0 ? (v / max) * (canvas.height - 20) : 0;
    c.fillStyle = '#3b6fd8'; c.fillRect(i * w + 4, canvas.height - 16 - h, w - 8, h);
    c.fillStyle = '#222'; c.font = '11px sans-serif';
    c.fillText(labels[i], i * w + 4, canvas.height - 4); c.fillText(fmt(v), i * w + 4, canvas.height - 20 - h);
  });
}
const CAUSES = {died: 'a rank died', hung: 'a rank hung', raised: 'a rank raised an error'};
function showRecovery(s, cause) {
  const failures = s.rank_failures || {}, recoveries = s.recoveries || {};
  const banner = document.getElementById('recovery-banner');
  banner.hidden = !s.recovering;
  banner.textContent = s.recovering ? `recovering: replacing ranks after ${CAUSES[cause] || 'a rank failure'}` : '';
  const last = s.last_recovery_seconds;
  const rows = [['failures: died', failures.died || 0], ['failures: hung', failures.hung || 0],
                ['failures: raised', failures.raised || 0], ['recoveries: ok', recoveries.ok || 0],
                ['recoveries: failed', recoveries.failed || 0], ['replayed sequences', s.replayed_sequences || 0],
                ['last recovery', last == null ? 'none' : last.toFixed(1) + ' s']];
  document.getElementById('recovery').innerHTML = rows.map(([k, v]) => `<tr><th>${k}</th><td>${v}</td></tr>`).join('');
  document.body.dataset.recovering = s.recovering ? '1' : '0';
}
function showKV(s) {
  const total = s.kv_pages_total || 0, used = s.kv_pages_used || 0;
  const asked = s.prefix_cache_queried_tokens || 0, hit = s.prefix_cache_hit_tokens || 0;
  const gib = n => (n * (s.kv_page_bytes || 0) / 2 ** 30).toFixed(2) + ' GiB';
  const rows = [['pages in use', `${used} / ${total}` + (total ? ` (${(100 * used / total).toFixed(0)}%)` : '')],
                ['bytes in use', `${gib(used)} of ${gib(total)}`],
                ['tokens of block', s.kv_block_size], ['context per sequence', s.max_model_len],
                ['preemptions', s.preemptions || 0],
                ['prefix cache hit rate', asked ? `${(100 * hit / asked).toFixed(1)}% of ${asked} prompt tokens` : 'none yet'],
                ['prompt tokens, last step', s.prefill_tokens_last_step || 0],
                ['prompt token budget, next step', s.prefill_budget ?? '']];
  document.getElementById('kv').innerHTML = rows.map(([k, v]) => `<tr><th>${k}</th><td>${v}</td></tr>`).join('');
  document.body.dataset.kvPagesUsed = used;
}
function showEplb(s, placement) {
  const e = s.eplb;
  const num = (v, d) => v == null ? 'not measured yet' : v.toFixed(d);
  const rows = !e ? [['live rebalancing', 'off (parallel.eplb)']] :
    [['imbalance (busiest rank / mean)', num(e.imbalance, 2)], ['rebalances', e.rebalances],
     ['slots moved', e.moved_slots], ['failed to stage', e.failed], ['staging now', e.staging ? 'yes' : 'no'],
     ['last: imbalance before / planned', e.last_imbalance_before == null ? 'none yet'
       : `${e.last_imbalance_before.toFixed(2)} / ${e.last_imbalance_planned.toFixed(2)}`],
     ['last: took / swap pause', e.last_seconds == null ? 'none yet'
       : `${e.last_seconds.toFixed(2)} s / ${(1e3 * e.last_swap_seconds).toFixed(1)} ms`],
     ['last: extra memory staged', `${(e.last_staged_bytes / 2 ** 20).toFixed(1)} MiB`]];
  if (placement) {
    const copies = placement.replicas.map((n, x) => [x, n]).filter(([, n]) => n > 1);
    rows.push(['experts with copies', copies.length ? copies.map(([x, n]) => `${x} (x${n})`).join(', ') : 'none']);
    placement.slots.forEach((slots, r) => rows.push([`rank ${r} slots`, slots.join(' ')]));
  }
  document.getElementById('eplb').innerHTML = rows.map(([k, v]) => `<tr><th>${k}</th><td>${v}</td></tr>`).join('');
  document.body.dataset.eplbRebalances = e ? e.rebalances : 0;
}
function ratioColor(v) {  // share ratio: 0 white, 1 light, >= 3 deep orange (log scale)
  const t = Math.max(0, Math.min(1, Math.log2(1 + v) / 2));
  return `rgb(${Math.round(255 - 20 * t)},${Math.round(255 - 150 * t)},${Math.round(255 - 235 * t)})`;
}
function showSpecialization(b) {
  const box = document.getElementById('specialization'), note = document.getElementById('specialization-note');
  if (!b) { note.textContent = 'not reported by this server'; return; }
  const total = b.tokens.reduce((s, layer) => s + layer.reduce((t, row) => t + row.reduce((u, v) => u + v, 0), 0), 0);
  const found = b.specialised.reduce((s, l) => s + l.length, 0), experts = b.tokens.length * (b.tokens[0] || [[]])[0].length;
  note.textContent = total ? `${found} of ${experts} experts take a token class at ${b.threshold}x or more of its ` +
    `share of all tokens (cells: an expert's share of a class over the class's share; deep = ${b.threshold}x or more)`
    : 'no routed tokens yet';
  let cells = 0;
  box.innerHTML = b.moe_layers.map((layer, i) => {
    const mark = new Set(b.specialised[i].map(s => s.expert + ':' + s.class));
    const wide = b.tokens[i][0].length > 32;  // Maverick's 128 experts: thin cells, no numbers
    const head = '<tr><th>layer ' + layer + '</th>' + b.tokens[i][0].map((_, e) => `<th>${wide ? '' : e}</th>`).join('') + '</tr>';
    const rows = b.classes.map((cls, k) => '<tr><th>' + cls + '</th>' + b.ratio[i][k].map((v, e) => {
      cells += v > 0 ? 1 : 0;
      const strong = mark.has(e + ':' + cls) ? ' class="specialised"' : '';
      return `<td${strong} title="expert ${e}: ${b.tokens[i][k][e]} ${cls} tokens, ${v.toFixed(2)}x" ` +
             `style="background:${ratioColor(v)};min-width:${wide ? 3 : 14}px;padding:${wide ? '6px 0' : '2px 8px'}"></td>`;
    }).join('') + '</tr>').join('');
    return '<table class="spec">' + head + rows + '</table>';
  }).join('');
  document.body.dataset.specialisedExperts = found;
  document.body.dataset.specializationCells = cells;
}
async function refresh() {
  let r, d;
  try { r = await fetch('v1/expert-load', {headers: authHeaders()}); }
  catch (e) { document.getElementById('status').textContent = 'cannot reach the server: ' + e; return; }
  if (r.status === 401) { showLogin(sessionStorage.getItem(KEY) !== null); return; }
  if (!r.ok) { document.getElementById('status').textContent = 'the server answered ' + r.status; return; }
  document.getElementById('login').hidden = true;
  document.body.dataset.auth = sessionStorage.getItem(KEY) ? 'ok' : 'none';
  d = await r.json();
  showRecovery(d.stats, d.last_failure_cause);
  showKV(d.stats);
  showEplb(d.stats, d.placement);
  showSpecialization(d.by_token_class);
  const hm = document.getElementById('heatmap'), c = hm.getContext('2d');
  c.clearRect(0, 0, hm.width, hm.height);
  let nonzero = 0;
  const rows = d.expert_load.length, cols = rows ? d.expert_load[0].length : 0;
  const cw = hm.width / Math.max(cols, 1), ch = hm.height / Math.max(rows, 1);
  d.expert_load.forEach((row, y) => {
    const max = Math.max(...row, 1);
    row.forEach((v, x) => { if (v > 0) nonzero++; c.fillStyle = color(v / max); c.fillRect(x * cw, y * ch, cw - 1, ch - 1); });
  });
  hm.dataset.nonzeroCells = nonzero;
  bars(document.getElementById('balance'), d.balancedness, 1, d.moe_layers.map(l => 'L' + l), v => v.toFixed(2));
  const rankTotals = d.rank_load.length ? d.rank_load[0].map((_, r) => d.rank_load.reduce((s, l) => s + l[r], 0)) : [];
  bars(document.getElementById('ranks'), rankTotals, Math.max(...rankTotals, 1), rankTotals.map((_, r) => 'rank ' + r), v => String(v));
  document.getElementById('layers').innerHTML = '<tr><th>layer</th><th>balancedness</th><th>imbalance</th><th>idle experts</th></tr>' +
    d.moe_layers.map((l, i) => `<tr><td>${l}</td><td>${d.balancedness[i].toFixed(3)}</td><td>${d.imbalance[i].toFixed(2)}</td><td>${(100 * d.idle_fraction[i]).toFixed(0)}%</td></tr>`).join('');
  document.getElementById('status').textContent =
    `EP=${d.ep_size}, ${d.num_experts} experts, window of ${d.window_steps} steps; running ${d.stats.running}, waiting ${d.stats.waiting}`;
  document.body.dataset.nonzeroCells = nonzero;
}
refresh(); setInterval(refresh, 2000);
</script></body></html>
"""
