/**
 * QCOW2 (QEMU copy-on-write v2/v3), written from QEMU's docs/interop/qcow2.txt.
 *
 * Reading: versions 2 and 3; standard, zero and compressed clusters (zlib raw
 * deflate, or zstd when compression_type = 1); extended L2 entries
 * (subclusters). Only the active L1 table is read: internal snapshots are
 * ignored. Refused: backing files, encryption, external data files, images
 * marked corrupt, unknown incompatible features, and anything malformed.
 * The L1 table is held in memory; L2 tables are read one at a time, and the
 * total of both is bounded by FormatLimits.maxMetadataBytes. Data clusters in
 * holes of a source that knows its holes (preallocated, never written) are
 * skipped unread.
 *
 * Writing: a qcow2 v3 file with 64 KiB clusters and 16-bit refcounts, laid out
 * up front (header, L1 table, refcount table, refcount blocks, L2 tables, data
 * clusters) so that it streams in order with exact refcounts; a data cluster of
 * zeros is a hole. A disk size that is not a multiple of 512 is rounded up to
 * one, as qemu-img does.
 */
import zlib from "node:zlib";
import * as zstd from "zstd-napi/binding";
import { BLOCK_SIZE, dataRangesOf, FormatError, isZeros, LentReads, type FormatLimits, type ImageReader, type ImageWriter, type RandomAccessSource, within } from "./types";

const MAGIC = 0x514649fb; // "QFI\xfb"
const V2_HEADER_LENGTH = 72;
const V3_MIN_HEADER_LENGTH = 104;

const INCOMPAT_DIRTY = 1n << 0n;
const INCOMPAT_CORRUPT = 1n << 1n;
const INCOMPAT_DATA_FILE = 1n << 2n;
const INCOMPAT_COMPRESSION = 1n << 3n;
const INCOMPAT_EXTL2 = 1n << 4n;
const INCOMPAT_KNOWN = INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;

const EXT_END = 0x00000000;
const EXT_FEATURE_NAMES = 0x6803f857;
const EXT_DATA_FILE = 0x44415441;

const COMPRESSION_ZLIB = 0;
const COMPRESSION_ZSTD = 1;

/** Largest extent the reader yields when it merges host-contiguous clusters (a single cluster may be bigger: up to 2 MiB). */
const MAX_RUN = 1024 * 1024;
const SECTOR = 512;
const TWO32 = 2 ** 32;

// ---------------------------------------------------------------------------
// Reading
// ---------------------------------------------------------------------------

/** What reading the tables needs from the header. */
interface Header {
  version: 2 | 3;
  clusterBits: number;
  clusterSize: number;
  size: number;
  extendedL2: boolean;
  compressionType: number;
}

/** A big-endian unsigned 64-bit field as a number; values past 2^53 come out imprecise but never "safe" (callers check). */
const u64 = (b: Buffer, o: number) => b.readUInt32BE(o) * TWO32 + b.readUInt32BE(o + 4);
const u64n = (b: Buffer, o: number) => b.readBigUInt64BE(o);

/** A string from the file, made fit for a message. */
function printable(b: Buffer, max = 120): string {
  let s = "";
  for (const c of b.subarray(0, max)) s += c >= 0x20 && c < 0x7f ? String.fromCharCode(c) : "?";
  return b.length > max ? `${s}…` : s;
}

const bitList = (mask: bigint) => {
  const bits: number[] = [];
  for (let i = 0; i < 64; i++) if (mask & (1n << BigInt(i))) bits.push(i);
  return bits;
};

export async function openQcow2(src: RandomAccessSource, limits: FormatLimits): Promise<ImageReader> {
  if (src.size < V2_HEADER_LENGTH) throw new FormatError(`the file is too small to be a qcow2 image (${src.size} bytes)`);
  const fixed = await src.read(0, Math.min(src.size, V3_MIN_HEADER_LENGTH));
  if (fixed.readUInt32BE(0) !== MAGIC) throw new FormatError("not a qcow2 image (the file does not start with the magic QFI\\xfb)");
  const version = fixed.readUInt32BE(4);
  if (version !== 2 && version !== 3) throw new FormatError(`qcow2 version ${version} is not supported (only versions 2 and 3 are)`);

  const clusterBits = fixed.readUInt32BE(20);
  if (clusterBits < 9 || clusterBits > 21) throw new FormatError(`the qcow2 cluster_bits is ${clusterBits}; only 9 to 21 (512-byte to 2 MiB clusters) are valid`);
  const clusterSize = 2 ** clusterBits;

  let headerLength = V2_HEADER_LENGTH;
  let incompat = 0n;
  let refcountOrder = 4;
  if (version === 3) {
    if (src.size < V3_MIN_HEADER_LENGTH) throw new FormatError(`the file is too small to hold a qcow2 v3 header (${src.size} bytes)`);
    incompat = u64n(fixed, 72);
    refcountOrder = fixed.readUInt32BE(96);
    headerLength = fixed.readUInt32BE(100);
    if (headerLength < V3_MIN_HEADER_LENGTH || headerLength % 8 !== 0 || headerLength > clusterSize) {
      throw new FormatError(`the qcow2 v3 header_length is ${headerLength}; it must be a multiple of 8 between ${V3_MIN_HEADER_LENGTH} and the cluster size (${clusterSize})`);
    }
  }
  // Refused features (first the ones users meet: they need no header extension to explain).
  const cryptMethod = fixed.readUInt32BE(32);
  if (cryptMethod !== 0) {
    const name = cryptMethod === 1 ? "AES" : cryptMethod === 2 ? "LUKS" : `method ${cryptMethod}`;
    throw new FormatError(`the qcow2 image is encrypted (${name}); encrypted images are not supported: convert it to an unencrypted image first (qemu-img convert with its key, -O qcow2)`);
  }
  const backingOffset = u64(fixed, 8);
  if (backingOffset !== 0) {
    const backingSize = fixed.readUInt32BE(16);
    let name = "";
    if (backingSize > 0 && backingSize <= 1023 && Number.isSafeInteger(backingOffset) && backingOffset + backingSize <= src.size) {
      name = ` "${printable(await src.read(backingOffset, backingSize))}"`;
    }
    throw new FormatError(
      `the qcow2 image has a backing file${name}: it holds only the changes made on top of another image; import a standalone image (qemu-img convert -O qcow2 overlay.qcow2 standalone.qcow2)`,
    );
  }
  // The header, its extensions and the backing file name all live in the first cluster.
  const first = await src.read(0, Math.min(src.size, clusterSize));
  if (first.length < headerLength) throw new FormatError(`the qcow2 header (${headerLength} bytes) runs past the end of the ${src.size}-byte file`);

  // Header extensions: only the feature names and the data file name are used (for messages).
  const featureNames = new Map<number, string>();
  let dataFileName: string | undefined;
  for (let off = headerLength; ;) {
    if (off + 8 > first.length) break; // the end of the first cluster also ends them
    const type = first.readUInt32BE(off);
    const len = first.readUInt32BE(off + 4);
    if (type === EXT_END) break;
    const data = off + 8;
    if (len > first.length - data) throw new FormatError(`the qcow2 header extension 0x${type.toString(16)} at byte ${off} (${len} bytes) runs past the first cluster`);
    if (type === EXT_FEATURE_NAMES) {
      for (let e = data; e + 48 <= data + len; e += 48) {
        if (first[e] !== 0) continue; // only incompatible features are named in messages
        const name = first.subarray(e + 2, e + 48);
        const nul = name.indexOf(0);
        featureNames.set(first[e + 1], printable(nul < 0 ? name : name.subarray(0, nul)));
      }
    } else if (type === EXT_DATA_FILE) {
      dataFileName = printable(first.subarray(data, data + len));
    }
    off = data + Math.ceil(len / 8) * 8;
  }

  if (incompat & INCOMPAT_DATA_FILE) {
    throw new FormatError(`the qcow2 image keeps its data in an external data file${dataFileName ? ` ("${dataFileName}")` : ""}; import a standalone image (qemu-img convert -O qcow2)`);
  }
  const unknown = incompat & ~INCOMPAT_KNOWN;
  if (unknown) {
    const names = bitList(unknown).map((b) => (featureNames.has(b) ? `bit ${b} "${featureNames.get(b)}"` : `bit ${b}`));
    throw new FormatError(`the qcow2 image uses incompatible features this reader does not know (${names.join(", ")}); convert it with a qemu-img that does (qemu-img convert -O qcow2 -o compat=1.1)`);
  }
  if (incompat & INCOMPAT_CORRUPT) {
    throw new FormatError("the qcow2 image is marked corrupt by QEMU; repair it first (qemu-img check -r all) or convert what can be read");
  }
  // The dirty bit only means the refcounts may be stale; they are not used for reading.

  if (version === 3 && refcountOrder > 6) throw new FormatError(`the qcow2 refcount_order is ${refcountOrder}; it may not exceed 6`);

  let compressionType = COMPRESSION_ZLIB;
  if (headerLength > 104) compressionType = first[104];
  if (compressionType !== COMPRESSION_ZLIB && compressionType !== COMPRESSION_ZSTD) {
    throw new FormatError(`the qcow2 image uses compression type ${compressionType}; only zlib (0) and zstd (1) are supported`);
  }
  if ((compressionType !== COMPRESSION_ZLIB) !== Boolean(incompat & INCOMPAT_COMPRESSION)) {
    throw new FormatError(`the qcow2 compression type (${compressionType}) does not agree with the compression type feature bit`);
  }

  const extendedL2 = Boolean(incompat & INCOMPAT_EXTL2);
  if (extendedL2 && clusterBits < 14) throw new FormatError(`the qcow2 image has extended L2 entries with ${clusterSize}-byte clusters; they need clusters of at least 16 KiB`);

  const size = u64(fixed, 24);
  if (!Number.isSafeInteger(size) || size > limits.maxVirtualSize) {
    throw new FormatError(`the qcow2 image describes a ${size}-byte disk, more than the largest allowed disk (${limits.maxVirtualSize} bytes)`);
  }

  const l1Size = fixed.readUInt32BE(36);
  const l1Offset = u64(fixed, 40);
  const refcountTableOffset = u64(fixed, 48);
  const refcountTableClusters = fixed.readUInt32BE(56);
  const nbSnapshots = fixed.readUInt32BE(60);
  const snapshotsOffset = u64(fixed, 64);

  const entrySize = extendedL2 ? 16 : 8;
  const l2Entries = clusterSize / entrySize;
  const l2Coverage = l2Entries * clusterSize;
  const l1Needed = Math.ceil(size / l2Coverage);
  if (l1Size < l1Needed) throw new FormatError(`the qcow2 L1 table has ${l1Size} entries, too few for a ${size}-byte disk (${l1Needed} needed)`);
  if (l1Size * 8 > limits.maxMetadataBytes) {
    throw new FormatError(`the qcow2 L1 table has ${l1Size} entries (${l1Size * 8} bytes), more metadata than allowed (${limits.maxMetadataBytes} bytes)`);
  }
  const aligned = (o: number) => o % clusterSize === 0;
  if (l1Size > 0) {
    if (!Number.isSafeInteger(l1Offset) || !aligned(l1Offset)) throw new FormatError(`the qcow2 L1 table offset ${l1Offset} is not aligned to the ${clusterSize}-byte cluster size`);
    if (l1Offset === 0) throw new FormatError("the qcow2 L1 table overlaps the header (offset 0)");
    within(src.size, l1Offset, l1Size * 8, "the qcow2 L1 table");
  }
  if (refcountTableClusters === 0) throw new FormatError("the qcow2 image has no refcount table (refcount_table_clusters is 0)");
  if (!Number.isSafeInteger(refcountTableOffset) || !aligned(refcountTableOffset) || refcountTableOffset === 0) {
    throw new FormatError(`the qcow2 refcount table offset ${refcountTableOffset} is 0 or not aligned to the ${clusterSize}-byte cluster size`);
  }
  within(src.size, refcountTableOffset, refcountTableClusters * clusterSize, "the qcow2 refcount table");
  if (nbSnapshots > 0) {
    if (nbSnapshots > 65536) throw new FormatError(`the qcow2 image claims ${nbSnapshots} snapshots (at most 65536 are valid)`);
    if (!Number.isSafeInteger(snapshotsOffset) || !aligned(snapshotsOffset) || snapshotsOffset === 0 || snapshotsOffset >= src.size) {
      throw new FormatError(`the qcow2 snapshot table offset ${snapshotsOffset} is unaligned or outside the ${src.size}-byte file`);
    }
  }

  // Fixed metadata areas: nothing else may live there.
  const roundUp = (n: number) => Math.ceil(n / clusterSize) * clusterSize;
  const metaAreas: Array<[number, number, string]> = [[0, clusterSize, "the header"]];
  if (l1Size > 0) metaAreas.push([l1Offset, l1Offset + roundUp(l1Size * 8), "the L1 table"]);
  metaAreas.push([refcountTableOffset, refcountTableOffset + refcountTableClusters * clusterSize, "the refcount table"]);
  const metaOverlap = (start: number, end: number) => metaAreas.find(([s, e]) => start < e && s < end)?.[2];

  // The active L1 table (only the entries that cover the disk).
  const l1 = l1Needed > 0 ? await src.read(l1Offset, l1Needed * 8) : Buffer.alloc(0);
  const l2Tables = new Set<number>();
  for (let i = 0; i < l1Needed; i++) {
    const hi = l1.readUInt32BE(i * 8);
    const lo = l1.readUInt32BE(i * 8 + 4);
    if ((hi & 0x7f000000) !== 0 || (lo & 0x1ff) !== 0) throw new FormatError(`the qcow2 L1 entry ${i} has reserved bits set`);
    const offset = (hi & 0x00ffffff) * TWO32 + ((lo & 0xfffffe00) >>> 0);
    if (offset === 0) continue;
    within(src.size, offset, clusterSize, `the qcow2 L2 table of L1 entry ${i}`);
    if (!aligned(offset)) throw new FormatError(`the qcow2 L2 table of L1 entry ${i} (offset ${offset}) is not aligned to the ${clusterSize}-byte cluster size`);
    const over = metaOverlap(offset, offset + clusterSize);
    if (over) throw new FormatError(`the qcow2 L2 table of L1 entry ${i} (offset ${offset}) overlaps ${over}`);
    if (l2Tables.has(offset)) throw new FormatError(`the qcow2 L1 table points more than once at the L2 table at offset ${offset}`);
    l2Tables.add(offset);
  }
  const metadataBytes = l1Needed * 8 + l2Tables.size * clusterSize;
  if (metadataBytes > limits.maxMetadataBytes) {
    throw new FormatError(
      `the qcow2 image has ${l2Tables.size} L2 tables of ${clusterSize} bytes plus a ${l1Needed * 8}-byte L1 table (${metadataBytes} bytes), more metadata than allowed (${limits.maxMetadataBytes} bytes)`,
    );
  }

  const header: Header = { version, clusterBits, clusterSize, size, extendedL2, compressionType };
  return {
    format: "QCOW2",
    variant: `v${version}`,
    virtualSize: size,
    extents: () => readExtents(src, header, l1, l1Needed, l2Tables, metaOverlap),
  };
}

/** A piece of guest data stored uncompressed at a host offset. */
interface Run {
  guest: number;
  host: number;
  length: number;
}

async function* readExtents(src: RandomAccessSource, h: Header, l1: Buffer, l1Needed: number, l2Tables: Set<number>, metaOverlap: (start: number, end: number) => string | undefined) {
  const C = h.clusterSize;
  const entrySize = h.extendedL2 ? 16 : 8;
  const l2Entries = C / entrySize;
  const maxRun = Math.max(C, MAX_RUN);
  const subSize = C / 32;
  const decompress = h.compressionType === COMPRESSION_ZSTD ? zstdCluster(C) : zlibCluster(C);
  let pending: Run | null = null;
  const reads = new LentReads(src, maxRun);

  /** The pending run's extents: its bytes, less the holes the source knows of (clusters preallocated but never written). */
  const flush = async function* () {
    const run = pending;
    pending = null;
    if (!run) return;
    for await (const r of dataRangesOf(src, run.host, run.length)) {
      yield { offset: run.guest + (r.offset - run.host), data: await reads.read(r.offset, r.length) };
    }
  };
  /** Adds a run, yielding the extents it pushes out. */
  const add = async function* (run: Run) {
    within(src.size, run.host, run.length, `the qcow2 data for guest offset ${run.guest}`);
    const p = pending;
    if (p && p.guest + p.length === run.guest && p.host + p.length === run.host && p.length + run.length <= maxRun) {
      p.length += run.length;
      return;
    }
    yield* flush();
    pending = { ...run };
  };

  for (let i = 0; i < l1Needed; i++) {
    const hi = l1.readUInt32BE(i * 8);
    const lo = l1.readUInt32BE(i * 8 + 4);
    const l2Offset = (hi & 0x00ffffff) * TWO32 + ((lo & 0xfffffe00) >>> 0);
    if (l2Offset === 0) continue;
    const l2 = await src.read(l2Offset, C);
    const base = i * l2Entries;
    const count = Math.min(l2Entries, Math.ceil(h.size / C) - base);
    for (let j = 0; j < count; j++) {
      const p = j * entrySize;
      const ehi = l2.readUInt32BE(p);
      const elo = l2.readUInt32BE(p + 4);
      const guest = (base + j) * C;
      const guestLen = Math.min(C, h.size - guest);
      const where = `the qcow2 L2 entry for guest offset ${guest}`;
      let bitmapLo = 0;
      let bitmapHi = 0;
      if (h.extendedL2) {
        bitmapLo = l2.readUInt32BE(p + 12); // allocation bits 0-31
        bitmapHi = l2.readUInt32BE(p + 8); // zero bits 32-63
      }

      if (ehi & 0x40000000) {
        // Compressed cluster.
        if (bitmapLo !== 0 || bitmapHi !== 0) throw new FormatError(`${where} is compressed but has subcluster bits set`);
        const entry = (BigInt(ehi) << 32n) | BigInt(elo);
        const x = 62 - (h.clusterBits - 8);
        const hostBig = entry & ((1n << BigInt(x)) - 1n);
        if (hostBig >> 56n !== 0n) throw new FormatError(`${where} has reserved bits set in its compressed cluster offset`);
        const sectors = Number((entry >> BigInt(x)) & ((1n << BigInt(h.clusterBits - 8)) - 1n)) + 1;
        const host = Number(hostBig);
        if (host < C || host >= src.size) throw new FormatError(`${where}: compressed data at offset ${host} lies outside the ${src.size}-byte file or in its header`);
        // The last sector may run past the end of the file; the stream itself says where it ends.
        const length = Math.min(sectors * SECTOR - (host % SECTOR), src.size - host);
        const over = metaOverlapCompressed(host, length);
        if (over) throw new FormatError(`${where}: compressed data at offset ${host} overlaps ${over}`);
        yield* flush();
        const data = decompress(await src.read(host, length), guest);
        yield { offset: guest, data: guestLen < C ? data.subarray(0, guestLen) : data };
        continue;
      }

      if ((elo & 0x1fe) !== 0 || (ehi & 0x3f000000) !== 0) throw new FormatError(`${where} has reserved bits set`);
      const host = (ehi & 0x00ffffff) * TWO32 + ((elo & 0xfffffe00) >>> 0);
      if (elo & 1) {
        if (h.version === 2) throw new FormatError(`${where} has the zero flag, which version 2 images do not have`);
        if (h.extendedL2) throw new FormatError(`${where} has bit 0 set, which is reserved with extended L2 entries`);
        continue; // Reads as zeros, preallocated or not.
      }
      if (host === 0) {
        if (bitmapLo !== 0) throw new FormatError(`${where} marks subclusters allocated in an unallocated cluster`);
        continue;
      }
      // With subclusters only the allocated ones need to be in the file (add() checks them).
      within(src.size, host, h.extendedL2 ? 1 : guestLen, `the qcow2 data cluster for guest offset ${guest}`);
      if (host % C !== 0) throw new FormatError(`${where}: data cluster offset ${host} is not aligned to the ${C}-byte cluster size`);
      const over = l2Tables.has(host) ? "an L2 table" : metaOverlap(host, host + C);
      if (over) throw new FormatError(`${where}: data cluster at offset ${host} overlaps ${over}`);

      if (!h.extendedL2) {
        yield* add({ guest, host, length: guestLen });
        continue;
      }
      if ((bitmapLo & bitmapHi) !== 0) throw new FormatError(`${where} marks subclusters both allocated and zero`);
      // Runs of allocated subclusters.
      for (let s = 0; s < 32;) {
        if (!((bitmapLo >>> s) & 1)) {
          s++;
          continue;
        }
        let e = s;
        while (e < 32 && (bitmapLo >>> e) & 1) e++;
        const start = s * subSize;
        if (start < guestLen) {
          yield* add({ guest: guest + start, host: host + start, length: Math.min(e * subSize, guestLen) - start });
        }
        s = e;
      }
    }
  }
  yield* flush();

  function metaOverlapCompressed(host: number, length: number): string | undefined {
    for (let c = Math.floor(host / C) * C; c < host + length; c += C) if (l2Tables.has(c)) return "an L2 table";
    return metaOverlap(host, host + length);
  }
}

/** Inflates a zlib (raw deflate) compressed cluster: it must produce exactly one cluster; trailing bytes are ignored. */
function zlibCluster(clusterSize: number) {
  return (input: Buffer, guest: number): Buffer => {
    let out: Buffer;
    try {
      // Z_SYNC_FLUSH: like QEMU, accept a stream that is cut short once it has produced a whole cluster.
      out = zlib.inflateRawSync(input, { maxOutputLength: clusterSize, finishFlush: zlib.constants.Z_SYNC_FLUSH });
    } catch (e) {
      // (By code, not instanceof RangeError: under jest's vm contexts Node's errors come from another realm.)
      if ((e as NodeJS.ErrnoException).code === "ERR_BUFFER_TOO_LARGE")
        throw new FormatError(`the qcow2 compressed cluster for guest offset ${guest} inflates to more than a cluster (${clusterSize} bytes)`);
      throw new FormatError(`the qcow2 compressed cluster for guest offset ${guest} does not inflate (${(e as Error).message})`);
    }
    if (out.length !== clusterSize) throw new FormatError(`the qcow2 compressed cluster for guest offset ${guest} inflates to ${out.length} bytes instead of a full cluster (${clusterSize})`);
    return out;
  };
}

/**
 * Decompresses a zstd compressed cluster the way QEMU does: stream into a
 * cluster-sized buffer until it is full (the data may be followed by unrelated
 * bytes), then require the frame to be complete. The output never exceeds a
 * cluster and the window is capped, so a hostile frame cannot make it allocate.
 */
function zstdCluster(clusterSize: number) {
  let dctx: zstd.DCtx | undefined;
  return (input: Buffer, guest: number): Buffer => {
    const what = `the qcow2 zstd compressed cluster for guest offset ${guest}`;
    if (!dctx) {
      dctx = new zstd.DCtx();
      dctx.setParameter(zstd.DParameter.windowLogMax, 22);
    }
    dctx.reset(zstd.ResetDirective.sessionOnly);
    const out = Buffer.alloc(clusterSize);
    let inPos = 0;
    let outPos = 0;
    let remaining = 1;
    try {
      while (outPos < clusterSize) {
        const [ret, produced, consumed] = dctx.decompressStream(out.subarray(outPos), input.subarray(inPos));
        remaining = ret;
        outPos += produced;
        inPos += consumed;
        if (produced === 0 && consumed === 0) break;
      }
    } catch (e) {
      throw new FormatError(`${what} does not decompress (${(e as Error).message})`);
    }
    if (outPos !== clusterSize) throw new FormatError(`${what} decompresses to ${outPos} bytes instead of a full cluster (${clusterSize})`);
    if (remaining !== 0) throw new FormatError(`${what} decompresses to more than a cluster (${clusterSize} bytes)`);
    return out;
  };
}

// ---------------------------------------------------------------------------
// Writing
// ---------------------------------------------------------------------------

const W_CLUSTER_BITS = 16;
const W_CLUSTER = 2 ** W_CLUSTER_BITS; // = BLOCK_SIZE: one block, one cluster
const W_L2_ENTRIES = W_CLUSTER / 8;
const W_REFCOUNTS_PER_BLOCK = W_CLUSTER / 2; // refcount_order 4: 16-bit refcounts
const W_HEADER_LENGTH = 112; // up to and including compression_type, padded to 8
const COPIED_HI = 0x80000000;

/** Writes a 64-bit table entry: a cluster offset with the COPIED flag (its refcount is exactly one). */
function putEntry(buf: Buffer, pos: number, offset: number) {
  buf.writeUInt32BE((Math.floor(offset / TWO32) | COPIED_HI) >>> 0, pos);
  buf.writeUInt32BE(offset % TWO32, pos + 4);
}

const putU64 = (buf: Buffer, pos: number, value: number) => {
  buf.writeUInt32BE(Math.floor(value / TWO32), pos);
  buf.writeUInt32BE(value % TWO32, pos + 4);
};

/** Folds an index into a running checksum of the allocation list (to notice a disk that changes between passes). */
const fold = (h: number, i: number) => (Math.imul(h ^ (i % TWO32), 0x01000193) + Math.floor(i / TWO32)) >>> 0;

export const writeQcow2: ImageWriter = async function* (source) {
  if (W_CLUSTER !== BLOCK_SIZE) throw new Error("writeQcow2 assumes 64 KiB blocks");
  const diskSize = source.virtualSize;
  if (!Number.isSafeInteger(diskSize) || diskSize < 0) throw new Error(`invalid virtual size ${diskSize}`);
  // QEMU only handles whole 512-byte sectors and rounds other sizes down; round up (as qemu-img does) so no byte is lost.
  const size = Math.ceil(diskSize / SECTOR) * SECTOR;
  const blockCount = Math.ceil(size / W_CLUSTER);
  const changed = () => new Error("the disk's allocated blocks changed between the passes of the qcow2 export");

  // Pass 1: which L2 tables, how many data clusters.
  const tables: Array<{ index: number; count: number }> = [];
  let dataClusters = 0;
  let sum = 0x811c9dc5;
  let prev = -1;
  for await (const i of source.allocated()) {
    if (!Number.isSafeInteger(i) || i <= prev || i >= blockCount) throw new Error(`block index ${i} is out of order or outside the ${size}-byte disk`);
    const t = Math.floor(i / W_L2_ENTRIES);
    if (tables.length === 0 || tables[tables.length - 1].index !== t) tables.push({ index: t, count: 0 });
    tables[tables.length - 1].count++;
    dataClusters++;
    sum = fold(sum, i);
    prev = i;
  }

  // Layout, in clusters: header, L1 table, refcount table, refcount blocks, L2 tables, data.
  const l1Size = Math.ceil(size / (W_L2_ENTRIES * W_CLUSTER));
  const l1Clusters = Math.ceil((l1Size * 8) / W_CLUSTER);
  let refBlocks = 0;
  let refTableClusters = 0;
  let total: number;
  for (;;) {
    total = 1 + l1Clusters + refTableClusters + refBlocks + tables.length + dataClusters;
    const needBlocks = Math.ceil(total / W_REFCOUNTS_PER_BLOCK);
    const needTable = Math.max(1, Math.ceil((needBlocks * 8) / W_CLUSTER));
    if (needBlocks === refBlocks && needTable === refTableClusters) break;
    refBlocks = Math.max(refBlocks, needBlocks);
    refTableClusters = Math.max(refTableClusters, needTable);
  }
  const l1Offset = l1Size > 0 ? W_CLUSTER : 0;
  const refTableOffset = (1 + l1Clusters) * W_CLUSTER;
  const refBlocksOffset = refTableOffset + refTableClusters * W_CLUSTER;
  const l2Offset = refBlocksOffset + refBlocks * W_CLUSTER;
  const dataOffset = l2Offset + tables.length * W_CLUSTER;

  // Header.
  const header = Buffer.alloc(W_CLUSTER);
  header.writeUInt32BE(MAGIC, 0);
  header.writeUInt32BE(3, 4);
  header.writeUInt32BE(W_CLUSTER_BITS, 20);
  putU64(header, 24, size);
  header.writeUInt32BE(l1Size, 36);
  putU64(header, 40, l1Offset);
  putU64(header, 48, refTableOffset);
  header.writeUInt32BE(refTableClusters, 56);
  header.writeUInt32BE(4, 96); // refcount_order
  header.writeUInt32BE(W_HEADER_LENGTH, 100);
  // compression_type (104) = 0 (zlib), then padding and the end of the (empty) extension area: zeros.
  yield header;

  // L1 table.
  const CHUNK = 16; // clusters per yielded buffer
  for (let c = 0, t = 0; c < l1Clusters; c += CHUNK) {
    const n = Math.min(CHUNK, l1Clusters - c);
    const buf = Buffer.alloc(n * W_CLUSTER);
    const first = (c * W_CLUSTER) / 8;
    const end = first + (n * W_CLUSTER) / 8;
    for (; t < tables.length && tables[t].index < end; t++) putEntry(buf, (tables[t].index - first) * 8, l2Offset + t * W_CLUSTER);
    yield buf;
  }

  // Refcount table.
  for (let c = 0, b = 0; c < refTableClusters; c += CHUNK) {
    const n = Math.min(CHUNK, refTableClusters - c);
    const buf = Buffer.alloc(n * W_CLUSTER);
    const end = ((c + n) * W_CLUSTER) / 8;
    for (; b < refBlocks && b < end; b++) putU64(buf, (b - (c * W_CLUSTER) / 8) * 8, refBlocksOffset + b * W_CLUSTER);
    yield buf;
  }

  // Refcount blocks: every cluster of the file is used exactly once.
  const ones = Buffer.alloc(W_CLUSTER);
  for (let e = 0; e < W_REFCOUNTS_PER_BLOCK; e++) ones.writeUInt16BE(1, e * 2);
  for (let b = 0; b < refBlocks; b++) {
    const used = Math.min(W_REFCOUNTS_PER_BLOCK, total - b * W_REFCOUNTS_PER_BLOCK);
    if (used === W_REFCOUNTS_PER_BLOCK) yield ones;
    else {
      const buf = Buffer.alloc(W_CLUSTER);
      ones.copy(buf, 0, 0, used * 2);
      yield buf;
    }
  }

  // Pass 2: L2 tables, data clusters in block order.
  let rank = 0;
  let t = -1;
  let table: Buffer | null = null;
  let sum2 = 0x811c9dc5;
  let prev2 = -1;
  for await (const i of source.allocated()) {
    if (!Number.isSafeInteger(i) || i <= prev2 || i >= blockCount) throw changed();
    prev2 = i;
    const ti = Math.floor(i / W_L2_ENTRIES);
    if (t < 0 || tables[t].index !== ti) {
      if (table) yield table;
      t++;
      if (t >= tables.length || tables[t].index !== ti) throw changed();
      table = Buffer.alloc(W_CLUSTER);
    }
    putEntry(table!, (i % W_L2_ENTRIES) * 8, dataOffset + rank * W_CLUSTER);
    rank++;
    sum2 = fold(sum2, i);
  }
  if (table) yield table;
  if (rank !== dataClusters || t !== tables.length - 1 || sum2 !== sum) throw changed();

  // Data; a cluster of zeros (allocated, as pass 1 could not know) is a hole.
  const tail = diskSize % W_CLUSTER;
  let n = 0;
  let sum3 = 0x811c9dc5;
  let prev3 = -1;
  let hole = 0;
  for await (const { index, data } of source.blocks()) {
    if (!Number.isSafeInteger(index) || index <= prev3 || index >= blockCount || n >= dataClusters) throw changed();
    prev3 = index;
    if (data.length > W_CLUSTER) throw new Error(`block ${index} has ${data.length} bytes, more than a ${W_CLUSTER}-byte block`);
    let out = data;
    if (data.length < W_CLUSTER || (index === blockCount - 1 && tail !== 0)) {
      // Pad a short block; zero what lies past the end of the disk.
      out = Buffer.alloc(W_CLUSTER);
      data.copy(out, 0, 0, index === blockCount - 1 && tail !== 0 ? Math.min(tail, data.length) : data.length);
    }
    n++;
    sum3 = fold(sum3, index);
    if (isZeros(out)) {
      hole += W_CLUSTER;
      continue;
    }
    if (hole > 0) yield { hole };
    hole = 0;
    yield out;
  }
  if (n !== dataClusters || sum3 !== sum) throw changed();
  if (hole > 0) yield { hole };
};
