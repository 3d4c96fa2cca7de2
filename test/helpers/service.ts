import "reflect-metadata";
import fs from "node:fs";
import os from "node:os";
import path from "node:path";
import type { DataSource } from "typeorm";
import { startService, type RunningService } from "../../src/app";
import { loadConfig, type Config } from "../../src/config";
import type { JobRunner, RunnerOptions } from "../../src/jobs/runner";
import type { Scheduler } from "../../src/services/scheduler";
import { createLogger, silentLogger, type Logger } from "../../src/logger";
import type { Services } from "../../src/services";
import type { Storage } from "../../src/storage";
import { createTestDatabase, openTestDataSource, type TestDatabase } from "./db";

export interface GqlResponse<T = any> {
  status: number;
  data?: T;
  errors?: { message: string; path?: string[]; extensions?: Record<string, unknown> }[];
}

export interface TestService {
  url: string;
  ds: DataSource;
  config: Config;
  services: Services;
  storage: Storage;
  runner: JobRunner;
  scheduler: Scheduler;
  dataDir: string;
  /** The NBD edge's port (0 when off: pass NBD_PORT to turn it on). */
  nbdPort: number;
  /** API keys of two projects, alpha and beta. */
  keys: { alpha: string; beta: string };
  projectIds: { alpha: string; beta: string };
  /** Counts SQL statements while `fn` runs. */
  countQueries<T>(fn: () => Promise<T>): Promise<{ result: T; count: number; statements: string[] }>;
  gql<T = any>(query: string, variables?: Record<string, unknown>, key?: string | null): Promise<GqlResponse<T>>;
  /** Like gql but fails the test on any error and returns data. */
  ok<T = any>(query: string, variables?: Record<string, unknown>, key?: string): Promise<T>;
  /** fetch() against the service with the alpha key. */
  http(pathname: string, init?: RequestInit & { key?: string | null }): Promise<Response>;
  stop(): Promise<void>;
}

/** The whole service (API, jobs, storage) on a fresh database and data directory; `runner` adjusts its job runner, `logger` receives its log. */
export async function startTestService(env: Record<string, string> = {}, runner: RunnerOptions = {}, logger?: Logger): Promise<TestService> {
  const db: TestDatabase = await createTestDatabase();
  let recording: string[] | null = null;
  const ds = await openTestDataSource(db.url, (sql) => recording?.push(sql));
  const dataDir = fs.mkdtempSync(path.join(os.tmpdir(), "stowage-data-"));
  const config = loadConfig({
    PORT: "0",
    HOST: "127.0.0.1",
    DATABASE_URL: db.url,
    STOWAGE_DATA_DIR: dataDir,
    GC_INTERVAL_SECONDS: "0",
    COMPACT_INTERVAL_SECONDS: "0",
    SCHEDULER_INTERVAL_SECONDS: "0",
    NBD_PORT: "0",
    ...env,
  });
  const svc: RunningService = await startService(config, logger ?? (process.env.STOWAGE_TEST_LOG ? createLogger("error") : silentLogger), {
    db: { ds, url: db.url, close: async () => ds.destroy() },
    runner: { pollMs: 200, ...runner },
  });
  const alpha = await svc.services.projects.create("alpha");
  const beta = await svc.services.projects.create("beta");

  const gql = async (query: string, variables?: Record<string, unknown>, key: string | null = alpha.apiKey) => {
    const res = await fetch(`${svc.url}/graphql`, {
      method: "POST",
      headers: { "content-type": "application/json", ...(key ? { authorization: `Bearer ${key}` } : {}) },
      body: JSON.stringify({ query, variables }),
    });
    const body = (await res.json()) as Omit<GqlResponse, "status">;
    return { status: res.status, ...body };
  };

  return {
    url: svc.url,
    ds,
    config,
    services: svc.services,
    storage: svc.storage,
    runner: svc.runner,
    scheduler: svc.scheduler,
    dataDir,
    nbdPort: svc.nbd?.port ?? 0,
    keys: { alpha: alpha.apiKey, beta: beta.apiKey },
    projectIds: { alpha: alpha.project.id, beta: beta.project.id },
    gql,
    async ok(query, variables, key) {
      const r = await gql(query, variables, key);
      if (r.errors?.length) throw new Error(`GraphQL errors: ${JSON.stringify(r.errors)}`);
      return r.data;
    },
    http(pathname, init = {}) {
      const { key = alpha.apiKey, ...rest } = init;
      const headers = new Headers(rest.headers);
      if (key) headers.set("authorization", `Bearer ${key}`);
      return fetch(`${svc.url}${pathname}`, { ...rest, headers, ...(rest.body ? { duplex: "half" } : {}) } as RequestInit);
    },
    async countQueries(fn) {
      const statements: string[] = [];
      recording = statements;
      try {
        const result = await fn();
        return { result, count: statements.length, statements };
      } finally {
        recording = null;
      }
    },
    async stop() {
      await svc.stop();
      await db.drop();
      fs.rmSync(dataDir, { recursive: true, force: true });
    },
  };
}

export const GiB = 2 ** 30;
export const MiB = 2 ** 20;
