import type { MigrationInterface, QueryRunner } from "typeorm";

/**
 * The resource graph. Foreign keys between resources are composite
 * (project_id, id), so a row can only ever point at a row of its own project.
 * created_at uses clock_timestamp() so rows inserted by one transaction keep
 * their insertion order (a server's system disk before its data disks).
 */
export class Initial1764000000000 implements MigrationInterface {
  name = "Initial1764000000000";

  async up(q: QueryRunner): Promise<void> {
    await q.query(`
      CREATE TABLE projects (
        id uuid NOT NULL DEFAULT gen_random_uuid(),
        name text NOT NULL,
        created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
        CONSTRAINT pk_projects PRIMARY KEY (id),
        CONSTRAINT uq_projects_name UNIQUE (name),
        CONSTRAINT ck_projects_name CHECK (name ~ '^[a-z0-9][a-z0-9_-]{0,62}$')
      )`);

    await q.query(`
      CREATE TABLE api_keys (
        id uuid NOT NULL DEFAULT gen_random_uuid(),
        project_id uuid NOT NULL,
        key_hash text NOT NULL,
        prefix text NOT NULL,
        created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
        revoked_at timestamptz,
        CONSTRAINT pk_api_keys PRIMARY KEY (id),
        CONSTRAINT uq_api_keys_key_hash UNIQUE (key_hash),
        CONSTRAINT fk_api_keys_project FOREIGN KEY (project_id) REFERENCES projects (id) ON DELETE CASCADE
      )`);
    await q.query(`CREATE INDEX ix_api_keys_project ON api_keys (project_id)`);

    await q.query(`
      CREATE TABLE servers (
        id uuid NOT NULL DEFAULT gen_random_uuid(),
        project_id uuid NOT NULL,
        name text NOT NULL,
        status text NOT NULL,
        vcpus integer NOT NULL,
        memory_mib integer NOT NULL,
        os_type text NOT NULL,
        source_image_id uuid,
        created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
        updated_at timestamptz NOT NULL DEFAULT now(),
        CONSTRAINT pk_servers PRIMARY KEY (id),
        CONSTRAINT uq_servers_project_id UNIQUE (project_id, id),
        CONSTRAINT fk_servers_project FOREIGN KEY (project_id) REFERENCES projects (id) ON DELETE CASCADE,
        CONSTRAINT ck_servers_status CHECK (status IN ('BUILDING', 'ACTIVE', 'SHUTOFF', 'RESTORING', 'ERROR')),
        CONSTRAINT ck_servers_os_type CHECK (os_type IN ('LINUX', 'WINDOWS', 'OTHER')),
        CONSTRAINT ck_servers_vcpus CHECK (vcpus > 0),
        CONSTRAINT ck_servers_memory CHECK (memory_mib > 0)
      )`);

    await q.query(`
      CREATE TABLE disks (
        id uuid NOT NULL DEFAULT gen_random_uuid(),
        project_id uuid NOT NULL,
        name text NOT NULL,
        type text NOT NULL,
        size_bytes bigint NOT NULL,
        used_bytes bigint NOT NULL DEFAULT 0,
        status text NOT NULL,
        server_id uuid,
        device text,
        source_image_id uuid,
        source_backup_id uuid,
        created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
        updated_at timestamptz NOT NULL DEFAULT now(),
        CONSTRAINT pk_disks PRIMARY KEY (id),
        CONSTRAINT uq_disks_project_id UNIQUE (project_id, id),
        CONSTRAINT fk_disks_project FOREIGN KEY (project_id) REFERENCES projects (id) ON DELETE CASCADE,
        CONSTRAINT fk_disks_server FOREIGN KEY (project_id, server_id) REFERENCES servers (project_id, id) ON DELETE SET NULL (server_id),
        CONSTRAINT uq_disks_server_device UNIQUE (server_id, device),
        CONSTRAINT ck_disks_type CHECK (type IN ('SYSTEM', 'DATA')),
        CONSTRAINT ck_disks_status CHECK (status IN ('CREATING', 'AVAILABLE', 'IN_USE', 'RESTORING', 'ERROR')),
        CONSTRAINT ck_disks_size CHECK (size_bytes > 0 AND used_bytes >= 0),
        CONSTRAINT ck_disks_attachment CHECK ((server_id IS NULL) = (device IS NULL)),
        CONSTRAINT ck_disks_device CHECK (device IS NULL OR device ~ '^/dev/vd[a-z]$')
      )`);
    await q.query(`CREATE UNIQUE INDEX uq_disks_one_system_disk ON disks (server_id) WHERE type = 'SYSTEM'`);
    await q.query(`CREATE INDEX ix_disks_server ON disks (server_id)`);

    await q.query(`
      CREATE TABLE policies (
        id uuid NOT NULL DEFAULT gen_random_uuid(),
        project_id uuid NOT NULL,
        name text NOT NULL,
        enabled boolean NOT NULL DEFAULT true,
        schedule text[] NOT NULL,
        timezone text NOT NULL,
        max_backups integer,
        retention_days integer,
        keep_daily integer NOT NULL DEFAULT 0,
        keep_weekly integer NOT NULL DEFAULT 0,
        keep_monthly integer NOT NULL DEFAULT 0,
        keep_yearly integer NOT NULL DEFAULT 0,
        last_run_at timestamptz,
        next_run_at timestamptz,
        created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
        updated_at timestamptz NOT NULL DEFAULT now(),
        CONSTRAINT pk_policies PRIMARY KEY (id),
        CONSTRAINT uq_policies_project_id UNIQUE (project_id, id),
        CONSTRAINT fk_policies_project FOREIGN KEY (project_id) REFERENCES projects (id) ON DELETE CASCADE,
        CONSTRAINT ck_policies_schedule CHECK (cardinality(schedule) BETWEEN 1 AND 24),
        CONSTRAINT ck_policies_retention CHECK (
          (max_backups IS NULL OR max_backups BETWEEN 1 AND 99999)
          AND (retention_days IS NULL OR retention_days BETWEEN 1 AND 99999)
          AND keep_daily BETWEEN 0 AND 100 AND keep_weekly BETWEEN 0 AND 100
          AND keep_monthly BETWEEN 0 AND 100 AND keep_yearly BETWEEN 0 AND 100)
      )`);
    await q.query(`CREATE INDEX ix_policies_due ON policies (next_run_at) WHERE enabled`);

    await q.query(`
      CREATE TABLE policy_bindings (
        id uuid NOT NULL DEFAULT gen_random_uuid(),
        project_id uuid NOT NULL,
        policy_id uuid NOT NULL,
        server_id uuid,
        disk_id uuid,
        created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
        CONSTRAINT pk_policy_bindings PRIMARY KEY (id),
        CONSTRAINT fk_policy_bindings_policy FOREIGN KEY (project_id, policy_id) REFERENCES policies (project_id, id) ON DELETE CASCADE,
        CONSTRAINT fk_policy_bindings_server FOREIGN KEY (project_id, server_id) REFERENCES servers (project_id, id) ON DELETE CASCADE,
        CONSTRAINT fk_policy_bindings_disk FOREIGN KEY (project_id, disk_id) REFERENCES disks (project_id, id) ON DELETE CASCADE,
        CONSTRAINT ck_policy_bindings_one_resource CHECK ((server_id IS NULL) <> (disk_id IS NULL)),
        CONSTRAINT uq_policy_bindings_server UNIQUE (server_id),
        CONSTRAINT uq_policy_bindings_disk UNIQUE (disk_id)
      )`);
    await q.query(`CREATE INDEX ix_policy_bindings_policy ON policy_bindings (policy_id)`);
    await q.query(`CREATE INDEX ix_policy_bindings_project ON policy_bindings (project_id)`);

    await q.query(`
      CREATE TABLE jobs (
        id uuid NOT NULL DEFAULT gen_random_uuid(),
        project_id uuid NOT NULL,
        type text NOT NULL,
        status text NOT NULL,
        progress real NOT NULL DEFAULT 0,
        bytes_done bigint NOT NULL DEFAULT 0,
        bytes_total bigint NOT NULL DEFAULT 0,
        attempts integer NOT NULL DEFAULT 0,
        cancel_requested boolean NOT NULL DEFAULT false,
        payload jsonb NOT NULL DEFAULT '{}',
        error_code text,
        error_message text,
        server_id uuid,
        disk_id uuid,
        backup_id uuid,
        image_id uuid,
        policy_id uuid,
        export_id uuid,
        created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
        started_at timestamptz,
        finished_at timestamptz,
        updated_at timestamptz NOT NULL DEFAULT now(),
        CONSTRAINT pk_jobs PRIMARY KEY (id),
        CONSTRAINT uq_jobs_project_id UNIQUE (project_id, id),
        CONSTRAINT fk_jobs_project FOREIGN KEY (project_id) REFERENCES projects (id) ON DELETE CASCADE,
        CONSTRAINT fk_jobs_server FOREIGN KEY (project_id, server_id) REFERENCES servers (project_id, id) ON DELETE SET NULL (server_id),
        CONSTRAINT fk_jobs_disk FOREIGN KEY (project_id, disk_id) REFERENCES disks (project_id, id) ON DELETE SET NULL (disk_id),
        CONSTRAINT fk_jobs_policy FOREIGN KEY (project_id, policy_id) REFERENCES policies (project_id, id) ON DELETE SET NULL (policy_id),
        CONSTRAINT ck_jobs_type CHECK (type IN ('BACKUP', 'RESTORE', 'CREATE_IMAGE', 'IMPORT_IMAGE', 'EXPORT_IMAGE', 'CREATE_DISK', 'DELETE_BACKUP', 'VERIFY_BACKUP')),
        CONSTRAINT ck_jobs_status CHECK (status IN ('QUEUED', 'RUNNING', 'SUCCEEDED', 'FAILED', 'CANCELLED')),
        CONSTRAINT ck_jobs_progress CHECK (progress BETWEEN 0 AND 1),
        CONSTRAINT ck_jobs_bytes CHECK (bytes_done >= 0 AND bytes_total >= 0),
        CONSTRAINT ck_jobs_finished CHECK ((status IN ('SUCCEEDED', 'FAILED', 'CANCELLED')) = (finished_at IS NOT NULL))
      )`);
    await q.query(`CREATE INDEX ix_jobs_project_created ON jobs (project_id, created_at, id)`);
    await q.query(`CREATE INDEX ix_jobs_queue ON jobs (created_at) WHERE status = 'QUEUED'`);
    await q.query(`CREATE INDEX ix_jobs_active ON jobs (status) WHERE status IN ('QUEUED', 'RUNNING')`);
    for (const col of ["server_id", "disk_id", "backup_id", "image_id", "policy_id", "export_id"]) {
      await q.query(`CREATE INDEX ix_jobs_${col.replace("_id", "")} ON jobs (${col})`);
    }

    await q.query(`
      CREATE TABLE backups (
        id uuid NOT NULL DEFAULT gen_random_uuid(),
        project_id uuid NOT NULL,
        name text NOT NULL,
        description text NOT NULL DEFAULT '',
        resource_type text NOT NULL,
        resource_id uuid NOT NULL,
        resource_name text NOT NULL,
        server_id uuid,
        disk_id uuid,
        status text NOT NULL,
        trigger text NOT NULL,
        policy_id uuid,
        parent_id uuid,
        job_id uuid,
        size_bytes bigint NOT NULL DEFAULT 0,
        stored_bytes bigint NOT NULL DEFAULT 0,
        progress real NOT NULL DEFAULT 0,
        error text,
        created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
        completed_at timestamptz,
        expires_at timestamptz,
        updated_at timestamptz NOT NULL DEFAULT now(),
        CONSTRAINT pk_backups PRIMARY KEY (id),
        CONSTRAINT uq_backups_project_id UNIQUE (project_id, id),
        CONSTRAINT fk_backups_project FOREIGN KEY (project_id) REFERENCES projects (id) ON DELETE CASCADE,
        CONSTRAINT fk_backups_server FOREIGN KEY (project_id, server_id) REFERENCES servers (project_id, id) ON DELETE SET NULL (server_id),
        CONSTRAINT fk_backups_disk FOREIGN KEY (project_id, disk_id) REFERENCES disks (project_id, id) ON DELETE SET NULL (disk_id),
        CONSTRAINT fk_backups_policy FOREIGN KEY (project_id, policy_id) REFERENCES policies (project_id, id) ON DELETE SET NULL (policy_id),
        CONSTRAINT fk_backups_parent FOREIGN KEY (project_id, parent_id) REFERENCES backups (project_id, id) ON DELETE CASCADE,
        CONSTRAINT fk_backups_job FOREIGN KEY (project_id, job_id) REFERENCES jobs (project_id, id) ON DELETE SET NULL (job_id),
        CONSTRAINT ck_backups_resource_type CHECK (resource_type IN ('SERVER', 'DISK')),
        CONSTRAINT ck_backups_status CHECK (status IN ('CREATING', 'AVAILABLE', 'RESTORING', 'DELETING', 'ERROR')),
        CONSTRAINT ck_backups_trigger CHECK (trigger IN ('MANUAL', 'POLICY')),
        CONSTRAINT ck_backups_progress CHECK (progress BETWEEN 0 AND 1),
        CONSTRAINT ck_backups_bytes CHECK (size_bytes >= 0 AND stored_bytes >= 0)
      )`);
    await q.query(`CREATE INDEX ix_backups_project_created ON backups (project_id, created_at, id)`);
    await q.query(`CREATE INDEX ix_backups_project_name ON backups (project_id, name, id)`);
    await q.query(`CREATE INDEX ix_backups_project_status ON backups (project_id, status)`);
    await q.query(`CREATE INDEX ix_backups_resource ON backups (resource_id, created_at)`);
    await q.query(`CREATE INDEX ix_backups_server ON backups (server_id)`);
    await q.query(`CREATE INDEX ix_backups_disk ON backups (disk_id)`);
    await q.query(`CREATE INDEX ix_backups_policy ON backups (policy_id)`);
    await q.query(`CREATE INDEX ix_backups_parent ON backups (parent_id)`);
    await q.query(`CREATE INDEX ix_backups_job ON backups (job_id)`);

    await q.query(`
      CREATE TABLE images (
        id uuid NOT NULL DEFAULT gen_random_uuid(),
        project_id uuid NOT NULL,
        name text NOT NULL,
        description text NOT NULL DEFAULT '',
        type text NOT NULL,
        status text NOT NULL,
        source text NOT NULL,
        source_server_id uuid,
        source_disk_id uuid,
        source_backup_id uuid,
        os_type text NOT NULL,
        min_disk_bytes bigint NOT NULL DEFAULT 0,
        virtual_size_bytes bigint NOT NULL DEFAULT 0,
        size_bytes bigint NOT NULL DEFAULT 0,
        checksum text,
        error text,
        created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
        updated_at timestamptz NOT NULL DEFAULT now(),
        CONSTRAINT pk_images PRIMARY KEY (id),
        CONSTRAINT uq_images_project_id UNIQUE (project_id, id),
        CONSTRAINT fk_images_project FOREIGN KEY (project_id) REFERENCES projects (id) ON DELETE CASCADE,
        CONSTRAINT fk_images_server FOREIGN KEY (project_id, source_server_id) REFERENCES servers (project_id, id) ON DELETE SET NULL (source_server_id),
        CONSTRAINT fk_images_disk FOREIGN KEY (project_id, source_disk_id) REFERENCES disks (project_id, id) ON DELETE SET NULL (source_disk_id),
        CONSTRAINT fk_images_backup FOREIGN KEY (project_id, source_backup_id) REFERENCES backups (project_id, id) ON DELETE SET NULL (source_backup_id),
        CONSTRAINT ck_images_type CHECK (type IN ('SYSTEM_DISK', 'DATA_DISK', 'FULL_SERVER')),
        CONSTRAINT ck_images_status CHECK (status IN ('QUEUED', 'SAVING', 'ACTIVE', 'KILLED')),
        CONSTRAINT ck_images_source CHECK (source IN ('SERVER', 'DISK', 'BACKUP', 'IMPORT')),
        CONSTRAINT ck_images_os_type CHECK (os_type IN ('LINUX', 'WINDOWS', 'OTHER')),
        CONSTRAINT ck_images_bytes CHECK (min_disk_bytes >= 0 AND virtual_size_bytes >= 0 AND size_bytes >= 0)
      )`);
    await q.query(`CREATE INDEX ix_images_project_created ON images (project_id, created_at, id)`);
    await q.query(`CREATE INDEX ix_images_project_name ON images (project_id, name, id)`);
    await q.query(`CREATE INDEX ix_images_project_status ON images (project_id, status)`);
    await q.query(`CREATE INDEX ix_images_server ON images (source_server_id)`);
    await q.query(`CREATE INDEX ix_images_disk ON images (source_disk_id)`);
    await q.query(`CREATE INDEX ix_images_backup ON images (source_backup_id)`);
    // IMS: one FULL_SERVER image per backup.
    await q.query(`CREATE UNIQUE INDEX uq_images_full_server_backup ON images (source_backup_id) WHERE type = 'FULL_SERVER' AND status <> 'KILLED'`);

    await q.query(`
      CREATE TABLE image_exports (
        id uuid NOT NULL DEFAULT gen_random_uuid(),
        project_id uuid NOT NULL,
        image_id uuid NOT NULL,
        format text NOT NULL,
        status text NOT NULL,
        size_bytes bigint,
        sha256 text,
        job_id uuid,
        expires_at timestamptz,
        created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
        CONSTRAINT pk_image_exports PRIMARY KEY (id),
        CONSTRAINT uq_image_exports_project_id UNIQUE (project_id, id),
        CONSTRAINT fk_image_exports_image FOREIGN KEY (project_id, image_id) REFERENCES images (project_id, id) ON DELETE CASCADE,
        CONSTRAINT fk_image_exports_job FOREIGN KEY (project_id, job_id) REFERENCES jobs (project_id, id) ON DELETE SET NULL (job_id),
        CONSTRAINT ck_image_exports_format CHECK (format IN ('RAW', 'QCOW2', 'VMDK', 'VHD')),
        CONSTRAINT ck_image_exports_status CHECK (status IN ('QUEUED', 'RUNNING', 'READY', 'FAILED', 'EXPIRED'))
      )`);
    await q.query(`CREATE INDEX ix_image_exports_image ON image_exports (image_id, created_at)`);
    await q.query(`CREATE INDEX ix_image_exports_job ON image_exports (job_id)`);
    await q.query(`CREATE INDEX ix_image_exports_expiry ON image_exports (expires_at) WHERE status = 'READY'`);

    // Resources made from images and backups; added once both tables exist.
    await q.query(`ALTER TABLE servers ADD CONSTRAINT fk_servers_source_image FOREIGN KEY (project_id, source_image_id) REFERENCES images (project_id, id) ON DELETE SET NULL (source_image_id)`);
    await q.query(`ALTER TABLE disks ADD CONSTRAINT fk_disks_source_image FOREIGN KEY (project_id, source_image_id) REFERENCES images (project_id, id) ON DELETE SET NULL (source_image_id)`);
    await q.query(`ALTER TABLE disks ADD CONSTRAINT fk_disks_source_backup FOREIGN KEY (project_id, source_backup_id) REFERENCES backups (project_id, id) ON DELETE SET NULL (source_backup_id)`);
    await q.query(`ALTER TABLE jobs ADD CONSTRAINT fk_jobs_backup FOREIGN KEY (project_id, backup_id) REFERENCES backups (project_id, id) ON DELETE SET NULL (backup_id)`);
    await q.query(`ALTER TABLE jobs ADD CONSTRAINT fk_jobs_image FOREIGN KEY (project_id, image_id) REFERENCES images (project_id, id) ON DELETE SET NULL (image_id)`);
    await q.query(`ALTER TABLE jobs ADD CONSTRAINT fk_jobs_export FOREIGN KEY (project_id, export_id) REFERENCES image_exports (project_id, id) ON DELETE SET NULL (export_id)`);

    // Keyset pagination and filters of the top-level lists.
    for (const table of ["servers", "disks", "policies"]) {
      await q.query(`CREATE INDEX ix_${table}_project_created ON ${table} (project_id, created_at, id)`);
      await q.query(`CREATE INDEX ix_${table}_project_name ON ${table} (project_id, name, id)`);
    }
    await q.query(`CREATE INDEX ix_servers_project_status ON servers (project_id, status)`);
    await q.query(`CREATE INDEX ix_servers_source_image ON servers (source_image_id)`);
    await q.query(`CREATE INDEX ix_disks_project_status ON disks (project_id, status)`);
    await q.query(`CREATE INDEX ix_disks_source_image ON disks (source_image_id)`);
    await q.query(`CREATE INDEX ix_disks_source_backup ON disks (source_backup_id)`);
  }

  async down(q: QueryRunner): Promise<void> {
    await q.query(`ALTER TABLE servers DROP CONSTRAINT fk_servers_source_image`);
    await q.query(`ALTER TABLE disks DROP CONSTRAINT fk_disks_source_image`);
    await q.query(`ALTER TABLE disks DROP CONSTRAINT fk_disks_source_backup`);
    await q.query(`ALTER TABLE jobs DROP CONSTRAINT fk_jobs_backup`);
    await q.query(`ALTER TABLE jobs DROP CONSTRAINT fk_jobs_image`);
    await q.query(`ALTER TABLE jobs DROP CONSTRAINT fk_jobs_export`);
    for (const table of ["image_exports", "images", "backups", "jobs", "policy_bindings", "policies", "disks", "servers", "api_keys", "projects"]) {
      await q.query(`DROP TABLE ${table}`);
    }
  }
}
