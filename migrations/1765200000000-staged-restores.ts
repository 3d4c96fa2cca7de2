import type { MigrationInterface, QueryRunner } from "typeorm";

/**
 * Restores are all-or-nothing: a restore stages the blocks it writes in
 * staged_blocks (a NULL segment marks a block that becomes zeros) and makes them
 * the disk's in one transaction at its end; a failed one only drops its rows.
 * Staged segments count as referenced while their job can still publish them.
 *
 * Backups name their failure with a code beside the message, as images do.
 */
export class StagedRestores1765200000000 implements MigrationInterface {
  name = "StagedRestores1765200000000";

  async up(q: QueryRunner): Promise<void> {
    await q.query(`
      CREATE TABLE staged_blocks (
        job_id uuid NOT NULL,
        disk_id uuid NOT NULL,
        block_index bigint NOT NULL,
        segment_id uuid,
        segment_offset bigint,
        hash bytea,
        CONSTRAINT pk_staged_blocks PRIMARY KEY (job_id, disk_id, block_index),
        CONSTRAINT fk_staged_blocks_job FOREIGN KEY (job_id) REFERENCES jobs (id) ON DELETE CASCADE,
        CONSTRAINT fk_staged_blocks_disk FOREIGN KEY (disk_id) REFERENCES disks (id) ON DELETE CASCADE,
        CONSTRAINT fk_staged_blocks_segment FOREIGN KEY (segment_id) REFERENCES volume_segments (id),
        CONSTRAINT ck_staged_blocks_data CHECK ((segment_id IS NULL) = (hash IS NULL) AND (segment_id IS NULL) = (segment_offset IS NULL)),
        CONSTRAINT ck_staged_blocks_index CHECK (block_index >= 0)
      )`);
    await q.query(`CREATE INDEX ix_staged_blocks_segment ON staged_blocks (segment_id) WHERE segment_id IS NOT NULL`);
    await q.query(`CREATE INDEX ix_staged_blocks_disk ON staged_blocks (disk_id)`);

    await q.query(`ALTER TABLE backups ADD COLUMN error_code text`);
    // A backup's failure so far was its backup job's, or damage verification found.
    await q.query(`
      UPDATE backups b SET error_code = coalesce(
        (SELECT CASE WHEN j.error_code = 'VERIFY_FAILED' THEN 'CORRUPT_CHUNK' ELSE j.error_code END FROM jobs j
          WHERE j.backup_id = b.id AND j.status IN ('FAILED', 'CANCELLED') AND j.error_code IS NOT NULL ORDER BY j.created_at DESC LIMIT 1), 'INTERNAL')
       WHERE b.error IS NOT NULL`);
    await q.query(`ALTER TABLE backups ADD CONSTRAINT ck_backups_error CHECK ((error_code IS NULL) = (error IS NULL))`);
  }

  async down(q: QueryRunner): Promise<void> {
    await q.query(`ALTER TABLE backups DROP CONSTRAINT ck_backups_error`);
    await q.query(`ALTER TABLE backups DROP COLUMN error_code`);
    await q.query(`DROP TABLE staged_blocks`);
  }
}
