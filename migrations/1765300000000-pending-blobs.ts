import type { MigrationInterface, QueryRunner } from "typeorm";

/**
 * A blob is recorded as pending before its writer creates it and stops being
 * pending in the transaction that indexes it, so no collector takes it in
 * between, whatever the grace period. `owner` names the writing process
 * (host:pid): a row whose process is gone stops protecting its blob, as does
 * any row after a day (see pending-blobs.ts).
 */
export class PendingBlobs1765300000000 implements MigrationInterface {
  name = "PendingBlobs1765300000000";

  async up(q: QueryRunner): Promise<void> {
    await q.query(`
      CREATE TABLE pending_blobs (
        key text NOT NULL,
        owner text NOT NULL,
        created_at timestamptz NOT NULL DEFAULT now(),
        CONSTRAINT pk_pending_blobs PRIMARY KEY (key)
      )`);
  }

  async down(q: QueryRunner): Promise<void> {
    await q.query(`DROP TABLE pending_blobs`);
  }
}
