import crypto from "node:crypto";

const BLOCK = 64 * 1024;

/**
 * An image's content checksum, written out here on its own from its definition:
 * SHA-256 over (index as 8 bytes big-endian, SHA-256 of the block) for each 64 KiB
 * block that is not all zeros, in ascending order, then the size as 8 bytes big-endian.
 * `blocks` gives each block that may hold data (a shorter last block is padded).
 */
export function checksumOfBlocks(blocks: Map<number, Buffer>, size: number): string {
  const h = crypto.createHash("sha256");
  for (const i of [...blocks.keys()].sort((a, b) => a - b)) {
    const block = Buffer.alloc(BLOCK);
    blocks.get(i)!.copy(block);
    if (block.every((b) => b === 0)) continue;
    const index = Buffer.alloc(8);
    index.writeBigUInt64BE(BigInt(i));
    h.update(index).update(crypto.createHash("sha256").update(block).digest());
  }
  const tail = Buffer.alloc(8);
  tail.writeBigUInt64BE(BigInt(size));
  return h.update(tail).digest("hex");
}

/** The content checksum of a disk given whole. */
export function contentChecksum(raw: Buffer, size = raw.length): string {
  return checksumOfPieces(size, [{ offset: 0, data: raw }]);
}

/** The content checksum of a sparse disk from the pieces it holds (at 64 KiB aligned offsets), zeros elsewhere. */
export function checksumOfPieces(size: number, pieces: { offset: number; data: Buffer }[]): string {
  const blocks = new Map<number, Buffer>();
  for (const p of pieces) {
    if (p.offset % BLOCK) throw new Error("pieces must start on a 64 KiB boundary");
    for (let pos = 0; pos < p.data.length; pos += BLOCK) blocks.set((p.offset + pos) / BLOCK, p.data.subarray(pos, pos + BLOCK));
  }
  return checksumOfBlocks(blocks, size);
}
