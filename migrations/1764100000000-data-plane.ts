import type { MigrationInterface, QueryRunner } from "typeorm";

/**
 * The data plane.
 *
 * Volume store: a disk is a map of 64 KiB blocks. Written blocks live in
 * append-only segment blobs; disk_blocks points each block at its bytes and
 * carries its SHA-256 and the disk's write version that last changed it, which
 * is the durable changed-block tracking. A NULL segment marks a block that reads
 * as zeros.
 *
 * Vault: content-addressed chunks (SHA-256 of the 64 KiB block), compressed and
 * packed into pack blobs, indexed per project, so dedup never crosses projects.
 *
 * Backups: backup_blocks holds a disk backup's changes against its base (the
 * previous backup of the disk); the chain of bases resolves the whole disk.
 * src_segment/src_offset mark blocks whose bytes are still to be copied into the
 * vault while the backup runs.
 */
export class DataPlane1764100000000 implements MigrationInterface {
  name = "DataPlane1764100000000";

  async up(q: QueryRunner): Promise<void> {
    await q.query(`ALTER TABLE disks ADD COLUMN write_version bigint NOT NULL DEFAULT 0`);

    await q.query(`
      CREATE TABLE volume_segments (
        id uuid NOT NULL DEFAULT gen_random_uuid(),
        project_id uuid NOT NULL,
        disk_id uuid NOT NULL,
        size_bytes bigint NOT NULL,
        created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
        CONSTRAINT pk_volume_segments PRIMARY KEY (id),
        CONSTRAINT ck_volume_segments_size CHECK (size_bytes >= 0)
      )`);
    await q.query(`CREATE INDEX ix_volume_segments_disk ON volume_segments (disk_id)`);

    await q.query(`
      CREATE TABLE disk_blocks (
        disk_id uuid NOT NULL,
        block_index bigint NOT NULL,
        segment_id uuid,
        segment_offset bigint,
        hash bytea,
        version bigint NOT NULL,
        CONSTRAINT pk_disk_blocks PRIMARY KEY (disk_id, block_index),
        CONSTRAINT fk_disk_blocks_disk FOREIGN KEY (disk_id) REFERENCES disks (id) ON DELETE CASCADE,
        CONSTRAINT fk_disk_blocks_segment FOREIGN KEY (segment_id) REFERENCES volume_segments (id),
        CONSTRAINT ck_disk_blocks_data CHECK ((segment_id IS NULL) = (hash IS NULL) AND (segment_id IS NULL) = (segment_offset IS NULL)),
        CONSTRAINT ck_disk_blocks_index CHECK (block_index >= 0)
      )`);
    await q.query(`CREATE INDEX ix_disk_blocks_segment ON disk_blocks (segment_id)`);
    await q.query(`CREATE INDEX ix_disk_blocks_version ON disk_blocks (disk_id, version)`);

    await q.query(`
      CREATE TABLE vault_packs (
        id text NOT NULL,
        project_id uuid NOT NULL,
        size_bytes bigint NOT NULL,
        created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
        CONSTRAINT pk_vault_packs PRIMARY KEY (id),
        CONSTRAINT ck_vault_packs_id CHECK (id ~ '^[0-9a-f]{64}$')
      )`);
    await q.query(`CREATE INDEX ix_vault_packs_project ON vault_packs (project_id)`);

    await q.query(`
      CREATE TABLE vault_chunks (
        project_id uuid NOT NULL,
        hash bytea NOT NULL,
        pack_id text NOT NULL,
        pack_offset bigint NOT NULL,
        stored_size integer NOT NULL,
        raw_size integer NOT NULL,
        compressed boolean NOT NULL,
        CONSTRAINT pk_vault_chunks PRIMARY KEY (project_id, hash),
        CONSTRAINT fk_vault_chunks_pack FOREIGN KEY (pack_id) REFERENCES vault_packs (id),
        CONSTRAINT ck_vault_chunks_hash CHECK (octet_length(hash) = 32),
        CONSTRAINT ck_vault_chunks_sizes CHECK (stored_size > 0 AND raw_size > 0 AND pack_offset >= 0)
      )`);
    await q.query(`CREATE INDEX ix_vault_chunks_pack ON vault_chunks (pack_id)`);

    await q.query(`ALTER TABLE backups
      ADD COLUMN base_id uuid,
      ADD COLUMN snapshot_version bigint,
      ADD COLUMN disk_size_bytes bigint,
      ADD COLUMN disk_type text,
      ADD COLUMN device text,
      ADD CONSTRAINT fk_backups_base FOREIGN KEY (base_id) REFERENCES backups (id) ON DELETE RESTRICT,
      ADD CONSTRAINT ck_backups_disk_type CHECK (disk_type IS NULL OR disk_type IN ('SYSTEM', 'DATA'))`);
    await q.query(`CREATE INDEX ix_backups_base ON backups (base_id)`);
    // One backup at a time per resource (a server backup's disks included), in the database too.
    await q.query(`CREATE UNIQUE INDEX uq_backups_one_running ON backups (resource_id) WHERE status = 'CREATING'`);

    await q.query(`
      CREATE TABLE backup_blocks (
        backup_id uuid NOT NULL,
        block_index bigint NOT NULL,
        hash bytea,
        src_segment uuid,
        src_offset bigint,
        CONSTRAINT pk_backup_blocks PRIMARY KEY (backup_id, block_index),
        CONSTRAINT fk_backup_blocks_backup FOREIGN KEY (backup_id) REFERENCES backups (id) ON DELETE CASCADE,
        CONSTRAINT fk_backup_blocks_segment FOREIGN KEY (src_segment) REFERENCES volume_segments (id),
        CONSTRAINT ck_backup_blocks_src CHECK ((src_segment IS NULL) = (src_offset IS NULL) AND (src_segment IS NULL OR hash IS NOT NULL))
      )`);
    await q.query(`CREATE INDEX ix_backup_blocks_hash ON backup_blocks (hash) WHERE hash IS NOT NULL`);
    await q.query(`CREATE INDEX ix_backup_blocks_pending ON backup_blocks (src_segment) WHERE src_segment IS NOT NULL`);

    await q.query(`ALTER TABLE jobs
      ADD COLUMN worker_id text,
      ADD COLUMN heartbeat_at timestamptz`);
    await q.query(`CREATE INDEX ix_jobs_running ON jobs (heartbeat_at) WHERE status = 'RUNNING'`);
  }

  async down(q: QueryRunner): Promise<void> {
    await q.query(`DROP INDEX ix_jobs_running`);
    await q.query(`ALTER TABLE jobs DROP COLUMN worker_id, DROP COLUMN heartbeat_at`);
    await q.query(`DROP TABLE backup_blocks`);
    await q.query(`DROP INDEX uq_backups_one_running`);
    await q.query(`ALTER TABLE backups DROP CONSTRAINT fk_backups_base, DROP CONSTRAINT ck_backups_disk_type,
      DROP COLUMN base_id, DROP COLUMN snapshot_version, DROP COLUMN disk_size_bytes, DROP COLUMN disk_type, DROP COLUMN device`);
    await q.query(`DROP TABLE vault_chunks`);
    await q.query(`DROP TABLE vault_packs`);
    await q.query(`DROP TABLE disk_blocks`);
    await q.query(`DROP TABLE volume_segments`);
    await q.query(`ALTER TABLE disks DROP COLUMN write_version`);
  }
}
