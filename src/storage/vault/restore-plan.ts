import { int8At, rows, type Queryable } from "../../db/sql";
import { between, viewCtes } from "../clones";
import { manifestOf, type BlockSource } from "../manifest";
import type { PackChunks } from "./chunk";
import { CHUNK_AT, PACKED_CHUNKS, readPackedChunks, type PackedChunksRow } from "./chunk-index";

/**
 * Chunks of one pack to write, with the blocks that take each: chunk k's blocks
 * are `blocks[starts[k]]` up to `blocks[starts[k + 1]]`.
 */
export interface PackToWrite extends PackChunks {
  blocks: Float64Array;
  starts: Uint32Array;
}

/** One batch of a restore: the packs to read, and the blocks that become zeros. */
export interface RestoreBatch {
  packs: PackToWrite[];
  zero: Float64Array;
}

/**
 * SQL: CTEs over the blocks [$2, $3] of disk $4 and what they must read as, `m`
 * (block_index, hash; a null hash reads as zeros): `now`, the disk's blocks
 * holding data, and `w`, the blocks to write, whose hash differs.
 */
const diffOf = (source: BlockSource) => `${manifestOf(source)}, ${viewCtes("$4", between("$2", "$3"))},
    now AS (SELECT block_index, hash FROM view WHERE hash IS NOT NULL),
    w AS (SELECT m.block_index, m.hash FROM m LEFT JOIN now USING (block_index) WHERE m.hash IS NOT NULL AND m.hash IS DISTINCT FROM now.hash)`;

/**
 * SQL: the plan of one batch as a few rows: per pack, its chunks to read
 * (PACKED_CHUNKS) with, for each, the blocks that take it (`b`, 8 bytes each)
 * and how many (`bn`); then one row of the blocks to zero (`zero`). Blocks with
 * the same bytes share one chunk, read once. Nothing per block reaches
 * JavaScript as an object of its own.
 */
const planSql = (source: BlockSource) => `${diffOf(source)},
    need AS (SELECT hash, string_agg(int8send(block_index), ''::bytea ORDER BY block_index) AS blocks, count(*)::int AS n FROM w GROUP BY hash)
  SELECT ${PACKED_CHUNKS("need.hash")},
         string_agg(need.blocks, ''::bytea ORDER BY c.pack_offset) AS b, string_agg(int4send(need.n), ''::bytea ORDER BY c.pack_offset) AS bn, NULL::bytea AS zero
    FROM need LEFT JOIN LATERAL (${CHUNK_AT("$5", "need.hash")}) AS c ON true
   GROUP BY c.pack_id
  UNION ALL
  SELECT NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, string_agg(int8send(block_index), ''::bytea ORDER BY block_index)
    FROM now WHERE NOT EXISTS (SELECT 1 FROM m WHERE m.block_index = now.block_index AND m.hash IS NOT NULL)`;

/** The numbers of a bytea of int8send() values (none for null). */
function int8s(buf: Buffer | null): Float64Array {
  const out = new Float64Array(buf ? buf.length / 8 : 0);
  for (let k = 0; k < out.length; k++) out[k] = int8At(buf!, k);
  return out;
}

/** How many blocks of [first, last] of disk `diskId` differ from `source`: the blocks a restore writes there. */
export async function countRestoreBlocks(q: Queryable, source: BlockSource, diskId: string, first: number, last: number): Promise<number> {
  const [{ n }] = await rows<{ n: number }>(q, `${diffOf(source)} SELECT count(*)::int AS n FROM w`, [source.imageDiskId ?? source.backupId, first, last, diskId]);
  return n;
}

/**
 * What makes blocks [first, last] of disk `diskId` read as `source`, compared by
 * hash without reading the disk: the chunks of the project's vault to read,
 * grouped by pack in pack order with the blocks each one takes, and the blocks
 * to zero. One statement. ChunkError when the vault lacks a chunk, before
 * anything is read.
 */
export async function planRestore(q: Queryable, projectId: string, source: BlockSource, diskId: string, first: number, last: number): Promise<RestoreBatch> {
  const found = await rows<PackedChunksRow & { b: Buffer | null; bn: Buffer | null; zero: Buffer | null }>(q, planSql(source), [source.imageDiskId ?? source.backupId, first, last, diskId, projectId]);
  // The row of blocks to zero is the one without hashes (a row of chunks the vault lacks has them).
  const zeroRow = found.findIndex((r) => r.pack === null && r.h === null);
  const zero = int8s(found[zeroRow]?.zero ?? null);
  if (zeroRow >= 0) found.splice(zeroRow, 1);
  const packs = readPackedChunks(found).map((chunks, k): PackToWrite => {
    const r = found[k];
    const starts = new Uint32Array(chunks.raw.length + 1);
    for (let j = 0; j < chunks.raw.length; j++) starts[j + 1] = starts[j] + r.bn!.readInt32BE(j * 4);
    return { ...chunks, blocks: int8s(r.b), starts };
  });
  return { packs, zero };
}
