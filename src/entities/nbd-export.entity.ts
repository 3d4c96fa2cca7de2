import { Column, CreateDateColumn, Entity, PrimaryGeneratedColumn } from "typeorm";

/** A disk served over NBD under a capability name, read-write or read-only. */
@Entity("nbd_exports")
export class NbdExport {
  @PrimaryGeneratedColumn("uuid") id: string;
  @Column("uuid") projectId: string;
  @Column("uuid") diskId: string;
  /** The export name clients ask for: the capability itself. */
  @Column("text") name: string;
  @Column("boolean") readOnly: boolean;
  @CreateDateColumn({ type: "timestamptz" }) createdAt: Date;
}
