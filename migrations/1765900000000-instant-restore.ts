import type { MigrationInterface, QueryRunner } from "typeorm";

/**
 * Restores made at once: restoring a backup onto a disk makes the disk a clone of
 * the backup (its own blocks that differ from the backup's are dropped, the rest read
 * from the vault), with no copy. The disk's changed-block tracking then no longer
 * describes its change since its earlier backups, so `backup_floor` is the write
 * version its next backup may take a base from: only backups taken since the restore
 * (a snapshot version at least this) are bases; the first backup after a restore names
 * every block, most of them chunks the vault holds already.
 */
export class InstantRestore1765900000000 implements MigrationInterface {
  name = "InstantRestore1765900000000";

  async up(q: QueryRunner): Promise<void> {
    await q.query(`ALTER TABLE disks ADD COLUMN backup_floor bigint NOT NULL DEFAULT 0`);
  }

  async down(q: QueryRunner): Promise<void> {
    await q.query(`ALTER TABLE disks DROP COLUMN backup_floor`);
  }
}
