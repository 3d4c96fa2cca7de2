import type { DataSource } from "typeorm";
import { rows } from "../db/sql";
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

interface Pending {
  block_index: string;
  hash: Buffer;
  src_segment: string;
  src_offset: string;
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
  /** Adjacent blocks of one segment, or none for a progress mark. */
  blocks: Pending[];
  /** Blocks this item accounts for in progress: a run's own, or a batch's already in the vault. */
  counted: number;
}

/**
 * Copies captured blocks into the vault. Blocks whose chunk the vault already
 * holds are not read at all; the rest are read from their volume segments (one
 * range read per run of adjacent blocks), compressed on the codec's workers and
 * packed, with a few runs in flight at once. Returns the bytes added to the
 * vault. The rows keep their source until the caller marks them done in the same
 * transaction that makes the result visible.
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
  async function* work(): AsyncGenerator<Work> {
    let after = -1;
    for (;;) {
      const batch = await rows<Pending>(
        ds,
        `SELECT block_index, hash, src_segment, src_offset FROM ${p.table}
          WHERE ${p.ownerColumn} = $1 AND src_segment IS NOT NULL AND block_index > $2 ORDER BY block_index LIMIT ${BATCH}`,
        [p.ownerId, after],
      );
      if (!batch.length) return;
      after = Number(batch[batch.length - 1].block_index);
      const have = await vault.existing(p.projectId, batch.map((b) => b.hash));
      const missing = batch
        .filter((b) => !have.has(b.hash.toString("hex")) && !writer.has(b.hash))
        .sort((a, b) => (a.src_segment === b.src_segment ? Number(a.src_offset) - Number(b.src_offset) : a.src_segment < b.src_segment ? -1 : 1));
      let i = 0;
      while (i < missing.length) {
        let j = i + 1;
        while (j < missing.length && j - i < RUN && missing[j].src_segment === missing[i].src_segment && Number(missing[j].src_offset) === Number(missing[j - 1].src_offset) + BLOCK_SIZE) j++;
        yield { blocks: missing.slice(i, j), counted: j - i };
        i = j;
      }
      // The blocks the vault already held count once the batch's runs are through.
      if (batch.length > missing.length) yield { blocks: [], counted: batch.length - missing.length };
    }
  }
  const buffers = vault.codec.buffers;
  const compressRun = async (w: Work) => {
    if (!w.blocks.length) return { w, packed: null };
    const first = w.blocks[0];
    const data = buffers.take(w.blocks.length * BLOCK_SIZE);
    await volumes.readRunInto(p.diskId, first.src_segment, Number(first.src_offset), data);
    return { w, packed: await vault.codec.compress(data, BLOCK_SIZE, undefined, buffers.take(ChunkCodec.bound(w.blocks.length, BLOCK_SIZE))) };
  };
  try {
    for await (const { w, packed } of mapOrdered(work(), INFLIGHT, compressRun)) {
      check();
      if (packed) {
        buffers.give(packed.data);
        await writer.addStored(w.blocks.map((b, k) => ({ hash: b.hash, stored: packed.chunks[k], raw: BLOCK_SIZE, compressed: packed.compressed[k] })));
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
