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

/** The disk's bytes, holes written as zeros. */
export const writeRaw: ImageWriter = async function* (source) {
  let next = 0;
  const blocks = Math.ceil(source.virtualSize / BLOCK_SIZE);
  const zerosUpTo = function* (index: number) {
    while (next < index) {
      const n = Math.min(index - next, 16);
      const bytes = Math.min(n * BLOCK_SIZE, source.virtualSize - next * BLOCK_SIZE);
      yield bytes === ZERO.length * 16 ? ZERO16 : Buffer.alloc(bytes);
      next += n;
    }
  };
  for await (const { index, data } of source.blocks()) {
    yield* zerosUpTo(index);
    yield index === blocks - 1 ? data.subarray(0, source.virtualSize - index * BLOCK_SIZE) : data;
    next = index + 1;
  }
  yield* zerosUpTo(blocks);
};

const ZERO16 = Buffer.alloc(16 * BLOCK_SIZE);
