import { Column, CreateDateColumn, Entity, PrimaryGeneratedColumn } from "typeorm";
import { bigintNumber } from "./columns";
import { DiskFormat, ExportStatus } from "./enums";

@Entity("image_exports")
export class ImageExport {
  @PrimaryGeneratedColumn("uuid") id: string;
  @Column("uuid") projectId: string;
  @Column("uuid") imageId: string;
  @Column("text") format: DiskFormat;
  @Column("text") status: ExportStatus;
  @Column("bigint", { transformer: bigintNumber, nullable: true }) sizeBytes: number | null;
  @Column("text", { nullable: true }) sha256: string | null;
  @Column("uuid", { nullable: true }) jobId: string | null;
  @Column("text", { nullable: true }) errorCode: string | null;
  @Column("text", { nullable: true }) errorMessage: string | null;
  @Column("timestamptz", { nullable: true }) expiresAt: Date | null;
  @CreateDateColumn({ type: "timestamptz" }) createdAt: Date;
}
