/** Shapes of the replies of the Jupyter-server routes under `twinkle/` (see twinkle_client/jupyter_server). */

export type ConnectionState = 'connected' | 'not_configured' | 'server_down' | 'bad_key' | 'error' | 'unknown';

export interface IConnectionInfo {
  url: string;
  source: 'kernel' | 'panel';
  session_id: string | null;
  key_hint: string;
  updated_at: number;
}

export interface IBaseModelInfo {
  name: string;
  backend: string;
  max_lora_rank: number;
  max_adapters: number;
  max_tokens_per_request: number;
  replicas?: number;
}

export interface ICapabilities {
  version: string;
  base_models: IBaseModelInfo[];
}

export interface IWorkerStatus {
  base_model: string;
  replica: number;
  adapters: number;
  queue_depth?: number;
  batches_run?: number;
}

export interface IServerStatus {
  version: string;
  uptime_s: number;
  sessions_active: number;
  runs_active: number;
  workers: IWorkerStatus[];
}

export interface ISessionInfo {
  session_id: string;
  user: string;
  client?: string;
  state: 'active' | 'expired' | 'closed';
  created_at: number;
  last_heartbeat: number;
  lease_seconds: number;
  run_ids?: string[];
}

export interface IRunInfo {
  run_id: string;
  session_id: string;
  user: string;
  base_model: string;
  lora: Record<string, unknown>;
  name?: string | null;
  state: 'active' | 'unloaded' | 'lost' | 'deleted';
  step: number;
  created_at: number;
  last_request_time?: number | null;
  last_metrics: Record<string, number>;
  last_checkpoint?: string | null;
}

export interface IMetricPoint {
  step: number;
  time: number;
  kind: string;
  metrics: Record<string, number>;
}

export interface IMetricHistory {
  run_id: string;
  points: IMetricPoint[];
}

export interface ICheckpointInfo {
  checkpoint_id: string;
  run_id: string;
  name: string;
  kind: 'training' | 'sampler';
  path: string;
  created_at: number;
  step: number;
  size_bytes?: number | null;
}

/** One row of the caller's usage (`GET /api/v1/twinkle/usage`, all time). */
export interface IUsageRow {
  user: string;
  base_model: string;
  tokens_trained: number;
  tokens_prefilled: number;
  tokens_sampled: number;
  requests: number;
  checkpoint_bytes: number;
  checkpoints: number;
}

/** `GET /api/v1/twinkle/load`: the server's live load (all users) and the caller's own usage. */
export interface IServerLoad {
  window_s: number;
  tokens_per_s: Record<string, number>;
  queue_depth: number;
  replicas: { base_model: string; replica: number; queue_depth: number; adapters: number }[];
  usage: IUsageRow[];
}

export interface IOverview {
  state: ConnectionState;
  message: string;
  connection: IConnectionInfo | null;
  capabilities: ICapabilities | null;
  status: IServerStatus | null;
  sessions: ISessionInfo[];
  runs: IRunInfo[];
  /** null when the server has no load route (older servers) or it failed this poll. */
  load?: IServerLoad | null;
  checked_at: number;
}

export interface IConnectReply {
  configured: boolean;
  connection: IConnectionInfo | null;
  state?: ConnectionState;
  message?: string;
}
