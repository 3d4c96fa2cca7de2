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
  ) {
    super(message);
    this.name = "DomainError";
  }
}

export const notFound = (what: string, id?: string) => new DomainError(ErrorCode.NOT_FOUND, id ? `${what} ${id} not found` : `${what} not found`);
export const badInput = (field: string, message: string) => new DomainError(ErrorCode.BAD_USER_INPUT, `${field}: ${message}`, field);
export const conflict = (message: string) => new DomainError(ErrorCode.CONFLICT, message);
export const failedPrecondition = (message: string) => new DomainError(ErrorCode.FAILED_PRECONDITION, message);
export const noSpace = (message: string) => new DomainError(ErrorCode.NO_SPACE, message);
export const rateLimited = (message: string, retryAfterSeconds: number) => new DomainError(ErrorCode.RATE_LIMITED, message, undefined, retryAfterSeconds);
export const unauthenticated = (message = "a valid API key is required: send Authorization: Bearer <key>") => new DomainError(ErrorCode.UNAUTHENTICATED, message);
