import type http from "node:http";
import { ApolloServer } from "@apollo/server";
import { ApolloServerPluginCacheControlDisabled, ApolloServerPluginLandingPageDisabled } from "@apollo/server/plugin/disabled";
import { ApolloServerPluginDrainHttpServer } from "@apollo/server/plugin/drainHttpServer";
import { expressMiddleware } from "@as-integrations/express5";
import express, { type RequestHandler } from "express";
import type { GraphQLSchema } from "graphql";
import type { GraphQLContext } from "../graphql/context";
import { compiledExecution } from "./compiled-execution";
import { refuseHttpSubscriptions } from "../graphql/http-subscriptions";
import type { GraphQLOperations } from "./graphql-operations";
import type { Metrics } from "./metrics";

/**
 * GraphQL over HTTP (POST and GET /graphql) with Apollo: the same limits and error
 * formatting as over WebSocket. Stopping it drains the HTTP server, then runs
 * `drain` (which closes the WebSockets).
 */
export async function graphqlOverHttp(
  server: http.Server,
  deps: { schema: GraphQLSchema; metrics: Metrics; authenticate: RequestHandler; drain: () => Promise<void> },
  operations: GraphQLOperations,
): Promise<{ middleware: RequestHandler[]; stop(): Promise<void> }> {
  const { report } = operations;
  const apollo = new ApolloServer<GraphQLContext>({
    // Operations run compiled once per document; Apollo still parses, validates and runs the plugins.
    gateway: compiledExecution(deps.schema),
    introspection: true,
    csrfPrevention: false, // every request carries a bearer key that a browser never adds by itself
    includeStacktraceInErrorResponses: false,
    validationRules: operations.validationRules,
    parseOptions: operations.parseOptions,
    formatError: operations.formatError,
    plugins: [
      // The API sets no cache hints; left on, the plugin wraps every field of every answer.
      ApolloServerPluginCacheControlDisabled(),
      // The playground is served at /; Apollo's own page (which loads from a CDN) is not.
      ApolloServerPluginLandingPageDisabled(),
      ApolloServerPluginDrainHttpServer({ httpServer: server }),
      {
        async serverWillStart() {
          return {
            async drainServer() {
              await deps.drain();
            },
          };
        },
      },
      deps.metrics.apolloPlugin,
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
              const refused = operations.refusal(rc.contextValue.project, rc.operation, rc.document, rc.request.variables ?? {});
              if (refused) throw refused;
            },
          };
        },
      },
      refuseHttpSubscriptions,
    ],
  });
  await apollo.start();
  return {
    middleware: [
      deps.metrics.httpMiddleware("/graphql"),
      deps.authenticate,
      express.json({ limit: "1mb" }),
      expressMiddleware(apollo, { context: async ({ req }) => operations.makeContext(req.project!) }),
    ],
    stop: () => apollo.stop(),
  };
}
