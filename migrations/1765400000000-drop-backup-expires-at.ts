import type { MigrationInterface, QueryRunner } from "typeorm";

/** backups.expires_at was never set or read: Backup.expiresAt comes from the policy's retentionDays. */
export class DropBackupExpiresAt1765400000000 implements MigrationInterface {
  name = "DropBackupExpiresAt1765400000000";

  async up(q: QueryRunner): Promise<void> {
    await q.query(`ALTER TABLE backups DROP COLUMN expires_at`);
  }

  async down(q: QueryRunner): Promise<void> {
    await q.query(`ALTER TABLE backups ADD COLUMN expires_at timestamptz`);
  }
}
