import net from "node:net";

/**
 * A minimal NBD client over a raw socket, for what real clients never send: bad
 * magic, requests past the end, oversized lengths, a disconnect mid-request. It
 * speaks the fixed newstyle handshake and simple replies (no structured ones).
 */
export class RawNbd {
  private buf = Buffer.alloc(0);
  private waiting: (() => void) | null = null;
  closed = false;

  private constructor(readonly socket: net.Socket) {
    socket.on("data", (d: Buffer) => {
      this.buf = Buffer.concat([this.buf, d]);
      this.waiting?.();
    });
    socket.on("close", () => {
      this.closed = true;
      this.waiting?.();
    });
    socket.on("error", () => undefined);
  }

  static async connect(port: number): Promise<RawNbd> {
    const socket = net.connect(port, "127.0.0.1");
    await new Promise<void>((resolve, reject) => socket.once("connect", resolve).once("error", reject));
    const c = new RawNbd(socket);
    const hello = await c.read(18);
    if (hello.toString("latin1", 0, 8) !== "NBDMAGIC" || hello.toString("latin1", 8, 16) !== "IHAVEOPT") throw new Error("not an NBD server");
    const flags = Buffer.alloc(4);
    flags.writeUInt32BE(3); // fixed newstyle, no zeroes
    socket.write(flags);
    return c;
  }

  /** Resolves with n bytes, or null when the server closed the connection first. */
  async read(n: number, timeoutMs = 5000): Promise<Buffer> {
    const deadline = Date.now() + timeoutMs;
    while (this.buf.length < n) {
      if (this.closed) throw new Error("closed");
      if (Date.now() > deadline) throw new Error("timed out");
      await new Promise<void>((resolve) => {
        this.waiting = resolve;
        setTimeout(resolve, 50);
      });
      this.waiting = null;
    }
    const out = this.buf.subarray(0, n);
    this.buf = this.buf.subarray(n);
    return out;
  }

  /** Waits until the server closes the connection; false if it is still open after `timeoutMs`. */
  async closedWithin(timeoutMs: number): Promise<boolean> {
    const deadline = Date.now() + timeoutMs;
    while (!this.closed && Date.now() < deadline) await new Promise((r) => setTimeout(r, 20));
    return this.closed;
  }

  option(opt: number, data: Buffer = Buffer.alloc(0)): void {
    const head = Buffer.alloc(16);
    head.write("IHAVEOPT", 0, "latin1");
    head.writeUInt32BE(opt, 8);
    head.writeUInt32BE(data.length, 12);
    this.socket.write(Buffer.concat([head, data]));
  }

  /** Option replies up to and including the final one (ACK or an error). */
  async replies(): Promise<{ type: number; data: Buffer }[]> {
    const out: { type: number; data: Buffer }[] = [];
    for (;;) {
      const head = await this.read(20);
      const type = head.readUInt32BE(12);
      const data = await this.read(head.readUInt32BE(16));
      out.push({ type, data });
      if (type === 1 || type >= 0x80000000) return out;
    }
  }

  /** NBD_OPT_GO: the export's size and flags, or the error reply type. */
  async go(name: string): Promise<{ size: number; flags: number } | { error: number }> {
    const n = Buffer.from(name, "utf8");
    const data = Buffer.alloc(4 + n.length + 2);
    data.writeUInt32BE(n.length, 0);
    n.copy(data, 4);
    this.option(7, data);
    const replies = await this.replies();
    const last = replies[replies.length - 1];
    if (last.type !== 1) return { error: last.type };
    const info = replies.find((r) => r.type === 3 && r.data.readUInt16BE(0) === 0)!;
    return { size: Number(info.data.readBigUInt64BE(2)), flags: info.data.readUInt16BE(10) };
  }

  request(type: number, offset: number | bigint, length: number, cookie = 1, flags = 0, payload?: Buffer): void {
    const head = Buffer.alloc(28);
    head.writeUInt32BE(0x25609513, 0);
    head.writeUInt16BE(flags, 4);
    head.writeUInt16BE(type, 6);
    head.writeBigUInt64BE(BigInt(cookie), 8);
    head.writeBigUInt64BE(BigInt(offset), 16);
    head.writeUInt32BE(length, 24);
    this.socket.write(payload ? Buffer.concat([head, payload]) : head);
  }

  /** A simple reply: its error and cookie (and `dataLength` bytes after it for a successful READ). */
  async reply(dataLength = 0): Promise<{ error: number; cookie: number; data: Buffer }> {
    const head = await this.read(16);
    if (head.readUInt32BE(0) !== 0x67446698) throw new Error("not a simple reply");
    const error = head.readUInt32BE(4);
    const data = error === 0 && dataLength ? await this.read(dataLength) : Buffer.alloc(0);
    return { error, cookie: Number(head.readBigUInt64BE(8)), data };
  }

  end(): void {
    this.socket.destroy();
  }
}
