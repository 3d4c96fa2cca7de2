import { QueryFailedError } from "typeorm";
import { conflict, DomainError } from "./errors";

/**
 * Turns a constraint violation that a race let through into a domain error; the
 * services check the rules first, so this only speaks when two requests collide.
 */
export function translateDbError(err: unknown, messages: Record<string, string> = {}): unknown {
  if (err instanceof DomainError) return err;
  if (err instanceof QueryFailedError) {
    const pg = err.driverError as { code?: string; constraint?: string };
    if (pg.code === "23505" || pg.code === "23P01") {
      return conflict(messages[pg.constraint ?? ""] ?? "the change conflicts with another resource; try again");
    }
    if (pg.code === "40001" || pg.code === "40P01") return conflict("the resource changed concurrently; try again");
  }
  return err;
}

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
