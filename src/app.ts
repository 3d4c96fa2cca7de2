import "reflect-metadata";
import fs from "node:fs";
import path from "node:path";
import { Client } from "pg";
import type { DataSource } from "typeorm";
import type { Config } from "./config";
import { createDataSource } from "./db/data-source";
import { openEmbeddedPostgres, type PostgresHandle } from "./db/embedded-postgres";
import { buildStowageSchema } from "./graphql/schema";
import { startHttpServer, type HttpServer } from "./http/server";
import type { Logger } from "./logger";
import { createServices, type Services } from "./services";

const EMBEDDED_DATABASE = "stowage";
/** Serialises migrations between processes sharing one database. */
const MIGRATION_LOCK = 0x5707_a6e;

export interface Database {
  ds: DataSource;
  close(): Promise<void>;
}

async function ensureDatabase(clusterUrl: string, name: string): Promise<string> {
  const client = new Client({ connectionString: clusterUrl });
  await client.connect();
  try {
    const { rowCount } = await client.query("SELECT 1 FROM pg_database WHERE datname = $1", [name]);
    if (!rowCount) {
      await client.query(`CREATE DATABASE ${client.escapeIdentifier(name)}`).catch((err: { code?: string }) => {
        if (err.code !== "42P04") throw err; // created by another process meanwhile
      });
    }
  } finally {
    await client.end();
  }
  const url = new URL(clusterUrl);
  url.pathname = `/${name}`;
  return url.toString();
}

/**
 * Connects to DATABASE_URL, or to the embedded cluster in the data directory
 * (started here unless another Stowage process already runs it), and migrates.
 */
export async function openDatabase(config: Config, logger: Logger, opts: { migrate?: boolean; onQuery?: (sql: string) => void } = {}): Promise<Database> {
  let pg: PostgresHandle | undefined;
  let url = config.databaseUrl;
  if (!url) {
    pg = await openEmbeddedPostgres(config.dataDir, logger);
    url = await ensureDatabase(pg.url, EMBEDDED_DATABASE);
  }
  const ds = createDataSource({ url, logger, onQuery: opts.onQuery });
  try {
    await ds.initialize();
    if (opts.migrate !== false) await migrate(ds);
  } catch (err) {
    if (ds.isInitialized) await ds.destroy();
    await pg?.stop();
    throw err;
  }
  return {
    ds,
    async close() {
      await ds.destroy();
      await pg?.stop();
    },
  };
}

export async function migrate(ds: DataSource): Promise<void> {
  const runner = ds.createQueryRunner();
  await runner.connect();
  try {
    await runner.query("SELECT pg_advisory_lock($1)", [MIGRATION_LOCK]);
    await ds.runMigrations({ transaction: "each" });
  } finally {
    await runner.query("SELECT pg_advisory_unlock($1)", [MIGRATION_LOCK]).catch(() => undefined);
    await runner.release();
  }
}

/**
 * On first start with an empty database: project `default`, its key written to
 * `<dataDir>/default-api-key` (0600) and returned so the caller prints it once.
 */
export async function ensureDefaultProject(services: Services, dataDir: string): Promise<string | null> {
  if ((await services.projects.count()) > 0) return null;
  const { apiKey } = await services.projects.create("default");
  fs.mkdirSync(dataDir, { recursive: true });
  const file = path.join(dataDir, "default-api-key");
  fs.writeFileSync(file, apiKey + "\n", { mode: 0o600 });
  fs.chmodSync(file, 0o600);
  return apiKey;
}

export interface RunningService {
  url: string;
  http: HttpServer;
  db: Database;
  services: Services;
  stop(): Promise<void>;
}

/** API, and later jobs and scheduler, in one process. */
export async function startService(config: Config, logger: Logger, opts: { onDefaultKey?: (key: string, file: string) => void } = {}): Promise<RunningService> {
  const db = await openDatabase(config, logger);
  const services = createServices(db.ds);
  try {
    const key = await ensureDefaultProject(services, config.dataDir);
    if (key) opts.onDefaultKey?.(key, path.join(config.dataDir, "default-api-key"));
    const http = await startHttpServer({ config, logger, ds: db.ds, services, schema: buildStowageSchema() });
    let stopping: Promise<void> | undefined;
    return {
      url: http.url,
      http,
      db,
      services,
      stop() {
        stopping ??= (async () => {
          await http.close();
          await db.close();
        })();
        return stopping;
      },
    };
  } catch (err) {
    await db.close();
    throw err;
  }
}
