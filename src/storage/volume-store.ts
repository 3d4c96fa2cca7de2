import crypto from "node:crypto";
import { QueryFailedError, type DataSource, type EntityManager } from "typeorm";
import { AdvisoryLock } from "../db/locks";
import { HASH_BYTES, hashAt, list, listOf, rows } from "../db/sql";
import { TERMINAL_JOB_STATUSES_SQL } from "../domain/jobs";
import { BLOCK_SIZE, isZeros } from "../formats/types";
import { BlobNotFoundError, type BlobStore, type BlobWriter } from "./blob-store";
import { BufferPool } from "./buffer-pool";
import { between, IS_CLONE, lockDisk, viewCtes } from "./clones";
import { HashList } from "./hash-list";
import { abandoned, dropIntents, fulfilling, INDEXED_OR_PENDING, intendBlob, pendingUnder } from "./pending-blobs";

/** Disks are made of 64 KiB blocks: the unit of sparse storage, change tracking and dedup. */
export { BLOCK_SIZE };
/** Segments of one write being made durable at once, while the next fills. */
const CLOSING_SEGMENTS = 3;
/** A segment blob holds up to this many bytes of one write. */
export const SEGMENT_BYTES = 64 * 1024 * 1024;
/** Blocks read per step of a stream: 4 MiB, so a slow reader holds little. */
const READ_BATCH_BLOCKS = 64;

export const sha256 = (data: Buffer) => crypto.createHash("sha256").update(data).digest();

/** Where a block holding data is: in a segment of the disk, or (segmentId null) in the vault, a clone's source block named by its hash. */
export interface BlockRef {
  index: number;
  segmentId: string | null;
  offset: number;
  hash: Buffer;
  /** A block in the vault: the project whose chunk it reads. */
  projectId?: string;
}

/** Reads chunks of a project's vault (a clone's blocks it has not written), checked; copied out of, never into. */
export interface VaultBlockReader {
  read(projectId: string, hashes: Buffer[], ahead?: Buffer[]): Promise<Buffer[]>;
}

/**
 * Blocks to store from one buffer: `data` holds 64 KiB pieces, `hashes` the
 * SHA-256 of each piece back to back; block `indexes[k]` takes piece `slots[k]`,
 * and blocks with equal bytes may share one. `release` is called once the bytes
 * are taken and the buffer may be reused.
 */
export interface BlockBatch {
  data: Buffer;
  hashes: Uint8Array;
  indexes: ArrayLike<number>;
  slots: ArrayLike<number>;
  release?(): void;
}

/** The blocks of one segment, as parallel lists (no object per block). */
interface SegmentBlocks {
  indexes: number[];
  offsets: number[];
  hashes: HashList;
}

/** A block to store: its bytes, or null for a block that reads as zeros; its SHA-256 when already known. */
export interface BlockWrite {
  index: number;
  data: Buffer | null;
  hash?: Buffer;
}

export const segmentKey = (diskId: string, segmentId: string) => `volumes/${diskId}/${segmentId}`;

/**
 * SQL: the blocks of one write as rows (i block_index, s segment_id, o segment_offset,
 * h hash), s null for a block that becomes zeros; its five parameters (segmentParams) start at $`first`.
 */
function blocksOf(first: number): string {
  const p = (k: number) => `$${first + k}`;
  return `SELECT b.i, ${p(0)}::uuid AS s, b.o, ${hashAt(p(3), "b.n")} AS h FROM unnest(${listOf(p(1), "bigint")}, ${listOf(p(2), "bigint")}) WITH ORDINALITY AS b(i, o, n)
    UNION ALL SELECT z.i, NULL, NULL, NULL FROM unnest(${listOf(p(4), "bigint")}) AS z(i)`;
}

const segmentParams = (segment: { id: string; blocks: SegmentBlocks } | null, zeros: number[]): unknown[] => [
  segment?.id ?? null,
  segment ? list(segment.blocks.indexes) : "",
  segment ? list(segment.blocks.offsets) : "",
  segment?.blocks.hashes.bytes ?? Buffer.alloc(0),
  list(zeros),
];

/** SQL: the write version of disk $1 (after applyBlocks bumped it, in the same transaction). */
const VERSION = `(SELECT write_version FROM disks WHERE id = $1)`;

/**
 * Points blocks of disk $1 at new bytes, as one new write version of the disk:
 * `blocks` is SQL giving rows (i, s, o, h) as blocksOf does, its parameters
 * `params` from $2 on. Writes and the publishing of staged blocks both go
 * through here; besides these, only hydration (fillBlocks, which adds blocks a clone has
 * no row for) and an instant restore (restoreAsClone, which drops rows) change disk_blocks.
 */
async function applyBlocks(em: EntityManager, diskId: string, blocks: string, params: unknown[], zeros = true): Promise<void> {
  const args = [diskId, ...params];
  // Used bytes grow by the blocks that now hold data and shrink by those that held it before. The rows
  // before are looked up by key (`= ANY` of the block list), whatever the statistics say: as a join,
  // while the statistics were behind a disk that had grown (any disk being filled), the planner read
  // every row of the disk for each commit, a cost that grew with what the disk holds.
  const [{ clone }] = await rows<{ clone: boolean }>(
    em,
    `WITH x AS (${blocks})
     UPDATE disks d SET write_version = write_version + 1,
            used_bytes = used_bytes + ${BLOCK_SIZE} * ((SELECT count(*) FROM x WHERE x.s IS NOT NULL)
                                      - (SELECT count(*) FROM disk_blocks b WHERE b.disk_id = $1 AND b.block_index = ANY(ARRAY(SELECT x.i FROM x)) AND b.hash IS NOT NULL))
      WHERE id = $1 RETURNING ${IS_CLONE("d")} AS clone`,
    args,
  );
  // A clone's blocks with no row of their own read as its source's: those held data too.
  if (clone) {
    await em.query(
      `WITH RECURSIVE x AS (${blocks}), ${viewCtes("$1", (c) => `${c} = ANY(ARRAY(SELECT i FROM x))`)}
       UPDATE disks SET used_bytes = used_bytes - ${BLOCK_SIZE} * (SELECT count(*) FROM view v WHERE v.segment_id IS NULL AND v.hash IS NOT NULL) WHERE id = $1`,
      args,
    );
  }
  await em.query(
    `INSERT INTO disk_blocks (disk_id, block_index, segment_id, segment_offset, hash, version)
     SELECT $1, x.i, x.s, x.o, x.h, ${VERSION} FROM (${blocks}) AS x WHERE x.s IS NOT NULL
     ON CONFLICT (disk_id, block_index) DO UPDATE
       SET segment_id = EXCLUDED.segment_id, segment_offset = EXCLUDED.segment_offset, hash = EXCLUDED.hash, version = EXCLUDED.version`,
    args,
  );
  // Zeroing a block that was never written changes nothing; a written one keeps a tombstone
  // so the next incremental backup sees the change. (`zeros` false: the blocks zero nothing.)
  if (!zeros) return;
  await em.query(
    `UPDATE disk_blocks b SET segment_id = NULL, segment_offset = NULL, hash = NULL, version = ${VERSION}
      WHERE b.disk_id = $1 AND b.block_index = ANY(ARRAY(SELECT x.i FROM (${blocks}) AS x WHERE x.s IS NULL)) AND b.hash IS NOT NULL`,
    args,
  );
  // A clone's block with no row reads as its source's: zeroing it takes a tombstone of its own.
  if (clone) {
    await em.query(
      `INSERT INTO disk_blocks (disk_id, block_index, segment_id, segment_offset, hash, version)
       SELECT $1, x.i, NULL, NULL, NULL, ${VERSION} FROM (${blocks}) AS x WHERE x.s IS NULL
       ON CONFLICT (disk_id, block_index) DO NOTHING`,
      args,
    );
  }
}

/**
 * SQL: true when nothing but a disk's block map may read segment `s` (an alias
 * of volume_segments): no running backup or image creation holds blocks of it
 * captured at an instant, and no restore has staged blocks in it (collectGarbage
 * drops the staged rows of jobs that ended first). Whatever else comes to read
 * segments by reference adds its NOT EXISTS here; deletion and compaction both ask this.
 */
export const SEGMENT_UNHELD = (s: string) =>
  `NOT EXISTS (SELECT 1 FROM backup_blocks bb WHERE bb.src_segment = ${s}.id)
   AND NOT EXISTS (SELECT 1 FROM image_blocks ib WHERE ib.src_segment = ${s}.id)
   AND NOT EXISTS (SELECT 1 FROM staged_blocks sb WHERE sb.segment_id = ${s}.id)`;

/** Attempts of a read whose segment compaction deleted under it (each with fresh block refs). */
const READ_ATTEMPTS = 3;

/** A hydration's blocks came from a source a restore has replaced since, or the disk is gone (`gone`): they were not stored. */
export class DiskReplacedError extends Error {
  constructor(
    readonly diskId: string,
    readonly gone: boolean,
  ) {
    super(gone ? "the disk was deleted while it was hydrated" : "the disk was restored while it was hydrated");
  }
}

/**
 * The bytes of disks. Writes append blocks to a new segment blob; once the blob
 * is durable, one transaction points the disk's block map at it and bumps the
 * disk's write version, which records durably which blocks changed. Nothing is
 * overwritten in place, so a backup that captured the block map keeps reading
 * the bytes of its instant while writes go on.
 */
export class VolumeStore {
  /** Buffers of reads (two per read in progress). */
  private readonly buffers = new BufferPool(4);
  private readonly changeListeners = new Set<(diskId: string, source: unknown) => void>();

  constructor(
    private readonly ds: DataSource,
    readonly blobs: BlobStore,
    /** Where a clone's blocks it has not written are read from. */
    private readonly vault?: VaultBlockReader,
  ) {}

  /**
   * Stores whole blocks from an async source, in segments of about SEGMENT_BYTES,
   * committing each segment's blocks as one write; a segment is made durable and
   * committed while the next one fills. Blocks of all zeros cost nothing: they
   * only mark the block as reading zeros. Returns the number of blocks changed.
   */
  async putBlocks(
    projectId: string,
    diskId: string,
    blocks: AsyncIterable<BlockWrite | BlockBatch>,
    opts: {
      onCommit?: (blocks: number) => void | Promise<void>;
      /** A bulk write nobody reads soon (a restore): skip the OS cache. */
      bypassCache?: boolean;
      /** Stage the blocks under this job instead of changing the disk: publish() makes them the disk's, all at once. */
      stage?: string;
      /**
       * Hydration: the blocks are a clone's source blocks, copied into its own storage. Each
       * becomes the disk's only where it still has no row of its own (a write made meanwhile
       * wins), as version 0: the disk's content, used bytes and changes since its backups stay.
       * `restores`: the restores the disk had when the blocks were looked up; a restore since
       * replaced the source they come from, and the fill fails with DiskReplacedError.
       */
      fill?: { restores: number };
      /** Runs in the transaction of the last commit (in one of its own when there is nothing to commit). */
      finish?: (em: EntityManager) => Promise<void>;
      /** Runs first in the transaction of every commit (a writer takes the disk's lock and checks it may still write). */
      begin?: (em: EntityManager) => Promise<void>;
      /** Each commit waits for this, after its segment is durable: the commits of writes made one after another stay in order. Its failure fails this call. */
      after?: Promise<unknown>;
      /** Who writes, as change listeners hear it (a writer that keeps its own block map up to date ignores its own commits). */
      source?: unknown;
      /** Told where each commit put its blocks (`zeros`: blocks that now read as zeros), once it is committed. */
      onStored?: (segmentId: string | null, indexes: readonly number[], offsets: readonly number[], zeros: readonly number[]) => void;
    } = {},
  ): Promise<number> {
    const { onCommit } = opts;
    let changed = 0;
    let segment: { id: string; writer: BlobWriter; size: number; blocks: SegmentBlocks } | null = null;
    /** Single blocks wait here to be written together. */
    let parts: Buffer[] = [];
    let zeros: number[] = [];
    /** Segments being made durable and committed, oldest first; their commits go in order. */
    const closing: Promise<void>[] = [];
    /** Keys of segments opened and not yet committed: pending, so no collector takes them meanwhile. */
    const pending = new Set<string>();

    const open = async () => {
      const id = crypto.randomUUID();
      await intendBlob(this.ds, segmentKey(diskId, id));
      pending.add(segmentKey(diskId, id));
      segment = {
        id,
        writer: await this.blobs.openWriter(segmentKey(diskId, id), { bypassCache: opts.bypassCache }),
        size: 0,
        blocks: { indexes: [], offsets: [], hashes: new HashList(SEGMENT_BYTES / BLOCK_SIZE) },
      };
      return segment;
    };
    /** The segment's one write in flight: the next blocks are hashed while it runs. */
    let writing: Promise<void> | null = null;
    const writeDone = async () => {
      const w = writing;
      writing = null;
      await w;
    };
    const writeParts = async () => {
      await writeDone();
      if (segment && parts.length) {
        writing = segment.writer.write(parts);
        writing.catch(() => undefined); // awaited before the next write, or by drainParts
      }
      parts = [];
    };
    /** Writes what waits and waits for it. */
    const drainParts = async () => {
      await writeParts();
      await writeDone();
    };
    const flush = async (last = false) => {
      await drainParts();
      let seg = segment as typeof segment;
      const z = zeros;
      segment = null;
      zeros = [];
      const end = last ? opts.finish : undefined;
      if (!seg?.blocks.indexes.length && !z.length) {
        if (seg) {
          await seg.writer.abort();
          await dropIntents(this.ds, [segmentKey(diskId, seg.id)]);
          pending.delete(segmentKey(diskId, seg.id));
          seg = null;
        }
        if (!end) return;
      }
      while (closing.length >= CLOSING_SEGMENTS) await closing.shift();
      const before = closing[closing.length - 1];
      const durable = seg ? seg.writer.close() : Promise.resolve(0);
      durable.catch(() => undefined); // awaited below
      const finish = async () => {
        await durable;
        await before; // commits stay in order
        await opts.after;
        const written = seg && seg.blocks.indexes.length ? { id: seg.id, size: seg.size, blocks: seg.blocks } : null;
        if (opts.stage) await this.stageBlocks(projectId, diskId, opts.stage, written, z);
        else if (opts.fill) await this.fillBlocks(projectId, diskId, opts.fill.restores, written, end);
        else {
          await this.commit(projectId, diskId, written, z, end, opts.source, opts.begin);
          opts.onStored?.(written?.id ?? null, written?.blocks.indexes ?? [], written?.blocks.offsets ?? [], z);
        }
        if (seg) {
          if (!written) await dropIntents(this.ds, [segmentKey(diskId, seg.id)]); // an empty blob, indexed by nothing
          pending.delete(segmentKey(diskId, seg.id));
        }
        const n = (seg?.blocks.indexes.length ?? 0) + z.length;
        changed += n;
        await onCommit?.(n);
      };
      const done = finish();
      done.catch(() => undefined); // awaited by a later flush or at the end
      closing.push(done);
    };

    try {
      for await (const item of blocks) {
        if ("slots" in item) {
          await drainParts();
          const seg = segment ?? (await open());
          for (let k = 0; k < item.indexes.length; k++) {
            seg.blocks.indexes.push(item.indexes[k]);
            seg.blocks.offsets.push(seg.size + item.slots[k] * BLOCK_SIZE);
            seg.blocks.hashes.push(item.hashes, item.slots[k] * HASH_BYTES);
          }
          await seg.writer.write([item.data]);
          seg.size += item.data.length;
          item.release?.();
        } else {
          if (item.data === null || (!item.hash && isZeros(item.data))) {
            zeros.push(item.index);
            if (zeros.length >= 4096) await flush();
            continue;
          }
          if (item.data.length !== BLOCK_SIZE) throw new Error("a block must be exactly BLOCK_SIZE bytes");
          const seg = segment ?? (await open());
          seg.blocks.indexes.push(item.index);
          seg.blocks.offsets.push(seg.size);
          seg.blocks.hashes.push(item.hash ?? sha256(item.data));
          seg.size += BLOCK_SIZE;
          parts.push(item.data);
          if (parts.length >= 16) await writeParts();
        }
        if ((segment as { size: number } | null) && segment!.size >= SEGMENT_BYTES) await flush();
      }
      await flush(true);
      while (closing.length) await closing.shift();
    } catch (err) {
      await (writing as Promise<void> | null)?.catch(() => undefined);
      const seg = segment as { writer: BlobWriter } | null;
      if (seg) await seg.writer.abort();
      await Promise.allSettled(closing);
      await dropIntents(this.ds, pending).catch(() => undefined); // then they are garbage like any unindexed blob
      throw err;
    }
    return changed;
  }

  private async commit(
    projectId: string,
    diskId: string,
    segment: { id: string; size: number; blocks: SegmentBlocks } | null,
    zeros: number[],
    finish?: (em: EntityManager) => Promise<void>,
    source?: unknown,
    begin?: (em: EntityManager) => Promise<void>,
  ): Promise<void> {
    const changes = Boolean(segment || zeros.length);
    await this.ds.transaction(async (em) => {
      await begin?.(em);
      if (segment) await this.insertSegment(em, projectId, diskId, segment);
      if (changes) await applyBlocks(em, diskId, blocksOf(2), segmentParams(segment, zeros), zeros.length > 0);
      await finish?.(em);
    });
    if (changes) for (const listener of this.changeListeners) listener(diskId, source);
  }

  /** Hydration's commit (see putBlocks' `fill`): the segment, and its blocks where the disk has none of its own. */
  private async fillBlocks(
    projectId: string,
    diskId: string,
    restores: number,
    segment: { id: string; size: number; blocks: SegmentBlocks } | null,
    finish?: (em: EntityManager) => Promise<void>,
  ): Promise<void> {
    await this.ds.transaction(async (em) => {
      await lockDisk(em, diskId);
      const [disk] = await rows<{ restores: number }>(em, `SELECT restores FROM disks WHERE id = $1`, [diskId]);
      if (disk?.restores !== restores) throw new DiskReplacedError(diskId, !disk);
      if (segment) {
        await this.insertSegment(em, projectId, diskId, segment);
        await em.query(
          `INSERT INTO disk_blocks (disk_id, block_index, segment_id, segment_offset, hash, version)
           SELECT $1, x.i, x.s, x.o, x.h, 0 FROM (${blocksOf(2)}) AS x WHERE x.s IS NOT NULL
           ON CONFLICT (disk_id, block_index) DO NOTHING`,
          [diskId, ...segmentParams(segment, [])],
        );
      }
      await finish?.(em);
    });
    if (segment) for (const listener of this.changeListeners) listener(diskId, undefined);
  }

  /** Told, in this process, of every write committed to a disk and by whom (before the writer hears it is done): whoever keeps a disk's block map drops it. */
  onChange(listener: (diskId: string, source: unknown) => void): () => void {
    this.changeListeners.add(listener);
    return () => this.changeListeners.delete(listener);
  }

  /** Indexes a durable segment written by this store, in the transaction that points blocks at it; it stops being pending. */
  async insertSegment(em: EntityManager, projectId: string, diskId: string, segment: { id: string; size: number }): Promise<void> {
    // One round trip: a commit's statements wait for a busy event loop's turn each.
    const key = segmentKey(diskId, segment.id);
    const done = await rows(
      em,
      `WITH done AS (${fulfilling("$5")})
       INSERT INTO volume_segments (id, project_id, disk_id, size_bytes) SELECT $1, $2, $3, $4 FROM done RETURNING id`,
      [segment.id, projectId, diskId, segment.size, key],
    );
    if (!done.length) throw abandoned(key);
  }

  /**
   * Records a durable segment's blocks (and blocks that become zeros) as staged by
   * `jobId`, leaving the disk as it is; a block staged again takes its latest bytes.
   */
  private async stageBlocks(projectId: string, diskId: string, jobId: string, segment: { id: string; size: number; blocks: SegmentBlocks } | null, zeros: number[]): Promise<void> {
    await this.ds.transaction(async (em) => {
      if (segment) await this.insertSegment(em, projectId, diskId, segment);
      await em.query(
        `INSERT INTO staged_blocks (job_id, disk_id, block_index, segment_id, segment_offset, hash)
         SELECT $1, $2, x.i, x.s, x.o, x.h FROM (${blocksOf(3)}) AS x
         ON CONFLICT (job_id, disk_id, block_index) DO UPDATE
           SET segment_id = EXCLUDED.segment_id, segment_offset = EXCLUDED.segment_offset, hash = EXCLUDED.hash`,
        [jobId, diskId, ...segmentParams(segment, zeros)],
      );
    });
  }

  /**
   * Makes the blocks `jobId` staged on a disk the disk's, in the caller's
   * transaction (a job's fenced commit), with one write version; then drops them.
   * Set-based: the work grows with the blocks staged, not with the disk.
   */
  async publish(em: EntityManager, diskId: string, jobId: string): Promise<void> {
    await applyBlocks(em, diskId, `SELECT block_index AS i, segment_id AS s, segment_offset AS o, hash AS h FROM staged_blocks WHERE job_id = $2 AND disk_id = $1`, [jobId]);
    await em.query(`DELETE FROM staged_blocks WHERE job_id = $1 AND disk_id = $2`, [jobId, diskId]);
    // NBD writes journaled, or held in memory, and not yet in blocks were made to the bytes this replaces.
    await em.query(`DELETE FROM nbd_journal WHERE disk_id = $1`, [diskId]);
    await em.query(`UPDATE disks SET restores = restores + 1 WHERE id = $1`, [diskId]);
  }

  /** Drops what a job staged (it failed or was cancelled); its segments become garbage. */
  async discardStaged(q: EntityManager | DataSource, jobId: string): Promise<void> {
    await q.query(`DELETE FROM staged_blocks WHERE job_id = $1`, [jobId]);
  }

  /**
   * Runs `fn` holding the disk's write lock (a Postgres advisory lock, so it holds
   * across processes): writes and restores of one disk happen one at a time.
   */
  async withDiskLock<T>(diskId: string, fn: () => Promise<T>): Promise<T> {
    const runner = this.ds.createQueryRunner();
    await runner.connect();
    try {
      await runner.query(`SELECT pg_advisory_lock(${AdvisoryLock.DISK}, hashtext($1))`, [diskId]);
      try {
        return await fn();
      } finally {
        await runner.query(`SELECT pg_advisory_unlock(${AdvisoryLock.DISK}, hashtext($1))`, [diskId]);
      }
    } finally {
      await runner.release();
    }
  }

  /** The blocks of [first, last] that hold data, in block order: stored in the disk's segments, or (a clone's) in the vault. */
  async blockRefs(em: EntityManager | DataSource, diskId: string, first: number, last: number): Promise<BlockRef[]> {
    const rows: { i: string; s: string | null; o: string | null; h: Buffer; p: string | null }[] = await em.query(
      `WITH RECURSIVE ${viewCtes("$1", between("$2", "$3"))}
       SELECT block_index AS i, segment_id AS s, segment_offset AS o, hash AS h,
              CASE WHEN segment_id IS NULL THEN (SELECT project_id FROM disks WHERE id = $1) END AS p
         FROM view WHERE hash IS NOT NULL ORDER BY block_index`,
      [diskId, first, last],
    );
    return rows.map((r) => (r.p ? { index: Number(r.i), segmentId: null, offset: 0, hash: r.h, projectId: r.p } : { index: Number(r.i), segmentId: r.s, offset: Number(r.o), hash: r.h }));
  }

  /** The bytes of a clone's blocks that live in the vault (`hashes`, of its project's chunks), in order. */
  readVaultBlocks(projectId: string, hashes: Buffer[], ahead?: Buffer[]): Promise<Buffer[]> {
    if (!this.vault) throw new Error("this volume store reads no vault");
    return this.vault.read(projectId, hashes, ahead);
  }

  /** Fills `into` with adjacent blocks of one segment, from `offset` on, with one range read. */
  readRunInto(diskId: string, segmentId: string, offset: number, into: Buffer): Promise<void> {
    return this.blobs.readInto(segmentKey(diskId, segmentId), offset, into);
  }

  /**
   * The same for many small reads of a few segments (a disk served over NBD): segments never
   * change once written, so a store may keep their files open between reads.
   */
  readSegmentInto(diskId: string, segmentId: string, offset: number, into: Buffer): Promise<void> {
    const key = segmentKey(diskId, segmentId);
    return this.blobs.readFixedInto ? this.blobs.readFixedInto(key, offset, into) : this.blobs.readInto(key, offset, into);
  }

  async readBlock(diskId: string, index: number): Promise<Buffer> {
    const block = Buffer.alloc(BLOCK_SIZE);
    await this.readBlocks(diskId, index, index, block);
    return block;
  }

  /**
   * Hands the bytes [start, end] of a disk to `send` in order, unwritten blocks as
   * zeros, 4 MiB at a time from two reused buffers: the next piece is read while
   * the last is sent, and a buffer is filled again only once `send` has resolved
   * for it (a slow reader holds two pieces, and a large read makes no garbage).
   */
  async readTo(diskId: string, start: number, end: number, send: (piece: Buffer) => Promise<void>): Promise<void> {
    const firstBlock = Math.floor(start / BLOCK_SIZE);
    const lastBlock = Math.floor(end / BLOCK_SIZE);
    let sending: { done: Promise<void>; buf: Buffer } | null = null;
    for (let batch = firstBlock; batch <= lastBlock; batch += READ_BATCH_BLOCKS) {
      const batchEnd = Math.min(lastBlock, batch + READ_BATCH_BLOCKS - 1);
      const buf = this.buffers.take((batchEnd - batch + 1) * BLOCK_SIZE);
      await this.readBlocks(diskId, batch, batchEnd, buf);
      if (sending) {
        await sending.done;
        this.buffers.give(sending.buf);
      }
      const from = batch === firstBlock ? start - batch * BLOCK_SIZE : 0;
      const to = batchEnd === lastBlock ? end - batch * BLOCK_SIZE + 1 : buf.length;
      const done = send(buf.subarray(from, to));
      done.catch(() => undefined); // awaited with the next piece or below
      sending = { done, buf };
    }
    // A buffer still being sent when something fails is left to the garbage collector.
    if (sending) {
      await sending.done;
      this.buffers.give(sending.buf);
    }
  }

  /**
   * Fills `into` with blocks [first, last]: one range read per run of adjacent
   * blocks in a segment, zeros elsewhere. Compaction may move the blocks and
   * delete their old segment between reading the refs and reading the bytes:
   * then the refs are read again, and point where the blocks are now.
   */
  async readBlocks(diskId: string, first: number, last: number, into: Buffer): Promise<void> {
    for (let attempt = 1; ; attempt++) {
      try {
        return await this.fillBlocksOnce(diskId, first, last, into);
      } catch (err) {
        if (!(err instanceof BlobNotFoundError) || attempt >= READ_ATTEMPTS) throw err;
      }
    }
  }

  private async fillBlocksOnce(diskId: string, first: number, last: number, into: Buffer): Promise<void> {
    const all = await this.blockRefs(this.ds, diskId, first, last);
    const inVault = all.filter((r) => r.segmentId === null);
    const refs = inVault.length ? all.filter((r) => r.segmentId !== null) : all;
    let at = first; // blocks before `at` are filled
    let i = 0;
    while (i < refs.length) {
      let j = i + 1;
      while (j < refs.length && refs[j].index === refs[j - 1].index + 1 && refs[j].segmentId === refs[i].segmentId && refs[j].offset === refs[j - 1].offset + BLOCK_SIZE) j++;
      const from = refs[i].index;
      into.fill(0, (at - first) * BLOCK_SIZE, (from - first) * BLOCK_SIZE);
      await this.blobs.readInto(segmentKey(diskId, refs[i].segmentId!), refs[i].offset, into.subarray((from - first) * BLOCK_SIZE, (refs[j - 1].index + 1 - first) * BLOCK_SIZE));
      at = refs[j - 1].index + 1;
      i = j;
    }
    into.fill(0, (at - first) * BLOCK_SIZE, (last + 1 - first) * BLOCK_SIZE);
    if (inVault.length) {
      const blocks = await this.readVaultBlocks(
        inVault[0].projectId!,
        inVault.map((r) => r.hash),
      );
      for (let k = 0; k < inVault.length; k++) blocks[k].copy(into, (inVault[k].index - first) * BLOCK_SIZE);
    }
  }

  /**
   * Deletes a segment that no disk block points at and nothing holds: the row, only if that is still
   * so (a block or capture made meanwhile keeps it, by its foreign key if not by this check), then
   * the blob. Returns whether it went.
   */
  async deleteSegment(segmentId: string, diskId: string): Promise<boolean> {
    const gone = await rows(
      this.ds,
      `DELETE FROM volume_segments s WHERE s.id = $1
         AND NOT EXISTS (SELECT 1 FROM disk_blocks b WHERE b.segment_id = s.id) AND ${SEGMENT_UNHELD("s")} RETURNING id`,
      [segmentId],
    ).catch((err: unknown) => {
      // Referenced by a row committed meanwhile: its foreign key refuses, and the segment stays.
      if (err instanceof QueryFailedError && (err.driverError as { code?: string }).code === "23503") return [];
      throw err;
    });
    if (!gone.length) return false;
    await this.blobs.delete(segmentKey(diskId, segmentId));
    return true;
  }

  /**
   * Staged blocks of a job that ended without them being dropped (its cleanup failed, or a
   * process that lost the job went on staging) pin nothing: they can never be published.
   * `endedWithin` (an interval, e.g. '10 minutes') looks only at jobs that ended that lately.
   */
  async dropEndedStaged(endedWithin?: string): Promise<void> {
    await this.ds.query(
      `DELETE FROM staged_blocks sb USING jobs j WHERE j.id = sb.job_id AND j.status IN (${TERMINAL_JOB_STATUSES_SQL})
         ${endedWithin ? `AND j.finished_at > now() - $1::interval` : ""}`,
      endedWithin ? [endedWithin] : [],
    );
  }

  /**
   * Deletes segment blobs that no disk block and no running backup or image creation points at, and
   * blobs that were written but never committed (a crash between the two) or never
   * finished (a crash while writing) once they are older than `graceMs`.
   */
  async collectGarbage(graceMs: number): Promise<{ segments: number; bytes: number }> {
    await this.dropEndedStaged();
    const dead: { id: string; disk_id: string; size_bytes: string }[] = await this.ds.query(
      `SELECT s.id, s.disk_id, s.size_bytes FROM volume_segments s
        WHERE NOT EXISTS (SELECT 1 FROM disk_blocks b WHERE b.segment_id = s.id) AND ${SEGMENT_UNHELD("s")}`,
    );
    let bytes = 0;
    let deleted = 0;
    for (const s of dead) {
      if (!(await this.deleteSegment(s.id, s.disk_id))) continue;
      deleted++;
      bytes += Number(s.size_bytes);
    }
    let orphans = 0;
    const cutoff = Date.now() - graceMs;
    // Segments being written or waiting for their commit are pending: neither their files nor their blobs go.
    const pending = await pendingUnder(this.ds, "volumes/", graceMs);
    for await (const blob of this.blobs.list("volumes/")) {
      if (blob.modifiedAt.getTime() > cutoff) continue;
      const id = blob.key.split("/")[2];
      const [row] = await this.ds.query(INDEXED_OR_PENDING(`SELECT 1 FROM volume_segments WHERE id = $1`, "$2"), [id, blob.key]);
      if (row) continue;
      await this.blobs.delete(blob.key);
      orphans++;
      bytes += blob.size;
    }
    // Segments a crashed process was still writing.
    const incomplete = await this.blobs.removeIncomplete?.("volumes/", new Date(cutoff), (key) => pending.has(key));
    if (incomplete) {
      orphans += incomplete.count;
      bytes += incomplete.bytes;
    }
    return { segments: deleted + orphans, bytes };
  }
}
