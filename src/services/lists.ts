import { Backup, Disk, Image, ImageExport, Job, NbdExport, Policy, PolicyRun, Server } from "../entities";
import type { ListSource } from "./pagination";

/** Every list of the graph: where its rows live and what groups them by parent. */
export const lists = {
  servers: { entity: Server, table: "servers", key: "t.project_id" },
  disks: { entity: Disk, table: "disks", key: "t.project_id" },
  backups: { entity: Backup, table: "backups", key: "t.project_id" },
  images: { entity: Image, table: "images", key: "t.project_id" },
  policies: { entity: Policy, table: "policies", key: "t.project_id" },
  jobs: { entity: Job, table: "jobs", key: "t.project_id" },

  serverDisks: { entity: Disk, table: "disks", key: "t.server_id" },
  serverBackups: { entity: Backup, table: "backups", key: "t.server_id" },
  serverImages: { entity: Image, table: "images", key: "t.source_server_id" },
  serverPolicies: { entity: Policy, table: "policies", key: "b.server_id", join: "JOIN policy_bindings b ON b.policy_id = t.id" },

  diskBackups: { entity: Backup, table: "backups", key: "t.disk_id" },
  diskImages: { entity: Image, table: "images", key: "t.source_disk_id" },
  diskPolicies: { entity: Policy, table: "policies", key: "b.disk_id", join: "JOIN policy_bindings b ON b.policy_id = t.id" },
  diskNbdExports: { entity: NbdExport, table: "nbd_exports", key: "t.disk_id" },

  backupChildren: { entity: Backup, table: "backups", key: "t.parent_id" },
  backupImages: { entity: Image, table: "images", key: "t.source_backup_id" },

  imageServers: { entity: Server, table: "servers", key: "t.source_image_id" },
  imageDisks: { entity: Disk, table: "disks", key: "t.source_image_id" },
  imageExports: { entity: ImageExport, table: "image_exports", key: "t.image_id" },

  policyServers: { entity: Server, table: "servers", key: "b.policy_id", join: "JOIN policy_bindings b ON b.server_id = t.id" },
  policyDisks: { entity: Disk, table: "disks", key: "b.policy_id", join: "JOIN policy_bindings b ON b.disk_id = t.id" },
  policyBackups: { entity: Backup, table: "backups", key: "t.policy_id", where: "t.parent_id IS NULL" },
  policyRuns: { entity: PolicyRun, table: "policy_runs", key: "t.policy_id" },
} satisfies Record<string, ListSource<any>>;

export type ListName = keyof typeof lists;
