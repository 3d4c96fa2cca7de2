import type { DataSource } from "typeorm";
import { HASH_BYTES, hashOf, int8At, rows } from "../db/sql";
import type { Vault } from "../storage/vault";
import { ChunkCodec } from "../storage/codec";
import { mapOrdered } from "../storage/pipeline";
import { BLOCK_SIZE, type VolumeStore } from "../storage/volume-store";

const BATCH = 512;

/** Where captured blocks wait to be copied: a backup's or an image disk's rows. */
export interface PendingBlocks {
  table: "backup_blocks" | "image_blocks";
  ownerColumn: "backup_id" | "image_disk_id";
  ownerId: string;
  /** The disk whose volume segments hold the bytes. */
  diskId: string;
  projectId: string;
}

export async function countPending(ds: DataSource, p: PendingBlocks): Promise<number> {
  const [{ n }] = await rows<{ n: string }>(ds, `SELECT count(*) AS n FROM ${p.table} WHERE ${p.ownerColumn} = $1 AND src_segment IS NOT NULL`, [p.ownerId]);
  return Number(n);
}

/** Blocks read, compressed and packed as one unit: adjacent blocks of one segment. */
const RUN = 64;
/** Runs in flight at once: reads and compression of neighbours overlap. */
const INFLIGHT = 4;

interface Work {
  /** A run of adjacent blocks of one segment from `offset` on, their hashes back to back; none for a progress mark. */
  segment: string | null;
  offset: number;
  hashes: Buffer;
  /** Blocks this item accounts for in progress: a run's own, or a batch's not read. */
  counted: number;
}

/** One batch of captured blocks, packed: the last block, how many, and per segment the blocks the vault lacks. */
interface BatchRow {
  last: string | null;
  n: number;
  segment: string | null;
  /** Offsets in the segment (8 bytes each, ascending), and the blocks' hashes in the same order. */
  o: Buffer | null;
  h: Buffer | null;
}

/**
 * SQL: the next BATCH captured blocks after block $2 of owner $1, as rows per
 * segment of the distinct chunks the vault of project $3 lacks, in segment order.
 * Every row repeats the batch's last block and size; a batch with nothing to
 * read is one row without a segment.
 */
const batchSql = (p: PendingBlocks) => `WITH batch AS (
    SELECT block_index, hash, src_segment, src_offset FROM ${p.table}
     WHERE ${p.ownerColumn} = $1 AND src_segment IS NOT NULL AND block_index > $2 ORDER BY block_index LIMIT ${BATCH}
  ), missing AS (
    SELECT DISTINCT ON (hash) hash, src_segment, src_offset FROM batch b
     WHERE NOT EXISTS (SELECT 1 FROM vault_chunks c WHERE c.project_id = $3 AND c.hash = b.hash)
     ORDER BY hash, block_index
  )
  SELECT t.last, t.n, g.segment, g.o, g.h
    FROM (SELECT max(block_index) AS last, count(*)::int AS n FROM batch) AS t
    LEFT JOIN LATERAL (
      SELECT src_segment AS segment, string_agg(int8send(src_offset), ''::bytea ORDER BY src_offset) AS o, string_agg(hash, ''::bytea ORDER BY src_offset) AS h
        FROM missing GROUP BY src_segment
    ) AS g ON true`;

/**
 * Copies captured blocks into the vault. Blocks whose chunk the vault already
 * holds are not read at all; the rest are read from their volume segments (one
 * range read per run of adjacent blocks), compressed on the codec's workers and
 * packed, with a few runs in flight at once. Returns the bytes added to the
 * vault. The rows keep their source until the caller marks them done in the same
 * transaction that makes the result visible. Nothing per block lives as an
 * object of its own beyond a run.
 */
export async function copyPendingBlocks(
  ds: DataSource,
  volumes: VolumeStore,
  vault: Vault,
  p: PendingBlocks,
  afterBatch: (blocks: number) => Promise<void>,
  /** Throws to stop; called between runs so cancellation lands within a few reads. */
  check: () => void = () => undefined,
): Promise<number> {
  const writer = vault.writer(p.projectId);
  const sql = batchSql(p);
  async function* work(): AsyncGenerator<Work> {
    let after = -1;
    for (;;) {
      const found = await rows<BatchRow>(ds, sql, [p.ownerId, after, p.projectId]);
      if (!found[0].n) return;
      after = Number(found[0].last);
      let read = 0;
      for (const { segment, o, h } of found) {
        if (!segment || !o || !h) continue;
        const n = o.length / 8;
        const offset = (k: number) => int8At(o, k);
        let i = 0;
        while (i < n) {
          // A chunk this job is writing already (from an earlier batch) is not read again.
          if (writer.has(h, i * HASH_BYTES)) {
            i++;
            continue;
          }
          let j = i + 1;
          while (j < n && j - i < RUN && offset(j) === offset(j - 1) + BLOCK_SIZE && !writer.has(h, j * HASH_BYTES)) j++;
          yield { segment, offset: offset(i), hashes: h.subarray(i * HASH_BYTES, j * HASH_BYTES), counted: j - i };
          read += j - i;
          i = j;
        }
      }
      // The blocks not read count once the batch's runs are through.
      if (found[0].n > read) yield { segment: null, offset: 0, hashes: Buffer.alloc(0), counted: found[0].n - read };
    }
  }
  const buffers = vault.codec.buffers;
  const compressRun = async (w: Work) => {
    if (!w.segment) return { w, packed: null };
    const blocks = w.hashes.length / HASH_BYTES;
    const data = buffers.take(blocks * BLOCK_SIZE);
    await volumes.readRunInto(p.diskId, w.segment, w.offset, data);
    return { w, packed: await vault.codec.compress(data, BLOCK_SIZE, undefined, buffers.take(ChunkCodec.bound(blocks, BLOCK_SIZE))) };
  };
  try {
    for await (const { w, packed } of mapOrdered(work(), INFLIGHT, compressRun)) {
      check();
      if (packed) {
        buffers.give(packed.data);
        await writer.addStored(packed.chunks.map((stored, k) => ({ hash: hashOf(w.hashes, k), stored, raw: BLOCK_SIZE, compressed: packed.compressed[k] })));
        buffers.give(packed.out);
      }
      if (w.counted) await afterBatch(w.counted);
    }
    await writer.flush();
  } catch (err) {
    await writer.abort();
    throw err;
  }
  return writer.storedBytes;
}

/** Fails unless every chunk the rows name is indexed in the vault; then drops their sources. */
export async function sealPending(q: import("../db/sql").Queryable, p: Omit<PendingBlocks, "diskId" | "ownerId"> & { ownerIds: string[] }): Promise<number> {
  const [{ missing }] = await rows<{ missing: string }>(
    q,
    `SELECT count(*) AS missing FROM ${p.table} x WHERE x.${p.ownerColumn} = ANY($1) AND x.hash IS NOT NULL
        AND NOT EXISTS (SELECT 1 FROM vault_chunks c WHERE c.project_id = $2 AND c.hash = x.hash)`,
    [p.ownerIds, p.projectId],
  );
  if (Number(missing) === 0) await q.query(`UPDATE ${p.table} SET src_segment = NULL, src_offset = NULL WHERE ${p.ownerColumn} = ANY($1) AND src_segment IS NOT NULL`, [p.ownerIds]);
  return Number(missing);
}
