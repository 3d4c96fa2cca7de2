import type http from "node:http";
import type { Duplex } from "node:stream";
import { getOperationAST, GraphQLError, parse, specifiedRules, validate, type DocumentNode, type GraphQLSchema } from "graphql";
import { useServer } from "graphql-ws/use/ws";
import { WebSocketServer, type WebSocket } from "ws";
import type { Config } from "../config";
import type { Project } from "../entities";
import type { GraphQLContext } from "../graphql/context";
import { sharedSubscribe } from "../graphql/subscription-results";
import type { Logger } from "../logger";
import type { Services } from "../services";
import type { GraphQLOperations } from "./graphql-operations";

// Errors about the request itself carry the codes Apollo gives them over HTTP.
const withCode = (errors: readonly GraphQLError[], code: string) =>
  errors.map((e) => new GraphQLError(e.message, { nodes: e.nodes, source: e.source, positions: e.positions, originalError: e.originalError, extensions: { code, ...e.extensions } }));

/** How many valid documents are kept, the oldest dropped first. */
const VALID_DOCUMENTS = 256;

/**
 * GraphQL over WebSocket (graphql-ws) on /graphql: the API key comes in the
 * connection's init message within WS_AUTH_TIMEOUT_SECONDS, each address holds at
 * most WS_MAX_CONNECTIONS_PER_ADDRESS sockets, and documents meet the same limits
 * as over HTTP. `dispose` closes the sockets.
 */
export function graphqlOverWebSocket(
  server: http.Server,
  deps: { config: Config; logger: Logger; services: Services; schema: GraphQLSchema },
  operations: GraphQLOperations,
): { dispose(): Promise<void>; close(): void } {
  const { config, logger, services, schema } = deps;
  // Upgrades are taken here rather than by ws itself, to count each address's sockets
  // and close the one too many with 1013 (try again later) before graphql-ws sees it.
  const wss = new WebSocketServer({ noServer: true, maxPayload: config.wsMaxPayloadBytes });
  const socketsPerAddress = new Map<string, number>();
  // The TCP socket under each WebSocket, corked while a burst of messages goes out.
  const rawSockets = new WeakMap<WebSocket, Duplex>();
  const corked = new WeakSet<Duplex>();
  /**
   * Holds a connection's writes until the work under way (the microtasks that run a
   * job event through all its subscriptions) is done, so that the messages of one
   * event to the many subscriptions of a connection leave in one write, not one each.
   */
  const batchWrites = (ws: WebSocket) => {
    const raw = rawSockets.get(ws);
    if (!raw || corked.has(raw)) return;
    corked.add(raw);
    raw.cork();
    process.nextTick(() => {
      corked.delete(raw);
      raw.uncork();
    });
  };
  server.on("upgrade", (req: http.IncomingMessage, socket: Duplex, head: Buffer) => {
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
      rawSockets.set(ws, socket);
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

  // Documents that parsed and validated, by their text (the rules depend on nothing
  // else): thousands of subscriptions send a few documents between them, and
  // validating each took most of the time to open them.
  const validDocuments = new Map<string, DocumentNode>();

  const cleanup = useServer<Record<string, unknown>, { project?: Project }>(
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
      context: (ctx) => operations.makeContext(ctx.extra.project!),
      // Subscribers of one project with the same document and variables get one execution per event.
      subscribe: sharedSubscribe((args) => (args.contextValue as GraphQLContext).ctx.projectId),
      // Parse, validate and cost-check here, as Apollo does over HTTP, so a bad document
      // gets an error message instead of closing the socket.
      onSubscribe: (ctx, _id, payload) => {
        let document = validDocuments.get(payload.query);
        if (!document) {
          try {
            document = parse(payload.query, operations.parseOptions);
          } catch (err) {
            if (err instanceof GraphQLError) return withCode([err], "GRAPHQL_PARSE_FAILED");
            throw err;
          }
          const validationErrors = validate(schema, document, [...specifiedRules, ...operations.validationRules]);
          if (validationErrors.length) return withCode(validationErrors, "GRAPHQL_VALIDATION_FAILED");
          if (validDocuments.size >= VALID_DOCUMENTS) validDocuments.delete(validDocuments.keys().next().value!);
          validDocuments.set(payload.query, document);
        }
        const op = getOperationAST(document, payload.operationName);
        if (!op) return [new GraphQLError("Unable to identify the operation to run", { extensions: { code: "OPERATION_RESOLUTION_FAILURE" } })];
        const refused = operations.refusal(ctx.extra.project!, op, document, payload.variables ?? {});
        if (refused) return [refused];
        return { schema, document, operationName: payload.operationName, variableValues: payload.variables };
      },
      onNext: (ctx, _id, payload, _args, result) => {
        batchWrites(ctx.extra.socket);
        return result.errors ? { ...result, errors: operations.formatErrors(result.errors, ctx.extra.project, payload.operationName) } : undefined;
      },
      onError: (ctx, _id, payload, errors) => operations.formatErrors(errors, ctx.extra.project, payload.operationName),
    },
    wss,
  );

  return {
    dispose: async () => {
      await cleanup.dispose();
    },
    close: () => wss.close(),
  };
}
