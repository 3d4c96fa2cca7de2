import type { DataSource } from "typeorm";

/**
 * The NBD write journal. A FLUSH makes the writes acknowledged since the last one
 * durable by appending them, as they came, to the disk's journal (one row, one
 * Postgres commit, shared by the FLUSHes that came while the row before it was
 * appended): a few KiB for a file system's metadata, where committing them
 * would write whole 64 KiB blocks, a segment and the block map. The blocks are
 * committed later, in batches, and that commit deletes the rows it covers in its
 * own transaction. Whoever next owns the disk's writes (after a crash, the same
 * or another process) first applies what rows are left, oldest first, over the
 * committed blocks: applying a row again is harmless, because later rows and
 * writes come after it.
 */
export interface WriteJournal {
  /** Appends the records of one FLUSH; resolves once they are durable. */
  append(diskId: string, seq: number, records: Buffer): Promise<void>;
  /** Rows of the disk after `afterSeq`, oldest first, at most `limit`. */
  rows(diskId: string, afterSeq: number, limit: number): Promise<{ seq: number; records: Buffer }[]>;
}

/** SQL deleting the rows a commit covers: disk $1, rows up to $2. */
export const DELETE_JOURNAL = `DELETE FROM nbd_journal WHERE disk_id = $1 AND seq <= $2`;

/** One write as it came: `data` null for a range that reads as zeros (TRIM, WRITE_ZEROES). */
export interface JournalRecord {
  offset: number;
  length: number;
  data: Buffer | null;
}

const HEADER = 13;
const WRITE = 1;
const ZERO = 2;

/** The records one after another: kind (1 byte), offset (8), length (4), then a write's bytes. */
export function encodeRecords(records: JournalRecord[]): Buffer {
  let size = 0;
  for (const r of records) size += HEADER + (r.data ? r.length : 0);
  const out = Buffer.allocUnsafe(size);
  let at = 0;
  for (const r of records) {
    out.writeUInt8(r.data ? WRITE : ZERO, at);
    out.writeUInt32BE(Math.floor(r.offset / 2 ** 32), at + 1);
    out.writeUInt32BE(r.offset % 2 ** 32, at + 5);
    out.writeUInt32BE(r.length, at + 9);
    at += HEADER;
    if (r.data) {
      r.data.copy(out, at, 0, r.length);
      at += r.length;
    }
  }
  return out;
}

/** The records of one row; a row that does not parse is an error (rows are written whole, by one statement). */
export function decodeRecords(buf: Buffer): JournalRecord[] {
  const out: JournalRecord[] = [];
  let at = 0;
  while (at < buf.length) {
    if (at + HEADER > buf.length) throw new Error("a journal row ends inside a record header");
    const kind = buf.readUInt8(at);
    const offset = buf.readUInt32BE(at + 1) * 2 ** 32 + buf.readUInt32BE(at + 5);
    const length = buf.readUInt32BE(at + 9);
    at += HEADER;
    if (kind === WRITE) {
      if (at + length > buf.length) throw new Error("a journal row ends inside a write");
      out.push({ offset, length, data: buf.subarray(at, at + length) });
      at += length;
    } else if (kind === ZERO) out.push({ offset, length, data: null });
    else throw new Error(`a journal record of unknown kind ${kind}`);
  }
  return out;
}

/** The journal in Postgres, table nbd_journal. */
export function postgresJournal(ds: DataSource): WriteJournal {
  return {
    async append(diskId, seq, records) {
      await ds.query(`INSERT INTO nbd_journal (disk_id, seq, records) VALUES ($1, $2, $3)`, [diskId, seq, records]);
    },
    async rows(diskId, afterSeq, limit) {
      const rows: { seq: string; records: Buffer }[] = await ds.query(`SELECT seq, records FROM nbd_journal WHERE disk_id = $1 AND seq > $2 ORDER BY seq LIMIT $3`, [diskId, afterSeq, limit]);
      return rows.map((r) => ({ seq: Number(r.seq), records: r.records }));
    },
  };
}
