/**
 * The panel's data layer: one overview poll, plus per-run metrics/checkpoints fetched only when that run
 * changed, and the delay until the next poll (fast while training, backing off when idle, hidden or failing).
 */

import { ApiError, TwinkleApi } from './api';
import { lossSeries } from './format';
import type { ICheckpointInfo, IOverview, IRunInfo } from './types';

export interface IPollPolicy {
  /** Delay while a run changed in the last poll (training). */
  activeMs: number;
  /** First idle delay; doubles per idle poll up to `idleMaxMs`. */
  idleMs: number;
  idleMaxMs: number;
  /** Idle cap while a run is loaded or a session is active (training may start any moment). */
  idleActiveMaxMs: number;
  /** Delay while nothing is configured (waiting for `%twinkle connect` in a kernel). */
  notConfiguredMs: number;
  /** First delay after a failure; doubles per failure up to `errorMaxMs`. */
  errorMs: number;
  errorMaxMs: number;
  /** Smallest delay while the page is hidden. */
  hiddenMinMs: number;
  /** At most this many runs get their metrics/checkpoints fetched per poll. */
  maxRunsFetched: number;
}

export const DEFAULT_POLICY: IPollPolicy = {
  activeMs: 2000,
  idleMs: 3000,
  idleMaxMs: 30000,
  idleActiveMaxMs: 8000,
  notConfiguredMs: 5000,
  errorMs: 5000,
  errorMaxMs: 60000,
  hiddenMinMs: 60000,
  maxRunsFetched: 8
};

interface IRunCache {
  signature: string;
  loss: number[];
  checkpointSignature: string | null;
  checkpoints: ICheckpointInfo[];
  error: string | null;
}

/** What changed in a run since the last poll, for deciding what to fetch. */
export function runSignature(run: IRunInfo): string {
  return `${run.state}|${run.step}|${run.last_request_time ?? ''}|${JSON.stringify(run.last_metrics ?? {})}`;
}

export type Listener = () => void;

export class TwinkleModel {
  overview: IOverview | null = null;
  /** Set when the Jupyter server itself could not be reached or answered an error. */
  localError: string | null = null;
  private _runs = new Map<string, IRunCache>();
  private _idleStreak = 0;
  private _errorStreak = 0;
  private _listeners = new Set<Listener>();
  private _refreshing: Promise<void> | null = null;
  private _changedLastPoll = false;
  private _connSig = '';

  constructor(
    readonly api: TwinkleApi,
    readonly policy: IPollPolicy = DEFAULT_POLICY
  ) {}

  onChange(fn: Listener): () => void {
    this._listeners.add(fn);
    return () => this._listeners.delete(fn);
  }

  private _emit(): void {
    for (const fn of this._listeners) {
      fn();
    }
  }

  get state(): string {
    if (this.localError !== null) {
      return 'error';
    }
    return this.overview?.state ?? 'unknown';
  }

  get message(): string {
    if (this.localError !== null) {
      return this.localError;
    }
    return this.overview?.message ?? 'Checking the Twinkle connection…';
  }

  loss(runId: string): number[] {
    return this._runs.get(runId)?.loss ?? [];
  }

  checkpoints(runId: string): ICheckpointInfo[] {
    return this._runs.get(runId)?.checkpoints ?? [];
  }

  runError(runId: string): string | null {
    return this._runs.get(runId)?.error ?? null;
  }

  /** One poll; concurrent calls share it. */
  refresh(): Promise<void> {
    if (!this._refreshing) {
      this._refreshing = this._refresh().finally(() => {
        this._refreshing = null;
      });
    }
    return this._refreshing;
  }

  private async _refresh(): Promise<void> {
    let ov: IOverview;
    try {
      ov = await this.api.overview();
      this.localError = null;
    } catch (err) {
      this.localError =
        err instanceof ApiError
          ? `The Jupyter server's Twinkle extension answered ${err.status}: ${err.message}`
          : `Cannot reach the Jupyter server (${String(err)}).`;
      this._errorStreak += 1;
      this._changedLastPoll = false;
      this._emit();
      return;
    }
    this.overview = ov;
    if (ov.state !== 'connected') {
      this._errorStreak = ov.state === 'not_configured' ? 0 : this._errorStreak + 1;
      this._changedLastPoll = false;
      this._emit();
      return;
    }
    this._errorStreak = 0;
    const conn = ov.connection;
    const connSig = conn ? `${conn.url}|${conn.source}|${conn.session_id}|${conn.updated_at}` : '';
    const connChanged = connSig !== this._connSig;
    this._connSig = connSig;
    const changed = (await this._updateRuns(ov.runs)) || connChanged;
    this._changedLastPoll = changed;
    this._idleStreak = changed ? 0 : this._idleStreak + 1;
    this._emit();
  }

  /** Fetches metrics/checkpoints of runs that changed; returns whether any run changed. */
  private async _updateRuns(runs: IRunInfo[]): Promise<boolean> {
    const seen = new Set(runs.map(r => r.run_id));
    for (const id of [...this._runs.keys()]) {
      if (!seen.has(id)) {
        this._runs.delete(id);
      }
    }
    let changed = false;
    const jobs: Promise<void>[] = [];
    let budget = this.policy.maxRunsFetched;
    for (const run of runs) {
      const sig = runSignature(run);
      const cache = this._runs.get(run.run_id);
      const ckptSig = run.last_checkpoint ?? '';
      const needMetrics = !cache || cache.signature !== sig;
      const needCkpts = !cache || cache.checkpointSignature !== ckptSig;
      if (cache && needMetrics) {
        changed = true;
      }
      if (!needMetrics && !needCkpts) {
        continue;
      }
      if (budget <= 0) {
        continue;
      }
      budget -= 1;
      const entry: IRunCache = cache ?? {
        signature: '',
        loss: [],
        checkpointSignature: null,
        checkpoints: [],
        error: null
      };
      this._runs.set(run.run_id, entry);
      jobs.push(this._fetchRun(run.run_id, entry, needMetrics ? sig : null, needCkpts ? ckptSig : null));
    }
    await Promise.all(jobs);
    return changed;
  }

  private async _fetchRun(runId: string, entry: IRunCache, sig: string | null, ckptSig: string | null): Promise<void> {
    try {
      if (sig !== null) {
        const hist = await this.api.metrics(runId);
        entry.loss = lossSeries(hist.points ?? []);
        entry.signature = sig;
      }
      if (ckptSig !== null) {
        entry.checkpoints = await this.api.checkpoints(runId);
        entry.checkpointSignature = ckptSig;
      }
      entry.error = null;
    } catch (err) {
      entry.error = err instanceof Error ? err.message : String(err);
    }
  }

  /** Re-reads a run's checkpoints (after a save or delete). */
  async reloadCheckpoints(runId: string): Promise<void> {
    const entry = this._runs.get(runId);
    if (entry) {
      entry.checkpointSignature = null;
    }
    await this.refresh();
  }

  async deleteCheckpoint(ckpt: ICheckpointInfo): Promise<void> {
    await this.api.deleteCheckpoint(ckpt);
    const entry = this._runs.get(ckpt.run_id);
    if (entry) {
      entry.checkpoints = entry.checkpoints.filter(c => c.checkpoint_id !== ckpt.checkpoint_id || c.name !== ckpt.name);
      entry.checkpointSignature = null;
    }
    this._emit();
  }

  async connect(url: string, apiKey: string): Promise<{ state: string; message: string }> {
    const reply = await this.api.connect(url, apiKey);
    this._idleStreak = 0;
    this._errorStreak = 0;
    await this.refresh();
    return { state: reply.state ?? 'unknown', message: reply.message ?? '' };
  }

  async disconnect(): Promise<void> {
    await this.api.disconnect();
    await this.refresh();
  }

  /** Milliseconds until the next poll, from the last poll's outcome. */
  nextDelay(hidden = false): number {
    const p = this.policy;
    let delay: number;
    if (this.localError !== null || (this.overview && !['connected', 'not_configured'].includes(this.overview.state))) {
      delay = Math.min(p.errorMs * 2 ** Math.max(0, this._errorStreak - 1), p.errorMaxMs);
    } else if (this.overview === null || this.overview.state === 'not_configured') {
      delay = p.notConfiguredMs;
    } else if (this._changedLastPoll) {
      delay = p.activeMs;
    } else {
      const ov = this.overview;
      const busy = ov.runs.some(r => r.state === 'active') || ov.sessions.some(s => s.state === 'active');
      delay = Math.min(p.idleMs * 2 ** Math.max(0, this._idleStreak - 1), busy ? p.idleActiveMaxMs : p.idleMaxMs);
    }
    return hidden ? Math.max(delay, p.hiddenMinMs) : delay;
  }
}

/** Runs `model.refresh()` on the model's schedule; `kick()` polls at once (after user actions). */
export class Poller {
  private _timer: ReturnType<typeof setTimeout> | null = null;
  private _stopped = true;

  constructor(
    private readonly model: TwinkleModel,
    private readonly isHidden: () => boolean = () => false
  ) {}

  start(): void {
    if (!this._stopped) {
      return;
    }
    this._stopped = false;
    void this._tick();
  }

  stop(): void {
    this._stopped = true;
    if (this._timer !== null) {
      clearTimeout(this._timer);
      this._timer = null;
    }
  }

  kick(): void {
    if (this._stopped) {
      return;
    }
    if (this._timer !== null) {
      clearTimeout(this._timer);
      this._timer = null;
    }
    void this._tick();
  }

  private async _tick(): Promise<void> {
    this._timer = null;
    await this.model.refresh();
    if (this._stopped || this._timer !== null) {
      return;
    }
    this._timer = setTimeout(() => void this._tick(), this.model.nextDelay(this.isHidden()));
  }
}
