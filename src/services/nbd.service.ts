import crypto from "node:crypto";
import type { EntityManager } from "typeorm";
import { Backup, BackupResourceType, BackupStatus, Disk, DiskStatus, Image, ImageStatus, ImageType, NbdExport } from "../entities";
import type { BlockSource } from "../storage/manifest";
import { badInput, failedPrecondition, notFound } from "../domain/errors";
import type { RequestContext } from "./context";
import { decodeId, fromGlobalId } from "./global-id";
import type { ListSelection, PageArgs } from "./pagination";

/** What the NBD edge learns from a valid export name. */
export interface OpenedExport {
  id: string;
  projectId: string;
  /** The disk served; null for a backup or image served from the vault (`vault`). */
  diskId: string | null;
  vault: BlockSource | null;
  readOnly: boolean;
  sizeBytes: number;
}

/** Random bytes in an export name: as unguessable as an API key. */
const NAME_BYTES = 32;
const newName = () => crypto.randomBytes(NAME_BYTES).toString("base64url");

/**
 * Disks, backups and images over NBD: an export is a capability name bound to one
 * disk (or disk backup, or image), one project and one mode. Deleting it (or the disk, or detaching the disk) revokes it; the NBD edge
 * drops the connections of a revoked export within a second, at once in this process.
 */
export class NbdService {
  /** Set by the NBD server of this process: told of exports revoked here. */
  onRevoke: ((exportIds: string[]) => void) | null = null;

  list(ctx: RequestContext, diskId: string, args: PageArgs, select?: ListSelection) {
    return ctx.loaders.connection("diskNbdExports", diskId, args, [], select);
  }

  async create(ctx: RequestContext, input: { resourceId: string; readOnly?: boolean | null }): Promise<NbdExport> {
    const parsed = fromGlobalId(input.resourceId);
    if (parsed?.type === "Backup" || parsed?.type === "Image") {
      if (input.readOnly === false) throw badInput("readOnly", `a ${parsed.type.toLowerCase()} is served read-only; make a disk from it to write`);
      if (ctx.config.nbdPort === 0) throw failedPrecondition("NBD is turned off on this service (NBD_PORT=0)");
      return parsed.type === "Backup" ? this.createForBackup(ctx, input.resourceId) : this.createForImage(ctx, input.resourceId);
    }
    const diskId = decodeId(input.resourceId, "Disk", "resourceId");
    if (ctx.config.nbdPort === 0) throw failedPrecondition("NBD is turned off on this service (NBD_PORT=0)");
    const readOnly = input.readOnly ?? false;
    const exp = await ctx.ds.transaction(async (em) => {
      const disk = await em.findOne(Disk, { where: { id: diskId, projectId: ctx.projectId }, lock: { mode: "pessimistic_read" } });
      if (!disk) throw notFound("disk", input.resourceId);
      if (disk.status === DiskStatus.CREATING || disk.status === DiskStatus.RESTORING || disk.status === DiskStatus.ERROR) {
        throw failedPrecondition(`disk is ${disk.status}; it can be served over NBD once it is AVAILABLE or IN_USE`);
      }
      return em.save(em.create(NbdExport, { projectId: ctx.projectId, diskId, backupId: null, imageId: null, readOnly, name: newName() }));
    });
    ctx.invalidate();
    return exp;
  }

  /** A disk backup (alone, or one disk of a server backup), served read-only from the vault. */
  private async createForBackup(ctx: RequestContext, globalId: string): Promise<NbdExport> {
    const backupId = decodeId(globalId, "Backup", "resourceId");
    const exp = await ctx.ds.transaction(async (em) => {
      const backup = await em.findOne(Backup, { where: { id: backupId, projectId: ctx.projectId }, lock: { mode: "pessimistic_read" } });
      if (!backup) throw notFound("backup", globalId);
      if (backup.resourceType === BackupResourceType.SERVER && !backup.parentId) {
        throw badInput("resourceId", "a server backup holds several disks; serve one of its disk backups (its children)");
      }
      if (backup.status !== BackupStatus.AVAILABLE && backup.status !== BackupStatus.RESTORING) {
        throw failedPrecondition(`backup is ${backup.status}; it can be served over NBD once it is AVAILABLE`);
      }
      return em.save(em.create(NbdExport, { projectId: ctx.projectId, diskId: null, backupId, imageId: null, readOnly: true, name: newName() }));
    });
    ctx.invalidate();
    return exp;
  }

  /** A SYSTEM_DISK or DATA_DISK image, served read-only from the vault. */
  private async createForImage(ctx: RequestContext, globalId: string): Promise<NbdExport> {
    const imageId = decodeId(globalId, "Image", "resourceId");
    const exp = await ctx.ds.transaction(async (em) => {
      const image = await em.findOne(Image, { where: { id: imageId, projectId: ctx.projectId }, lock: { mode: "pessimistic_read" } });
      if (!image) throw notFound("image", globalId);
      if (image.type === ImageType.FULL_SERVER) throw badInput("resourceId", "a FULL_SERVER image holds several disks; serve a SYSTEM_DISK or DATA_DISK image, or a disk backup");
      if (image.status !== ImageStatus.ACTIVE) throw failedPrecondition(`image is ${image.status}; it can be served over NBD once it is ACTIVE`);
      return em.save(em.create(NbdExport, { projectId: ctx.projectId, diskId: null, backupId: null, imageId, readOnly: true, name: newName() }));
    });
    ctx.invalidate();
    return exp;
  }

  async delete(ctx: RequestContext, globalId: string): Promise<NbdExport> {
    const id = decodeId(globalId, "NbdExport", "id");
    const [rows] = (await ctx.ds.query(`DELETE FROM nbd_exports WHERE id = $1 AND project_id = $2 RETURNING id, project_id, disk_id, backup_id, image_id, read_only, created_at`, [
      id,
      ctx.projectId,
    ])) as [{ id: string; project_id: string; disk_id: string | null; backup_id: string | null; image_id: string | null; read_only: boolean; created_at: Date }[], number];
    const row = rows[0];
    if (!row) throw notFound("NBD export", globalId);
    this.onRevoke?.([row.id]);
    ctx.invalidate();
    return Object.assign(new NbdExport(), {
      id: row.id,
      projectId: row.project_id,
      diskId: row.disk_id,
      backupId: row.backup_id,
      imageId: row.image_id,
      readOnly: row.read_only,
      createdAt: row.created_at,
      name: "",
    });
  }

  /** Revokes every export of these disks, in the caller's transaction (a detach, a restore); the edge drops their connections. */
  async revokeDisks(em: EntityManager, diskIds: string[]): Promise<void> {
    if (!diskIds.length) return;
    const rows: { id: string }[] = await em.query(`DELETE FROM nbd_exports WHERE disk_id = ANY($1) RETURNING id`, [diskIds]);
    if (rows.length) this.onRevoke?.(rows.map((r) => r.id));
  }

  /**
   * The export a client names, with what it serves; null when no export has that name, or
   * what it names cannot be read now (whatever the reason).
   */
  async open(em: EntityManager, name: string): Promise<OpenedExport | null> {
    const rows: {
      id: string;
      project_id: string;
      disk_id: string | null;
      backup_id: string | null;
      image_disk_id: string | null;
      read_only: boolean;
      size_bytes: string | null;
      readable: boolean;
    }[] = await em.query(
      `SELECT e.id, e.project_id, e.disk_id, e.backup_id, idk.id AS image_disk_id, e.read_only,
              coalesce(d.size_bytes, b.disk_size_bytes, idk.size_bytes) AS size_bytes,
              coalesce(d.status IN ('AVAILABLE', 'IN_USE'), b.status IN ('AVAILABLE', 'RESTORING'), i.status = 'ACTIVE', false) AS readable
         FROM nbd_exports e
         LEFT JOIN disks d ON d.id = e.disk_id AND d.project_id = e.project_id
         LEFT JOIN backups b ON b.id = e.backup_id AND b.project_id = e.project_id
         LEFT JOIN images i ON i.id = e.image_id AND i.project_id = e.project_id
         LEFT JOIN image_disks idk ON idk.image_id = i.id AND idk.disk_index = 0
        WHERE e.name = $1`,
      [name],
    );
    const r = rows[0];
    if (!r || !r.readable || r.size_bytes === null) return null;
    const vault = r.backup_id ? { backupId: r.backup_id } : r.image_disk_id ? { imageDiskId: r.image_disk_id } : null;
    if (!r.disk_id && !vault) return null;
    return { id: r.id, projectId: r.project_id, diskId: r.disk_id, vault, readOnly: r.read_only, sizeBytes: Number(r.size_bytes) };
  }

  /** Which of these exports still exist. */
  async live(em: EntityManager, ids: string[]): Promise<Set<string>> {
    if (!ids.length) return new Set();
    const rows: { id: string }[] = await em.query(`SELECT id FROM nbd_exports WHERE id = ANY($1)`, [ids]);
    return new Set(rows.map((r) => r.id));
  }

  /**
   * Whether the disk's bytes may be written now (not being created or restored), and how many
   * restores it has had (null: the disk is gone); read under the disk's write lock.
   */
  async writeState(em: EntityManager, projectId: string, diskId: string): Promise<{ writable: boolean; restores: number | null }> {
    const rows: { status: DiskStatus; restores: number }[] = await em.query(`SELECT status, restores FROM disks WHERE id = $1 AND project_id = $2`, [diskId, projectId]);
    const s = rows[0]?.status;
    return { writable: s === DiskStatus.AVAILABLE || s === DiskStatus.IN_USE, restores: rows[0]?.restores ?? null };
  }
}
