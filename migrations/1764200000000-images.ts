import type { MigrationInterface, QueryRunner } from "typeorm";

/**
 * Images keep their own block maps over the same vault as backups: one
 * image_disks row per disk an image holds (one, or every disk of a FULL_SERVER
 * image) and image_blocks pointing each of its blocks at a vault chunk. Uploads
 * are image files waiting to be imported.
 */
export class Images1764200000000 implements MigrationInterface {
  name = "Images1764200000000";

  async up(q: QueryRunner): Promise<void> {
    await q.query(`
      CREATE TABLE image_disks (
        id uuid NOT NULL DEFAULT gen_random_uuid(),
        image_id uuid NOT NULL,
        disk_index integer NOT NULL,
        device text,
        disk_type text NOT NULL,
        size_bytes bigint NOT NULL,
        checksum text,
        CONSTRAINT pk_image_disks PRIMARY KEY (id),
        CONSTRAINT fk_image_disks_image FOREIGN KEY (image_id) REFERENCES images (id) ON DELETE CASCADE,
        CONSTRAINT uq_image_disks_index UNIQUE (image_id, disk_index),
        CONSTRAINT ck_image_disks_type CHECK (disk_type IN ('SYSTEM', 'DATA')),
        CONSTRAINT ck_image_disks_size CHECK (size_bytes > 0)
      )`);

    await q.query(`
      CREATE TABLE image_blocks (
        image_disk_id uuid NOT NULL,
        block_index bigint NOT NULL,
        hash bytea NOT NULL,
        src_segment uuid,
        src_offset bigint,
        CONSTRAINT pk_image_blocks PRIMARY KEY (image_disk_id, block_index),
        CONSTRAINT fk_image_blocks_disk FOREIGN KEY (image_disk_id) REFERENCES image_disks (id) ON DELETE CASCADE,
        CONSTRAINT fk_image_blocks_segment FOREIGN KEY (src_segment) REFERENCES volume_segments (id),
        CONSTRAINT ck_image_blocks_src CHECK ((src_segment IS NULL) = (src_offset IS NULL))
      )`);
    await q.query(`CREATE INDEX ix_image_blocks_hash ON image_blocks (hash)`);
    await q.query(`CREATE INDEX ix_image_blocks_pending ON image_blocks (src_segment) WHERE src_segment IS NOT NULL`);

    await q.query(`
      CREATE TABLE uploads (
        id uuid NOT NULL DEFAULT gen_random_uuid(),
        project_id uuid NOT NULL,
        size_bytes bigint NOT NULL,
        sha256 text NOT NULL,
        created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
        expires_at timestamptz NOT NULL,
        CONSTRAINT pk_uploads PRIMARY KEY (id),
        CONSTRAINT fk_uploads_project FOREIGN KEY (project_id) REFERENCES projects (id) ON DELETE CASCADE,
        CONSTRAINT ck_uploads_sha256 CHECK (sha256 ~ '^[0-9a-f]{64}$')
      )`);
    await q.query(`CREATE INDEX ix_uploads_project ON uploads (project_id)`);
    await q.query(`CREATE INDEX ix_uploads_expiry ON uploads (expires_at)`);
  }

  async down(q: QueryRunner): Promise<void> {
    await q.query(`DROP TABLE uploads`);
    await q.query(`DROP TABLE image_blocks`);
    await q.query(`DROP TABLE image_disks`);
  }
}
