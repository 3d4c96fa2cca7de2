import type { MigrationInterface, QueryRunner } from "typeorm";

/**
 * Backups and images served over NBD, read-only, straight from the vault: an export
 * names one disk, one disk backup or one image (SYSTEM_DISK or DATA_DISK), each through
 * a composite foreign key of its own project. Deleting what an export serves revokes it.
 */
export class VaultExports1765700000000 implements MigrationInterface {
  name = "VaultExports1765700000000";

  async up(q: QueryRunner): Promise<void> {
    await q.query(`ALTER TABLE nbd_exports ALTER COLUMN disk_id DROP NOT NULL`);
    await q.query(`ALTER TABLE nbd_exports ADD COLUMN backup_id uuid, ADD COLUMN image_id uuid`);
    await q.query(`ALTER TABLE nbd_exports
      ADD CONSTRAINT fk_nbd_exports_backup FOREIGN KEY (project_id, backup_id) REFERENCES backups (project_id, id) ON DELETE CASCADE,
      ADD CONSTRAINT fk_nbd_exports_image FOREIGN KEY (project_id, image_id) REFERENCES images (project_id, id) ON DELETE CASCADE,
      ADD CONSTRAINT ck_nbd_exports_one_resource CHECK (num_nonnulls(disk_id, backup_id, image_id) = 1),
      ADD CONSTRAINT ck_nbd_exports_vault_read_only CHECK (disk_id IS NOT NULL OR read_only)`);
    await q.query(`CREATE INDEX ix_nbd_exports_backup ON nbd_exports (backup_id) WHERE backup_id IS NOT NULL`);
    await q.query(`CREATE INDEX ix_nbd_exports_image ON nbd_exports (image_id) WHERE image_id IS NOT NULL`);
  }

  async down(q: QueryRunner): Promise<void> {
    await q.query(`DELETE FROM nbd_exports WHERE disk_id IS NULL`);
    await q.query(`DROP INDEX ix_nbd_exports_image`);
    await q.query(`DROP INDEX ix_nbd_exports_backup`);
    await q.query(`ALTER TABLE nbd_exports DROP CONSTRAINT ck_nbd_exports_vault_read_only, DROP CONSTRAINT ck_nbd_exports_one_resource,
      DROP CONSTRAINT fk_nbd_exports_image, DROP CONSTRAINT fk_nbd_exports_backup, DROP COLUMN image_id, DROP COLUMN backup_id`);
    await q.query(`ALTER TABLE nbd_exports ALTER COLUMN disk_id SET NOT NULL`);
  }
}
