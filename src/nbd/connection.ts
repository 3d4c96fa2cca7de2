import type { Duplex } from "node:stream";
import type { OpenedExport } from "../services/nbd.service";
import { BufferPool } from "../storage/buffer-pool";
import { BLOCK_SIZE as BLOCK_BYTES } from "../formats/types";
import type { ServedBytes } from "./vault-device";
import {
  ALLOCATION_CONTEXT_ID,
  BASE_ALLOCATION,
  Chunk,
  Cmd,
  CMD_FLAG_FUA,
  CMD_FLAG_REQ_ONE,
  FLAG_C_FIXED_NEWSTYLE,
  FLAG_C_NO_ZEROES,
  FLAG_FIXED_NEWSTYLE,
  FLAG_NO_ZEROES,
  IHAVEOPT,
  Info,
  MAX_NAME_BYTES,
  MAX_OPTION_BYTES,
  NBDMAGIC,
  NbdErr,
  Opt,
  Rep,
  REPLY_FLAG_DONE,
  REPLY_MAGIC,
  REQUEST_MAGIC,
  SIMPLE_REPLY_MAGIC,
  STATE_HOLE,
  STATE_ZERO,
  STRUCTURED_REPLY_MAGIC,
  TF_CAN_MULTI_CONN,
  TF_HAS_FLAGS,
  TF_READ_ONLY,
  TF_SEND_DF,
  TF_SEND_FAST_ZERO,
  TF_SEND_FLUSH,
  TF_SEND_FUA,
  TF_SEND_TRIM,
  TF_SEND_WRITE_ZEROES,
} from "./protocol";
import { ConnectionClosed, SocketReader } from "./reader";

/**
 * Bytes of reads in progress across every connection of the process, and the most kept of idle read buffers
 * over all sizes (kept per size, clients asking for a dozen sizes kept a dozen times this). The buffers of reads
 * in flight are all reused: a fresh buffer per read is external memory that waits for a collection (under
 * several busy readers, most of the process's size and a third of a sequential read's time), and memory the C
 * library keeps once it is freed. 16 MiB keeps a sequential reader's four connections as fast as 32 did, and
 * 7 readers beside a writer no longer grow the C library's heap.
 */
const READ_BYTES_TOTAL = 16 * 1024 * 1024;
/** Buffers of reads, in power-of-two sizes from 4 KiB, reused once the socket has taken their bytes. */
const READ_BUFFERS = new BufferPool(Infinity, false, READ_BYTES_TOTAL, 4 * 1024);
/**
 * Reads from this size take a pooled buffer; smaller ones a slice of Node's own 8 KiB slabs. Node cuts only
 * buffers under 4 KiB from its slabs: a 4 KiB read (a file system's block, a random reader's request) had a
 * fresh ArrayBuffer of its own each time, thousands a second for the garbage collector.
 */
const POOLED_FROM = 4 * 1024;
const readBuffer = (n: number) => (n >= POOLED_FROM ? READ_BUFFERS.take(n) : Buffer.allocUnsafe(n));

/** A number of bytes shared by whoever takes them; a take waits until they fit (one larger than all of it runs alone). */
class ByteBudget {
  private used = 0;
  private waiters: (() => void)[] = [];
  constructor(private readonly total: number) {}

  /** Takes `n` bytes: at once (undefined) when they fit, else a promise of them. */
  take(n: number): Promise<void> | undefined {
    if (this.fits(n)) {
      this.used += n;
      return undefined;
    }
    return this.wait(n);
  }

  private fits(n: number): boolean {
    return this.used === 0 || this.used + n <= this.total;
  }

  private async wait(n: number): Promise<void> {
    while (!this.fits(n)) await new Promise<void>((r) => this.waiters.push(r));
    this.used += n;
  }

  give(n: number): void {
    this.used -= n;
    for (const w of this.waiters.splice(0)) w();
  }
}
const PROCESS_READS = new ByteBudget(READ_BYTES_TOTAL);

/** Largest READ or WRITE: advertised as the maximum block size; clients split larger transfers. */
export const MAX_REQUEST_BYTES = 32 * 1024 * 1024;
/** What a connection advertises as its preferred request size: the volume store's block. */
const PREFERRED_BLOCK = BLOCK_BYTES;
/** A READ answered in pieces of this size (structured replies), so it never sits whole in memory. */
const READ_PIECE = 4 * 1024 * 1024;
/** Bytes of reads in progress per connection; further requests wait (a client at depth 64 of 32 MiB reads holds no more; one read larger than this runs alone). */
const READ_BYTES_IN_FLIGHT = 8 * 1024 * 1024;

/** What a connection asks of the server it belongs to. */
export interface ConnectionHost {
  /** The export a client names; null when no export has that name. */
  open(name: string): Promise<OpenedExport | null>;
  /** What the export serves: its disk's shared writes in this process, or a backup or image read from the vault. */
  attach(conn: NbdConnection, exp: OpenedExport): ServedBytes;
  detach(conn: NbdConnection): void;
  /** TLS is offered (STARTTLS); `required` when it is (a non-loopback address). */
  tls: { required: boolean; upgrade(socket: Duplex): Promise<Duplex> } | null;
  count(command: string, bytes?: { read?: number; written?: number }): void;
  log(message: string, fields: Record<string, unknown>): void;
}

/** The client broke the protocol: the connection is closed, as the protocol wants for what cannot be answered. */
class ProtocolError extends Error {}

/** A request answered with an error number (the connection goes on). */
class RequestError extends Error {
  constructor(
    readonly errno: NbdErr,
    message: string,
  ) {
    super(message);
  }
}

/**
 * One NBD client: the fixed newstyle handshake, then requests until it disconnects
 * or its export is revoked. Requests are parsed as they arrive, several per socket
 * read; reads and block-status queries run concurrently (their structured reply
 * chunks may interleave), writes are applied in order and acknowledged once every
 * later read sees them.
 */
export class NbdConnection {
  private out: Duplex;
  private readonly reader: SocketReader;
  private structured = false;
  private allocationContext = false;
  private tlsDone = false;
  private noZeroes = false;
  export: OpenedExport | null = null;
  writes: ServedBytes | null = null;
  private closing = false;
  private readonly reads = new ByteBudget(READ_BYTES_IN_FLIGHT);
  private readonly inFlight = new Set<Promise<void>>();
  /** Resolves when the socket's full buffer has drained (one waiter for every reply waiting). */
  private drained: Promise<void> | null = null;
  /** The socket is corked until the end of this turn of the event loop. */
  private corked = false;

  constructor(
    private readonly socket: Duplex,
    private readonly host: ConnectionHost,
  ) {
    this.out = socket;
    this.reader = new SocketReader(socket);
  }

  /** Serves the connection to its end; never rejects. */
  async serve(): Promise<void> {
    try {
      if (await this.handshake()) await this.transmission();
    } catch (err) {
      if (!(err instanceof ConnectionClosed)) this.host.log("nbd connection closed on an error", { error: (err as Error).message, protocol: err instanceof ProtocolError });
    } finally {
      await Promise.allSettled(this.inFlight);
      if (this.writes) {
        // What was acknowledged is committed even when the client left without a FLUSH.
        await this.writes.commitNow().catch((err: Error) => this.host.log("nbd writes could not be committed at disconnect", { error: err.message, disk: this.export?.diskId }));
      }
      this.host.detach(this);
      this.out.destroy();
      this.socket.destroy();
    }
  }

  /** Drops the connection (its export was revoked, or the server stops): the next request finds it closed. */
  close(): void {
    this.closing = true;
    this.reader.fail(new ConnectionClosed("the export was revoked"));
  }

  // ---- handshake -------------------------------------------------------------------------

  /** Returns true when the client entered transmission with an export. */
  private async handshake(): Promise<boolean> {
    const hello = Buffer.allocUnsafe(18);
    hello.writeBigUInt64BE(NBDMAGIC, 0);
    hello.writeBigUInt64BE(IHAVEOPT, 8);
    hello.writeUInt16BE(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES, 16);
    this.out.write(hello);
    const clientFlags = (await this.reader.read(4)).readUInt32BE(0);
    if (clientFlags & ~(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES)) throw new ProtocolError(`unknown client flags ${clientFlags}`);
    if (!(clientFlags & FLAG_C_FIXED_NEWSTYLE)) throw new ProtocolError("the client does not speak fixed newstyle");
    this.noZeroes = Boolean(clientFlags & FLAG_C_NO_ZEROES);

    for (;;) {
      const head = await this.reader.read(16);
      if (head.readBigUInt64BE(0) !== IHAVEOPT) throw new ProtocolError("bad option magic");
      const opt = head.readUInt32BE(8);
      const length = head.readUInt32BE(12);
      if (length > MAX_OPTION_BYTES) throw new ProtocolError(`option ${opt} of ${length} bytes`);
      const data = await this.reader.read(length);
      if (this.closing) return false;
      if (this.host.tls?.required && !this.tlsDone && opt !== Opt.STARTTLS && opt !== Opt.ABORT) {
        if (opt === Opt.EXPORT_NAME) throw new ProtocolError("NBD_OPT_EXPORT_NAME before TLS");
        this.reply(opt, Rep.ERR_TLS_REQD, "TLS is required: send NBD_OPT_STARTTLS first");
        continue;
      }
      switch (opt) {
        case Opt.EXPORT_NAME: {
          const exp = await this.host.open(data.toString("utf8"));
          if (!exp) throw new ProtocolError("unknown export"); // the protocol's only answer here
          this.enter(exp);
          const tail = Buffer.alloc(10 + (this.noZeroes ? 0 : 124));
          tail.writeBigUInt64BE(BigInt(exp.sizeBytes), 0);
          tail.writeUInt16BE(this.flags(exp), 8);
          this.out.write(tail);
          return true;
        }
        case Opt.ABORT:
          this.reply(opt, Rep.ACK);
          return false;
        case Opt.LIST:
          // Export names are capabilities: there is nothing to list.
          if (length !== 0) this.reply(opt, Rep.ERR_INVALID, "NBD_OPT_LIST has no data");
          else this.reply(opt, Rep.ACK);
          break;
        case Opt.STARTTLS:
          if (!this.host.tls) this.reply(opt, Rep.ERR_UNSUP, "this server has no TLS");
          else if (length !== 0 || this.tlsDone) this.reply(opt, Rep.ERR_INVALID, "TLS is already on, or the option has data");
          else await this.startTls();
          break;
        case Opt.STRUCTURED_REPLY:
          if (length !== 0 || this.structured) this.reply(opt, Rep.ERR_INVALID, "structured replies are already on, or the option has data");
          else {
            this.structured = true;
            this.reply(opt, Rep.ACK);
          }
          break;
        case Opt.INFO:
        case Opt.GO:
          if (await this.info(opt, data)) return true;
          break;
        case Opt.LIST_META_CONTEXT:
        case Opt.SET_META_CONTEXT:
          await this.metaContext(opt, data);
          break;
        default:
          this.reply(opt, Rep.ERR_UNSUP, `option ${opt} is not supported`);
      }
    }
  }

  private reply(opt: number, type: Rep, message = "", data?: Buffer): void {
    const payload = data ?? Buffer.from(message, "utf8");
    const head = Buffer.allocUnsafe(20);
    head.writeBigUInt64BE(REPLY_MAGIC, 0);
    head.writeUInt32BE(opt, 8);
    head.writeUInt32BE(type, 12);
    head.writeUInt32BE(payload.length, 16);
    this.out.write(payload.length ? Buffer.concat([head, payload]) : head);
  }

  private async startTls(): Promise<void> {
    this.reply(Opt.STARTTLS, Rep.ACK);
    if (this.reader.buffered) throw new ProtocolError("data sent after NBD_OPT_STARTTLS before the TLS handshake");
    this.reader.detach();
    this.out = await this.host.tls!.upgrade(this.socket);
    this.reader.attach(this.out);
    this.tlsDone = true;
  }

  /** Export name and info requests of NBD_OPT_INFO/GO; null when the data is malformed. */
  private static parseInfo(data: Buffer): { name: string; requests: number[] } | null {
    if (data.length < 6) return null;
    const nameLength = data.readUInt32BE(0);
    if (nameLength > MAX_NAME_BYTES || 4 + nameLength + 2 > data.length) return null;
    const name = data.subarray(4, 4 + nameLength).toString("utf8");
    const count = data.readUInt16BE(4 + nameLength);
    if (data.length !== 4 + nameLength + 2 + 2 * count) return null;
    const requests: number[] = [];
    for (let i = 0; i < count; i++) requests.push(data.readUInt16BE(4 + nameLength + 2 + 2 * i));
    return { name, requests };
  }

  private async info(opt: Opt.INFO | Opt.GO, data: Buffer): Promise<boolean> {
    const parsed = NbdConnection.parseInfo(data);
    if (!parsed) {
      this.reply(opt, Rep.ERR_INVALID, "malformed option data");
      return false;
    }
    const exp = await this.host.open(parsed.name);
    if (!exp) {
      // A wrong, revoked or never-made name: one answer for all.
      this.reply(opt, Rep.ERR_UNKNOWN, "unknown export");
      return false;
    }
    const info = Buffer.allocUnsafe(12);
    info.writeUInt16BE(Info.EXPORT, 0);
    info.writeBigUInt64BE(BigInt(exp.sizeBytes), 2);
    info.writeUInt16BE(this.flags(exp), 10);
    this.reply(opt, Rep.INFO, "", info);
    const sizes = Buffer.allocUnsafe(14);
    sizes.writeUInt16BE(Info.BLOCK_SIZE, 0);
    sizes.writeUInt32BE(1, 2);
    sizes.writeUInt32BE(PREFERRED_BLOCK, 6);
    sizes.writeUInt32BE(MAX_REQUEST_BYTES, 10);
    this.reply(opt, Rep.INFO, "", sizes);
    if (opt === Opt.INFO) {
      this.reply(opt, Rep.ACK);
      return false;
    }
    this.enter(exp);
    this.reply(opt, Rep.ACK);
    return true;
  }

  /** Binds the connection to its export and the writes of its disk. */
  private enter(exp: OpenedExport): void {
    this.export = exp;
    this.writes = this.host.attach(this, exp);
  }

  private flags(exp: OpenedExport): number {
    // Every connection to a disk shares its writes in this process: a read on any sees what any was told, and a
    // FLUSH on any commits what all were told. That is multi-connection consistency, so clients may use several.
    let f = TF_HAS_FLAGS | TF_SEND_FLUSH | TF_SEND_DF | TF_CAN_MULTI_CONN;
    if (exp.readOnly) f |= TF_READ_ONLY;
    else f |= TF_SEND_FUA | TF_SEND_TRIM | TF_SEND_WRITE_ZEROES | TF_SEND_FAST_ZERO;
    return f;
  }

  private async metaContext(opt: Opt.LIST_META_CONTEXT | Opt.SET_META_CONTEXT, data: Buffer): Promise<void> {
    const bad = () => this.reply(opt, Rep.ERR_INVALID, "malformed option data");
    if (data.length < 8) return bad();
    const nameLength = data.readUInt32BE(0);
    if (nameLength > MAX_NAME_BYTES || 4 + nameLength + 4 > data.length) return bad();
    const name = data.subarray(4, 4 + nameLength).toString("utf8");
    const count = data.readUInt32BE(4 + nameLength);
    const queries: string[] = [];
    let at = 8 + nameLength;
    for (let i = 0; i < count; i++) {
      if (at + 4 > data.length) return bad();
      const n = data.readUInt32BE(at);
      if (at + 4 + n > data.length) return bad();
      queries.push(data.subarray(at + 4, at + 4 + n).toString("utf8"));
      at += 4 + n;
    }
    if (at !== data.length) return bad();
    if (opt === Opt.SET_META_CONTEXT && !this.structured) return this.reply(opt, Rep.ERR_INVALID, "meta contexts need structured replies");
    if (!(await this.host.open(name))) return this.reply(opt, Rep.ERR_UNKNOWN, "unknown export");
    const matches = opt === Opt.LIST_META_CONTEXT && queries.length === 0 ? true : queries.some((q) => q === BASE_ALLOCATION || (opt === Opt.LIST_META_CONTEXT && q === "base:"));
    if (opt === Opt.SET_META_CONTEXT) this.allocationContext = matches;
    if (matches) {
      const body = Buffer.allocUnsafe(4 + BASE_ALLOCATION.length);
      body.writeUInt32BE(opt === Opt.SET_META_CONTEXT ? ALLOCATION_CONTEXT_ID : 0, 0);
      body.write(BASE_ALLOCATION, 4, "utf8");
      this.reply(opt, Rep.META_CONTEXT, "", body);
    }
    this.reply(opt, Rep.ACK);
  }

  // ---- transmission ----------------------------------------------------------------------

  private async transmission(): Promise<void> {
    const exp = this.export!;
    for (;;) {
      const head = await this.reader.read(28);
      if (head.readUInt32BE(0) !== REQUEST_MAGIC) throw new ProtocolError("bad request magic");
      const flags = head.readUInt16BE(4);
      const type = head.readUInt16BE(6);
      const cookie = head.subarray(8, 16);
      const offset = head.readBigUInt64BE(16);
      const length = head.readUInt32BE(24);
      const command = Cmd[type] ?? "UNKNOWN";
      this.host.count(command);
      if (type === Cmd.DISC) return;
      if (type === Cmd.WRITE) {
        await this.write(exp, cookie, flags, offset, length);
        continue;
      }
      const range = this.range(exp, offset, length);
      if (typeof range === "string") {
        this.error(cookie, type === Cmd.READ || type === Cmd.BLOCK_STATUS ? NbdErr.EINVAL : NbdErr.ENOSPC, range);
        continue;
      }
      switch (type) {
        case Cmd.READ:
          if (length > MAX_REQUEST_BYTES) this.error(cookie, NbdErr.EINVAL, `a read of ${length} bytes is over the ${MAX_REQUEST_BYTES}-byte maximum`);
          else {
            const waiting = this.concurrently(length, () => this.read(cookie, range.offset, length));
            if (waiting) await waiting;
          }
          break;
        case Cmd.BLOCK_STATUS:
          if (!this.allocationContext) this.error(cookie, NbdErr.EINVAL, "no meta context was negotiated");
          else {
            const waiting = this.concurrently(0, () => this.blockStatus(cookie, range.offset, length, Boolean(flags & CMD_FLAG_REQ_ONE)));
            if (waiting) await waiting;
          }
          break;
        case Cmd.FLUSH: {
          // Beside the requests after it: FLUSHes that come while one is being made durable share the next journal row.
          const waiting = this.concurrently(0, () => this.settle(cookie, () => this.writes!.flush()));
          if (waiting) await waiting;
          break;
        }
        case Cmd.TRIM:
        case Cmd.WRITE_ZEROES:
          if (exp.readOnly) this.error(cookie, NbdErr.EPERM, "the export is read-only");
          else {
            await this.settle(cookie, async () => {
              await this.writes!.zero(range.offset, length);
              this.host.count(command, { written: 0 });
              if (flags & CMD_FLAG_FUA) await this.writes!.flush();
            });
          }
          break;
        case Cmd.CACHE:
          this.done(cookie);
          break;
        default:
          this.error(cookie, NbdErr.EINVAL, `command ${type} is not supported`);
      }
    }
  }

  /** The request's range as numbers, or why it is refused (past the end, or beyond what numbers hold). */
  private range(exp: OpenedExport, offset: bigint, length: number): { offset: number } | string {
    if (offset > BigInt(Number.MAX_SAFE_INTEGER) || Number(offset) + length > exp.sizeBytes) return `the request ends past the end of the ${exp.sizeBytes}-byte disk`;
    return { offset: Number(offset) };
  }

  private async write(exp: OpenedExport, cookie: Buffer, flags: number, offset: bigint, length: number): Promise<void> {
    // The payload is on the wire whatever the answer: it is read (in pieces) before the next request.
    if (length > MAX_REQUEST_BYTES) throw new ProtocolError(`a write of ${length} bytes is over the ${MAX_REQUEST_BYTES}-byte maximum`);
    const range = this.range(exp, offset, length);
    let refusal: { errno: NbdErr; message: string } | null = null;
    if (exp.readOnly) refusal = { errno: NbdErr.EPERM, message: "the export is read-only" };
    else if (typeof range === "string") refusal = { errno: NbdErr.ENOSPC, message: range };
    const start = typeof range === "string" ? 0 : range.offset;
    let pos = start;
    let left = length;
    let failure: unknown = null;
    // Pieces are handed on cut at block boundaries: a block the request covers whole then
    // arrives whole, and is never read first to keep bytes the rest of the request replaces.
    // They go as they came off the socket, never copied into one buffer first.
    let carry: Buffer[] = [];
    let carried = 0;
    while (left > 0) {
      const piece = await this.reader.readSome(left);
      left -= piece.length;
      if (refusal || failure) continue;
      carry.push(piece);
      carried += piece.length;
      const end = pos + carried;
      const cut = left === 0 ? end : Math.floor(end / BLOCK_BYTES) * BLOCK_BYTES;
      if (cut <= pos) continue;
      // The last piece straddles the cut: its head goes now, its tail with what follows.
      const over = end - cut;
      const last = carry[carry.length - 1];
      const rest = over ? last.subarray(last.length - over) : null;
      if (rest) carry[carry.length - 1] = last.subarray(0, last.length - over);
      try {
        await this.writes!.write(pos, carry);
      } catch (err) {
        failure = err;
      }
      carry = rest ? [rest] : [];
      carried = over;
      pos = cut;
    }
    if (refusal) return this.error(cookie, refusal.errno, refusal.message);
    this.host.count("WRITE", { written: length });
    await this.settle(cookie, async () => {
      if (failure) throw failure;
      if (flags & CMD_FLAG_FUA) await this.writes!.flush();
    });
  }

  /** Runs `fn` and answers the request: done, or EIO (or the request's own error). */
  private async settle(cookie: Buffer, fn: () => Promise<void>): Promise<void> {
    try {
      await fn();
      this.done(cookie);
    } catch (err) {
      if (err instanceof RequestError) this.error(cookie, err.errno, err.message);
      else {
        this.host.log("nbd request failed", { error: (err as Error).message, disk: this.export?.diskId });
        this.error(cookie, NbdErr.EIO, "the disk could not be read or written");
      }
    }
  }

  /**
   * Starts `fn` beside the requests that follow, within the connection's and the process's budgets of read
   * bytes in flight. Returns a promise only when it must wait for them: a request that fits goes on in the
   * same turn (thousands a second each pay every turn they wait).
   */
  private concurrently(bytes: number, fn: () => Promise<void>): Promise<void> | undefined {
    const mine = this.reads.take(bytes);
    if (mine) return mine.then(() => PROCESS_READS.take(bytes)).then(() => this.start(bytes, fn));
    const all = PROCESS_READS.take(bytes);
    if (all) return all.then(() => this.start(bytes, fn));
    this.start(bytes, fn);
    return undefined;
  }

  private start(bytes: number, fn: () => Promise<void>): void {
    const end = () => {
      PROCESS_READS.give(bytes);
      this.reads.give(bytes);
      this.inFlight.delete(run);
    };
    const run: Promise<void> = fn().then(end, (err: Error) => {
      this.host.log("nbd request failed", { error: err.message, disk: this.export?.diskId });
      end();
    });
    this.inFlight.add(run);
  }

  private async read(cookie: Buffer, offset: number, length: number): Promise<void> {
    if (!this.structured) {
      const data = readBuffer(length);
      try {
        await this.writes!.readInto(offset, data);
      } catch (err) {
        READ_BUFFERS.give(data);
        this.host.log("nbd read failed", { error: (err as Error).message, disk: this.export?.diskId });
        return this.error(cookie, NbdErr.EIO, "the disk could not be read");
      }
      this.host.count("READ", { read: length });
      await this.send([this.simpleHeader(cookie, 0), data], () => READ_BUFFERS.give(data));
      return;
    }
    if (length === 0) return this.done(cookie);
    for (let at = 0; at < length; at += READ_PIECE) {
      const n = Math.min(READ_PIECE, length - at);
      const data = readBuffer(n);
      try {
        await this.writes!.readInto(offset + at, data);
      } catch (err) {
        READ_BUFFERS.give(data);
        this.host.log("nbd read failed", { error: (err as Error).message, disk: this.export?.diskId });
        return this.error(cookie, NbdErr.EIO, "the disk could not be read", offset + at);
      }
      const last = at + n >= length;
      // The chunk's header and the offset its data starts at, in one buffer.
      const head = this.chunkHeader(cookie, last ? REPLY_FLAG_DONE : 0, Chunk.OFFSET_DATA, 8 + n, 8);
      head.writeBigUInt64BE(BigInt(offset + at), 20);
      this.host.count("READ", { read: n });
      await this.send([head, data], () => READ_BUFFERS.give(data));
    }
  }

  private async blockStatus(cookie: Buffer, offset: number, length: number, one: boolean): Promise<void> {
    let extents;
    try {
      extents = length ? await this.writes!.extents(offset, length) : [];
    } catch (err) {
      this.host.log("nbd block status failed", { error: (err as Error).message, disk: this.export?.diskId });
      return this.error(cookie, NbdErr.EIO, "the disk's map could not be read");
    }
    if (one) extents = extents.slice(0, 1);
    const body = Buffer.allocUnsafe(4 + 8 * extents.length);
    body.writeUInt32BE(ALLOCATION_CONTEXT_ID, 0);
    extents.forEach((e, i) => {
      body.writeUInt32BE(e.length, 4 + 8 * i);
      body.writeUInt32BE(e.data ? 0 : STATE_HOLE | STATE_ZERO, 8 + 8 * i);
    });
    await this.send([this.chunkHeader(cookie, REPLY_FLAG_DONE, Chunk.BLOCK_STATUS, body.length), body]);
  }

  private simpleHeader(cookie: Buffer, errno: number): Buffer {
    const b = Buffer.allocUnsafe(16);
    b.writeUInt32BE(SIMPLE_REPLY_MAGIC, 0);
    b.writeUInt32BE(errno, 4);
    cookie.copy(b, 8);
    return b;
  }

  /** A structured reply chunk's header, with room for `extra` bytes of its payload after it. */
  private chunkHeader(cookie: Buffer, flags: number, type: Chunk, length: number, extra = 0): Buffer {
    const b = Buffer.allocUnsafe(20 + extra);
    b.writeUInt32BE(STRUCTURED_REPLY_MAGIC, 0);
    b.writeUInt16BE(flags, 4);
    b.writeUInt16BE(type, 6);
    cookie.copy(b, 8);
    b.writeUInt32BE(length, 16);
    return b;
  }

  /** Corks the socket until the end of this turn of the event loop. */
  private batch(): void {
    if (this.corked) return;
    this.corked = true;
    this.out.cork();
    setImmediate(() => {
      this.corked = false;
      this.out.uncork();
    });
  }

  private done(cookie: Buffer): void {
    this.batch();
    if (this.structured) this.out.write(this.chunkHeader(cookie, REPLY_FLAG_DONE, Chunk.NONE, 0));
    else this.out.write(this.simpleHeader(cookie, 0));
  }

  private error(cookie: Buffer, errno: NbdErr, message: string, offset?: number): void {
    this.batch();
    if (!this.structured) return void this.out.write(this.simpleHeader(cookie, errno));
    const text = Buffer.from(message.slice(0, 200), "utf8");
    const body = Buffer.allocUnsafe(6 + text.length + (offset === undefined ? 0 : 8));
    body.writeUInt32BE(errno, 0);
    body.writeUInt16BE(text.length, 4);
    text.copy(body, 6);
    if (offset !== undefined) body.writeBigUInt64BE(BigInt(offset), 6 + text.length);
    this.out.write(Buffer.concat([this.chunkHeader(cookie, REPLY_FLAG_DONE, offset === undefined ? Chunk.ERROR : Chunk.ERROR_OFFSET, body.length), body]));
  }

  /**
   * Writes one reply's parts back to back; waits while the socket's buffer is full. The
   * replies of one turn of the event loop leave in one write of the socket: many reads
   * finish in the same turn, and a system call per reply cost more than the reads.
   */
  private send(parts: Buffer[], written?: () => void): Promise<void> {
    this.batch();
    let ok = true;
    parts.forEach((p, i) => (ok = i === parts.length - 1 && written ? this.out.write(p, () => written()) : this.out.write(p)));
    if (ok || this.out.destroyed) return Promise.resolve();
    this.drained ??= new Promise<void>((resolve) => {
      const done = () => {
        this.out.off("drain", done);
        this.out.off("close", done);
        this.drained = null;
        resolve();
      };
      this.out.on("drain", done);
      this.out.on("close", done);
    });
    return this.drained;
  }
}
