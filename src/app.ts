import "reflect-metadata";
import fs from "node:fs";
import path from "node:path";
import { Client } from "pg";
import type { DataSource } from "typeorm";
import type { Config } from "./config";
import { AdvisoryLock } from "./db/locks";
import { createDataSource } from "./db/data-source";
import { openEmbeddedPostgres, type PostgresHandle } from "./db/embedded-postgres";
import { buildStowageSchema } from "./graphql/schema";
import { startHttpServer, type HttpServer } from "./http/server";
import { startNbdServer, type NbdServer } from "./nbd/server";
import type { Logger } from "./logger";
import { createServices, type Services } from "./services";
import { RequestContext } from "./services/context";
import { collectAllGarbage, compactStorage, createJobRunner } from "./jobs";
import { PgEventBus } from "./jobs/events";
import { Scheduler } from "./services/scheduler";
import type { JobRunner, RunnerOptions } from "./jobs/runner";
import { createStorage, type Storage } from "./storage";
import { DomainError, ErrorCode } from "./domain/errors";

const EMBEDDED_DATABASE = "stowage";

export interface Database {
  ds: DataSource;
  url: string;
  /** The embedded cluster, when there is no DATABASE_URL. */
  embedded?: Pick<PostgresHandle, "owned" | "onRestart">;
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
    try {
      url = await ensureDatabase(pg.url, EMBEDDED_DATABASE);
    } catch (err) {
      await pg.stop();
      throw err;
    }
  }
  const ds = createDataSource({ url, logger, onQuery: opts.onQuery, statementTimeoutMs: config.dbStatementTimeoutSeconds * 1000, acquireTimeoutMs: config.dbAcquireTimeoutSeconds * 1000 });
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
    url,
    embedded: pg,
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
    await runner.query("SELECT pg_advisory_lock($1)", [AdvisoryLock.MIGRATIONS]);
    await ds.runMigrations({ transaction: "each" });
  } finally {
    await runner.query("SELECT pg_advisory_unlock($1)", [AdvisoryLock.MIGRATIONS]).catch(() => undefined);
    await runner.release();
  }
}

/**
 * On first start with an empty database: project `default`, its key written to
 * `<dataDir>/default-api-key` (0600) and returned so the caller prints it once.
 */
export async function ensureDefaultProject(services: Services, dataDir: string): Promise<string | null> {
  if ((await services.projects.count()) > 0) return null;
  let apiKey: string;
  try {
    ({ apiKey } = await services.projects.create("default"));
  } catch (err) {
    // Another process starting on the same empty database created it meanwhile.
    if (err instanceof DomainError && err.code === ErrorCode.CONFLICT) return null;
    throw err;
  }
  fs.mkdirSync(dataDir, { recursive: true });
  const file = path.join(dataDir, "default-api-key");
  fs.writeFileSync(file, apiKey + "\n", { mode: 0o600 });
  fs.chmodSync(file, 0o600);
  return apiKey;
}

export interface RunningService {
  /** Empty for a jobs-only worker. */
  url: string;
  http: HttpServer | null;
  /** The NBD edge, when NBD_PORT is not 0 (API processes only). */
  nbd: NbdServer | null;
  db: Database;
  services: Services;
  storage: Storage;
  runner: JobRunner;
  scheduler: Scheduler;
  stop(): Promise<void>;
}

const TERMINATION_SIGNALS = ["SIGINT", "SIGTERM", "SIGHUP"] as const;

/**
 * Runs `fn` and removes the termination-signal handlers it registered. Apollo Server
 * (stopOnTerminationSignals, on by default unless NODE_ENV=test) stops itself on
 * SIGINT/SIGTERM and then re-sends the signal to the process, which would end it
 * before the database is closed; the caller of startService orders shutdown.
 */
async function withoutNewSignalHandlers<T>(fn: () => Promise<T>): Promise<T> {
  const before = new Map(TERMINATION_SIGNALS.map((s) => [s, new Set(process.listeners(s))]));
  try {
    return await fn();
  } finally {
    for (const s of TERMINATION_SIGNALS) {
      for (const l of process.listeners(s)) if (!before.get(s)!.has(l)) process.removeListener(s, l);
    }
  }
}

/** API, jobs, the policy scheduler and garbage collection in one process; with `api: false`, a worker without the API. */
export async function startService(
  config: Config,
  logger: Logger,
  opts: { onDefaultKey?: (key: string, file: string) => void; db?: Database; runner?: RunnerOptions; api?: boolean } = {},
): Promise<RunningService> {
  const db = opts.db ?? (await openDatabase(config, logger));
  const events = new PgEventBus(db.url, (sql, params) => db.ds.query(sql, params), logger);
  const storage = createStorage(config, db.ds);
  const services = createServices(db.ds, events, storage);
  // Retention of a policy runs whenever one of its backups has become AVAILABLE.
  const retainAfter = async (projectId: string, policyId: string) => {
    await services.policyRuns
      .retainPolicy(new RequestContext(projectId, db.ds, config), policyId)
      .catch((err) => logger.error("retention failed", { policy: policyId, project: projectId, error: err }));
  };
  const runner = createJobRunner(db.ds, storage, events, config, logger, opts.runner, retainAfter);
  const scheduler = new Scheduler(db.ds, config, services.policyRuns, services.queue, logger);
  let gcTimer: NodeJS.Timeout | undefined;
  let http: HttpServer | null = null;
  let nbd: NbdServer | null = null;
  let compactTimer: NodeJS.Timeout | undefined;
  /** The compaction pass running, if any: a tick during one is skipped, and stop waits for it. */
  let compacting: Promise<void> | null = null;
  try {
    await events.start();
    const key = await ensureDefaultProject(services, config.dataDir);
    if (key) opts.onDefaultKey?.(key, path.join(config.dataDir, "default-api-key"));
    // A restore's first direct write then need not wait to learn whether the file system takes direct I/O.
    void storage.volumes.blobs.prepare?.().catch((err) => logger.warn("preparing the volume store failed", { error: err }));
    // This process started the embedded cluster: whoever ran the jobs still RUNNING is gone.
    await runner.start({ clusterStartedHere: db.embedded?.owned });
    // After the embedded cluster was restarted, the jobs whose end was lost with it end at once.
    db.embedded?.onRestart(() => void runner.recover().catch((err) => logger.error("job recovery failed", { error: err })));
    if (config.schedulerIntervalSeconds > 0) scheduler.start(config.schedulerIntervalSeconds * 1000);
    http = opts.api === false ? null : await withoutNewSignalHandlers(() => startHttpServer({ config, logger, ds: db.ds, services, storage, schema: buildStowageSchema() }));
    nbd = http && config.nbdPort !== 0 ? await startNbdServer({ config, logger, ds: db.ds, services, volumes: storage.volumes, vault: storage.vault, registry: http.registry }) : null;
    if (config.gcIntervalSeconds > 0) {
      gcTimer = setInterval(
        () => void collectAllGarbage(db.ds, storage, config.gcGraceSeconds * 1000, logger).catch((err) => logger.error("garbage collection failed", { error: err })),
        config.gcIntervalSeconds * 1000,
      );
      gcTimer.unref();
    }
    if (config.compactIntervalSeconds > 0) {
      compactTimer = setInterval(() => {
        if (compacting) return;
        compacting = compactStorage(db.ds, storage, logger)
          .catch((err) => logger.error("compaction failed", { error: err }))
          .finally(() => {
            compacting = null;
          });
      }, config.compactIntervalSeconds * 1000);
      compactTimer.unref();
    }
    let stopping: Promise<void> | undefined;
    return {
      url: http?.url ?? "",
      http,
      nbd,
      db,
      services,
      storage,
      runner,
      scheduler,
      stop() {
        stopping ??= (async () => {
          clearInterval(gcTimer);
          clearInterval(compactTimer);
          await nbd?.close();
          await http?.close();
          await scheduler.stop();
          await runner.stop();
          await compacting;
          await events.close();
          storage.close();
          await db.close();
        })();
        return stopping;
      },
    };
  } catch (err) {
    clearInterval(gcTimer);
    clearInterval(compactTimer);
    await nbd?.close().catch(() => undefined);
    await http?.close().catch(() => undefined);
    await scheduler.stop().catch(() => undefined);
    await runner.stop().catch(() => undefined);
    await events.close().catch(() => undefined);
    storage.close();
    await db.close();
    throw err;
  }
}
