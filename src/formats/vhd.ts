import crypto from "node:crypto";
import { nonZeroExtents, plainExtents } from "./raw";
import { BLOCK_SIZE, dataRangesOf, FormatError, isZeros, LentReads, within, type Extent, type FormatLimits, type ImageReader, type ImageWriter, type RandomAccessSource } from "./types";

/*
 * VHD, after Microsoft's "Virtual Hard Disk Image Format Specification" (v1.0).
 *
 * A fixed disk is the disk's bytes followed by a 512-byte footer. A dynamic disk
 * is a copy of the footer at 0, a 1024-byte dynamic disk header (normally at 512),
 * the Block Allocation Table (big-endian uint32 sector numbers, 0xFFFFFFFF for a
 * block never written), the blocks (each a sector bitmap padded to 512 bytes,
 * then the block's data) and the footer. All integers are big-endian.
 *
 * Size: the footer holds both a CHS geometry and a "current size". Microsoft's
 * later tools (Hyper-V, disk2vhd), XenServer and VirtualBox take the current
 * size; Virtual PC took the geometry; QEMU takes the geometry unless the creator
 * is one it trusts for the current size ("win ", "qem2", "d2v ", "CTXS", "tap")
 * or the geometry is the maximum 65535/16/255. Files QEMU writes carry a current
 * size equal to the geometry's (or the maximum geometry with force_size), so the
 * reader follows the current size, as the specification says, rounded down to
 * whole sectors (QEMU does the same). The writer records the exact size: the
 * specification's geometry when it expresses that size exactly, else the maximum
 * geometry, which makes QEMU take the current size as it does for its own
 * force_size images (and as Azure expects of uploaded VHDs).
 */

const SECTOR = 512;
const FOOTER_SIZE = 512;
const HEADER_SIZE = 1024;
const UNALLOCATED = 0xffffffff;
const MIN_BLOCK = SECTOR;
const MAX_BLOCK = 64 * 1024 * 1024;
/** Bytes read from the file at a time when yielding data. */
const READ = 1024 * 1024;
/** Largest disk a VHD holds (Hyper-V's and QEMU's limit: 2040 GiB). */
const MAX_VHD_SIZE = 2040 * 2 ** 30;
/** The largest CHS geometry; QEMU then reads the current size whatever the creator. */
const MAX_GEOMETRY = { cylinders: 65535, heads: 16, sectorsPerTrack: 255 };

const TYPE_FIXED = 2;
const TYPE_DYNAMIC = 3;
const TYPE_DIFFERENCING = 4;

const WRITE_BLOCK = 2 * 1024 * 1024;
const CREATOR_APP = "stow";
/** Seconds between 1970-01-01 and 2000-01-01 (VHD timestamps count from 2000). */
const VHD_EPOCH = 946684800;

// ---------------------------------------------------------------------------
// Shared structures

/** One's complement of the byte sum of `buf`, the 4-byte checksum field at `at` counted as zeros. */
function vhdChecksum(buf: Buffer, at: number): number {
  let sum = 0;
  for (let i = 0; i < buf.length; i++) if (i < at || i >= at + 4) sum += buf[i];
  return ~sum >>> 0;
}

interface Footer {
  /** Where the footer lies in the file. */
  offset: number;
  features: number;
  version: number;
  dataOffset: bigint;
  creatorApp: string;
  creatorVersion: number;
  currentSize: bigint;
  diskType: number;
}

const cookieAt = (buf: Buffer, at: number, cookie: string) => buf.length >= at + 8 && buf.toString("latin1", at, at + 8) === cookie;

/** A footer from its 512 bytes (a 511-byte one padded with a zero), or why it is not one. */
function parseFooter(buf: Buffer, offset: number): Footer | string {
  if (!cookieAt(buf, 0, "conectix")) return "no VHD footer (“conectix” cookie)";
  const stored = buf.readUInt32BE(64);
  const computed = vhdChecksum(buf, 64);
  if (stored !== computed) return `the VHD footer's checksum is wrong (stored 0x${hex(stored)}, computed 0x${hex(computed)}): the file is damaged`;
  return {
    offset,
    features: buf.readUInt32BE(8),
    version: buf.readUInt32BE(12),
    dataOffset: buf.readBigUInt64BE(16),
    creatorApp: buf.toString("latin1", 28, 32),
    creatorVersion: buf.readUInt32BE(32),
    currentSize: buf.readBigUInt64BE(48),
    diskType: buf.readUInt32BE(60),
  };
}

const hex = (n: number) => n.toString(16).padStart(8, "0");

/**
 * The footer at the end of the file (512 bytes, or 511 as Virtual PC before 2004
 * wrote them); when that one is damaged, the copy a dynamic disk keeps at offset
 * 0, as the specification suggests.
 */
async function findFooter(src: RandomAccessSource): Promise<{ footer: Footer; atEnd: boolean }> {
  if (src.size < FOOTER_SIZE) throw new FormatError(`the file is ${src.size} bytes, too small for a VHD (it ends with a ${FOOTER_SIZE}-byte footer)`);
  const tail = await src.read(src.size - FOOTER_SIZE, FOOTER_SIZE);
  let end: Footer | string;
  if (!cookieAt(tail, 0, "conectix") && cookieAt(tail, 1, "conectix")) {
    end = parseFooter(Buffer.concat([tail.subarray(1), Buffer.alloc(1)]), src.size - (FOOTER_SIZE - 1));
  } else {
    end = parseFooter(tail, src.size - FOOTER_SIZE);
  }
  if (typeof end !== "string") return { footer: end, atEnd: true };
  if (src.size >= 2 * FOOTER_SIZE) {
    const copy = parseFooter(await src.read(0, FOOTER_SIZE), 0);
    if (typeof copy !== "string" && (copy.diskType === TYPE_DYNAMIC || copy.diskType === TYPE_DIFFERENCING)) return { footer: copy, atEnd: false };
  }
  throw new FormatError(end.startsWith("no VHD footer") ? "not a VHD file: there is no VHD footer (“conectix” cookie) at its end or its start" : end);
}

interface DynamicHeader {
  tableOffset: bigint;
  version: number;
  maxTableEntries: number;
  blockSize: number;
  parentName: string;
}

async function readHeader(src: RandomAccessSource, footer: Footer): Promise<{ at: number; header: DynamicHeader }> {
  if (footer.dataOffset > BigInt(src.size - HEADER_SIZE) || src.size < HEADER_SIZE) {
    throw new FormatError(`the VHD's dynamic disk header at offset ${footer.dataOffset} (${HEADER_SIZE} bytes) lies outside the ${src.size}-byte file`);
  }
  const at = Number(footer.dataOffset);
  const buf = await src.read(at, HEADER_SIZE);
  if (!cookieAt(buf, 0, "cxsparse")) throw new FormatError(`the VHD's dynamic disk header is missing: no “cxsparse” cookie at offset ${at}`);
  const stored = buf.readUInt32BE(36);
  const computed = vhdChecksum(buf, 36);
  if (stored !== computed) throw new FormatError(`the VHD's dynamic disk header checksum is wrong (stored 0x${hex(stored)}, computed 0x${hex(computed)}): the file is damaged`);
  return {
    at,
    header: {
      tableOffset: buf.readBigUInt64BE(16),
      version: buf.readUInt32BE(24),
      maxTableEntries: buf.readUInt32BE(28),
      blockSize: buf.readUInt32BE(32),
      parentName: utf16be(buf.subarray(64, 576)),
    },
  };
}

/** A NUL-terminated UTF-16BE name, made safe to show. */
function utf16be(buf: Buffer): string {
  const swapped = Buffer.from(buf);
  swapped.swap16();
  const s = swapped.toString("utf16le");
  const nul = s.indexOf("\0");
  // eslint-disable-next-line no-control-regex -- control characters are what this replaces
  return (nul < 0 ? s : s.slice(0, nul)).replace(/[\u0000-\u001f\u007f-\u009f]/g, "?").slice(0, 120);
}

// ---------------------------------------------------------------------------
// Reading

export async function openVhd(src: RandomAccessSource, limits: FormatLimits): Promise<ImageReader> {
  const { footer, atEnd } = await findFooter(src);
  if (footer.version >>> 16 !== 1) throw new FormatError(`unsupported VHD format version ${footer.version >>> 16}.${footer.version & 0xffff} (only 1.x is defined)`);

  if (footer.diskType === TYPE_DIFFERENCING) {
    let parent = "";
    try {
      parent = (await readHeader(src, footer)).header.parentName;
    } catch {
      // the name is only for the message
    }
    throw new FormatError(
      `the VHD is a differencing disk: it has a parent${parent ? ` (“${parent}”)` : ""} and holds only the changes made since; ` +
        "merge it into its parent (Hyper-V's Edit Disk › Merge, or Merge-VHD) and import a standalone image",
    );
  }
  if (footer.diskType !== TYPE_FIXED && footer.diskType !== TYPE_DYNAMIC) {
    throw new FormatError(`unsupported VHD disk type ${footer.diskType} (only fixed (2) and dynamic (3) disks can be imported)`);
  }

  if (footer.currentSize > BigInt(limits.maxVirtualSize)) {
    throw new FormatError(`the VHD describes a ${footer.currentSize}-byte disk, more than the largest allowed disk (${limits.maxVirtualSize} bytes)`);
  }
  const virtualSize = Math.floor(Number(footer.currentSize) / SECTOR) * SECTOR;
  // Hyper-V and QEMU open no VHD beyond 2040 GiB (QEMU: "File too large"), fixed or dynamic.
  if (virtualSize > MAX_VHD_SIZE) {
    throw new FormatError(`the VHD describes a ${virtualSize}-byte disk, more than a VHD can hold (2040 GiB, the limit of Hyper-V and QEMU)`);
  }

  if (footer.diskType === TYPE_FIXED) {
    const dataEnd = footer.offset;
    if (virtualSize > dataEnd) {
      throw new FormatError(`the file is too short for a fixed VHD of ${virtualSize} bytes: it holds only ${dataEnd} bytes before its footer (truncated?)`);
    }
    return {
      format: "VHD",
      variant: "fixed",
      virtualSize,
      extents: () => plainExtents(src, virtualSize),
    };
  }
  return openDynamic(src, limits, footer, atEnd, virtualSize);
}

async function openDynamic(src: RandomAccessSource, limits: FormatLimits, footer: Footer, footerAtEnd: boolean, virtualSize: number): Promise<ImageReader> {
  const { at: headerAt, header } = await readHeader(src, footer);
  if (header.version >>> 16 !== 1) throw new FormatError(`unsupported VHD dynamic disk header version ${header.version >>> 16}.${header.version & 0xffff} (only 1.x is defined)`);

  const blockSize = header.blockSize;
  if (blockSize < MIN_BLOCK || blockSize > MAX_BLOCK || (blockSize & (blockSize - 1)) !== 0) {
    throw new FormatError(`the VHD's block size ${blockSize} is not a power of two between ${MIN_BLOCK} and ${MAX_BLOCK} bytes`);
  }
  const sectorsPerBlock = blockSize / SECTOR;
  const bitmapSize = Math.ceil(sectorsPerBlock / 8 / SECTOR) * SECTOR;

  // Only the entries the disk's size needs are read; tables declaring more
  // (older QEMU wrote one entry too many) are accepted, the extra entries ignored.
  const entries = Math.ceil(virtualSize / blockSize);
  if (header.maxTableEntries < entries) {
    throw new FormatError(`the VHD's block allocation table has ${header.maxTableEntries} entries, but its ${virtualSize}-byte disk needs ${entries} blocks of ${blockSize} bytes`);
  }
  const tableBytes = entries * 4;
  if (tableBytes > limits.maxMetadataBytes) {
    throw new FormatError(`the VHD's block allocation table is ${tableBytes} bytes, more than the ${limits.maxMetadataBytes} bytes of metadata allowed`);
  }
  if (header.tableOffset > BigInt(src.size)) {
    throw new FormatError(`the VHD's block allocation table at offset ${header.tableOffset} (${tableBytes} bytes) lies outside the ${src.size}-byte file`);
  }
  const tableAt = Number(header.tableOffset);
  within(src.size, tableAt, tableBytes, "the VHD's block allocation table");
  const bat = new Uint32Array(entries);
  if (entries > 0) {
    const raw = await src.read(tableAt, tableBytes);
    for (let i = 0; i < entries; i++) bat[i] = raw.readUInt32BE(i * 4);
  }

  // Blocks must lie inside the file, clear of the metadata and of each other:
  // a hostile table could otherwise make a small file describe a huge disk.
  const dataEnd = footerAtEnd ? footer.offset : src.size;
  const metadata: [number, number, string][] = [
    [0, FOOTER_SIZE, "the footer's copy"],
    [headerAt, headerAt + HEADER_SIZE, "the dynamic disk header"],
    [tableAt, tableAt + tableBytes, "the block allocation table"],
  ];
  const blockBytes = (index: number) => bitmapSize + Math.min(blockSize, virtualSize - index * blockSize);
  let allocated = 0;
  for (let i = 0; i < entries; i++) {
    if (bat[i] === UNALLOCATED) continue;
    allocated++;
    const start = bat[i] * SECTOR;
    const end = start + blockBytes(i);
    if (end > dataEnd) {
      throw new FormatError(`the VHD's block ${i} at offset ${start} (${end - start} bytes) lies outside the file's ${dataEnd} bytes of data (truncated?)`);
    }
    for (const [a, b, what] of metadata) {
      if (start < b && a < end) throw new FormatError(`the VHD's block ${i} at offset ${start} overlaps ${what}`);
    }
  }
  if (allocated > 1) {
    const lastFull = virtualSize % blockSize === 0;
    const lastStart = bat[entries - 1];
    const starts = new Uint32Array(allocated);
    for (let i = 0, n = 0; i < entries; i++) if (bat[i] !== UNALLOCATED) starts[n++] = bat[i];
    starts.sort();
    for (let n = 1; n < allocated; n++) {
      const prevBytes = !lastFull && starts[n - 1] === lastStart ? blockBytes(entries - 1) : bitmapSize + blockSize;
      if ((starts[n] - starts[n - 1]) * SECTOR < prevBytes) {
        throw new FormatError(`the VHD's blocks at offsets ${starts[n - 1] * SECTOR} and ${starts[n] * SECTOR} overlap`);
      }
    }
  }

  // Xen's blktap wrote little-endian 32-bit bitmap words in its first version.
  const littleEndianBitmap = footer.creatorApp === "tap\0" && footer.creatorVersion === 1;
  const present = littleEndianBitmap ? (bm: Buffer, s: number) => (bm[(s >>> 5) * 4 + ((s & 31) >>> 3)] >>> (s & 7)) & 1 : (bm: Buffer, s: number) => (bm[s >>> 3] >>> (7 - (s & 7))) & 1;

  return {
    format: "VHD",
    variant: "dynamic",
    virtualSize,
    async *extents(): AsyncGenerator<Extent> {
      const reads = new LentReads(src, READ);
      for (let i = 0; i < entries; i++) {
        if (bat[i] === UNALLOCATED) continue;
        const blockStart = i * blockSize;
        const sectors = Math.min(blockSize, virtualSize - blockStart) / SECTOR;
        const fileAt = bat[i] * SECTOR;
        const dataAt = fileAt + bitmapSize;
        let bitmap: Buffer | null = null;
        // Only the block's data the source does not know to be zeros (QEMU allocates whole blocks for a sector).
        for await (const r of dataRangesOf(src, dataAt, sectors * SECTOR, SECTOR)) {
          bitmap ??= await src.read(fileAt, Math.min(bitmapSize, Math.ceil(sectors / 32) * 4));
          let s = (r.offset - dataAt) / SECTOR;
          const end = s + r.length / SECTOR;
          while (s < end) {
            // Skip absent sectors, then take the run of present ones.
            while (s < end && !present(bitmap, s)) s++;
            const first = s;
            while (s < end && present(bitmap, s)) s++;
            if (s > first) yield* nonZeroExtents(reads, dataAt + first * SECTOR, blockStart + first * SECTOR, (s - first) * SECTOR);
          }
        }
      }
    },
  };
}

// ---------------------------------------------------------------------------
// Writing

/** The specification's CHS geometry for a number of sectors (it may round down). */
function specGeometry(totalSectors: number): { cylinders: number; heads: number; sectorsPerTrack: number } {
  const sectors = Math.min(totalSectors, 65535 * 16 * 255);
  let sectorsPerTrack: number;
  let heads: number;
  let cylinderTimesHeads: number;
  if (sectors >= 65535 * 16 * 63) {
    sectorsPerTrack = 255;
    heads = 16;
    cylinderTimesHeads = Math.floor(sectors / sectorsPerTrack);
  } else {
    sectorsPerTrack = 17;
    cylinderTimesHeads = Math.floor(sectors / sectorsPerTrack);
    heads = Math.max(4, Math.floor((cylinderTimesHeads + 1023) / 1024));
    if (cylinderTimesHeads >= heads * 1024 || heads > 16) {
      sectorsPerTrack = 31;
      heads = 16;
      cylinderTimesHeads = Math.floor(sectors / sectorsPerTrack);
    }
    if (cylinderTimesHeads >= heads * 1024) {
      sectorsPerTrack = 63;
      heads = 16;
      cylinderTimesHeads = Math.floor(sectors / sectorsPerTrack);
    }
  }
  return { cylinders: Math.floor(cylinderTimesHeads / heads), heads, sectorsPerTrack };
}

/** The geometry to record: the specification's when it gives exactly `totalSectors`, else the maximum one. */
function geometryFor(totalSectors: number) {
  const g = specGeometry(totalSectors);
  return g.cylinders * g.heads * g.sectorsPerTrack === totalSectors ? g : MAX_GEOMETRY;
}

function makeFooter(size: number): Buffer {
  const buf = Buffer.alloc(FOOTER_SIZE);
  buf.write("conectix", 0, "latin1");
  buf.writeUInt32BE(0x00000002, 8); // features: the reserved bit, always set
  buf.writeUInt32BE(0x00010000, 12); // file format version 1.0
  buf.writeBigUInt64BE(BigInt(FOOTER_SIZE), 16); // data offset: the dynamic disk header
  buf.writeUInt32BE(Math.max(0, Math.floor(Date.now() / 1000) - VHD_EPOCH) >>> 0, 24);
  buf.write(CREATOR_APP, 28, "latin1");
  buf.writeUInt32BE(0x00010000, 32); // creator version
  buf.write("Wi2k", 36, "latin1"); // creator host OS
  buf.writeBigUInt64BE(BigInt(size), 40); // original size
  buf.writeBigUInt64BE(BigInt(size), 48); // current size
  const g = geometryFor(size / SECTOR);
  buf.writeUInt16BE(g.cylinders, 56);
  buf.writeUInt8(g.heads, 58);
  buf.writeUInt8(g.sectorsPerTrack, 59);
  buf.writeUInt32BE(TYPE_DYNAMIC, 60);
  crypto.randomBytes(16).copy(buf, 68); // unique id
  buf.writeUInt32BE(vhdChecksum(buf, 64), 64);
  return buf;
}

function makeHeader(tableOffset: number, entries: number): Buffer {
  const buf = Buffer.alloc(HEADER_SIZE);
  buf.write("cxsparse", 0, "latin1");
  buf.writeBigUInt64BE(0xffffffffffffffffn, 8); // data offset: unused
  buf.writeBigUInt64BE(BigInt(tableOffset), 16);
  buf.writeUInt32BE(0x00010000, 24); // header version 1.0
  buf.writeUInt32BE(entries, 28);
  buf.writeUInt32BE(WRITE_BLOCK, 32);
  buf.writeUInt32BE(vhdChecksum(buf, 36), 36);
  return buf;
}

/**
 * A dynamic VHD with 2 MiB blocks: footer copy, dynamic disk header, BAT, then
 * each allocated block (a full sector bitmap and its 2 MiB, holes where the source
 * has no 64 KiB block or one of zeros), then the footer. The size is the disk's,
 * rounded up to whole sectors.
 */
export const writeVhd: ImageWriter = async function* (source) {
  const size = Math.ceil(source.virtualSize / SECTOR) * SECTOR;
  if (size > MAX_VHD_SIZE) throw new FormatError(`the disk is ${source.virtualSize} bytes, more than a VHD can hold (2040 GiB); export it as QCOW2 or RAW`);
  const entries = Math.ceil(size / WRITE_BLOCK);
  const perBlock = WRITE_BLOCK / BLOCK_SIZE;
  const sourceBlocks = Math.ceil(source.virtualSize / BLOCK_SIZE);

  // Layout pass: which 2 MiB blocks hold data, and where each goes.
  const tableAt = FOOTER_SIZE + HEADER_SIZE;
  const tableBytes = Math.max(SECTOR, Math.ceil((entries * 4) / SECTOR) * SECTOR);
  const bitmapSize = Math.ceil(WRITE_BLOCK / SECTOR / 8 / SECTOR) * SECTOR;
  const bat = Buffer.alloc(tableBytes, 0xff);
  const order: number[] = [];
  let next = tableAt + tableBytes;
  let previous = -1;
  for await (const index of source.allocated()) {
    if (!Number.isSafeInteger(index) || index <= previous || index >= sourceBlocks) throw new Error(`allocated block ${index} is out of order or past the disk's end`);
    previous = index;
    const block = Math.floor(index / perBlock);
    if (order.length > 0 && order[order.length - 1] === block) continue;
    order.push(block);
    bat.writeUInt32BE(next / SECTOR, block * 4);
    next += bitmapSize + WRITE_BLOCK;
  }

  const footer = makeFooter(size);
  yield footer;
  yield makeHeader(tableAt, entries);
  yield bat;

  // Data pass: each block's bitmap, then its 64 KiB pieces in place, with holes
  // where the source has none or only zeros; nothing is held.
  const bitmap = Buffer.alloc(bitmapSize, 0xff);
  let hole = 0; // zeros owed before the next bytes
  let at = -1; // position in `order` of the block being written
  let slot = 0; // its next 64 KiB slot
  const bytes = function* (b: Buffer) {
    if (hole > 0) yield { hole };
    hole = 0;
    yield b;
  };
  const nextBlock = function* () {
    if (at >= 0) hole += (perBlock - slot) * BLOCK_SIZE;
    at++;
    slot = 0;
    yield* bytes(bitmap);
  };
  for await (const { index, data: chunk } of source.blocks()) {
    const block = Math.floor(index / perBlock);
    while (at < order.length - 1 && (at < 0 || order[at] < block)) yield* nextBlock();
    const s = index % perBlock;
    if (at < 0 || order[at] !== block || s < slot) throw new Error(`block ${index} was not listed as allocated, or came out of order`);
    hole += (s - slot) * BLOCK_SIZE;
    slot = s + 1;
    const piece = chunk.subarray(0, Math.min(chunk.length, BLOCK_SIZE));
    if (isZeros(piece)) {
      hole += BLOCK_SIZE;
      continue;
    }
    yield* bytes(piece);
    hole += BLOCK_SIZE - piece.length;
  }
  while (at < order.length - 1) yield* nextBlock();
  if (at >= 0) hole += (perBlock - slot) * BLOCK_SIZE;
  yield* bytes(footer);
};
