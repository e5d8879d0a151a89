/* embtab's CPU kernels: fused index transforms and a fused pooled forward.
 *
 * Compiled on first use by embedding_tables/cpu_kernels.py with the system C compiler and
 * loaded with ctypes. The torch code in embedding_tables/hashing.py and transforms.py is the
 * specification; every function here gives the same bits (rows) as that code.
 *
 * hash64(id, key) = mix(id + key), mix = splitmix64's finaliser (logical shifts, mod 2**64);
 * bucket = (hash64 & (2**63 - 1)) mod m. Divisions by a per-call constant d use a multiply by
 * m = ceil(2**(63 + l) / d), l = ceil(log2 d): floor(x / d) = floor(m * x / 2**(63 + l)) for
 * every 0 <= x < 2**63 (Granlund & Montgomery 1994, theorem 4.2), and m < 2**64.
 *
 * Pooling rounds as fbgemm's TBE does (one fused multiply-add of weight and row per id), and a
 * qr mult term as the torch reference does (the product, times the weight, then the sum); the
 * compiler contracts nothing else (-std=c11), so results do not depend on alignment or batch.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LOW63 0x7FFFFFFFFFFFFFFFULL
#define MAX_PARTS 8
#define NO_MEMORY (-2)
#define BAD_LENGTHS (-3)
#define BLOCK 2048 /* ids whose rows are computed before their rows are read */

#define PREFETCH 32 /* how many ids ahead a row is prefetched */
#define PREFETCH_LOCALITY 1 /* into L2: prefetching into L1 (3) measured slower, not faster */
#define SPAN (BLOCK + PREFETCH) /* rows computed per block: its own and those it prefetches */
#define SMALL ((int64_t)1 << 52) /* below it, integers are exact doubles */
#define MAX_LANES 8 /* dims up to 128, in multiples of 16 */

enum { KIND_HASH = 0, KIND_ARITH = 1 };
enum { OUT_OF_RANGE_ERROR = 0, OUT_OF_RANGE_HASH = 1 };

typedef struct {
    uint64_t divisor;
    uint64_t magic;
    unsigned shift; /* l - 1: the product's high 64 bits are shifted by the rest of 63 + l */
} FastDiv;

static FastDiv fastdiv_make(uint64_t d) {
    FastDiv f;
    unsigned l = 0;
    while (l < 63 && ((uint64_t)1 << l) < d) l++;
    f.divisor = d;
    f.shift = l > 0 ? l - 1 : 0;
    __uint128_t top = (__uint128_t)1 << (63 + l);
    f.magic = (uint64_t)((top + d - 1) / d);
    return f;
}

/* floor(x / d): for d > 1, l >= 1 and the shift by 63 + l >= 64 takes the high word. */
static inline uint64_t fastdiv_quotient(uint64_t x, const FastDiv *f) {
    if (f->divisor == 1) return x;
    return (uint64_t)(((__uint128_t)f->magic * x) >> 64) >> f->shift;
}

static inline uint64_t fastdiv_remainder(uint64_t x, const FastDiv *f) {
    return x - fastdiv_quotient(x, f) * f->divisor;
}

static inline uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

static inline int64_t bucket_row(int64_t id, int64_t key, const FastDiv *rows) {
    uint64_t h = mix64((uint64_t)id + (uint64_t)key) & LOW63;
    return (int64_t)fastdiv_remainder(h, rows);
}

/* rows[i] = bucket(ids[i]) with seed key `key` in a table of `num_rows` rows. */
void embtab_bucket(const int64_t *ids, int64_t n, int64_t key, int64_t num_rows, int64_t *rows) {
    FastDiv f = fastdiv_make((uint64_t)num_rows);
    for (int64_t i = 0; i < n; i++) rows[i] = bucket_row(ids[i], key, &f);
}

/* One lookup's index transform, as the whole-batch formulas of transforms.py take it:
 * hash: bucket(id, key, moduli[0]); arith: id range-checked against `limit` (error, or hashed
 * in with `range_key`), then partition j's row (id // divisors[j]) % moduli[j]. */
typedef struct {
    int64_t kind;
    int64_t key;
    int64_t limit;
    int64_t out_of_range;
    int64_t range_key;
    int64_t parts;
    int64_t divisors[MAX_PARTS];
    int64_t moduli[MAX_PARTS];
} Transform;

typedef struct {
    int64_t kind;
    int64_t key;
    int64_t limit;
    int64_t out_of_range;
    int64_t range_key;
    int64_t parts;
    FastDiv limit_div;
    FastDiv divisors[MAX_PARTS];
    FastDiv moduli[MAX_PARTS];
    int small; /* ids, divisors and moduli below SMALL: the digits in doubles (div_small) */
    double inverse_divisors[MAX_PARTS];
    double inverse_moduli[MAX_PARTS];
} Prepared;

static Prepared prepare(const Transform *t) {
    Prepared p;
    p.kind = t->kind;
    p.key = t->key;
    p.limit = t->limit;
    p.out_of_range = t->out_of_range;
    p.range_key = t->range_key;
    p.parts = t->parts;
    p.limit_div = fastdiv_make((uint64_t)(t->limit > 0 ? t->limit : 1));
    p.small = t->limit <= SMALL;
    for (int64_t j = 0; j < t->parts; j++) {
        p.divisors[j] = fastdiv_make((uint64_t)t->divisors[j]);
        p.moduli[j] = fastdiv_make((uint64_t)t->moduli[j]);
        p.inverse_divisors[j] = 1.0 / (double)t->divisors[j];
        p.inverse_moduli[j] = 1.0 / (double)t->moduli[j];
        p.small = p.small && t->divisors[j] <= SMALL && t->moduli[j] <= SMALL;
    }
    return p;
}

/* floor(x / d) for 0 <= x, d <= SMALL = 2**52, inverse = 1 / d rounded: x and d are exact
 * doubles, x * inverse is within (x / d) * 2**-52 (1 + 2**-52) < 1 of x / d for d >= 2 (and
 * exact for d = 1), so its truncation is floor(x / d) or one off, which the remainder's sign
 * and size correct. Plain integer and double arithmetic: the compiler vectorises it. */
static inline int64_t div_small(int64_t x, int64_t d, double inverse) {
    int64_t q = (int64_t)((double)x * inverse);
    const int64_t r = x - q * d;
    q += (r >= d) - (r < 0);
    return q;
}

/* One pooled term of a plan: bags of ids through a transform, each id's partition rows
 * multiplied (one partition: the row itself), times the id's weight, summed per bag into
 * `dim` columns of one of the call's outputs (written, not added to). */
typedef struct {
    Transform transform;
    int64_t feature; /* its bags are the call's bags [feature * batch, (feature + 1) * batch) */
    int64_t dim;
    const float *tables[MAX_PARTS];
    int64_t table_strides[MAX_PARTS];
    int64_t output; /* which output of the call, */
    int64_t column; /* and the first of its columns there */
} PooledTerm;

/* What changes from call to call: the KJT's ids, bags and weights, and the outputs. */
typedef struct {
    const int64_t *ids;
    int64_t id_count;
    const int64_t *lengths; /* features * batch bag lengths, feature by feature */
    int64_t features;
    const float *weights; /* per id, or NULL */
    int64_t batch;
    float *const *outputs;
    const int64_t *output_strides;
} PooledBatch;

/* One term in one call: where its bags, tables and output rows are. */
typedef struct {
    const int64_t *ids;
    const int64_t *offsets; /* batch + 1 */
    const float *weights;
    int64_t batch;
    int64_t dim;
    const float *tables[MAX_PARTS];
    int64_t table_strides[MAX_PARTS];
    float *out;
    int64_t out_stride;
} TermRun;

/* Rows of ids [start, end) (at most SPAN) into rows[j * SPAN + (i - start)] (partition j);
 * -1, or the position of the first id out of range when that is an error. */
static int64_t block_rows(const Prepared *p, const int64_t *ids, int64_t start, int64_t end,
                          int64_t *rows) {
    if (p->kind == KIND_HASH) { /* the mix in a loop of its own, which is vectorised */
        const int64_t count = end - start;
        const uint64_t key = (uint64_t)p->key;
        uint64_t *hashes = (uint64_t *)rows;
        for (int64_t i = 0; i < count; i++)
            hashes[i] = mix64((uint64_t)ids[start + i] + key) & LOW63;
        const FastDiv f = p->moduli[0];
        for (int64_t i = 0; i < count; i++) rows[i] = (int64_t)fastdiv_remainder(hashes[i], &f);
        return -1;
    }
    /* arith: the ids range-checked (hashed in, or an error) into the last partition's rows,
     * then partition by partition the digits, each a loop of its own with one divisor */
    const int64_t count = end - start;
    int64_t *in_range = rows + (p->parts - 1) * SPAN;
    const uint64_t limit = (uint64_t)p->limit; /* negative ids are >= it as unsigned */
    uint64_t outside = 0;
    for (int64_t i = 0; i < count; i++) {
        const uint64_t id = (uint64_t)ids[start + i];
        outside |= id >= limit;
        in_range[i] = (int64_t)id;
    }
    if (outside)
        for (int64_t i = 0; i < count; i++) {
            if ((uint64_t)in_range[i] < limit) continue;
            if (p->out_of_range == OUT_OF_RANGE_ERROR) return start + i;
            in_range[i] = bucket_row(in_range[i], p->range_key, &p->limit_div);
        }
    for (int64_t j = 0; j < p->parts; j++) {
        int64_t *digits = rows + j * SPAN;
        if (p->small) {
            const int64_t d = (int64_t)p->divisors[j].divisor, m = (int64_t)p->moduli[j].divisor;
            const double inverse_d = p->inverse_divisors[j], inverse_m = p->inverse_moduli[j];
            for (int64_t i = 0; i < count; i++) {
                const int64_t rest = div_small(in_range[i], d, inverse_d);
                digits[i] = rest - div_small(rest, m, inverse_m) * m;
            }
            continue;
        }
        const FastDiv divisor = p->divisors[j], modulus = p->moduli[j];
        for (int64_t i = 0; i < count; i++)
            digits[i] = (int64_t)fastdiv_remainder(
                fastdiv_quotient((uint64_t)in_range[i], &divisor), &modulus);
    }
    return -1;
}

/* rows[j * n + i] = partition j's row of ids[i], block by block. Returns -1; the position of
 * the first id out of range when that is an error (rows are then partly written); or
 * NO_MEMORY. */
int64_t embtab_transform(const Transform *t, const int64_t *ids, int64_t n, int64_t *rows) {
    Prepared p = prepare(t);
    int64_t *block = malloc(sizeof(int64_t) * SPAN * (size_t)p.parts);
    if (block == NULL) return NO_MEMORY;
    int64_t result = -1;
    for (int64_t start = 0; start < n && result < 0; start += SPAN) {
        const int64_t end = n - start < SPAN ? n : start + SPAN;
        result = block_rows(&p, ids, start, end, block);
        if (result < 0)
            for (int64_t j = 0; j < p.parts; j++)
                memcpy(rows + j * n + start, block + j * SPAN, sizeof(int64_t) * (end - start));
    }
    free(block);
    return result;
}

/* 16 floats: the accumulators of a row kept in registers (GCC's vector extension). */
typedef float lane16 __attribute__((vector_size(64)));

static inline lane16 load16(const float *from) {
    lane16 v;
    memcpy(&v, from, sizeof v);
    return v;
}

/* The pooled forward for dim = 16 * lanes, with `parts` partitions and weights or none (each a
 * compile-time constant where it is inlined with one; parts 0: p->parts, read at run time).
 * Ids run in blocks: first the rows of the block and of the PREFETCH ids after it (index
 * arithmetic only), then a tight loop of gathers over the block's part of each bag, each
 * prefetching the rows PREFETCH ids ahead. */
static inline __attribute__((always_inline)) int64_t pooled(const TermRun *t,
                                                             const Prepared *p, int64_t *rows,
                                                             const int64_t lanes,
                                                             const int64_t fixed_parts,
                                                             const int weighted) {
    const int64_t parts = fixed_parts ? fixed_parts : p->parts;
    const int64_t *offsets = t->offsets;
    const int64_t n = offsets[t->batch];
    const float *weights = t->weights;
    const float *tables[MAX_PARTS];
    int64_t strides[MAX_PARTS];
    for (int64_t j = 0; j < parts; j++) {
        tables[j] = t->tables[j];
        strides[j] = t->table_strides[j];
    }
    /* rows of ids [start, known) are in `rows`, partition j's at rows[j * SPAN + i - start];
     * the gathers of ids up to `end` prefetch from them */
    int64_t start = offsets[0], end = start, known = start;
    const int64_t *at = rows;
    for (int64_t b = 0; b < t->batch; b++) {
        lane16 acc[MAX_LANES];
        for (int64_t c = 0; c < lanes; c++) acc[c] = (lane16){0};
        const int64_t bag_end = offsets[b + 1];
        for (int64_t i = offsets[b]; i < bag_end;) {
            if (i == end) {
                start = i;
                end = n - i < BLOCK ? n : i + BLOCK;
                known = n - i < SPAN ? n : i + SPAN;
                const int64_t bad = block_rows(p, t->ids, start, known, rows);
                if (bad >= 0) return bad;
                at = rows - start;
            }
            const int64_t stop = bag_end < end ? bag_end : end;
            const int64_t ahead_stop = known - PREFETCH; /* ids whose row PREFETCH ahead is known */
            for (; i < stop; i++) {
                if (i < ahead_stop)
                    for (int64_t j = 0; j < parts; j++) {
                        const float *ahead = tables[j] + at[j * SPAN + i + PREFETCH] * strides[j];
                        for (int64_t c = 0; c < lanes; c++)
                            __builtin_prefetch(ahead + 16 * c, 0, PREFETCH_LOCALITY);
                    }
                const float *first = tables[0] + at[i] * strides[0];
                if (parts == 1 && !weighted) {
                    for (int64_t c = 0; c < lanes; c++) acc[c] += load16(first + 16 * c);
                    continue;
                }
                const float w = weighted ? weights[i] : 1.0f;
                if (parts == 1) {
                    for (int64_t c = 0; c < lanes; c++) {
                        float *lane = (float *)&acc[c];
                        for (int l = 0; l < 16; l++)
                            lane[l] = __builtin_fmaf(first[16 * c + l], w, lane[l]);
                    }
                    continue;
                }
                for (int64_t c = 0; c < lanes; c++) {
                    lane16 product = load16(first + 16 * c);
                    for (int64_t j = 1; j < parts; j++)
                        product *= load16(tables[j] + at[j * SPAN + i] * strides[j] + 16 * c);
                    acc[c] += weighted ? product * w : product;
                }
            }
        }
        float *out = t->out + b * t->out_stride;
        for (int64_t c = 0; c < lanes; c++) memcpy(out + 16 * c, &acc[c], sizeof acc[c]);
    }
    return -1;
}

/* pooled() for `lanes`, with the weights and partitions the common cases take as constants. */
static inline __attribute__((always_inline)) int64_t pooled_lanes(const TermRun *t,
                                                                   const Prepared *p,
                                                                   int64_t *rows,
                                                                   const int64_t lanes) {
    const int weighted = t->weights != NULL;
    if (p->parts == 1)
        return weighted ? pooled(t, p, rows, lanes, 1, 1) : pooled(t, p, rows, lanes, 1, 0);
    if (p->parts == 2)
        return weighted ? pooled(t, p, rows, lanes, 2, 1) : pooled(t, p, rows, lanes, 2, 0);
    return pooled(t, p, rows, lanes, 0, weighted);
}

/* The same for any dim, accumulating in the output rows. */
static int64_t pooled_any_dim(const TermRun *t, const Prepared *p, int64_t *rows) {
    const int64_t parts = p->parts, dim = t->dim;
    const int64_t n = t->offsets[t->batch];
    if (t->batch == 0) return -1;
    int64_t b = 0;
    float *out = t->out;
    for (int64_t k = 0; k < dim; k++) out[k] = 0.0f;
    for (int64_t start = t->offsets[0]; start < n; start += BLOCK) {
        const int64_t end = n - start < BLOCK ? n : start + BLOCK;
        const int64_t bad = block_rows(p, t->ids, start, end, rows);
        if (bad >= 0) return bad;
        for (int64_t i = start; i < end; i++) {
            while (i >= t->offsets[b + 1]) {
                out = t->out + ++b * t->out_stride;
                for (int64_t k = 0; k < dim; k++) out[k] = 0.0f;
            }
            const int64_t at = i - start;
            const float w = t->weights ? t->weights[i] : 1.0f;
            const float *row = t->tables[0] + rows[at] * t->table_strides[0];
            if (parts == 1) {
                for (int64_t k = 0; k < dim; k++) out[k] = __builtin_fmaf(row[k], w, out[k]);
                continue;
            }
            for (int64_t k = 0; k < dim; k++) {
                float product = row[k];
                for (int64_t j = 1; j < parts; j++)
                    product *= t->tables[j][rows[j * SPAN + at] * t->table_strides[j] + k];
                out[k] += product * w;
            }
        }
    }
    while (++b < t->batch) {
        out = t->out + b * t->out_stride;
        for (int64_t k = 0; k < dim; k++) out[k] = 0.0f;
    }
    return -1;
}

static int64_t pooled_term(const TermRun *t, const Transform *transform) {
    Prepared p = prepare(transform);
    int64_t *rows = malloc(sizeof(int64_t) * SPAN * (size_t)p.parts);
    if (rows == NULL) return NO_MEMORY;
    int64_t result;
    switch (t->dim) {
    case 16: result = pooled_lanes(t, &p, rows, 1); break;
    case 32: result = pooled_lanes(t, &p, rows, 2); break;
    case 48: result = pooled_lanes(t, &p, rows, 3); break;
    case 64: result = pooled_lanes(t, &p, rows, 4); break;
    case 128: result = pooled_lanes(t, &p, rows, 8); break;
    default: result = pooled_any_dim(t, &p, rows);
    }
    free(rows);
    return result;
}

/* Every term in order over one call's batch. Returns -1; or, stopping there, the position of
 * the first id out of range where that is an error (its term in *failed); NO_MEMORY; or
 * BAD_LENGTHS where a length is negative or they add up to more than the ids. */
int64_t embtab_pooled(const PooledTerm *terms, int64_t count, const PooledBatch *batch,
                      int64_t *failed) {
    const int64_t bags = batch->features * batch->batch;
    int64_t *offsets = malloc(sizeof(int64_t) * (size_t)(bags + 1));
    if (offsets == NULL) return NO_MEMORY;
    int64_t total = 0, negative = 0;
    offsets[0] = 0;
    for (int64_t b = 0; b < bags; b++) {
        negative |= batch->lengths[b] < 0;
        total += batch->lengths[b];
        offsets[b + 1] = total;
    }
    int64_t result = negative || total > batch->id_count ? BAD_LENGTHS : -1;
    for (int64_t k = 0; k < count && result == -1; k++) {
        const PooledTerm *term = &terms[k];
        TermRun run = {
            .ids = batch->ids,
            .offsets = offsets + term->feature * batch->batch,
            .weights = batch->weights,
            .batch = batch->batch,
            .dim = term->dim,
            .out = batch->outputs[term->output] + term->column,
            .out_stride = batch->output_strides[term->output],
        };
        for (int64_t j = 0; j < term->transform.parts; j++) {
            run.tables[j] = term->tables[j];
            run.table_strides[j] = term->table_strides[j];
        }
        result = pooled_term(&run, &term->transform);
        if (result != -1) *failed = k;
    }
    free(offsets);
    return result;
}
