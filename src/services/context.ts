import type { DataSource } from "typeorm";
import type { Config } from "../config";
import { createLoaders, type Loaders } from "./loaders";

/**
 * Who is asking and with what: the project every read and write is scoped to, the
 * database, and this request's loaders. Passed first to every service call.
 */
export class RequestContext {
  private currentLoaders: Loaders;

  constructor(
    readonly projectId: string,
    readonly ds: DataSource,
    readonly config: Config,
    readonly now: () => Date = () => new Date(),
  ) {
    this.currentLoaders = createLoaders(ds, projectId, config.maxPageSize);
  }

  get loaders(): Loaders {
    return this.currentLoaders;
  }

  /**
   * Reads through the loaders of another context of the same project from now on:
   * the subscribers of one job event share one set, so the event costs one read of
   * each row however many subscribers there are.
   */
  readFrom(other: RequestContext): void {
    if (other.projectId !== this.projectId || other.ds !== this.ds) throw new Error("a request context can only share the loaders of its own project and database");
    this.currentLoaders = other.currentLoaders;
  }

  /** After a write, later reads in the same request must not see cached rows. */
  invalidate(): void {
    this.currentLoaders = createLoaders(this.ds, this.projectId, this.config.maxPageSize);
  }
}
