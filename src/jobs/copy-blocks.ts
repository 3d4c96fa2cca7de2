import type { DataSource } from "typeorm";
import { rows } from "../db/sql";
import type { Vault } from "../storage/vault";
import type { VolumeStore } from "../storage/volume-store";

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

/**
 * Copies captured blocks into the vault. Blocks whose chunk the vault already
 * holds are not read at all; the rest are read from their volume segments (one
 * range read per run), compressed and packed. Returns the bytes added to the
 * vault. The rows keep their source until the caller marks them done in the same
 * transaction that makes the result visible.
 */
export async function copyPendingBlocks(
  ds: DataSource,
  volumes: VolumeStore,
  vault: Vault,
  p: PendingBlocks,
  afterBatch: (blocks: number) => Promise<void>,
  /** Throws to stop; called between blocks so cancellation lands within one batch's reads. */
  check: () => void = () => undefined,
): Promise<number> {
  const writer = vault.writer(p.projectId);
  let after = -1;
  for (;;) {
    const batch = await rows<Pending>(
      ds,
      `SELECT block_index, hash, src_segment, src_offset FROM ${p.table}
        WHERE ${p.ownerColumn} = $1 AND src_segment IS NOT NULL AND block_index > $2 ORDER BY block_index LIMIT ${BATCH}`,
      [p.ownerId, after],
    );
    if (!batch.length) break;
    after = Number(batch[batch.length - 1].block_index);
    const have = await vault.existing(p.projectId, batch.map((b) => b.hash));
    const missing = batch
      .filter((b) => !have.has(b.hash.toString("hex")) && !writer.has(b.hash))
      .sort((a, b) => (a.src_segment === b.src_segment ? Number(a.src_offset) - Number(b.src_offset) : a.src_segment < b.src_segment ? -1 : 1));
    const data = await volumes.readRefs(p.diskId, missing.map((m) => ({ segmentId: m.src_segment, offset: Number(m.src_offset) })));
    for (let i = 0; i < missing.length; i += 64) {
      check();
      await writer.addMany(missing.slice(i, i + 64).map((m, k) => ({ hash: m.hash, raw: data[i + k] })));
    }
    await afterBatch(batch.length);
  }
  await writer.flush();
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
