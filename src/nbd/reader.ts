import type { Duplex } from "node:stream";

/** The socket is paused while this much has arrived and not been taken, so a client that sends faster than writes commit holds little. */
const HIGH_WATER = 1024 * 1024;

const EMPTY = Buffer.alloc(0);

/** The peer went away (or the connection was closed) before the bytes asked for arrived. */
export class ConnectionClosed extends Error {
  constructor(message = "the client closed the connection") {
    super(message);
  }
}

/**
 * Bytes of a socket as a queue the protocol reads from at its own pace: `read(n)`
 * waits for n bytes, `readSome(n)` takes what has come of the next n (so a large
 * write payload passes through in pieces), and several requests that came in one
 * packet are parsed without waiting. Follows the stream it is attached to, so the
 * same reader continues over TLS after STARTTLS.
 */
export class SocketReader {
  private chunks: Buffer[] = [];
  private length = 0;
  private wanted = 0;
  private wake: (() => void) | null = null;
  private failure: Error | null = null;
  private stream: Duplex | null = null;

  private readonly onData = (chunk: Buffer) => {
    this.chunks.push(chunk);
    this.length += chunk.length;
    if (this.length >= HIGH_WATER) this.stream?.pause();
    if (this.wake && this.length >= this.wanted) this.wake();
  };
  private readonly onEnd = () => this.fail(new ConnectionClosed());
  private readonly onError = (err: Error) => this.fail(new ConnectionClosed(`the connection failed: ${err.message}`));

  constructor(stream: Duplex) {
    this.attach(stream);
  }

  attach(stream: Duplex): void {
    this.stream = stream;
    stream.on("data", this.onData);
    stream.on("end", this.onEnd);
    stream.on("close", this.onEnd);
    stream.on("error", this.onError);
  }

  /** Stops reading from the current stream (before it is wrapped in TLS); nothing may be buffered. */
  detach(): void {
    const s = this.stream;
    if (!s) return;
    s.off("data", this.onData);
    s.off("end", this.onEnd);
    s.off("close", this.onEnd);
    s.off("error", this.onError);
    s.pause();
    this.stream = null;
  }

  get buffered(): number {
    return this.length;
  }

  fail(err: Error): void {
    if (!this.failure) this.failure = err;
    this.wake?.();
  }

  private async waitFor(n: number): Promise<void> {
    while (this.length < n) {
      if (this.failure) throw this.failure;
      this.wanted = n;
      this.stream?.resume();
      await new Promise<void>((resolve) => (this.wake = resolve));
      this.wake = null;
    }
  }

  /** Exactly n bytes. */
  async read(n: number): Promise<Buffer> {
    if (this.length < n) await this.waitFor(n);
    return this.take(n);
  }

  /** Between 1 and n bytes: what has arrived of them, waiting only when nothing has. */
  async readSome(n: number): Promise<Buffer> {
    if (this.length === 0) await this.waitFor(1);
    const first = this.chunks[0];
    return this.take(Math.min(n, first.length));
  }

  private take(n: number): Buffer {
    if (n === 0) return EMPTY;
    let out: Buffer;
    const first = this.chunks[0];
    if (first.length === n) {
      this.chunks.shift();
      out = first;
    } else if (first.length > n) {
      out = first.subarray(0, n);
      this.chunks[0] = first.subarray(n);
    } else {
      out = Buffer.allocUnsafe(n);
      let at = 0;
      while (at < n) {
        const c = this.chunks[0];
        const k = Math.min(c.length, n - at);
        c.copy(out, at, 0, k);
        at += k;
        if (k === c.length) this.chunks.shift();
        else this.chunks[0] = c.subarray(k);
      }
    }
    this.length -= n;
    if (this.length < HIGH_WATER / 2) this.stream?.resume();
    return out;
  }
}
