// ptune dashboard: plain JavaScript over the coordinator's JSON API (/api/),
// charts with the vendored Chart.js and chartjs-chart-matrix, live updates
// from the server-sent events at /api/events. Routes live in the URL hash:
// #/, #/jobs?state=running, #/jobs/ID, #/sweeps, #/sweeps/ID, #/workers.
'use strict';

const STATES = ['queued', 'running', 'succeeded', 'failed', 'cancelled'];
const METHODS = ['prompt_tuning', 'prefix_tuning', 'p_tuning', 'p_tuning_v2', 'lora', 'full'];
const PALETTE = ['#2f6fdf', '#1f9d55', '#e08a1e', '#9a6fd0', '#d64545', '#17a2b8', '#8c564b', '#e377c2', '#7f7f7f', '#bcbd22'];

// ------------------------------------------------------------------ helpers

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === 'class') node.className = v;
    else if (k.startsWith('on')) node.addEventListener(k.slice(2), v);
    else if (k === 'dataset') Object.assign(node.dataset, v);
    else if (k === 'style') node.style.cssText = v;
    else node.setAttribute(k, v === true ? '' : v);
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    node.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return node;
}

/** Replaces a node's children, skipping null, undefined and false. */
function fill(node, ...children) {
  node.replaceChildren(...children.flat(Infinity).filter((c) => c !== null && c !== undefined && c !== false));
}

async function api(path) {
  const response = await fetch('/api' + path, { headers: { accept: 'application/json' } });
  const body = await response.json().catch(() => ({ error: response.statusText }));
  if (!response.ok) throw new Error(body.error || response.statusText);
  return body;
}

/** Numbers as people read them: integers as is, others to four significant digits. */
function fmt(v) {
  if (v === null || v === undefined || Number.isNaN(v)) return '–';
  if (typeof v !== 'number') return String(v);
  if (Number.isInteger(v)) return String(v);
  return String(parseFloat(v.toPrecision(4)));
}

function duration(seconds) {
  if (seconds === null || seconds === undefined) return '–';
  const s = Math.max(0, seconds);
  if (s < 1) return (s * 1000).toFixed(0) + ' ms';
  if (s < 60) return s.toFixed(1) + ' s';
  if (s < 3600) return Math.floor(s / 60) + ' min ' + Math.floor(s % 60) + ' s';
  if (s < 86400) return Math.floor(s / 3600) + ' h ' + Math.floor((s % 3600) / 60) + ' min';
  return Math.floor(s / 86400) + ' d ' + Math.floor((s % 86400) / 3600) + ' h';
}

function age(iso) {
  return iso ? duration((Date.now() - Date.parse(iso)) / 1000) : '–';
}

function when(iso) {
  return iso ? new Date(iso).toLocaleString() : '–';
}

function short(id) {
  return id ? String(id).slice(0, 8) : '–';
}

function stateBadge(state) {
  return el('span', { class: 'state ' + state }, state.replace('_', ' '));
}

function bytes(n) {
  if (n < 1024) return n + ' B';
  if (n < 1 << 20) return (n / 1024).toFixed(1) + ' KiB';
  return (n / (1 << 20)).toFixed(1) + ' MiB';
}

// A job's memory estimate and the peak its worker measured, each when known.
function memory(j) {
  const e = j.memory_estimate;
  const parts = [];
  if (e) parts.push(`estimate ${bytes(e.total_bytes)} (weights ${bytes(e.weights_bytes)}, job ${bytes(e.job_bytes)}, activations ${bytes(e.activation_bytes)})`);
  if (j.worker_peak_rss_bytes) parts.push(`worker peak ${bytes(j.worker_peak_rss_bytes)}`);
  return parts.length ? parts.join('; ') : '–';
}

function params(p) {
  return Object.entries(p || {}).map(([k, v]) => k.split('.').pop() + '=' + fmt(v)).join(' ');
}

function parseHash() {
  const hash = location.hash.replace(/^#/, '') || '/';
  const [path, query] = hash.split('?');
  return { parts: path.split('/').filter(Boolean), query: new URLSearchParams(query || '') };
}

/** Calls fn at most once per `ms`, the last request winning. */
function throttle(fn, ms) {
  let timer = null;
  let last = 0;
  return () => {
    if (timer) return;
    const wait = Math.max(0, last + ms - Date.now());
    timer = setTimeout(() => {
      timer = null;
      last = Date.now();
      fn();
    }, wait);
  };
}

// ------------------------------------------------------------------- charts

const charts = [];

function destroyCharts() {
  while (charts.length) charts.pop().destroy();
}

/** A figure with a canvas and a caption that states what the chart holds. */
function figure(id, title, tall) {
  const canvas = el('canvas', { id: 'chart-' + id });
  return el('figure', { class: tall ? 'tall' : '', id: 'fig-' + id },
    el('h2', {}, title), el('div', { class: 'chart-box' }, canvas), el('figcaption', { class: 'chart-summary' }, 'no data yet'));
}

function lineChart(id, yTitle) {
  const canvas = document.getElementById('chart-' + id);
  const chart = new Chart(canvas, {
    type: 'line',
    data: { datasets: [] },
    options: {
      animation: false,
      maintainAspectRatio: false,
      parsing: false,
      normalized: true,
      interaction: { mode: 'nearest', intersect: false },
      elements: { point: { radius: 0, hoverRadius: 4 }, line: { borderWidth: 1.5, tension: 0 } },
      scales: {
        x: { type: 'linear', title: { display: true, text: 'step' } },
        y: { title: { display: true, text: yTitle } },
      },
      plugins: { legend: { display: true, position: 'bottom', labels: { boxWidth: 12 } } },
    },
  });
  charts.push(chart);
  return chart;
}

/** Writes a chart's caption from the data the chart itself holds. */
function caption(id, text, dataset) {
  const cap = document.querySelector('#fig-' + id + ' figcaption');
  if (!cap) return;
  cap.textContent = text;
  Object.assign(cap.dataset, dataset || {});
}

// Viridis, sampled: the heatmap's colours from worst to best.
const VIRIDIS = ['#440154', '#482878', '#3e4989', '#31688e', '#26828e', '#1f9e89', '#35b779', '#6ece58', '#b5de2b', '#fde725'];

function colorScale(min, max, maximize) {
  return (v) => {
    if (v === null || v === undefined || Number.isNaN(v)) return '#e1e4ea';
    let t = max > min ? (v - min) / (max - min) : 1;
    if (!maximize) t = 1 - t;
    return VIRIDIS[Math.min(VIRIDIS.length - 1, Math.max(0, Math.round(t * (VIRIDIS.length - 1))))];
  };
}

// Writes each heatmap cell's value in its centre.
const cellLabels = {
  id: 'cellLabels',
  afterDatasetsDraw(chart) {
    const { ctx } = chart;
    chart.data.datasets.forEach((ds, i) => {
      chart.getDatasetMeta(i).data.forEach((element, j) => {
        const v = ds.data[j].v;
        if (v === null || v === undefined) return;
        const { x, y } = element.getCenterPoint();
        ctx.save();
        ctx.fillStyle = '#fff';
        ctx.font = '600 12px system-ui, sans-serif';
        ctx.textAlign = 'center';
        ctx.textBaseline = 'middle';
        ctx.fillText(fmt(v), x, y);
        ctx.restore();
      });
    });
  },
};

// -------------------------------------------------------------------- views

let view = null;

const views = {
  overview: {
    async mount(main) {
      this.throughput = [];
      main.append(
        el('h1', {}, 'Overview'),
        el('div', { class: 'cards', id: 'cards' }),
        el('div', { class: 'grid2' },
          el('div', { class: 'panel' }, figure('states', 'Jobs by state')),
          el('div', { class: 'panel' }, figure('throughput', 'Examples per second across the fleet (since this page opened)'))));
      this.states = new Chart(document.getElementById('chart-states'), {
        type: 'bar',
        data: { labels: STATES, datasets: [{ label: 'jobs', data: [], backgroundColor: STATES.map((s) => getComputedStyle(document.documentElement).getPropertyValue('--' + s).trim()) }] },
        options: { animation: false, maintainAspectRatio: false, plugins: { legend: { display: false } } },
      });
      charts.push(this.states);
      this.rate = lineChart('throughput', 'examples/s');
      this.rate.options.scales.x = { type: 'linear', title: { display: true, text: 'seconds ago' }, reverse: true };
      this.rate.data.datasets = [{ label: 'examples/s', data: [], borderColor: PALETTE[0], fill: false }];
      await this.refresh();
    },
    async refresh() {
      const o = await api('/overview');
      const q = o.queue;
      const card = (label, value, sub, id) => el('div', { class: 'card', id }, el('div', { class: 'label' }, label), el('div', { class: 'value' }, value), el('div', { class: 'sub' }, sub || ''));
      const total = Object.values(o.jobs).reduce((a, b) => a + b, 0);
      fill(document.getElementById('cards'), 
        card('Jobs', fmt(total), STATES.map((s) => s + ' ' + (o.jobs[s] || 0)).join(' · '), 'card-jobs'),
        card('Running', fmt(o.jobs.running || 0), 'sweeps running ' + (o.sweeps.running || 0), 'card-running'),
        card('Queue depth', fmt(q.depth), 'oldest waiting ' + duration(q.oldest_wait_seconds), 'card-queue'),
        card('Queue wait (15 min)', q.recent.leases ? duration(q.recent.mean_seconds) : '–',
          q.recent.leases ? `mean of ${q.recent.leases} leases · p95 ${duration(q.recent.p95_seconds)}` : 'no leases in the last 15 minutes', 'card-wait'),
        card('Workers online', fmt(o.workers.online), '', 'card-workers'),
        card('Slots busy', `${o.workers.slots_busy} / ${o.workers.slots}`, 'open leases / slots online', 'card-slots'),
        card('Examples / s', fmt(o.examples_per_second), 'sum of running jobs\' latest rate', 'card-rate'));
      this.states.data.datasets[0].data = STATES.map((s) => o.jobs[s] || 0);
      this.states.update('none');
      caption('states', STATES.map((s) => `${s} ${o.jobs[s] || 0}`).join(', '), { total: String(total) });
      const now = Date.parse(o.now);
      this.throughput.push({ t: now, v: o.examples_per_second });
      this.throughput = this.throughput.filter((p) => now - p.t < 600000);
      this.rate.data.datasets[0].data = this.throughput.map((p) => ({ x: (now - p.t) / 1000, y: p.v }));
      this.rate.update('none');
      caption('throughput', `${fmt(o.examples_per_second)} examples/s now`, { last: String(o.examples_per_second) });
    },
    onJobs() { this.refreshSoon(); },
    onTick() { this.refreshSoon(); },
  },

  jobs: {
    async mount(main, route) {
      const q = route.query;
      this.query = {
        state: q.get('state') || '', method: q.get('method') || '', base_model: q.get('base_model') || '',
        owner: q.get('owner') || '', sweep: q.get('sweep') || '', name: q.get('name') || '',
        sort: q.get('sort') || 'created', order: q.get('order') || 'desc', limit: Number(q.get('limit') || 50), after: q.get('after') || '',
      };
      // Cursors of the pages before this one (pages are read after a cursor, never by offset).
      this.trail = [];
      this.position = 0;
      const select = (name, values) => el('select', { name, onchange: (e) => this.set(name, e.target.value) },
        el('option', { value: '' }, 'any'), values.map((v) => el('option', { value: v, selected: this.query[name] === v }, v)));
      const input = (name, placeholder) => el('input', { name, value: this.query[name], placeholder, onchange: (e) => this.set(name, e.target.value.trim()) });
      main.append(
        el('h1', {}, 'Jobs'),
        el('form', { class: 'filters', onsubmit: (e) => e.preventDefault() },
          el('label', {}, 'state', select('state', STATES)),
          el('label', {}, 'method', select('method', METHODS)),
          el('label', {}, 'base model', input('base_model', 'any')),
          el('label', {}, 'owner', input('owner', 'any')),
          el('label', {}, 'sweep id', input('sweep', 'any')),
          el('label', {}, 'name starts with', input('name', 'any'))),
        el('div', { id: 'jobs-table' }),
        el('div', { class: 'pager', id: 'jobs-pager' }));
      await this.refresh();
    },
    set(name, value) {
      this.query[name] = value;
      if (name !== 'after') { this.query.after = ''; this.trail = []; this.position = 0; }
      const params = new URLSearchParams(Object.entries(this.query).filter(([, v]) => v !== '' && v !== null));
      history.replaceState(null, '', '#/jobs?' + params);
      this.refresh();
    },
    async refresh() {
      const params = new URLSearchParams(Object.entries(this.query).filter(([, v]) => v !== ''));
      const page = await api('/jobs?' + params);
      const columns = [
        ['name', 'name'], ['state', 'state'], ['method', 'method'], ['base_model', 'base model'], ['sweep', 'sweep'],
        ['owner', 'owner'], [null, 'progress'], [null, 'loss'], [null, 'attempts'], ['created', 'age'],
      ];
      const head = el('tr', {}, columns.map(([key, label]) => {
        if (!key) return el('th', {}, label);
        const sorted = this.query.sort === key ? ' sorted-' + this.query.order : '';
        return el('th', {
          class: 'sortable' + sorted, dataset: { sort: key },
          onclick: () => {
            const order = this.query.sort === key && this.query.order === 'desc' ? 'asc' : 'desc';
            this.query.sort = key;
            this.set('order', order);
          },
        }, label);
      }));
      const rows = page.jobs.map((j) => el('tr', { class: 'link', dataset: { jobId: j.id }, onclick: () => { location.hash = '#/jobs/' + j.id; } },
        el('td', {}, el('a', { href: '#/jobs/' + j.id }, j.name)),
        el('td', {}, stateBadge(j.early_stopped ? 'early_stopped' : j.state)),
        el('td', {}, j.method),
        el('td', {}, j.base_model),
        el('td', {}, j.sweep_id ? el('a', { href: '#/sweeps/' + j.sweep_id, onclick: (e) => e.stopPropagation() }, (j.sweep_name || short(j.sweep_id)) + ' #' + j.trial_index) : '–'),
        el('td', {}, j.owner || '–'),
        el('td', { class: 'num' }, `${j.step} / ${j.total_steps}`),
        el('td', { class: 'num' }, fmt(j.loss)),
        el('td', { class: 'num' }, `${j.attempts} / ${j.max_attempts}`),
        el('td', { class: 'num', title: when(j.created_at) }, age(j.created_at))));
      fill(document.getElementById('jobs-table'), 
        el('table', { id: 'jobs', dataset: { total: String(page.total) } }, el('thead', {}, head), el('tbody', {}, rows)));
      const from = page.jobs.length ? this.position + 1 : 0;
      const to = this.position + page.jobs.length;
      const total = page.total_at_least ? `${page.total}+` : String(page.total);
      fill(document.getElementById('jobs-pager'), 
        el('button', { disabled: !this.trail.length, onclick: () => {
          this.position = Math.max(0, this.position - page.limit);
          this.set('after', this.trail.pop());
        } }, '← newer'),
        el('span', { id: 'jobs-range' }, `${from}–${to} of ${total}`),
        el('button', { disabled: !page.next, onclick: () => {
          this.trail.push(this.query.after);
          this.position += page.jobs.length;
          this.set('after', page.next);
        } }, 'older →'));
    },
    onJobs() { this.refreshSoon(); },
    onTick() { this.refreshSoon(); },
  },

  job: {
    async mount(main, route) {
      this.id = route.parts[1];
      this.series = new Map();
      main.append(el('div', { id: 'job-head' }),
        el('div', { class: 'grid2' },
          el('div', { class: 'panel' }, figure('loss', 'Training loss')),
          el('div', { class: 'panel' }, figure('eval', 'Evaluation'))),
        el('div', { class: 'grid2' },
          el('div', { class: 'panel', id: 'job-meta' }),
          el('div', { class: 'panel' }, figure('rate', 'Examples per second'))),
        el('div', { class: 'panel' }, el('h2', {}, 'Attempts'), el('div', { id: 'job-attempts' })),
        el('div', { class: 'panel' }, el('h2', {}, 'Spec'), el('pre', { id: 'job-spec' })));
      this.loss = lineChart('loss', 'loss');
      this.eval = lineChart('eval', 'value');
      this.rate = lineChart('rate', 'examples/s');
      await Promise.all([this.refresh(), this.refreshCurves()]);
    },
    async refresh() {
      const j = await api('/jobs/' + this.id);
      const pct = j.total_steps ? Math.min(100, (100 * j.step) / j.total_steps) : 0;
      fill(document.getElementById('job-head'), 
        el('h1', {}, j.name, ' ', stateBadge(j.early_stopped ? 'early_stopped' : j.state)),
        el('p', {}, el('span', { class: 'progress' }, el('div', { style: `width:${pct}%` })), ` step ${j.step} of ${j.total_steps}`,
          j.adapter ? el('span', {}, ' · ', el('a', { id: 'adapter-link', href: `/api/jobs/${j.id}/adapter`, download: `ptune-adapter-${j.id}.tar` }, `download adapter (${bytes(j.adapter.size)})`)) : null),
        j.waiting_reason ? el('p', { id: 'job-waiting' }, 'waiting: ' + j.waiting_reason) : null,
        j.error ? el('p', { class: 'error', id: 'job-error' }, j.error) : null);
      const meta = [
        ['id', el('code', {}, j.id)], ['method', j.method], ['base model', j.base_model], ['owner', j.owner || '–'],
        ['sweep', j.sweep ? el('a', { href: '#/sweeps/' + j.sweep.id }, `${j.sweep.name} · trial #${j.sweep.trial_index}`) : '–'],
        ['worker', j.worker_id ? el('code', {}, j.worker_id) : '–'], ['devices', j.devices && j.devices.length ? j.devices.join(', ') : '–'], ['attempts', `${j.attempts} (${j.failures} failed of at most ${j.max_attempts}` + (j.interruptions ? `, ${j.interruptions} interrupted` : '') + ')'
          + (j.checkpoint_step ? `; resumes at step ${j.checkpoint_step}` : '') + (j.retry_at ? `; retried after ${new Date(j.retry_at).toLocaleTimeString()}` : '')],
        ['memory', memory(j)],
        ['submitted', when(j.created_at)], ['started', when(j.started_at)], ['finished', when(j.finished_at)],
        ['adapter sha256', j.adapter ? el('code', {}, j.adapter.sha256) : '–'],
      ];
      fill(document.getElementById('job-meta'), el('h2', {}, 'Job'), el('dl', { class: 'meta' }, meta.map(([k, v]) => [el('dt', {}, k), el('dd', {}, v)])));
      fill(document.getElementById('job-attempts'), j.attempt_history.length ? el('table', { id: 'attempts' },
        el('thead', {}, el('tr', {}, ['#', 'worker', 'devices', 'leased', 'ended', 'outcome', 'reason'].map((h) => el('th', {}, h)))),
        el('tbody', {}, j.attempt_history.map((a) => el('tr', {},
          el('td', {}, a.attempt), el('td', { title: a.worker_id }, (a.hostname || '?') + ' · ' + short(a.worker_id)),
          el('td', { class: 'attempt-devices' }, a.devices && a.devices.length ? a.devices.join(', ') : '–'), el('td', {}, when(a.leased_at)), el('td', {}, a.ended_at ? when(a.ended_at) : 'open, expires ' + when(a.lease_expires_at)),
          el('td', {}, a.outcome ? a.outcome.replace('_', ' ') : 'running'), el('td', { class: 'wrap' }, a.reason || '–')))))
        : el('p', { class: 'muted' }, 'not leased yet'));
      document.getElementById('job-spec').textContent = JSON.stringify(j.spec, null, 2);
    },
    async refreshCurves() {
      // Re-read from one step before the last seen: a completion may add
      // evaluation points at the step a progress report already covered.
      let last = -1;
      for (const points of this.series.values()) if (points.length) last = Math.max(last, points[points.length - 1].x);
      const m = await api('/jobs/' + this.id + '/metrics' + (last > 0 ? '?after_step=' + (last - 1) : ''));
      for (const s of m.series) {
        const key = s.kind + '/' + s.name;
        const points = this.series.get(key) || [];
        for (const [x, y] of s.points) {
          const at = points.findIndex((p) => p.x === x);
          if (at >= 0) points[at].y = y; else points.push({ x, y });
        }
        points.sort((a, b) => a.x - b.x);
        this.series.set(key, points);
      }
      const datasets = (filter) => [...this.series.entries()].filter(([k]) => filter(k)).map(([k, points], i) => ({
        label: k.replace('/', ' '), data: points, borderColor: PALETTE[i % PALETTE.length], backgroundColor: PALETTE[i % PALETTE.length],
        pointRadius: points.length < 40 ? 2 : 0,
      }));
      this.loss.data.datasets = datasets((k) => k === 'train/loss');
      this.eval.data.datasets = datasets((k) => k.startsWith('eval/'));
      this.rate.data.datasets = datasets((k) => k === 'train/examples_per_second');
      for (const [id, chart] of [['loss', this.loss], ['eval', this.eval], ['rate', this.rate]]) {
        chart.update('none');
        const parts = chart.data.datasets.map((d) => {
          const p = d.data[d.data.length - 1];
          return `${d.label}: ${d.data.length} points, last ${fmt(p.y)} at step ${p.x}`;
        });
        const total = chart.data.datasets.reduce((a, d) => a + d.data.length, 0);
        caption(id, parts.length ? parts.join('; ') : 'no data yet', { points: String(total) });
      }
    },
    onJobs(e) {
      if (e.more || e.changed.includes(this.id)) this.refreshSoon();
      if (e.more || e.changed.includes(this.id) || e.progressed.includes(this.id)) this.curvesSoon();
    },
    // Reports handled by another coordinator reach this page only through ticks.
    onTick() { this.refreshSoon(); this.curvesSoon(); },
  },

  sweeps: {
    async mount(main) {
      main.append(el('h1', {}, 'Sweeps'), el('div', { id: 'sweeps-table' }));
      await this.refresh();
    },
    async refresh() {
      const page = await api('/sweeps?limit=100');
      fill(document.getElementById('sweeps-table'), el('table', { id: 'sweeps' },
        el('thead', {}, el('tr', {}, ['name', 'state', 'algorithm', 'objective', 'trials', 'best finished', 'its parameters', 'age'].map((h) => el('th', {}, h)))),
        el('tbody', {}, page.sweeps.map((s) => el('tr', { class: 'link', onclick: () => { location.hash = '#/sweeps/' + s.id; } },
          el('td', {}, el('a', { href: '#/sweeps/' + s.id }, s.name)), el('td', {}, stateBadge(s.state)), el('td', {}, s.algorithm),
          el('td', {}, `${s.objective.metric} (${s.objective.direction})`),
          el('td', {}, `${s.trials_created} / ${s.trial_budget} · ${s.counts.running} running · ${s.counts.early_stopped} stopped`),
          el('td', { class: 'num' }, s.best ? fmt(s.best.objective) : '–'), el('td', {}, s.best ? '#' + s.best.index + ' ' + params(s.best.params) : '–'),
          el('td', {}, age(s.created_at)))))));
      if (!page.sweeps.length) document.getElementById('sweeps-table').append(el('p', { class: 'muted' }, 'no sweeps yet'));
    },
    onJobs() { this.refreshSoon(); },
    onTick() { this.refreshSoon(); },
  },

  sweep: {
    async mount(main, route) {
      this.id = route.parts[1];
      main.append(el('div', { id: 'sweep-head' }),
        el('div', { class: 'grid2' },
          el('div', { class: 'panel' }, figure('heatmap', 'Objective by prompt length and learning rate', true), el('div', { id: 'heatmap-values' })),
          el('div', { class: 'panel' }, figure('curves', 'Objective of every trial', true))),
        el('div', { class: 'panel' }, el('h2', {}, 'Leaderboard'), el('div', { id: 'leaderboard' })));
      this.curves = lineChart('curves', 'objective');
      await this.refresh();
    },
    async refresh() {
      const [s, c] = await Promise.all([api('/sweeps/' + this.id), api('/sweeps/' + this.id + '/curves')]);
      const maximize = s.objective.direction === 'maximize';
      fill(document.getElementById('sweep-head'), 
        el('h1', {}, s.name, ' ', stateBadge(s.state)),
        el('p', {}, `${s.algorithm} · ${s.objective.metric} (${s.objective.direction}) · ${s.trials_created} of ${s.trial_budget} trials · `,
          el('a', { href: '#/jobs?sweep=' + s.id + '&sort=sweep&order=asc' }, 'trials in the jobs table'),
          s.best_trial !== null ? ` · best finished trial #${s.best_trial} (the leaderboard also ranks running trials, by their latest value)` : ''),
        s.error ? el('p', { class: 'error' }, s.error) : null);
      this.renderLeaderboard(s);
      this.renderHeatmap(s, maximize);
      this.renderCurves(s, c);
    },
    renderLeaderboard(s) {
      const keys = [...new Set(s.leaderboard.flatMap((t) => Object.keys(t.params)))].sort();
      fill(document.getElementById('leaderboard'), el('table', { id: 'leaderboard-table' },
        el('thead', {}, el('tr', {}, ['rank', 'trial', ...keys, s.objective.metric, 'state', 'steps', 'job'].map((h) => el('th', {}, h)))),
        el('tbody', {}, s.leaderboard.map((t) => el('tr', { class: t.index === s.best_trial ? 'best' : '', dataset: { trial: String(t.index) } },
          el('td', { class: 'num' }, t.rank ?? '–'), el('td', { class: 'num' }, '#' + t.index),
          keys.map((k) => el('td', { class: 'num' }, fmt(t.params[k]))),
          el('td', { class: 'num objective' }, fmt(t.objective)),
          el('td', {}, stateBadge(t.state), t.stopped_rung !== null ? ` @ rung ${t.stopped_rung}` : '', t.failure_reason ? ` (${t.failure_reason})` : ''),
          el('td', { class: 'num' }, `${t.step} / ${t.total_steps}`),
          el('td', {}, el('a', { href: '#/jobs/' + t.job_id }, short(t.job_id))))))));
    },
    /** Picks the two axes: prompt length and learning rate when the space has them. */
    axes(s) {
      const keys = [...new Set(s.leaderboard.flatMap((t) => Object.keys(t.params)))]
        .filter((k) => s.leaderboard.some((t) => typeof t.params[k] === 'number'));
      const x = keys.find((k) => k.endsWith('num_virtual_tokens')) || keys[0];
      const y = keys.find((k) => k.endsWith('learning_rate') && k !== x) || keys.find((k) => k !== x);
      return [x, y];
    },
    renderHeatmap(s, maximize) {
      const [xKey, yKey] = this.axes(s);
      const box = document.getElementById('heatmap-values');
      if (!xKey) {
        caption('heatmap', 'the space has no numeric parameter');
        return;
      }
      const value = (t, k) => (k ? t.params[k] : 'all');
      const xs = [...new Set(s.leaderboard.map((t) => value(t, xKey)).filter((v) => v !== undefined))].sort((a, b) => a - b);
      const ys = [...new Set(s.leaderboard.map((t) => value(t, yKey)).filter((v) => v !== undefined))].sort((a, b) => a - b);
      // The best objective of the trials in each cell.
      const cells = new Map();
      for (const t of s.leaderboard) {
        if (t.objective === null || t.objective === undefined) continue;
        const key = fmt(value(t, xKey)) + '|' + fmt(value(t, yKey));
        const old = cells.get(key);
        if (!old || (maximize ? t.objective > old.v : t.objective < old.v)) cells.set(key, { v: t.objective, trial: t.index });
      }
      const values = [...cells.values()].map((c) => c.v);
      const color = colorScale(Math.min(...values), Math.max(...values), maximize);
      const data = [];
      for (const x of xs) for (const y of ys) {
        const c = cells.get(fmt(x) + '|' + fmt(y));
        data.push({ x: fmt(x), y: fmt(y), v: c ? c.v : null, trial: c ? c.trial : null });
      }
      if (this.heatmap) {
        this.heatmap.destroy();
        charts.splice(charts.indexOf(this.heatmap), 1);
      }
      const canvas = document.getElementById('chart-heatmap');
      this.heatmap = new Chart(canvas, {
        type: 'matrix',
        data: { datasets: [{
          label: s.objective.metric, data,
          backgroundColor: (ctx) => color(ctx.dataset.data[ctx.dataIndex]?.v),
          borderColor: '#fff', borderWidth: 1,
          width: ({ chart }) => (chart.chartArea || {}).width / xs.length - 2,
          height: ({ chart }) => (chart.chartArea || {}).height / ys.length - 2,
        }] },
        options: {
          animation: false, maintainAspectRatio: false,
          plugins: { legend: { display: false }, tooltip: { callbacks: {
            title: () => '',
            label: (ctx) => { const d = ctx.raw; return `${xKey}=${d.x} ${yKey || ''}=${d.y}: ${fmt(d.v)}${d.trial !== null ? ' (trial #' + d.trial + ')' : ''}`; },
          } } },
          scales: {
            x: { type: 'category', labels: xs.map(fmt), offset: true, grid: { display: false }, title: { display: true, text: xKey } },
            y: { type: 'category', labels: ys.map(fmt), offset: true, reverse: true, grid: { display: false }, title: { display: true, text: yKey || '' } },
          },
        },
        plugins: [cellLabels],
      });
      charts.push(this.heatmap);
      caption('heatmap', `${cells.size} of ${xs.length * ys.length} cells evaluated; colour: ${s.objective.metric}, ${maximize ? 'brighter is higher' : 'brighter is lower'}`,
        { cells: String(cells.size), x: xKey, y: yKey || '' });
      fill(box, el('details', { open: true }, el('summary', { class: 'muted' }, 'values'),
        el('table', { class: 'heatmap-table', id: 'heatmap-table', dataset: { x: xKey, y: yKey || '' } },
          el('thead', {}, el('tr', {}, el('th', {}, (yKey || '').split('.').pop() + ' \\ ' + xKey.split('.').pop()), xs.map((x) => el('th', {}, fmt(x))))),
          el('tbody', {}, ys.map((y) => el('tr', {}, el('th', {}, fmt(y)), xs.map((x) => {
            const c = cells.get(fmt(x) + '|' + fmt(y));
            return c ? el('td', { style: 'background:' + color(c.v), dataset: { trial: String(c.trial) } }, fmt(c.v)) : el('td', { class: 'empty' }, '–');
          })))))));
    },
    renderCurves(s, c) {
      const byIndex = new Map(s.leaderboard.map((t) => [t.index, t]));
      this.curves.data.datasets = c.trials.map((trial, i) => {
        const t = byIndex.get(trial.index) || {};
        const best = trial.index === s.best_trial;
        const stopped = t.state === 'early_stopped';
        const points = trial.points.map(([x, y]) => ({ x, y }));
        const colour = best ? '#d62728' : stopped ? '#9aa3b2' : PALETTE[i % PALETTE.length];
        return {
          label: `#${trial.index} ${params(t.params)}${best ? ' (best)' : ''}${stopped ? ' (stopped)' : ''}`,
          data: points, borderColor: colour, backgroundColor: colour,
          borderWidth: best ? 3.5 : 1.5, borderDash: stopped ? [5, 4] : [],
          pointRadius: points.map((_, j) => (stopped && j === points.length - 1 ? 6 : 2)),
          pointStyle: points.map((_, j) => (stopped && j === points.length - 1 ? 'crossRot' : 'circle')),
          order: best ? 0 : 1,
        };
      });
      this.curves.options.plugins.legend.display = c.trials.length <= 16;
      this.curves.options.scales.y.title.text = c.metric;
      this.curves.update('none');
      const stopped = s.leaderboard.filter((t) => t.state === 'early_stopped').length;
      const points = this.curves.data.datasets.reduce((a, d) => a + d.data.length, 0);
      const best = byIndex.get(s.best_trial);
      caption('curves', `${c.metric} of ${c.trials.length} trials, ${points} points; ${stopped} stopped early (dashed)` +
        (best ? `; best finished trial #${best.index} at ${fmt(best.objective)} (thick red)` : ''), { points: String(points), trials: String(c.trials.length) });
    },
    onJobs() { this.refreshSoon(); },
    onTick() { this.refreshSoon(); },
  },

  workers: {
    async mount(main) {
      this.offset = 0;
      main.append(el('h1', {}, 'Workers'), el('div', { id: 'workers-table' }), el('div', { class: 'pager', id: 'workers-pager' }));
      await this.refresh();
    },
    async refresh() {
      const page = await api('/workers?limit=100&offset=' + this.offset);
      const list = (items, f) => (items || []).map(f).join(', ') || '–';
      fill(document.getElementById('workers-table'), el('table', { id: 'workers' },
        el('thead', {}, el('tr', {}, ['host', 'id', 'status', 'heartbeat', 'devices', 'slots in use', 'base models', 'in memory', 'examples/s', 'packs running', 'running jobs'].map((h) => el('th', {}, h)))),
        el('tbody', {}, page.workers.map((w) => el('tr', { dataset: { worker: w.id } },
          el('td', {}, w.hostname), el('td', {}, el('code', { title: w.id }, short(w.id))),
          el('td', { title: w.unhealthy_reason || '' }, stateBadge(!w.online ? 'offline' : w.unhealthy_reason ? 'unhealthy' : 'online'),
            w.online && w.unhealthy_reason ? el('div', { class: 'muted' }, w.unhealthy_reason) : ''),
          el('td', { class: 'num' }, duration(w.heartbeat_age_seconds) + ' ago'),
          el('td', {}, list(w.devices, (d) => d.name + (d.memory_bytes ? ` (${bytes(d.memory_bytes)}` + (d.free_memory_bytes ? `, ${bytes(d.free_memory_bytes)} free` : '') + ')' : ''))),
          el('td', { class: 'num' }, `${w.slots_busy} / ${w.slots}`),
          el('td', {}, list(w.models, (m) => m.name)),
          el('td', { title: 'base models held at the last lease request' + (w.memory_bytes ? `; may use ${bytes(w.memory_bytes)}` : '') }, list(w.loaded_models, (m) => m)),
          el('td', { class: 'num' }, fmt(w.examples_per_second)),
          el('td', { class: 'num', title: 'jobs on one base model that share every step\'s passes (from their latest pack_jobs metric)' },
            w.packs_running ? `${w.packs_running} (${w.packed_jobs} jobs)` : '0'),
          el('td', {}, w.running_jobs.length ? w.running_jobs.map((id) => el('a', { href: '#/jobs/' + id }, short(id) + ' ')) : '–'))))));
      if (!page.workers.length) document.getElementById('workers-table').append(el('p', { class: 'muted' }, 'no worker has registered yet'));
      const to = page.offset + page.workers.length;
      fill(document.getElementById('workers-pager'), 
        el('button', { disabled: page.offset === 0, onclick: () => { this.offset = Math.max(0, page.offset - page.limit); this.refresh(); } }, '← previous'),
        el('span', {}, `${page.total ? page.offset + 1 : 0}–${to} of ${page.total}`),
        el('button', { disabled: to >= page.total, onclick: () => { this.offset = page.offset + page.limit; this.refresh(); } }, 'next →'));
    },
    onTick() { this.refreshSoon(); },
    onJobs() { this.refreshSoon(); },
  },
};

// ------------------------------------------------------------ routing, live

function showError(e) {
  const main = document.getElementById('main');
  const box = document.getElementById('error-box') || main.appendChild(el('p', { class: 'error', id: 'error-box' }));
  box.textContent = String(e.message || e);
}

function guarded(fn) {
  return () => Promise.resolve().then(fn).then(() => document.getElementById('error-box')?.remove(), showError);
}

async function route() {
  const r = parseHash();
  const name = r.parts[0] === 'jobs' ? (r.parts[1] ? 'job' : 'jobs') : r.parts[0] === 'sweeps' ? (r.parts[1] ? 'sweep' : 'sweeps') : r.parts[0] === 'workers' ? 'workers' : 'overview';
  destroyCharts();
  const main = document.getElementById('main');
  main.replaceChildren();
  document.body.dataset.view = name;
  document.querySelectorAll('nav a').forEach((a) => a.classList.toggle('active', name.startsWith(a.dataset.nav.replace(/s$/, ''))));
  const current = Object.create(views[name]);
  current.refreshSoon = throttle(guarded(() => view === current && current.refresh()), 1000);
  if (current.refreshCurves) current.curvesSoon = throttle(guarded(() => view === current && current.refreshCurves()), 500);
  view = current;
  try {
    await current.mount(main, r);
    if (view === current) document.body.dataset.ready = name;
  } catch (e) {
    showError(e);
  }
}

function connect() {
  const live = document.getElementById('live');
  const events = new EventSource('/api/events');
  events.addEventListener('hello', () => { live.textContent = 'live'; live.classList.add('on'); });
  events.addEventListener('jobs', (e) => view?.onJobs?.(JSON.parse(e.data)));
  events.addEventListener('tick', () => view?.onTick?.());
  events.onerror = () => { live.textContent = 'reconnecting'; live.classList.remove('on'); };
}

window.addEventListener('hashchange', route);
// The live stream opens once the first render has settled: the first paint
// needs only the JSON reads, and an open stream would otherwise hold up
// tools that wait for the page to go idle (a headless browser's snapshot).
route().then(() => setTimeout(connect, 2000));
