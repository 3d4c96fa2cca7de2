import { BLOCK_SIZE, FormatError, type Extent } from "./types";

/**
 * Regroups a reader's extents (any size, ascending) into the 64 KiB blocks disks
 * and the vault are made of. Blocks no extent touches are not yielded; a block an
 * extent covers in part is zero elsewhere.
 */
export async function* extentsToBlocks(extents: AsyncIterable<Extent>, virtualSize: number): AsyncIterable<{ index: number; data: Buffer }> {
  let current: { index: number; data: Buffer } | null = null;
  let end = 0;
  for await (const e of extents) {
    if (e.offset < end) throw new FormatError(`the image's data at offset ${e.offset} overlaps earlier data`);
    if (e.offset + e.data.length > virtualSize) throw new FormatError(`the image has data at offset ${e.offset}, past its ${virtualSize}-byte size`);
    end = e.offset + e.data.length;
    let pos = 0;
    while (pos < e.data.length) {
      const at = e.offset + pos;
      const index = Math.floor(at / BLOCK_SIZE);
      if (current && current.index !== index) {
        yield current;
        current = null;
      }
      current ??= { index, data: Buffer.alloc(BLOCK_SIZE) };
      const inBlock = at - index * BLOCK_SIZE;
      const n = Math.min(BLOCK_SIZE - inBlock, e.data.length - pos);
      e.data.copy(current.data, inBlock, pos, pos + n);
      pos += n;
    }
  }
  if (current) yield current;
}
