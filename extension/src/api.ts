/** HTTP calls from the browser to the Jupyter server's `twinkle/` routes (never to the Twinkle server). */

import type { ICheckpointInfo, IConnectReply, IMetricHistory, IOverview } from './types';

/** Sends a request to `<jupyter base>/twinkle/<path>`; the plugin wires it to ServerConnection. */
export type Fetcher = (path: string, init?: RequestInit) => Promise<Response>;

/** A failed call, with the state the Jupyter server classified it as. */
export class ApiError extends Error {
  constructor(
    message: string,
    readonly status: number,
    readonly state: string = 'error'
  ) {
    super(message);
  }
}

async function readJson(resp: Response): Promise<any> {
  const text = await resp.text();
  let body: any = null;
  if (text) {
    try {
      body = JSON.parse(text);
    } catch {
      body = null;
    }
  }
  if (!resp.ok) {
    const message = body?.error ?? body?.message ?? `HTTP ${resp.status}`;
    const state = body?.state ?? (resp.status === 401 ? 'bad_key' : resp.status === 502 ? 'server_down' : 'error');
    throw new ApiError(String(message), resp.status, state);
  }
  return body;
}

export class TwinkleApi {
  constructor(private readonly fetcher: Fetcher) {}

  async overview(): Promise<IOverview> {
    return readJson(await this.fetcher('overview'));
  }

  async connection(): Promise<IConnectReply> {
    return readJson(await this.fetcher('connection'));
  }

  async connect(url: string, apiKey: string): Promise<IConnectReply> {
    return readJson(
      await this.fetcher('connection', {
        method: 'POST',
        body: JSON.stringify({ url, api_key: apiKey })
      })
    );
  }

  async disconnect(): Promise<IConnectReply> {
    return readJson(await this.fetcher('connection', { method: 'DELETE' }));
  }

  async metrics(runId: string): Promise<IMetricHistory> {
    return readJson(await this.fetcher(`api/runs/${encodeURIComponent(runId)}/metrics`));
  }

  async checkpoints(runId: string): Promise<ICheckpointInfo[]> {
    const body = await readJson(await this.fetcher(`api/runs/${encodeURIComponent(runId)}/checkpoints`));
    return (body?.checkpoints ?? []) as ICheckpointInfo[];
  }

  /** Asks a session's (or a run's session's) training loop to stop at its next step boundary. Goes through the
   * Jupyter server to the Twinkle server, so it works while the kernel running the loop is busy. */
  async stop(kind: 'sessions' | 'runs', id: string): Promise<void> {
    await readJson(await this.fetcher(`api/${kind}/${encodeURIComponent(id)}/stop`, { method: 'POST' }));
  }

  async deleteRun(runId: string): Promise<void> {
    await readJson(await this.fetcher(`api/runs/${encodeURIComponent(runId)}`, { method: 'DELETE' }));
  }

  async deleteCheckpoint(ckpt: ICheckpointInfo): Promise<void> {
    const path = `api/runs/${encodeURIComponent(ckpt.run_id)}/checkpoints/${encodeURIComponent(ckpt.kind)}/${encodeURIComponent(ckpt.name)}`;
    await readJson(await this.fetcher(path, { method: 'DELETE' }));
  }
}
