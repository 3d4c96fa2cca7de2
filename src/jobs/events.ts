import { EventEmitter } from "node:events";
import { Client } from "pg";
import type { Logger } from "../logger";

/** Something about a job changed: subscribers read the job afresh. */
export interface JobEvent {
  projectId: string;
  jobId: string;
  backupId: string | null;
  status: string;
}

export type JobEventListener = (event: JobEvent) => void;

/**
 * Publish/subscribe of job changes. The Postgres implementation carries events
 * between every process sharing the database (NOTIFY/LISTEN); the in-memory one
 * serves a single process.
 */
export interface EventBus {
  publish(event: JobEvent): Promise<void>;
  /** Many events at once (one NOTIFY statement for the Postgres bus). */
  publishAll(events: JobEvent[]): Promise<void>;
  /** Listens to one project's events; returns the function that stops listening. */
  subscribe(projectId: string, listener: JobEventListener): () => void;
  /** Listens to every project's events (the job runner, to hear of queued jobs at once). */
  subscribeAll(listener: JobEventListener): () => void;
  close(): Promise<void>;
}

export class MemoryEventBus implements EventBus {
  private readonly emitter = new EventEmitter().setMaxListeners(0);

  async publish(event: JobEvent): Promise<void> {
    this.emitter.emit(event.projectId, event);
    this.emitter.emit("*", event);
  }

  async publishAll(events: JobEvent[]): Promise<void> {
    for (const event of events) await this.publish(event);
  }

  subscribe(projectId: string, listener: JobEventListener): () => void {
    this.emitter.on(projectId, listener);
    return () => this.emitter.off(projectId, listener);
  }

  subscribeAll(listener: JobEventListener): () => void {
    return this.subscribe("*", listener);
  }

  async close(): Promise<void> {
    this.emitter.removeAllListeners();
  }
}

const CHANNEL = "stowage_job_events";
/** Delays between attempts to listen again once the connection is lost: doubling from the first to the longest. */
const RECONNECT_FIRST_MS = 1000;
const RECONNECT_LONGEST_MS = 10_000;

export class PgEventBus implements EventBus {
  private readonly local = new MemoryEventBus();
  private listener: Client | null = null;
  private closed = false;

  constructor(
    private readonly url: string,
    private readonly publishQuery: (sql: string, params: unknown[]) => Promise<unknown>,
    private readonly logger: Logger,
  ) {}

  async start(): Promise<void> {
    await this.connect();
  }

  private async connect(): Promise<void> {
    const client = new Client({ connectionString: this.url, application_name: "stowage-events", connectionTimeoutMillis: 10_000 });
    let connected = false;
    client.on("notification", (msg) => {
      if (msg.channel !== CHANNEL || !msg.payload) return;
      try {
        void this.local.publish(JSON.parse(msg.payload) as JobEvent);
      } catch {
        this.logger.warn("malformed job event", { payload: msg.payload.slice(0, 200) });
      }
    });
    client.on("error", (err) => {
      client.end().catch(() => undefined);
      if (!connected) return; // connect() rejects with it
      connected = false;
      this.logger.warn("event listener connection lost; reconnecting", { error: err.message });
      this.listener = null;
      this.reconnect(RECONNECT_FIRST_MS);
    });
    try {
      await client.connect();
      await client.query(`LISTEN ${CHANNEL}`);
    } catch (err) {
      await client.end().catch(() => undefined);
      throw err;
    }
    if (this.closed) {
      await client.end().catch(() => undefined);
      return;
    }
    connected = true;
    this.listener = client;
  }

  /** Tries to listen again after `delayMs`, and on until it does (the database may be down for a while). */
  private reconnect(delayMs: number): void {
    if (this.closed) return;
    setTimeout(() => {
      if (this.closed) return;
      this.connect().then(
        () => this.logger.info("event listener reconnected"),
        (err: Error) => {
          const next = Math.min(delayMs * 2, RECONNECT_LONGEST_MS);
          this.logger.warn("event listener reconnect failed; trying again", { error: err.message, retryInMs: next });
          this.reconnect(next);
        },
      );
    }, delayMs).unref();
  }

  async publish(event: JobEvent): Promise<void> {
    await this.publishQuery(`SELECT pg_notify($1, $2)`, [CHANNEL, JSON.stringify(event)]);
  }

  async publishAll(events: JobEvent[]): Promise<void> {
    if (events.length === 1) return this.publish(events[0]);
    if (events.length) await this.publishQuery(`SELECT pg_notify($1, e) FROM unnest($2::text[]) AS e`, [CHANNEL, events.map((e) => JSON.stringify(e))]);
  }

  subscribe(projectId: string, listener: JobEventListener): () => void {
    return this.local.subscribe(projectId, listener);
  }

  subscribeAll(listener: JobEventListener): () => void {
    return this.local.subscribeAll(listener);
  }

  async close(): Promise<void> {
    this.closed = true;
    await this.local.close();
    await this.listener?.end().catch(() => undefined);
    this.listener = null;
  }
}
