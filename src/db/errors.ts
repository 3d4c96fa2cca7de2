import { QueryFailedError } from "typeorm";

/** Messages node-postgres gives when the database does not answer or cannot be reached. */
const UNREACHABLE = /^(Query read timeout|timeout exceeded when trying to connect|Connection terminated|Client has encountered a connection error|Connection terminated unexpectedly)/;

/**
 * The database is gone, frozen or too slow, rather than the request being wrong:
 * a refused or dropped connection, a connection or statement timeout, or a
 * server shutting down. The caller is told to try again (UNAVAILABLE), not that
 * the service has a bug.
 */
export function isDatabaseUnavailable(err: unknown): boolean {
  const e = (err instanceof QueryFailedError ? err.driverError : err) as { code?: string; message?: string } | null;
  if (!e) return false;
  if (["ECONNREFUSED", "ECONNRESET", "EPIPE", "ETIMEDOUT", "57014", "57P01", "57P02", "57P03", "08000", "08003", "08006"].includes(e.code ?? "")) return true;
  return typeof e.message === "string" && UNREACHABLE.test(e.message);
}
