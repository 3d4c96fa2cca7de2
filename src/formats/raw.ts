import { BLOCK_SIZE, dataRangesOf, FormatError, isZeros, LentReads, type Extent, type FormatLimits, type ImageReader, type ImageWriter, type RandomAccessSource } from "./types";

/** Bytes read at a time. */
const READ = 1024 * 1024;

/**
 * A raw file is the disk itself; runs of zeros are not extents. A source that knows
 * its holes is read only where it has data, so a sparse 1 TiB file costs its data.
 */
export function openRaw(src: RandomAccessSource, limits: FormatLimits): ImageReader {
  if (src.size > limits.maxVirtualSize) throw new FormatError(`the raw image is ${src.size} bytes, more than the largest allowed disk (${limits.maxVirtualSize} bytes)`);
  if (src.size === 0) throw new FormatError("the file is empty");
  return {
    format: "RAW",
    variant: "raw",
    virtualSize: src.size,
    extents: () => plainExtents(src, src.size),
  };
}

/** The extents of a disk stored as is in the first `size` bytes of the file (raw, fixed VHD), skipping the holes the source knows of. */
export async function* plainExtents(src: RandomAccessSource, size: number): AsyncGenerator<Extent> {
  const reads = new LentReads(src, READ);
  for await (const r of dataRangesOf(src, 0, size)) yield* nonZeroExtents(reads, r.offset, r.offset, r.length);
}

/**
 * The bytes at [fileAt, fileAt + length) of the file as extents at `guestAt`,
 * read a megabyte at a time, leaving out the 64 KiB (guest-aligned) pieces that
 * are all zeros.
 */
export async function* nonZeroExtents(src: LentReads, fileAt: number, guestAt: number, length: number): AsyncGenerator<Extent> {
  let done = 0;
  while (done < length) {
    const g = guestAt + done;
    const n = Math.min(length - done, READ - (g % READ));
    const buf = await src.read(fileAt + done, n);
    let run = -1;
    for (let p = 0; p < n;) {
      const q = Math.min(n, p + BLOCK_SIZE - ((g + p) % BLOCK_SIZE));
      const zero = isZeros(buf.subarray(p, q));
      if (!zero && run < 0) run = p;
      if (zero && run >= 0) {
        yield { offset: g + run, data: buf.subarray(run, p) };
        run = -1;
      }
      p = q;
    }
    if (run >= 0) yield { offset: g + run, data: buf.subarray(run, n) };
    done += n;
  }
}

/**
 * The disk's bytes. Blocks the disk does not have, and blocks of zeros, are holes,
 * so a sparse-capable sink writes a 20 GiB disk holding 8 MiB as a file of 8 MiB.
 */
export const writeRaw: ImageWriter = async function* (source) {
  const size = source.virtualSize;
  if (!Number.isSafeInteger(size) || size < 0) throw new Error(`invalid virtual size ${size}`);
  let at = 0; // where the pieces yielded so far end
  let prev = -1;
  for await (const { index, data } of source.blocks()) {
    const start = index * BLOCK_SIZE;
    if (!Number.isSafeInteger(index) || index <= prev || start >= size) throw new Error(`writeRaw: block index ${index} is out of order or past the ${size}-byte disk`);
    prev = index;
    // A short block's missing bytes, like those past the disk's end, are zeros.
    const bytes = data.subarray(0, Math.min(BLOCK_SIZE, size - start, data.length));
    if (isZeros(bytes)) continue;
    if (start > at) yield { hole: start - at };
    yield bytes;
    at = start + bytes.length;
  }
  if (size > at) yield { hole: size - at };
};
