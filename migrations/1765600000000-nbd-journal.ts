import type { MigrationInterface, QueryRunner } from "typeorm";

/**
 * The NBD write journal: what a FLUSH made durable and no commit has put in the
 * disk's blocks yet. A row holds the writes of one FLUSH, as they came (offset,
 * length, bytes); the commit that puts them in blocks deletes the rows it covers
 * in its own transaction, and a restore's publish deletes the disk's rows (the
 * disk's bytes are the backup's after it, and its count of restores goes up, so
 * writes made before it and still in some process's memory are dropped rather
 * than committed over it). Deleting the disk takes its rows.
 * The bytes are stored as they are: they rarely compress and never live long.
 */
export class NbdJournal1765600000000 implements MigrationInterface {
  name = "NbdJournal1765600000000";

  async up(q: QueryRunner): Promise<void> {
    await q.query(`
      CREATE TABLE nbd_journal (
        disk_id uuid NOT NULL,
        seq bigint NOT NULL,
        records bytea NOT NULL,
        created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
        CONSTRAINT pk_nbd_journal PRIMARY KEY (disk_id, seq),
        CONSTRAINT fk_nbd_journal_disk FOREIGN KEY (disk_id) REFERENCES disks (id) ON DELETE CASCADE
      )`);
    await q.query(`ALTER TABLE nbd_journal ALTER COLUMN records SET STORAGE EXTERNAL`);
    // Restores a disk has had: NBD writes made before a restore are never committed after it.
    await q.query(`ALTER TABLE disks ADD COLUMN restores integer NOT NULL DEFAULT 0`);
  }

  async down(q: QueryRunner): Promise<void> {
    await q.query(`ALTER TABLE disks DROP COLUMN restores`);
    await q.query(`DROP TABLE nbd_journal`);
  }
}
