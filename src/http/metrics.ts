import { timingSafeEqual, createHash } from "node:crypto";
import { monitorEventLoopDelay } from "node:perf_hooks";
import type { ApolloServerPlugin } from "@apollo/server";
import { collectDefaultMetrics, Counter, Gauge, Histogram, Registry } from "prom-client";
import type { RequestHandler } from "express";

const MAX_OPERATION_NAMES = 200;
/** Event-loop delay is reported over the current and the previous window of this length. */
const LOOP_WINDOW_MS = 60_000;

export interface MetricsOptions {
  /** When set, /metrics wants it as a bearer token and shows GraphQL operation names. */
  token?: string;
}

/** Whether an Authorization header carries the token; compared in constant time (as hashes, so lengths do not show). */
function bearerMatches(header: string | undefined, token: string): boolean {
  const m = /^Bearer (.+)$/i.exec(header ?? "");
  if (!m) return false;
  const digest = (s: string) => createHash("sha256").update(s).digest();
  return timingSafeEqual(digest(m[1]), digest(token));
}

/** Prometheus metrics of one service instance (its own registry, no globals). */
export function createMetrics(options: MetricsOptions = {}) {
  const registry = new Registry();
  collectDefaultMetrics({ register: registry, prefix: "stowage_process_" });

  // Anything that holds the event loop (a slow computation, a sync call) delays every request.
  const loop = monitorEventLoopDelay({ resolution: 10 });
  loop.enable();
  let windowStart = Date.now();
  let previous = { max: 0, p99: 0, mean: 0 };
  const loopStats = () => {
    const current = { max: loop.max / 1e9, p99: loop.percentile(99) / 1e9, mean: Number.isNaN(loop.mean) ? 0 : loop.mean / 1e9 };
    // A window that has just begun knows little: report the worse of it and the one before.
    const out = { max: Math.max(current.max, previous.max), p99: Math.max(current.p99, previous.p99), mean: Math.max(current.mean, previous.mean) };
    if (Date.now() - windowStart >= LOOP_WINDOW_MS) {
      previous = current;
      loop.reset();
      windowStart = Date.now();
    }
    return out;
  };
  new Gauge({
    name: "stowage_event_loop_delay_seconds",
    help: "Event-loop delay over the last one to two minutes: max, p99 and mean.",
    labelNames: ["stat"] as const,
    registers: [registry],
    collect() {
      const stats = loopStats();
      for (const stat of ["max", "p99", "mean"] as const) this.set({ stat }, stats[stat]);
    },
  });

  const graphqlRequests = new Counter({
    name: "stowage_graphql_requests_total",
    help: "GraphQL operations by operation name, type and outcome.",
    labelNames: ["operation", "type", "outcome"] as const,
    registers: [registry],
  });
  const graphqlDuration = new Histogram({
    name: "stowage_graphql_request_duration_seconds",
    help: "GraphQL operation duration by operation name.",
    labelNames: ["operation", "type"] as const,
    buckets: [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10],
    registers: [registry],
  });
  const httpRequests = new Counter({
    name: "stowage_http_requests_total",
    help: "HTTP requests by route, method and status code.",
    labelNames: ["route", "method", "status"] as const,
    registers: [registry],
  });
  const httpDuration = new Histogram({
    name: "stowage_http_request_duration_seconds",
    help: "HTTP request duration by route.",
    labelNames: ["route", "method"] as const,
    buckets: [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60],
    registers: [registry],
  });

  // Operation names come from clients; past a bound they are pooled so label sets stay finite.
  // They tell what each tenant does, so they are shown only behind METRICS_TOKEN; without
  // it every operation is "other" and only its type tells operations apart.
  const names = new Set<string>();
  const operationLabel = (name: string | null | undefined) => {
    if (!options.token) return "other";
    const n = (name || "anonymous").slice(0, 64);
    if (names.has(n)) return n;
    if (names.size >= MAX_OPERATION_NAMES) return "other";
    names.add(n);
    return n;
  };

  const apolloPlugin: ApolloServerPlugin = {
    async requestDidStart() {
      const start = process.hrtime.bigint();
      return {
        async willSendResponse(rc) {
          const operation = operationLabel(rc.operationName ?? rc.request.operationName);
          const type = rc.operation?.operation ?? "unknown";
          const outcome = rc.errors?.length ? "error" : "ok";
          graphqlRequests.inc({ operation, type, outcome });
          graphqlDuration.observe({ operation, type }, Number(process.hrtime.bigint() - start) / 1e9);
        },
      };
    },
  };

  const httpMiddleware =
    (route: string): RequestHandler =>
    (req, res, next) => {
      const start = process.hrtime.bigint();
      res.on("finish", () => {
        httpRequests.inc({ route, method: req.method, status: String(res.statusCode) });
        httpDuration.observe({ route, method: req.method }, Number(process.hrtime.bigint() - start) / 1e9);
      });
      next();
    };

  return { registry, apolloPlugin, httpMiddleware };
}

export type Metrics = ReturnType<typeof createMetrics>;

/** GET /metrics: the registry in Prometheus' text format, behind METRICS_TOKEN when one is set. */
export function metricsRoute(metrics: Metrics, token: string | undefined): RequestHandler {
  return async (req, res, next) => {
    try {
      if (token && !bearerMatches(req.headers.authorization, token)) {
        res.status(401).setHeader("WWW-Authenticate", 'Bearer realm="metrics"').json({ error: "METRICS_TOKEN required as a bearer token" });
        return;
      }
      res.setHeader("Content-Type", metrics.registry.contentType);
      res.send(await metrics.registry.metrics());
    } catch (err) {
      next(err);
    }
  };
}
