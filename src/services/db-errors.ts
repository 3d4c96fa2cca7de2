import { QueryFailedError } from "typeorm";
import { conflict, DomainError } from "../domain/errors";

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
