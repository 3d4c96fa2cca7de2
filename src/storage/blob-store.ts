import type { Readable } from "node:stream";

export interface BlobInfo {
  key: string;
  size: number;
  modifiedAt: Date;
}

/**
 * Where bytes live: the volume store's segments, the vault's packs, uploads and
 * exports. Keys are relative paths of lower-case letters, digits, '-', '_', '.'
 * and '/'. A blob is written whole and becomes visible only once durable; it is
 * never modified in place.
 */
export interface BlobStore {
  readonly name: string;
  /** Writes a blob from memory (one buffer, or parts written back to back), durably. */
  put(key: string, data: Buffer | Buffer[]): Promise<void>;
  /** Writes a blob from a stream, durably; returns its size. */
  putStream(key: string, body: Readable): Promise<number>;
  /**
   * Opens a blob for writing piece by piece: each `write` has its bytes taken
   * (the buffer may be reused once it resolves); `close` makes the blob durable
   * and visible and returns its size; `abort` drops it. `bypassCache` asks for a
   * blob nobody reads soon (a restored disk) to skip the operating system's
   * cache, where the backend can.
   */
  openWriter(key: string, opts?: { bypassCache?: boolean }): Promise<BlobWriter>;
  get(key: string): Promise<Buffer>;
  /** Bytes [offset, offset + length) of a blob. */
  getRange(key: string, offset: number, length: number): Promise<Buffer>;
  /** Fills `into` with the bytes of a blob from `offset` on. */
  readInto(key: string, offset: number, into: Buffer): Promise<void>;
  /**
   * The same for a blob whose bytes never change once written (a volume segment): a store
   * may keep it open between reads. Optional; readInto is used where a store lacks it.
   */
  readFixedInto?(key: string, offset: number, into: Buffer): Promise<void>;
  /** Lets go of what the store keeps open (files of readFixedInto). */
  closeFiles?(): void;
  /** A stream of the blob, or of [start, end] inclusive. */
  getStream(key: string, range?: { start: number; end: number }): Promise<Readable>;
  /** Size, or null when absent. */
  stat(key: string): Promise<BlobInfo | null>;
  delete(key: string): Promise<void>;
  /** The finished blobs under `prefix`; what unfinished writes left behind is not listed. */
  list(prefix: string): AsyncIterable<BlobInfo>;
  /**
   * Deletes what writes under `prefix` left behind when their process died before
   * they finished (a crash mid-write), once untouched since `before`, except the
   * writes of blobs `keep` names (pending ones, still being written). Garbage
   * collection calls it; a backend whose store cleans these up itself (S3 with a
   * lifecycle rule for incomplete multipart uploads) need not implement it.
   */
  removeIncomplete?(prefix: string, before: Date, keep?: (key: string) => boolean): Promise<{ count: number; bytes: number }>;
  /**
   * Bytes the backend can still take, where it can tell (a local file system:
   * what its volume has free); an object store cannot and leaves it out.
   */
  freeBytes?(): Promise<number>;
  /**
   * Readies what the first write with `bypassCache` needs, so that write does not
   * wait for it; a service calls it once at start. Optional, and never required
   * for correctness.
   */
  prepare?(): Promise<void>;
}

export interface BlobWriter {
  /** Appends the buffers, back to back. */
  write(data: Buffer | Buffer[]): Promise<void>;
  /**
   * Appends `bytes` zeros. A backend that can leaves a hole (a sparse file),
   * which costs no disk and no writing; others write the zeros.
   */
  skip(bytes: number): Promise<void>;
  close(): Promise<number>;
  abort(): Promise<void>;
}

export class BlobNotFoundError extends Error {
  constructor(readonly key: string) {
    super(`blob ${key} does not exist`);
    this.name = "BlobNotFoundError";
  }
}

const KEY = /^[a-z0-9_.-]+(\/[a-z0-9_.-]+)*$/;

/** Refuses keys that could escape a backend's root or collide with its temporary files. */
export function checkKey(key: string): string {
  if (typeof key !== "string" || key.length === 0 || key.length > 512 || !KEY.test(key) || key.split("/").some((p) => p === "." || p === ".." || p.startsWith(".tmp"))) {
    throw new Error(`invalid blob key "${key}"`);
  }
  return key;
}

export function checkPrefix(prefix: string): string {
  if (prefix === "") return prefix;
  return checkKey(prefix.replace(/\/$/, "")) + (prefix.endsWith("/") ? "/" : "");
}
