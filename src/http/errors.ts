import type { Socket } from "node:net";
import type { ErrorRequestHandler, Request, RequestHandler, Response } from "express";
import type { Logger } from "../logger";
import { isDatabaseUnavailable } from "../db/errors";
import { answerOf, badRequest, BodyFault, DomainError, ErrorCode, internal, noSpace, unavailable } from "../domain/errors";
import { isNoSpace } from "../storage/free-space";
import { ChunkError } from "../storage/vault";

/** A refused body up to this size is read and thrown away, so that its keep-alive connection carries the next request; a larger one closes the connection. */
const DRAIN_MAX_BYTES = 16 * 2 ** 20;
/** How long a connection closed after a refused body still takes in what the client sends, so that the answer is read before the socket goes. */
const LINGER_MS = 5000;

const pathOf = (req: Request) => req.originalUrl.split("?")[0];

/**
 * Answers a domain error, its status and headers from the one mapping (`answerOf`),
 * in the shape of the endpoint: GraphQL's `errors` on /graphql, `{ error }` on the
 * data endpoints. `headers` adds what only the route knows (a Content-Range).
 */
export function sendError(res: Response, err: DomainError, headers: Record<string, string> = {}): void {
  const answer = answerOf(err);
  for (const [k, v] of Object.entries({ ...answer.headers, ...headers })) res.setHeader(k, v);
  settleBody(res.req, res);
  const body = pathOf(res.req) === "/graphql" ? { errors: [{ message: answer.message, extensions: answer.extensions }] } : { error: { ...answer.extensions, message: answer.message } };
  res.status(answer.status).json(body);
}

/**
 * The rest of a body the answer refused: a small one is read and dropped so the
 * keep-alive connection stays usable; a large one, or one of unknown length, ends
 * the connection after the answer.
 */
function settleBody(req: Request, res: Response): void {
  if (req.complete || req.readableEnded) return;
  const declared = req.headers["content-length"] === undefined ? NaN : Number(req.headers["content-length"]);
  if (!req.headers["transfer-encoding"] && Number.isSafeInteger(declared) && declared <= DRAIN_MAX_BYTES) {
    req.resume();
    return;
  }
  res.setHeader("Connection", "close");
  lingerOnClose(req.socket);
  req.resume();
}

/**
 * Node destroys a socket as soon as a `Connection: close` answer is written. Bytes
 * the client is still sending then meet a reset, and a reset can discard the
 * answer before the client reads it. This socket half-closes instead and keeps
 * reading (and dropping) until the client closes its side or LINGER_MS pass.
 */
function lingerOnClose(socket: Socket): void {
  socket.destroySoon = () => {
    socket.end();
    const timer = setTimeout(() => socket.destroy(), LINGER_MS);
    timer.unref();
    socket.once("close", () => clearTimeout(timer));
  };
}

/** An error body-parser or another Express middleware raised about the request itself (bad JSON, too large). */
function requestError(err: unknown): DomainError | null {
  const status = (err as { status?: number; statusCode?: number } | null)?.status ?? (err as { statusCode?: number } | null)?.statusCode;
  if (!status || status < 400 || status >= 500) return null;
  const message = (err as Error).message;
  if (status === 404) return new DomainError(ErrorCode.NOT_FOUND, message);
  if (status === 413) return badRequest(message, BodyFault.TOO_LARGE);
  if (status === 415) return badRequest(message, BodyFault.UNSUPPORTED_MEDIA_TYPE);
  return badRequest(message);
}

export const noSuchEndpoint: RequestHandler = (_req, res) => {
  sendError(res, new DomainError(ErrorCode.NOT_FOUND, "no such endpoint"));
};

/** The domain error an error is answered as; one that is not (a database gone, a full disk, a bug) is logged here. */
function answerFor(err: unknown, logger: Logger, where: Record<string, unknown>): DomainError {
  if (err instanceof DomainError) return err;
  const aboutRequest = requestError(err);
  if (aboutRequest) return aboutRequest;
  if (isDatabaseUnavailable(err)) {
    logger.warn("the database did not answer a request", { error: err instanceof Error ? err.message : String(err), ...where });
    return unavailable();
  }
  if (err instanceof ChunkError) {
    logger.error("a read met a damaged vault chunk", { error: err.message, ...where });
    return new DomainError(ErrorCode.CORRUPT_CHUNK, `the data read is damaged in the vault: ${err.message}; verify the backup or image it comes from`);
  }
  if (isNoSpace(err)) {
    logger.warn("a write ran out of space", { error: err instanceof Error ? err : String(err), ...where });
    return noSpace("the storage is out of space; nothing of this request was kept");
  }
  logger.error("unexpected error in HTTP request", { error: err instanceof Error ? err : String(err), ...where });
  return internal();
}

/** The last handler: every error a route passes on is answered through the one mapping, and what is not a domain error shows nothing of itself. */
export function errorHandler(logger: Logger): ErrorRequestHandler {
  return (err: unknown, req: Request, res: Response, _next) => {
    const answer = answerFor(err, logger, { method: req.method, path: pathOf(req), project: req.project?.id });
    // Halfway through an answer, only the connection can say that it failed.
    if (res.headersSent) res.destroy();
    else sendError(res, answer);
  };
}
