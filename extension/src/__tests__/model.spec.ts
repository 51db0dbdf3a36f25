import { afterEach, beforeEach, describe, expect, it, vi } from 'vitest';

import { ApiError, TwinkleApi } from '../api';
import { DEFAULT_POLICY, Poller, TwinkleModel } from '../model';
import type { IOverview, IRunInfo } from '../types';

/** A fake Jupyter server: routes by path, records every call. */
class FakeServer {
  calls: string[] = [];
  overview: IOverview | (() => IOverview) | Error = mkOverview([]);
  overviewStatus = 200;
  metrics: Record<string, number[]> = {};
  checkpoints: Record<string, string[]> = {};

  fetch = async (path: string, init?: RequestInit): Promise<Response> => {
    const method = init?.method ?? 'GET';
    this.calls.push(`${method} ${path}`);
    if (path === 'overview') {
      if (this.overview instanceof Error) {
        throw this.overview;
      }
      const ov = typeof this.overview === 'function' ? this.overview() : this.overview;
      return new Response(JSON.stringify(ov), { status: this.overviewStatus });
    }
    let m = /^api\/runs\/([^/]+)\/metrics$/.exec(path);
    if (m) {
      const points = (this.metrics[m[1]] ?? []).map((loss, i) => ({ step: i, time: i, kind: 'fb', metrics: { loss } }));
      return new Response(JSON.stringify({ run_id: m[1], points }));
    }
    m = /^api\/runs\/([^/]+)\/checkpoints$/.exec(path);
    if (m) {
      const run = m[1];
      const list = (this.checkpoints[run] ?? []).map(name => ckpt(run, name));
      return new Response(JSON.stringify({ checkpoints: list }));
    }
    m = /^api\/runs\/([^/]+)\/checkpoints\/training\/([^/]+)$/.exec(path);
    if (m && method === 'DELETE') {
      this.checkpoints[m[1]] = (this.checkpoints[m[1]] ?? []).filter(n => n !== m![2]);
      return new Response(JSON.stringify(ckpt(m[1], m[2])));
    }
    if (path === 'connection' && method === 'POST') {
      const body = JSON.parse(String(init?.body));
      return new Response(JSON.stringify({ configured: true, connection: null, state: body.api_key === 'good' ? 'connected' : 'bad_key', message: 'm' }));
    }
    return new Response(JSON.stringify({ error: 'nope' }), { status: 404 });
  };
}

function ckpt(run: string, name: string) {
  return {
    checkpoint_id: `weights/${name}`,
    run_id: run,
    name,
    kind: 'training',
    path: `tinker://${run}/weights/${name}`,
    created_at: 0,
    step: 0
  };
}

function mkRun(id: string, step: number, extra: Partial<IRunInfo> = {}): IRunInfo {
  return {
    run_id: id,
    session_id: 's',
    user: 'u',
    base_model: 'builtin://tiny',
    lora: {},
    state: 'active',
    step,
    created_at: 0,
    last_request_time: step,
    last_metrics: { loss: 1 / (step + 1) },
    last_checkpoint: null,
    ...extra
  };
}

function mkOverview(runs: IRunInfo[], state: IOverview['state'] = 'connected', message = ''): IOverview {
  return { state, message, connection: null, capabilities: null, status: null, sessions: [], runs, checked_at: 0 };
}

describe('TwinkleModel', () => {
  let server: FakeServer;
  let model: TwinkleModel;
  beforeEach(() => {
    server = new FakeServer();
    model = new TwinkleModel(new TwinkleApi(server.fetch));
  });

  it('fetches metrics and checkpoints of a new run, then only when it changes', async () => {
    server.metrics.r1 = [3, 2];
    server.checkpoints.r1 = [];
    server.overview = mkOverview([mkRun('r1', 1)]);
    await model.refresh();
    expect(model.loss('r1')).toEqual([3, 2]);
    expect(server.calls).toEqual(['GET overview', 'GET api/runs/r1/metrics', 'GET api/runs/r1/checkpoints']);

    server.calls = [];
    await model.refresh();
    expect(server.calls).toEqual(['GET overview']);

    server.metrics.r1 = [3, 2, 1.5];
    server.overview = mkOverview([mkRun('r1', 2)]);
    server.calls = [];
    await model.refresh();
    expect(server.calls).toEqual(['GET overview', 'GET api/runs/r1/metrics']);
    expect(model.loss('r1')).toEqual([3, 2, 1.5]);

    server.checkpoints.r1 = ['step-2'];
    server.overview = mkOverview([mkRun('r1', 2, { last_checkpoint: 'tinker://r1/weights/step-2' })]);
    server.calls = [];
    await model.refresh();
    expect(server.calls).toEqual(['GET overview', 'GET api/runs/r1/checkpoints']);
    expect(model.checkpoints('r1').map(c => c.name)).toEqual(['step-2']);
  });

  it('polls fast while training and backs off when idle, capped', async () => {
    const p = DEFAULT_POLICY;
    server.overview = mkOverview([mkRun('r1', 1, { state: 'unloaded' })]);
    await model.refresh();
    server.overview = mkOverview([mkRun('r1', 2, { state: 'unloaded' })]);
    await model.refresh();
    expect(model.nextDelay()).toBe(p.activeMs);
    const delays: number[] = [];
    for (let i = 0; i < 6; i++) {
      await model.refresh();
      delays.push(model.nextDelay());
    }
    expect(delays[0]).toBe(p.idleMs);
    expect(delays[1]).toBe(p.idleMs * 2);
    expect(delays[5]).toBe(p.idleMaxMs);
    for (let i = 1; i < delays.length; i++) {
      expect(delays[i]).toBeGreaterThanOrEqual(delays[i - 1]);
    }
    expect(model.nextDelay(true)).toBe(p.hiddenMinMs);
    // a loaded run keeps the idle delay short: training may start any moment
    server.overview = mkOverview([mkRun('r1', 2)]);
    await model.refresh();
    for (let i = 0; i < 6; i++) {
      await model.refresh();
    }
    expect(model.nextDelay()).toBe(p.idleActiveMaxMs);
    // training again: fast at once
    server.overview = mkOverview([mkRun('r1', 3)]);
    await model.refresh();
    expect(model.nextDelay()).toBe(p.activeMs);
  });

  it('reports server down and a bad key with their messages and backs off exponentially', async () => {
    server.overview = mkOverview([], 'server_down', 'Cannot reach the Twinkle server at http://x:1');
    await model.refresh();
    expect(model.state).toBe('server_down');
    expect(model.message).toContain('Cannot reach');
    const d1 = model.nextDelay();
    await model.refresh();
    const d2 = model.nextDelay();
    expect(d1).toBe(DEFAULT_POLICY.errorMs);
    expect(d2).toBe(2 * d1);
    for (let i = 0; i < 10; i++) {
      await model.refresh();
    }
    expect(model.nextDelay()).toBe(DEFAULT_POLICY.errorMaxMs);

    server.overview = mkOverview([], 'bad_key', 'rejected the API key (401)');
    await model.refresh();
    expect(model.state).toBe('bad_key');
    expect(model.message).toContain('401');
    // no per-run calls while not connected
    expect(server.calls.filter(c => c.includes('api/')).length).toBe(0);

    server.overview = mkOverview([]);
    await model.refresh();
    expect(model.state).toBe('connected');
    expect(model.nextDelay()).toBe(DEFAULT_POLICY.idleMs);
  });

  it('says so when the Jupyter server itself is unreachable or errors', async () => {
    server.overview = new TypeError('Failed to fetch');
    await model.refresh();
    expect(model.state).toBe('error');
    expect(model.message).toContain('Cannot reach the Jupyter server');
    server.overview = mkOverview([]);
    server.overviewStatus = 500;
    await model.refresh();
    expect(model.message).toContain('answered 500');
  });

  it('deletes a checkpoint and forgets runs that disappear', async () => {
    server.checkpoints.r1 = ['a', 'b'];
    server.overview = mkOverview([mkRun('r1', 1, { last_checkpoint: 'b' })]);
    await model.refresh();
    expect(model.checkpoints('r1').map(c => c.name)).toEqual(['a', 'b']);
    await model.deleteCheckpoint(model.checkpoints('r1')[0]);
    expect(server.calls).toContain('DELETE api/runs/r1/checkpoints/training/a');
    expect(model.checkpoints('r1').map(c => c.name)).toEqual(['b']);
    await model.refresh();
    expect(server.calls.at(-1)).toBe('GET api/runs/r1/checkpoints');
    server.overview = mkOverview([]);
    await model.refresh();
    expect(model.checkpoints('r1')).toEqual([]);
  });

  it('fetches at most maxRunsFetched runs per poll', async () => {
    const small = new TwinkleModel(new TwinkleApi(server.fetch), { ...DEFAULT_POLICY, maxRunsFetched: 2 });
    server.overview = mkOverview([mkRun('a', 1), mkRun('b', 1), mkRun('c', 1)]);
    await small.refresh();
    expect(server.calls.filter(c => c.endsWith('/metrics')).length).toBe(2);
    server.calls = [];
    await small.refresh();
    expect(server.calls).toEqual(['GET overview', 'GET api/runs/c/metrics', 'GET api/runs/c/checkpoints']);
  });

  it('a new connection (a kernel ran %twinkle connect) counts as activity', async () => {
    const conn = (session: string) => ({ url: 'http://h:1', source: 'kernel' as const, session_id: session, key_hint: '…', updated_at: 1 });
    server.overview = { ...mkOverview([]), connection: conn('s1') };
    await model.refresh();
    await model.refresh();
    await model.refresh();
    expect(model.nextDelay()).toBe(DEFAULT_POLICY.idleMs * 2);
    server.overview = { ...mkOverview([]), connection: conn('s2') };
    await model.refresh();
    expect(model.nextDelay()).toBe(DEFAULT_POLICY.activeMs);
  });

  it('connect returns the classified state from the Jupyter server', async () => {
    expect((await model.connect('http://h:1', 'good')).state).toBe('connected');
    expect((await model.connect('http://h:1', 'bad')).state).toBe('bad_key');
  });

  it('ApiError keeps the state of a proxied failure', async () => {
    const api = new TwinkleApi(async () => new Response(JSON.stringify({ error: 'key rejected', state: 'bad_key' }), { status: 401 }));
    await expect(api.metrics('r')).rejects.toMatchObject({ status: 401, state: 'bad_key', message: 'key rejected' });
    await expect(api.metrics('r')).rejects.toBeInstanceOf(ApiError);
  });
});

describe('Poller', () => {
  beforeEach(() => vi.useFakeTimers());
  afterEach(() => vi.useRealTimers());

  it('schedules the next poll by the model delay and stops cleanly', async () => {
    const server = new FakeServer();
    server.overview = mkOverview([], 'not_configured');
    const model = new TwinkleModel(new TwinkleApi(server.fetch));
    const poller = new Poller(model);
    poller.start();
    await vi.advanceTimersByTimeAsync(0);
    expect(server.calls.length).toBe(1);
    await vi.advanceTimersByTimeAsync(DEFAULT_POLICY.notConfiguredMs - 1);
    expect(server.calls.length).toBe(1);
    await vi.advanceTimersByTimeAsync(1);
    expect(server.calls.length).toBe(2);
    poller.kick();
    await vi.advanceTimersByTimeAsync(0);
    expect(server.calls.length).toBe(3);
    poller.stop();
    await vi.advanceTimersByTimeAsync(10 * DEFAULT_POLICY.notConfiguredMs);
    expect(server.calls.length).toBe(3);
  });

  it('polls less often while hidden', async () => {
    const server = new FakeServer();
    server.overview = mkOverview([], 'not_configured');
    const model = new TwinkleModel(new TwinkleApi(server.fetch));
    const poller = new Poller(model, () => true);
    poller.start();
    await vi.advanceTimersByTimeAsync(DEFAULT_POLICY.hiddenMinMs - 1);
    expect(server.calls.length).toBe(1);
    await vi.advanceTimersByTimeAsync(1);
    expect(server.calls.length).toBe(2);
    poller.stop();
  });
});
