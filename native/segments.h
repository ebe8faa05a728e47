/* Loops over LSMT segment tables (spec 1.2 and 1.6); twins of overlaybd_py/_pure.py. */
#ifndef OBD_SEGMENTS_H
#define OBD_SEGMENTS_H

#include <stddef.h>
#include <stdint.h>

typedef __int128 obd_i128;

#define OBD_INVALID_OFFSET ((((uint64_t)1) << 50) - 1)

/* Result codes. The loops stop at the first problem, where the reference implementation
 * would raise: IndexError (a column shorter than the first one), OverflowError (a value
 * that does not fit its output column), struct.error (a record field out of range). */
enum {
    OBD_OK = 0,
    OBD_E_INDEX,
    OBD_E_OVERFLOW,
    OBD_E_RANGE,
    OBD_E_NOMEM,
    OBD_E_CALLBACK, /* the piece callback failed; it set the Python error */
};

/* Read-only columns of one table. `n_offset` is the record count; every other column
 * carries its own length and is bounds-checked on each access (callers may pass ragged
 * columns). When `tag` is NULL every record carries `fixed_tag`. */
typedef struct {
    const uint64_t *offset;
    size_t n_offset;
    const uint32_t *length;
    size_t n_length;
    const uint64_t *moffset;
    size_t n_moffset;
    const uint8_t *zeroed;
    size_t n_zeroed;
    const uint8_t *tag;
    size_t n_tag;
    uint8_t fixed_tag;
} obd_view;

/* Owned columns of equal length `n` (capacity `cap`). */
typedef struct {
    uint64_t *offset;
    uint32_t *length;
    uint64_t *moffset;
    uint8_t *zeroed;
    uint8_t *tag;
    size_t n, cap;
} obd_table;

int obd_table_alloc(obd_table *t, size_t cap);
void obd_table_free(obd_table *t);
obd_view obd_table_view(const obd_table *t);

/* Unpack `records` 16-byte records into `out` (capacity >= records), skipping padding. */
void obd_decode_segments(const unsigned char *buf, size_t records, obd_table *out);

/* Pack v->n_offset records into out (16 bytes each). */
int obd_encode_segments(const obd_view *v, unsigned char *out);

/* Index of the first record that overlaps or precedes its predecessor, or -1. */
int obd_first_unsorted(const obd_view *v, ptrdiff_t *result);

/* Index of the first of n records leaving [low, high] sectors, or -1 (see _pure.py). */
int obd_first_out_of_bounds(const uint64_t *moffset, size_t n, const uint32_t *length,
                            size_t n_length, const uint8_t *zeroed, size_t n_zeroed,
                            obd_i128 low, obd_i128 high, ptrdiff_t *result);

/* Stack `count` layers (bottom first; each view's fixed_tag is its position) into `out`,
 * which receives data records only. `out` is allocated here; free it with
 * obd_table_free even on error. */
int obd_merge(const obd_view *layers, size_t count, obd_table *out);

/* Called once per piece of a lookup, in device order; returns 0 or nonzero to stop. */
typedef int (*obd_piece_fn)(void *ctx, int tag, obd_i128 offset, obd_i128 length);

/* Split the byte range [offset, offset + length) of a merged table into pieces. The
 * arithmetic is exact for |offset|, |length| < 2^100. */
int obd_lookup(const obd_view *v, obd_i128 offset, obd_i128 length, obd_piece_fn emit,
               void *ctx);

#endif
