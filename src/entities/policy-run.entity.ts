import { Column, CreateDateColumn, Entity, PrimaryGeneratedColumn } from "typeorm";

export interface SkippedResource {
  resourceType: "SERVER" | "DISK";
  resourceId: string;
  resourceName: string;
  reason: string;
}

/** One run of a policy: on schedule or asked for with runPolicy. */
@Entity("policy_runs")
export class PolicyRun {
  @PrimaryGeneratedColumn("uuid") id: string;
  @Column("uuid") projectId: string;
  @Column("uuid") policyId: string;
  @Column("text") trigger: "SCHEDULE" | "MANUAL";
  /** The occurrence the run served (or when it was asked for). */
  @Column("timestamptz") scheduledFor: Date;
  @Column("timestamptz") startedAt: Date;
  @Column("int", { default: 0 }) backupCount: number;
  @Column("int", { default: 0 }) deletedCount: number;
  @Column("jsonb", { default: [] }) skipped: SkippedResource[];
  @CreateDateColumn({ type: "timestamptz" }) createdAt: Date;
}
