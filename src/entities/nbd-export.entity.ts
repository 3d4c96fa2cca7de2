import { Column, CreateDateColumn, Entity, PrimaryGeneratedColumn } from "typeorm";

/** A disk (read-write or read-only), a disk backup or an image (read-only) served over NBD under a capability name. */
@Entity("nbd_exports")
export class NbdExport {
  @PrimaryGeneratedColumn("uuid") id: string;
  @Column("uuid") projectId: string;
  /** What is served: exactly one of these. */
  @Column("uuid", { nullable: true }) diskId: string | null;
  @Column("uuid", { nullable: true }) backupId: string | null;
  @Column("uuid", { nullable: true }) imageId: string | null;
  /** The export name clients ask for: the capability itself. */
  @Column("text") name: string;
  @Column("boolean") readOnly: boolean;
  @CreateDateColumn({ type: "timestamptz" }) createdAt: Date;
}
