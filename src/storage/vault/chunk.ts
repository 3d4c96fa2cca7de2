/** Where a pack of a project lives in the blob store. */
export const packKey = (projectId: string, packId: string) => `vault/${projectId}/packs/${packId.slice(0, 2)}/${packId}`;
export const hex = (hash: Buffer) => hash.toString("hex");

export interface ReadOptions {
  /** Check every chunk against its SHA-256, not only its checksum (verification does). */
  sha256?: boolean;
}

export class ChunkError extends Error {
  constructor(
    readonly hash: string,
    readonly problem: "missing" | "corrupt",
    detail: string,
  ) {
    super(`chunk ${hash.slice(0, 16)}… is ${problem}: ${detail}`);
  }
}

/**
 * Chunks of one pack in pack order, as parallel arrays rather than an object per
 * chunk (the data path handles tens of thousands of them a minute): where each
 * sits in the pack, its stored and raw sizes, whether it is compressed, and the
 * SHA-256s back to back in `hashes`.
 */
export interface PackChunks {
  packId: string;
  offsets: Float64Array;
  stored: Uint32Array;
  raw: Uint32Array;
  compressed: Uint8Array;
  hashes: Buffer;
}
