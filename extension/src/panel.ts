/** The Twinkle sidebar: connection, sessions, runs (metrics + loss sparkline), checkpoints. */

import { Widget } from '@lumino/widgets';

import {
  DEFAULT_FILTER,
  type IListFilter,
  STATE_LABELS,
  displayMetrics,
  filterRuns,
  filterSessions,
  formatNumber,
  loadLines,
  sparklinePoints,
  timeAgo
} from './format';
import type { TwinkleModel } from './model';
import type { ConnectionState, ICheckpointInfo, IOverview, IRunInfo } from './types';

export interface IPanelActions {
  connect(): void;
  refresh(): void;
  copyPath(ckpt: ICheckpointInfo): void;
  insertLoadCell(ckpt: ICheckpointInfo, run: IRunInfo): void;
  deleteCheckpoint(ckpt: ICheckpointInfo): void;
  stopRun(run: IRunInfo): void;
  deleteRun(run: IRunInfo): void;
}

/** Runs and sessions shown per page ("Show more" adds a page). */
export const PAGE_SIZE = 10;

type Child = Node | string | null | undefined | false;

function h(tag: string, attrs: Record<string, string> = {}, ...children: Child[]): HTMLElement {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    el.setAttribute(k, v);
  }
  for (const c of children) {
    if (c === null || c === undefined || c === false) {
      continue;
    }
    el.append(typeof c === 'string' ? document.createTextNode(c) : c);
  }
  return el;
}

function button(label: string, title: string, cls: string, onClick: () => void): HTMLElement {
  const b = h('button', { class: `jp-Button twk-btn ${cls}`, title, type: 'button' }, label);
  b.addEventListener('click', ev => {
    ev.stopPropagation();
    onClick();
  });
  return b;
}

const SVG_NS = 'http://www.w3.org/2000/svg';

function sparkline(values: number[]): SVGElement {
  const w = 140;
  const hgt = 32;
  const svg = document.createElementNS(SVG_NS, 'svg');
  svg.setAttribute('class', 'twk-sparkline');
  svg.setAttribute('width', String(w));
  svg.setAttribute('height', String(hgt));
  svg.setAttribute('viewBox', `0 0 ${w} ${hgt}`);
  svg.setAttribute('data-points', String(values.length));
  const line = document.createElementNS(SVG_NS, 'polyline');
  line.setAttribute('points', sparklinePoints(values, w, hgt));
  line.setAttribute('fill', 'none');
  svg.appendChild(line);
  if (values.length > 0) {
    const last = sparklinePoints(values, w, hgt).split(' ').pop()!.split(',');
    const dot = document.createElementNS(SVG_NS, 'circle');
    dot.setAttribute('cx', last[0]);
    dot.setAttribute('cy', last[1]);
    dot.setAttribute('r', '2');
    svg.appendChild(dot);
  }
  return svg;
}

export class TwinklePanel extends Widget {
  /** The list filter (kept across re-renders: the filter bar is built once, so typing keeps focus). */
  filter: IListFilter = { ...DEFAULT_FILTER };
  private _pages = { runs: 1, sessions: 1 };
  private _top = h('div', { class: 'twk-root twk-top' });
  private _bar: HTMLElement;
  private _lists = h('div', { class: 'twk-root twk-lists' });

  constructor(
    private readonly model: TwinkleModel,
    private readonly actions: IPanelActions
  ) {
    super();
    this.id = 'twinkle-panel';
    this.addClass('twk-panel');
    this.title.caption = 'Twinkle';
    this._bar = this._filterBar();
    this.node.append(this._top, this._bar, this._lists);
    model.onChange(() => this.render());
    this.render();
  }

  private _filterBar(): HTMLElement {
    const text = h('input', {
      class: 'jp-mod-styled twk-filter-text',
      type: 'search',
      placeholder: 'filter by name or id'
    }) as HTMLInputElement;
    text.addEventListener('input', () => this._set({ text: text.value }));
    const toggle = (key: 'mine' | 'active', label: string, title: string): HTMLElement => {
      const box = h('input', { type: 'checkbox', class: `twk-filter-${key}` }) as HTMLInputElement;
      box.checked = this.filter[key];
      box.addEventListener('change', () => this._set({ [key]: box.checked }));
      return h('label', { class: 'twk-filter-toggle', title }, box, ` ${label}`);
    };
    const sort = h('select', { class: 'jp-mod-styled twk-filter-sort', title: 'sort runs' }) as HTMLSelectElement;
    for (const [v, label] of [
      ['recent', 'recent first'],
      ['name', 'by name'],
      ['step', 'by step']
    ]) {
      sort.append(h('option', { value: v }, label));
    }
    sort.addEventListener('change', () => this._set({ sort: sort.value as IListFilter['sort'] }));
    return h(
      'div',
      { class: 'twk-filterbar' },
      text,
      toggle('mine', 'this kernel', "only this kernel's session and its runs"),
      toggle('active', 'active', 'only active sessions and runs'),
      sort
    );
  }

  private _set(change: Partial<IListFilter>): void {
    this.filter = { ...this.filter, ...change };
    this._pages = { runs: 1, sessions: 1 };
    this.render();
  }

  render(): void {
    const m = this.model;
    const ov = m.localError === null ? m.overview : null;
    const state = m.state as ConnectionState;
    const root = this._top;
    root.replaceChildren(
      h(
        'div',
        { class: 'twk-header' },
        h('span', { class: 'twk-title' }, 'Twinkle'),
        h('span', { class: `twk-badge twk-state-${state}`, 'data-state': state }, STATE_LABELS[state] ?? state),
        h(
          'span',
          { class: 'twk-header-actions' },
          button('⟳', 'Refresh now', 'twk-refresh', () => this.actions.refresh()),
          button('Connect', 'Twinkle: Connect to server', 'twk-connect', () => this.actions.connect())
        )
      )
    );
    root.append(h('div', { class: `twk-message twk-message-${state}`, 'data-state': state }, m.message));
    if (ov && ov.connection) {
      root.append(this._connection(ov));
    }
    const connected = !!ov && ov.state === 'connected';
    this._bar.style.display = connected ? '' : 'none';
    this._lists.replaceChildren();
    if (ov && connected) {
      this._lists.append(this._sessions(ov), this._runs(ov));
    }
  }

  private _more(kind: 'runs' | 'sessions', shown: number, total: number): HTMLElement | null {
    if (shown >= total) {
      return null;
    }
    return button(`Show more (${total - shown} more)`, 'show the next page', `twk-more twk-more-${kind}`, () => {
      this._pages[kind] += 1;
      this.render();
    });
  }

  private _connection(ov: IOverview): HTMLElement {
    const c = ov.connection!;
    const rows: HTMLElement[] = [
      h('div', { class: 'twk-kv' }, h('b', {}, 'Server '), h('code', { class: 'twk-url' }, c.url)),
      h(
        'div',
        { class: 'twk-kv twk-dim' },
        c.source === 'kernel' ? 'from a notebook kernel' : 'typed into this panel',
        ` · key ${c.key_hint}`
      )
    ];
    const caps = ov.capabilities;
    if (caps) {
      for (const bm of caps.base_models) {
        const workers = (ov.status?.workers ?? []).filter(w => w.base_model === bm.name);
        const used = workers.reduce((n, w) => n + w.adapters, 0);
        const queue = workers.reduce((n, w) => n + (w.queue_depth ?? 0), 0);
        const cap = bm.max_adapters * Math.max(1, bm.replicas ?? workers.length ?? 1);
        rows.push(
          h(
            'div',
            { class: 'twk-basemodel' },
            h('code', {}, bm.name),
            ` (${bm.backend} backend) · `,
            h('span', { class: 'twk-capacity' }, ov.status ? `${used}/${cap} adapters` : `${cap} adapters max`),
            ov.status ? ` · queue ${queue}` : '',
            ` · rank ≤ ${bm.max_lora_rank}`
          )
        );
      }
    }
    if (ov.status) {
      rows.push(
        h(
          'div',
          { class: 'twk-kv twk-dim' },
          `server v${ov.status.version} · ${ov.status.sessions_active} sessions, ${ov.status.runs_active} runs active`
        )
      );
    }
    if (ov.load) {
      const l = loadLines(ov.load);
      rows.push(
        h(
          'div',
          { class: 'twk-load', title: 'live load of the Twinkle server (refreshed with the panel)' },
          h('div', { class: 'twk-kv twk-load-queue', 'data-queue': String(ov.load.queue_depth) }, l.queue),
          h('div', { class: 'twk-kv twk-load-rate' }, l.rate),
          h('div', { class: 'twk-kv twk-load-usage' }, l.usage)
        )
      );
    }
    return h('section', { class: 'twk-section twk-connection' }, h('h3', {}, 'Connection'), ...rows);
  }

  private _sessions(ov: IOverview): HTMLElement {
    const own = ov.connection?.session_id ?? null;
    const all = filterSessions(ov.sessions, this.filter, own);
    const page = all.slice(0, PAGE_SIZE * this._pages.sessions);
    const items = page.map(s => {
      const age = Date.now() / 1000 - s.last_heartbeat;
      const left = Math.max(0, s.lease_seconds - age);
      const lease =
        s.state === 'active' ? `lease ${Math.round(left)}s left · heartbeat ${timeAgo(s.last_heartbeat)}` : s.state;
      return h(
        'li',
        { class: `twk-session twk-session-${s.state}`, 'data-session': s.session_id },
        h('code', {}, s.session_id.slice(0, 12)),
        s.session_id === own ? h('span', { class: 'twk-tag' }, 'this kernel') : null,
        h('span', { class: `twk-lease twk-lease-${s.state}` }, ` ${lease}`),
        ` · ${(s.run_ids ?? []).length} runs`
      );
    });
    return h(
      'section',
      { class: 'twk-section twk-sessions' },
      h('h3', {}, `Sessions (${all.length} of ${ov.sessions.length})`),
      items.length ? h('ul', {}, ...items) : h('div', { class: 'twk-dim' }, 'No sessions match.'),
      this._more('sessions', page.length, all.length)
    );
  }

  private _runs(ov: IOverview): HTMLElement {
    const all = filterRuns([...ov.runs], this.filter, ov.connection?.session_id ?? null);
    const page = all.slice(0, PAGE_SIZE * this._pages.runs);
    const cards = page.map(r => this._run(r));
    return h(
      'section',
      { class: 'twk-section twk-runs' },
      h('h3', {}, `Training runs (${all.length} of ${ov.runs.length})`),
      cards.length ? h('div', {}, ...cards) : h('div', { class: 'twk-dim' }, 'No training runs match.'),
      this._more('runs', page.length, all.length)
    );
  }

  private _run(run: IRunInfo): HTMLElement {
    const loss = this.model.loss(run.run_id);
    const metrics = displayMetrics(run.last_metrics ?? {}).map(([k, label, v]) =>
      h('span', { class: 'twk-metric', 'data-metric': k, 'data-value': String(v) }, `${label} ${formatNumber(v)}`)
    );
    const ckpts = this.model.checkpoints(run.run_id);
    const err = this.model.runError(run.run_id);
    return h(
      'div',
      { class: `twk-run twk-run-${run.state}`, 'data-run': run.run_id },
      h(
        'div',
        { class: 'twk-run-head' },
        h('b', { class: 'twk-run-name' }, run.name || run.run_id),
        h('span', { class: `twk-runstate twk-runstate-${run.state}` }, run.state),
        h('span', { class: 'twk-dim' }, ` step ${run.step}`),
        run.state === 'active'
          ? button('Stop', 'End the training loop of this run at its next step boundary', 'twk-stop', () =>
              this.actions.stopRun(run)
            )
          : null,
        button('✕', 'Delete this run (asks first)', 'twk-delete-run', () => this.actions.deleteRun(run))
      ),
      h('div', { class: 'twk-dim' }, h('code', {}, run.run_id), ` · ${run.base_model}`),
      h('div', { class: 'twk-metrics' }, ...metrics),
      h(
        'div',
        { class: 'twk-spark-row' },
        sparkline(loss),
        h('span', { class: 'twk-dim' }, loss.length ? ` loss, ${loss.length} pts` : ' no loss yet')
      ),
      err ? h('div', { class: 'twk-run-error' }, err) : null,
      h(
        'details',
        { class: 'twk-ckpts', open: '' },
        h('summary', {}, `Checkpoints (${ckpts.length})`),
        ckpts.length
          ? h('ul', {}, ...ckpts.map(c => this._checkpoint(c, run)))
          : h('div', { class: 'twk-dim' }, 'None saved yet.')
      )
    );
  }

  private _checkpoint(c: ICheckpointInfo, run: IRunInfo): HTMLElement {
    return h(
      'li',
      { class: 'twk-ckpt', 'data-checkpoint': c.path },
      h('div', {}, h('code', { class: 'twk-ckpt-name' }, c.name), h('span', { class: 'twk-dim' }, ` ${c.kind} · step ${c.step}`)),
      h(
        'div',
        { class: 'twk-ckpt-actions' },
        button('Copy path', c.path, 'twk-copy', () => this.actions.copyPath(c)),
        button('Insert cell', 'Insert a code cell that loads this checkpoint', 'twk-insert', () =>
          this.actions.insertLoadCell(c, run)
        ),
        button('Delete', 'Delete this checkpoint', 'twk-delete', () => this.actions.deleteCheckpoint(c))
      )
    );
  }
}
