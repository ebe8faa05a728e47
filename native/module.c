/* Python bindings of overlaybd_py._native, the C twin of overlaybd_py/_pure.py.
 *
 * Only argument conversion lives here: turning Python objects into plain C arrays,
 * running a loop from crc32c.c, segments.c or zfile.c (without the GIL when it may take
 * a while), and turning the result back into the same Python types the reference returns
 * (array.array columns, bytes, lists of tuples) or into the same exceptions.
 *
 * Columns are read through the buffer protocol when the object exposes unsigned items of
 * the right size (array.array, memoryview, bytes for 1-byte columns...). Anything else
 * that the reference would accept, such as a list or an array of another type, is first
 * copied into an array.array of the right type, element by element.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <limits.h>
#include <string.h>

#include "crc32c.h"
#include "segments.h"
#include "zfile.h"

_Static_assert(sizeof(unsigned long long) == 8, "array typecode 'Q' must be 8 bytes");
_Static_assert(sizeof(unsigned int) == 4, "array typecode 'I' must be 4 bytes");

/* Release the GIL for buffers at least this large (bytes); below it the switch costs
 * more than it lets other threads gain. */
#define NOGIL_BYTES (64 * 1024)
#define NOGIL_RECORDS 4096

static PyObject *array_type;    /* array.array */
static PyObject *struct_error;  /* struct.error, raised where struct.pack would raise */
static PyObject *str_frombytes; /* "frombytes" */
static PyObject *str_crc;       /* "crc" */
static PyObject *str_decompress;

/* ---------------------------------------------------------------- arguments */

/* Bind fastcall arguments to `names` like a Python function whose parameters are all
 * positional-or-keyword; out[k] stays NULL for an omitted optional parameter. */
static int parse_args(const char *fname, PyObject *const *args, Py_ssize_t nargs,
                      PyObject *kwnames, const char *const *names, Py_ssize_t nparams,
                      Py_ssize_t nrequired, PyObject **out)
{
    if (nargs > nparams) {
        PyErr_Format(PyExc_TypeError, "%s() takes %zd positional arguments but %zd were given",
                     fname, nparams, nargs);
        return -1;
    }
    for (Py_ssize_t k = 0; k < nparams; k++)
        out[k] = k < nargs ? args[k] : NULL;
    Py_ssize_t nkw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    for (Py_ssize_t k = 0; k < nkw; k++) {
        PyObject *key = PyTuple_GET_ITEM(kwnames, k);
        Py_ssize_t p = 0;
        while (p < nparams && PyUnicode_CompareWithASCIIString(key, names[p]) != 0)
            p++;
        if (p == nparams) {
            PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument '%U'",
                         fname, key);
            return -1;
        }
        if (out[p]) {
            PyErr_Format(PyExc_TypeError, "%s() got multiple values for argument '%s'", fname,
                         names[p]);
            return -1;
        }
        out[p] = args[nargs + k];
    }
    for (Py_ssize_t k = 0; k < nrequired; k++) {
        if (!out[k]) {
            PyErr_Format(PyExc_TypeError, "%s() missing required argument '%s'", fname,
                         names[k]);
            return -1;
        }
    }
    return 0;
}

/* A Python int as 128 bits. Values with |v| >= 2^100 raise OverflowError, or saturate at
 * +-2^100 when `clamp` (for bounds that are only compared with 64-bit values). */
static int to_i128(PyObject *obj, obd_i128 *out, int clamp)
{
    int overflow;
    long long v = PyLong_AsLongLongAndOverflow(obj, &overflow);
    if (v == -1 && PyErr_Occurred())
        return -1;
    if (!overflow) {
        *out = v;
        return 0;
    }
    /* slow path: v = hi * 2^64 + lo, with lo in [0, 2^64) */
    const long long hi_limit = 1LL << 36;
    PyObject *index = PyNumber_Index(obj);
    if (!index)
        return -1;
    PyObject *sixty_four = PyLong_FromLong(64);
    PyObject *high = sixty_four ? PyNumber_Rshift(index, sixty_four) : NULL;
    Py_XDECREF(sixty_four);
    if (!high) {
        Py_DECREF(index);
        return -1;
    }
    long long hi = PyLong_AsLongLongAndOverflow(high, &overflow);
    Py_DECREF(high);
    unsigned long long lo = PyLong_AsUnsignedLongLongMask(index);
    Py_DECREF(index);
    if (PyErr_Occurred())
        return -1;
    if (overflow || hi >= hi_limit || hi < -hi_limit) {
        if (!clamp) {
            PyErr_SetString(PyExc_OverflowError, "offset or length beyond 2**100");
            return -1;
        }
        int negative = overflow ? overflow < 0 : hi < 0;
        *out = negative ? -((obd_i128)1 << 100) : (obd_i128)1 << 100;
        return 0;
    }
    *out = (obd_i128)hi * ((obd_i128)1 << 64) + (obd_i128)lo;
    return 0;
}

static PyObject *from_i128(obd_i128 v)
{
    if (v >= LLONG_MIN && v <= LLONG_MAX)
        return PyLong_FromLongLong((long long)v);
    unsigned long long lo = (unsigned long long)((unsigned __int128)v & UINT64_MAX);
    long long hi = (long long)((v - (obd_i128)lo) / ((obd_i128)1 << 64));
    PyObject *h = PyLong_FromLongLong(hi), *l = PyLong_FromUnsignedLongLong(lo);
    PyObject *sixty_four = PyLong_FromLong(64);
    PyObject *shifted = h && sixty_four ? PyNumber_Lshift(h, sixty_four) : NULL;
    PyObject *result = shifted && l ? PyNumber_Add(shifted, l) : NULL;
    Py_XDECREF(h);
    Py_XDECREF(l);
    Py_XDECREF(sixty_four);
    Py_XDECREF(shifted);
    return result;
}

/* ---------------------------------------------------------------- columns and buffers */

typedef struct {
    Py_buffer view;
    int held;
    PyObject *converted; /* an array.array copy, when the object was not usable as is */
    const void *data;
    size_t n; /* items */
} column;

/* Unsigned item formats of the given size, in native (little-endian here) order. */
static int unsigned_format(const char *fmt, Py_ssize_t itemsize)
{
    if (!fmt)
        return itemsize == 1; /* plain bytes */
    if (*fmt == '@' || *fmt == '=')
        fmt++;
#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    else if (*fmt == '<')
        fmt++;
#endif
    if (!fmt[0] || fmt[1])
        return 0;
    switch (fmt[0]) {
    case 'B': return itemsize == 1;
    case 'I': case 'L': case 'Q': case 'N': return 1; /* the caller checked the size */
    default: return 0;
    }
}

/* Columns start empty (no memset: lookup calls this four times per read). */
#define COLUMNS_INIT(c, count)                                                             \
    do {                                                                                   \
        for (size_t k_ = 0; k_ < (count); k_++) {                                          \
            (c)[k_].held = 0;                                                              \
            (c)[k_].converted = NULL;                                                      \
        }                                                                                  \
    } while (0)

static int get_column(PyObject *obj, Py_ssize_t itemsize, int typecode, column *c)
{
    int shift = __builtin_ctz((unsigned)itemsize); /* itemsize is 1, 4 or 8 */
    c->held = 0;
    c->converted = NULL;
    if (PyObject_GetBuffer(obj, &c->view, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) == 0) {
        if (c->view.itemsize == itemsize && c->view.ndim == 1
            && unsigned_format(c->view.format, itemsize)) {
            c->held = 1;
            c->data = c->view.buf;
            c->n = (size_t)c->view.len >> shift;
            return 0;
        }
        PyBuffer_Release(&c->view);
    } else if (PyErr_ExceptionMatches(PyExc_TypeError)
               || PyErr_ExceptionMatches(PyExc_BufferError)) {
        PyErr_Clear(); /* not a buffer, or a strided one: read it element by element */
    } else {
        return -1;
    }
    PyObject *items = PyObject_GetIter(obj);
    if (!items)
        return -1;
    c->converted = PyObject_CallFunction(array_type, "CN", typecode, items);
    if (!c->converted)
        return -1;
    if (PyObject_GetBuffer(c->converted, &c->view, PyBUF_C_CONTIGUOUS) < 0) {
        Py_CLEAR(c->converted);
        return -1;
    }
    c->held = 1;
    c->data = c->view.buf;
    c->n = (size_t)c->view.len >> shift;
    return 0;
}

static void release_column(column *c)
{
    if (c->held)
        PyBuffer_Release(&c->view);
    c->held = 0;
    Py_CLEAR(c->converted);
}

#define COLUMN_Q(obj, c) get_column((obj), 8, 'Q', (c))
#define COLUMN_I(obj, c) get_column((obj), 4, 'I', (c))
#define COLUMN_B(obj, c) get_column((obj), 1, 'B', (c))

/* Bytes of a bytes-like object (any C-contiguous buffer, read as raw bytes). */
static int get_bytes(PyObject *obj, Py_buffer *view)
{
    return PyObject_GetBuffer(obj, view, PyBUF_SIMPLE);
}

/* A new array.array of `typecode` holding a copy of nbytes at data. */
static PyObject *new_array(int typecode, const void *data, size_t nbytes)
{
    PyObject *arr = PyObject_CallFunction(array_type, "C", typecode);
    if (!arr || !nbytes)
        return arr;
    PyObject *view = PyMemoryView_FromMemory((char *)data, (Py_ssize_t)nbytes, PyBUF_READ);
    PyObject *done = view ? PyObject_CallMethodOneArg(arr, str_frombytes, view) : NULL;
    Py_XDECREF(view);
    if (!done) {
        Py_DECREF(arr);
        return NULL;
    }
    Py_DECREF(done);
    return arr;
}

/* The five columns (offset 'Q', length 'I', moffset 'Q', zeroed 'B', tag 'B') of t. */
static PyObject *table_to_columns(const obd_table *t)
{
    PyObject *c[5] = {
        new_array('Q', t->offset, t->n * 8),
        new_array('I', t->length, t->n * 4),
        new_array('Q', t->moffset, t->n * 8),
        new_array('B', t->zeroed, t->n),
        new_array('B', t->tag, t->n),
    };
    PyObject *result = NULL;
    if (c[0] && c[1] && c[2] && c[3] && c[4])
        result = PyTuple_Pack(5, c[0], c[1], c[2], c[3], c[4]);
    for (int k = 0; k < 5; k++)
        Py_XDECREF(c[k]);
    return result;
}

static PyObject *segments_error(int rc)
{
    switch (rc) {
    case OBD_E_INDEX:
        PyErr_SetString(PyExc_IndexError, "array index out of range");
        break;
    case OBD_E_OVERFLOW:
        PyErr_SetString(PyExc_OverflowError, "value too large for its column");
        break;
    case OBD_E_RANGE:
        PyErr_SetString(struct_error, "argument out of range");
        break;
    case OBD_E_NOMEM:
        PyErr_NoMemory();
        break;
    default: /* OBD_E_CALLBACK: the Python error is already set */
        break;
    }
    return NULL;
}

/* ---------------------------------------------------------------- crc32c */

PyDoc_STRVAR(crc32c_doc,
"crc32c($module, /, data, seed=0)\n--\n\n"
"CRC32C with no initial or final inversion, starting from ``seed`` (overlaybd's 'raw').");

static PyObject *crc32c_impl(const char *fname, PyObject *const *args, Py_ssize_t nargs,
                             PyObject *kwnames, uint32_t (*crc_fn)(uint32_t, const void *, size_t))
{
    static const char *const names[] = {"data", "seed"};
    PyObject *a[2];
    if (parse_args(fname, args, nargs, kwnames, names, 2, 1, a) < 0)
        return NULL;
    uint32_t seed = 0;
    if (a[1]) {
        if (!PyLong_Check(a[1])) {
            PyErr_Format(PyExc_TypeError, "seed must be an int, not %.100s",
                         Py_TYPE(a[1])->tp_name);
            return NULL;
        }
        seed = (uint32_t)PyLong_AsUnsignedLongLongMask(a[1]); /* seed mod 2**32 */
        if (PyErr_Occurred())
            return NULL;
    }
    Py_buffer data;
    if (get_bytes(a[0], &data) < 0)
        return NULL;
    uint32_t crc;
    if (data.len >= NOGIL_BYTES) {
        Py_BEGIN_ALLOW_THREADS
        crc = crc_fn(seed, data.buf, (size_t)data.len);
        Py_END_ALLOW_THREADS
    } else {
        crc = crc_fn(seed, data.buf, (size_t)data.len);
    }
    PyBuffer_Release(&data);
    return PyLong_FromUnsignedLong(crc);
}

static PyObject *py_crc32c(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                           PyObject *kwnames)
{
    (void)module;
    return crc32c_impl("crc32c", args, nargs, kwnames, obd_crc32c);
}

PyDoc_STRVAR(_crc32c_portable_doc,
"_crc32c_portable($module, /, data, seed=0)\n--\n\n"
"crc32c() computed with the portable table code whatever the CPU (a test hook).");

static PyObject *py__crc32c_portable(PyObject *module, PyObject *const *args,
                                     Py_ssize_t nargs, PyObject *kwnames)
{
    (void)module;
    return crc32c_impl("_crc32c_portable", args, nargs, kwnames, obd_crc32c_portable);
}

PyDoc_STRVAR(crc32c_blocks_doc,
"crc32c_blocks($module, /, data, block_size)\n--\n\n"
"crc32c(piece, 0) of every block_size piece of data (the last may be short), as bytes of\n"
"native-endian uint32 (an array('I') image): one call for a whole run of cache blocks.");

static PyObject *py_crc32c_blocks(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                                  PyObject *kwnames)
{
    (void)module;
    static const char *const names[] = {"data", "block_size"};
    PyObject *a[2];
    if (parse_args("crc32c_blocks", args, nargs, kwnames, names, 2, 2, a) < 0)
        return NULL;
    Py_ssize_t block = PyLong_Check(a[1]) ? PyLong_AsSsize_t(a[1]) : -1;
    if (block <= 0) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_ValueError, "block_size must be a positive int");
        return NULL;
    }
    Py_buffer data;
    if (get_bytes(a[0], &data) < 0)
        return NULL;
    Py_ssize_t count = (data.len + block - 1) / block;
    PyObject *out = PyBytes_FromStringAndSize(NULL, count * 4);
    if (!out) {
        PyBuffer_Release(&data);
        return NULL;
    }
    uint32_t *crcs = (uint32_t *)PyBytes_AS_STRING(out);
    const char *buf = data.buf;
    Py_ssize_t len = data.len;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t i = 0; i < count; i++) {
        Py_ssize_t start = i * block;
        Py_ssize_t n = len - start < block ? len - start : block;
        crcs[i] = obd_crc32c(0, buf + start, (size_t)n);
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&data);
    return out;
}

/* ---------------------------------------------------------------- segment tables */

PyDoc_STRVAR(decode_segments_doc,
"decode_segments($module, /, buf)\n--\n\n"
"Split packed 16-byte records into columns, skipping padding (offset == INVALID_OFFSET).");

static PyObject *py_decode_segments(PyObject *module, PyObject *const *args,
                                    Py_ssize_t nargs, PyObject *kwnames)
{
    static const char *const names[] = {"buf"};
    PyObject *a[1];
    (void)module;
    if (parse_args("decode_segments", args, nargs, kwnames, names, 1, 1, a) < 0)
        return NULL;
    Py_buffer buf;
    if (get_bytes(a[0], &buf) < 0)
        return NULL;
    if (buf.len % 16) {
        PyBuffer_Release(&buf);
        PyErr_SetString(PyExc_ValueError, "segment buffer length is not a multiple of 16");
        return NULL;
    }
    size_t records = (size_t)buf.len / 16;
    obd_table t;
    if (obd_table_alloc(&t, records)) {
        PyBuffer_Release(&buf);
        return PyErr_NoMemory();
    }
    if (records >= NOGIL_RECORDS) {
        Py_BEGIN_ALLOW_THREADS
        obd_decode_segments(buf.buf, records, &t);
        Py_END_ALLOW_THREADS
    } else {
        obd_decode_segments(buf.buf, records, &t);
    }
    PyBuffer_Release(&buf);
    PyObject *result = table_to_columns(&t);
    obd_table_free(&t);
    return result;
}

PyDoc_STRVAR(encode_segments_doc,
"encode_segments($module, /, offsets, lengths, moffsets, zeroed, tags)\n--\n\n"
"Pack columns into 16-byte records (no padding added).");

static PyObject *py_encode_segments(PyObject *module, PyObject *const *args,
                                    Py_ssize_t nargs, PyObject *kwnames)
{
    static const char *const names[] = {"offsets", "lengths", "moffsets", "zeroed", "tags"};
    PyObject *a[5];
    column c[5];
    COLUMNS_INIT(c, 5);
    PyObject *out = NULL;
    (void)module;
    if (parse_args("encode_segments", args, nargs, kwnames, names, 5, 5, a) < 0)
        return NULL;
    if (COLUMN_Q(a[0], &c[0]) || COLUMN_I(a[1], &c[1]) || COLUMN_Q(a[2], &c[2])
        || COLUMN_B(a[3], &c[3]) || COLUMN_B(a[4], &c[4]))
        goto done;
    obd_view v = {
        .offset = c[0].data, .n_offset = c[0].n,
        .length = c[1].data, .n_length = c[1].n,
        .moffset = c[2].data, .n_moffset = c[2].n,
        .zeroed = c[3].data, .n_zeroed = c[3].n,
        .tag = c[4].data, .n_tag = c[4].n,
    };
    if (v.n_offset > (size_t)PY_SSIZE_T_MAX / 16) {
        PyErr_NoMemory();
        goto done;
    }
    out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(16 * v.n_offset));
    if (!out)
        goto done;
    int rc = obd_encode_segments(&v, (unsigned char *)PyBytes_AS_STRING(out));
    if (rc) {
        Py_CLEAR(out);
        segments_error(rc);
    }
done:
    for (int k = 0; k < 5; k++)
        release_column(&c[k]);
    return out;
}

PyDoc_STRVAR(first_unsorted_doc,
"first_unsorted($module, /, offsets, lengths)\n--\n\n"
"Index of the first record that overlaps or precedes its predecessor, or -1.");

static PyObject *py_first_unsorted(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                                   PyObject *kwnames)
{
    static const char *const names[] = {"offsets", "lengths"};
    PyObject *a[2];
    column c[2];
    COLUMNS_INIT(c, 2);
    PyObject *result = NULL;
    (void)module;
    if (parse_args("first_unsorted", args, nargs, kwnames, names, 2, 2, a) < 0)
        return NULL;
    if (COLUMN_Q(a[0], &c[0]) || COLUMN_I(a[1], &c[1]))
        goto done;
    obd_view v = {.offset = c[0].data, .n_offset = c[0].n,
                  .length = c[1].data, .n_length = c[1].n};
    ptrdiff_t index;
    int rc = obd_first_unsorted(&v, &index);
    result = rc ? segments_error(rc) : PyLong_FromSsize_t(index);
done:
    release_column(&c[0]);
    release_column(&c[1]);
    return result;
}

PyDoc_STRVAR(first_out_of_bounds_doc,
"first_out_of_bounds($module, /, moffsets, lengths, zeroed, low, high)\n--\n\n"
"Index of the first record whose mapped range leaves [low, high] sectors, or -1.\n\n"
"A data record needs ``low <= moffset`` and ``moffset + length <= high``; a zeroed record\n"
"stores nothing and only needs ``low <= moffset <= high``.");

static PyObject *py_first_out_of_bounds(PyObject *module, PyObject *const *args,
                                        Py_ssize_t nargs, PyObject *kwnames)
{
    static const char *const names[] = {"moffsets", "lengths", "zeroed", "low", "high"};
    PyObject *a[5];
    column c[3];
    COLUMNS_INIT(c, 3);
    PyObject *result = NULL;
    obd_i128 low, high;
    (void)module;
    if (parse_args("first_out_of_bounds", args, nargs, kwnames, names, 5, 5, a) < 0)
        return NULL;
    if (to_i128(a[3], &low, 1) < 0 || to_i128(a[4], &high, 1) < 0)
        return NULL;
    if (COLUMN_Q(a[0], &c[0]) || COLUMN_I(a[1], &c[1]) || COLUMN_B(a[2], &c[2]))
        goto done;
    ptrdiff_t index;
    int rc = obd_first_out_of_bounds(c[0].data, c[0].n, c[1].data, c[1].n, c[2].data, c[2].n,
                                     low, high, &index);
    result = rc ? segments_error(rc) : PyLong_FromSsize_t(index);
done:
    for (int k = 0; k < 3; k++)
        release_column(&c[k]);
    return result;
}

PyDoc_STRVAR(merge_doc,
"merge($module, /, layers)\n--\n\n"
"Stack sorted layer tables (bottom first) into one table of data records.\n\n"
"The top layer wins; a zeroed record hides what lies below it and is then dropped, so\n"
"the result holds only data records, each tagged with its layer's position (0 = bottom).\n"
"Unmapped gaps read as zeros. Runs without the GIL.");

static PyObject *py_merge(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                          PyObject *kwnames)
{
    static const char *const names[] = {"layers"};
    PyObject *a[1];
    PyObject *seq = NULL, *result = NULL;
    column *cols = NULL;
    obd_view *views = NULL;
    Py_ssize_t count = 0;
    (void)module;
    if (parse_args("merge", args, nargs, kwnames, names, 1, 1, a) < 0)
        return NULL;
    int truth = PyObject_IsTrue(a[0]);
    if (truth < 0)
        return NULL;
    if (!truth) {
        obd_table empty = {0};
        return table_to_columns(&empty);
    }
    seq = PySequence_Fast(a[0], "merge() argument must be an iterable of layers");
    if (!seq)
        return NULL;
    count = PySequence_Fast_GET_SIZE(seq);
    if (count == 0) { /* a truthy but empty iterable: the reference indexes [-1] */
        PyErr_SetString(PyExc_IndexError, "list index out of range");
        goto done;
    }
    cols = PyMem_Calloc((size_t)count * 4, sizeof *cols);
    views = PyMem_Calloc((size_t)count, sizeof *views);
    if (!cols || !views) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t k = 0; k < count; k++) {
        PyObject *layer = PySequence_Fast_GET_ITEM(seq, k);
        PyObject *parts = PySequence_Fast(layer, "cannot unpack a layer that is not iterable");
        if (!parts)
            goto done;
        Py_ssize_t size = PySequence_Fast_GET_SIZE(parts);
        if (size != 5) {
            if (size < 5)
                PyErr_Format(PyExc_ValueError,
                             "not enough values to unpack (expected 5, got %zd)", size);
            else
                PyErr_SetString(PyExc_ValueError, "too many values to unpack (expected 5)");
            Py_DECREF(parts);
            goto done;
        }
        if (k > 255) { /* the 8-bit tag; the reference fails in bytes([position]) */
            PyErr_SetString(PyExc_ValueError, "bytes must be in range(0, 256)");
            Py_DECREF(parts);
            goto done;
        }
        PyObject **p = PySequence_Fast_ITEMS(parts);
        column *c = &cols[4 * k];
        int bad = COLUMN_Q(p[0], &c[0]) || COLUMN_I(p[1], &c[1]) || COLUMN_Q(p[2], &c[2])
               || COLUMN_B(p[3], &c[3]);
        Py_DECREF(parts); /* the held buffers keep the columns alive */
        if (bad)
            goto done;
        views[k] = (obd_view){
            .offset = c[0].data, .n_offset = c[0].n,
            .length = c[1].data, .n_length = c[1].n,
            .moffset = c[2].data, .n_moffset = c[2].n,
            .zeroed = c[3].data, .n_zeroed = c[3].n,
            .tag = NULL, .n_tag = c[0].n, .fixed_tag = (uint8_t)k,
        };
    }
    obd_table merged;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = obd_merge(views, (size_t)count, &merged);
    Py_END_ALLOW_THREADS
    result = rc ? segments_error(rc) : table_to_columns(&merged);
    obd_table_free(&merged);
done:
    if (cols)
        for (Py_ssize_t k = 0; k < 4 * count; k++)
            release_column(&cols[k]);
    PyMem_Free(cols);
    PyMem_Free(views);
    Py_XDECREF(seq);
    return result;
}

PyDoc_STRVAR(lookup_doc,
"lookup($module, /, offsets, lengths, moffsets, tags, offset, length)\n--\n\n"
"Map the byte range [offset, offset+length) of a merged table to pieces.\n\n"
"The table holds data records only (zeroed records dropped). Each piece is\n"
"``(tag, byte offset in that layer, byte length)``; ``tag == -1`` reads as zeros.\n"
"Pieces are in device order and cover the range exactly.");

static int append_piece(void *ctx, int tag, obd_i128 offset, obd_i128 length)
{
    PyObject *piece = PyTuple_New(3);
    if (!piece)
        return -1;
    PyObject *t = PyLong_FromLong(tag), *o = from_i128(offset), *n = from_i128(length);
    if (!t || !o || !n) {
        Py_XDECREF(t);
        Py_XDECREF(o);
        Py_XDECREF(n);
        Py_DECREF(piece);
        return -1;
    }
    PyTuple_SET_ITEM(piece, 0, t);
    PyTuple_SET_ITEM(piece, 1, o);
    PyTuple_SET_ITEM(piece, 2, n);
    int rc = PyList_Append((PyObject *)ctx, piece);
    Py_DECREF(piece);
    return rc;
}

static PyObject *py_lookup(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                           PyObject *kwnames)
{
    static const char *const names[] = {"offsets", "lengths", "moffsets", "tags", "offset",
                                        "length"};
    PyObject *a[6];
    column c[4];
    COLUMNS_INIT(c, 4);
    PyObject *pieces = NULL;
    obd_i128 offset, length;
    (void)module;
    if (parse_args("lookup", args, nargs, kwnames, names, 6, 6, a) < 0)
        return NULL;
    if (to_i128(a[4], &offset, 0) < 0 || to_i128(a[5], &length, 0) < 0)
        return NULL;
    if (COLUMN_Q(a[0], &c[0]) || COLUMN_I(a[1], &c[1]) || COLUMN_Q(a[2], &c[2])
        || COLUMN_B(a[3], &c[3]))
        goto done;
    obd_view v = {
        .offset = c[0].data, .n_offset = c[0].n,
        .length = c[1].data, .n_length = c[1].n,
        .moffset = c[2].data, .n_moffset = c[2].n,
        .tag = c[3].data, .n_tag = c[3].n,
    };
    pieces = PyList_New(0);
    if (!pieces)
        goto done;
    int rc = obd_lookup(&v, offset, length, append_piece, pieces);
    if (rc) {
        Py_CLEAR(pieces);
        segments_error(rc);
    }
done:
    for (int k = 0; k < 4; k++)
        release_column(&c[k]);
    return pieces;
}

/* ---------------------------------------------------------------- zfile */

/* The algorithm as the reference tests it (`algorithm == 1`, `algorithm == 2`). */
static int algorithm_of(PyObject *obj)
{
    for (int algo = OBD_ALGO_LZ4; algo <= OBD_ALGO_ZSTD; algo++) {
        PyObject *value = PyLong_FromLong(algo);
        if (!value)
            return -1;
        int equal = PyObject_RichCompareBool(obj, value, Py_EQ);
        Py_DECREF(value);
        if (equal < 0)
            return -1;
        if (equal)
            return algo;
    }
    return 0;
}

static int to_int64(PyObject *obj, int64_t *out)
{
    int overflow;
    long long v = PyLong_AsLongLongAndOverflow(obj, &overflow);
    if (v == -1 && PyErr_Occurred())
        return -1;
    /* beyond 64 bits no chunk can be that size: saturate, the chunk then fails */
    *out = overflow > 0 ? INT64_MAX : overflow < 0 ? INT64_MIN : v;
    return 0;
}

PyDoc_STRVAR(zfile_decode_doc,
"zfile_decode($module, /, buf, stored_lengths, algorithm, verify, chunk_size, last_length)\n"
"--\n\n"
"Check and decompress consecutive ZFile chunks packed in ``buf``.\n\n"
"``stored_lengths[i]`` is chunk i's jump-table length (payload + 4-byte CRC when\n"
"``verify``); every chunk decompresses to ``chunk_size`` bytes except the last one, which\n"
"decompresses to ``last_length``. Raises ``ValueError((index, reason))`` naming the\n"
"failed chunk (reason 'crc' or 'decompress'). A chunk whose stored bytes do not fit in\n"
"``buf`` fails the first check that would read them. Runs without the GIL.");

static PyObject *py_zfile_decode(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                                 PyObject *kwnames)
{
    static const char *const names[] = {"buf", "stored_lengths", "algorithm", "verify",
                                        "chunk_size", "last_length"};
    PyObject *a[6];
    Py_buffer buf = {0};
    column lengths;
    COLUMNS_INIT(&lengths, 1);
    PyObject *out = NULL;
    int64_t chunk_size, last_length;
    (void)module;
    if (parse_args("zfile_decode", args, nargs, kwnames, names, 6, 6, a) < 0)
        return NULL;
    int algorithm = algorithm_of(a[2]);
    int verify = PyObject_IsTrue(a[3]);
    if (algorithm < 0 || verify < 0 || to_int64(a[4], &chunk_size) < 0
        || to_int64(a[5], &last_length) < 0)
        return NULL;
    if (get_bytes(a[0], &buf) < 0)
        return NULL;
    if (COLUMN_I(a[1], &lengths) < 0)
        goto done;
    size_t total;
    if (obd_zfile_decoded_size(lengths.n, chunk_size, last_length, &total) < 0
        || total > PY_SSIZE_T_MAX) {
        PyErr_NoMemory();
        goto done;
    }
    out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)total);
    if (!out)
        goto done;
    size_t failed = 0;
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = obd_zfile_decode(buf.buf, (size_t)buf.len, lengths.data, lengths.n, algorithm,
                          verify, chunk_size, last_length,
                          (unsigned char *)PyBytes_AS_STRING(out), &failed);
    Py_END_ALLOW_THREADS
    if (rc == OBD_ZFILE_OK)
        goto done;
    Py_CLEAR(out);
    if (rc == OBD_ZFILE_NOMEM) {
        PyErr_NoMemory();
        goto done;
    }
    /* ValueError((index, reason)): build the instance, so the tuple is its single arg */
    PyObject *where = Py_BuildValue("(nO)", (Py_ssize_t)failed,
                                    rc == OBD_ZFILE_CRC ? str_crc : str_decompress);
    PyObject *exc = where ? PyObject_CallOneArg(PyExc_ValueError, where) : NULL;
    Py_XDECREF(where);
    if (exc) {
        PyErr_SetObject(PyExc_ValueError, exc);
        Py_DECREF(exc);
    }
done:
    release_column(&lengths);
    PyBuffer_Release(&buf);
    return out;
}

PyDoc_STRVAR(zfile_encode_doc,
"zfile_encode($module, /, data, algorithm, verify, chunk_size, level=0)\n--\n\n"
"Compress ``data`` in ``chunk_size`` pieces (the last may be short) as ZFile stores them.\n\n"
"LZ4 chunks are raw blocks (``LZ4_compress_default``; LZ4 HC at ``level`` 1-12), ZSTD\n"
"chunks whole frames at level 3 (or ``level`` 1-22);\n"
"with ``verify`` each payload is followed by its salted CRC32C. Returns the stored bytes\n"
"and the jump-table lengths (payload + CRC) of each chunk. Runs without the GIL.");

static PyObject *py_zfile_encode(PyObject *module, PyObject *const *args, Py_ssize_t nargs,
                                 PyObject *kwnames)
{
    static const char *const names[] = {"data", "algorithm", "verify", "chunk_size", "level"};
    PyObject *a[5] = {NULL, NULL, NULL, NULL, NULL};
    Py_buffer data = {0};
    PyObject *out = NULL, *lengths_array = NULL, *result = NULL;
    uint32_t *lengths = NULL;
    int64_t chunk_size;
    (void)module;
    if (parse_args("zfile_encode", args, nargs, kwnames, names, 5, 4, a) < 0)
        return NULL;
    int64_t level = 0;
    if (a[4] && to_int64(a[4], &level) < 0)
        return NULL;
    int algorithm = algorithm_of(a[1]);
    int verify = PyObject_IsTrue(a[2]);
    if (algorithm < 0 || verify < 0)
        return NULL;
    if (!PyLong_Check(a[3])) { /* the reference hands it to range() */
        PyErr_Format(PyExc_TypeError, "chunk_size must be an int, not %.100s",
                     Py_TYPE(a[3])->tp_name);
        return NULL;
    }
    if (to_int64(a[3], &chunk_size) < 0)
        return NULL;
    if (chunk_size == 0) {
        PyErr_SetString(PyExc_ValueError, "range() arg 3 must not be zero");
        return NULL;
    }
    if (get_bytes(a[0], &data) < 0)
        return NULL;
    size_t n = chunk_size > 0 ? (size_t)data.len : 0; /* a negative step: no chunks */
    if (n && !algorithm) {
        PyErr_SetString(PyExc_ValueError, "zfile algorithm must be 1 (lz4) or 2 (zstd)");
        goto done;
    }
    int top = algorithm == 1 ? OBD_LZ4HC_LEVEL_MAX : OBD_ZSTD_LEVEL_MAX;
    if (n && (level < 0 || level > top)) {
        PyErr_Format(PyExc_ValueError, "%s compression level must be 0-%d, not %S",
                     algorithm == 1 ? "lz4" : "zstd", top, a[4]);
        goto done;
    }
    size_t step = chunk_size > 0 && (uint64_t)chunk_size < SIZE_MAX ? (size_t)chunk_size
                                                                     : SIZE_MAX;
    size_t count = 0, bound = 0, written = 0;
    if (obd_zfile_encode_bound(n, algorithm, verify, step, &count, &bound) < 0) {
        PyErr_SetString(PyExc_OverflowError, "chunk too large for the codec");
        goto done;
    }
    if (bound > PY_SSIZE_T_MAX || count > PY_SSIZE_T_MAX / 4) {
        PyErr_NoMemory();
        goto done;
    }
    out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)bound);
    lengths = PyMem_Malloc(count ? count * 4 : 1);
    if (!out || !lengths) {
        if (out)
            PyErr_NoMemory();
        goto done;
    }
    int rc = OBD_ZFILE_OK;
    if (n) {
        Py_BEGIN_ALLOW_THREADS
        rc = obd_zfile_encode(data.buf, n, algorithm, verify, step, (int)level,
                              (unsigned char *)PyBytes_AS_STRING(out), bound, lengths,
                              &written);
        Py_END_ALLOW_THREADS
    }
    if (rc != OBD_ZFILE_OK) {
        if (rc == OBD_ZFILE_NOMEM)
            PyErr_NoMemory();
        else if (rc == OBD_ZFILE_TOO_LARGE)
            PyErr_SetString(PyExc_OverflowError, "chunk too large for the codec");
        else
            PyErr_SetString(PyExc_ValueError, "compression failed");
        goto done;
    }
    if (_PyBytes_Resize(&out, (Py_ssize_t)written) < 0)
        goto done; /* out is freed and NULL */
    lengths_array = new_array('I', lengths, count * 4);
    if (lengths_array)
        result = PyTuple_Pack(2, out, lengths_array);
done:
    Py_XDECREF(out);
    Py_XDECREF(lengths_array);
    PyMem_Free(lengths);
    PyBuffer_Release(&data);
    return result;
}

/* ---------------------------------------------------------------- module */

#define FASTCALL_KW (METH_FASTCALL | METH_KEYWORDS)
#define ENTRY(name) {#name, (PyCFunction)(void (*)(void))py_##name, FASTCALL_KW, name##_doc}

static PyMethodDef methods[] = {
    ENTRY(crc32c),
    ENTRY(crc32c_blocks),
    ENTRY(decode_segments),
    ENTRY(encode_segments),
    ENTRY(first_out_of_bounds),
    ENTRY(first_unsorted),
    ENTRY(lookup),
    ENTRY(merge),
    ENTRY(zfile_decode),
    ENTRY(zfile_encode),
    ENTRY(_crc32c_portable),
    {NULL, NULL, 0, NULL},
};

PyDoc_STRVAR(module_doc,
"C twin of overlaybd_py._pure: the same functions, bit-identical results.\n\n"
"FEATURES lists what this build supports; LIBRARY_VERSIONS the codec libraries in use.");

static struct PyModuleDef moduledef = {
    PyModuleDef_HEAD_INIT, "overlaybd_py._native", module_doc, -1, methods,
    NULL, NULL, NULL, NULL,
};

static PyObject *attribute_of(const char *module_name, const char *name)
{
    PyObject *mod = PyImport_ImportModule(module_name);
    if (!mod)
        return NULL;
    PyObject *value = PyObject_GetAttrString(mod, name);
    Py_DECREF(mod);
    return value;
}

static int add_constant(PyObject *m, const char *name, PyObject *value)
{
    int rc = PyModule_AddObjectRef(m, name, value); /* fails cleanly on value == NULL */
    Py_XDECREF(value);
    return rc;
}

PyMODINIT_FUNC PyInit__native(void)
{
    if (!array_type) { /* once per process, even if the module is imported again */
        obd_crc32c_init();
        if (obd_zfile_init() < 0) {
            PyErr_SetString(PyExc_ImportError, "cannot create the codec context keys");
            return NULL;
        }
        if (!struct_error)
            struct_error = attribute_of("struct", "error");
        if (!str_frombytes)
            str_frombytes = PyUnicode_InternFromString("frombytes");
        if (!str_crc)
            str_crc = PyUnicode_InternFromString("crc");
        if (!str_decompress)
            str_decompress = PyUnicode_InternFromString("decompress");
        if (!struct_error || !str_frombytes || !str_crc || !str_decompress)
            return NULL;
        array_type = attribute_of("array", "array"); /* last: it marks success */
        if (!array_type)
            return NULL;
    }
    PyObject *m = PyModule_Create(&moduledef);
    if (!m)
        return NULL;
    const char *crc = obd_crc32c_hardware() ? "crc32c-sse42" : "crc32c-table";
    if (add_constant(m, "FEATURES", Py_BuildValue("(sss)", crc, "lz4", "zstd")) < 0
        || add_constant(m, "LIBRARY_VERSIONS",
                        Py_BuildValue("{ssss}", "lz4", obd_lz4_version(), "zstd",
                                      obd_zstd_version())) < 0
        || add_constant(m, "INVALID_OFFSET",
                        PyLong_FromUnsignedLongLong(OBD_INVALID_OFFSET)) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
