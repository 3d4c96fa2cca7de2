import { BLOCK_SIZE, FormatError, type Extent } from "./types";

/** Blocks per group. */
const GROUP_BLOCKS = 64;

export interface BlockGroup {
  /** Block indexes, ascending; block k's bytes are at k * BLOCK_SIZE in `data`. */
  indexes: number[];
  data: Buffer;
}

/**
 * Regroups a reader's extents (any size, ascending) into groups of up to 64 whole
 * 64 KiB blocks, each group in a buffer from `take` (the caller may reuse it once
 * done). Blocks no extent touches are left out; a block an extent covers in part
 * is zero elsewhere.
 */
export async function* groupBlocks(extents: AsyncIterable<Extent>, virtualSize: number, take: (bytes: number) => Buffer): AsyncIterable<BlockGroup> {
  let group: BlockGroup | null = null;
  let end = 0;
  for await (const e of extents) {
    if (e.offset < end) throw new FormatError(`the image's data at offset ${e.offset} overlaps earlier data`);
    if (e.offset + e.data.length > virtualSize) throw new FormatError(`the image has data at offset ${e.offset}, past its ${virtualSize}-byte size`);
    end = e.offset + e.data.length;
    let pos = 0;
    while (pos < e.data.length) {
      const at = e.offset + pos;
      const index = Math.floor(at / BLOCK_SIZE);
      if (!group || group.indexes[group.indexes.length - 1] !== index) {
        if (group && group.indexes.length === GROUP_BLOCKS) {
          yield group;
          group = null;
        }
        group ??= { indexes: [], data: take(GROUP_BLOCKS * BLOCK_SIZE) };
        const slot = group.indexes.length;
        group.indexes.push(index);
        group.data.fill(0, slot * BLOCK_SIZE, (slot + 1) * BLOCK_SIZE);
      }
      const slot = group.indexes.length - 1;
      const inBlock = at - index * BLOCK_SIZE;
      const n = Math.min(BLOCK_SIZE - inBlock, e.data.length - pos);
      e.data.copy(group.data, slot * BLOCK_SIZE + inBlock, pos, pos + n);
      pos += n;
    }
  }
  if (group) yield { indexes: group.indexes, data: group.data.subarray(0, group.indexes.length * BLOCK_SIZE) };
}
