import { DataSource, type Logger as TypeOrmLogger } from "typeorm";
import { migrations } from "../../migrations";
import { entities } from "../entities";
import type { Logger } from "../logger";
import { SnakeNamingStrategy } from "./naming-strategy";
import { useFastTimestamps } from "./timestamps";

export interface DataSourceOptions {
  url: string;
  logger: Logger;
  poolSize?: number;
  /** Called with every SQL statement sent; the statement-count tests listen here. */
  onQuery?: (sql: string) => void;
  /** Statements running longer are cancelled (by Postgres, and 5 s later by the client, for a server that does not answer). */
  statementTimeoutMs?: number;
  /** Longest wait for a connection from the pool, or for a new one. */
  acquireTimeoutMs?: number;
}

/** A statement's text, also of a named (prepared) one, which pg takes as { name, text, values }. */
const textOf = (query: string | { text: string }) => (typeof query === "string" ? query : query.text);

class QueryLogger implements TypeOrmLogger {
  constructor(
    private readonly logger: Logger,
    private readonly onQuery?: (sql: string) => void,
  ) {}
  logQuery(query: string | { text: string }) {
    this.onQuery?.(textOf(query));
  }
  logQueryError(error: string | Error, query: string | { text: string }) {
    this.logger.debug("query failed", { error: error instanceof Error ? error.message : error, query: textOf(query) });
  }
  logQuerySlow(time: number, query: string | { text: string }) {
    this.logger.warn("slow query", { ms: time, query: textOf(query).slice(0, 500) });
  }
  logSchemaBuild() {}
  logMigration(message: string) {
    this.logger.info(message);
  }
  log(level: "log" | "info" | "warn", message: unknown) {
    if (level === "warn") this.logger.warn(String(message));
  }
}

export function createDataSource(opts: DataSourceOptions): DataSource {
  useFastTimestamps();
  return new DataSource({
    type: "postgres",
    url: opts.url,
    entities,
    migrations,
    migrationsTableName: "migrations",
    migrationsTransactionMode: "each",
    synchronize: false,
    namingStrategy: new SnakeNamingStrategy(),
    logging: ["query", "error", "warn", "migration"],
    logger: new QueryLogger(opts.logger, opts.onQuery),
    maxQueryExecutionTime: 2000,
    extra: {
      max: opts.poolSize ?? 20,
      application_name: "stowage",
      ...(opts.statementTimeoutMs && { statement_timeout: opts.statementTimeoutMs, query_timeout: opts.statementTimeoutMs + 5000 }),
      ...(opts.acquireTimeoutMs && { connectionTimeoutMillis: opts.acquireTimeoutMs }),
    },
  });
}

/** True when every migration the code knows has been applied. */
export async function migrationsApplied(ds: DataSource): Promise<boolean> {
  return !(await ds.showMigrations());
}
