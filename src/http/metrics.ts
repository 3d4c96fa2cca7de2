import type { ApolloServerPlugin } from "@apollo/server";
import { collectDefaultMetrics, Counter, Histogram, Registry } from "prom-client";
import type { RequestHandler } from "express";

const MAX_OPERATION_NAMES = 200;

/** Prometheus metrics of one service instance (its own registry, no globals). */
export function createMetrics() {
  const registry = new Registry();
  collectDefaultMetrics({ register: registry, prefix: "stowage_process_" });

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
  const names = new Set<string>();
  const operationLabel = (name: string | null | undefined) => {
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

  const httpMiddleware = (route: string): RequestHandler => (req, res, next) => {
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
