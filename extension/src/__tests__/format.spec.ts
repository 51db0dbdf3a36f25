import { describe, expect, it } from 'vitest';

import {
  DEFAULT_FILTER,
  compactCount,
  displayMetrics,
  filterRuns,
  filterSessions,
  formatBytes,
  formatNumber,
  loadCheckpointCode,
  loadLines,
  lossKey,
  lossSeries,
  sparklinePoints,
  statusText,
  timeAgo
} from '../format';
import type { ICheckpointInfo, IOverview, IRunInfo, IServerLoad, ISessionInfo } from '../types';

function overview(state: IOverview['state'], runs: Partial<IRunInfo>[] = []): IOverview {
  return {
    state,
    message: '',
    connection: null,
    capabilities: null,
    status: null,
    sessions: [],
    runs: runs as IRunInfo[],
    checked_at: 0
  };
}

describe('loss series', () => {
  it('prefers the key "loss", else the first key naming loss', () => {
    expect(lossKey({ lr: 1, loss: 2, 'loss:sum': 3 })).toBe('loss');
    expect(lossKey({ lr: 1, 'train_loss': 2 })).toBe('train_loss');
    expect(lossKey({ lr: 1 })).toBeNull();
  });

  it('reads the server reduction suffixes', () => {
    expect(lossKey({ 'grad_norm:mean': 1, 'loss:sum': 2 })).toBe('loss:sum');
    expect(lossKey({ 'loss:sum': 2, 'loss:mean': 1 })).toBe('loss:mean');
  });

  it('skips points without a finite loss and keeps order', () => {
    const pts = [
      { step: 0, time: 0, kind: 'forward_backward', metrics: { loss: 3.5 } },
      { step: 1, time: 1, kind: 'optim_step', metrics: { lr: 0.1 } },
      { step: 1, time: 2, kind: 'forward_backward', metrics: { loss: NaN } },
      { step: 2, time: 3, kind: 'forward_backward', metrics: { 'loss:mean': 2.25 } }
    ];
    expect(lossSeries(pts)).toEqual([3.5, 2.25]);
  });
});

describe('displayMetrics', () => {
  it('labels without the reduction suffix, loss first, no step', () => {
    const shown = displayMetrics({ 'grad_norm:mean': 61.7, 'lr:mean': 0.01, 'step:max': 3, 'loss:sum': 27.9 });
    expect(shown).toEqual([
      ['loss:sum', 'loss', 27.9],
      ['grad_norm:mean', 'grad_norm', 61.7],
      ['lr:mean', 'lr', 0.01]
    ]);
  });
  it('shows the per-token mean loss, not the batch total, when both exist', () => {
    const shown = displayMetrics({ 'loss:sum': 586.5, loss: 1.943, 'grad_norm:mean': 2 });
    expect(shown[0]).toEqual(['loss', 'loss', 1.943]);
    expect(shown.map(s => s[1])).toEqual(['loss', 'grad_norm']);
  });
});

describe('sparklinePoints', () => {
  it('maps the highest value to the top and the lowest to the bottom, left to right', () => {
    const pts = sparklinePoints([4, 2, 0], 104, 24, 2)
      .split(' ')
      .map(p => p.split(',').map(Number));
    expect(pts).toEqual([
      [2, 2],
      [52, 12],
      [102, 22]
    ]);
  });

  it('centres a single point and a flat series', () => {
    expect(sparklinePoints([], 100, 20)).toBe('');
    expect(sparklinePoints([1], 104, 24, 2)).toBe('52.0,12.0');
    const flat = sparklinePoints([5, 5], 104, 24, 2).split(' ');
    expect(flat).toEqual(['2.0,12.0', '102.0,12.0']);
  });
});

describe('labels', () => {
  it('statusText counts active runs and names each failure', () => {
    expect(statusText(overview('connected', [{ state: 'active' }, { state: 'unloaded' }, { state: 'active' }]))).toBe(
      'Twinkle: connected · 2 active runs'
    );
    expect(statusText(overview('connected', [{ state: 'active' }]))).toBe('Twinkle: connected · 1 active run');
    expect(statusText(overview('server_down'))).toBe('Twinkle: server down');
    expect(statusText(overview('bad_key'))).toBe('Twinkle: API key rejected');
    expect(statusText(overview('not_configured'))).toBe('Twinkle: not connected');
    expect(statusText(null, true)).toBe('Twinkle: checking…');
  });

  it('formats numbers and ages', () => {
    expect(formatNumber(2.345678)).toBe('2.346');
    expect(formatNumber(0.0001234)).toBe('1.23e-4');
    expect(formatNumber(12)).toBe('12');
    expect(timeAgo(100, 105_000)).toBe('5s ago');
    expect(timeAgo(0, 7_200_000)).toBe('2h ago');
  });
});

describe('loadCheckpointCode', () => {
  const ckpt: ICheckpointInfo = {
    checkpoint_id: 'weights/step-3',
    run_id: 'run-1',
    name: 'step-3',
    kind: 'training',
    path: 'tinker://run-1/weights/step-3',
    created_at: 0,
    step: 3
  };
  it('loads the path into a model of the run base model with its LoRA config', () => {
    const run = { base_model: 'builtin://tiny', lora: { rank: 4, alpha: null, train_mlp: true } } as unknown as IRunInfo;
    const code = loadCheckpointCode(ckpt, run, 'transformers');
    expect(code).toContain('from twinkle_client.model import TransformersModel');
    expect(code).toContain('TransformersModel(model_id="builtin://tiny")');
    expect(code).toContain('model.add_adapter_to_model("default", {"rank": 4, "train_mlp": True})');
    expect(code).toContain('model.load("tinker://run-1/weights/step-3")');
  });
  it('uses the model class of the backend', () => {
    const run = { base_model: 'mock', lora: {} } as unknown as IRunInfo;
    expect(loadCheckpointCode(ckpt, run, 'mock')).toContain('model = MockModel(model_id="mock")');
    expect(loadCheckpointCode(ckpt, run, 'megatron')).toContain('from twinkle_client.model import MegatronModel');
  });

  it('skips the optimizer for a sampler checkpoint', () => {
    const code = loadCheckpointCode({ ...ckpt, kind: 'sampler', path: 'tinker://run-1/sampler_weights/s' });
    expect(code).toContain('model.load("tinker://run-1/sampler_weights/s", load_optimizer=False)');
  });
});

describe('filterRuns / filterSessions', () => {
  const run = (id: string, name: string, session: string, state: IRunInfo['state'], step: number, t: number): IRunInfo => ({
    run_id: id, session_id: session, user: 'u', base_model: 'm', lora: {}, name, state, step, created_at: t,
    last_request_time: t, last_metrics: {}
  });
  const runs = [run('s1:train:0', 'sft', 's1', 'active', 5, 10), run('s2:train:0', 'dpo', 's2', 'active', 50, 30),
    run('s2:train:1', 'old-sft', 's2', 'unloaded', 9, 20)];
  it('filters by name, this kernel, active; sorts', () => {
    expect(filterRuns(runs, DEFAULT_FILTER, 's1').map(r => r.name)).toEqual(['dpo', 'sft']);
    expect(filterRuns(runs, { ...DEFAULT_FILTER, active: false }, 's1').map(r => r.name)).toEqual(['dpo', 'old-sft', 'sft']);
    expect(filterRuns(runs, { ...DEFAULT_FILTER, active: false, text: 'SFT' }, null).map(r => r.name)).toEqual(['old-sft', 'sft']);
    expect(filterRuns(runs, { ...DEFAULT_FILTER, mine: true }, 's1').map(r => r.name)).toEqual(['sft']);
    expect(filterRuns(runs, { ...DEFAULT_FILTER, mine: true }, null)).toEqual([]);
    expect(filterRuns(runs, { ...DEFAULT_FILTER, active: false, sort: 'name' }, null).map(r => r.name)).toEqual(['dpo', 'old-sft', 'sft']);
    expect(filterRuns(runs, { ...DEFAULT_FILTER, active: false, sort: 'step' }, null).map(r => r.step)).toEqual([50, 9, 5]);
  });
  it('hides ended sessions by default', () => {
    const sess = (id: string, state: ISessionInfo['state'], hb: number): ISessionInfo => ({
      session_id: id, user: 'u', state, created_at: 0, last_heartbeat: hb, lease_seconds: 60
    });
    const all = [sess('s1', 'active', 5), sess('s2', 'expired', 9), sess('s3', 'active', 7)];
    expect(filterSessions(all, DEFAULT_FILTER, 's1').map(s => s.session_id)).toEqual(['s3', 's1']);
    expect(filterSessions(all, { ...DEFAULT_FILTER, active: false }, 's1').map(s => s.session_id)).toEqual(['s2', 's3', 's1']);
    expect(filterSessions(all, { ...DEFAULT_FILTER, mine: true }, 's1').map(s => s.session_id)).toEqual(['s1']);
  });
});

describe('live load', () => {
  const load = (over: Partial<IServerLoad> = {}): IServerLoad => ({
    window_s: 60,
    tokens_per_s: { trained: 1234.5, prefilled: 0, sampled: 42 },
    queue_depth: 3,
    replicas: [
      { base_model: 'm', replica: 0, queue_depth: 3, adapters: 2 },
      { base_model: 'm', replica: 1, queue_depth: 0, adapters: 0 }
    ],
    usage: [
      {
        user: 'alice',
        base_model: 'm',
        tokens_trained: 12000,
        tokens_prefilled: 500,
        tokens_sampled: 2500000,
        requests: 9,
        checkpoint_bytes: 3 * 1024 * 1024,
        checkpoints: 1
      },
      {
        user: 'alice',
        base_model: 'n',
        tokens_trained: 345,
        tokens_prefilled: 0,
        tokens_sampled: 0,
        requests: 1,
        checkpoint_bytes: 0,
        checkpoints: 0
      }
    ],
    ...over
  });

  it('shows queue depth, busy replicas, tokens/s and your usage summed over base models', () => {
    const l = loadLines(load());
    expect(l.queue).toBe('queue 3 requests (1/2 replicas busy)');
    expect(l.rate).toBe('tokens/s (last 60 s, all users): trained 1235 · prefilled 0 · sampled 42');
    expect(l.usage).toBe(
      'your usage: 12.3k trained · 500 prefilled · 2.5M sampled tokens · 3.0 MB of checkpoints'
    );
  });

  it('one replica, one request, nothing used yet', () => {
    const l = loadLines(load({ queue_depth: 1, replicas: [load().replicas[0]], usage: [] }));
    expect(l.queue).toBe('queue 1 request');
    expect(l.usage).toBe('your usage: nothing yet');
  });

  it('compact counts and bytes', () => {
    expect(compactCount(950)).toBe('950');
    expect(compactCount(123456789)).toBe('123M');
    expect(formatBytes(512)).toBe('512 B');
    expect(formatBytes(1536)).toBe('1.5 KB');
  });
});
