export enum ErrorCode {
  UNAUTHENTICATED = "UNAUTHENTICATED",
  FORBIDDEN = "FORBIDDEN",
  NOT_FOUND = "NOT_FOUND",
  BAD_USER_INPUT = "BAD_USER_INPUT",
  CONFLICT = "CONFLICT",
  FAILED_PRECONDITION = "FAILED_PRECONDITION",
  /** The file system the blobs live on is below its free-space floor: writes and the jobs that write wait until space is freed. */
  NO_SPACE = "NO_SPACE",
  /** The project sent more mutations than its rate allows; `retryAfterSeconds` says when to try again. */
  RATE_LIMITED = "RATE_LIMITED",
  /** The HTTP request itself is malformed (a body that is not JSON, or too large), as Apollo names it. */
  BAD_REQUEST = "BAD_REQUEST",
  /** Bytes the request reads live in a vault chunk that is missing or fails its checksum (a disk made from a backup or image, read from the vault). */
  CORRUPT_CHUNK = "CORRUPT_CHUNK",
  /** The database does not answer; the request may be tried again shortly. */
  UNAVAILABLE = "UNAVAILABLE",
  /** A bug: logged, and answered with no message, stack, SQL or path. */
  INTERNAL = "INTERNAL_SERVER_ERROR",
}

/** What of a request's bytes is refused, where HTTP has a status of its own for it; GraphQL shows only the code. */
export enum BodyFault {
  LENGTH_REQUIRED = "LENGTH_REQUIRED",
  TOO_LARGE = "TOO_LARGE",
  UNSUPPORTED_MEDIA_TYPE = "UNSUPPORTED_MEDIA_TYPE",
  RANGE_NOT_SATISFIABLE = "RANGE_NOT_SATISFIABLE",
}

/** An error whose message is safe to show to the caller. */
export class DomainError extends Error {
  constructor(
    readonly code: ErrorCode,
    message: string,
    /** The input field at fault, for BAD_USER_INPUT. */
    readonly field?: string,
    /** For RATE_LIMITED: when the request would be taken. */
    readonly retryAfterSeconds?: number,
    /** For BAD_USER_INPUT and BAD_REQUEST over HTTP: which part of the body or its headers is refused. */
    readonly fault?: BodyFault,
  ) {
    super(message);
    this.name = "DomainError";
  }
}

export const notFound = (what: string, id?: string) => new DomainError(ErrorCode.NOT_FOUND, id ? `${what} ${id} not found` : `${what} not found`);
export const badInput = (field: string, message: string) => new DomainError(ErrorCode.BAD_USER_INPUT, `${field}: ${message}`, field);
/** Bytes or their headers refused by the data endpoints; the message names what is wrong. */
export const badBody = (message: string, fault?: BodyFault) => new DomainError(ErrorCode.BAD_USER_INPUT, message, undefined, undefined, fault);
export const badRequest = (message: string, fault?: BodyFault) => new DomainError(ErrorCode.BAD_REQUEST, message, undefined, undefined, fault);
export const conflict = (message: string) => new DomainError(ErrorCode.CONFLICT, message);
export const failedPrecondition = (message: string) => new DomainError(ErrorCode.FAILED_PRECONDITION, message);
export const noSpace = (message: string) => new DomainError(ErrorCode.NO_SPACE, message);
export const rateLimited = (message: string, retryAfterSeconds: number) => new DomainError(ErrorCode.RATE_LIMITED, message, undefined, retryAfterSeconds);
export const unauthenticated = (message = "a valid API key is required: send Authorization: Bearer <key>") => new DomainError(ErrorCode.UNAUTHENTICATED, message);
export const unavailable = () => new DomainError(ErrorCode.UNAVAILABLE, "the database is not answering; try again shortly");
export const internal = () => new DomainError(ErrorCode.INTERNAL, "Internal server error");

/** Compiles only when every case of a union was handled before it. */
function assertUnreachable(x: never): never {
  throw new Error(`unhandled case ${String(x)}`);
}

/** How an error is answered: the HTTP status and headers, and what the caller sees (the GraphQL error's message and extensions, or the `error` of a data endpoint's body). */
export interface ErrorAnswer {
  status: number;
  headers: Record<string, string>;
  message: string;
  extensions: { code: ErrorCode; field?: string; retryAfterSeconds?: number };
}

function bodyStatus(fault: BodyFault | undefined): number {
  switch (fault) {
    case undefined:
      return 400;
    case BodyFault.LENGTH_REQUIRED:
      return 411;
    case BodyFault.TOO_LARGE:
      return 413;
    case BodyFault.UNSUPPORTED_MEDIA_TYPE:
      return 415;
    case BodyFault.RANGE_NOT_SATISFIABLE:
      return 416;
    default:
      return assertUnreachable(fault);
  }
}

/** The HTTP status of each code: the one place it is decided, so a new code does not compile until it is mapped. */
function statusOf(err: DomainError): number {
  const code = err.code;
  switch (code) {
    case ErrorCode.UNAUTHENTICATED:
      return 401;
    case ErrorCode.FORBIDDEN:
      return 403;
    case ErrorCode.NOT_FOUND:
      return 404;
    case ErrorCode.BAD_USER_INPUT:
    case ErrorCode.BAD_REQUEST:
      return bodyStatus(err.fault);
    case ErrorCode.CONFLICT:
    case ErrorCode.FAILED_PRECONDITION:
      return 409;
    case ErrorCode.NO_SPACE:
      return 507;
    case ErrorCode.RATE_LIMITED:
      return 429;
    case ErrorCode.UNAVAILABLE:
      return 503;
    case ErrorCode.CORRUPT_CHUNK:
    case ErrorCode.INTERNAL:
      return 500;
    default:
      return assertUnreachable(code);
  }
}

/** The one mapping from a domain error to its answer, for GraphQL and the data endpoints alike. */
export function answerOf(err: DomainError): ErrorAnswer {
  const headers: Record<string, string> = {};
  if (err.code === ErrorCode.UNAUTHENTICATED) headers["WWW-Authenticate"] = 'Bearer realm="stowage"';
  if (err.code === ErrorCode.UNAVAILABLE) headers["Retry-After"] = "5";
  if (err.retryAfterSeconds !== undefined) headers["Retry-After"] = String(err.retryAfterSeconds);
  return {
    status: statusOf(err),
    headers,
    message: err.message,
    extensions: {
      code: err.code,
      ...(err.field ? { field: err.field } : {}),
      ...(err.retryAfterSeconds !== undefined ? { retryAfterSeconds: err.retryAfterSeconds } : {}),
    },
  };
}
