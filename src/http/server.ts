import fs from "node:fs";
import { isNoSpace } from "../jobs/runner";
import { isDatabaseUnavailable } from "../db/errors";
import http from "node:http";
import path from "node:path";
import { ApolloServer } from "@apollo/server";
import { ApolloServerPluginDrainHttpServer } from "@apollo/server/plugin/drainHttpServer";
import { expressMiddleware } from "@as-integrations/express5";
import express, { type NextFunction, type Request, type Response } from "express";
import { getOperationAST, GraphQLError, Kind, parse, specifiedRules, validate, type DocumentNode, type FragmentDefinitionNode, type GraphQLSchema, type OperationDefinitionNode } from "graphql";
import { useServer } from "graphql-ws/use/ws";
import type { DataSource } from "typeorm";
import { WebSocketServer } from "ws";
import type { Config } from "../config";
import { migrationsApplied } from "../db/data-source";
import type { Project } from "../entities";
import type { GraphQLContext } from "../graphql/context";
import { createErrorFormatter, toGraphQLError } from "../graphql/errors";
import { refuseHttpSubscriptions } from "../graphql/http-subscriptions";
import { aliasLimit, costError, depthLimit, MutationRateLimiter, mutationCount, mutationLimit, operationCost } from "../graphql/limits";
import type { Logger } from "../logger";
import { RequestContext } from "../services/context";
import { DomainError } from "../domain/errors";
import type { Services } from "../services";
import type { Storage } from "../storage";
import { dataRoutes } from "./data-routes";
import { bearerMatches, createMetrics } from "./metrics";

/** How long /readyz waits for the database before it answers 503. */
const READY_WITHIN_MS = 2000;

export interface HttpDeps {
  config: Config;
  logger: Logger;
  ds: DataSource;
  services: Services;
  storage: Storage;
  schema: GraphQLSchema;
}

export interface HttpServer {
  server: http.Server;
  url: string;
  close(): Promise<void>;
}

declare module "express-serve-static-core" {
  interface Request {
    project?: Project;
  }
}

/** The playground's files, served from the installed packages (no CDN). */
const PLAYGROUND_FILES: Record<string, [pkg: string, file: string]> = {
  "graphiql.min.css": ["graphiql", "graphiql.min.css"],
  "graphiql.min.js": ["graphiql", "graphiql.min.js"],
  "react.production.min.js": ["react", "umd/react.production.min.js"],
  "react-dom.production.min.js": ["react-dom", "umd/react-dom.production.min.js"],
  "graphql-ws.min.js": ["graphql-ws", "umd/graphql-ws.min.js"],
};

/** A package's root folder, found from its entry point (packages' exports hide their other files). */
function packageDir(name: string): string {
  let dir = path.dirname(require.resolve(name));
  while (!fs.existsSync(path.join(dir, "package.json")) || JSON.parse(fs.readFileSync(path.join(dir, "package.json"), "utf8")).name !== name) {
    const up = path.dirname(dir);
    if (up === dir) throw new Error(`cannot find the folder of package ${name}`);
    dir = up;
  }
  return dir;
}

function unauthenticatedBody(message: string) {
  return { errors: [{ message, extensions: { code: "UNAUTHENTICATED" } }] };
}

export async function startHttpServer(deps: HttpDeps): Promise<HttpServer> {
  const { config, logger, ds, services, schema } = deps;
  const app = express();
  app.disable("x-powered-by");
  app.set("trust proxy", false);
  const server = http.createServer(app);
  // With Node's default 5 s keep-alive timeout, back-to-back 64 MiB disk PUTs on a
  // reused connection were reset mid-request on a machine whose cores were all
  // busy; with a longer one they are not. Idle keep-alive connections live 65 s,
  // longer than the usual 60 s of load balancers in front.
  server.keepAliveTimeout = 65_000;
  server.headersTimeout = 66_000;
  const metrics = createMetrics({ token: config.metricsToken });

  // CORS: only the configured origins; the API key travels in a header, never a cookie.
  app.use((req, res, next) => {
    const origin = req.headers.origin;
    const allowed = origin !== undefined && config.corsOrigins.includes(origin);
    // Caches must not hand one origin's answer to another.
    if (config.corsOrigins.length) res.vary("Origin");
    if (allowed) {
      res.setHeader("Access-Control-Allow-Origin", origin);
      res.setHeader("Access-Control-Allow-Headers", "Authorization, Content-Type, Content-Range, Range");
      res.setHeader("Access-Control-Allow-Methods", "GET, POST, PUT, OPTIONS");
      res.setHeader("Access-Control-Expose-Headers", "Content-Range, Content-Length, Accept-Ranges");
      res.setHeader("Access-Control-Max-Age", "600");
    }
    if (req.method === "OPTIONS") {
      res.status(allowed ? 204 : 403).end();
      return;
    }
    next();
  });

  app.get("/healthz", metrics.httpMiddleware("/healthz"), (_req, res) => {
    res.json({ status: "ok" });
  });
  app.get("/readyz", metrics.httpMiddleware("/readyz"), async (_req, res) => {
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
  app.get("/metrics", async (req, res) => {
    if (config.metricsToken && !bearerMatches(req.headers.authorization, config.metricsToken)) {
      res.status(401).setHeader("WWW-Authenticate", 'Bearer realm="metrics"').json({ error: "METRICS_TOKEN required as a bearer token" });
      return;
    }
    res.setHeader("Content-Type", metrics.registry.contentType);
    res.send(await metrics.registry.metrics());
  });

  const playgroundDir = path.join(__dirname, "playground");
  app.get("/", (_req, res) => {
    res.setHeader("Content-Security-Policy", "default-src 'self'; connect-src 'self' ws: wss:; style-src 'self' 'unsafe-inline'; img-src 'self' data:; font-src 'self' data:");
    res.sendFile(path.join(playgroundDir, "index.html"));
  });
  app.get("/playground/playground.js", (_req, res) => res.sendFile(path.join(playgroundDir, "playground.js")));
  for (const [name, [pkg, rel]] of Object.entries(PLAYGROUND_FILES)) {
    const file = path.join(packageDir(pkg), rel);
    app.get(`/playground/${name}`, (_req, res) => res.sendFile(file, { maxAge: "1h" }));
  }

  const authenticate = async (req: Request, res: Response, next: NextFunction) => {
    try {
      const project = await services.projects.authenticate(req.headers.authorization);
      if (!project) {
        res.status(401).setHeader("WWW-Authenticate", 'Bearer realm="stowage"').json(unauthenticatedBody("a valid API key is required: send Authorization: Bearer <key>"));
        return;
      }
      req.project = project;
      next();
    } catch (err) {
      next(err);
    }
  };

  const fragmentsOf = (doc: { definitions: readonly { kind: string }[] }) => {
    const out: Record<string, FragmentDefinitionNode> = {};
    for (const d of doc.definitions) if (d.kind === Kind.FRAGMENT_DEFINITION) out[(d as FragmentDefinitionNode).name.value] = d as FragmentDefinitionNode;
    return out;
  };

  app.use("/v1/disks", metrics.httpMiddleware("/v1/disks/:id/data"));
  app.use("/v1/uploads", metrics.httpMiddleware("/v1/uploads"));
  app.use("/v1/exports", metrics.httpMiddleware("/v1/exports/:id/file"));
  app.use(
    dataRoutes({
      ds,
      volumes: deps.storage.volumes,
      uploads: deps.storage.uploads,
      uploadMaxBytes: config.uploadMaxBytes,
      uploadTtlSeconds: config.uploadTtlSeconds,
      space: deps.storage.space,
      authenticate,
    }),
  );

  const makeContext = (project: Project): GraphQLContext => ({
    ctx: new RequestContext(project.id, ds, config),
    project,
    services,
  });

  const { formatError, report } = createErrorFormatter(logger);
  const formatErrors = (errors: readonly GraphQLError[], project: Project | undefined, operation: string | null | undefined) => {
    report(errors, { project: project?.id, operation });
    return errors.map((e) => formatError(e.toJSON(), e));
  };
  // Errors about the request itself carry the codes Apollo gives them over HTTP.
  const withCode = (errors: readonly GraphQLError[], code: string) =>
    errors.map((e) => new GraphQLError(e.message, { nodes: e.nodes, source: e.source, positions: e.positions, originalError: e.originalError, extensions: { code, ...e.extensions } }));

  // Upgrades are taken here rather than by ws itself, to count each address's sockets
  // and close the one too many with 1013 (try again later) before graphql-ws sees it.
  const wss = new WebSocketServer({ noServer: true, maxPayload: config.wsMaxPayloadBytes });
  const socketsPerAddress = new Map<string, number>();
  server.on("upgrade", (req: http.IncomingMessage, socket: import("node:stream").Duplex, head: Buffer) => {
    if ((req.url ?? "").split("?")[0] !== "/graphql") {
      socket.on("error", () => socket.destroy()); // the client may be gone already
      socket.end("HTTP/1.1 400 Bad Request\r\nConnection: close\r\nContent-Length: 0\r\n\r\n");
      return;
    }
    wss.handleUpgrade(req, socket, head, (ws) => {
      const address = req.socket.remoteAddress ?? "";
      const open = socketsPerAddress.get(address) ?? 0;
      if (open >= config.wsMaxConnectionsPerAddress) {
        ws.close(1013, "too many connections from this address");
        return;
      }
      socketsPerAddress.set(address, open + 1);
      ws.once("close", () => {
        const left = (socketsPerAddress.get(address) ?? 1) - 1;
        if (left > 0) socketsPerAddress.set(address, left);
        else socketsPerAddress.delete(address);
      });
      wss.emit("connection", ws, req);
      // ws emits "error" only for a client's protocol fault (a message past maxPayload, a bad
      // frame) after closing the socket with its code (1009, 1002); graphql-ws would print it
      // with a stack to the console, so it is logged here instead.
      ws.removeAllListeners("error");
      ws.on("error", (err: Error & { code?: string }) => {
        logger.warn("a WebSocket client broke the protocol; its socket is closed", { code: err.code, reason: err.message, address });
      });
    });
  });
  const validationRules = [depthLimit(config.maxQueryDepth), aliasLimit(config.maxQueryAliases), mutationLimit(config.maxMutationsPerRequest)];
  const parseOptions = { maxTokens: config.maxQueryTokens };
  const mutations = new MutationRateLimiter(config.mutationsPerMinute, config.mutationBurst);
  /** Takes the operation's mutations from the project's bucket; the rate-limit error refusing it, or nothing. */
  const rateLimit = (project: Project, op: OperationDefinitionNode, document: DocumentNode): GraphQLError | undefined => {
    try {
      mutations.take(project.id, mutationCount(op, fragmentsOf(document)));
      return undefined;
    } catch (err) {
      if (err instanceof DomainError) return toGraphQLError(err);
      throw err;
    }
  };
  const wsCleanup = useServer<Record<string, unknown>, { project?: Project }>(
    {
      schema,
      isProd: true, // close reasons never carry internal error messages
      connectionInitWaitTimeout: config.wsAuthTimeoutSeconds * 1000,
      onConnect: async (ctx) => {
        const auth = ctx.connectionParams?.authorization ?? ctx.connectionParams?.Authorization;
        let project: Project | null;
        try {
          project = await services.projects.authenticate(typeof auth === "string" ? auth : null);
        } catch (err) {
          logger.error("authenticating a WebSocket connection failed", { error: err instanceof Error ? err : String(err) });
          throw new Error("Internal server error", { cause: err });
        }
        if (!project) return false;
        ctx.extra.project = project;
        return true;
      },
      context: (ctx) => makeContext(ctx.extra.project!),
      // Parse, validate and cost-check here, as Apollo does over HTTP, so a bad document
      // gets an error message instead of closing the socket.
      onSubscribe: (ctx, _id, payload) => {
        let document: DocumentNode;
        try {
          document = parse(payload.query, parseOptions);
        } catch (err) {
          if (err instanceof GraphQLError) return withCode([err], "GRAPHQL_PARSE_FAILED");
          throw err;
        }
        const validationErrors = validate(schema, document, [...specifiedRules, ...validationRules]);
        if (validationErrors.length) return withCode(validationErrors, "GRAPHQL_VALIDATION_FAILED");
        const op = getOperationAST(document, payload.operationName);
        if (!op) return [new GraphQLError("Unable to identify the operation to run", { extensions: { code: "OPERATION_RESOLUTION_FAILURE" } })];
        const cost = operationCost(schema, op, fragmentsOf(document), payload.variables ?? {});
        if (cost > config.maxQueryCost) return [costError(cost, config.maxQueryCost)];
        const limited = rateLimit(ctx.extra.project!, op, document);
        if (limited) return [limited];
        return { schema, document, operationName: payload.operationName, variableValues: payload.variables };
      },
      onNext: (ctx, _id, payload, _args, result) => (result.errors ? { ...result, errors: formatErrors(result.errors, ctx.extra.project, payload.operationName) } : undefined),
      onError: (ctx, _id, payload, errors) => formatErrors(errors, ctx.extra.project, payload.operationName),
    },
    wss,
  );

  const apollo = new ApolloServer<GraphQLContext>({
    schema,
    introspection: true,
    csrfPrevention: false, // every request carries a bearer key that a browser never adds by itself
    includeStacktraceInErrorResponses: false,
    validationRules,
    parseOptions,
    formatError,
    plugins: [
      ApolloServerPluginDrainHttpServer({ httpServer: server }),
      {
        async serverWillStart() {
          return {
            async drainServer() {
              await wsCleanup.dispose();
            },
          };
        },
      },
      metrics.apolloPlugin,
      {
        async requestDidStart() {
          return {
            async didEncounterErrors(rc) {
              report(rc.errors, { project: rc.contextValue.project?.id, operation: rc.operationName ?? rc.request.operationName });
            },
          };
        },
      },
      {
        async requestDidStart() {
          return {
            async didResolveOperation(rc) {
              if (!rc.operation) return;
              const cost = operationCost(schema, rc.operation, fragmentsOf(rc.document), rc.request.variables ?? {});
              if (cost > config.maxQueryCost) throw costError(cost, config.maxQueryCost);
              const limited = rateLimit(rc.contextValue.project, rc.operation, rc.document);
              if (limited) throw limited;
            },
          };
        },
      },
      refuseHttpSubscriptions,
    ],
  });
  await apollo.start();

  app.use("/graphql", metrics.httpMiddleware("/graphql"), authenticate, express.json({ limit: "1mb" }), expressMiddleware(apollo, { context: async ({ req }) => makeContext(req.project!) }));

  app.use((_req, res) => {
    res.status(404).json({ error: { code: "NOT_FOUND", message: "no such endpoint" } });
  });
  app.use((err: unknown, req: Request, res: Response, _next: NextFunction) => {
    const status = (err as { status?: number; statusCode?: number }).status ?? (err as { statusCode?: number }).statusCode;
    if (status && status >= 400 && status < 500) {
      // body-parser's errors (bad JSON, too large) are about the request and safe to show.
      const message = (err as Error).message;
      if (req.originalUrl.split("?")[0] === "/graphql") res.status(status).json({ errors: [{ message, extensions: { code: "BAD_REQUEST" } }] });
      else res.status(status).json({ error: { code: "BAD_USER_INPUT", message } });
      return;
    }
    if (isDatabaseUnavailable(err)) {
      logger.warn("the database did not answer a request", { error: err instanceof Error ? err.message : String(err), method: req.method, path: req.originalUrl.split("?")[0] });
      if (res.headersSent) return;
      const message = "the database is not answering; try again shortly";
      res.status(503).setHeader("Retry-After", "5");
      if (req.originalUrl.split("?")[0] === "/graphql") res.json({ errors: [{ message, extensions: { code: "UNAVAILABLE" } }] });
      else res.json({ error: { code: "UNAVAILABLE", message } });
      return;
    }
    if (isNoSpace(err)) {
      logger.warn("a write ran out of space", { error: err instanceof Error ? err : String(err), method: req.method, path: req.originalUrl.split("?")[0], project: req.project?.id });
      if (!res.headersSent) res.status(507).json({ error: { code: "NO_SPACE", message: "the storage is out of space; nothing of this request was kept" } });
      return;
    }
    logger.error("unexpected error in HTTP request", { error: err instanceof Error ? err : String(err), method: req.method, path: req.originalUrl.split("?")[0], project: req.project?.id });
    res.status(500).json({ error: { code: "INTERNAL_SERVER_ERROR", message: "Internal server error" } });
  });

  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(config.port, config.host, () => resolve());
  });
  const addr = server.address() as import("node:net").AddressInfo;
  const host = addr.family === "IPv6" ? `[${addr.address}]` : addr.address;
  return {
    server,
    url: `http://${host}:${addr.port}`,
    async close() {
      // Apollo's drain plugin stops accepting, waits for requests in flight, then closes WebSockets.
      await apollo.stop();
      wss.close();
    },
  };
}
