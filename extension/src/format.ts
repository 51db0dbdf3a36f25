/** Pure helpers: loss series, sparkline geometry, labels and generated code (unit-tested). */

import type {
  ConnectionState,
  ICheckpointInfo,
  IMetricPoint,
  IOverview,
  IRunInfo,
  IServerLoad,
  ISessionInfo
} from './types';

/** The name of the loss metric in a metrics dict: `loss`, `loss:mean`, `loss:sum`, else the first key naming loss. */
export function lossKey(metrics: Record<string, number>): string | null {
  for (const k of ['loss', 'loss:mean', 'loss:sum']) {
    if (k in metrics) {
      return k;
    }
  }
  const key = Object.keys(metrics)
    .sort()
    .find(k => k.toLowerCase().includes('loss'));
  return key ?? null;
}

/** The loss values of a metric history, in order, skipping points without a finite loss. */
export function lossSeries(points: IMetricPoint[]): number[] {
  const out: number[] = [];
  for (const p of points) {
    const key = lossKey(p.metrics ?? {});
    const v = key === null ? undefined : p.metrics[key];
    if (typeof v === 'number' && Number.isFinite(v)) {
      out.push(v);
    }
  }
  return out;
}

/**
 * Metrics to show for a run as `[key, label, value]`: the server's reduction suffix (`loss:sum` → `loss`) is
 * dropped from the label, `step` (shown elsewhere) is skipped, loss first (the per-token mean `loss` over the
 * batch total `loss:sum`), at most `max` entries.
 */
export function displayMetrics(metrics: Record<string, number>, max = 5): [string, string, number][] {
  const out: [string, string, number][] = [];
  const seen = new Set<string>();
  // `loss` (the per-token mean the server records, the number the notebook shows) beats `loss:sum` (batch total)
  const rank = (k: string): number => (k === 'loss' ? 0 : k.startsWith('loss') ? 1 : 2);
  const keys = Object.keys(metrics).sort((a, b) => rank(a) - rank(b));
  for (const k of keys) {
    const label = k.split(':')[0];
    if (label === 'step' || seen.has(label) || typeof metrics[k] !== 'number') {
      continue;
    }
    seen.add(label);
    out.push([k, label, metrics[k]]);
  }
  return out.slice(0, max);
}

/** SVG polyline points for `values` in a `width`×`height` box (highest value at the top). */
export function sparklinePoints(values: number[], width: number, height: number, pad = 2): string {
  if (values.length === 0) {
    return '';
  }
  const min = Math.min(...values);
  const max = Math.max(...values);
  const span = max - min || 1;
  const innerW = width - 2 * pad;
  const innerH = height - 2 * pad;
  const step = values.length > 1 ? innerW / (values.length - 1) : 0;
  return values
    .map((v, i) => {
      const x = pad + (values.length > 1 ? i * step : innerW / 2);
      const y = pad + (max === min ? innerH / 2 : ((max - v) / span) * innerH);
      return `${x.toFixed(1)},${y.toFixed(1)}`;
    })
    .join(' ');
}

/** A short number for display: 3 significant digits, exponent for tiny/huge values. */
export function formatNumber(v: number): string {
  if (!Number.isFinite(v)) {
    return String(v);
  }
  const a = Math.abs(v);
  if (a !== 0 && (a < 1e-3 || a >= 1e5)) {
    return v.toExponential(2);
  }
  if (Number.isInteger(v)) {
    return String(v);
  }
  return Number(v.toPrecision(4)).toString();
}

/** "5s ago", "3m ago", "2h ago" from epoch seconds. */
export function timeAgo(epochS: number, nowMs: number = Date.now()): string {
  const s = Math.max(0, Math.round(nowMs / 1000 - epochS));
  if (s < 60) {
    return `${s}s ago`;
  }
  if (s < 3600) {
    return `${Math.floor(s / 60)}m ago`;
  }
  if (s < 86400) {
    return `${Math.floor(s / 3600)}h ago`;
  }
  return `${Math.floor(s / 86400)}d ago`;
}

/** The status-bar text for an overview. */
export function statusText(ov: IOverview | null, pending = false): string {
  if (ov === null) {
    return pending ? 'Twinkle: checking…' : 'Twinkle: unknown';
  }
  switch (ov.state) {
    case 'connected': {
      const n = activeRunCount(ov);
      return `Twinkle: connected · ${n} active run${n === 1 ? '' : 's'}`;
    }
    case 'not_configured':
      return 'Twinkle: not connected';
    case 'server_down':
      return 'Twinkle: server down';
    case 'bad_key':
      return 'Twinkle: API key rejected';
    default:
      return 'Twinkle: error';
  }
}

export function activeRunCount(ov: IOverview): number {
  return ov.runs.filter(r => r.state === 'active').length;
}

export const STATE_LABELS: Record<ConnectionState, string> = {
  connected: 'Connected',
  not_configured: 'Not connected',
  server_down: 'Server unreachable',
  bad_key: 'API key rejected',
  error: 'Error',
  unknown: 'Checking…'
};

function pyString(s: string): string {
  return JSON.stringify(s);
}

function pyValue(v: unknown): string {
  if (v === null || v === undefined) {
    return 'None';
  }
  if (typeof v === 'boolean') {
    return v ? 'True' : 'False';
  }
  if (typeof v === 'number') {
    return Number.isFinite(v) ? String(v) : 'None';
  }
  if (typeof v === 'string') {
    return pyString(v);
  }
  if (Array.isArray(v)) {
    return `[${v.map(pyValue).join(', ')}]`;
  }
  const entries = Object.entries(v as Record<string, unknown>).map(([k, x]) => `${pyString(k)}: ${pyValue(x)}`);
  return `{${entries.join(', ')}}`;
}

/** The `twinkle_client.model` class for a backend name. */
export function modelClass(backend?: string | null): string {
  if (backend === 'mock') {
    return 'MockModel';
  }
  if (backend === 'megatron') {
    return 'MegatronModel';
  }
  return 'TransformersModel';
}

/** Python source of a notebook cell that loads a checkpoint into a new remote model. */
export function loadCheckpointCode(ckpt: ICheckpointInfo, run?: IRunInfo, backend?: string | null): string {
  const cls = modelClass(backend);
  const lines = [`# Load Twinkle checkpoint ${pyString(ckpt.name)} (run ${ckpt.run_id}, step ${ckpt.step})`];
  lines.push(`from twinkle_client.model import ${cls}`);
  lines.push('');
  lines.push(`model = ${cls}(model_id=${pyString(run?.base_model ?? 'BASE_MODEL')})`);
  const lora = Object.fromEntries(Object.entries(run?.lora ?? {}).filter(([, v]) => v !== null && v !== undefined));
  lines.push(`model.add_adapter_to_model("default", ${Object.keys(lora).length ? pyValue(lora) : '{"rank": 8}'})`);
  const opt = ckpt.kind === 'training' ? '' : ', load_optimizer=False';
  lines.push(`model.load(${pyString(ckpt.path)}${opt})`);
  return lines.join('\n');
}

/** The panel's list filter: text matches a run's name or id (a session's id), `mine` = this kernel's
 * session only, `active` = active runs / sessions only; runs sorted by `sort`. */
export interface IListFilter {
  text: string;
  mine: boolean;
  active: boolean;
  sort: 'recent' | 'name' | 'step';
}

export const DEFAULT_FILTER: IListFilter = { text: '', mine: false, active: true, sort: 'recent' };

export function filterRuns(runs: IRunInfo[], f: IListFilter, ownSession: string | null): IRunInfo[] {
  const q = f.text.trim().toLowerCase();
  const out = runs.filter(
    r =>
      (!q || (r.name ?? '').toLowerCase().includes(q) || r.run_id.toLowerCase().includes(q)) &&
      (!f.mine || (ownSession !== null && r.session_id === ownSession)) &&
      (!f.active || r.state === 'active')
  );
  const recent = (r: IRunInfo): number => r.last_request_time ?? r.created_at;
  const by: Record<IListFilter['sort'], (a: IRunInfo, b: IRunInfo) => number> = {
    recent: (a, b) => recent(b) - recent(a),
    name: (a, b) => (a.name ?? a.run_id).localeCompare(b.name ?? b.run_id),
    step: (a, b) => b.step - a.step
  };
  return out.sort(by[f.sort]);
}

export function filterSessions(sessions: ISessionInfo[], f: IListFilter, ownSession: string | null): ISessionInfo[] {
  const q = f.text.trim().toLowerCase();
  return sessions
    .filter(
      s =>
        (!q || s.session_id.toLowerCase().includes(q)) &&
        (!f.mine || s.session_id === ownSession) &&
        (!f.active || s.state === 'active')
    )
    .sort((a, b) => b.last_heartbeat - a.last_heartbeat);
}

/** A count with a k/M/G suffix: 950 → `950`, 12345 → `12.3k`, 4.2e6 → `4.2M`. */
export function compactCount(n: number): string {
  const a = Math.abs(n);
  for (const [div, suffix] of [
    [1e9, 'G'],
    [1e6, 'M'],
    [1e3, 'k']
  ] as [number, string][]) {
    if (a >= div) {
      const v = n / div;
      return `${v >= 100 ? v.toFixed(0) : v.toFixed(1)}${suffix}`;
    }
  }
  return String(Math.round(n));
}

/** Bytes as B / KB / MB / GB (powers of 1024). */
export function formatBytes(n: number): string {
  const units = ['B', 'KB', 'MB', 'GB', 'TB'];
  let v = n;
  let i = 0;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i += 1;
  }
  return i === 0 ? `${Math.round(v)} B` : `${v.toFixed(1)} ${units[i]}`;
}

/**
 * The panel's live-load lines from `GET load`: the server's queue depth, tokens/s over its window (all users),
 * and the caller's own usage summed over base models.
 */
export function loadLines(load: IServerLoad): { queue: string; rate: string; usage: string } {
  const busy = load.replicas.filter(r => r.queue_depth > 0).length;
  const queue =
    `queue ${load.queue_depth} request${load.queue_depth === 1 ? '' : 's'}` +
    (load.replicas.length > 1 ? ` (${busy}/${load.replicas.length} replicas busy)` : '');
  const r = load.tokens_per_s ?? {};
  const rate =
    `tokens/s (last ${Math.round(load.window_s)} s, all users): ` +
    `trained ${formatNumber(r.trained ?? 0)} · prefilled ${formatNumber(r.prefilled ?? 0)} · ` +
    `sampled ${formatNumber(r.sampled ?? 0)}`;
  const sum = (k: 'tokens_trained' | 'tokens_prefilled' | 'tokens_sampled' | 'checkpoint_bytes'): number =>
    load.usage.reduce((n, u) => n + (u[k] ?? 0), 0);
  const usage = load.usage.length
    ? `your usage: ${compactCount(sum('tokens_trained'))} trained · ${compactCount(sum('tokens_prefilled'))} ` +
      `prefilled · ${compactCount(sum('tokens_sampled'))} sampled tokens · ${formatBytes(sum('checkpoint_bytes'))} ` +
      'of checkpoints'
    : 'your usage: nothing yet';
  return { queue, rate, usage };
}
