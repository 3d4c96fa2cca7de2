import type { MigrationInterface, QueryRunner } from "typeorm";

/**
 * Failures the API can show: images and exports carry the code and message of
 * the job that failed them, as jobs do. Jobs count the blocks they visit, so the
 * work of a job can be checked against the data it moved. Uploads keep a map of
 * their blocks that hold data, so an import reads no run of zeros.
 */
export class FailuresAndWork1765000000000 implements MigrationInterface {
  name = "FailuresAndWork1765000000000";

  async up(q: QueryRunner): Promise<void> {
    await q.query(`ALTER TABLE images ADD COLUMN error_code text`);
    await q.query(`ALTER TABLE images RENAME COLUMN error TO error_message`);
    // A failed image names its failure through the last failed job that acted on it.
    await q.query(`
      UPDATE images i SET error_code = coalesce(
        (SELECT j.error_code FROM jobs j WHERE j.image_id = i.id AND j.status IN ('FAILED', 'CANCELLED') ORDER BY j.created_at DESC LIMIT 1), 'INTERNAL')
       WHERE i.error_message IS NOT NULL`);
    await q.query(`ALTER TABLE images ADD CONSTRAINT ck_images_error CHECK ((error_code IS NULL) = (error_message IS NULL))`);

    await q.query(`ALTER TABLE image_exports ADD COLUMN error_code text, ADD COLUMN error_message text`);
    await q.query(`
      UPDATE image_exports e SET error_code = coalesce(j.error_code, 'INTERNAL'), error_message = coalesce(j.error_message, 'the export failed')
        FROM jobs j WHERE j.id = e.job_id AND e.status = 'FAILED'`);
    await q.query(`ALTER TABLE image_exports ADD CONSTRAINT ck_image_exports_error CHECK ((error_code IS NULL) = (error_message IS NULL))`);

    await q.query(`ALTER TABLE jobs ADD COLUMN blocks_visited bigint NOT NULL DEFAULT 0`);
    // Which 64 KiB blocks of an upload hold anything but zeros (a bitmap; the others are holes in its blob), and how many.
    await q.query(`ALTER TABLE uploads ADD COLUMN data_map bytea, ADD COLUMN data_bytes bigint`);
    await q.query(`ALTER TABLE jobs ADD CONSTRAINT ck_jobs_blocks_visited CHECK (blocks_visited >= 0)`);
  }

  async down(q: QueryRunner): Promise<void> {
    await q.query(`ALTER TABLE uploads DROP COLUMN data_map, DROP COLUMN data_bytes`);
    await q.query(`ALTER TABLE jobs DROP COLUMN blocks_visited`);
    await q.query(`ALTER TABLE image_exports DROP COLUMN error_code, DROP COLUMN error_message`);
    await q.query(`ALTER TABLE images DROP CONSTRAINT ck_images_error`);
    await q.query(`ALTER TABLE images DROP COLUMN error_code`);
    await q.query(`ALTER TABLE images RENAME COLUMN error_message TO error`);
  }
}
