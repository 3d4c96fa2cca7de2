import crypto from "node:crypto";
import type { DataSource } from "typeorm";
import { ApiKey, Project } from "../entities";
import { BLOCK_SIZE } from "../storage/volume-store";
import type { RequestContext } from "./context";
import { translateDbError } from "./db-errors";
import { badInput } from "../domain/errors";

const KEY_PREFIX = "stw_";

/** How long a key found valid is trusted without asking the database again: a revoked key stops working within this. */
export const KEY_CACHE_MS = 5_000;
const KEY_CACHE_ENTRIES = 10_000;

export const hashKey = (key: string) => crypto.createHash("sha256").update(key, "utf8").digest("hex");

export interface StorageUsage {
  diskBytes: number;
  backupCount: number;
  imageCount: number;
  logicalBytes: number;
  cloneSourceBytes: number;
  storedBytes: number;
  dedupRatio: number;
  vaultBytes: number;
  exportBytes: number;
  uploadBytes: number;
}

/** Projects (tenants) and their API keys. These calls come before any request context exists. */
export class ProjectService {
  /** Valid keys by hash, with the project and until when they are trusted. Unknown keys are never kept. */
  private readonly keys = new Map<string, { project: Project; until: number }>();
  private readonly lookups = new Map<string, Promise<Project | null>>();

  constructor(
    private readonly ds: DataSource,
    private readonly now: () => number = Date.now,
  ) {}

  /** Creates a project and its first key; the key is returned once and stored only as a hash. */
  async create(name: string): Promise<{ project: Project; apiKey: string }> {
    if (!/^[a-z0-9][a-z0-9_-]{0,62}$/.test(name)) {
      throw badInput("name", "must be 1 to 63 lower-case letters, digits, '-' or '_', starting with a letter or digit");
    }
    const apiKey = KEY_PREFIX + crypto.randomBytes(32).toString("base64url");
    try {
      const project = await this.ds.transaction(async (em) => {
        const p = await em.save(em.create(Project, { name }));
        await em.save(em.create(ApiKey, { projectId: p.id, keyHash: hashKey(apiKey), prefix: apiKey.slice(0, 10), revokedAt: null }));
        return p;
      });
      return { project, apiKey };
    } catch (err) {
      throw translateDbError(err, { uq_projects_name: `project "${name}" already exists` });
    }
  }

  async count(): Promise<number> {
    return this.ds.getRepository(Project).count();
  }

  async findByName(name: string): Promise<Project | null> {
    return this.ds.getRepository(Project).findOneBy({ name });
  }

  /** The project a bearer key belongs to, or null for a missing, malformed, unknown or revoked key. */
  async authenticate(authorization: string | undefined | null): Promise<Project | null> {
    const match = /^Bearer\s+(\S+)\s*$/i.exec(authorization ?? "");
    if (!match || !match[1].startsWith(KEY_PREFIX) || match[1].length > 200) return null;
    const hash = hashKey(match[1]);
    const known = this.keys.get(hash);
    if (known && known.until > this.now()) return known.project;
    // Requests that arrive together with the same key share one lookup.
    let lookup = this.lookups.get(hash);
    if (!lookup) {
      lookup = this.lookUp(hash).finally(() => this.lookups.delete(hash));
      this.lookups.set(hash, lookup);
    }
    return lookup;
  }

  private async lookUp(hash: string): Promise<Project | null> {
    const started = this.now();
    const rows: Record<string, unknown>[] = await this.ds.query(
      `SELECT p.id, p.name, p.created_at FROM api_keys k JOIN projects p ON p.id = k.project_id
        WHERE k.key_hash = $1 AND k.revoked_at IS NULL`,
      [hash],
    );
    this.keys.delete(hash);
    if (!rows.length) return null;
    const project = this.ds.getRepository(Project).create({ id: rows[0].id as string, name: rows[0].name as string, createdAt: rows[0].created_at as Date });
    if (this.keys.size >= KEY_CACHE_ENTRIES) this.keys.delete(this.keys.keys().next().value!);
    this.keys.set(hash, { project, until: started + KEY_CACHE_MS });
    return project;
  }

  async get(ctx: RequestContext): Promise<Project> {
    return this.ds.getRepository(Project).findOneByOrFail({ id: ctx.projectId });
  }

  /**
   * Storage used by the project. Logical bytes are the written data its backups
   * (their per-disk parts) and its images represent, each counted in full; stored
   * bytes are the distinct compressed chunks its vault holds, whatever refers to
   * them. Backups and images share chunks, so an image of a backed-up disk adds
   * logical bytes and next to nothing stored. Backups and images deleted while disks
   * made from them still read from them leave their block lists behind (clone
   * sources), whose chunks stay stored until those disks are gone or hydrated.
   */
  async usage(ctx: RequestContext): Promise<StorageUsage> {
    const [row] = await this.ds.query(
      `SELECT
         (SELECT coalesce(sum(used_bytes), 0) FROM disks WHERE project_id = $1) AS disk_bytes,
         (SELECT count(*) FROM backups WHERE project_id = $1 AND parent_id IS NULL) AS backup_count,
         (SELECT count(*) FROM images WHERE project_id = $1) AS image_count,
         (SELECT coalesce(sum(size_bytes), 0) FROM backups WHERE project_id = $1 AND resource_type = 'DISK' AND status IN ('AVAILABLE', 'RESTORING')) AS backup_logical,
         (SELECT count(*) * $2 FROM images i JOIN image_disks d ON d.image_id = i.id JOIN image_blocks b ON b.image_disk_id = d.id
           WHERE i.project_id = $1 AND i.status = 'ACTIVE') AS image_logical,
         (SELECT count(*) * $2 FROM clone_manifests m JOIN clone_manifest_blocks b ON b.manifest_id = m.id WHERE m.project_id = $1) AS clone_source_bytes,
         (SELECT coalesce(sum(stored_size), 0) FROM vault_chunks WHERE project_id = $1) AS stored_bytes,
         (SELECT coalesce(sum(size_bytes), 0) FROM vault_packs WHERE project_id = $1) AS vault_bytes,
         (SELECT coalesce(sum(size_bytes), 0) FROM image_exports WHERE project_id = $1 AND status = 'READY') AS export_bytes,
         (SELECT coalesce(sum(size_bytes), 0) FROM uploads WHERE project_id = $1 AND expires_at > now()) AS upload_bytes`,
      [ctx.projectId, BLOCK_SIZE],
    );
    const logicalBytes = Number(row.backup_logical) + Number(row.image_logical);
    const storedBytes = Number(row.stored_bytes);
    return {
      diskBytes: Number(row.disk_bytes),
      backupCount: Number(row.backup_count),
      imageCount: Number(row.image_count),
      logicalBytes,
      cloneSourceBytes: Number(row.clone_source_bytes),
      storedBytes,
      dedupRatio: storedBytes > 0 ? logicalBytes / storedBytes : 1,
      vaultBytes: Number(row.vault_bytes),
      exportBytes: Number(row.export_bytes),
      uploadBytes: Number(row.upload_bytes),
    };
  }
}
