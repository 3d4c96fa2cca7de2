/**
 * Disk-image formats. Readers turn a file into the extents of the virtual disk
 * it describes; writers turn the blocks of a disk into a file. Both stream: a
 * reader reads its source by ranges, a writer yields its output piece by piece,
 * and neither holds more than its format's metadata (bounded by FormatLimits) and
 * a few clusters in memory.
 */

export type FormatName = "RAW" | "QCOW2" | "VMDK" | "VHD";

/** Bytes [offset, offset + length) of a file. */
export interface ByteRange {
  offset: number;
  length: number;
}

/** A file readable at any offset (an upload in the blob store, a file on disk). */
export interface RandomAccessSource {
  readonly size: number;
  /** Exactly `length` bytes at `offset`; never asked past `size`. */
  read(offset: number, length: number): Promise<Buffer>;
  /** Fills `into` with the bytes at `offset`, as `read` would return them; readers fall back to `read` without it. */
  readInto?(offset: number, into: Buffer): Promise<void>;
  /**
   * The parts of [offset, offset + length) that may hold bytes other than zeros:
   * ascending, apart, inside the range asked for. Every byte outside them reads as
   * zero, so readers skip them unread: most of a sparse raw disk or fixed VHD, the
   * grain tables a VMDK lays out up front, qcow2 clusters and VHD blocks allocated
   * but never written. A source that knows its holes offers it: a file through
   * SEEK_DATA/SEEK_HOLE, an upload from the all-zero blocks it noted as it came in.
   * A range may hold zeros too (readers read what they are given, so the finer the
   * better); it only may not leave data out.
   */
  dataRanges?(offset: number, length: number): AsyncIterable<ByteRange>;
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

/**
 * A run of `hole` zero bytes in a writer's output (a positive safe integer). A sink
 * that can keep files sparse seeks past it instead of writing it, and when the file
 * ends in a hole it sets the file's length (ftruncate) so the zeros are still part of
 * the file; a sink that cannot writes the zeros (see `materialize`). The zeros are
 * part of the file's bytes: its size and any checksum of it count them.
 */
export interface Hole {
  readonly hole: number;
}

/** A piece of a writer's output: bytes, or a hole of zeros. */
export type WriterPiece = Buffer | Hole;

export const isHole = (p: WriterPiece): p is Hole => !Buffer.isBuffer(p);

/**
 * A writer yields the whole file, in order, as bytes and holes; no piece is empty,
 * and holes may follow each other. A piece's bytes are lent (the writer may reuse
 * their memory once the next piece is asked for), so a sink copies what it keeps.
 */
export type ImageWriter = (source: WriteSource) => AsyncIterable<WriterPiece>;

/** One block of zeros, shared: read it, never write into it. */
export const ZERO_BLOCK = Buffer.alloc(BLOCK_SIZE);

/** Whether all of `b` is zeros. */
export function isZeros(b: Buffer): boolean {
  for (let p = 0; p < b.length; p += BLOCK_SIZE) {
    const n = Math.min(BLOCK_SIZE, b.length - p);
    if (!b.subarray(p, p + n).equals(ZERO_BLOCK.subarray(0, n))) return false;
  }
  return true;
}

/** Bytes a piece stands for. */
export const pieceLength = (p: WriterPiece): number => (isHole(p) ? p.hole : p.length);

const ZEROS = Buffer.alloc(1024 * 1024);

/**
 * A writer's output as bytes only, holes written out as zeros, for sinks that
 * cannot leave holes. The zeros are views of one shared buffer: read them, never
 * write into them.
 */
export async function* materialize(pieces: AsyncIterable<WriterPiece>): AsyncIterable<Buffer> {
  for await (const p of pieces) {
    if (!isHole(p)) {
      yield p;
      continue;
    }
    for (let left = p.hole; left > 0; left -= ZEROS.length) yield ZEROS.subarray(0, Math.min(left, ZEROS.length));
  }
}

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

/**
 * The source's data ranges in [offset, offset + length), widened to multiples of
 * `align` (clipped to the range) and merged where they then touch; the whole range
 * when the source does not know its holes. A source breaking its contract is a
 * bug, not a bad file: an Error.
 */
export async function* dataRangesOf(src: RandomAccessSource, offset: number, length: number, align = 1): AsyncIterable<ByteRange> {
  if (length <= 0) return;
  if (!src.dataRanges) {
    yield { offset, length };
    return;
  }
  const end = offset + length;
  let start = -1;
  let stop = -1;
  let last = offset;
  for await (const r of src.dataRanges(offset, length)) {
    if (!Number.isSafeInteger(r.offset) || !Number.isSafeInteger(r.length) || r.length < 0 || r.offset < last || r.offset + r.length > end) {
      throw new Error(`the source's data range ${r.offset}+${r.length} is out of order or outside ${offset}+${length}`);
    }
    last = r.offset + r.length;
    if (r.length === 0) continue;
    const s = Math.max(offset, Math.floor(r.offset / align) * align);
    const e = Math.min(end, Math.ceil(last / align) * align);
    if (start >= 0 && s <= stop) {
      stop = Math.max(stop, e);
      continue;
    }
    if (start >= 0) yield { offset: start, length: stop - start };
    start = s;
    stop = e;
  }
  if (start >= 0) yield { offset: start, length: stop - start };
}

/** Whether [offset, offset + length) of the source may hold anything but zeros. */
export async function mayHoldData(src: RandomAccessSource, offset: number, length: number): Promise<boolean> {
  for await (const r of dataRangesOf(src, offset, length)) if (r.length > 0) return true;
  return false;
}

/** Checks that [offset, offset + length) lies inside a file of `size` bytes; `what` names it for the message. */
export function within(size: number, offset: number, length: number, what: string): void {
  if (!Number.isSafeInteger(offset) || !Number.isSafeInteger(length) || offset < 0 || length < 0 || offset + length > size) {
    throw new FormatError(`${what} at offset ${offset} (${length} bytes) lies outside the ${size}-byte file`);
  }
}
