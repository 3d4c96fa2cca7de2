import crypto from "node:crypto";
import type { DataSource } from "typeorm";
import { AdvisoryLock } from "../db/locks";
import { list, listOf, rows } from "../db/sql";
import type { BlobWriter } from "./blob-store";
import { dropIntents, intendBlob } from "./pending-blobs";
import { BLOCK_SIZE, SEGMENT_BYTES, SEGMENT_UNHELD, segmentKey, type VolumeStore } from "./volume-store";

/**
 * SQL: segment `s` is dead or sparse, its live blocks under half of it. The
 * partial index ix_volume_segments_sparse has this very predicate, so the pass
 * reads only such segments.
 */
const SPARSE = (s: string) => `${s}.live_blocks * ${2 * BLOCK_SIZE} < ${s}.size_bytes`;
/** Blocks copied with one range read. */
const RUN_BLOCKS = 64;

export interface CompactionResult {
  /** Segments deleted: dead ones, and the sparse ones whose blocks moved. */
  deleted: number;
  /** New segments written with the live blocks of sparse ones. */
  written: number;
  /** Bytes of blobs deleted, and of live blocks copied. */
  freedBytes: number;
  movedBytes: number;
  /** Disks whose writer held them: their sparse segments wait for the next pass. */
  busyDisks: number;
}

interface SparseSegment {
  id: string;
  disk_id: string;
  project_id: string;
  size_bytes: string;
  live_blocks: string;
}

/**
 * Reclaims the space of overwritten blocks without scanning any block map:
 * segments that no block points at any more (volume_segments.live_blocks, kept
 * by triggers on disk_blocks) are deleted, and segments less than half live are
 * compacted: their live blocks are copied into a new segment and the block map
 * repointed in one transaction, only where a block still points at the old
 * place (a write made meanwhile wins). Repointing changes no content, so block
 * and disk write versions stay: the next incremental backup is no bigger.
 * Segments a running backup or image creation holds are left alone (see
 * SEGMENT_UNHELD). Returns null when another process is running a pass.
 */
export async function compactVolumes(ds: DataSource, volumes: VolumeStore, onError: (diskId: string, err: unknown) => void): Promise<CompactionResult | null> {
  const runner = ds.createQueryRunner();
  await runner.connect();
  try {
    const [{ locked }] = await runner.query(`SELECT pg_try_advisory_lock(${AdvisoryLock.COMPACTION_PASS}, 0) AS locked`);
    if (!locked) return null;
    try {
      return await compact(ds, volumes, onError);
    } finally {
      await runner.query(`SELECT pg_advisory_unlock(${AdvisoryLock.COMPACTION_PASS}, 0)`);
    }
  } finally {
    await runner.release();
  }
}

async function compact(ds: DataSource, volumes: VolumeStore, onError: (diskId: string, err: unknown) => void): Promise<CompactionResult> {
  const result: CompactionResult = { deleted: 0, written: 0, freedBytes: 0, movedBytes: 0, busyDisks: 0 };
  const found = await rows<SparseSegment>(
    ds,
    `SELECT s.id, s.disk_id, s.project_id, s.size_bytes, s.live_blocks FROM volume_segments s
      WHERE ${SPARSE("s")} AND ${SEGMENT_UNHELD("s")} ORDER BY s.disk_id, s.created_at`,
  );
  const sparse = new Map<string, SparseSegment[]>();
  for (const s of found) {
    if (Number(s.live_blocks) <= 0) {
      if (await volumes.deleteSegment(s.id, s.disk_id)) {
        result.deleted++;
        result.freedBytes += Number(s.size_bytes);
      }
      continue;
    }
    const of = sparse.get(s.disk_id) ?? [];
    of.push(s);
    sparse.set(s.disk_id, of);
  }
  for (const [diskId, segments] of sparse) {
    try {
      const done = await compactDisk(ds, volumes, diskId, segments, result);
      if (!done) result.busyDisks++;
    } catch (err) {
      onError(diskId, err);
    }
  }
  return result;
}

/**
 * Moves the live blocks of a disk's sparse segments into new segments, a group
 * filling at most one new segment at a time. Each group holds the disk's write
 * lock while it is copied and repointed, so repointing never interleaves with a
 * write of the same blocks and a writer waits for one group at most; when a
 * writer holds the disk, the rest waits for the next pass (returns false).
 */
async function compactDisk(ds: DataSource, volumes: VolumeStore, diskId: string, segments: SparseSegment[], result: CompactionResult): Promise<boolean> {
  const groups: SparseSegment[][] = [];
  let live = 0;
  for (const s of segments) {
    const blocks = Number(s.live_blocks);
    if (!groups.length || (live + blocks) * BLOCK_SIZE > SEGMENT_BYTES) {
      groups.push([]);
      live = 0;
    }
    groups[groups.length - 1].push(s);
    live += blocks;
  }
  const runner = ds.createQueryRunner();
  await runner.connect();
  try {
    for (const group of groups) {
      const [{ locked }] = await runner.query(`SELECT pg_try_advisory_lock(${AdvisoryLock.DISK}, hashtext($1)) AS locked`, [diskId]);
      if (!locked) return false;
      try {
        await moveLive(ds, volumes, diskId, group, result);
      } finally {
        await runner.query(`SELECT pg_advisory_unlock(${AdvisoryLock.DISK}, hashtext($1))`, [diskId]);
      }
    }
    return true;
  } finally {
    await runner.release();
  }
}

/** Copies the blocks still pointing into `group` to one new segment, repoints them, then deletes the old segments. */
async function moveLive(ds: DataSource, volumes: VolumeStore, diskId: string, found: SparseSegment[], result: CompactionResult): Promise<void> {
  // A backup or image started since the pass began may hold some now: moving their blocks would only add a copy.
  const unheld = new Set((await rows<{ id: string }>(ds, `SELECT s.id FROM volume_segments s WHERE s.id = ANY($1::uuid[]) AND ${SEGMENT_UNHELD("s")}`, [found.map((s) => s.id)])).map((r) => r.id));
  const group = found.filter((s) => unheld.has(s.id));
  if (!group.length) return;
  // Blocks with equal bytes may share a place in a segment: each place is copied once.
  const places = await rows<{ s: string; o: string }>(
    ds,
    `SELECT DISTINCT segment_id AS s, segment_offset AS o FROM disk_blocks
      WHERE disk_id = $1 AND segment_id = ANY($2::uuid[]) ORDER BY 1, 2`,
    [diskId, group.map((s) => s.id)],
  );
  const from = { segments: [] as string[], offsets: [] as number[] };
  const to: number[] = [];
  let writer: BlobWriter | null = null;
  const id = crypto.randomUUID();
  const buf = Buffer.allocUnsafe(RUN_BLOCKS * BLOCK_SIZE);
  let size = 0;
  const key = segmentKey(diskId, id);
  try {
    if (places.length) {
      await intendBlob(ds, key);
      writer = await volumes.blobs.openWriter(key);
    }
    let i = 0;
    while (i < places.length) {
      let j = i + 1;
      while (j < places.length && j - i < RUN_BLOCKS && places[j].s === places[i].s && Number(places[j].o) === Number(places[j - 1].o) + BLOCK_SIZE) j++;
      const run = buf.subarray(0, (j - i) * BLOCK_SIZE);
      await volumes.readRunInto(diskId, places[i].s, Number(places[i].o), run);
      await writer!.write(run);
      for (let k = i; k < j; k++) {
        from.segments.push(places[k].s);
        from.offsets.push(Number(places[k].o));
        to.push(size);
        size += BLOCK_SIZE;
      }
      i = j;
    }
    if (writer) await writer.close();
  } catch (err) {
    await writer?.abort().catch(() => undefined);
    await dropIntents(ds, [key]).catch(() => undefined);
    throw err;
  }
  if (writer) {
    await ds.transaction(async (em) => {
      await volumes.insertSegment(em, group[0].project_id, diskId, { id, size });
      // Only blocks still where they were copied from; versions stay, for no content changed.
      await em.query(
        `UPDATE disk_blocks b SET segment_id = $2, segment_offset = m.n
           FROM unnest($3::uuid[], ${listOf("$4", "bigint")}, ${listOf("$5", "bigint")}) AS m(s, o, n)
          WHERE b.disk_id = $1 AND b.segment_id = m.s AND b.segment_offset = m.o`,
        [diskId, id, from.segments, list(from.offsets), list(to)],
      );
    });
    result.written++;
    result.movedBytes += size;
  }
  for (const s of group) {
    if (await volumes.deleteSegment(s.id, diskId)) {
      result.deleted++;
      result.freedBytes += Number(s.size_bytes);
    }
  }
}
