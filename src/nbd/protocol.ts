/**
 * Numbers of the Network Block Device protocol (the NBD project's doc/proto.md):
 * the fixed newstyle handshake, its options and replies, and the transmission
 * phase's requests, replies, flags and errors. Only what this server speaks.
 */

export const NBDMAGIC = 0x4e42444d41474943n;
export const IHAVEOPT = 0x49484156454f5054n;
/** Magic of every option reply. */
export const REPLY_MAGIC = 0x3e889045565a9n;
export const REQUEST_MAGIC = 0x25609513;
export const SIMPLE_REPLY_MAGIC = 0x67446698;
export const STRUCTURED_REPLY_MAGIC = 0x668e33ef;

/** Handshake flags (server). */
export const FLAG_FIXED_NEWSTYLE = 1 << 0;
export const FLAG_NO_ZEROES = 1 << 1;
/** Client flags. */
export const FLAG_C_FIXED_NEWSTYLE = 1 << 0;
export const FLAG_C_NO_ZEROES = 1 << 1;

export enum Opt {
  EXPORT_NAME = 1,
  ABORT = 2,
  LIST = 3,
  STARTTLS = 5,
  INFO = 6,
  GO = 7,
  STRUCTURED_REPLY = 8,
  LIST_META_CONTEXT = 9,
  SET_META_CONTEXT = 10,
}

const ERR = 0x80000000;
export enum Rep {
  ACK = 1,
  SERVER = 2,
  INFO = 3,
  META_CONTEXT = 4,
  ERR_UNSUP = ERR + 1,
  ERR_POLICY = ERR + 2,
  ERR_INVALID = ERR + 3,
  ERR_PLATFORM = ERR + 4,
  ERR_TLS_REQD = ERR + 5,
  ERR_UNKNOWN = ERR + 6,
  ERR_SHUTDOWN = ERR + 7,
  ERR_BLOCK_SIZE_REQD = ERR + 8,
  ERR_TOO_BIG = ERR + 9,
}

export enum Info {
  EXPORT = 0,
  NAME = 1,
  DESCRIPTION = 2,
  BLOCK_SIZE = 3,
}

/** Transmission flags of an export. */
export const TF_HAS_FLAGS = 1 << 0;
export const TF_READ_ONLY = 1 << 1;
export const TF_SEND_FLUSH = 1 << 2;
export const TF_SEND_FUA = 1 << 3;
export const TF_SEND_TRIM = 1 << 5;
export const TF_SEND_WRITE_ZEROES = 1 << 6;
export const TF_SEND_DF = 1 << 7;
export const TF_CAN_MULTI_CONN = 1 << 8;
export const TF_SEND_FAST_ZERO = 1 << 11;

export enum Cmd {
  READ = 0,
  WRITE = 1,
  DISC = 2,
  FLUSH = 3,
  TRIM = 4,
  CACHE = 5,
  WRITE_ZEROES = 6,
  BLOCK_STATUS = 7,
}

/** Command flags. */
export const CMD_FLAG_FUA = 1 << 0;
export const CMD_FLAG_NO_HOLE = 1 << 1;
export const CMD_FLAG_DF = 1 << 2;
export const CMD_FLAG_REQ_ONE = 1 << 3;
export const CMD_FLAG_FAST_ZERO = 1 << 4;

/** Structured reply flags and chunk types. */
export const REPLY_FLAG_DONE = 1 << 0;
export enum Chunk {
  NONE = 0,
  OFFSET_DATA = 1,
  OFFSET_HOLE = 2,
  BLOCK_STATUS = 5,
  ERROR = (1 << 15) + 1,
  ERROR_OFFSET = (1 << 15) + 2,
}

/** base:allocation status bits. */
export const STATE_HOLE = 1 << 0;
export const STATE_ZERO = 1 << 1;

/** Error numbers on the wire (errno values, the same on every platform). */
export enum NbdErr {
  EPERM = 1,
  EIO = 5,
  ENOMEM = 12,
  EINVAL = 22,
  ENOSPC = 28,
  EOVERFLOW = 75,
  ENOTSUP = 95,
  ESHUTDOWN = 108,
}

export const BASE_ALLOCATION = "base:allocation";
/** The only meta context this server has; its ID in replies. */
export const ALLOCATION_CONTEXT_ID = 1;

/** An option's data is at most this long: enough for any name and query list, and a client cannot make us hold more. */
export const MAX_OPTION_BYTES = 64 * 1024;
/** Names at most this long (the protocol's own limit is 4096 bytes). */
export const MAX_NAME_BYTES = 4096;
