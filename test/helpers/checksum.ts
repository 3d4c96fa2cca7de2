import crypto from "node:crypto";

const BLOCK = 64 * 1024;

/**
 * An image's content checksum, written out here on its own from its definition:
 * SHA-256 over (index as 8 bytes big-endian, SHA-256 of the block) for each 64 KiB
 * block that is not all zeros, then the size as 8 bytes big-endian.
 */
export function contentChecksum(raw: Buffer, size = raw.length): string {
  const h = crypto.createHash("sha256");
  for (let i = 0; i * BLOCK < size; i++) {
    const block = Buffer.alloc(BLOCK);
    raw.copy(block, 0, i * BLOCK, Math.min(raw.length, (i + 1) * BLOCK));
    if (block.every((b) => b === 0)) continue;
    const index = Buffer.alloc(8);
    index.writeBigUInt64BE(BigInt(i));
    h.update(index).update(crypto.createHash("sha256").update(block).digest());
  }
  const tail = Buffer.alloc(8);
  tail.writeBigUInt64BE(BigInt(size));
  return h.update(tail).digest("hex");
}
