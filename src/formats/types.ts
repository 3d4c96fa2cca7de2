/**
 * Disk-image formats. Readers turn a file into the extents of the virtual disk
 * it describes; writers turn the blocks of a disk into a file. Both stream: a
 * reader reads its source by ranges, a writer yields its output piece by piece,
 * and neither holds more than its format's metadata (bounded by FormatLimits) and
 * a few clusters in memory.
 */

export type FormatName = "RAW" | "QCOW2" | "VMDK" | "VHD";

/** A file readable at any offset (an upload in the blob store, a file on disk). */
export interface RandomAccessSource {
  readonly size: number;
  /** Exactly `length` bytes at `offset`; never asked past `size`. */
  read(offset: number, length: number): Promise<Buffer>;
  /** Fills `into` with the bytes at `offset`, as `read` would return them; readers fall back to `read` without it. */
  readInto?(offset: number, into: Buffer): Promise<void>;
}

export interface FormatLimits {
  /** Largest virtual disk a file may describe. */
  maxVirtualSize: number;
  /** Largest total of metadata (tables, directories, bitmaps) a reader may hold or read. */
  maxMetadataBytes: number;
}

export const DEFAULT_LIMITS: FormatLimits = { maxVirtualSize: 64 * 2 ** 40, maxMetadataBytes: 64 * 2 ** 20 };

/** Bytes of the virtual disk at `offset`; all other bytes read as zeros. */
export interface Extent {
  offset: number;
  data: Buffer;
}

export interface ImageReader {
  readonly format: FormatName;
  /** Subformat or version, for messages: "v3", "streamOptimized", "dynamic"… */
  readonly variant: string;
  readonly virtualSize: number;
  /**
   * Allocated extents in ascending offset order, never overlapping, each within
   * virtualSize. An extent's bytes are lent: the reader may reuse their memory once
   * the next extent is asked for, so a consumer copies what it keeps.
   */
  extents(): AsyncIterable<Extent>;
}

/**
 * The file is malformed, hostile or uses a feature that is refused (backing file,
 * encryption). The message is shown to the user as the import's reason.
 */
export class FormatError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "FormatError";
  }
}

/** The disk an export writes: its size and its allocated 64 KiB blocks. */
export interface WriteSource {
  readonly virtualSize: number;
  /** Indexes of the allocated 64 KiB blocks, ascending; may be called more than once (layout pass, data pass). */
  allocated(): AsyncIterable<number>;
  /** The allocated blocks with their bytes (64 KiB each), ascending. */
  blocks(): AsyncIterable<{ index: number; data: Buffer }>;
}

export const BLOCK_SIZE = 64 * 1024;

/** A writer yields the whole file, in order. */
export type ImageWriter = (source: WriteSource) => AsyncIterable<Buffer>;

/**
 * Reads a reader's data into one buffer it reuses, for extents (which are lent):
 * a large disk's data then costs no allocation per read, and no garbage to collect.
 * Reads longer than `max`, and sources that cannot fill a buffer, get fresh memory.
 */
export class LentReads {
  private buf: Buffer | null = null;

  constructor(
    private readonly src: RandomAccessSource,
    private readonly max: number,
  ) {}

  async read(offset: number, length: number): Promise<Buffer> {
    if (!this.src.readInto || length > this.max) return this.src.read(offset, length);
    this.buf ??= Buffer.allocUnsafe(this.max);
    const out = this.buf.subarray(0, length);
    await this.src.readInto(offset, out);
    return out;
  }
}

/** Checks that [offset, offset + length) lies inside a file of `size` bytes; `what` names it for the message. */
export function within(size: number, offset: number, length: number, what: string): void {
  if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > size) {
    throw new FormatError(`${what} at offset ${offset} (${length} bytes) lies outside the ${size}-byte file`);
  }
}
