import { Column, CreateDateColumn, Entity, PrimaryGeneratedColumn } from "typeorm";

/** A server or a disk bound to a policy; each resource to at most one. */
@Entity("policy_bindings")
export class PolicyBinding {
  @PrimaryGeneratedColumn("uuid") id: string;
  @Column("uuid") projectId: string;
  @Column("uuid") policyId: string;
  @Column("uuid", { nullable: true }) serverId: string | null;
  @Column("uuid", { nullable: true }) diskId: string | null;
  @CreateDateColumn({ type: "timestamptz" }) createdAt: Date;
}
