/* ZFile chunk loops (spec 2.3-2.5); twins of zfile_decode/zfile_encode in _pure.py. */
#ifndef OBD_ZFILE_H
#define OBD_ZFILE_H

#include <stddef.h>
#include <stdint.h>

#define OBD_ALGO_LZ4 1
#define OBD_ALGO_ZSTD 2
#define OBD_CHUNK_CRC_SEED 100007u /* overlaybd's salt for chunk CRCs */
#define OBD_ZSTD_LEVEL 3 /* the original's; level 0 selects it (and LZ4_compress_default) */
#define OBD_LZ4HC_LEVEL_MAX 12
#define OBD_ZSTD_LEVEL_MAX 22

enum {
    OBD_ZFILE_OK = 0,
    OBD_ZFILE_CRC,        /* decode: chunk checksum mismatch */
    OBD_ZFILE_DECOMPRESS, /* decode: chunk does not decompress to its expected size */
    OBD_ZFILE_NOMEM,
    OBD_ZFILE_TOO_LARGE,  /* encode: a chunk is too large for the codec or the jump table */
    OBD_ZFILE_COMPRESS,   /* encode: the codec failed */
};

/* Prepare the per-thread codec contexts. Returns 0, or -1 when that fails. */
int obd_zfile_init(void);

/* Bytes zfile_decode writes for `count` chunks: every chunk gives chunk_size bytes except
 * the last, which gives last_length (a negative size counts 0: that chunk fails).
 * Returns 0, or -1 if the total does not fit in size_t. */
int obd_zfile_decoded_size(size_t count, int64_t chunk_size, int64_t last_length,
                           size_t *total);

/* Check and decompress the `count` chunks packed in buf[0..len). stored[i] is chunk i's
 * jump-table length (payload, plus its 4-byte CRC when `verify`). Never reads outside
 * buf, whatever the lengths say: a chunk that does not fit fails the first check that
 * would read it (CRC when verifying, else decompression). `algorithm` is OBD_ALGO_LZ4,
 * OBD_ALGO_ZSTD, or anything else (every chunk then fails to decompress). `out` holds
 * obd_zfile_decoded_size() bytes. On failure *failed is the index of the bad chunk.
 * Thread safe; call without the GIL. */
int obd_zfile_decode(const unsigned char *buf, size_t len, const uint32_t *stored,
                     size_t count, int algorithm, int verify, int64_t chunk_size,
                     int64_t last_length, unsigned char *out, size_t *failed);

/* Number of chunks and an upper bound of the bytes zfile_encode writes; returns -1 when
 * a chunk is too large for the codec or the total overflows. chunk_size > 0. */
int obd_zfile_encode_bound(size_t n, int algorithm, int verify, size_t chunk_size,
                           size_t *count, size_t *bound);

/* Compress data[0..n) in chunk_size pieces (the last may be short), each followed by its
 * salted CRC32C when `verify`. Writes at most `cap` bytes to out and the stored length of
 * every chunk to lengths; *written receives the byte count. Thread safe. */
int obd_zfile_encode(const unsigned char *data, size_t n, int algorithm, int verify,
                     size_t chunk_size, int level, unsigned char *out, size_t cap,
                     uint32_t *lengths, size_t *written);

/* Versions of the codec libraries loaded at run time. */
const char *obd_lz4_version(void);
const char *obd_zstd_version(void);

#endif
