import { Column, CreateDateColumn, Entity, PrimaryGeneratedColumn } from "typeorm";

@Entity("projects")
export class Project {
  @PrimaryGeneratedColumn("uuid") id: string;
  @Column("text") name: string;
  @CreateDateColumn({ type: "timestamptz" }) createdAt: Date;
}
