import path from "node:path";
import type { DataSource } from "typeorm";
import type { Config } from "../config";
import type { BlobStore } from "./blob-store";
import { FsBlobStore } from "./fs-blob-store";
import { S3BlobStore } from "./s3-blob-store";
import { ChunkCodec } from "./codec";
import { FreeSpace } from "./free-space";
import { UploadStore } from "./uploads";
import { Vault } from "./vault";
import { VolumeStore } from "./volume-store";

export interface Storage {
  volumes: VolumeStore;
  vault: Vault;
  /** Uploads and exports live beside the vault. */
  uploads: UploadStore;
  /** The free-space floor under the local stores (MIN_FREE_BYTES). */
  space: FreeSpace;
  close(): void;
}

/** The volume store and the vault, each on the backend the configuration names. */
export function createStorage(config: Config, ds: DataSource): Storage {
  const made: BlobStore[] = [];
  const open = (backend: "fs" | "s3"): BlobStore => {
    const store = backend === "s3" ? new S3BlobStore(config.s3!) : new FsBlobStore(path.join(config.dataDir, "blobs"));
    made.push(store);
    return store;
  };
  const codec = new ChunkCodec(1, config.codecThreads);
  const vault = new Vault(ds, open(config.vaultBackend), codec, config.vaultCacheBytes);
  const volumes = new VolumeStore(ds, open(config.volumeBackend), vault.blocks);
  return {
    volumes,
    vault,
    uploads: new UploadStore(ds, vault.blobs),
    space: new FreeSpace([volumes.blobs, vault.blobs], config.minFreeBytes),
    close() {
      for (const s of made) {
        if (s instanceof S3BlobStore) s.destroy();
        (s as BlobStore).closeFiles?.();
      }
      void codec.close();
    },
  };
}
