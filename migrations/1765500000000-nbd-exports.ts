import type { MigrationInterface, QueryRunner } from "typeorm";

/**
 * Disks served over NBD. An export's name is a capability (random, unguessable): whoever
 * holds it reaches the one disk, in the one mode, until the row goes. Deleting the
 * disk or the project takes its exports with it.
 */
export class NbdExports1765500000000 implements MigrationInterface {
  name = "NbdExports1765500000000";

  async up(q: QueryRunner): Promise<void> {
    await q.query(`
      CREATE TABLE nbd_exports (
        id uuid NOT NULL DEFAULT gen_random_uuid(),
        project_id uuid NOT NULL,
        disk_id uuid NOT NULL,
        name text NOT NULL,
        read_only boolean NOT NULL,
        created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
        CONSTRAINT pk_nbd_exports PRIMARY KEY (id),
        CONSTRAINT uq_nbd_exports_project_id UNIQUE (project_id, id),
        CONSTRAINT uq_nbd_exports_name UNIQUE (name),
        CONSTRAINT fk_nbd_exports_project FOREIGN KEY (project_id) REFERENCES projects (id) ON DELETE CASCADE,
        CONSTRAINT fk_nbd_exports_disk FOREIGN KEY (project_id, disk_id) REFERENCES disks (project_id, id) ON DELETE CASCADE
      )`);
    await q.query(`CREATE INDEX ix_nbd_exports_disk ON nbd_exports (disk_id, created_at)`);
  }

  async down(q: QueryRunner): Promise<void> {
    await q.query(`DROP TABLE nbd_exports`);
  }
}
