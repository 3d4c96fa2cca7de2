import { Column, CreateDateColumn, Entity, PrimaryGeneratedColumn } from "typeorm";

@Entity("api_keys")
export class ApiKey {
  @PrimaryGeneratedColumn("uuid") id: string;
  @Column("uuid") projectId: string;
  /** SHA-256 of the key, hex; the key itself is never stored. */
  @Column("text") keyHash: string;
  /** The key's first characters, to tell keys apart in listings. */
  @Column("text") prefix: string;
  @CreateDateColumn({ type: "timestamptz" }) createdAt: Date;
  @Column("timestamptz", { nullable: true }) revokedAt: Date | null;
}
