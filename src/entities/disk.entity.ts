import { Column, CreateDateColumn, Entity, PrimaryGeneratedColumn, UpdateDateColumn } from "typeorm";
import { bigintNumber } from "./columns";
import { DiskStatus, DiskType } from "./enums";

@Entity("disks")
export class Disk {
  @PrimaryGeneratedColumn("uuid") id: string;
  @Column("uuid") projectId: string;
  @Column("text") name: string;
  @Column("text") type: DiskType;
  @Column("bigint", { transformer: bigintNumber }) sizeBytes: number;
  @Column("bigint", { transformer: bigintNumber, default: 0 }) usedBytes: number;
  @Column("text") status: DiskStatus;
  @Column("uuid", { nullable: true }) serverId: string | null;
  @Column("text", { nullable: true }) device: string | null;
  @Column("uuid", { nullable: true }) sourceImageId: string | null;
  @Column("uuid", { nullable: true }) sourceBackupId: string | null;
  /** A clone's source (at most one): the blocks it has not written read as this disk backup's (through its chain), image disk's or clone manifest's. */
  @Column("uuid", { nullable: true }) cloneBackupId: string | null;
  @Column("uuid", { nullable: true }) cloneImageId: string | null;
  @Column("uuid", { nullable: true }) cloneImageDiskId: string | null;
  @Column("uuid", { nullable: true }) cloneManifestId: string | null;
  /** Bumped by every committed write; a backup records the version it captured. */
  @Column("bigint", { transformer: bigintNumber, default: 0 }) writeVersion: number;
  /** The least snapshot version a base of its next backup may have: a restore replaced its bytes at this version, and earlier backups are no bases for what changed since. */
  @Column("bigint", { transformer: bigintNumber, default: 0 }) backupFloor: number;
  @CreateDateColumn({ type: "timestamptz" }) createdAt: Date;
  @UpdateDateColumn({ type: "timestamptz" }) updatedAt: Date;
}
