import { Column, CreateDateColumn, Entity, PrimaryGeneratedColumn, UpdateDateColumn } from "typeorm";
import { bigintNumber } from "./columns";
import { BackupResourceType, BackupStatus, BackupTrigger, DiskType } from "./enums";

@Entity("backups")
export class Backup {
  @PrimaryGeneratedColumn("uuid") id: string;
  @Column("uuid") projectId: string;
  @Column("text") name: string;
  @Column("text", { default: "" }) description: string;
  @Column("text") resourceType: BackupResourceType;
  /** The backed-up server or disk; kept when that resource is deleted. */
  @Column("uuid") resourceId: string;
  @Column("text") resourceName: string;
  @Column("uuid", { nullable: true }) serverId: string | null;
  @Column("uuid", { nullable: true }) diskId: string | null;
  @Column("text") status: BackupStatus;
  @Column("text") trigger: BackupTrigger;
  @Column("uuid", { nullable: true }) policyId: string | null;
  /** The server backup this disk backup belongs to. */
  @Column("uuid", { nullable: true }) parentId: string | null;
  @Column("uuid", { nullable: true }) jobId: string | null;
  /** The previous backup of the same disk that this one holds changes against. */
  @Column("uuid", { nullable: true }) baseId: string | null;
  /** The disk's write version at the instant of the backup. */
  @Column("bigint", { transformer: bigintNumber, nullable: true }) snapshotVersion: number | null;
  @Column("bigint", { transformer: bigintNumber, nullable: true }) diskSizeBytes: number | null;
  @Column("text", { nullable: true }) diskType: DiskType | null;
  @Column("text", { nullable: true }) device: string | null;
  @Column("bigint", { transformer: bigintNumber, default: 0 }) sizeBytes: number;
  @Column("bigint", { transformer: bigintNumber, default: 0 }) storedBytes: number;
  @Column("real", { default: 0 }) progress: number;
  /** Why the backup is ERROR: a job failure code (CORRUPT_CHUNK once a restore or verification found damage), with `error` the message. */
  @Column("text", { nullable: true }) errorCode: string | null;
  @Column("text", { nullable: true }) error: string | null;
  @CreateDateColumn({ type: "timestamptz" }) createdAt: Date;
  @Column("timestamptz", { nullable: true }) completedAt: Date | null;
  @UpdateDateColumn({ type: "timestamptz" }) updatedAt: Date;
}
