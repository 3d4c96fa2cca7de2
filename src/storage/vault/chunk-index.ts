import type { DataSource } from "typeorm";
import { HASH_BYTES, hashArray, hashAt, hashOf, int8At, list, listOf, packedHashes, rows } from "../../db/sql";
import { BLOCK_SIZE } from "../volume-store";
import { fulfilBlob } from "../pending-blobs";
import { ChunkError, hex, packKey, type PackChunks } from "./chunk";
import type { PackIndex } from "./pack-writer";

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
function packChunks(row: PackedChunksRow): PackChunks {
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
 * The vault's index in Postgres: which pack holds each chunk of a project, where
 * in it and in what form (vault_chunks), and the packs themselves (vault_packs).
 * A pack is indexed only once its blob is durable, so an indexed chunk always
 * has its bytes.
 */
export class ChunkIndex {
  constructor(private readonly ds: DataSource) {}

  /** Indexes the chunks of a durable new pack; returns the bytes of chunks that were new. */
  async addPack(projectId: string, packId: string, size: number, index: PackIndex): Promise<number> {
    return this.ds.transaction(async (em) => {
      await em.query(`INSERT INTO vault_packs (id, project_id, size_bytes) VALUES ($1, $2, $3) ON CONFLICT (id) DO NOTHING`, [packId, projectId, size]);
      await fulfilBlob(em, packKey(projectId, packId));
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

  /** Indexes a durable pack of chunks the index holds already (a rewritten pack): points them at it. Adds no bytes. */
  async movePack(projectId: string, packId: string, size: number, index: PackIndex): Promise<number> {
    await this.ds.transaction(async (em) => {
      await em.query(`INSERT INTO vault_packs (id, project_id, size_bytes) VALUES ($1, $2, $3) ON CONFLICT (id) DO NOTHING`, [packId, projectId, size]);
      await fulfilBlob(em, packKey(projectId, packId));
      await em.query(
        `UPDATE vault_chunks c SET pack_id = $2, pack_offset = m.o
           FROM (SELECT ${hashAt("$3", "u.n")} AS h, u.o FROM unnest(${listOf("$4", "bigint")}) WITH ORDINALITY AS u(o, n)) AS m
          WHERE c.project_id = $1 AND c.hash = m.h`,
        [projectId, packId, index.chunks.list.bytes, list(index.offsets)],
      );
    });
    return 0;
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
}
