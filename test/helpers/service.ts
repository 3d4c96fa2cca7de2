import "reflect-metadata";
import type { DataSource } from "typeorm";
import { loadConfig, type Config } from "../../src/config";
import { buildStowageSchema } from "../../src/graphql/schema";
import { startHttpServer, type HttpServer } from "../../src/http/server";
import { silentLogger } from "../../src/logger";
import { createServices, type Services } from "../../src/services";
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
  /** API keys of two projects, alpha and beta. */
  keys: { alpha: string; beta: string };
  projectIds: { alpha: string; beta: string };
  /** Counts SQL statements while `fn` runs. */
  countQueries<T>(fn: () => Promise<T>): Promise<{ result: T; count: number; statements: string[] }>;
  gql<T = any>(query: string, variables?: Record<string, unknown>, key?: string | null): Promise<GqlResponse<T>>;
  /** Like gql but fails the test on any error and returns data. */
  ok<T = any>(query: string, variables?: Record<string, unknown>, key?: string): Promise<T>;
  stop(): Promise<void>;
}

export async function startTestService(env: Record<string, string> = {}): Promise<TestService> {
  const db: TestDatabase = await createTestDatabase();
  let recording: string[] | null = null;
  const ds = await openTestDataSource(db.url, (sql) => recording?.push(sql));
  const config = loadConfig({ PORT: "0", HOST: "127.0.0.1", DATABASE_URL: db.url, STOWAGE_DATA_DIR: "/nonexistent", ...env });
  const services = createServices(ds);
  const alpha = await services.projects.create("alpha");
  const beta = await services.projects.create("beta");
  const http: HttpServer = await startHttpServer({ config, logger: silentLogger, ds, services, schema: buildStowageSchema() });

  const gql = async (query: string, variables?: Record<string, unknown>, key: string | null = alpha.apiKey) => {
    const res = await fetch(`${http.url}/graphql`, {
      method: "POST",
      headers: { "content-type": "application/json", ...(key ? { authorization: `Bearer ${key}` } : {}) },
      body: JSON.stringify({ query, variables }),
    });
    const body = (await res.json()) as Omit<GqlResponse, "status">;
    return { status: res.status, ...body };
  };

  return {
    url: http.url,
    ds,
    config,
    services,
    keys: { alpha: alpha.apiKey, beta: beta.apiKey },
    projectIds: { alpha: alpha.project.id, beta: beta.project.id },
    gql,
    async ok(query, variables, key) {
      const r = await gql(query, variables, key);
      if (r.errors?.length) throw new Error(`GraphQL errors: ${JSON.stringify(r.errors)}`);
      return r.data;
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
      await http.close();
      await ds.destroy();
      await db.drop();
    },
  };
}

export const GiB = 2 ** 30;
export const MiB = 2 ** 20;
