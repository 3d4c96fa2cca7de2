import { GraphQLError, type GraphQLFormattedError } from "graphql";
import { DomainError, ErrorCode } from "../services/errors";
import type { Logger } from "../logger";

/** HTTP status of a domain error answered outside GraphQL (authentication, the data endpoints). */
export function httpStatusOf(code: ErrorCode): number {
  switch (code) {
    case ErrorCode.UNAUTHENTICATED:
      return 401;
    case ErrorCode.FORBIDDEN:
      return 403;
    case ErrorCode.NOT_FOUND:
      return 404;
    case ErrorCode.BAD_USER_INPUT:
      return 400;
    case ErrorCode.CONFLICT:
      return 409;
    case ErrorCode.FAILED_PRECONDITION:
      return 412;
    case ErrorCode.NO_SPACE:
      return 507;
  }
}

export function toGraphQLError(err: DomainError): GraphQLError {
  return new GraphQLError(err.message, {
    extensions: { code: err.code, ...(err.field ? { field: err.field } : {}) },
  });
}

/**
 * The one place errors become responses: domain errors keep their code and message;
 * errors graphql-js or Apollo raised about the request itself (parse, validation,
 * coercion, limits) keep theirs; anything else is logged and answered as an internal
 * error with no message, stack, SQL or path.
 */
export function createErrorFormatter(logger: Logger) {
  return (formatted: GraphQLFormattedError, error: unknown): GraphQLFormattedError => {
    const original = error instanceof GraphQLError ? error.originalError : error;
    if (original instanceof DomainError) {
      return {
        message: original.message,
        locations: formatted.locations,
        path: formatted.path,
        extensions: { code: original.code, ...(original.field ? { field: original.field } : {}) },
      };
    }
    if (error instanceof GraphQLError && (original === undefined || original instanceof GraphQLError)) {
      const { stacktrace: _stack, http: _http, ...extensions } = formatted.extensions ?? {};
      // Apollo re-codes validation errors as GRAPHQL_VALIDATION_FAILED; a rule's own code (QUERY_TOO_COMPLEX) wins.
      const ownCode = original instanceof GraphQLError ? original.extensions.code : undefined;
      return { ...formatted, extensions: { ...extensions, code: ownCode ?? extensions.code ?? "BAD_USER_INPUT" } };
    }
    logger.error("unexpected error in request", { error: original instanceof Error ? original : String(original), path: formatted.path });
    return { message: "Internal server error", locations: formatted.locations, path: formatted.path, extensions: { code: "INTERNAL_SERVER_ERROR" } };
  };
}
