/* ZFile chunk loops: check the salted CRC32C of each stored chunk and decompress it in
 * place into the caller's output, or compress data into chunks. LZ4 chunks are raw
 * blocks (LZ4_compress_default / LZ4_decompress_safe), ZSTD chunks whole frames at level
 * 3 (ZSTD_compressCCtx, the one-shot ZSTD_compress with a reused context).
 *
 * ZSTD decoding follows python-zstandard's ZstdDecompressor.decompress(payload,
 * max_output_size=expected), which the reference uses, call for call: the frame header
 * decides the output size, then a single ZSTD_decompressStream on a reset context. So
 * both backends accept and refuse the same payloads (frame without content size, extra
 * bytes after the frame, skippable frames, oversized windows...).
 */
#define ZSTD_STATIC_LINKING_ONLY /* ZSTD_getFrameHeader, as python-zstandard uses it */
#include "zfile.h"

#include <limits.h>
#include <lz4.h>
#include <lz4hc.h>
#include <pthread.h>
#include <string.h>
#include <zstd.h>

#include "crc32c.h"

/* One ZSTD context of each kind per thread, created on first use and freed when the
 * thread exits; the loops run without the GIL in several threads at once. */
static pthread_key_t dctx_key, cctx_key;

static void free_dctx(void *p)
{
    ZSTD_freeDCtx(p);
}

static void free_cctx(void *p)
{
    ZSTD_freeCCtx(p);
}

static int keys_ready;

int obd_zfile_init(void)
{
    if (keys_ready)
        return 0;
    if (pthread_key_create(&dctx_key, free_dctx))
        return -1;
    if (pthread_key_create(&cctx_key, free_cctx)) {
        pthread_key_delete(dctx_key);
        return -1;
    }
    keys_ready = 1;
    return 0;
}

static ZSTD_DCtx *thread_dctx(void)
{
    ZSTD_DCtx *d = pthread_getspecific(dctx_key);
    if (!d) {
        d = ZSTD_createDCtx();
        if (d && pthread_setspecific(dctx_key, d)) {
            ZSTD_freeDCtx(d);
            d = NULL;
        }
    }
    return d;
}

static ZSTD_CCtx *thread_cctx(void)
{
    ZSTD_CCtx *c = pthread_getspecific(cctx_key);
    if (!c) {
        c = ZSTD_createCCtx();
        if (c && pthread_setspecific(cctx_key, c)) {
            ZSTD_freeCCtx(c);
            c = NULL;
        }
    }
    return c;
}

static uint32_t load_le32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static void store_le32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)v;
    p[1] = (unsigned char)(v >> 8);
    p[2] = (unsigned char)(v >> 16);
    p[3] = (unsigned char)(v >> 24);
}

int obd_zfile_decoded_size(size_t count, int64_t chunk_size, int64_t last_length,
                           size_t *total)
{
    size_t full = chunk_size > 0 ? (size_t)chunk_size : 0;
    size_t last = last_length > 0 ? (size_t)last_length : 0;
    if (count == 0) {
        *total = 0;
        return 0;
    }
    if (chunk_size > 0 && (uint64_t)chunk_size > SIZE_MAX)
        return -1;
    if (last_length > 0 && (uint64_t)last_length > SIZE_MAX)
        return -1;
    size_t body;
    if (__builtin_mul_overflow(count - 1, full, &body)
        || __builtin_add_overflow(body, last, total))
        return -1;
    return 0;
}

/* 1 when the payload decompresses to exactly `expected` bytes at dst, else 0. */
static int decompress_lz4(const unsigned char *src, size_t n, unsigned char *dst,
                          size_t expected)
{
    if (n > INT_MAX || expected > INT_MAX)
        return 0;
    int got = LZ4_decompress_safe((const char *)src, (char *)dst, (int)n, (int)expected);
    return got >= 0 && (size_t)got == expected;
}

static int decompress_zstd(ZSTD_DCtx *dctx, const unsigned char *src, size_t n,
                           unsigned char *dst, size_t expected)
{
    ZSTD_frameHeader header;
    if (ZSTD_getFrameHeader(&header, src, n) != 0)
        return 0; /* not a frame header, or a truncated one */
    unsigned long long content = header.frameContentSize;
    if (content == 0)
        return expected == 0; /* an empty frame is taken as it is, unread */
    size_t capacity = expected;
    if (content == ZSTD_CONTENTSIZE_UNKNOWN) {
        if (expected == 0)
            return 0; /* no size in the frame and no bound given */
    } else if (content != expected) {
        return 0; /* decompresses to the wrong size, if at all */
    }
    ZSTD_DCtx_reset(dctx, ZSTD_reset_session_only);
    ZSTD_outBuffer out = {dst, capacity, 0};
    ZSTD_inBuffer in = {src, n, 0};
    size_t rc = ZSTD_decompressStream(dctx, &out, &in);
    return !ZSTD_isError(rc) && rc == 0 && out.pos == expected;
}

int obd_zfile_decode(const unsigned char *buf, size_t len, const uint32_t *stored,
                     size_t count, int algorithm, int verify, int64_t chunk_size,
                     int64_t last_length, unsigned char *out, size_t *failed)
{
    ZSTD_DCtx *dctx = NULL;
    if (algorithm == OBD_ALGO_ZSTD && count) {
        dctx = thread_dctx();
        if (!dctx)
            return OBD_ZFILE_NOMEM;
    }
    size_t pos = 0;
    for (size_t i = 0; i < count; i++) {
        int64_t expected = i == count - 1 ? last_length : chunk_size;
        size_t size = stored[i];
        *failed = i;
        if (size > len - pos)
            return verify ? OBD_ZFILE_CRC : OBD_ZFILE_DECOMPRESS; /* beyond the buffer */
        const unsigned char *payload = buf + pos;
        pos += size;
        if (verify) {
            if (size < 4)
                return OBD_ZFILE_CRC; /* no room for the checksum */
            size -= 4;
            if (obd_crc32c(OBD_CHUNK_CRC_SEED, payload, size) != load_le32(payload + size))
                return OBD_ZFILE_CRC;
        }
        if (expected < 0)
            return OBD_ZFILE_DECOMPRESS;
        int ok = 0;
        if (algorithm == OBD_ALGO_LZ4)
            ok = decompress_lz4(payload, size, out, (size_t)expected);
        else if (algorithm == OBD_ALGO_ZSTD)
            ok = decompress_zstd(dctx, payload, size, out, (size_t)expected);
        if (!ok)
            return OBD_ZFILE_DECOMPRESS;
        out += expected;
    }
    return OBD_ZFILE_OK;
}

/* Worst-case compressed size of one chunk of n bytes, or 0 when the codec refuses it. */
static size_t chunk_bound(int algorithm, size_t n)
{
    if (algorithm == OBD_ALGO_LZ4)
        return n <= LZ4_MAX_INPUT_SIZE ? (size_t)LZ4_compressBound((int)n) : 0;
    size_t b = ZSTD_compressBound(n);
    return ZSTD_isError(b) ? 0 : b;
}

int obd_zfile_encode_bound(size_t n, int algorithm, int verify, size_t chunk_size,
                           size_t *count, size_t *bound)
{
    *count = n ? (n - 1) / chunk_size + 1 : 0;
    *bound = 0;
    if (!n)
        return 0;
    size_t first = n < chunk_size ? n : chunk_size;
    size_t last = n - (*count - 1) * chunk_size;
    size_t full_bound = chunk_bound(algorithm, first), last_bound = chunk_bound(algorithm, last);
    size_t crc = verify ? 4 : 0, body;
    if (!full_bound || !last_bound)
        return -1;
    if (__builtin_add_overflow(full_bound, crc, &full_bound)
        || __builtin_add_overflow(last_bound, crc, &last_bound)
        || __builtin_mul_overflow(*count - 1, full_bound, &body)
        || __builtin_add_overflow(body, last_bound, bound))
        return -1;
    return 0;
}

int obd_zfile_encode(const unsigned char *data, size_t n, int algorithm, int verify,
                     size_t chunk_size, int level, unsigned char *out, size_t cap,
                     uint32_t *lengths, size_t *written)
{
    ZSTD_CCtx *cctx = NULL;
    size_t used = 0;
    *written = 0;
    if (algorithm != OBD_ALGO_LZ4 && algorithm != OBD_ALGO_ZSTD)
        return OBD_ZFILE_COMPRESS;
    if (level < 0 || level > (algorithm == OBD_ALGO_LZ4 ? OBD_LZ4HC_LEVEL_MAX
                                                        : OBD_ZSTD_LEVEL_MAX))
        return OBD_ZFILE_COMPRESS;
    if (algorithm == OBD_ALGO_ZSTD && n) {
        cctx = thread_cctx();
        if (!cctx)
            return OBD_ZFILE_NOMEM;
    }
    for (size_t pos = 0, i = 0; pos < n; pos += chunk_size, i++) {
        size_t piece = n - pos < chunk_size ? n - pos : chunk_size;
        size_t room = cap - used, size;
        if (room < (verify ? 4 : 0))
            return OBD_ZFILE_COMPRESS;
        room -= verify ? 4 : 0;
        if (algorithm == OBD_ALGO_LZ4) {
            if (piece > LZ4_MAX_INPUT_SIZE)
                return OBD_ZFILE_TOO_LARGE;
            int cap_int = room > INT_MAX ? INT_MAX : (int)room;
            /* LZ4 HC writes the same block format: any LZ4 reader decodes it. */
            int got = level ? LZ4_compress_HC((const char *)data + pos, (char *)out + used,
                                              (int)piece, cap_int, level)
                            : LZ4_compress_default((const char *)data + pos,
                                                   (char *)out + used, (int)piece, cap_int);
            if (got <= 0)
                return OBD_ZFILE_COMPRESS;
            size = (size_t)got;
        } else {
            size = ZSTD_compressCCtx(cctx, out + used, room, data + pos, piece,
                                     level ? level : OBD_ZSTD_LEVEL);
            if (ZSTD_isError(size))
                return OBD_ZFILE_COMPRESS;
        }
        if (verify) {
            store_le32(out + used + size, obd_crc32c(OBD_CHUNK_CRC_SEED, out + used, size));
            size += 4;
        }
        if (size > UINT32_MAX)
            return OBD_ZFILE_TOO_LARGE;
        lengths[i] = (uint32_t)size;
        used += size;
        if (n - pos <= chunk_size)
            break; /* last chunk; also keeps pos + chunk_size from wrapping */
    }
    *written = used;
    return OBD_ZFILE_OK;
}

const char *obd_lz4_version(void)
{
    return LZ4_versionString();
}

const char *obd_zstd_version(void)
{
    return ZSTD_versionString();
}
