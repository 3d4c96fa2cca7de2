import express from "express";
import type { DataSource } from "typeorm";
import { migrationsApplied } from "../db/data-source";
import type { Metrics } from "./metrics";

/** How long /readyz waits for the database before it answers 503. */
const READY_WITHIN_MS = 2000;

/** /healthz (the process answers) and /readyz (the database answers and is migrated). */
export function healthRoutes(ds: DataSource, metrics: Metrics): express.Router {
  const router = express.Router();
  router.get("/healthz", metrics.httpMiddleware("/healthz"), (_req, res) => {
    res.json({ status: "ok" });
  });
  router.get("/readyz", metrics.httpMiddleware("/readyz"), async (_req, res) => {
    // A database that is gone answers at once; one that is frozen never does: give it 2 s.
    let timer: NodeJS.Timeout | undefined;
    const late = new Promise<"late">((resolve) => (timer = setTimeout(() => resolve("late"), READY_WITHIN_MS)));
    try {
      const check = (async () => {
        await ds.query("SELECT 1");
        return migrationsApplied(ds);
      })();
      check.catch(() => undefined); // a late failure is already answered
      const outcome = await Promise.race([check, late]);
      if (outcome === "late") res.status(503).json({ status: "unavailable", reason: "the database does not answer" });
      else if (!outcome) res.status(503).json({ status: "unavailable", reason: "migrations pending" });
      else res.json({ status: "ready" });
    } catch {
      res.status(503).json({ status: "unavailable", reason: "database unreachable" });
    } finally {
      clearTimeout(timer);
    }
  });
  return router;
}
