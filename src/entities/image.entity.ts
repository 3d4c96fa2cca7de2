import { Column, CreateDateColumn, Entity, PrimaryGeneratedColumn, UpdateDateColumn } from "typeorm";
import { bigintNumber } from "./columns";
import { ImageSource, ImageStatus, ImageType, OsType } from "./enums";

@Entity("images")
export class Image {
  @PrimaryGeneratedColumn("uuid") id: string;
  @Column("uuid") projectId: string;
  @Column("text") name: string;
  @Column("text", { default: "" }) description: string;
  @Column("text") type: ImageType;
  @Column("text") status: ImageStatus;
  @Column("text") source: ImageSource;
  @Column("uuid", { nullable: true }) sourceServerId: string | null;
  @Column("uuid", { nullable: true }) sourceDiskId: string | null;
  @Column("uuid", { nullable: true }) sourceBackupId: string | null;
  @Column("text") osType: OsType;
  @Column("bigint", { transformer: bigintNumber, default: 0 }) minDiskBytes: number;
  @Column("bigint", { transformer: bigintNumber, default: 0 }) virtualSizeBytes: number;
  @Column("bigint", { transformer: bigintNumber, default: 0 }) sizeBytes: number;
  @Column("text", { nullable: true }) checksum: string | null;
  @Column("text", { nullable: true }) errorCode: string | null;
  @Column("text", { nullable: true }) errorMessage: string | null;
  @CreateDateColumn({ type: "timestamptz" }) createdAt: Date;
  @UpdateDateColumn({ type: "timestamptz" }) updatedAt: Date;
}
