import type { MigrationInterface, QueryRunner } from "typeorm";

/**
 * Disks made from a backup or an image at once, with no copy (clones). A clone's
 * blocks that it has not written itself read as its source's: a disk backup through
 * its chain of bases (`clone_backup_id`), a disk of an image (`clone_image_id`,
 * `clone_image_disk_id`), or a frozen block list (`clone_manifest_id`). A source is
 * never deleted under its clones: deleting a backup or image that clones still read
 * from first copies its block list (hashes only, never data) into one
 * `clone_manifests` row that they all read from instead; the foreign keys refuse a
 * deletion that skipped this. Garbage collection keeps the chunks a clone manifest
 * names, and drops manifests no disk reads from any more.
 */
export class Clones1765800000000 implements MigrationInterface {
  name = "Clones1765800000000";

  async up(q: QueryRunner): Promise<void> {
    await q.query(`
      CREATE TABLE clone_manifests (
        id uuid NOT NULL DEFAULT gen_random_uuid(),
        project_id uuid NOT NULL,
        created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
        CONSTRAINT pk_clone_manifests PRIMARY KEY (id),
        CONSTRAINT uq_clone_manifests_project_id UNIQUE (project_id, id),
        CONSTRAINT fk_clone_manifests_project FOREIGN KEY (project_id) REFERENCES projects (id) ON DELETE CASCADE
      )`);
    await q.query(`
      CREATE TABLE clone_manifest_blocks (
        manifest_id uuid NOT NULL,
        block_index bigint NOT NULL,
        hash bytea NOT NULL,
        CONSTRAINT pk_clone_manifest_blocks PRIMARY KEY (manifest_id, block_index),
        CONSTRAINT fk_clone_manifest_blocks_manifest FOREIGN KEY (manifest_id) REFERENCES clone_manifests (id) ON DELETE CASCADE
      )`);
    // Garbage collection asks whether anything still names a chunk.
    await q.query(`CREATE INDEX ix_clone_manifest_blocks_hash ON clone_manifest_blocks (hash)`);
    await q.query(`ALTER TABLE disks
      ADD COLUMN clone_backup_id uuid,
      ADD COLUMN clone_image_id uuid,
      ADD COLUMN clone_image_disk_id uuid,
      ADD COLUMN clone_manifest_id uuid,
      ADD CONSTRAINT fk_disks_clone_backup FOREIGN KEY (project_id, clone_backup_id) REFERENCES backups (project_id, id),
      ADD CONSTRAINT fk_disks_clone_image FOREIGN KEY (project_id, clone_image_id) REFERENCES images (project_id, id),
      ADD CONSTRAINT fk_disks_clone_image_disk FOREIGN KEY (clone_image_disk_id) REFERENCES image_disks (id),
      ADD CONSTRAINT fk_disks_clone_manifest FOREIGN KEY (project_id, clone_manifest_id) REFERENCES clone_manifests (project_id, id),
      ADD CONSTRAINT ck_disks_one_clone_source CHECK (num_nonnulls(clone_backup_id, clone_image_disk_id, clone_manifest_id) <= 1),
      ADD CONSTRAINT ck_disks_clone_image CHECK ((clone_image_id IS NULL) = (clone_image_disk_id IS NULL))`);
    await q.query(`CREATE INDEX ix_disks_clone_backup ON disks (clone_backup_id) WHERE clone_backup_id IS NOT NULL`);
    await q.query(`CREATE INDEX ix_disks_clone_image ON disks (clone_image_id) WHERE clone_image_id IS NOT NULL`);
    await q.query(`CREATE INDEX ix_disks_clone_image_disk ON disks (clone_image_disk_id) WHERE clone_image_disk_id IS NOT NULL`);
    await q.query(`CREATE INDEX ix_disks_clone_manifest ON disks (clone_manifest_id) WHERE clone_manifest_id IS NOT NULL`);
  }

  async down(q: QueryRunner): Promise<void> {
    await q.query(`DROP INDEX ix_disks_clone_manifest`);
    await q.query(`DROP INDEX ix_disks_clone_image_disk`);
    await q.query(`DROP INDEX ix_disks_clone_image`);
    await q.query(`DROP INDEX ix_disks_clone_backup`);
    await q.query(`ALTER TABLE disks
      DROP CONSTRAINT ck_disks_clone_image, DROP CONSTRAINT ck_disks_one_clone_source,
      DROP CONSTRAINT fk_disks_clone_manifest, DROP CONSTRAINT fk_disks_clone_image_disk, DROP CONSTRAINT fk_disks_clone_image, DROP CONSTRAINT fk_disks_clone_backup,
      DROP COLUMN clone_manifest_id, DROP COLUMN clone_image_disk_id, DROP COLUMN clone_image_id, DROP COLUMN clone_backup_id`);
    await q.query(`DROP TABLE clone_manifest_blocks`);
    await q.query(`DROP TABLE clone_manifests`);
  }
}
