/**
 * Node's file I/O runs on libuv's thread pool, four threads unless told
 * otherwise. The data path keeps several range reads, direct writes and fsyncs
 * in flight at once, and an fsync holds its thread for as long as the disk
 * takes: with four threads, reads queue behind it. The pool is sized when first
 * used, so this module is imported before anything else; UV_THREADPOOL_SIZE set
 * by the operator wins.
 */
process.env.UV_THREADPOOL_SIZE ??= "16";
