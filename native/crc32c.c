/* CRC32C as overlaybd computes it: Castagnoli polynomial, reflected (0x82F63B78), with
 * NO initial and NO final inversion; the register simply starts at `seed`. The x86
 * SSE4.2 crc32 instruction performs exactly this raw register update, so the hardware
 * path needs no fix-ups. Machines without it use slicing-by-8 tables.
 *
 * The hardware path runs three independent streams over adjacent blocks to hide the
 * instruction's 3-cycle latency, then joins them. The join relies on the raw CRC being
 * linear over GF(2): raw(c, A||B) = shift_B(raw(c, A)) ^ raw(0, B), where shift_B(x) =
 * raw(x, |B| zero bytes) is a linear map of x and is applied through four 256-entry
 * tables (one per byte of x), precomputed for each block length used.
 */
#include "crc32c.h"

#include <string.h>

#define POLY 0x82F63B78u

/* Block lengths of the 3-stream loop: long blocks first, then short ones, then a plain
 * serial tail (< 3 * SHORT_BLOCK bytes). Multiples of 8. */
#define LONG_BLOCK 512
#define SHORT_BLOCK 64

static uint32_t slice[8][256];     /* slice[k][b]: byte b followed by k zero bytes */
static uint32_t shift_long[4][256];
static uint32_t shift_short[4][256];
static int use_hardware;

static uint64_t load_le64(const unsigned char *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}

/* Tables for x -> raw(x, `zeros` zero bytes). */
static void build_shift(uint32_t table[4][256], size_t zeros)
{
    uint32_t basis[32];
    for (int bit = 0; bit < 32; bit++) {
        uint32_t c = (uint32_t)1 << bit;
        for (size_t i = 0; i < zeros; i++)
            c = slice[0][c & 0xff] ^ (c >> 8);
        basis[bit] = c;
    }
    for (int k = 0; k < 4; k++) {
        for (int b = 0; b < 256; b++) {
            uint32_t v = 0;
            for (int bit = 0; bit < 8; bit++)
                if (b & (1 << bit))
                    v ^= basis[8 * k + bit];
            table[k][b] = v;
        }
    }
}

static inline uint32_t apply_shift(const uint32_t table[4][256], uint32_t x)
{
    return table[0][x & 0xff] ^ table[1][(x >> 8) & 0xff] ^ table[2][(x >> 16) & 0xff]
         ^ table[3][x >> 24];
}

static uint32_t crc_tables(uint32_t crc, const unsigned char *p, size_t n)
{
    while (n >= 8) {
        uint64_t w = load_le64(p) ^ crc;
        crc = slice[7][w & 0xff] ^ slice[6][(w >> 8) & 0xff] ^ slice[5][(w >> 16) & 0xff]
            ^ slice[4][(w >> 24) & 0xff] ^ slice[3][(w >> 32) & 0xff]
            ^ slice[2][(w >> 40) & 0xff] ^ slice[1][(w >> 48) & 0xff] ^ slice[0][w >> 56];
        p += 8;
        n -= 8;
    }
    while (n--)
        crc = slice[0][(crc ^ *p++) & 0xff] ^ (crc >> 8);
    return crc;
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HAVE_SSE42_PATH 1
#include <nmmintrin.h>

/* Compiled for SSE4.2 through the target attribute only, so the rest of the module (and
 * the import) works on CPUs without it; this is called only after the runtime probe. */
#define SSE42 __attribute__((target("sse4.2")))

/* Consume as many groups of three `block`-byte blocks as fit. */
static inline SSE42 uint32_t
crc_sse42_groups(uint32_t crc, const unsigned char **pp, size_t *np, size_t block,
                 const uint32_t shift[4][256])
{
    const unsigned char *p = *pp;
    size_t n = *np;
    while (n >= 3 * block) {
        uint64_t c0 = crc, c1 = 0, c2 = 0;
        for (size_t i = 0; i < block; i += 8) {
            c0 = _mm_crc32_u64(c0, load_le64(p + i));
            c1 = _mm_crc32_u64(c1, load_le64(p + block + i));
            c2 = _mm_crc32_u64(c2, load_le64(p + 2 * block + i));
        }
        crc = apply_shift(shift, apply_shift(shift, (uint32_t)c0) ^ (uint32_t)c1)
            ^ (uint32_t)c2;
        p += 3 * block;
        n -= 3 * block;
    }
    *pp = p;
    *np = n;
    return crc;
}

static SSE42 uint32_t crc_sse42(uint32_t crc, const unsigned char *p, size_t n)
{
    crc = crc_sse42_groups(crc, &p, &n, LONG_BLOCK, shift_long);
    crc = crc_sse42_groups(crc, &p, &n, SHORT_BLOCK, shift_short);
    uint64_t c = crc;
    for (; n >= 8; p += 8, n -= 8)
        c = _mm_crc32_u64(c, load_le64(p));
    crc = (uint32_t)c;
    for (; n; p++, n--)
        crc = _mm_crc32_u8(crc, *p);
    return crc;
}
#endif

void obd_crc32c_init(void)
{
    for (uint32_t b = 0; b < 256; b++) {
        uint32_t c = b;
        for (int k = 0; k < 8; k++)
            c = (c & 1) ? (c >> 1) ^ POLY : c >> 1;
        slice[0][b] = c;
    }
    for (int k = 1; k < 8; k++)
        for (int b = 0; b < 256; b++)
            slice[k][b] = slice[0][slice[k - 1][b] & 0xff] ^ (slice[k - 1][b] >> 8);
    build_shift(shift_long, LONG_BLOCK);
    build_shift(shift_short, SHORT_BLOCK);
#ifdef HAVE_SSE42_PATH
    __builtin_cpu_init();
    use_hardware = __builtin_cpu_supports("sse4.2") != 0;
#endif
}

int obd_crc32c_hardware(void)
{
    return use_hardware;
}

uint32_t obd_crc32c(uint32_t seed, const void *data, size_t n)
{
#ifdef HAVE_SSE42_PATH
    if (use_hardware)
        return crc_sse42(seed, data, n);
#endif
    return crc_tables(seed, data, n);
}

uint32_t obd_crc32c_portable(uint32_t seed, const void *data, size_t n)
{
    return crc_tables(seed, data, n);
}
