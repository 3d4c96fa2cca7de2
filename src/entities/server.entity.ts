import { Column, CreateDateColumn, Entity, PrimaryGeneratedColumn, UpdateDateColumn } from "typeorm";
import { OsType, ServerStatus } from "./enums";

@Entity("servers")
export class Server {
  @PrimaryGeneratedColumn("uuid") id: string;
  @Column("uuid") projectId: string;
  @Column("text") name: string;
  @Column("text") status: ServerStatus;
  @Column("int") vcpus: number;
  @Column("int") memoryMib: number;
  @Column("text") osType: OsType;
  @Column("uuid", { nullable: true }) sourceImageId: string | null;
  @CreateDateColumn({ type: "timestamptz" }) createdAt: Date;
  @UpdateDateColumn({ type: "timestamptz" }) updatedAt: Date;
}
