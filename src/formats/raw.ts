import { BLOCK_SIZE, FormatError, LentReads, type FormatLimits, type ImageReader, type ImageWriter, type RandomAccessSource } from "./types";

const READ = 1024 * 1024;

/** A raw file is the disk itself; runs of zeros are not extents. */
export function openRaw(src: RandomAccessSource, limits: FormatLimits): ImageReader {
  if (src.size > limits.maxVirtualSize) throw new FormatError(`the raw image is ${src.size} bytes, more than the largest allowed disk (${limits.maxVirtualSize} bytes)`);
  if (src.size === 0) throw new FormatError("the file is empty");
  return {
    format: "RAW",
    variant: "raw",
    virtualSize: src.size,
    async *extents() {
      const reads = new LentReads(src, READ);
      for (let off = 0; off < src.size; off += READ) {
        const buf = await reads.read(off, Math.min(READ, src.size - off));
        for (let b = 0; b < buf.length; b += BLOCK_SIZE) {
          const block = buf.subarray(b, Math.min(buf.length, b + BLOCK_SIZE));
          if (!isZero(block)) yield { offset: off + b, data: block };
        }
      }
    },
  };
}

const ZERO = Buffer.alloc(BLOCK_SIZE);
const isZero = (b: Buffer) => b.equals(ZERO.subarray(0, b.length));

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
    if (isZero(bytes)) continue;
    if (start > at) yield { hole: start - at };
    yield bytes;
    at = start + bytes.length;
  }
  if (size > at) yield { hole: size - at };
};
