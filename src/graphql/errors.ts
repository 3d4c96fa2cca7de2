import { HeaderMap } from "@apollo/server";
import { GraphQLError, type GraphQLFormattedError } from "graphql";
import { answerOf, DomainError, internal, unavailable } from "../domain/errors";
import type { Logger } from "../logger";
import { isDatabaseUnavailable } from "../db/errors";

/**
 * A domain error refusing a whole request before it runs (rate limit): Apollo answers
 * it with the status and headers (Retry-After) the one mapping gives its code.
 */
export function requestRefusal(err: DomainError): GraphQLError {
  const { status, headers, extensions } = answerOf(err);
  return new GraphQLError(err.message, { originalError: err, extensions: { ...extensions, http: { status, headers: new HeaderMap(Object.entries(headers).map(([k, v]) => [k.toLowerCase(), v])) } } });
}

/** graphql-js's parse error at the token limit (MAX_QUERY_TOKENS): a limit like depth and cost, not a typo ("more that" in graphql 16). */
const TOKEN_LIMIT = /^Syntax Error: Document contains more th(?:an|at) \d+ tokens/;

/** An error nothing explains (a bug): neither a domain error nor graphql-js or Apollo speaking about the request. */
function unexpected(error: unknown): boolean {
  const original = error instanceof GraphQLError ? error.originalError : error;
  if (original instanceof DomainError) return false;
  return !(error instanceof GraphQLError && (original === undefined || original instanceof GraphQLError));
}

/**
 * The one place errors become responses: domain errors keep their code and message;
 * errors graphql-js or Apollo raised about the request itself (parse, validation,
 * coercion, limits) keep theirs; anything else is logged and answered as an internal
 * error with no message, stack, SQL or path.
 *
 * A request's errors pass through `report` before they are formatted, so the line
 * names the caller's project and operation; the formatter logs the errors nothing
 * reported (those raised before the request had a context).
 */
export function createErrorFormatter(logger: Logger) {
  // The GraphQLErrors already logged; graphql-js makes one per failed field, so none hides another.
  const reported = new WeakSet<object>();
  const log = (error: unknown, original: unknown, fields: Record<string, unknown>) => {
    if (typeof error === "object" && error !== null) {
      if (reported.has(error)) return;
      reported.add(error);
    }
    logger.error("unexpected error in request", { error: original instanceof Error ? original : String(original), ...fields });
  };

  const report = (errors: readonly GraphQLError[], request: { project?: string; operation?: string | null }) => {
    for (const e of errors) {
      if (unexpected(e) && !isDatabaseUnavailable(e.originalError)) log(e, e.originalError, { path: e.path, project: request.project, operation: request.operation ?? undefined });
    }
  };

  const formatError = (formatted: GraphQLFormattedError, error: unknown): GraphQLFormattedError => {
    const original = error instanceof GraphQLError ? error.originalError : error;
    if (original instanceof DomainError) {
      const { message, extensions } = answerOf(original);
      return { message, locations: formatted.locations, path: formatted.path, extensions };
    }
    if (!unexpected(error)) {
      const { stacktrace: _stack, http: _http, ...extensions } = formatted.extensions ?? {};
      // Apollo re-codes validation errors as GRAPHQL_VALIDATION_FAILED; a rule's own code (QUERY_TOO_COMPLEX) wins.
      const ownCode = original instanceof GraphQLError ? (original.extensions.code ?? (TOKEN_LIMIT.test(original.message) ? "QUERY_TOO_COMPLEX" : undefined)) : undefined;
      return { ...formatted, extensions: { ...extensions, code: ownCode ?? extensions.code ?? "BAD_USER_INPUT" } };
    }
    if (isDatabaseUnavailable(original)) {
      logger.warn("the database did not answer a request", { error: original instanceof Error ? original.message : String(original), path: formatted.path });
      const { message, extensions } = answerOf(unavailable());
      return { message, locations: formatted.locations, path: formatted.path, extensions };
    }
    log(error, original, { path: formatted.path });
    const { message, extensions } = answerOf(internal());
    return { message, locations: formatted.locations, path: formatted.path, extensions };
  };

  return { formatError, report };
}

/** The `{ code message }` a failed job, image or export shows; null while nothing failed. */
export function failureOf(row: { errorCode: string | null; errorMessage: string | null }): { code: string; message: string } | null {
  return row.errorCode ? { code: row.errorCode, message: row.errorMessage ?? "" } : null;
}
