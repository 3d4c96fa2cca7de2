import crypto from "node:crypto";
import type { DataSource } from "typeorm";
import { ChunkCodec, DecodeError } from "./codec";
import { mapOrdered } from "./pipeline";
import { BLOCK_SIZE } from "./volume-store";
import { AdvisoryLock } from "../db/locks";
import { HASH_BYTES, hashArray, hashAt, hashOf, int8At, list, listOf, packedHashes, rows } from "../db/sql";
import { BlobNotFoundError, type BlobStore, type BlobWriter } from "./blob-store";
import { HashSet } from "./hash-list";

/** Packs are written once they reach this size. */
export const PACK_BYTES = 16 * 1024 * 1024;
/** Range reads (and their decoding) in flight at once. */
const READS_IN_FLIGHT = 4;
/** Packs one writer writes at once. */
const PACKS_IN_FLIGHT = 2;
/** A range read of a pack takes at most this many chunks (4 MiB of raw bytes). */
const RUN_CHUNKS = 64;
/** A pack whose live chunks fill less than this share of it is rewritten by garbage collection. */
const REPACK_BELOW = 0.5;

/** SQL: no backup or image of its project references chunk `c` (an alias of vault_chunks). */
const CHUNK_UNREFERENCED = (c: string) =>
  `NOT EXISTS (SELECT 1 FROM backup_blocks bb JOIN backups b ON b.id = bb.backup_id WHERE bb.hash = ${c}.hash AND b.project_id = ${c}.project_id)
   AND NOT EXISTS (SELECT 1 FROM image_blocks ib JOIN image_disks d ON d.id = ib.image_disk_id JOIN images i ON i.id = d.image_id
                    WHERE ib.hash = ${c}.hash AND i.project_id = ${c}.project_id)`;

export const packKey = (projectId: string, packId: string) => `vault/${projectId}/packs/${packId.slice(0, 2)}/${packId}`;
export const hex = (hash: Buffer) => hash.toString("hex");

export interface ReadOptions {
  /** Check every chunk against its SHA-256, not only its checksum (verification does). */
  sha256?: boolean;
}

export class ChunkError extends Error {
  constructor(
    readonly hash: string,
    readonly problem: "missing" | "corrupt",
    detail: string,
  ) {
    super(`chunk ${hash.slice(0, 16)}… is ${problem}: ${detail}`);
  }
}

interface ChunkLocation {
  hash: Buffer;
  pack_id: string;
  pack_offset: string;
  stored_size: number;
  raw_size: number;
  compressed: boolean;
}

/**
 * Chunks of one pack in pack order, as parallel arrays rather than an object per
 * chunk (the data path handles tens of thousands of them a minute): where each
 * sits in the pack, its stored and raw sizes, whether it is compressed, and the
 * SHA-256s back to back in `hashes`.
 */
export interface PackChunks {
  packId: string;
  offsets: Float64Array;
  stored: Uint32Array;
  raw: Uint32Array;
  compressed: Uint8Array;
  hashes: Buffer;
}

/** SQL: the chunk `hash` of project `project` in vault_chunks, as a LATERAL subquery (LIMIT 1 keeps it one index probe per hash). */
export const CHUNK_AT = (project: string, hash: string) => `SELECT pack_id, pack_offset, stored_size, raw_size, compressed FROM vault_chunks WHERE project_id = ${project} AND hash = ${hash} LIMIT 1`;

/**
 * SQL: the select list packing the chunks of one pack into one row (read with
 * packChunks), over rows of a wanted hash `hash` LEFT JOINed to CHUNK_AT as `c`,
 * grouped by c.pack_id. The hashes the vault lacks come as one row with no pack.
 */
export const PACKED_CHUNKS = (hash: string) =>
  [
    `c.pack_id AS pack`,
    `string_agg(${hash}, ''::bytea ORDER BY c.pack_offset) AS h`,
    `string_agg(int8send(c.pack_offset), ''::bytea ORDER BY c.pack_offset) AS o`,
    `string_agg(int4send(c.stored_size), ''::bytea ORDER BY c.pack_offset) AS s`,
    `string_agg(int4send(c.raw_size), ''::bytea ORDER BY c.pack_offset) AS r`,
    `string_agg(CASE WHEN c.compressed THEN '\\x01'::bytea ELSE '\\x00'::bytea END, ''::bytea ORDER BY c.pack_offset) AS z`,
  ].join(", ");

export interface PackedChunksRow {
  pack: string | null;
  h: Buffer;
  o: Buffer | null;
  s: Buffer | null;
  r: Buffer | null;
  z: Buffer | null;
}

/** The chunks of a PACKED_CHUNKS row; ChunkError when they are not in the vault or not whole blocks. */
export function packChunks(row: PackedChunksRow): PackChunks {
  if (row.pack === null || !row.o || !row.s || !row.r || !row.z) throw new ChunkError(hex(hashOf(row.h, 0)), "missing", "not in the vault index");
  const n = row.h.length / HASH_BYTES;
  const chunks: PackChunks = { packId: row.pack, offsets: new Float64Array(n), stored: new Uint32Array(n), raw: new Uint32Array(n), compressed: new Uint8Array(n), hashes: row.h };
  for (let k = 0; k < n; k++) {
    chunks.offsets[k] = int8At(row.o, k);
    chunks.stored[k] = row.s.readUInt32BE(k * 4);
    chunks.raw[k] = row.r.readUInt32BE(k * 4);
    chunks.compressed[k] = row.z[k];
    if (chunks.raw[k] !== BLOCK_SIZE) throw new ChunkError(hex(hashOf(row.h, k)), "corrupt", `its index says ${chunks.raw[k]} bytes, not ${BLOCK_SIZE}`);
  }
  return chunks;
}

/** packChunks over every row, in their order; the chunks the vault lacks fail first, before anything is read. */
export function readPackedChunks(found: PackedChunksRow[]): PackChunks[] {
  const missing = found.find((r) => r.pack === null);
  if (missing) packChunks(missing);
  return found.map(packChunks);
}

/**
 * Collects new chunks of one project into packs: chunks are compressed with zstd
 * on the codec's workers (kept raw when that does not help) and streamed into
 * the pack's blob as they come, so no pack is held in memory. A full pack is
 * made durable and indexed while the next one fills. Only after the blob is
 * durable does one transaction index its chunks, so an indexed chunk always has
 * its bytes.
 */
export class PackWriter {
  /** The pack being filled. */
  private pack: { id: string; writer: BlobWriter; size: number; index: PackIndex } | null = null;
  /** Chunks of packs being closed, each set until its pack is indexed. */
  private readonly closing = new Set<HashSet>();
  private inflight: Promise<void>[] = [];
  /** Bytes this writer added to the vault. */
  storedBytes = 0;

  constructor(
    private readonly vault: Vault,
    private readonly projectId: string,
  ) {}

  /** Whether this writer already holds the chunk at byte `at` of `hash` (written or being written). */
  has(hash: Uint8Array, at = 0): boolean {
    if (this.pack?.index.chunks.has(hash, at)) return true;
    for (const c of this.closing) if (c.has(hash, at)) return true;
    return false;
  }

  /**
   * Adds the blocks of `data` (each BLOCK_SIZE bytes) named by `blocks`: `slot` is
   * a block's place in `data`, `hash` its SHA-256. Blocks this writer already
   * holds are skipped. `data` moves to the codec (or back to its pool when every
   * block is skipped).
   */
  async addBlocks(data: Buffer, blocks: { hash: Buffer; slot: number }[]): Promise<void> {
    const fresh: { hash: Buffer; slot: number }[] = [];
    const seen = new HashSet(blocks.length);
    for (const b of blocks) if (!this.has(b.hash) && seen.add(b.hash)) fresh.push(b);
    const buffers = this.vault.codec.buffers;
    if (!fresh.length) {
      buffers.give(data);
      return;
    }
    const packed = await this.vault.codec.compress(
      data,
      BLOCK_SIZE,
      fresh.map((b) => b.slot),
      buffers.take(ChunkCodec.bound(fresh.length, BLOCK_SIZE)),
    );
    buffers.give(packed.data);
    await this.addStored(fresh.map((b, k) => ({ hash: b.hash, stored: packed.chunks[k], raw: BLOCK_SIZE, compressed: packed.compressed[k] })));
    buffers.give(packed.out);
  }

  /**
   * Appends chunks already in their stored form (compressed when `compressed`) to
   * the pack, skipping those this writer holds. Their buffers are free again once
   * this resolves.
   */
  async addStored(chunks: { hash: Buffer; stored: Buffer; raw: number; compressed: boolean }[]): Promise<void> {
    let parts: Buffer[] = [];
    for (const c of chunks) {
      if (this.has(c.hash)) continue;
      const pack = this.pack ?? (await this.open());
      indexChunk(pack.index, c.hash, pack.size, c.stored.length, c.raw, c.compressed);
      pack.size += c.stored.length;
      parts.push(c.stored);
      if (pack.size >= PACK_BYTES) {
        await pack.writer.write(parts);
        parts = [];
        await this.rotate();
      }
    }
    if (parts.length) await this.pack!.writer.write(parts);
  }

  private async open() {
    this.pack = { id: crypto.randomBytes(32).toString("hex"), writer: null as unknown as BlobWriter, size: 0, index: newPackIndex() };
    this.pack.writer = await this.vault.blobs.openWriter(packKey(this.projectId, this.pack.id));
    return this.pack;
  }

  /**
   * Closes the filled pack: makes it durable, then indexes it, in the background.
   * Up to PACKS_IN_FLIGHT packs close at once; beyond that it waits for the oldest.
   */
  private async rotate(): Promise<void> {
    while (this.inflight.length >= PACKS_IN_FLIGHT) await this.inflight.shift(); // a failed close surfaces here
    const pack = this.pack;
    if (!pack) return;
    this.pack = null;
    this.closing.add(pack.index.chunks);
    const close = (async () => {
      const size = await pack.writer.close();
      const added = await this.vault.indexPack(this.projectId, pack.id, size, pack.index);
      this.storedBytes += added; // not `+= await`: that would read the total before another close adds to it
      this.closing.delete(pack.index.chunks);
    })();
    close.catch(() => undefined); // awaited by a later rotate or flush
    this.inflight.push(close);
  }

  /** Writes what is left; once it returns, every chunk added so far is durable and indexed. */
  async flush(): Promise<void> {
    await this.rotate();
    while (this.inflight.length) await this.inflight.shift();
  }

  /** Drops the pack being filled (a job that failed); packs already closed stay for garbage collection. */
  async abort(): Promise<void> {
    const pack = this.pack;
    this.pack = null;
    await pack?.writer.abort().catch(() => undefined);
    await Promise.allSettled(this.inflight);
    this.inflight = [];
  }
}

/** The chunks written to a pack, in the order they sit in it: their hashes and parallel lists of their places and forms. */
interface PackIndex {
  chunks: HashSet;
  offsets: number[];
  stored: number[];
  raw: number[];
  compressed: boolean[];
}

const newPackIndex = (): PackIndex => ({ chunks: new HashSet(), offsets: [], stored: [], raw: [], compressed: [] });

/** Appends a chunk, new to the pack, at `offset` of it. */
function indexChunk(index: PackIndex, hash: Buffer, offset: number, stored: number, raw: number, compressed: boolean): void {
  index.chunks.add(hash);
  index.offsets.push(offset);
  index.stored.push(stored);
  index.raw.push(raw);
  index.compressed.push(compressed);
}

/**
 * A pack rewritten by garbage collection is named by the SHA-256 of its index
 * (each chunk's hash, place and form), which names its content; a pack written
 * as it fills gets 256 random bits.
 */
function packName(index: PackIndex): string {
  const h = crypto.createHash("sha256");
  const meta = Buffer.alloc(17);
  for (let k = 0; k < index.chunks.size; k++) {
    h.update(index.chunks.list.at(k));
    meta.writeBigUInt64BE(BigInt(index.offsets[k]), 0);
    meta.writeUInt32BE(index.stored[k], 8);
    meta.writeUInt32BE(index.raw[k], 12);
    meta[16] = index.compressed[k] ? 1 : 0;
    h.update(meta);
  }
  return h.digest("hex");
}

/**
 * The vault: content-addressed, compressed, deduplicated chunks of every backup
 * and image, per project. Postgres indexes where each chunk lives.
 */
export class Vault {
  constructor(
    private readonly ds: DataSource,
    readonly blobs: BlobStore,
    readonly codec: ChunkCodec = new ChunkCodec(1, 0),
  ) {}

  writer(projectId: string): PackWriter {
    return new PackWriter(this, projectId);
  }

  /** Indexes the chunks of a durable pack; returns the bytes of chunks that were new. */
  async indexPack(projectId: string, packId: string, size: number, index: PackIndex): Promise<number> {
    return this.ds.transaction(async (em) => {
      await em.query(`INSERT INTO vault_packs (id, project_id, size_bytes) VALUES ($1, $2, $3) ON CONFLICT (id) DO NOTHING`, [packId, projectId, size]);
      const inserted = await rows<{ stored_size: number }>(
        em,
        `INSERT INTO vault_chunks (project_id, hash, pack_id, pack_offset, stored_size, raw_size, compressed)
         SELECT $1, ${hashAt("$3", "c.n")}, $2, c.o, c.s, c.r, c.z FROM unnest(${listOf("$4", "bigint")}, ${listOf("$5", "int")}, ${listOf("$6", "int")}, ${listOf("$7", "bool")}) WITH ORDINALITY AS c(o, s, r, z, n)
         ON CONFLICT (project_id, hash) DO NOTHING RETURNING stored_size`,
        [projectId, packId, index.chunks.list.bytes, list(index.offsets), list(index.stored), list(index.raw), list(index.compressed)],
      );
      return inserted.reduce((n, r) => n + r.stored_size, 0);
    });
  }

  /** Which of `hashes` the project's vault already holds. */
  async existing(projectId: string, hashes: Buffer[]): Promise<Set<string>> {
    if (!hashes.length) return new Set();
    const found = await rows<{ hash: Buffer }>(this.ds, `SELECT hash FROM vault_chunks WHERE project_id = $1 AND hash = ANY(${hashArray("$2")})`, [projectId, packedHashes(hashes)]);
    return new Set(found.map((r) => hex(r.hash)));
  }

  /**
   * Where the distinct chunks of `hashes` (SHA-256s back to back) sit: one entry
   * per pack, in pack order. Throws ChunkError for a chunk the index does not
   * hold or holds with the wrong size.
   */
  async locate(projectId: string, hashes: Buffer): Promise<PackChunks[]> {
    if (!hashes.length) return [];
    return readPackedChunks(
      await rows<PackedChunksRow>(
        this.ds,
        `SELECT ${PACKED_CHUNKS("w.hash")}
           FROM (SELECT DISTINCT ${hashAt("$2", "g.n")} AS hash FROM generate_series(1, length($2::bytea) / ${HASH_BYTES}) AS g(n)) AS w
           LEFT JOIN LATERAL (${CHUNK_AT("$1", "w.hash")}) AS c ON true
          GROUP BY c.pack_id`,
        [projectId, hashes],
      ),
    );
  }

  /**
   * Reads and checks chunks on the codec's workers: each is decompressed and
   * checked against its checksum (or its SHA-256, see ReadOptions). Returns each
   * distinct chunk's bytes by hex hash.
   */
  async readChunks(projectId: string, hashes: Buffer[], opts: ReadOptions = {}): Promise<Map<string, Buffer>> {
    const out = new Map<string, Buffer>();
    for await (const run of this.readRuns(projectId, hashes, opts)) {
      for (let k = 0; k < run.hashes.length; k++) out.set(hex(run.hashes[k]), run.data.subarray(k * BLOCK_SIZE, (k + 1) * BLOCK_SIZE));
    }
    return out;
  }

  /**
   * Reads the distinct chunks of `hashes` in the order they sit in the packs:
   * nearby chunks of a pack come with one range read, a few reads and decodes
   * are in flight at once, and each run comes back as its chunks' raw bytes back
   * to back (every chunk BLOCK_SIZE bytes). Each chunk is checked (see readChunks).
   * A pack that garbage collection rewrote meanwhile is looked up again once.
   * A run's `data` comes from the codec's buffer pool: give it back once done with it.
   */
  async *readRuns(projectId: string, hashes: Buffer[], opts: ReadOptions = {}): AsyncGenerator<{ hashes: Buffer[]; data: Buffer }> {
    if (!hashes.length) return;
    const packs = await this.locate(projectId, packedHashes(hashes));
    for await (const run of this.readPacks(projectId, [{ packs }], opts)) {
      if (!run.data) continue;
      const ids: Buffer[] = [];
      for (let k = run.from; k < run.to; k++) ids.push(hashOf(run.pack.hashes, k));
      yield { hashes: ids, data: run.data };
    }
  }

  /**
   * Reads the chunks of a stream of batches, each a list of located packs (see
   * locate), with reads in flight across the batches' borders: each batch comes
   * first as itself (`data` null), then its runs: chunks [from, to) of one of its
   * packs, their raw bytes back to back in `data` (see readRuns).
   */
  async *readPacks<B extends { packs: PackChunks[] }>(
    projectId: string,
    batches: AsyncIterable<B> | Iterable<B>,
    opts: ReadOptions = {},
  ): AsyncGenerator<{ batch: B; pack: B["packs"][number]; from: number; to: number; data: Buffer } | { batch: B; pack: null; data: null }> {
    const self = this;
    const steps = async function* () {
      for await (const batch of batches) {
        yield { batch, pack: null, from: 0, to: 0 };
        for (const pack of batch.packs) for (const [from, to] of self.runs(pack)) yield { batch, pack, from, to };
      }
    };
    yield* mapOrdered(steps(), READS_IN_FLIGHT + 1, async ({ batch, pack, from, to }) =>
      pack ? { batch, pack, from, to, data: await this.fetch(projectId, pack, from, to, true, opts) } : { batch, pack: null, data: null },
    );
  }

  /** Chunks of a pack close to each other, up to RUN_CHUNKS of them, make one range read: [from, to) of the pack's list. */
  private runs(pack: PackChunks): [number, number][] {
    const out: [number, number][] = [];
    const n = pack.raw.length;
    let i = 0;
    while (i < n) {
      let j = i + 1;
      let end = pack.offsets[i] + pack.stored[i];
      while (j < n && pack.offsets[j] - end < 65536 && j - i < RUN_CHUNKS) {
        end = Math.max(end, pack.offsets[j] + pack.stored[j]);
        j++;
      }
      out.push([i, j]);
      i = j;
    }
    return out;
  }

  /** Reads and decodes chunks [from, to) of a pack into one pooled buffer. */
  private async fetch(projectId: string, pack: PackChunks, from: number, to: number, retry: boolean, opts: ReadOptions): Promise<Buffer> {
    const start = pack.offsets[from];
    let end = start;
    for (let k = from; k < to; k++) end = Math.max(end, pack.offsets[k] + pack.stored[k]);
    const hashAtRun = (k: number) => hex(hashOf(pack.hashes, from + k));
    const buffers = this.codec.buffers;
    const buf = buffers.take(end - start);
    try {
      await this.blobs.readInto(packKey(projectId, pack.packId), start, buf);
    } catch (err) {
      buffers.give(buf);
      if (err instanceof BlobNotFoundError && retry) return this.refetch(projectId, pack, from, to, opts);
      if (err instanceof BlobNotFoundError) throw new ChunkError(hashAtRun(0), "missing", `its pack ${pack.packId.slice(0, 12)}… is gone`);
      if (err instanceof Error && /shorter than/.test(err.message)) throw new ChunkError(hashAtRun(0), "corrupt", "its pack is truncated");
      throw err;
    }
    const offsets = pack.offsets.slice(from, to);
    for (let k = 0; k < offsets.length; k++) offsets[k] -= start;
    const chunks = {
      offsets,
      stored: pack.stored.slice(from, to),
      raw: pack.raw.slice(from, to),
      compressed: pack.compressed.slice(from, to),
      hashes: pack.hashes.subarray(from * HASH_BYTES, to * HASH_BYTES),
    };
    try {
      const { data, out } = await this.codec.decode(buf, chunks, buffers.take((to - from) * BLOCK_SIZE), { sha256: opts.sha256 });
      buffers.give(data);
      return out;
    } catch (err) {
      if (err instanceof DecodeError) {
        const detail = {
          truncated: "its pack is truncated",
          undecompressable: "it does not decompress, or fails its checksum",
          length: "it has the wrong length",
          hash: "its SHA-256 does not match",
        }[err.problem];
        throw new ChunkError(hashAtRun(err.chunk), "corrupt", detail);
      }
      throw err;
    }
  }

  /** The pack is gone (rewritten by garbage collection): find chunks [from, to) again and read them where they are now, in the same order. */
  private async refetch(projectId: string, pack: PackChunks, from: number, to: number, opts: ReadOptions): Promise<Buffer> {
    const place = new Map<string, number>();
    for (let k = from; k < to; k++) place.set(hex(hashOf(pack.hashes, k)), k - from);
    const out = this.codec.buffers.take((to - from) * BLOCK_SIZE);
    for (const moved of await this.locate(projectId, pack.hashes.subarray(from * HASH_BYTES, to * HASH_BYTES))) {
      for (const [f, t] of this.runs(moved)) {
        const data = await this.fetch(projectId, moved, f, t, false, opts);
        for (let k = f; k < t; k++) data.copy(out, place.get(hex(hashOf(moved.hashes, k)))! * BLOCK_SIZE, (k - f) * BLOCK_SIZE, (k - f + 1) * BLOCK_SIZE);
        this.codec.buffers.give(data);
      }
    }
    return out;
  }

  /**
   * Reclaims space of one project: unindexes chunks that no backup or image
   * references, deletes packs left with no live chunk, rewrites packs that are
   * mostly dead, and deletes pack blobs that were never indexed (a crash between
   * writing and indexing) or never finished (a crash while writing) once older
   * than `graceMs`. One collector per project at a time; safe while backups run,
   * because a backup's blocks reference their chunks from the instant it is taken.
   */
  async collectGarbage(projectId: string, graceMs: number): Promise<{ chunks: number; packs: number; bytes: number } | null> {
    return this.asCollector(projectId, () => this.collect(projectId, graceMs));
  }

  /**
   * Reclaims promptly what a job that failed or was cancelled wrote, given when
   * it ran: chunks of the project's packs indexed between `from` and `to` that
   * nothing references (its own rows are gone with its cleanup), and the packs
   * that leaves empty. A pack some of whose chunks are referenced stays for
   * collectGarbage. A running job's packs are safe: it references every chunk
   * it relies on from the moment it starts (its captured or imported blocks),
   * and a pack is indexed only once durable. Null when a collector runs.
   */
  async dropUnreferencedPacks(projectId: string, from: Date, to: Date): Promise<{ chunks: number; packs: number; bytes: number } | null> {
    return this.asCollector(projectId, async () => {
      const chunks = await rows(
        this.ds,
        `DELETE FROM vault_chunks c USING vault_packs p
          WHERE p.project_id = $1 AND p.created_at BETWEEN $2 AND $3 AND c.project_id = $1 AND c.pack_id = p.id AND ${CHUNK_UNREFERENCED("c")}
          RETURNING c.hash`,
        [projectId, from, to],
      );
      const packs = await rows<{ id: string; size_bytes: string }>(
        this.ds,
        `DELETE FROM vault_packs p WHERE p.project_id = $1 AND p.created_at BETWEEN $2 AND $3
            AND NOT EXISTS (SELECT 1 FROM vault_chunks c WHERE c.pack_id = p.id) RETURNING id, size_bytes`,
        [projectId, from, to],
      );
      let bytes = 0;
      for (const p of packs) {
        await this.blobs.delete(packKey(projectId, p.id));
        bytes += Number(p.size_bytes);
      }
      return { chunks: chunks.length, packs: packs.length, bytes };
    });
  }

  /** Runs `fn` as the project's one collector (across processes), or returns null when another is. */
  private async asCollector<T>(projectId: string, fn: () => Promise<T>): Promise<T | null> {
    const runner = this.ds.createQueryRunner();
    await runner.connect();
    try {
      const [{ locked }] = await runner.query(`SELECT pg_try_advisory_lock(${AdvisoryLock.VAULT}, hashtext($1)) AS locked`, [`vault:${projectId}`]);
      if (!locked) return null;
      try {
        return await fn();
      } finally {
        await runner.query(`SELECT pg_advisory_unlock(${AdvisoryLock.VAULT}, hashtext($1))`, [`vault:${projectId}`]);
      }
    } finally {
      await runner.release();
    }
  }

  private async collect(projectId: string, graceMs: number) {
    const deadChunks = await rows(this.ds, `DELETE FROM vault_chunks c WHERE c.project_id = $1 AND ${CHUNK_UNREFERENCED("c")} RETURNING hash`, [projectId]);
    let packs = 0;
    let bytes = 0;
    const usage = await rows<{ id: string; size_bytes: string; live: string }>(
      this.ds,
      `SELECT p.id, p.size_bytes, coalesce(sum(c.stored_size), 0) AS live
         FROM vault_packs p LEFT JOIN vault_chunks c ON c.pack_id = p.id
        WHERE p.project_id = $1 GROUP BY p.id, p.size_bytes`,
      [projectId],
    );
    const sparse = usage.filter((p) => Number(p.live) > 0 && Number(p.live) < Number(p.size_bytes) * REPACK_BELOW);
    if (sparse.length)
      await this.repack(
        projectId,
        sparse.map((p) => p.id),
      );
    for (const p of usage) {
      if (Number(p.live) > 0 && !sparse.includes(p)) continue;
      const gone = await rows(this.ds, `DELETE FROM vault_packs p WHERE p.id = $1 AND NOT EXISTS (SELECT 1 FROM vault_chunks c WHERE c.pack_id = p.id) RETURNING id`, [p.id]);
      if (!gone.length) continue;
      await this.blobs.delete(packKey(projectId, p.id));
      packs++;
      bytes += Number(p.size_bytes);
    }
    const cutoff = Date.now() - graceMs;
    for await (const blob of this.blobs.list(`vault/${projectId}/packs/`)) {
      if (blob.modifiedAt.getTime() > cutoff) continue;
      const id = blob.key.split("/").pop()!;
      const [row] = await rows(this.ds, `SELECT 1 FROM vault_packs WHERE id = $1`, [id]);
      if (row) continue;
      await this.blobs.delete(blob.key);
      packs++;
      bytes += blob.size;
    }
    // Packs a crashed process was still writing.
    const incomplete = await this.blobs.removeIncomplete?.(`vault/${projectId}/packs/`, new Date(cutoff));
    if (incomplete) {
      packs += incomplete.count;
      bytes += incomplete.bytes;
    }
    return { chunks: deadChunks.length, packs, bytes };
  }

  /** Copies the live chunks of `packIds` into new packs, stored form unchanged, and re-points the index. */
  private async repack(projectId: string, packIds: string[]): Promise<void> {
    const live = await rows<ChunkLocation>(
      this.ds,
      `SELECT hash, pack_id, pack_offset, stored_size, raw_size, compressed FROM vault_chunks WHERE project_id = $1 AND pack_id = ANY($2) ORDER BY pack_id, pack_offset`,
      [projectId, packIds],
    );
    let parts: Buffer[] = [];
    let moved = newPackIndex();
    let size = 0;
    const write = async () => {
      if (!moved.chunks.size) return;
      const packId = packName(moved);
      await this.blobs.put(packKey(projectId, packId), parts);
      await this.ds.transaction(async (em) => {
        await em.query(`INSERT INTO vault_packs (id, project_id, size_bytes) VALUES ($1, $2, $3) ON CONFLICT (id) DO NOTHING`, [packId, projectId, size]);
        await em.query(
          `UPDATE vault_chunks c SET pack_id = $2, pack_offset = m.o
             FROM (SELECT ${hashAt("$3", "u.n")} AS h, u.o FROM unnest(${listOf("$4", "bigint")}) WITH ORDINALITY AS u(o, n)) AS m
            WHERE c.project_id = $1 AND c.hash = m.h`,
          [projectId, packId, moved.chunks.list.bytes, list(moved.offsets)],
        );
      });
      parts = [];
      moved = newPackIndex();
      size = 0;
    };
    for (const loc of live) {
      const stored = await this.blobs.getRange(packKey(projectId, loc.pack_id), Number(loc.pack_offset), loc.stored_size);
      // Never carry a damaged chunk into a new pack unnoticed.
      await this.codec.decode(Buffer.from(stored), [{ offset: 0, stored: loc.stored_size, raw: loc.raw_size, compressed: loc.compressed, hash: loc.hash }]).catch((err: unknown) => {
        throw err instanceof DecodeError ? new ChunkError(hex(loc.hash), "corrupt", `found while rewriting its pack (${err.problem})`) : err;
      });
      parts.push(stored);
      indexChunk(moved, loc.hash, size, loc.stored_size, loc.raw_size, loc.compressed);
      size += stored.length;
      if (size >= PACK_BYTES) await write();
    }
    await write();
  }
}
