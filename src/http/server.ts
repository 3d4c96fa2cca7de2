import type { Registry } from "prom-client";
import http from "node:http";
import type { AddressInfo } from "node:net";
import express from "express";
import type { GraphQLSchema } from "graphql";
import type { DataSource } from "typeorm";
import type { Config } from "../config";
import type { Logger } from "../logger";
import type { Services } from "../services";
import type { Storage } from "../storage";
import { authenticator } from "./authenticate";
import { cors } from "./cors";
import { dataRoutes } from "./data-routes";
import { errorHandler, noSuchEndpoint } from "./errors";
import { graphqlOverHttp } from "./graphql-http";
import { graphqlOperations } from "./graphql-operations";
import { graphqlOverWebSocket } from "./graphql-ws";
import { healthRoutes } from "./health";
import { createMetrics, metricsRoute } from "./metrics";
import { playgroundRoutes } from "./playground-routes";

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
  /** Where /metrics reads from; the NBD edge adds its own. */
  registry: Registry;
  url: string;
  close(): Promise<void>;
}

/** The HTTP edge, assembled: each concern lives in its own file beside this one. */
export async function startHttpServer(deps: HttpDeps): Promise<HttpServer> {
  const { config, logger, services, storage } = deps;
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
  const authenticate = authenticator(services.projects);
  const operations = graphqlOperations(deps);

  app.use(cors(config.corsOrigins));
  app.use(healthRoutes(deps.ds, metrics));
  app.get("/metrics", metricsRoute(metrics, config.metricsToken));
  app.use(playgroundRoutes());

  app.use("/v1/disks", metrics.httpMiddleware("/v1/disks/:id/data"));
  app.use("/v1/uploads", metrics.httpMiddleware("/v1/uploads"));
  app.use("/v1/exports", metrics.httpMiddleware("/v1/exports/:id/file"));
  app.use(dataRoutes({ services, volumes: storage.volumes, space: storage.space, authenticate, context: (project) => operations.makeContext(project).ctx }));

  const ws = graphqlOverWebSocket(server, deps, operations);
  const graphql = await graphqlOverHttp(server, { schema: deps.schema, metrics, authenticate, drain: ws.dispose }, operations);
  app.use("/graphql", ...graphql.middleware);

  app.use(noSuchEndpoint);
  app.use(errorHandler(logger));

  await new Promise<void>((resolve, reject) => {
    server.once("error", reject);
    server.listen(config.port, config.host, () => resolve());
  });
  const addr = server.address() as AddressInfo;
  const host = addr.family === "IPv6" ? `[${addr.address}]` : addr.address;
  return {
    server,
    registry: metrics.registry,
    url: `http://${host}:${addr.port}`,
    async close() {
      // Apollo's drain plugin stops accepting, waits for requests in flight, then closes WebSockets.
      await graphql.stop();
      ws.close();
    },
  };
}
