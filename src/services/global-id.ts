import { badInput } from "../domain/errors";

export const NODE_TYPES = ["Server", "Disk", "Backup", "Image", "ImageExport", "Policy", "Job", "Project", "NbdExport"] as const;
export type NodeType = (typeof NODE_TYPES)[number];

const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;
export const isUuid = (s: string) => UUID.test(s);

/** Opaque global IDs: base64url of "Type:uuid". */
export function toGlobalId(type: NodeType, id: string): string {
  return Buffer.from(`${type}:${id}`, "utf8").toString("base64url");
}

export function fromGlobalId(globalId: string): { type: NodeType; id: string } | null {
  if (typeof globalId !== "string" || globalId.length > 200) return null;
  const raw = Buffer.from(globalId, "base64url").toString("utf8");
  const sep = raw.indexOf(":");
  if (sep < 0) return null;
  const type = raw.slice(0, sep) as NodeType;
  const id = raw.slice(sep + 1);
  if (!NODE_TYPES.includes(type) || !UUID.test(id)) return null;
  return { type, id };
}

/** The uuid of a global ID of the expected type; a malformed or foreign ID is bad input naming `field`. */
export function decodeId(globalId: string, type: NodeType, field: string): string {
  const parsed = fromGlobalId(globalId);
  if (!parsed || parsed.type !== type) throw badInput(field, `not a ${type} ID`);
  return parsed.id;
}

/** Short form used in default names (manualbk_1a2b3c4d). */
export const shortId = (uuid: string) => uuid.replace(/-/g, "").slice(0, 8);
