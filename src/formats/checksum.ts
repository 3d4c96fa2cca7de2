import crypto from "node:crypto";
import { BLOCK_SIZE, FormatError, ZERO_BLOCK, type ImageReader } from "./types";
import { groupBlocks } from "./blocks";

const ZERO_BLOCK_SHA256 = crypto.createHash("sha256").update(ZERO_BLOCK).digest();

/**
 * An image's checksum, the same whatever file format carries its bytes: SHA-256
 * over, for each 64 KiB block that is not all zeros, in ascending order, its
 * index (8 bytes, big-endian) and the SHA-256 of its 64 KiB (the last block
 * padded with zeros), followed by the virtual size (8 bytes, big-endian).
 *
 * Unlike SHA-256 of the raw bytes, it costs what the data costs: the vault names
 * every chunk by the SHA-256 of its block already, so an image's checksum is
 * computed from its block list, and the zeros of a 1 TiB disk are never hashed.
 */
export class ContentChecksum {
  private readonly hash = crypto.createHash("sha256");
  private readonly entry = Buffer.alloc(8 + 32);
  private last = -1;

  /** Adds block `index` by the SHA-256 of its bytes; all-zero blocks are left out. */
  add(index: number, blockSha256: Buffer): void {
    if (!(index > this.last)) throw new Error(`blocks must come in ascending order (${index} after ${this.last})`);
    this.last = index;
    if (blockSha256.equals(ZERO_BLOCK_SHA256)) return;
    this.entry.writeBigUInt64BE(BigInt(index), 0);
    blockSha256.copy(this.entry, 8, 0, 32);
    this.hash.update(this.entry);
  }

  /** Adds each of `count` blocks whose hashes lie back to back in `hashes` (null entries: all zeros). */
  addMany(indexes: ArrayLike<number>, hashes: (Buffer | null)[]): void {
    for (let k = 0; k < hashes.length; k++) if (hashes[k]) this.add(indexes[k], hashes[k]!);
  }

  hex(virtualSize: number): string {
    const size = Buffer.alloc(8);
    size.writeBigUInt64BE(BigInt(virtualSize));
    return this.hash.update(size).digest("hex");
  }
}

/** The content checksum of an image file, read through its format's reader (`stowage checksum FILE`). */
export async function checksumOf(reader: ImageReader): Promise<string> {
  const sum = new ContentChecksum();
  for await (const g of groupBlocks(reader.extents(), reader.virtualSize, (n) => Buffer.allocUnsafe(n))) {
    for (let k = 0; k < g.indexes.length; k++) {
      sum.add(
        g.indexes[k],
        crypto
          .createHash("sha256")
          .update(g.data.subarray(k * BLOCK_SIZE, (k + 1) * BLOCK_SIZE))
          .digest(),
      );
    }
  }
  if (!Number.isSafeInteger(reader.virtualSize)) throw new FormatError("the image's size is not a byte count");
  return sum.hex(reader.virtualSize);
}
