import { Column, CreateDateColumn, Entity, PrimaryGeneratedColumn, UpdateDateColumn } from "typeorm";
import { bigintNumber } from "./columns";
import { JobStatus, JobType } from "./enums";

@Entity("jobs")
export class Job {
  @PrimaryGeneratedColumn("uuid") id: string;
  @Column("uuid") projectId: string;
  @Column("text") type: JobType;
  @Column("text") status: JobStatus;
  @Column("real", { default: 0 }) progress: number;
  @Column("bigint", { transformer: bigintNumber, default: 0 }) bytesDone: number;
  @Column("bigint", { transformer: bigintNumber, default: 0 }) bytesTotal: number;
  @Column("int", { default: 0 }) attempts: number;
  /** Blocks the job read, wrote, hashed or enumerated: its work, which grows with the data, not with a disk's size. */
  @Column("bigint", { transformer: bigintNumber, default: 0 }) blocksVisited: number;
  @Column("boolean", { default: false }) cancelRequested: boolean;
  /** Typed by the job's type: see JobPayloads in src/domain/jobs.ts. */
  @Column("jsonb", { default: {} }) payload: object;
  @Column("text", { nullable: true }) errorCode: string | null;
  @Column("text", { nullable: true }) errorMessage: string | null;
  @Column("uuid", { nullable: true }) serverId: string | null;
  @Column("uuid", { nullable: true }) diskId: string | null;
  @Column("uuid", { nullable: true }) backupId: string | null;
  @Column("uuid", { nullable: true }) imageId: string | null;
  @Column("uuid", { nullable: true }) policyId: string | null;
  @Column("uuid", { nullable: true }) exportId: string | null;
  /** The process running it, and when that process last said it is alive. */
  @Column("text", { nullable: true }) workerId: string | null;
  @Column("timestamptz", { nullable: true }) heartbeatAt: Date | null;
  @CreateDateColumn({ type: "timestamptz" }) createdAt: Date;
  @Column("timestamptz", { nullable: true }) startedAt: Date | null;
  @Column("timestamptz", { nullable: true }) finishedAt: Date | null;
  @UpdateDateColumn({ type: "timestamptz" }) updatedAt: Date;
}
