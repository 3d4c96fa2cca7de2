import crypto from "node:crypto";
import type { EntityManager } from "typeorm";
import { Disk, DiskStatus, NbdExport } from "../entities";
import { badInput, failedPrecondition, notFound } from "../domain/errors";
import type { RequestContext } from "./context";
import { decodeId, fromGlobalId } from "./global-id";
import type { ListSelection, PageArgs } from "./pagination";

/** What the NBD edge learns from a valid export name. */
export interface OpenedExport {
  id: string;
  projectId: string;
  diskId: string;
  readOnly: boolean;
  sizeBytes: number;
}

/** Random bytes in an export name: as unguessable as an API key. */
const NAME_BYTES = 32;

/**
 * Disks over NBD: an export is a capability name bound to one disk, one project and
 * one mode. Deleting it (or the disk, or detaching the disk) revokes it; the NBD edge
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
    if (parsed && (parsed.type === "Backup" || parsed.type === "Image")) throw badInput("resourceId", "only disks can be served over NBD");
    const diskId = decodeId(input.resourceId, "Disk", "resourceId");
    if (ctx.config.nbdPort === 0) throw failedPrecondition("NBD is turned off on this service (NBD_PORT=0)");
    const readOnly = input.readOnly ?? false;
    const exp = await ctx.ds.transaction(async (em) => {
      const disk = await em.findOne(Disk, { where: { id: diskId, projectId: ctx.projectId }, lock: { mode: "pessimistic_read" } });
      if (!disk) throw notFound("disk", input.resourceId);
      if (disk.status === DiskStatus.CREATING || disk.status === DiskStatus.RESTORING || disk.status === DiskStatus.ERROR) {
        throw failedPrecondition(`disk is ${disk.status}; it can be served over NBD once it is AVAILABLE or IN_USE`);
      }
      return em.save(em.create(NbdExport, { projectId: ctx.projectId, diskId, readOnly, name: crypto.randomBytes(NAME_BYTES).toString("base64url") }));
    });
    ctx.invalidate();
    return exp;
  }

  async delete(ctx: RequestContext, globalId: string): Promise<NbdExport> {
    const id = decodeId(globalId, "NbdExport", "id");
    const [rows] = (await ctx.ds.query(`DELETE FROM nbd_exports WHERE id = $1 AND project_id = $2 RETURNING id, project_id, disk_id, read_only, created_at`, [id, ctx.projectId])) as [
      { id: string; project_id: string; disk_id: string; read_only: boolean; created_at: Date }[],
      number,
    ];
    const row = rows[0];
    if (!row) throw notFound("NBD export", globalId);
    this.onRevoke?.([row.id]);
    ctx.invalidate();
    return Object.assign(new NbdExport(), { id: row.id, projectId: row.project_id, diskId: row.disk_id, readOnly: row.read_only, createdAt: row.created_at, name: "" });
  }

  /** Revokes every export of these disks, in the caller's transaction (a detach, a restore); the edge drops their connections. */
  async revokeDisks(em: EntityManager, diskIds: string[]): Promise<void> {
    if (!diskIds.length) return;
    const rows: { id: string }[] = await em.query(`DELETE FROM nbd_exports WHERE disk_id = ANY($1) RETURNING id`, [diskIds]);
    if (rows.length) this.onRevoke?.(rows.map((r) => r.id));
  }

  /** The export a client names, with its disk; null when no export has that name (whatever the reason). */
  async open(em: EntityManager, name: string): Promise<OpenedExport | null> {
    const rows: { id: string; project_id: string; disk_id: string; read_only: boolean; size_bytes: string; status: DiskStatus }[] = await em.query(
      `SELECT e.id, e.project_id, e.disk_id, e.read_only, d.size_bytes, d.status
         FROM nbd_exports e JOIN disks d ON d.id = e.disk_id AND d.project_id = e.project_id
        WHERE e.name = $1`,
      [name],
    );
    const r = rows[0];
    if (!r || r.status === DiskStatus.CREATING || r.status === DiskStatus.RESTORING || r.status === DiskStatus.ERROR) return null;
    return { id: r.id, projectId: r.project_id, diskId: r.disk_id, readOnly: r.read_only, sizeBytes: Number(r.size_bytes) };
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
