/* The shared replica's native part (docs/SHARED_REPLICA.md has the layout).
 *
 * - encode(ids, version): a segment file's bytes from the sorted uint64 ids (array('Q')), in
 *   the smallest of three kinds: sorted ids, flat containers, Elias-Fano.
 * - Segment(path): a segment file mapped read-only (no descriptor kept), searchable in place;
 *   Segment.frombytes(data): the same over a bytes object it keeps (the replica engine's
 *   compact form of a sparse segment, sidecar/replica/forms.py). `x in segment`, len(),
 *   iteration and to_array() (the ids as array('Q'), as BitMap64.to_array()).
 * - merge(ids, add, remove): (ids | add) - remove over sorted uint64 arrays, as array('Q').
 * - shape(ids): what the forms cost, for choosing one: (containers, roaring's container
 *   bytes, this format's bytes); ef_size(n, min, max): the Elias-Fano kind's bytes.
 * - lookup(members, users, index, unknown): a packed batch's answers (sidecar/packed.py) in one
 *   call, one byte per user: does members[index[i]] hold users[i]? A member is a Segment
 *   (searched here), a BitMap64 (roaring64_bitmap_contains, found in pyroaring's own
 *   extension: see find_roaring), None (the `unknown` byte: the caller's rules said it is not
 *   answered here) or any other container (`in`).
 * - FastCheck: the Unix-socket server's inline check (sidecar/server/uds.py) in one C call,
 *   reading Python's rules; anything else it leaves to Python.
 * - LocalCheck(...).members_of: the members answering each of a request's segments from
 *   memory (`Replica.local`'s rule, reading the same objects), in one C call.
 * - Reader: the reader's hot path. `contains(user, segment)` is one C call: an acquire load
 *   of the index's sequence number and the writer's heartbeat (CLOCK_MONOTONIC_COARSE, read
 *   from the vDSO: no system call), a dict lookup and a binary search. Anything unusual
 *   (the index moved on, the writer is silent, a segment not published, a bad argument) is
 *   handed to Python callables, so the rules stay in Python.
 *
 * The segment file format is owned here; the index file's offsets come from
 * sidecar/shm/layout.py (passed to Reader), which owns the index format.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdbool.h>
#include <stdint.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define SEG_MAGIC "SEGSHMS1"
#define SEG_HEADER 64
#define KIND_SORTED 1
#define KIND_CONTAINERS 2
#define KIND_ELIAS_FANO 3
#define EF_SAMPLE 256 /* a select sample every EF_SAMPLE zeros of the upper bits */
#define ARRAY_MAX 4096
#define BITSET_BYTES 8192

/* -- the segment file format ------------------------------------------------------------- */

static inline uint64_t rd64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline void wr64(uint8_t *p, uint64_t v) { memcpy(p, &v, 8); }
static inline void wr32(uint8_t *p, uint32_t v) { memcpy(p, &v, 4); }

static size_t align8(size_t n) { return (n + 7) & ~(size_t)7; }

/* sizes of the containers form for sorted ids: number of containers, total bytes */
static void containers_size(const uint64_t *ids, size_t n, size_t *k_out, size_t *bytes_out) {
    size_t k = 0, payload = 0, i = 0;
    while (i < n) {
        uint64_t key = ids[i] >> 16;
        size_t j = i;
        while (j < n && (ids[j] >> 16) == key) j++;
        size_t card = j - i;
        payload += card > ARRAY_MAX ? BITSET_BYTES : align8(card * 2);
        k++;
        i = j;
    }
    *k_out = k;
    *bytes_out = SEG_HEADER + k * 8 + k * 8 + align8(k * 4) + payload;
}

/* Elias-Fano over sorted ids: d = id - min; the low `l` bits of each d packed in n*l bits;
 * the high parts (d >> l) in unary: bit (high_i + i) set in an upper bitvector of
 * n + (max - min >> l) + 1 bits; a sample of the position of every EF_SAMPLE-th zero. */
typedef struct {
    uint64_t min, l, nbits, zeros, low_words, up_words, samples;
} EfShape;

static void ef_shape_of(uint64_t min, uint64_t max, size_t n, EfShape *e) {
    memset(e, 0, sizeof *e);
    if (n == 0) return;
    uint64_t span = max - min, q = span / n;
    e->min = min;
    e->l = q == 0 ? 0 : 63 - (uint64_t)__builtin_clzll(q);
    e->zeros = (span >> e->l) + 1;
    e->nbits = n + e->zeros;
    e->low_words = (n * e->l + 63) / 64;
    e->up_words = (e->nbits + 63) / 64;
    e->samples = (e->zeros + EF_SAMPLE - 1) / EF_SAMPLE;
}

static void ef_shape(const uint64_t *ids, size_t n, EfShape *e) {
    ef_shape_of(n ? ids[0] : 0, n ? ids[n - 1] : 0, n, e);
}

static size_t ef_bytes(const EfShape *e, size_t n) {
    if (n == 0) return (size_t)-1;
    return SEG_HEADER + 8 * (e->low_words + e->up_words + e->samples);
}

static void ef_write(const uint64_t *ids, size_t n, const EfShape *e, uint8_t *body) {
    uint64_t *low = (uint64_t *)body, *up = low + e->low_words, *smp = up + e->up_words;
    uint64_t mask = e->l ? ((uint64_t)1 << e->l) - 1 : 0;
    for (size_t i = 0; i < n; i++) {
        uint64_t d = ids[i] - e->min;
        if (e->l) {
            uint64_t o = (uint64_t)i * e->l, w = o >> 6, b = o & 63, v = d & mask;
            low[w] |= v << b;
            if (b + e->l > 64) low[w + 1] |= v >> (64 - b);
        }
        uint64_t pos = (d >> e->l) + i;
        up[pos >> 6] |= (uint64_t)1 << (pos & 63);
    }
    uint64_t zero = 0; /* zeros before word w; EF_SAMPLE > 64: at most one sample a word */
    for (uint64_t w = 0; w < e->up_words; w++) {
        uint64_t z = ~up[w];
        if (w == e->up_words - 1 && (e->nbits & 63)) z &= ((uint64_t)1 << (e->nbits & 63)) - 1;
        uint64_t c = (uint64_t)__builtin_popcountll(z);
        uint64_t next = (zero + EF_SAMPLE - 1) / EF_SAMPLE * EF_SAMPLE;
        if (next < zero + c) {
            for (uint64_t k = next - zero; k; k--) z &= z - 1;
            smp[next / EF_SAMPLE] = (w << 6) + (uint64_t)__builtin_ctzll(z);
        }
        zero += c;
    }
}

static PyObject *array_type; /* array.array */

/* a new array('Q') of n uint64 written by the caller into *out, or NULL */
static PyObject *new_ids(size_t n, uint64_t **out) {
    PyObject *raw = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(n * 8));
    if (raw == NULL) return NULL;
    *out = (uint64_t *)PyBytes_AS_STRING(raw);
    return raw; /* the caller fills it, then as_array() */
}

static PyObject *as_array(PyObject *raw) {
    PyObject *arr = PyObject_CallFunction(array_type, "sO", "Q", raw);
    Py_DECREF(raw);
    return arr;
}

/* a buffer of uint64 (array('Q'), bytes); 0, or -1 with ValueError */
static int get_ids(PyObject *obj, Py_buffer *view, const char *what) {
    if (PyObject_GetBuffer(obj, view, PyBUF_SIMPLE) != 0) return -1;
    if (view->len % 8) {
        PyBuffer_Release(view);
        PyErr_Format(PyExc_ValueError, "%s must be a buffer of uint64", what);
        return -1;
    }
    return 0;
}

/* shape(ids) -> (containers, roaring_bytes, segment_bytes) for strictly ascending ids:
 * roaring's container bytes (each 2^16 range the smallest of an array, a bitset and runs, as
 * roaring chooses) and the size of this format's encoding (the smaller kind). */
static PyObject *shape(PyObject *self, PyObject *arg) {
    Py_buffer in;
    if (get_ids(arg, &in, "ids") != 0) return NULL;
    const uint64_t *ids = (const uint64_t *)in.buf;
    size_t n = (size_t)in.len / 8, k = 0, roaring = 0, i = 0;
    while (i < n) {
        uint64_t key = ids[i] >> 16;
        size_t j = i + 1, runs = 1;
        while (j < n && (ids[j] >> 16) == key) {
            runs += ids[j] != ids[j - 1] + 1;
            j++;
        }
        size_t card = j - i, best = card * 2;
        if (best > BITSET_BYTES) best = BITSET_BYTES;
        if (2 + 4 * runs < best) best = 2 + 4 * runs;
        roaring += best;
        k++;
        i = j;
    }
    size_t ck, cbytes;
    containers_size(ids, n, &ck, &cbytes);
    size_t sbytes = SEG_HEADER + n * 8, best = cbytes <= sbytes ? cbytes : sbytes;
    EfShape e;
    ef_shape(ids, n, &e);
    if (ef_bytes(&e, n) < best) best = ef_bytes(&e, n);
    PyBuffer_Release(&in);
    return Py_BuildValue("(nnn)", (Py_ssize_t)k, (Py_ssize_t)roaring, (Py_ssize_t)best);
}

/* ef_size(n, min, max) -> the bytes of the Elias-Fano kind for n ids from min to max */
static PyObject *ef_size(PyObject *self, PyObject *args) {
    unsigned long long n, min, max;
    if (!PyArg_ParseTuple(args, "KKK", &n, &min, &max)) return NULL;
    if (n == 0 || max < min || max - min < n - 1) {
        PyErr_SetString(PyExc_ValueError, "need n >= 1 distinct ids from min to max");
        return NULL;
    }
    EfShape e;
    ef_shape_of(min, max, (size_t)n, &e);
    return PyLong_FromSize_t(ef_bytes(&e, (size_t)n));
}

/* merge(ids, add, remove) -> array('Q'): (ids | add) - remove, each sorted ascending */
static PyObject *merge(PyObject *self, PyObject *args) {
    PyObject *a_obj, *add_obj, *rm_obj;
    if (!PyArg_ParseTuple(args, "OOO", &a_obj, &add_obj, &rm_obj)) return NULL;
    Py_buffer a, b, r;
    if (get_ids(a_obj, &a, "ids") != 0) return NULL;
    if (get_ids(add_obj, &b, "add") != 0) { PyBuffer_Release(&a); return NULL; }
    if (get_ids(rm_obj, &r, "remove") != 0) {
        PyBuffer_Release(&a);
        PyBuffer_Release(&b);
        return NULL;
    }
    const uint64_t *x = a.buf, *y = b.buf, *z = r.buf;
    size_t nx = (size_t)a.len / 8, ny = (size_t)b.len / 8, nz = (size_t)r.len / 8;
    uint64_t *out;
    PyObject *raw = new_ids(nx + ny, &out);
    if (raw == NULL) goto done;
    size_t i = 0, j = 0, t = 0, m = 0;
    while (i < nx || j < ny) {
        uint64_t v;
        if (j >= ny || (i < nx && x[i] < y[j])) v = x[i++];
        else if (i >= nx || y[j] < x[i]) v = y[j++];
        else { v = x[i++]; j++; }
        while (t < nz && z[t] < v) t++;
        if (t < nz && z[t] == v) continue;
        out[m++] = v;
    }
    if (_PyBytes_Resize(&raw, (Py_ssize_t)(m * 8)) != 0) { raw = NULL; goto done; }
    raw = as_array(raw);
done:
    PyBuffer_Release(&a);
    PyBuffer_Release(&b);
    PyBuffer_Release(&r);
    return raw;
}

static PyObject *encode(PyObject *self, PyObject *args) {
    Py_buffer in;
    unsigned long long version;
    if (!PyArg_ParseTuple(args, "y*K", &in, &version)) return NULL;
    if (in.len % 8) {
        PyBuffer_Release(&in);
        PyErr_SetString(PyExc_ValueError, "ids must be a buffer of uint64");
        return NULL;
    }
    const uint64_t *ids = (const uint64_t *)in.buf;
    size_t n = (size_t)in.len / 8;
    for (size_t i = 1; i < n; i++) {
        if (ids[i - 1] >= ids[i]) {
            PyBuffer_Release(&in);
            PyErr_SetString(PyExc_ValueError, "ids must be strictly ascending");
            return NULL;
        }
    }
    size_t k, cbytes;
    containers_size(ids, n, &k, &cbytes);
    size_t sbytes = SEG_HEADER + n * 8;
    EfShape e;
    ef_shape(ids, n, &e);
    size_t ebytes = ef_bytes(&e, n);
    /* the smallest; on a tie containers, then Elias-Fano, then sorted ids */
    int kind = KIND_SORTED;
    size_t total = sbytes;
    if (ebytes <= total) { kind = KIND_ELIAS_FANO; total = ebytes; }
    if (cbytes <= total) { kind = KIND_CONTAINERS; total = cbytes; }
    PyObject *out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)total);
    if (out == NULL) { PyBuffer_Release(&in); return NULL; }
    uint8_t *b = (uint8_t *)PyBytes_AS_STRING(out);
    memset(b, 0, total);
    memcpy(b, SEG_MAGIC, 8);
    wr32(b + 8, (uint32_t)kind);
    wr64(b + 16, n);
    wr64(b + 24, version);
    wr64(b + 32, kind == KIND_CONTAINERS ? k : kind == KIND_ELIAS_FANO ? e.l : n);
    if (kind == KIND_ELIAS_FANO) {
        wr64(b + 40, e.min);
        wr64(b + 48, e.nbits);
        ef_write(ids, n, &e, b + SEG_HEADER);
    } else if (kind == KIND_SORTED) {
        memcpy(b + SEG_HEADER, ids, n * 8);
    } else {
        uint8_t *keys = b + SEG_HEADER, *offs = keys + k * 8, *cards = offs + k * 8;
        size_t pos = SEG_HEADER + k * 16 + align8(k * 4), i = 0, c = 0;
        while (i < n) {
            uint64_t key = ids[i] >> 16;
            size_t j = i;
            while (j < n && (ids[j] >> 16) == key) j++;
            size_t card = j - i;
            wr64(keys + c * 8, key);
            wr64(offs + c * 8, pos);
            wr32(cards + c * 4, (uint32_t)card);
            if (card > ARRAY_MAX) {
                for (size_t t = i; t < j; t++) {
                    uint32_t low = (uint32_t)(ids[t] & 0xFFFF);
                    b[pos + (low >> 3)] |= (uint8_t)(1u << (low & 7));
                }
                pos += BITSET_BYTES;
            } else {
                for (size_t t = i; t < j; t++) {
                    uint16_t low = (uint16_t)(ids[t] & 0xFFFF);
                    memcpy(b + pos + (t - i) * 2, &low, 2);
                }
                pos += align8(card * 2);
            }
            c++;
            i = j;
        }
    }
    PyBuffer_Release(&in);
    return out;
}

/* -- a mapped segment ------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    uint8_t *base;
    size_t size;
    PyObject *owner; /* the bytes object `base` points into (frombytes), or NULL: mapped */
    uint32_t kind;
    uint64_t n, k, version;
    const uint64_t *keys;
    const uint64_t *offs;
    const uint32_t *cards;
    EfShape ef; /* kind 3: keys are its low words, offs its upper words, ef_samples its samples */
    const uint64_t *ef_samples;
} Segment;

static PyTypeObject SegmentType;

/* the index of the first key >= x in keys[0..n) */
static inline size_t lower_bound64(const uint64_t *keys, size_t n, uint64_t x) {
    const uint64_t *base = keys;
    while (n > 1) {
        size_t half = n / 2;
        base = base[half - 1] < x ? base + half : base;
        n -= half;
    }
    return (size_t)(base - keys) + (n == 1 && *base < x);
}

static inline uint64_t ef_low(const Segment *s, uint64_t i) {
    uint64_t l = s->ef.l;
    if (l == 0) return 0;
    uint64_t o = i * l, w = o >> 6, b = o & 63, v = s->keys[w] >> b;
    if (b + l > 64) v |= s->keys[w + 1] << (64 - b);
    return v & (((uint64_t)1 << l) - 1);
}

/* the position of the r-th zero (from 0) of the upper bits, or nbits when there is none */
static inline uint64_t ef_select0(const Segment *s, uint64_t r) {
    const uint64_t *up = s->offs;
    uint64_t j = r / EF_SAMPLE, pos = s->ef_samples[j], left = r % EF_SAMPLE;
    if (left == 0) return pos;
    uint64_t start = pos + 1, w = start >> 6;
    if (w >= s->ef.up_words) return s->ef.nbits;
    uint64_t z = ~up[w] & (~(uint64_t)0 << (start & 63));
    for (;;) {
        uint64_t c = (uint64_t)__builtin_popcountll(z);
        if (c >= left) break;
        left -= c;
        if (++w >= s->ef.up_words) return s->ef.nbits;
        z = ~up[w];
    }
    while (--left) z &= z - 1; /* drop the zeros before the one wanted */
    return (w << 6) + (uint64_t)__builtin_ctzll(z);
}

static inline int ef_has(const Segment *s, uint64_t x) {
    if (x < s->ef.min) return 0;
    uint64_t d = x - s->ef.min, h = d >> s->ef.l;
    if (h >= s->ef.zeros) return 0;
    uint64_t lowx = s->ef.l ? d & (((uint64_t)1 << s->ef.l) - 1) : 0;
    /* the ids whose high part is h: indexes [lo, hi), between zero h - 1 and zero h; their
     * low parts ascend. A bucket is one or two ids for uniform ids, but a cluster lands in
     * one bucket whole: binary search it. */
    uint64_t lo = (h == 0 ? 0 : ef_select0(s, h - 1) + 1) - h;
    uint64_t hi = ef_select0(s, h) - h;
    if (hi > s->n) hi = s->n; /* a malformed file: stay inside it */
    uint64_t end = hi; /* below lo: lower than x's; from hi on: not lower */
    while (hi - lo > 8) {
        uint64_t mid = lo + (hi - lo) / 2;
        if (ef_low(s, mid) < lowx) lo = mid + 1; else hi = mid;
    }
    for (; lo < end; lo++) {
        uint64_t low = ef_low(s, lo);
        if (low >= lowx) return low == lowx;
    }
    return 0;
}

static inline int segment_has(const Segment *s, uint64_t x) {
    if (s->kind == KIND_ELIAS_FANO) return ef_has(s, x);
    if (s->kind == KIND_SORTED) {
        size_t i = lower_bound64(s->keys, s->n, x);
        return i < s->n && s->keys[i] == x;
    }
    uint64_t key = x >> 16;
    size_t i = lower_bound64(s->keys, s->k, key);
    if (i >= s->k || s->keys[i] != key) return 0;
    const uint8_t *c = s->base + s->offs[i];
    uint32_t card = s->cards[i];
    uint16_t low = (uint16_t)(x & 0xFFFF);
    if (card > ARRAY_MAX) return (c[low >> 3] >> (low & 7)) & 1;
    const uint16_t *a = (const uint16_t *)c;
    size_t lo = 0, hi = card;
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (a[mid] < low) lo = mid + 1; else hi = mid;
    }
    return lo < card && a[lo] == low;
}

/* 0 when the mapped bytes are a well-formed segment file, else sets ValueError */
static int segment_validate(Segment *s) {
    const uint8_t *b = s->base;
    if (s->size < SEG_HEADER || memcmp(b, SEG_MAGIC, 8) != 0) {
        PyErr_SetString(PyExc_ValueError, "not a segment file (magic)");
        return -1;
    }
    memcpy(&s->kind, b + 8, 4);
    s->n = rd64(b + 16);
    s->version = rd64(b + 24);
    s->k = rd64(b + 32);
    size_t room = s->size - SEG_HEADER;
    if (s->kind == KIND_ELIAS_FANO) {
        uint64_t l = s->k, nbits = rd64(b + 48);
        if (s->n == 0 || l > 63 || nbits <= s->n ||
            (l && nbits - s->n > ((uint64_t)1 << (64 - l))))
            goto bad;
        EfShape *e = &s->ef;
        e->min = rd64(b + 40);
        e->l = l;
        e->nbits = nbits;
        e->zeros = nbits - s->n;
        if (s->n > (UINT64_MAX - 63) / (l ? l : 1)) goto bad;
        e->low_words = (s->n * l + 63) / 64;
        e->up_words = (nbits + 63) / 64;
        e->samples = (e->zeros + EF_SAMPLE - 1) / EF_SAMPLE;
        if (e->low_words > room / 8 || e->up_words > room / 8 - e->low_words ||
            e->samples != room / 8 - e->low_words - e->up_words)
            goto bad;
        s->keys = (const uint64_t *)(b + SEG_HEADER);
        s->offs = s->keys + e->low_words;
        s->ef_samples = s->offs + e->up_words;
        uint64_t ones = 0;
        for (uint64_t w = 0; w < e->up_words; w++) ones += (uint64_t)__builtin_popcountll(s->offs[w]);
        if (ones != s->n || (s->offs[(nbits - 1) >> 6] >> ((nbits - 1) & 63)) & 1) goto bad;
        if (nbits & 63 && s->offs[e->up_words - 1] >> (nbits & 63)) goto bad; /* bits past the end */
        for (uint64_t j = 0; j < e->samples; j++) {
            uint64_t p = s->ef_samples[j];
            if (p >= nbits || (j && p <= s->ef_samples[j - 1]) || (s->offs[p >> 6] >> (p & 63)) & 1)
                goto bad;
        }
        return 0;
    }
    if (s->kind == KIND_SORTED) {
        if (s->k != s->n || s->n > room / 8) goto bad;
        s->keys = (const uint64_t *)(b + SEG_HEADER);
        return 0;
    }
    if (s->kind != KIND_CONTAINERS || s->k > room / 20) goto bad;
    s->keys = (const uint64_t *)(b + SEG_HEADER);
    s->offs = s->keys + s->k;
    s->cards = (const uint32_t *)(s->offs + s->k);
    uint64_t total = 0;
    for (uint64_t i = 0; i < s->k; i++) {
        uint32_t card = s->cards[i];
        uint64_t need = card > ARRAY_MAX ? BITSET_BYTES : (uint64_t)card * 2;
        if (card == 0 || s->offs[i] % 8 || s->offs[i] > s->size || need > s->size - s->offs[i])
            goto bad;
        if (i && s->keys[i - 1] >= s->keys[i]) goto bad;
        total += card;
    }
    if (total != s->n) goto bad;
    return 0;
bad:
    PyErr_SetString(PyExc_ValueError, "malformed segment file (sizes)");
    return -1;
}

/* mmap `path` read-only; the descriptor is closed at once (the mapping keeps the file) */
static uint8_t *map_file(PyObject *path, size_t *size) {
    PyObject *bytes = NULL;
    if (!PyUnicode_FSConverter(path, &bytes)) return NULL;
    int fd = open(PyBytes_AS_STRING(bytes), O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        PyErr_SetFromErrnoWithFilenameObject(PyExc_OSError, path);
        Py_DECREF(bytes);
        return NULL;
    }
    Py_DECREF(bytes);
    struct stat st;
    if (fstat(fd, &st) != 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        close(fd);
        return NULL;
    }
    if (st.st_size <= 0) {
        close(fd);
        PyErr_SetString(PyExc_ValueError, "empty file");
        return NULL;
    }
    void *p = mmap(NULL, (size_t)st.st_size, PROT_READ, MAP_SHARED, fd, 0);
    close(fd);
    if (p == MAP_FAILED) {
        PyErr_SetFromErrno(PyExc_OSError);
        return NULL;
    }
    *size = (size_t)st.st_size;
    return (uint8_t *)p;
}

static PyObject *Segment_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    PyObject *path;
    if (!PyArg_ParseTuple(args, "O", &path)) return NULL;
    Segment *s = (Segment *)type->tp_alloc(type, 0);
    if (s == NULL) return NULL;
    s->base = map_file(path, &s->size);
    if (s->base == NULL || segment_validate(s) != 0) {
        Py_DECREF(s);
        return NULL;
    }
    return (PyObject *)s;
}

static PyObject *Segment_frombytes(PyTypeObject *type, PyObject *data) {
    if (!PyBytes_CheckExact(data)) {
        PyErr_SetString(PyExc_TypeError, "frombytes takes bytes");
        return NULL;
    }
    Segment *s = (Segment *)type->tp_alloc(type, 0);
    if (s == NULL) return NULL;
    Py_INCREF(data);
    s->owner = data;
    s->base = (uint8_t *)PyBytes_AS_STRING(data); /* 8-aligned: bytes' data sits at 32 */
    s->size = (size_t)PyBytes_GET_SIZE(data);
    if (((uintptr_t)s->base & 7) != 0) {
        Py_DECREF(s);
        PyErr_SetString(PyExc_ValueError, "bytes not 8-aligned");
        return NULL;
    }
    if (segment_validate(s) != 0) {
        Py_DECREF(s);
        return NULL;
    }
    return (PyObject *)s;
}

static void Segment_dealloc(Segment *s) {
    if (s->owner != NULL) Py_DECREF(s->owner);
    else if (s->base != NULL) munmap(s->base, s->size);
    Py_TYPE(s)->tp_free((PyObject *)s);
}

/* the ids, ascending, into out[0..n) */
static void segment_decode(const Segment *s, uint64_t *out) {
    if (s->kind == KIND_ELIAS_FANO) {
        uint64_t i = 0;
        for (uint64_t w = 0; w < s->ef.up_words && i < s->n; w++) {
            uint64_t word = s->offs[w];
            while (word && i < s->n) {
                uint64_t pos = (w << 6) + (uint64_t)__builtin_ctzll(word);
                out[i] = s->ef.min + (((pos - i) << s->ef.l) | ef_low(s, i));
                i++;
                word &= word - 1;
            }
        }
        return;
    }
    if (s->kind == KIND_SORTED) {
        memcpy(out, s->keys, s->n * 8);
        return;
    }
    size_t m = 0;
    for (uint64_t i = 0; i < s->k; i++) {
        uint64_t high = s->keys[i] << 16;
        const uint8_t *c = s->base + s->offs[i];
        uint32_t card = s->cards[i];
        if (card > ARRAY_MAX) {
            for (uint32_t w = 0; w < BITSET_BYTES / 8; w++) {
                uint64_t word = rd64(c + w * 8);
                while (word) {
                    out[m++] = high | (w * 64 + (uint64_t)__builtin_ctzll(word));
                    word &= word - 1;
                }
            }
        } else {
            const uint16_t *a = (const uint16_t *)c;
            for (uint32_t t = 0; t < card; t++) out[m++] = high | a[t];
        }
    }
}

static PyObject *Segment_to_array(Segment *s, PyObject *unused) {
    uint64_t *out;
    PyObject *raw = new_ids(s->n, &out);
    if (raw == NULL) return NULL;
    segment_decode(s, out);
    return as_array(raw);
}

static PyObject *Segment_iter(Segment *s) {
    PyObject *arr = Segment_to_array(s, NULL);
    if (arr == NULL) return NULL;
    PyObject *it = PyObject_GetIter(arr);
    Py_DECREF(arr);
    return it;
}

static Py_ssize_t Segment_len(Segment *s) { return (Py_ssize_t)s->n; }

/* `x in segment`: as `x in BitMap64` (OverflowError outside uint64, TypeError for a non-int) */
static int Segment_sq_contains(Segment *s, PyObject *arg) {
    unsigned long long x = PyLong_AsUnsignedLongLong(arg);
    if (x == (unsigned long long)-1 && PyErr_Occurred()) return -1;
    return segment_has(s, x);
}

static PyObject *Segment_get_data(Segment *s, void *c) {
    if (s->owner != NULL) {
        Py_INCREF(s->owner);
        return s->owner;
    }
    return PyBytes_FromStringAndSize((const char *)s->base, (Py_ssize_t)s->size);
}

static PySequenceMethods Segment_as_sequence = {
    .sq_length = (lenfunc)Segment_len,
    .sq_contains = (objobjproc)Segment_sq_contains,
};

static PyObject *Segment_contains(Segment *s, PyObject *arg) {
    unsigned long long x = PyLong_AsUnsignedLongLong(arg);
    if (x == (unsigned long long)-1 && PyErr_Occurred()) return NULL;
    return PyBool_FromLong(segment_has(s, x));
}

static PyObject *Segment_get_cardinality(Segment *s, void *c) { return PyLong_FromUnsignedLongLong(s->n); }
static PyObject *Segment_get_version(Segment *s, void *c) { return PyLong_FromUnsignedLongLong(s->version); }
static PyObject *Segment_get_kind(Segment *s, void *c) { return PyLong_FromUnsignedLong(s->kind); }
static PyObject *Segment_get_size(Segment *s, void *c) { return PyLong_FromSize_t(s->size); }

static PyMethodDef Segment_methods[] = {
    {"contains", (PyCFunction)Segment_contains, METH_O, "contains(user) -> bool"},
    {"to_array", (PyCFunction)Segment_to_array, METH_NOARGS, "the ids, ascending, as array('Q')"},
    {"frombytes", (PyCFunction)Segment_frombytes, METH_O | METH_CLASS,
     "frombytes(data: bytes) -> Segment over a segment file's bytes (kept, not copied)"},
    {NULL},
};
static PyGetSetDef Segment_getset[] = {
    {"cardinality", (getter)Segment_get_cardinality, NULL, "members", NULL},
    {"version", (getter)Segment_get_version, NULL, "the segment's version", NULL},
    {"kind", (getter)Segment_get_kind, NULL, "1 sorted ids, 2 containers, 3 Elias-Fano", NULL},
    {"size", (getter)Segment_get_size, NULL, "bytes mapped", NULL},
    {"data", (getter)Segment_get_data, NULL, "the segment file's bytes", NULL},
    {NULL},
};

static PyTypeObject SegmentType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "sidecar.shm._native.Segment",
    .tp_basicsize = sizeof(Segment),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Segment(path): a segment file mapped read-only; Segment.frombytes(data)",
    .tp_new = Segment_new,
    .tp_dealloc = (destructor)Segment_dealloc,
    .tp_as_sequence = &Segment_as_sequence,
    .tp_iter = (getiterfunc)Segment_iter,
    .tp_methods = Segment_methods,
    .tp_getset = Segment_getset,
};

/* -- the reader ------------------------------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    PyObject *segments; /* dict: segment id -> Segment, as of `seen` */
    PyObject *refresh;  /* refresh() -> None: brings `segments` up to date (or empties it) */
    PyObject *miss;     /* miss(user, segment) -> None, or raises for bad arguments */
    uint8_t *index;     /* the mapped index, or NULL */
    size_t index_size;
    Py_ssize_t seq_off, heartbeat_off;
    uint64_t seen;      /* the index sequence number `segments` belongs to */
    int64_t max_age_ms; /* a heartbeat older than this: the writer is gone */
} Reader;

static inline uint64_t load_acquire(const uint8_t *p) {
    return __atomic_load_n((const uint64_t *)p, __ATOMIC_ACQUIRE);
}

static inline int64_t coarse_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

static PyObject *Reader_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    static char *names[] = {"refresh", "miss", "seq_offset", "heartbeat_offset", "max_age_ms", NULL};
    PyObject *refresh, *miss;
    Py_ssize_t seq_off, hb_off;
    long long max_age;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "OOnnL", names, &refresh, &miss, &seq_off, &hb_off,
                                     &max_age))
        return NULL;
    if (seq_off % 8 || hb_off % 8 || seq_off < 0 || hb_off < 0) {
        PyErr_SetString(PyExc_ValueError, "offsets must be non-negative multiples of 8");
        return NULL;
    }
    Reader *r = (Reader *)type->tp_alloc(type, 0);
    if (r == NULL) return NULL;
    r->segments = PyDict_New();
    if (r->segments == NULL) { Py_DECREF(r); return NULL; }
    Py_INCREF(refresh);
    Py_INCREF(miss);
    r->refresh = refresh;
    r->miss = miss;
    r->seq_off = seq_off;
    r->heartbeat_off = hb_off;
    r->max_age_ms = max_age;
    return (PyObject *)r;
}

static void reader_unmap(Reader *r) {
    if (r->index != NULL) munmap(r->index, r->index_size);
    r->index = NULL;
    r->index_size = 0;
}

static int Reader_traverse(Reader *r, visitproc visit, void *arg) {
    Py_VISIT(r->segments);
    Py_VISIT(r->refresh);
    Py_VISIT(r->miss);
    return 0;
}

static int Reader_clear(Reader *r) {
    Py_CLEAR(r->segments);
    Py_CLEAR(r->refresh);
    Py_CLEAR(r->miss);
    return 0;
}

static void Reader_dealloc(Reader *r) {
    PyObject_GC_UnTrack(r);
    Reader_clear(r);
    reader_unmap(r);
    Py_TYPE(r)->tp_free((PyObject *)r);
}

/* the mapping answers as of now: mapped, not moved on, writer alive */
static inline int reader_current(const Reader *r) {
    if (r->index == NULL) return 0;
    if (load_acquire(r->index + r->seq_off) != r->seen) return 0;
    int64_t beat = (int64_t)load_acquire(r->index + r->heartbeat_off);
    return coarse_ms() - beat <= r->max_age_ms;
}

static PyObject *Reader_contains(Reader *r, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "contains(user, segment)");
        return NULL;
    }
    PyObject *user = args[0], *segment = args[1];
    if (!reader_current(r)) {
        PyObject *res = PyObject_CallNoArgs(r->refresh);
        if (res == NULL) return NULL;
        Py_DECREF(res);
    }
    if (!PyLong_CheckExact(user) || !PyUnicode_CheckExact(segment))
        return PyObject_CallFunctionObjArgs(r->miss, user, segment, NULL);
    PyObject *seg = PyDict_GetItemWithError(r->segments, segment);
    if (seg == NULL) {
        if (PyErr_Occurred()) return NULL;
        return PyObject_CallFunctionObjArgs(r->miss, user, segment, NULL);
    }
    unsigned long long x = PyLong_AsUnsignedLongLong(user);
    if (x == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        return PyObject_CallFunctionObjArgs(r->miss, user, segment, NULL);
    }
    if (segment_has((const Segment *)seg, x)) Py_RETURN_TRUE;
    Py_RETURN_FALSE;
}

static PyObject *Reader_map(Reader *r, PyObject *path) {
    size_t size;
    uint8_t *p = map_file(path, &size);
    if (p == NULL) return NULL;
    if ((size_t)r->seq_off + 8 > size || (size_t)r->heartbeat_off + 8 > size) {
        munmap(p, size);
        PyErr_SetString(PyExc_ValueError, "index file too small");
        return NULL;
    }
    reader_unmap(r);
    r->index = p;
    r->index_size = size;
    Py_RETURN_NONE;
}

static PyObject *Reader_unmap(Reader *r, PyObject *unused) {
    reader_unmap(r);
    Py_RETURN_NONE;
}

static PyObject *Reader_set(Reader *r, PyObject *args) {
    unsigned long long seen;
    PyObject *segments;
    if (!PyArg_ParseTuple(args, "KO!", &seen, &PyDict_Type, &segments)) return NULL;
    Py_INCREF(segments);
    Py_SETREF(r->segments, segments);
    r->seen = seen;
    Py_RETURN_NONE;
}

static PyObject *Reader_load(Reader *r, PyObject *arg) {
    Py_ssize_t off = PyLong_AsSsize_t(arg);
    if (off == -1 && PyErr_Occurred()) return NULL;
    if (r->index == NULL || off < 0 || off % 8 || (size_t)off + 8 > r->index_size) {
        PyErr_SetString(PyExc_ValueError, "no index mapped, or offset outside it");
        return NULL;
    }
    return PyLong_FromUnsignedLongLong(load_acquire(r->index + off));
}

/* snapshot(start, count_offset, entry_size, entries_offset) -> (seq, bytes of the table) or
 * None when the writer kept changing it. The table is index[start : entries_offset +
 * count * entry_size], count read (uint32) at count_offset; both inside the seqlock. */
static PyObject *Reader_snapshot(Reader *r, PyObject *args) {
    Py_ssize_t start, count_off, entry_size, entries_off;
    if (!PyArg_ParseTuple(args, "nnnn", &start, &count_off, &entry_size, &entries_off)) return NULL;
    if (r->index == NULL || start < 0 || entries_off < start || entry_size <= 0 ||
        (size_t)entries_off > r->index_size || count_off < start || count_off + 4 > entries_off) {
        PyErr_SetString(PyExc_ValueError, "no index mapped, or a table outside it");
        return NULL;
    }
    for (int attempt = 0; attempt < 10000; attempt++) {
        uint64_t s1 = load_acquire(r->index + r->seq_off);
        if (s1 & 1) continue;
        uint32_t count;
        memcpy(&count, r->index + count_off, 4);
        size_t end = (size_t)entries_off + (size_t)count * (size_t)entry_size;
        if (end > r->index_size) end = r->index_size;
        PyObject *copy = PyBytes_FromStringAndSize((const char *)r->index + start,
                                                   (Py_ssize_t)(end - (size_t)start));
        if (copy == NULL) return NULL;
        __atomic_thread_fence(__ATOMIC_ACQUIRE);
        uint64_t s2 = __atomic_load_n((const uint64_t *)(r->index + r->seq_off), __ATOMIC_RELAXED);
        if (s1 == s2) return Py_BuildValue("(KN)", (unsigned long long)s1, copy);
        Py_DECREF(copy);
    }
    Py_RETURN_NONE;
}

static PyMethodDef Reader_methods[] = {
    {"contains", (PyCFunction)(void (*)(void))Reader_contains, METH_FASTCALL,
     "contains(user, segment) -> True / False / None"},
    {"map", (PyCFunction)Reader_map, METH_O, "map(index_path): map the index read-only"},
    {"unmap", (PyCFunction)Reader_unmap, METH_NOARGS, "unmap the index"},
    {"set", (PyCFunction)Reader_set, METH_VARARGS, "set(seq, segments): what contains reads"},
    {"load", (PyCFunction)Reader_load, METH_O, "load(offset) -> uint64 (acquire)"},
    {"snapshot", (PyCFunction)Reader_snapshot, METH_VARARGS,
     "snapshot(start, count_offset, entry_size, entries_offset) -> (seq, bytes) or None"},
    {NULL},
};

static PyObject *Reader_get_mapped(Reader *r, void *c) { return PyBool_FromLong(r->index != NULL); }
static PyObject *Reader_get_seen(Reader *r, void *c) { return PyLong_FromUnsignedLongLong(r->seen); }
static PyObject *Reader_get_segments(Reader *r, void *c) { Py_INCREF(r->segments); return r->segments; }
static PyObject *Reader_get_current(Reader *r, void *c) { return PyBool_FromLong(reader_current(r)); }

static PyGetSetDef Reader_getset[] = {
    {"mapped", (getter)Reader_get_mapped, NULL, "an index is mapped", NULL},
    {"seen", (getter)Reader_get_seen, NULL, "the sequence number of `segments`", NULL},
    {"segments", (getter)Reader_get_segments, NULL, "segment id -> Segment", NULL},
    {"current", (getter)Reader_get_current, NULL, "mapped, up to date, writer alive", NULL},
    {NULL},
};

static PyTypeObject ReaderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "sidecar.shm._native.Reader",
    .tp_basicsize = sizeof(Reader),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Reader(refresh, miss, seq_offset, heartbeat_offset, max_age_ms)",
    .tp_new = Reader_new,
    .tp_dealloc = (destructor)Reader_dealloc,
    .tp_traverse = (traverseproc)Reader_traverse,
    .tp_clear = (inquiry)Reader_clear,
    .tp_methods = Reader_methods,
    .tp_getset = Reader_getset,
};

/* -- the writer's seqlock ------------------------------------------------------------------- */

/* write_locked(buffer, seq_offset, position, data): seq += 1 (odd), data copied at position,
 * seq += 1 (even), with release ordering, so a reader's snapshot sees all of it or none. */
static PyObject *write_locked(PyObject *self, PyObject *args) {
    Py_buffer buf, data;
    Py_ssize_t seq_off, pos;
    if (!PyArg_ParseTuple(args, "w*ny*n", &buf, &seq_off, &data, &pos)) return NULL;
    PyObject *res = NULL;
    if (seq_off < 0 || seq_off % 8 || seq_off + 8 > buf.len || pos < 0 || pos + data.len > buf.len ||
        (pos < seq_off + 8 && pos + data.len > seq_off)) {
        PyErr_SetString(PyExc_ValueError, "write outside the buffer or over the sequence number");
        goto done;
    }
    uint64_t *seq = (uint64_t *)((uint8_t *)buf.buf + seq_off);
    uint64_t s = __atomic_load_n(seq, __ATOMIC_RELAXED);
    __atomic_store_n(seq, s + 1, __ATOMIC_RELAXED);
    __atomic_thread_fence(__ATOMIC_RELEASE);
    memcpy((uint8_t *)buf.buf + pos, data.buf, (size_t)data.len);
    __atomic_store_n(seq, s + 2, __ATOMIC_RELEASE);
    res = PyLong_FromUnsignedLongLong(s + 2);
done:
    PyBuffer_Release(&buf);
    PyBuffer_Release(&data);
    return res;
}

/* store(buffer, offset, value): an atomic release store of a uint64 (the heartbeat) */
static PyObject *store(PyObject *self, PyObject *args) {
    Py_buffer buf;
    Py_ssize_t off;
    unsigned long long value;
    if (!PyArg_ParseTuple(args, "w*nK", &buf, &off, &value)) return NULL;
    if (off < 0 || off % 8 || off + 8 > buf.len) {
        PyBuffer_Release(&buf);
        PyErr_SetString(PyExc_ValueError, "offset outside the buffer");
        return NULL;
    }
    __atomic_store_n((uint64_t *)((uint8_t *)buf.buf + off), (uint64_t)value, __ATOMIC_RELEASE);
    PyBuffer_Release(&buf);
    Py_RETURN_NONE;
}

/* -- a packed batch's lookups ------------------------------------------------------------------- */

typedef bool (*Roaring64Contains)(const void *bitmap, uint64_t x);
static Roaring64Contains roaring64_contains; /* NULL: BitMap64s are asked through `in` */

static PyObject *bitmap64_type;
static int roaring_looked_up;

/* pyroaring exports CRoaring's functions from its extension, and a BitMap64's
 * roaring64_bitmap_t as `raw_pointer`: with both, a check is one C call, where `in` costs a
 * Python int and a Cython method call (3-5x the time). Either missing (another pyroaring
 * build): `in`. SEG_NATIVE_ROARING=0 forces `in` (tests compare the two). */
static void find_roaring(void) {
    roaring_looked_up = 1;
    const char *env = getenv("SEG_NATIVE_ROARING");
    if (env != NULL && strcmp(env, "0") == 0) return;
    PyObject *mod = PyImport_ImportModule("pyroaring");
    if (mod == NULL) {
        PyErr_Clear();
        return;
    }
    PyObject *type = PyObject_GetAttrString(mod, "BitMap64");
    PyObject *file = PyObject_GetAttrString(mod, "__file__");
    Py_DECREF(mod);
    const char *path = (file != NULL && PyUnicode_Check(file)) ? PyUnicode_AsUTF8(file) : NULL;
    void *lib = path != NULL ? dlopen(path, RTLD_NOW | RTLD_NOLOAD) : NULL; /* loaded already */
    void *fn = lib != NULL ? dlsym(lib, "roaring64_bitmap_contains") : NULL;
    if (fn != NULL && type != NULL && PyType_Check(type) &&
        PyObject_HasAttrString(type, "raw_pointer")) {
        roaring64_contains = (Roaring64Contains)fn;
        bitmap64_type = type; /* kept for the process's life */
        type = NULL;
    }
    Py_XDECREF(type);
    Py_XDECREF(file);
    PyErr_Clear();
}

static PyObject *str_raw_pointer; /* interned "raw_pointer" */

enum { M_UNKNOWN, M_SEGMENT, M_ROARING, M_OTHER };
typedef struct {
    int how;
    const void *p; /* the Segment, or the roaring64_bitmap_t */
    PyObject *obj;
} Member;

static inline uint64_t rd_le64(const uint8_t *p) {
    uint64_t v;
    memcpy(&v, p, 8);
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    return v;
}

static inline uint16_t rd_le16(const uint8_t *p) {
    uint16_t v;
    memcpy(&v, p, 2);
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap16(v);
#endif
    return v;
}

/* what lookup asks of members[j]; 0, or -1 with an exception */
static int member_of(PyObject *o, Member *m) {
    m->obj = o;
    m->p = NULL;
    if (o == Py_None) {
        m->how = M_UNKNOWN;
    } else if (Py_TYPE(o) == &SegmentType) {
        m->how = M_SEGMENT;
        m->p = o;
    } else if (roaring64_contains != NULL && Py_TYPE(o) == (PyTypeObject *)bitmap64_type) {
        PyObject *raw = PyObject_GetAttr(o, str_raw_pointer);
        if (raw == NULL) return -1;
        m->p = PyLong_AsVoidPtr(raw);
        Py_DECREF(raw);
        if (m->p == NULL) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "a BitMap64 with no bitmap");
            return -1;
        }
        m->how = M_ROARING;
    } else {
        m->how = M_OTHER;
    }
    return 0;
}

/* The answers of n items into res[0..n): res[i] is 1 when m[index[i]] holds users[i] (u: n
 * little-endian uint64; ix: n little-endian uint16, or NULL: every user against m[0]), else
 * 0, and `unknown` where that member is M_UNKNOWN. 0, or -1 with an exception: IndexError for
 * an index past the nm members, or what an M_OTHER member's `in` raised. */
static int lookup_into(const Member *m, Py_ssize_t nm, const uint8_t *u, const uint8_t *ix,
                       Py_ssize_t n, uint8_t *res, int unknown) {
    uint32_t *order = NULL;
    int rc = -1;
    /* The items grouped by member (a counting sort on the index, stable): each member's
     * lookups run back to back, while its bitmap's upper levels are in the cache (6-12% less
     * time for 1,000 pairs over 100 segments, perf/ANALYSIS.md "Sixth session"; CRoaring's
     * `roaring64_bitmap_contains_bulk` over each group was measured too and added nothing).
     * Answers are written at the items' own places. */
    if (ix != NULL && nm > 1) {
        order = PyMem_Malloc(sizeof(uint32_t) * (size_t)n + sizeof(Py_ssize_t) * (size_t)(nm + 1));
        if (order == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        Py_ssize_t *start = (Py_ssize_t *)(order + n);
        memset(start, 0, sizeof(Py_ssize_t) * (size_t)(nm + 1));
        for (Py_ssize_t i = 0; i < n; i++) {
            size_t j = rd_le16(ix + 2 * i);
            if ((Py_ssize_t)j >= nm) {
                PyErr_Format(PyExc_IndexError, "index %zu past the %zd members", j, nm);
                goto done;
            }
            start[j + 1]++;
        }
        for (Py_ssize_t j = 0; j < nm; j++) start[j + 1] += start[j];
        for (Py_ssize_t i = 0; i < n; i++) order[start[rd_le16(ix + 2 * i)]++] = (uint32_t)i;
    }
    for (Py_ssize_t k = 0; k < n; k++) {
        Py_ssize_t i = order != NULL ? (Py_ssize_t)order[k] : k;
        uint64_t x = rd_le64(u + 8 * i);
        size_t j = ix != NULL ? rd_le16(ix + 2 * i) : 0;
        if ((Py_ssize_t)j >= nm) {
            PyErr_Format(PyExc_IndexError, "index %zu past the %zd members", j, nm);
            goto done;
        }
        const Member *mj = &m[j];
        switch (mj->how) {
        case M_SEGMENT:
            res[i] = (uint8_t)segment_has((const Segment *)mj->p, x);
            break;
        case M_ROARING:
            res[i] = (uint8_t)roaring64_contains(mj->p, x);
            break;
        case M_UNKNOWN:
            res[i] = (uint8_t)unknown;
            break;
        default: {
            PyObject *v = PyLong_FromUnsignedLongLong(x);
            int has = v != NULL ? PySequence_Contains(mj->obj, v) : -1;
            Py_XDECREF(v);
            if (has < 0) goto done;
            res[i] = (uint8_t)has;
        }
        }
    }
    rc = 0;
done:
    PyMem_Free(order);
    return rc;
}

/* lookup(members, users, index, unknown) -> bytes: byte i is 1 when members[index[i]] holds
 * users[i] (little-endian uint64), else 0, and `unknown` where that member is None. An empty
 * index: every user against members[0]. IndexError for an index past the members. The GIL is
 * held throughout (unless a member is some other container, whose `in` may run Python), so
 * the batch reads one state of every member. */
static PyObject *lookup(PyObject *self, PyObject *args) {
    PyObject *members;
    Py_buffer users, index;
    int unknown;
    if (!PyArg_ParseTuple(args, "Oy*y*i", &members, &users, &index, &unknown)) return NULL;
    PyObject *out = NULL;
    Member *m = NULL;
    PyObject *seq = PySequence_Tuple(members); /* owns them while `in` may run Python */
    if (seq == NULL) goto done;
    Py_ssize_t nm = PyTuple_GET_SIZE(seq), n = users.len / 8;
    if (users.len % 8 || (index.len && index.len != 2 * n) || (n && nm == 0)) {
        PyErr_SetString(PyExc_ValueError, "lookup: users, index and members do not agree");
        goto done;
    }
    if (!roaring_looked_up) find_roaring();
    m = PyMem_Malloc(sizeof(Member) * (size_t)(nm ? nm : 1));
    if (m == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t j = 0; j < nm; j++)
        if (member_of(PyTuple_GET_ITEM(seq, j), &m[j]) < 0) goto done;
    out = PyBytes_FromStringAndSize(NULL, n);
    if (out == NULL) goto done;
    if (lookup_into(m, nm, users.buf, index.len ? index.buf : NULL, n,
                    (uint8_t *)PyBytes_AS_STRING(out), unknown) < 0)
        Py_CLEAR(out);
done:
    PyMem_Free(m);
    Py_XDECREF(seq);
    PyBuffer_Release(&users);
    PyBuffer_Release(&index);
    return out;
}

/* -- the packed batch's client side (sidecar/packed.py) ------------------------------------- */

static inline void wr_le64(uint8_t *p, uint64_t v) {
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap64(v);
#endif
    memcpy(p, &v, 8);
}

static inline void wr_le16(uint8_t *p, uint16_t v) {
#if __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    v = __builtin_bswap16(v);
#endif
    memcpy(p, &v, 2);
}

/* pack_u64(users: list | tuple) -> bytes, the ids as little-endian uint64; None when `users`
 * is another type or an item is not an int in 0..2^64-1 (exactly int: a bool or a subclass
 * too), so that the caller's Python path (sidecar/packed.py) says what is wrong, or packs it */
static PyObject *pack_u64(PyObject *self, PyObject *arg) {
    if (!PyList_CheckExact(arg) && !PyTuple_CheckExact(arg)) Py_RETURN_NONE;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(arg);
    PyObject **items = PySequence_Fast_ITEMS(arg);
    PyObject *out = PyBytes_FromStringAndSize(NULL, n * 8);
    if (out == NULL) return NULL;
    uint8_t *p = (uint8_t *)PyBytes_AS_STRING(out);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *o = items[i];
        if (!PyLong_CheckExact(o)) goto none;
        /* the signed conversion loops over the digits; the unsigned one goes through a byte
         * array (CPython 3.11), 5x slower: it is kept for ids of 2^63 and up */
        int overflow;
        long long sv = PyLong_AsLongLongAndOverflow(o, &overflow); /* runs no Python code */
        uint64_t v = (uint64_t)sv;
        if (overflow > 0) {
            unsigned long long uv = PyLong_AsUnsignedLongLong(o);
            if (uv == (unsigned long long)-1 && PyErr_Occurred()) {
                PyErr_Clear();
                goto none;
            }
            v = (uint64_t)uv;
        } else if (overflow < 0 || sv < 0) {
            PyErr_Clear();
            goto none;
        }
        wr_le64(p + 8 * i, v);
    }
    return out;
none:
    Py_DECREF(out);
    Py_RETURN_NONE;
}

/* pack_index(segments: list | tuple, limit) -> (distinct, index): the distinct segment ids in
 * the order they first appear, and for each item its position among them as little-endian
 * uint16; None when `segments` is another type, an item is not exactly a str, or there are
 * more than `limit` distinct ids (the caller's Python path then says what is wrong) */
static PyObject *pack_index(PyObject *self, PyObject *args) {
    PyObject *segs;
    Py_ssize_t limit;
    if (!PyArg_ParseTuple(args, "On", &segs, &limit)) return NULL;
    if (!PyList_CheckExact(segs) && !PyTuple_CheckExact(segs)) Py_RETURN_NONE;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(segs);
    PyObject **items = PySequence_Fast_ITEMS(segs);
    PyObject *pos = PyDict_New(), *distinct = PyList_New(0), *index = NULL, *out = NULL;
    if (pos == NULL || distinct == NULL) goto done;
    index = PyBytes_FromStringAndSize(NULL, n * 2);
    if (index == NULL) goto done;
    uint8_t *ix = (uint8_t *)PyBytes_AS_STRING(index);
    /* str hashing and comparing run no Python code, and nothing here allocates an object the
     * garbage collector tracks: `segs` cannot change under the loop. The same str object
     * usually stands for a segment throughout (a caller's names): a small table keyed by the
     * object's address answers most items without hashing. */
    enum { SEEN_BITS = 9, SEEN = 1 << SEEN_BITS };
    PyObject *seen[SEEN] = {NULL};
    uint16_t seen_k[SEEN];
    Py_ssize_t k = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *s = items[i];
        size_t h = (size_t)(((uint64_t)(uintptr_t)s * 0x9E3779B97F4A7C15ULL) >> (64 - SEEN_BITS));
        if (seen[h] == s) {
            k = seen_k[h];
        } else {
            if (!PyUnicode_CheckExact(s)) goto none;
            PyObject *at = PyDict_GetItemWithError(pos, s); /* borrowed */
            if (at != NULL) {
                k = PyLong_AsSsize_t(at);
            } else {
                if (PyErr_Occurred()) goto done;
                k = PyList_GET_SIZE(distinct);
                if (k >= limit) goto none;
                PyObject *num = PyLong_FromSsize_t(k);
                if (num == NULL) goto done;
                int bad = PyDict_SetItem(pos, s, num) < 0 || PyList_Append(distinct, s) < 0;
                Py_DECREF(num);
                if (bad) goto done;
            }
            seen[h] = s;
            seen_k[h] = (uint16_t)k;
        }
        wr_le16(ix + 2 * i, (uint16_t)k);
    }
    out = PyTuple_Pack(2, distinct, index);
    goto done;
none:
    out = Py_None;
    Py_INCREF(out);
done:
    Py_XDECREF(pos);
    Py_XDECREF(distinct);
    Py_XDECREF(index);
    return out;
}

/* answers(data) -> [False / True / None per byte 0 / 1 / 2]; ValueError for any other byte */
static PyObject *answers(PyObject *self, PyObject *arg) {
    Py_buffer b;
    if (PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE) < 0) return NULL;
    const uint8_t *p = b.buf;
    PyObject *out = PyList_New(b.len);
    if (out == NULL) goto done;
    for (Py_ssize_t i = 0; i < b.len; i++) {
        PyObject *v = p[i] == 0 ? Py_False : p[i] == 1 ? Py_True : p[i] == 2 ? Py_None : NULL;
        if (v == NULL) {
            PyErr_SetString(PyExc_ValueError, "malformed batch_packed result");
            Py_CLEAR(out); /* the items not set yet are NULL: list_dealloc skips them */
            goto done;
        }
        Py_INCREF(v);
        PyList_SET_ITEM(out, i, v);
    }
done:
    PyBuffer_Release(&b);
    return out;
}

static PyObject *roaring_native(PyObject *self, PyObject *unused) {
    if (!roaring_looked_up) find_roaring();
    return PyBool_FromLong(roaring64_contains != NULL);
}

static PyObject *str_ready, *str_health, *str_bitmap, *one;

/* -- the in-process check --------------------------------------------------------------------- */

/* LocalCheck(segments, aged, replica, fresh).members_of(segments, valid): for each of a
 * request's segments, the members answering it from memory, as `Replica.local` decides
 * (sidecar/replica/runner.py), reading the same objects: the engine's segment table, the
 * segments past their max age, `replica.ready`, a state's `health` is `fresh`. (A C
 * `Replica.contains` was measured too: no faster than the Python method in `seg-perf
 * embedded`, where the lookups' cache misses are the cost, so it is not here.) */
typedef struct {
    PyObject_HEAD
    PyObject *segments, *aged, *replica, *fresh;
} LocalCheck;

static void LocalCheck_dealloc(LocalCheck *c) {
    PyObject_GC_UnTrack(c);
    Py_CLEAR(c->segments);
    Py_CLEAR(c->aged);
    Py_CLEAR(c->replica);
    Py_CLEAR(c->fresh);
    Py_TYPE(c)->tp_free((PyObject *)c);
}

static int LocalCheck_traverse(LocalCheck *c, visitproc visit, void *arg) {
    Py_VISIT(c->segments);
    Py_VISIT(c->aged);
    Py_VISIT(c->replica);
    Py_VISIT(c->fresh);
    return 0;
}

static int LocalCheck_clear(LocalCheck *c) {
    Py_CLEAR(c->segments);
    Py_CLEAR(c->aged);
    Py_CLEAR(c->replica);
    Py_CLEAR(c->fresh);
    return 0;
}

static PyObject *LocalCheck_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    static char *names[] = {"segments", "aged", "replica", "fresh", NULL};
    PyObject *segments, *aged, *replica, *fresh;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!O!OO", names, &PyDict_Type, &segments,
                                     &PySet_Type, &aged, &replica, &fresh))
        return NULL;
    if (!roaring_looked_up) find_roaring();
    LocalCheck *c = (LocalCheck *)type->tp_alloc(type, 0);
    if (c == NULL) return NULL;
    Py_INCREF(segments);
    Py_INCREF(aged);
    Py_INCREF(replica);
    Py_INCREF(fresh);
    c->segments = segments;
    c->aged = aged;
    c->replica = replica;
    c->fresh = fresh;
    return (PyObject *)c;
}

/* the state answering `segment` from memory (a new reference), or NULL: when none answers
 * (no exception set) or on an error (set) */
static PyObject *answering(LocalCheck *c, PyObject *segment) {
    PyObject *st = PyDict_GetItemWithError(c->segments, segment); /* borrowed */
    if (st == NULL) return NULL;
    Py_INCREF(st);
    PyObject *health = PyObject_GetAttr(st, str_health);
    if (health == NULL) goto none;
    int fresh = health == c->fresh;
    Py_DECREF(health);
    if (!fresh) goto none;
    PyObject *ready = PyObject_GetAttr(c->replica, str_ready);
    if (ready == NULL) goto none;
    int is_ready = PyObject_IsTrue(ready);
    Py_DECREF(ready);
    if (is_ready <= 0 || PySet_Contains(c->aged, segment) != 0) goto none;
    return st;
none:
    Py_DECREF(st);
    return NULL;
}

/* members_of(segments, valid) -> [members or None per segment], or None when one of them is
 * not a str in `valid` (the caller validates then) */
static PyObject *LocalCheck_members_of(LocalCheck *c, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2 || !PySet_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "members_of(segments, valid: set)");
        return NULL;
    }
    PyObject *seq = PySequence_Fast(args[0], "segments must be a sequence");
    if (seq == NULL) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject *out = PyList_New(n);
    if (out == NULL) goto fail;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *seg = PySequence_Fast_GET_ITEM(seq, i);
        if (!PyUnicode_CheckExact(seg) || PySet_Contains(args[1], seg) != 1) {
            PyErr_Clear();
            Py_DECREF(out);
            Py_DECREF(seq);
            Py_RETURN_NONE;
        }
        PyObject *st = answering(c, seg), *members;
        if (st == NULL) {
            if (PyErr_Occurred()) goto fail;
            Py_INCREF(Py_None);
            members = Py_None;
        } else {
            members = PyObject_GetAttr(st, str_bitmap);
            Py_DECREF(st);
            if (members == NULL) goto fail;
        }
        PyList_SET_ITEM(out, i, members);
    }
    Py_DECREF(seq);
    return out;
fail:
    Py_XDECREF(out);
    Py_DECREF(seq);
    return NULL;
}

static PyMethodDef LocalCheck_methods[] = {
    {"members_of", (PyCFunction)(void (*)(void))LocalCheck_members_of, METH_FASTCALL,
     "members_of(segments, valid) -> the members answering each (None: not from memory), "
     "or None when a segment is not a str in valid"},
    {NULL},
};

static PyTypeObject LocalCheckType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "sidecar.shm._native.LocalCheck",
    .tp_basicsize = sizeof(LocalCheck),
    .tp_dealloc = (destructor)LocalCheck_dealloc,
    .tp_traverse = (traverseproc)LocalCheck_traverse,
    .tp_clear = (inquiry)LocalCheck_clear,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "Replica.local's rule over many segments, in C.",
    .tp_methods = LocalCheck_methods,
    .tp_new = LocalCheck_new,
};

/* -- the socket server's check, answered in one C call ------------------------------------- */

/* FastCheck(valid_names, local, counts, key, max_frame, mask, layout): the Unix-socket
 * server's inline check (sidecar/server/uds.py) in C. `answer(data)` takes what one read
 * brought; when it is exactly one frame holding a check that the inline path would answer, it
 * answers it (the response frame's bytes, as protocol.encode_response writes them) and counts
 * it; otherwise it returns None and changes nothing, and Python handles the frame.
 * Nothing here is a rule of its own; what it reads, Python prepared:
 * - `valid_names`: the segment names the Python path already validated (SegmentNames);
 * - `local`: the replica's LocalCheck (`Replica.native_local`): what is answerable from
 *   memory is `answering` above, Replica.local's rule over the replica's own objects;
 * - `layout`: protocol.check_layout(): how a check request is framed around its ids, and the
 *   bytes of an answered one's status and result (status codes and encoding stay there);
 * - the frame limit and the latency sampler's mask; the sample counter (`untimed`) is shared
 *   with Python's path: the request the sampler picks for timing is left to it.
 * It never raises: on an error, Python's path meets the same error and answers it. */
#define LAYOUT_MAX 8
typedef struct {
    uint8_t b[LAYOUT_MAX];
    Py_ssize_t n;
} Piece;

typedef struct {
    PyObject_HEAD
    PyObject *valid, *local, *counts, *key;
    Py_ssize_t max_frame;
    unsigned long untimed, mask;
    /* the request's array header and op; the response's array header; its status and result
     * for False and for True */
    Piece req_head, op, resp_head, tail[2];
} FastCheck;

static void FastCheck_dealloc(FastCheck *f) {
    PyObject_GC_UnTrack(f);
    Py_CLEAR(f->valid);
    Py_CLEAR(f->local);
    Py_CLEAR(f->counts);
    Py_CLEAR(f->key);
    Py_TYPE(f)->tp_free((PyObject *)f);
}

static int FastCheck_traverse(FastCheck *f, visitproc visit, void *arg) {
    Py_VISIT(f->valid);
    Py_VISIT(f->local);
    Py_VISIT(f->counts);
    Py_VISIT(f->key);
    return 0;
}

static int piece_of(PyObject *v, Piece *out) {
    if (!PyBytes_Check(v) || PyBytes_GET_SIZE(v) < 1 || PyBytes_GET_SIZE(v) > LAYOUT_MAX) {
        PyErr_Format(PyExc_ValueError, "layout: bytes of 1 to %d bytes expected", LAYOUT_MAX);
        return -1;
    }
    out->n = PyBytes_GET_SIZE(v);
    memcpy(out->b, PyBytes_AS_STRING(v), (size_t)out->n);
    return 0;
}

static PyObject *FastCheck_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    static char *names[] = {"valid_names", "local", "counts", "key", "max_frame", "mask",
                            "layout", NULL};
    PyObject *valid, *local, *counts, *key, *layout;
    Py_ssize_t max_frame;
    unsigned long mask;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!O!O!OnkO!", names, &PySet_Type, &valid,
                                     &LocalCheckType, &local, &PyDict_Type, &counts, &key,
                                     &max_frame, &mask, &PyTuple_Type, &layout))
        return NULL;
    if (PyTuple_GET_SIZE(layout) != 5) {
        PyErr_SetString(PyExc_ValueError, "layout: protocol.check_layout()'s five pieces");
        return NULL;
    }
    FastCheck *f = (FastCheck *)type->tp_alloc(type, 0);
    if (f == NULL) return NULL;
    Piece *pieces[5] = {&f->req_head, &f->op, &f->resp_head, &f->tail[0], &f->tail[1]};
    for (int i = 0; i < 5; i++)
        if (piece_of(PyTuple_GET_ITEM(layout, i), pieces[i]) < 0) {
            Py_DECREF(f);
            return NULL;
        }
    Py_INCREF(valid);
    Py_INCREF(local);
    Py_INCREF(counts);
    Py_INCREF(key);
    f->valid = valid;
    f->local = local;
    f->counts = counts;
    f->key = key;
    f->max_frame = max_frame;
    f->mask = mask;
    return (PyObject *)f;
}

/* a msgpack non-negative integer at *p (fixint, uint 8/16/32/64): 0, or -1 (not one) */
static int mp_uint(const uint8_t **p, const uint8_t *end, uint64_t *out) {
    const uint8_t *q = *p;
    if (q >= end) return -1;
    uint8_t t = *q++;
    size_t n;
    if (t < 0x80) {
        *out = t;
        *p = q;
        return 0;
    }
    switch (t) {
    case 0xcc: n = 1; break;
    case 0xcd: n = 2; break;
    case 0xce: n = 4; break;
    case 0xcf: n = 8; break;
    default: return -1;
    }
    if ((size_t)(end - q) < n) return -1;
    uint64_t v = 0;
    for (size_t i = 0; i < n; i++) v = (v << 8) | q[i];
    *out = v;
    *p = q + n;
    return 0;
}

/* msgpack's shortest encoding of a non-negative integer (as msgpack-python packs it) */
static size_t mp_put_uint(uint8_t *p, uint64_t v) {
    size_t n;
    if (v < 0x80) {
        p[0] = (uint8_t)v;
        return 1;
    }
    if (v <= 0xff) { p[0] = 0xcc; n = 1; }
    else if (v <= 0xffff) { p[0] = 0xcd; n = 2; }
    else if (v <= 0xffffffffULL) { p[0] = 0xce; n = 4; }
    else { p[0] = 0xcf; n = 8; }
    for (size_t i = 0; i < n; i++) p[1 + i] = (uint8_t)(v >> (8 * (n - 1 - i)));
    return 1 + n;
}

/* 1 member, 0 not, -1 error (set). One check: a Segment is searched here; a BitMap64's own
 * `in` costs less than fetching its raw pointer. */
static int member_has(PyObject *members, uint64_t user) {
    if (Py_TYPE(members) == &SegmentType) return segment_has((const Segment *)members, user);
    PyObject *v = PyLong_FromUnsignedLongLong(user);
    if (v == NULL) return -1;
    int has = PySequence_Contains(members, v);
    Py_DECREF(v);
    return has;
}

static int piece_at(const uint8_t **p, const uint8_t *end, const Piece *piece) {
    if (end - *p < piece->n || memcmp(*p, piece->b, (size_t)piece->n) != 0) return -1;
    *p += piece->n;
    return 0;
}

static PyObject *FastCheck_answer(FastCheck *f, PyObject *data) {
    if (!PyBytes_CheckExact(data)) Py_RETURN_NONE;
    const uint8_t *b = (const uint8_t *)PyBytes_AS_STRING(data);
    Py_ssize_t len = PyBytes_GET_SIZE(data);
    if (len < 4) Py_RETURN_NONE;
    uint64_t length = ((uint64_t)b[0] << 24) | ((uint64_t)b[1] << 16) | ((uint64_t)b[2] << 8) | b[3];
    if (length + 4 != (uint64_t)len || (Py_ssize_t)length > f->max_frame) Py_RETURN_NONE;
    unsigned long next = (f->untimed + 1) & f->mask;
    if (next == 0) Py_RETURN_NONE; /* the sampled request: Python times it */
    /* [rid, "check", user, segment], framed as protocol.check_layout() says */
    const uint8_t *p = b + 4, *end = b + len;
    uint64_t rid, user;
    if (piece_at(&p, end, &f->req_head) < 0 || mp_uint(&p, end, &rid) < 0) Py_RETURN_NONE;
    if (piece_at(&p, end, &f->op) < 0) Py_RETURN_NONE;
    if (mp_uint(&p, end, &user) < 0 || p >= end) Py_RETURN_NONE;
    size_t n;
    uint8_t t = *p++;
    if ((t & 0xe0) == 0xa0) {
        n = t & 0x1f;
    } else if (t == 0xd9 && p < end) {
        n = *p++;
    } else {
        Py_RETURN_NONE;
    }
    if ((size_t)(end - p) != n) Py_RETURN_NONE; /* short, or bytes after the request */
    PyObject *seg = PyUnicode_DecodeUTF8((const char *)p, (Py_ssize_t)n, "strict");
    if (seg == NULL) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    PyObject *out = NULL;
    int valid = PySet_Contains(f->valid, seg);
    if (valid < 0) goto error;
    if (valid == 0) goto none;
    PyObject *st = answering((LocalCheck *)f->local, seg); /* Replica.local's rule */
    if (st == NULL) goto none_or_error;
    PyObject *members = PyObject_GetAttr(st, str_bitmap);
    Py_DECREF(st);
    if (members == NULL) goto error;
    int has = member_has(members, user);
    Py_DECREF(members);
    if (has < 0) goto error;
    /* counted as the inline path counts it: counts[key] += 1 */
    PyObject *count = PyDict_GetItemWithError(f->counts, f->key);
    if (count == NULL && PyErr_Occurred()) goto error;
    PyObject *more = count != NULL ? PyNumber_Add(count, one) : PyLong_FromLong(1);
    if (more == NULL) goto error;
    int stored = PyDict_SetItem(f->counts, f->key, more);
    Py_DECREF(more);
    if (stored < 0) goto error;
    f->untimed = next;
    uint8_t resp[4 + LAYOUT_MAX + 9 + LAYOUT_MAX];
    size_t k = 4;
    memcpy(resp + k, f->resp_head.b, (size_t)f->resp_head.n);
    k += (size_t)f->resp_head.n;
    k += mp_put_uint(resp + k, rid);
    const Piece *tail = &f->tail[has ? 1 : 0];
    memcpy(resp + k, tail->b, (size_t)tail->n);
    k += (size_t)tail->n;
    uint32_t body = (uint32_t)(k - 4);
    resp[0] = (uint8_t)(body >> 24);
    resp[1] = (uint8_t)(body >> 16);
    resp[2] = (uint8_t)(body >> 8);
    resp[3] = (uint8_t)body;
    out = PyBytes_FromStringAndSize((const char *)resp, (Py_ssize_t)k);
    Py_DECREF(seg);
    return out;
none_or_error:
    if (PyErr_Occurred()) goto error;
none:
    Py_DECREF(seg);
    Py_RETURN_NONE;
error: /* Python's path meets the same error and answers it as the protocol says */
    PyErr_Clear();
    Py_DECREF(seg);
    Py_RETURN_NONE;
}

static PyObject *FastCheck_get_untimed(FastCheck *f, void *c) {
    return PyLong_FromUnsignedLong(f->untimed);
}

static int FastCheck_set_untimed(FastCheck *f, PyObject *v, void *c) {
    unsigned long x = v != NULL ? PyLong_AsUnsignedLong(v) : (unsigned long)-1;
    if (x == (unsigned long)-1 && (v == NULL || PyErr_Occurred())) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_TypeError, "untimed cannot be deleted");
        return -1;
    }
    f->untimed = x & f->mask;
    return 0;
}

static PyMethodDef FastCheck_methods[] = {
    {"answer", (PyCFunction)FastCheck_answer, METH_O,
     "answer(data) -> the response frame of a check answered here, or None"},
    {NULL},
};

static PyGetSetDef FastCheck_getset[] = {
    {"untimed", (getter)FastCheck_get_untimed, (setter)FastCheck_set_untimed,
     "the latency sampler's counter: a request is timed when it wraps to 0", NULL},
    {NULL},
};

static PyTypeObject FastCheckType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "sidecar.shm._native.FastCheck",
    .tp_basicsize = sizeof(FastCheck),
    .tp_dealloc = (destructor)FastCheck_dealloc,
    .tp_traverse = (traverseproc)FastCheck_traverse,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The Unix-socket server's inline check, in C.",
    .tp_methods = FastCheck_methods,
    .tp_getset = FastCheck_getset,
    .tp_new = FastCheck_new,
};

/* -- the socket server's batch_packed, answered in one C call ------------------------------ */

/* FastBatch(valid_names, local, record, key, max_frame, max_segments, layout): the Unix-socket
 * server's `batch_packed` (sidecar/packed.py, sidecar/server/queries.py) in C, as FastCheck
 * answers a check. `answer(data)` takes what one read brought; when it is exactly one frame
 * holding `[id, "batch_packed", segments, users, index]` in msgpack's shortest encodings
 * (str, bin, arrays of any width), of at least one user, whose every segment is a name the
 * Python path already validated and answered from memory (`answering`: Replica.local's rule
 * over the replica's own objects), and whose index (if any) refers to those segments only, it
 * answers it: the response frame's bytes as protocol.encode_response writes them, the answers
 * written straight into it by `lookup_into`, and the request recorded with `record(key,
 * seconds)` (OpStats.record, as Python records it). Anything else (a segment unknown or not
 * answered locally, a replica not ready, an empty batch, a malformed or oversize frame, more
 * than max_segments segments, an error) returns None and changes nothing: Python handles the
 * frame, and is the one owner of every error message and of the fallback.
 * `layout`: protocol.batch_packed_layout(): the request's array header and op, the response's
 * array header and its OK status (the bytes stay protocol's). It never raises. */
#define OP_MAX 32
typedef struct {
    PyObject_HEAD
    PyObject *valid, *local, *record, *key;
    Py_ssize_t max_frame, max_segments, op_n;
    Piece req_head, resp_head, ok;
    uint8_t op[OP_MAX];
} FastBatch;

static void FastBatch_dealloc(FastBatch *f) {
    PyObject_GC_UnTrack(f);
    Py_CLEAR(f->valid);
    Py_CLEAR(f->local);
    Py_CLEAR(f->record);
    Py_CLEAR(f->key);
    Py_TYPE(f)->tp_free((PyObject *)f);
}

static int FastBatch_traverse(FastBatch *f, visitproc visit, void *arg) {
    Py_VISIT(f->valid);
    Py_VISIT(f->local);
    Py_VISIT(f->record);
    Py_VISIT(f->key);
    return 0;
}

static PyObject *FastBatch_new(PyTypeObject *type, PyObject *args, PyObject *kw) {
    static char *names[] = {"valid_names", "local", "record", "key", "max_frame",
                            "max_segments", "layout", NULL};
    PyObject *valid, *local, *record, *key, *layout;
    Py_ssize_t max_frame, max_segments;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "O!O!OOnnO!", names, &PySet_Type, &valid,
                                     &LocalCheckType, &local, &record, &key, &max_frame,
                                     &max_segments, &PyTuple_Type, &layout))
        return NULL;
    if (!PyCallable_Check(record)) {
        PyErr_SetString(PyExc_TypeError, "record must be callable (OpStats.record)");
        return NULL;
    }
    if (PyTuple_GET_SIZE(layout) != 4) {
        PyErr_SetString(PyExc_ValueError, "layout: protocol.batch_packed_layout()'s four pieces");
        return NULL;
    }
    FastBatch *f = (FastBatch *)type->tp_alloc(type, 0);
    if (f == NULL) return NULL;
    Piece *pieces[3] = {&f->req_head, &f->resp_head, &f->ok};
    for (int i = 0; i < 3; i++)
        if (piece_of(PyTuple_GET_ITEM(layout, i == 0 ? 0 : i + 1), pieces[i]) < 0) {
            Py_DECREF(f);
            return NULL;
        }
    PyObject *op = PyTuple_GET_ITEM(layout, 1); /* longer than a check's pieces */
    if (!PyBytes_Check(op) || PyBytes_GET_SIZE(op) < 1 || PyBytes_GET_SIZE(op) > OP_MAX) {
        PyErr_Format(PyExc_ValueError, "layout: an op of 1 to %d bytes expected", OP_MAX);
        Py_DECREF(f);
        return NULL;
    }
    f->op_n = PyBytes_GET_SIZE(op);
    memcpy(f->op, PyBytes_AS_STRING(op), (size_t)f->op_n);
    Py_INCREF(valid);
    Py_INCREF(local);
    Py_INCREF(record);
    Py_INCREF(key);
    f->valid = valid;
    f->local = local;
    f->record = record;
    f->key = key;
    f->max_frame = max_frame;
    f->max_segments = max_segments;
    return (PyObject *)f;
}

/* a big-endian unsigned integer of n bytes at p */
static inline uint64_t rd_be(const uint8_t *p, size_t n) {
    uint64_t v = 0;
    for (size_t i = 0; i < n; i++) v = (v << 8) | p[i];
    return v;
}

/* a msgpack header of the kind `kind` at *p: its length (items, or bytes) into *n and *p past
 * it; -1 when it is not one. 's' str, 'b' bin, 'a' array, in any of their widths. The bytes a
 * str or bin holds are checked to be there. */
static int mp_head(const uint8_t **p, const uint8_t *end, int kind, uint64_t *n) {
    const uint8_t *q = *p;
    if (q >= end) return -1;
    uint8_t t = *q++;
    size_t w; /* the length's bytes after the type byte */
    if (kind == 's' && (t & 0xe0) == 0xa0) {
        *n = t & 0x1f;
        w = 0;
    } else if (kind == 'a' && (t & 0xf0) == 0x90) {
        *n = t & 0x0f;
        w = 0;
    } else {
        if (kind == 's' && t >= 0xd9 && t <= 0xdb) w = (size_t)1 << (t - 0xd9); /* str 8/16/32 */
        else if (kind == 'b' && t >= 0xc4 && t <= 0xc6) w = (size_t)1 << (t - 0xc4); /* bin */
        else if (kind == 'a' && (t == 0xdc || t == 0xdd)) w = t == 0xdc ? 2 : 4; /* array */
        else return -1;
        if ((size_t)(end - q) < w) return -1;
        *n = rd_be(q, w);
        q += w;
    }
    if (kind != 'a' && (uint64_t)(end - q) < *n) return -1;
    *p = q;
    return 0;
}

static inline double mono_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
}

static PyObject *FastBatch_answer(FastBatch *f, PyObject *data) {
    if (!PyBytes_CheckExact(data)) Py_RETURN_NONE;
    double started = mono_s();
    const uint8_t *b = (const uint8_t *)PyBytes_AS_STRING(data);
    Py_ssize_t len = PyBytes_GET_SIZE(data);
    if (len < 4) Py_RETURN_NONE;
    uint64_t length = rd_be(b, 4);
    if (length + 4 != (uint64_t)len || (Py_ssize_t)length > f->max_frame) Py_RETURN_NONE;
    const uint8_t *p = b + 4, *end = b + len;
    uint64_t rid, ns, nu, nx;
    if (piece_at(&p, end, &f->req_head) < 0 || mp_uint(&p, end, &rid) < 0) Py_RETURN_NONE;
    if (end - p < f->op_n || memcmp(p, f->op, (size_t)f->op_n) != 0) Py_RETURN_NONE;
    p += f->op_n;
    if (mp_head(&p, end, 'a', &ns) < 0 || ns == 0 || ns > (uint64_t)f->max_segments)
        Py_RETURN_NONE;
    if ((uint64_t)(end - p) < ns) Py_RETURN_NONE; /* at least a byte a segment id */
    /* the segments' ids are read twice: first where they are and that the users and the index
     * fit them, then their members (nothing allocated for a frame left to Python) */
    const uint8_t *segs = p;
    for (uint64_t j = 0; j < ns; j++) {
        uint64_t n;
        if (mp_head(&p, end, 's', &n) < 0) Py_RETURN_NONE;
        p += n;
    }
    if (mp_head(&p, end, 'b', &nu) < 0) Py_RETURN_NONE;
    const uint8_t *users = p;
    p += nu;
    if (mp_head(&p, end, 'b', &nx) < 0) Py_RETURN_NONE;
    const uint8_t *ix = p;
    p += nx;
    if (p != end || nu == 0 || nu % 8) Py_RETURN_NONE;
    Py_ssize_t n = (Py_ssize_t)(nu / 8);
    if (nx == 0 ? ns != 1 : nx != 2 * (uint64_t)n) Py_RETURN_NONE;
    if (nx) /* an index past the segments: Python's message */
        for (Py_ssize_t i = 0; i < n; i++)
            if (rd_le16(ix + 2 * i) >= ns) Py_RETURN_NONE;
    if (!roaring_looked_up) find_roaring();
    PyObject *out = NULL, *seg = NULL;
    Py_ssize_t held = 0;
    Member *m = PyMem_Malloc(sizeof(Member) * (size_t)ns);
    if (m == NULL) goto error;
    p = segs;
    for (; held < (Py_ssize_t)ns; held++) {
        uint64_t k;
        mp_head(&p, end, 's', &k); /* read above */
        seg = PyUnicode_DecodeUTF8((const char *)p, (Py_ssize_t)k, "strict");
        p += k;
        if (seg == NULL) goto error;
        int valid = PySet_Contains(f->valid, seg);
        if (valid <= 0) goto error; /* not validated yet, or not a name: Python says */
        PyObject *st = answering((LocalCheck *)f->local, seg); /* Replica.local's rule */
        Py_CLEAR(seg);
        if (st == NULL) goto error; /* not answered from memory (or an error): Python's */
        PyObject *members = PyObject_GetAttr(st, str_bitmap);
        Py_DECREF(st);
        if (members == NULL) goto error;
        if (member_of(members, &m[held]) < 0 || m[held].how == M_UNKNOWN) {
            Py_DECREF(members);
            goto error;
        }
        /* m[held].obj owns `members` until the end */
    }
    /* [rid, OK, bin of n answers] */
    uint8_t rid_buf[9];
    size_t rid_n = mp_put_uint(rid_buf, rid);
    size_t bin_n = n <= 0xff ? 2 : n <= 0xffff ? 3 : 5;
    size_t head = 4 + (size_t)f->resp_head.n + rid_n + (size_t)f->ok.n + bin_n;
    out = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)(head + (size_t)n));
    if (out == NULL) goto error;
    uint8_t *r = (uint8_t *)PyBytes_AS_STRING(out), *q = r + 4;
    memcpy(q, f->resp_head.b, (size_t)f->resp_head.n);
    q += f->resp_head.n;
    memcpy(q, rid_buf, rid_n);
    q += rid_n;
    memcpy(q, f->ok.b, (size_t)f->ok.n);
    q += f->ok.n;
    if (bin_n == 2) {
        *q++ = 0xc4;
        *q++ = (uint8_t)n;
    } else if (bin_n == 3) {
        *q++ = 0xc5;
        *q++ = (uint8_t)(n >> 8);
        *q++ = (uint8_t)n;
    } else {
        *q++ = 0xc6;
        for (int s = 24; s >= 0; s -= 8) *q++ = (uint8_t)((uint64_t)n >> s);
    }
    uint64_t body = head + (uint64_t)n - 4;
    for (int s = 0; s < 4; s++) r[s] = (uint8_t)(body >> (24 - 8 * s));
    if (lookup_into(m, (Py_ssize_t)ns, users, nx ? ix : NULL, n, q, 0) < 0) goto error;
    PyObject *secs = PyFloat_FromDouble(mono_s() - started);
    if (secs == NULL) goto error;
    PyObject *res = PyObject_CallFunctionObjArgs(f->record, f->key, secs, NULL);
    Py_DECREF(secs);
    if (res == NULL) goto error;
    Py_DECREF(res);
    for (Py_ssize_t j = 0; j < held; j++) Py_DECREF(m[j].obj);
    PyMem_Free(m);
    return out;
error: /* Python's path meets the same case (or error) and answers it as the protocol says */
    PyErr_Clear();
    Py_XDECREF(seg);
    Py_XDECREF(out);
    if (m != NULL)
        for (Py_ssize_t j = 0; j < held; j++) Py_DECREF(m[j].obj);
    PyMem_Free(m);
    Py_RETURN_NONE;
}

static PyMethodDef FastBatch_methods[] = {
    {"answer", (PyCFunction)FastBatch_answer, METH_O,
     "answer(data) -> the response frame of a batch_packed answered here, or None"},
    {NULL},
};

static PyTypeObject FastBatchType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "sidecar.shm._native.FastBatch",
    .tp_basicsize = sizeof(FastBatch),
    .tp_dealloc = (destructor)FastBatch_dealloc,
    .tp_traverse = (traverseproc)FastBatch_traverse,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The Unix-socket server's batch_packed, in C.",
    .tp_methods = FastBatch_methods,
    .tp_new = FastBatch_new,
};

static PyObject *coarse_now_ms(PyObject *self, PyObject *unused) {
    return PyLong_FromLongLong(coarse_ms());
}

static PyMethodDef module_methods[] = {
    {"encode", encode, METH_VARARGS, "encode(ids: array('Q') ascending, version) -> bytes"},
    {"shape", shape, METH_O, "shape(ids) -> (containers, roaring bytes, segment bytes)"},
    {"ef_size", ef_size, METH_VARARGS, "ef_size(n, min, max) -> bytes of the Elias-Fano kind"},
    {"merge", merge, METH_VARARGS, "merge(ids, add, remove) -> array('Q') of (ids | add) - remove"},
    {"write_locked", write_locked, METH_VARARGS,
     "write_locked(buffer, seq_offset, data, position) -> the new (even) sequence number"},
    {"store", store, METH_VARARGS, "store(buffer, offset, value): atomic uint64 store"},
    {"lookup", lookup, METH_VARARGS,
     "lookup(members, users: bin uint64, index: bin uint16, unknown) -> bytes, one per user"},
    {"pack_u64", pack_u64, METH_O,
     "pack_u64(users: list | tuple) -> bytes of little-endian uint64, or None (not all ints in range)"},
    {"pack_index", pack_index, METH_VARARGS,
     "pack_index(segments: list | tuple, limit) -> (distinct ids, index: bin uint16), or None"},
    {"answers", answers, METH_O, "answers(data) -> [False / True / None per byte 0 / 1 / 2]"},
    {"roaring_native", roaring_native, METH_NOARGS,
     "whether lookup searches BitMap64s itself (else through `in`)"},
    {"coarse_ms", coarse_now_ms, METH_NOARGS, "CLOCK_MONOTONIC_COARSE in ms, as readers see it"},
    {NULL},
};

/* This source's hash (sidecar/shm/build.py `source_hash`, passed by setup.py): the loader
   refuses a build whose hash is not its source's. */
#ifndef NATIVE_SOURCE_HASH
#define NATIVE_SOURCE_HASH "unknown"
#endif

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "sidecar.shm._native", "The shared replica's native part.", -1,
    module_methods,
};

PyMODINIT_FUNC PyInit__native(void) {
    if (PyType_Ready(&SegmentType) < 0 || PyType_Ready(&ReaderType) < 0 ||
        PyType_Ready(&FastCheckType) < 0 || PyType_Ready(&LocalCheckType) < 0 ||
        PyType_Ready(&FastBatchType) < 0)
        return NULL;
    str_raw_pointer = PyUnicode_InternFromString("raw_pointer");
    str_ready = PyUnicode_InternFromString("ready");
    str_health = PyUnicode_InternFromString("health");
    str_bitmap = PyUnicode_InternFromString("bitmap");
    one = PyLong_FromLong(1);
    if (str_raw_pointer == NULL || str_ready == NULL || str_health == NULL || str_bitmap == NULL || one == NULL) return NULL;
    PyObject *array_mod = PyImport_ImportModule("array");
    if (array_mod == NULL) return NULL;
    array_type = PyObject_GetAttrString(array_mod, "array");
    Py_DECREF(array_mod);
    if (array_type == NULL) return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL) return NULL;
    Py_INCREF(&SegmentType);
    Py_INCREF(&ReaderType);
    Py_INCREF(&FastCheckType);
    Py_INCREF(&LocalCheckType);
    Py_INCREF(&FastBatchType);
    if (PyModule_AddObject(m, "Segment", (PyObject *)&SegmentType) < 0 ||
        PyModule_AddObject(m, "FastCheck", (PyObject *)&FastCheckType) < 0 ||
        PyModule_AddObject(m, "LocalCheck", (PyObject *)&LocalCheckType) < 0 ||
        PyModule_AddObject(m, "FastBatch", (PyObject *)&FastBatchType) < 0 ||
        PyModule_AddObject(m, "Reader", (PyObject *)&ReaderType) < 0 ||
        PyModule_AddIntConstant(m, "SEGMENT_HEADER", SEG_HEADER) < 0 ||
        PyModule_AddIntConstant(m, "KIND_SORTED", KIND_SORTED) < 0 ||
        PyModule_AddIntConstant(m, "KIND_CONTAINERS", KIND_CONTAINERS) < 0 ||
        PyModule_AddIntConstant(m, "KIND_ELIAS_FANO", KIND_ELIAS_FANO) < 0 ||
        PyModule_AddIntConstant(m, "EF_SAMPLE", EF_SAMPLE) < 0 ||
        PyModule_AddIntConstant(m, "ARRAY_MAX", ARRAY_MAX) < 0 ||
        PyModule_AddStringConstant(m, "SEGMENT_MAGIC", SEG_MAGIC) < 0 ||
        PyModule_AddStringConstant(m, "SOURCE_HASH", NATIVE_SOURCE_HASH) < 0)
        return NULL;
    return m;
}
