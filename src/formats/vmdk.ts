/**
 * VMDK (VMware Virtual Disk Format 5.0): hosted sparse extents in a single file.
 *
 * Reads monolithicSparse (uncompressed grains, grain directory usually near the
 * start, optionally with the zeroed-grain GTE of version 2) and streamOptimized
 * (deflated grains behind grain markers, metadata markers, the grain directory
 * either in the header or — GD_AT_END — in the footer at the end of the file).
 * Everything that would need another file (monolithicFlat, twoGbMaxExtent*, vmfs,
 * delta disks with a parent) is refused.
 *
 * Writes streamOptimized: what VMware, OVF tools and cloud importers accept.
 */
import crypto from "node:crypto";
import { promisify } from "node:util";
import zlib from "node:zlib";
import { BLOCK_SIZE, FormatError, LentReads, mayHoldData, within, ZERO_BLOCK, type FormatLimits, type ImageReader, type ImageWriter, type RandomAccessSource } from "./types";

const SECTOR = 512;
const MAGIC = Buffer.from("KDMV", "latin1");
const COWD_MAGIC = Buffer.from("COWD", "latin1");
const GD_AT_END = 0xffffffffffffffffn;

const FLAG_NL_DETECT = 1 << 0;
const FLAG_ZERO_GRAIN = 1 << 2;
const FLAG_COMPRESSED = 1 << 16;
const FLAG_MARKERS = 1 << 17;

const COMPRESSION_NONE = 0;
const COMPRESSION_DEFLATE = 1;

const MARKER_EOS = 0;
const MARKER_GT = 1;
const MARKER_GD = 2;
const MARKER_FOOTER = 3;

/**
 * Largest disk, in sectors, of a hosted sparse extent (VMware's limit: 2 TiB). Grain
 * tables and the directory address the file by 32-bit sector numbers, so past it a
 * file could not even hold the disk's data.
 */
const MAX_CAPACITY = 2 ** 32;
/** Grain sizes qemu accepts: powers of two from one sector to 1 MiB. */
const MAX_GRAIN_SECTORS = 2048;
const MAX_GTES_PER_GT = 512;
/** A grain marker's header: the grain's LBA (u64) and the compressed size (u32). */
const GRAIN_MARKER_HEADER = 12;
const MAX_DESCRIPTOR_BYTES = 1024 * 1024;
/** How much a reader fetches at once when it reads small pieces (tables, compressed grains). */
const READ_WINDOW = 1024 * 1024;
/** Largest extent made of consecutive uncompressed grains. */
const MAX_RUN = 1024 * 1024;

const inflate = promisify(zlib.inflate) as (buf: Buffer, options: zlib.ZlibOptions) => Promise<Buffer>;
const deflate = promisify(zlib.deflate) as (buf: Buffer, options: zlib.ZlibOptions) => Promise<Buffer>;

// ---------------------------------------------------------------- header

interface SparseHeader {
  version: number;
  flags: number;
  /** Sectors. */
  capacity: number;
  grainSectors: number;
  descriptorOffset: number;
  descriptorSize: number;
  numGTEsPerGT: number;
  gdAtEnd: boolean;
  /** Sectors; meaningless when gdAtEnd. */
  gdOffset: number;
  compressAlgorithm: number;
  newlineChars: Buffer;
}

function u64(buf: Buffer, at: number, what: string): number {
  const v = buf.readBigUInt64LE(at);
  if (v > BigInt(Number.MAX_SAFE_INTEGER)) throw new FormatError(`the VMDK header's ${what} (${v}) is out of range`);
  return Number(v);
}

function parseHeader(buf: Buffer, where: string): SparseHeader {
  if (!buf.subarray(0, 4).equals(MAGIC)) throw new FormatError(`the VMDK ${where} has no KDMV magic`);
  const gdRaw = buf.readBigUInt64LE(56);
  return {
    version: buf.readUInt32LE(4),
    flags: buf.readUInt32LE(8),
    capacity: u64(buf, 12, "capacity"),
    grainSectors: u64(buf, 20, "grain size"),
    descriptorOffset: u64(buf, 28, "descriptor offset"),
    descriptorSize: u64(buf, 36, "descriptor size"),
    numGTEsPerGT: buf.readUInt32LE(44),
    gdAtEnd: gdRaw === GD_AT_END,
    gdOffset: gdRaw === GD_AT_END ? 0 : u64(buf, 56, "grain directory offset"),
    compressAlgorithm: buf.readUInt16LE(77),
    newlineChars: Buffer.from(buf.subarray(73, 77)),
  };
}

function encodeHeader(h: { capacity: number; descriptorOffset: number; descriptorSize: number; gdOffset: bigint; overHead: number }): Buffer {
  const buf = Buffer.alloc(SECTOR);
  MAGIC.copy(buf, 0);
  buf.writeUInt32LE(3, 4);
  buf.writeUInt32LE(FLAG_NL_DETECT | FLAG_COMPRESSED | FLAG_MARKERS, 8);
  buf.writeBigUInt64LE(BigInt(h.capacity), 12);
  buf.writeBigUInt64LE(BigInt(BLOCK_SIZE / SECTOR), 20);
  buf.writeBigUInt64LE(BigInt(h.descriptorOffset), 28);
  buf.writeBigUInt64LE(BigInt(h.descriptorSize), 36);
  buf.writeUInt32LE(MAX_GTES_PER_GT, 44);
  buf.writeBigUInt64LE(0n, 48); // no redundant grain directory
  buf.writeBigUInt64LE(h.gdOffset, 56);
  buf.writeBigUInt64LE(BigInt(h.overHead), 64);
  buf[72] = 0; // clean shutdown
  buf.write("\n \r\n", 73, "latin1");
  buf.writeUInt16LE(COMPRESSION_DEFLATE, 77);
  return buf;
}

// ---------------------------------------------------------------- descriptor

interface Descriptor {
  createType?: string;
  parentCID?: string;
  parentFileNameHint?: string;
  extents: { access: string; sectors: string; type: string; file?: string }[];
  encrypted: boolean;
}

function parseDescriptor(text: string): Descriptor {
  const d: Descriptor = { extents: [], encrypted: false };
  for (const raw of text.split(/\r?\n|\r/)) {
    const line = raw.trim();
    if (!line || line.startsWith("#")) continue;
    const ext = /^(RW|RDONLY|NOACCESS)\s+(\d+)\s+(\S+)(?:\s+"([^"]*)")?/i.exec(line);
    if (ext) {
      d.extents.push({ access: ext[1], sectors: ext[2], type: ext[3].toUpperCase(), file: ext[4] });
      continue;
    }
    const kv = /^([A-Za-z0-9_.]+)\s*=\s*(.*)$/.exec(line);
    if (!kv) continue;
    const key = kv[1].toLowerCase();
    const value = kv[2].trim().replace(/^"(.*)"$/, "$1");
    if (key === "createtype") d.createType = value;
    else if (key === "parentcid") d.parentCID = value.toLowerCase();
    else if (key === "parentfilenamehint") d.parentFileNameHint = value;
    else if (key.startsWith("encryption.") || key === "ddb.encryption") d.encrypted = true;
  }
  return d;
}

function printable(s: string): string {
  const clean = s.replace(/[^\x20-\x7e]/g, "?");
  return clean.length > 80 ? `${clean.slice(0, 77)}...` : clean;
}

function describeExtents(d: Descriptor): string {
  const files = d.extents.map((e) => e.file).filter((f): f is string => !!f);
  if (!files.length) return "";
  const shown = files
    .slice(0, 3)
    .map((f) => `"${printable(f)}"`)
    .join(", ");
  return `, extent${files.length > 1 ? "s" : ""} ${shown}${files.length > 3 ? ` and ${files.length - 3} more` : ""}`;
}

const CONVERT_HINT = "convert it to a single file first, e.g. qemu-img convert -O vmdk -o subformat=streamOptimized in.vmdk out.vmdk";

function refuseParent(d: Descriptor): void {
  const hasParentCID = d.parentCID !== undefined && d.parentCID !== "ffffffff";
  if (hasParentCID || d.parentFileNameHint !== undefined) {
    const parent = d.parentFileNameHint !== undefined ? ` "${printable(d.parentFileNameHint)}"` : "";
    const cid = hasParentCID ? ` (parentCID ${printable(d.parentCID!)})` : "";
    throw new FormatError(`the VMDK has a parent disk${parent}${cid}: it is a delta (snapshot) disk that only holds changes; ${CONVERT_HINT} to flatten it`);
  }
}

/** A descriptor-only VMDK: a text file naming the files that hold the data. */
async function refuseTextDescriptor(src: RandomAccessSource, head: Buffer): Promise<never> {
  const text = (await src.read(0, Math.min(src.size, 64 * 1024))).toString("latin1");
  const d = parseDescriptor(text.split("\0")[0]);
  if (d.createType !== undefined || d.extents.length > 0 || /^\s*#\s*Disk DescriptorFile/i.test(text)) {
    const type = d.createType !== undefined ? ` (createType "${printable(d.createType)}"${describeExtents(d)})` : describeExtents(d) ? ` (${describeExtents(d).slice(2)})` : "";
    throw new FormatError(`the VMDK refers to other files${type}: it is only a text descriptor and the disk's data lives in separate extent files; ${CONVERT_HINT}`);
  }
  throw new FormatError(`not a VMDK file (no KDMV magic; starts with ${head.subarray(0, 4).toString("hex")})`);
}

// ---------------------------------------------------------------- reading

/** Reads through a window, so that many small nearby reads cost one read of the source. */
class Window {
  private start = 0;
  private buf: Buffer = Buffer.alloc(0);
  constructor(
    private readonly src: RandomAccessSource,
    private readonly windowSize: number,
  ) {}

  /** The caller has checked that the range lies inside the file. */
  async read(offset: number, length: number): Promise<Buffer> {
    if (offset >= this.start && offset + length <= this.start + this.buf.length) return this.buf.subarray(offset - this.start, offset - this.start + length);
    if (length >= this.windowSize) return this.src.read(offset, length);
    this.start = offset;
    this.buf = await this.src.read(offset, Math.min(this.windowSize, this.src.size - offset));
    return this.buf.subarray(0, length);
  }
}

/** Disjoint byte ranges of metadata, sorted, to find grains that point into them. */
class Ranges {
  private list: { start: number; end: number; what: string }[] = [];
  add(start: number, end: number, what: string): void {
    if (end > start) this.list.push({ start, end, what });
  }
  /** Sorts and refuses overlaps (two tables sharing bytes). */
  seal(): void {
    this.list.sort((a, b) => a.start - b.start);
    for (let i = 1; i < this.list.length; i++) {
      const a = this.list[i - 1];
      const b = this.list[i];
      if (b.start < a.end) throw new FormatError(`the VMDK's ${b.what} at offset ${b.start} overlaps its ${a.what} at offset ${a.start}`);
    }
  }
  /** The first metadata [start, end) overlaps, if any (ends ascend too: the ranges are disjoint). */
  hit(start: number, end: number): string | undefined {
    let lo = 0;
    let hi = this.list.length;
    while (lo < hi) {
      const mid = (lo + hi) >> 1;
      if (this.list[mid].end > start) hi = mid;
      else lo = mid + 1;
    }
    return lo < this.list.length && this.list[lo].start < end ? this.list[lo].what : undefined;
  }
}

export async function openVmdk(src: RandomAccessSource, limits: FormatLimits): Promise<ImageReader> {
  const size = src.size;
  if (size < SECTOR) throw new FormatError(`the file is too small to be a VMDK (${size} bytes)`);
  const first = await src.read(0, SECTOR);
  if (first.subarray(0, 4).equals(COWD_MAGIC)) throw new FormatError("the VMDK is an ESX vmfsSparse (COWD) extent, which is not supported: convert it to streamOptimized or monolithicSparse first");
  if (!first.subarray(0, 4).equals(MAGIC)) return refuseTextDescriptor(src, first);

  let header = parseHeader(first, "header");
  const metadata = new Ranges();
  metadata.add(0, SECTOR, "header");
  if (header.gdAtEnd) {
    // streamOptimized written in one pass: the footer (a copy of the header with
    // the real gdOffset) sits between a footer marker and the end-of-stream marker.
    if (size < 4 * SECTOR) throw new FormatError("the VMDK is truncated: its grain directory is at the end of the file, but there is no footer");
    const tail = await src.read(size - 3 * SECTOR, 3 * SECTOR);
    const footerMarker = tail.subarray(0, SECTOR);
    const eos = tail.subarray(2 * SECTOR);
    if (
      !tail.subarray(SECTOR, SECTOR + 4).equals(MAGIC) ||
      footerMarker.readUInt32LE(8) !== 0 ||
      footerMarker.readUInt32LE(12) !== MARKER_FOOTER ||
      eos.readBigUInt64LE(0) !== 0n ||
      eos.readUInt32LE(8) !== 0 ||
      eos.readUInt32LE(12) !== MARKER_EOS
    ) {
      throw new FormatError("the VMDK's grain directory is at the end of the file, but the file does not end with a footer and an end-of-stream marker (truncated?)");
    }
    header = parseHeader(tail.subarray(SECTOR, 2 * SECTOR), "footer");
    if (header.gdAtEnd) throw new FormatError("the VMDK footer does not give the grain directory's offset");
    metadata.add(size - 3 * SECTOR, size, "footer");
  }

  const h = header;
  if (h.version < 1 || h.version > 3) throw new FormatError(`unsupported VMDK sparse extent version ${h.version} (1 to 3 are supported)`);
  if (h.flags & FLAG_NL_DETECT && !h.newlineChars.equals(Buffer.from("\n \r\n", "latin1"))) {
    throw new FormatError("the VMDK header's line-ending check bytes are damaged: the file was probably transferred in text (ASCII) mode");
  }
  if (h.compressAlgorithm !== COMPRESSION_NONE && h.compressAlgorithm !== COMPRESSION_DEFLATE)
    throw new FormatError(`the VMDK uses an unknown compression algorithm (${h.compressAlgorithm}); only deflate (1) is supported`);
  const compressed = (h.flags & FLAG_COMPRESSED) !== 0 || h.compressAlgorithm === COMPRESSION_DEFLATE;
  const markers = (h.flags & FLAG_MARKERS) !== 0;
  if (compressed && h.compressAlgorithm !== COMPRESSION_DEFLATE) throw new FormatError("the VMDK says its grains are compressed but names no compression algorithm");
  if (compressed !== markers) {
    throw new FormatError(
      `the VMDK has ${compressed ? "compressed grains but no grain markers" : "grain markers but no compressed grains"}, a combination no known writer produces; it is not supported`,
    );
  }
  const g = h.grainSectors;
  if (g < 1 || g > MAX_GRAIN_SECTORS || (g & (g - 1)) !== 0) throw new FormatError(`the VMDK's grain size is ${g} sectors; only powers of two from 1 to ${MAX_GRAIN_SECTORS} sectors are supported`);
  if (h.numGTEsPerGT < 1 || h.numGTEsPerGT > MAX_GTES_PER_GT) throw new FormatError(`the VMDK's grain tables have ${h.numGTEsPerGT} entries; 1 to ${MAX_GTES_PER_GT} are supported`);
  const virtualSize = h.capacity * SECTOR;
  if (!Number.isSafeInteger(virtualSize) || virtualSize > limits.maxVirtualSize) {
    throw new FormatError(`the VMDK describes a ${h.capacity}-sector disk (${virtualSize} bytes), more than the largest allowed disk (${limits.maxVirtualSize} bytes)`);
  }
  if (h.capacity > MAX_CAPACITY) {
    throw new FormatError(`the VMDK describes a ${virtualSize}-byte disk, more than a sparse VMDK holds (2 TiB); convert it to qcow2 or raw first (qemu-img convert -O qcow2 in.vmdk out.qcow2)`);
  }
  const zeroGrains = h.version >= 2 || (h.flags & FLAG_ZERO_GRAIN) !== 0;

  // The embedded descriptor: the subformat, and refusals (parent, other extents).
  let variant = markers ? "streamOptimized" : "monolithicSparse";
  if (h.descriptorSize > 0) {
    const bytes = h.descriptorSize * SECTOR;
    if (bytes > MAX_DESCRIPTOR_BYTES) throw new FormatError(`the VMDK's embedded descriptor is ${bytes} bytes, more than the ${MAX_DESCRIPTOR_BYTES} allowed`);
    if (h.descriptorOffset < 1) throw new FormatError("the VMDK's embedded descriptor overlaps its header");
    within(size, h.descriptorOffset * SECTOR, bytes, "the VMDK's embedded descriptor");
    metadata.add(h.descriptorOffset * SECTOR, h.descriptorOffset * SECTOR + bytes, "descriptor");
    const text = (await src.read(h.descriptorOffset * SECTOR, bytes)).toString("latin1").split("\0")[0];
    const d = parseDescriptor(text);
    refuseParent(d);
    if (d.encrypted) throw new FormatError("the VMDK is encrypted, which is not supported: decrypt it in VMware first");
    if (d.extents.length > 1) throw new FormatError(`the VMDK refers to other files (${d.extents.length} extents${describeExtents(d)}): only single-file VMDKs are supported; ${CONVERT_HINT}`);
    if (d.extents.length === 1 && d.extents[0].type !== "SPARSE") {
      throw new FormatError(`the VMDK refers to other files (a ${printable(d.extents[0].type)} extent${describeExtents(d)}); ${CONVERT_HINT}`);
    }
    if (d.createType !== undefined) {
      if (d.createType !== "monolithicSparse" && d.createType !== "streamOptimized") {
        throw new FormatError(`unsupported VMDK type "${printable(d.createType)}": only monolithicSparse and streamOptimized single-file VMDKs are supported; ${CONVERT_HINT}`);
      }
      variant = d.createType;
    }
  }

  // The grain directory, held in memory; grain tables are read one at a time.
  const grainBytes = g * SECTOR;
  const grains = Math.ceil(h.capacity / g);
  const gtCoverage = h.numGTEsPerGT;
  const gdEntries = Math.ceil(grains / gtCoverage);
  const gdBytes = gdEntries * 4;
  const gtBytes = h.numGTEsPerGT * 4;
  if (gdBytes > limits.maxMetadataBytes) throw new FormatError(`the VMDK's grain directory is ${gdBytes} bytes, more than the ${limits.maxMetadataBytes} bytes of metadata allowed`);
  let gd = new Uint32Array(0);
  if (gdEntries > 0) {
    if (h.gdOffset < 1) throw new FormatError("the VMDK's grain directory offset is 0");
    within(size, h.gdOffset * SECTOR, gdBytes, "the VMDK's grain directory");
    metadata.add(h.gdOffset * SECTOR, h.gdOffset * SECTOR + gdBytes, "grain directory");
    const raw = await src.read(h.gdOffset * SECTOR, gdBytes);
    gd = new Uint32Array(gdEntries);
    for (let i = 0; i < gdEntries; i++) gd[i] = raw.readUInt32LE(i * 4);
  }
  let metadataBytes = gdBytes;
  for (let i = 0; i < gdEntries; i++) {
    if (gd[i] === 0) continue;
    within(size, gd[i] * SECTOR, gtBytes, `the VMDK's grain table ${i}`);
    metadata.add(gd[i] * SECTOR, gd[i] * SECTOR + gtBytes, `grain table ${i}`);
    // VMware and qemu lay out every grain table up front (64 MiB of them for 1 TiB):
    // one in a hole of the file is all zeros, a table of no grains, neither read nor counted.
    if (src.dataRanges && !(await mayHoldData(src, gd[i] * SECTOR, gtBytes))) {
      gd[i] = 0;
      continue;
    }
    metadataBytes += gtBytes;
    if (metadataBytes > limits.maxMetadataBytes) throw new FormatError(`the VMDK's grain directory and tables need more than the ${limits.maxMetadataBytes} bytes of metadata allowed`);
  }
  metadata.seal();

  const grainData = async function* (): AsyncGenerator<{ offset: number; data: Buffer }> {
    const meta = new Window(src, READ_WINDOW);
    const data = new Window(src, READ_WINDOW);
    const runs = new LentReads(src, MAX_RUN);
    let used = 0; // bytes of the file the grains take, to refuse grains shared between entries
    const use = (bytes: number, grain: number) => {
      used += bytes;
      if (used > size) throw new FormatError(`the VMDK's grain tables refer to more grain data than the file holds (at grain ${grain}): entries share grains`);
    };
    const checkGrain = (grain: number, start: number, length: number) => {
      within(size, start, length, `the VMDK's grain ${grain}`);
      const hit = metadata.hit(start, start + length);
      if (hit) throw new FormatError(`the VMDK's grain table entry for grain ${grain} points inside its ${hit}`);
    };

    // A run of uncompressed grains consecutive both on the disk and in the file.
    let run: { offset: number; fileOffset: number; length: number } | null = null;
    const flush = async () => {
      if (!run) return null;
      const r = run;
      run = null;
      return { offset: r.offset, data: await runs.read(r.fileOffset, r.length) };
    };

    for (let t = 0; t < gdEntries; t++) {
      if (gd[t] === 0) continue;
      const first = t * gtCoverage;
      const count = Math.min(gtCoverage, grains - first);
      const gt = await meta.read(gd[t] * SECTOR, count * 4);
      for (let e = 0; e < count; e++) {
        const entry = gt.readUInt32LE(e * 4);
        if (entry === 0 || (entry === 1 && zeroGrains)) continue;
        const grain = first + e;
        const offset = grain * grainBytes;
        const length = Math.min(grainBytes, virtualSize - offset);
        const at = entry * SECTOR;
        if (!compressed) {
          checkGrain(grain, at, length);
          use(length, grain);
          if (run && run.offset + run.length === offset && run.fileOffset + run.length === at && run.length + length <= MAX_RUN) {
            run.length += length;
          } else {
            const done = await flush();
            if (done) yield done;
            run = { offset, fileOffset: at, length };
          }
          continue;
        }
        within(size, at, GRAIN_MARKER_HEADER, `the VMDK's grain marker for grain ${grain}`);
        const marker = await data.read(at, GRAIN_MARKER_HEADER);
        const lba = marker.readBigUInt64LE(0);
        const bytes = marker.readUInt32LE(8);
        if (lba !== BigInt(grain) * BigInt(g)) throw new FormatError(`the VMDK's grain marker for grain ${grain} names sector ${lba} instead of ${grain * g}`);
        if (bytes === 0 || bytes > 2 * grainBytes) throw new FormatError(`the VMDK's compressed grain ${grain} claims ${bytes} bytes (a ${grainBytes}-byte grain)`);
        checkGrain(grain, at, GRAIN_MARKER_HEADER + bytes);
        use(Math.ceil((GRAIN_MARKER_HEADER + bytes) / SECTOR) * SECTOR, grain);
        const packed = await data.read(at + GRAIN_MARKER_HEADER, bytes);
        let plain: Buffer;
        try {
          plain = await inflate(packed, { maxOutputLength: grainBytes });
        } catch (err) {
          throw new FormatError(`the VMDK's compressed grain ${grain} does not inflate: ${(err as Error).message}`);
        }
        // Every grain inflates to a whole grain; the last may stop at the end of the disk.
        if (plain.length !== grainBytes && (length === grainBytes || plain.length < length)) {
          throw new FormatError(`the VMDK's compressed grain ${grain} inflates to ${plain.length} bytes instead of ${grainBytes}`);
        }
        yield { offset, data: plain.subarray(0, length) };
      }
      const done = await flush();
      if (done) yield done;
    }
    const done = await flush();
    if (done) yield done;
  };

  return {
    format: "VMDK",
    variant,
    virtualSize,
    extents: grainData,
  };
}

// ---------------------------------------------------------------- writing

const DESCRIPTOR_SECTORS = 20;
/** Grains start at 64 KiB, as VMware and qemu write them. */
const OVERHEAD_SECTORS = 128;
const DEFLATE_AHEAD = 4;

function metadataMarker(sectors: number, type: number): Buffer {
  const m = Buffer.alloc(SECTOR);
  m.writeBigUInt64LE(BigInt(sectors), 0);
  m.writeUInt32LE(0, 8);
  m.writeUInt32LE(type, 12);
  return m;
}

function descriptorText(capacity: number): string {
  let cid = crypto.randomBytes(4).readUInt32LE(0);
  if (cid === 0xffffffff || cid === 0) cid = 1;
  const heads = 255;
  const sectors = 63;
  const cylinders = Math.max(1, Math.min(65535, Math.floor(capacity / (heads * sectors))));
  return [
    "# Disk DescriptorFile",
    "version=1",
    `CID=${cid.toString(16).padStart(8, "0")}`,
    "parentCID=ffffffff",
    'createType="streamOptimized"',
    "",
    "# Extent description",
    `RW ${capacity} SPARSE "disk.vmdk"`,
    "",
    "# The Disk Data Base",
    "#DDB",
    "",
    'ddb.virtualHWVersion = "4"',
    `ddb.geometry.cylinders = "${cylinders}"`,
    `ddb.geometry.heads = "${heads}"`,
    `ddb.geometry.sectors = "${sectors}"`,
    'ddb.adapterType = "lsilogic"',
    "",
  ].join("\n");
}

const padToSector = (b: Buffer) => (b.length % SECTOR === 0 ? b : Buffer.concat([b, Buffer.alloc(SECTOR - (b.length % SECTOR))]));

/**
 * A streamOptimized VMDK in one pass: header (grain directory at the end),
 * descriptor, the deflated grains behind grain markers, each grain table after
 * its grains, then the grain directory, the footer and the end-of-stream marker.
 * Grains are 64 KiB (the source's blocks). A size that is not a whole number of
 * sectors is rounded up with zeros.
 */
export const writeVmdk: ImageWriter = async function* (source) {
  const capacity = Math.ceil(source.virtualSize / SECTOR);
  if (capacity > MAX_CAPACITY) throw new FormatError(`the disk is ${source.virtualSize} bytes, more than a sparse VMDK can hold (2 TiB); export it as QCOW2 or RAW`);
  const grainSectors = BLOCK_SIZE / SECTOR;
  const blocks = Math.ceil(source.virtualSize / BLOCK_SIZE);
  const gdEntries = Math.ceil(blocks / MAX_GTES_PER_GT);
  const gd = Buffer.alloc(Math.max(SECTOR, Math.ceil((gdEntries * 4) / SECTOR) * SECTOR));

  const descriptor = Buffer.alloc(DESCRIPTOR_SECTORS * SECTOR);
  descriptor.write(descriptorText(capacity), 0, "latin1");
  const header = (gdOffset: bigint) => encodeHeader({ capacity, descriptorOffset: 1, descriptorSize: DESCRIPTOR_SECTORS, gdOffset, overHead: OVERHEAD_SECTORS });

  let sector = 0; // where the next piece goes
  const out = (b: Buffer) => {
    sector += b.length / SECTOR;
    return b;
  };
  /** The next piece's sector, for a table entry: those are 32-bit, so a file of data that does not compress can outgrow them. */
  const here = () => {
    if (sector > 0xffffffff) throw new FormatError("the VMDK would grow past 2 TiB, beyond what its tables can address: the disk's data does not compress enough; export it as QCOW2 or RAW");
    return sector;
  };
  yield out(header(GD_AT_END));
  yield out(descriptor);
  const gap = OVERHEAD_SECTORS - 1 - DESCRIPTOR_SECTORS;
  sector += gap;
  yield { hole: gap * SECTOR };

  let table = -1; // the grain table being filled
  let gt = Buffer.alloc(MAX_GTES_PER_GT * 4);
  const closeTable = function* () {
    if (table < 0) return;
    yield out(metadataMarker(gt.length / SECTOR, MARKER_GT));
    gd.writeUInt32LE(here(), table * 4);
    yield out(gt);
    gt = Buffer.alloc(MAX_GTES_PER_GT * 4);
    table = -1;
  };
  const grain = function* (index: number, packed: Buffer) {
    const t = Math.floor(index / MAX_GTES_PER_GT);
    if (t !== table) {
      yield* closeTable();
      table = t;
    }
    gt.writeUInt32LE(here(), (index % MAX_GTES_PER_GT) * 4);
    const marker = Buffer.alloc(GRAIN_MARKER_HEADER);
    marker.writeBigUInt64LE(BigInt(index) * BigInt(grainSectors), 0);
    marker.writeUInt32LE(packed.length, 8);
    yield out(padToSector(Buffer.concat([marker, packed])));
  };

  // Deflate a few blocks ahead (zlib runs in the thread pool), emitting in order.
  const pending: { index: number; packed: Promise<Buffer> }[] = [];
  let last = -1;
  try {
    for await (const { index, data } of source.blocks()) {
      if (!Number.isSafeInteger(index) || index <= last || index >= blocks) throw new Error(`writeVmdk: block index ${index} is out of order or past the ${blocks}-block disk`);
      last = index;
      let block = data;
      const valid = Math.min(BLOCK_SIZE, source.virtualSize - index * BLOCK_SIZE);
      if (block.length !== BLOCK_SIZE || valid < BLOCK_SIZE) {
        block = Buffer.alloc(BLOCK_SIZE);
        data.copy(block, 0, 0, Math.min(valid, data.length));
      }
      if (block.equals(ZERO_BLOCK)) continue; // reads as zeros without a grain
      const packed = deflate(block, {});
      packed.catch(() => undefined); // awaited below; never an unhandled rejection if the consumer stops early
      pending.push({ index, packed });
      if (pending.length >= DEFLATE_AHEAD) {
        const next = pending.shift()!;
        yield* grain(next.index, await next.packed);
      }
    }
    while (pending.length) {
      const next = pending.shift()!;
      yield* grain(next.index, await next.packed);
    }
  } finally {
    pending.length = 0;
  }
  yield* closeTable();

  yield out(metadataMarker(gd.length / SECTOR, MARKER_GD));
  const gdOffset = sector;
  yield out(gd);
  yield out(metadataMarker(1, MARKER_FOOTER));
  yield out(header(BigInt(gdOffset)));
  yield out(Buffer.alloc(SECTOR)); // end of stream
};
