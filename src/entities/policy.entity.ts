import { Column, CreateDateColumn, Entity, PrimaryGeneratedColumn, UpdateDateColumn } from "typeorm";

@Entity("policies")
export class Policy {
  @PrimaryGeneratedColumn("uuid") id: string;
  @Column("uuid") projectId: string;
  @Column("text") name: string;
  @Column("boolean", { default: true }) enabled: boolean;
  /** iCalendar RRULEs, read in `timezone`. */
  @Column("text", { array: true }) schedule: string[];
  @Column("text") timezone: string;
  @Column("int", { nullable: true }) maxBackups: number | null;
  @Column("int", { nullable: true }) retentionDays: number | null;
  @Column("int", { default: 0 }) keepDaily: number;
  @Column("int", { default: 0 }) keepWeekly: number;
  @Column("int", { default: 0 }) keepMonthly: number;
  @Column("int", { default: 0 }) keepYearly: number;
  @Column("timestamptz", { nullable: true }) lastRunAt: Date | null;
  @Column("timestamptz", { nullable: true }) nextRunAt: Date | null;
  @CreateDateColumn({ type: "timestamptz" }) createdAt: Date;
  @UpdateDateColumn({ type: "timestamptz" }) updatedAt: Date;
}
