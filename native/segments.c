/* Segment table loops: decode/encode of the 16-byte records, the two sanity scans, the
 * stacking of layer tables into one merged table, and the lookup of a byte range in it.
 *
 * Each function follows its reference in overlaybd_py/_pure.py step by step, including
 * the order in which columns are read, so that even malformed input (ragged columns,
 * unsorted records, values near 2^64) fails or succeeds the same way in both backends.
 * Sums that may exceed 64 bits are computed in 128 bits, as Python would compute them.
 */
#include "segments.h"

#include <stdlib.h>
#include <string.h>

typedef unsigned __int128 obd_u128;

#define OFFSET_MASK ((((uint64_t)1) << 50) - 1)
#define MOFFSET_MASK ((((uint64_t)1) << 55) - 1)
#define MAX_LENGTH 16383u /* 14-bit length field */

/* Fail with OBD_E_INDEX unless index i exists in a column of length n. */
#define NEED(i, n)                                                                         \
    do {                                                                                   \
        if ((i) >= (n))                                                                    \
            return OBD_E_INDEX;                                                            \
    } while (0)

static uint64_t load_le64(const unsigned char *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}

static void store_le64(unsigned char *p, uint64_t v)
{
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    memcpy(p, &v, 8);
}

static inline uint8_t view_tag(const obd_view *v, size_t i)
{
    return v->tag ? v->tag[i] : v->fixed_tag;
}

int obd_table_alloc(obd_table *t, size_t cap)
{
    memset(t, 0, sizeof *t);
    if (cap > SIZE_MAX / sizeof(uint64_t))
        return OBD_E_NOMEM;
    size_t c = cap ? cap : 1; /* never malloc(0) */
    t->offset = malloc(c * sizeof(uint64_t));
    t->length = malloc(c * sizeof(uint32_t));
    t->moffset = malloc(c * sizeof(uint64_t));
    t->zeroed = malloc(c);
    t->tag = malloc(c);
    t->cap = cap;
    if (!t->offset || !t->length || !t->moffset || !t->zeroed || !t->tag) {
        obd_table_free(t);
        return OBD_E_NOMEM;
    }
    return OBD_OK;
}

void obd_table_free(obd_table *t)
{
    free(t->offset);
    free(t->length);
    free(t->moffset);
    free(t->zeroed);
    free(t->tag);
    memset(t, 0, sizeof *t);
}

obd_view obd_table_view(const obd_table *t)
{
    obd_view v = {
        .offset = t->offset, .n_offset = t->n,
        .length = t->length, .n_length = t->n,
        .moffset = t->moffset, .n_moffset = t->n,
        .zeroed = t->zeroed, .n_zeroed = t->n,
        .tag = t->tag, .n_tag = t->n,
    };
    return v;
}

static inline void table_push(obd_table *t, uint64_t offset, uint32_t length,
                              uint64_t moffset, uint8_t zeroed, uint8_t tag)
{
    size_t k = t->n++;
    t->offset[k] = offset;
    t->length[k] = length;
    t->moffset[k] = moffset;
    t->zeroed[k] = zeroed;
    t->tag[k] = tag;
}

void obd_decode_segments(const unsigned char *buf, size_t records, obd_table *out)
{
    out->n = 0;
    for (size_t i = 0; i < records; i++, buf += 16) {
        uint64_t lo = load_le64(buf), hi = load_le64(buf + 8);
        uint64_t offset = lo & OFFSET_MASK;
        if (offset == OBD_INVALID_OFFSET)
            continue; /* padding */
        table_push(out, offset, (uint32_t)(lo >> 50), hi & MOFFSET_MASK,
                   (uint8_t)((hi >> 55) & 1), (uint8_t)(hi >> 56));
    }
}

int obd_encode_segments(const obd_view *v, unsigned char *out)
{
    for (size_t i = 0; i < v->n_offset; i++, out += 16) {
        NEED(i, v->n_length);
        NEED(i, v->n_moffset);
        NEED(i, v->n_zeroed);
        NEED(i, v->n_tag);
        /* length << 50 must fit the 64-bit word (Python's struct.pack refuses it) */
        if (v->length[i] > MAX_LENGTH)
            return OBD_E_RANGE;
        uint64_t lo = (v->offset[i] & OFFSET_MASK) | ((uint64_t)v->length[i] << 50);
        uint64_t hi = (v->moffset[i] & MOFFSET_MASK) | ((uint64_t)(v->zeroed[i] & 1) << 55)
                    | ((uint64_t)view_tag(v, i) << 56);
        store_le64(out, lo);
        store_le64(out + 8, hi);
    }
    return OBD_OK;
}

int obd_first_unsorted(const obd_view *v, ptrdiff_t *result)
{
    obd_u128 prev_end = 0; /* offsets are unsigned: nothing precedes the first record */
    for (size_t i = 0; i < v->n_offset; i++) {
        if (v->offset[i] < prev_end) {
            *result = (ptrdiff_t)i;
            return OBD_OK;
        }
        NEED(i, v->n_length);
        prev_end = (obd_u128)v->offset[i] + v->length[i];
    }
    *result = -1;
    return OBD_OK;
}

int obd_first_out_of_bounds(const uint64_t *moffset, size_t n, const uint32_t *length,
                            size_t n_length, const uint8_t *zeroed, size_t n_zeroed,
                            obd_i128 low, obd_i128 high, ptrdiff_t *result)
{
    for (size_t i = 0; i < n; i++) {
        obd_i128 start = moffset[i];
        NEED(i, n_zeroed);
        obd_i128 end = start;
        if (!zeroed[i]) {
            NEED(i, n_length);
            end += length[i];
        }
        if (start < low || end > high) {
            *result = (ptrdiff_t)i;
            return OBD_OK;
        }
    }
    *result = -1;
    return OBD_OK;
}

/* Overlay two sorted tables (_pure._overlay): `top` records are copied as they are,
 * `bottom` records fill the gaps between them, trimmed at the edges of top records
 * (a front trim advances moffset unless the record is zeroed). Zeroed records are kept.
 * `cursor` is the sector below which everything has been emitted. */
static int overlay(const obd_view *top, const obd_view *bottom, obd_table *out)
{
    size_t nt = top->n_offset, nb = bottom->n_offset;
    memset(out, 0, sizeof *out);
    /* Each bottom piece either finishes its record or stops at a top record, which is
     * emitted next: at most nb + 2 * nt records. */
    if (nt > (SIZE_MAX - nb) / 2)
        return OBD_E_NOMEM;
    int rc = obd_table_alloc(out, nb + 2 * nt);
    if (rc)
        return rc;
    size_t i = 0, j = 0;
    obd_u128 cursor = 0;
    while (i < nt || j < nb) {
        if (j < nb) {
            uint64_t b_off = bottom->offset[j];
            NEED(j, bottom->n_length);
            obd_u128 b_end = (obd_u128)b_off + bottom->length[j];
            obd_u128 b_start = b_off > cursor ? b_off : cursor;
            if (b_start >= b_end) {
                j++;
                continue;
            }
            if (i >= nt || b_start < top->offset[i]) {
                obd_u128 end = b_end;
                if (i < nt && top->offset[i] < end)
                    end = top->offset[i];
                if (b_start > UINT64_MAX)
                    return OBD_E_OVERFLOW;
                NEED(j, bottom->n_zeroed);
                uint8_t zeroed = bottom->zeroed[j];
                NEED(j, bottom->n_moffset);
                obd_u128 moffset = bottom->moffset[j];
                if (!zeroed)
                    moffset += b_start - b_off;
                if (moffset > UINT64_MAX)
                    return OBD_E_OVERFLOW;
                table_push(out, (uint64_t)b_start, (uint32_t)(end - b_start),
                           (uint64_t)moffset, zeroed, view_tag(bottom, j));
                cursor = end;
                if (end == b_end)
                    j++;
                continue;
            }
        }
        /* the top record comes next */
        NEED(i, top->n_length);
        NEED(i, top->n_moffset);
        NEED(i, top->n_zeroed);
        table_push(out, top->offset[i], top->length[i], top->moffset[i], top->zeroed[i],
                   view_tag(top, i));
        cursor = (obd_u128)top->offset[i] + top->length[i];
        i++;
    }
    return OBD_OK;
}

/* Keep the data records of `v` (drop zeroed ones) into `out`, which may be the table `v`
 * looks at: records only move down. */
static int keep_data(const obd_view *v, obd_table *out)
{
    size_t k = 0;
    for (size_t i = 0; i < v->n_offset; i++) {
        NEED(i, v->n_zeroed);
        if (v->zeroed[i])
            continue;
        NEED(i, v->n_length);
        NEED(i, v->n_moffset);
        out->offset[k] = v->offset[i];
        out->length[k] = v->length[i];
        out->moffset[k] = v->moffset[i];
        out->zeroed[k] = v->zeroed[i];
        out->tag[k] = view_tag(v, i);
        k++;
    }
    out->n = k;
    return OBD_OK;
}

int obd_merge(const obd_view *layers, size_t count, obd_table *out)
{
    memset(out, 0, sizeof *out);
    if (count == 0)
        return obd_table_alloc(out, 0);
    if (count == 1) {
        int rc = obd_table_alloc(out, layers[0].n_offset);
        return rc ? rc : keep_data(&layers[0], out);
    }
    /* From the top down: the result so far is the top of the next overlay. */
    obd_table acc;
    int rc = overlay(&layers[count - 1], &layers[count - 2], &acc);
    for (size_t k = count - 2; rc == OBD_OK && k-- > 0;) {
        obd_table next;
        obd_view top = obd_table_view(&acc);
        rc = overlay(&top, &layers[k], &next);
        obd_table_free(&acc);
        acc = next;
    }
    if (rc == OBD_OK) {
        obd_view all = obd_table_view(&acc);
        rc = keep_data(&all, &acc);
    }
    if (rc != OBD_OK) {
        obd_table_free(&acc);
        return rc;
    }
    *out = acc;
    return OBD_OK;
}

/* bisect_right(offsets, key) with Python's exact midpoints, so that even an unsorted
 * column gives the reference's answer. The steps are branch-free, and each one prefetches
 * the midpoints of the four ranges two steps ahead, so that the cache misses of a large
 * table overlap instead of following one another. */
static inline size_t midpoint(size_t lo, size_t hi)
{
    return lo < hi ? lo + (hi - lo) / 2 : lo; /* an empty range stays within [0, n] */
}

static size_t bisect_right(const uint64_t *a, size_t n, obd_i128 key)
{
    if (key < 0)
        return 0;
    if (key > (obd_i128)UINT64_MAX)
        return n;
    uint64_t k = (uint64_t)key;
    size_t lo = 0, hi = n;
    while (lo < hi) {
        size_t mid = midpoint(lo, hi);
        size_t left = midpoint(lo, mid), right = midpoint(mid + 1, hi);
        __builtin_prefetch(&a[midpoint(lo, left)]);
        __builtin_prefetch(&a[midpoint(left + 1, mid)]);
        __builtin_prefetch(&a[midpoint(mid + 1, right)]);
        __builtin_prefetch(&a[midpoint(right + 1, hi)]);
        int below = k < a[mid];
        hi = below ? mid : hi;
        lo = below ? lo : mid + 1;
    }
    return lo;
}

int obd_lookup(const obd_view *v, obd_i128 offset, obd_i128 length, obd_piece_fn emit,
               void *ctx)
{
    obd_i128 pos = offset, end = offset + length;
    size_t n = v->n_offset;
    /* the first record whose end (in bytes) is beyond pos */
    size_t i = bisect_right(v->offset, n, pos >> 9);
    if (i > 0) {
        NEED(i - 1, v->n_length);
        if (((obd_i128)v->offset[i - 1] + v->length[i - 1]) << 9 > pos)
            i--;
    }
    while (pos < end) {
        if (i >= n)
            return emit(ctx, -1, 0, end - pos) ? OBD_E_CALLBACK : OBD_OK;
        obd_i128 rec_start = (obd_i128)v->offset[i] << 9;
        NEED(i, v->n_length);
        obd_i128 rec_end = ((obd_i128)v->offset[i] + v->length[i]) << 9;
        if (rec_start > pos) {
            obd_i128 gap = (rec_start < end ? rec_start : end) - pos;
            if (emit(ctx, -1, 0, gap))
                return OBD_E_CALLBACK;
            pos += gap;
            continue;
        }
        obd_i128 take = (rec_end < end ? rec_end : end) - pos;
        NEED(i, v->n_tag);
        NEED(i, v->n_moffset);
        if (emit(ctx, view_tag(v, i), ((obd_i128)v->moffset[i] << 9) + (pos - rec_start),
                 take))
            return OBD_E_CALLBACK;
        pos += take;
        i++;
    }
    return OBD_OK;
}
