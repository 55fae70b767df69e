/* Fused element-wise steps of the exact lm arithmetic (lmzip/exact/fused.py wraps them).

Each function computes, bit for bit, what the torch code in lmzip/exact/forward.py computes
(SPEC.md, "lm payloads"): the same IEEE float32/float64 operations, each rounded on its own,
in the same order. The build turns off floating-point contraction (-ffp-contract=off: no
fused multiply-adds) and uses no fast-math, so vector and scalar code round alike. Sums that
are not exact (rms) follow the same fixed tree as tree_sum. Pointers come from contiguous
CPU tensors that the wrapper checked; a function returns 1 when an input was not finite, and
the wrapper then runs the torch code instead, so the two never have to agree on NaN or inf.

What these save is not arithmetic but dispatch: a decoding step runs a few hundred torch
operations per layer on tensors of a few thousand entries, each costing microseconds of
overhead; here each chain is one call. */

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(FLT_EVAL_METHOD) && FLT_EVAL_METHOD != 0
#error "float operations must round to float (x87 excess precision would change the bits)"
#endif

#define ACT_LIMIT 127
#define ROUND_MAGIC 12582912.0f /* 1.5 * 2**23 */

/* round half to even, as torch.round, for |x| < 2**22 (every use here is bounded below that by a
   clamp or by construction; the sign of a zero result does not matter, each is converted to an
   integer) */
static inline float round_even(float x) {
    return (x + ROUND_MAGIC) - ROUND_MAGIC; /* not folded: no fast-math */
}

/* Where the CPU has them, the hot loops run as AVX2 or AVX-512 clones (x86-64-v3 / v4, chosen at
   load): the same IEEE operations, so the same bits, on wider vectors. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && !defined(LMZIP_NO_CLONES)
#define HOT __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define HOT
#endif

#define FLOAT_BITS_MAX 0x7f7fffffu /* the largest finite float's bits: above are inf and NaN */

static inline int is_finite(float x) { return fabsf(x) <= 3.4028234663852886e38f; }

static inline uint32_t bits_of(float x) {
    uint32_t b;
    memcpy(&b, &x, sizeof b);
    return b;
}

static inline float float_of(uint32_t b) {
    float x;
    memcpy(&x, &b, sizeof x);
    return x;
}

/* an int32 that orders as the float x does (-0 just below +0): max over these vectorizes, where
   a float max does not without fast-math */
static inline int32_t ordered(float x) {
    int32_t b = (int32_t)bits_of(x);
    return b ^ ((b >> 31) & 0x7fffffff);
}

static inline float unordered(int32_t k) { return float_of((uint32_t)(k ^ ((k >> 31) & 0x7fffffff))); }

/* max |t[i]| over [0, k), and 1 if an entry is not finite: the bits of non-negative floats order
   as their values, and inf and NaN lie above the largest finite */
static inline int abs_max(const float *t, Py_ssize_t k, float *top) {
    uint32_t m = 0;
    for (Py_ssize_t i = 0; i < k; i++) {
        uint32_t b = bits_of(t[i]) & 0x7fffffffu;
        m = b > m ? b : m;
    }
    *top = float_of(m);
    return m > FLOAT_BITS_MAX;
}

/* sum of x[0..n) in tree_sum's order: add neighbours, padding a level with zeros to the next power
   of two when it is odd; overwrites x, which must hold a power of two at least n entries */
HOT static double tree_sum(double *x, Py_ssize_t n) {
    if (n == 0) return 0.0;
    while (n > 1) {
        if (n % 2) {
            Py_ssize_t p = 1;
            while (p < n) p <<= 1;
            for (Py_ssize_t i = n; i < p; i++) x[i] = 0.0;
            n = p;
        }
        for (Py_ssize_t i = 0; i < n / 2; i++) x[i] = x[2 * i] + x[2 * i + 1];
        n /= 2;
    }
    return x[0];
}

static Py_ssize_t pow2_at_least(Py_ssize_t n) {
    Py_ssize_t p = 1;
    while (p < n) p <<= 1;
    return p;
}

/* quantize_rows of one row t[0..k): int8 q and max|t|; returns 1 if an entry is not finite */
HOT static int quantize_row(const float *t, Py_ssize_t k, int8_t *q, float *top_out) {
    float top;
    if (abs_max(t, k, &top)) return 1;
    float factor = (float)ACT_LIMIT / (top > 0.0f ? top : 1.0f);
    if (!is_finite(factor)) return 1; /* a row below 127 / FLT_MAX: 0 * inf, left to torch */
    for (Py_ssize_t i = 0; i < k; i++) {
        float r = round_even(t[i] * factor);
        r = r < -ACT_LIMIT ? -ACT_LIMIT : r;
        r = r > ACT_LIMIT ? ACT_LIMIT : r;
        q[i] = (int8_t)r;
    }
    *top_out = top;
    return 0;
}

/* the exp table's entry at round(min(d, last)), as a float (exact: entries are at most 2**24),
   for d >= 0 (silu passes |g| * 1024 of a finite g) */
static inline float exp_entry(const int32_t *table, Py_ssize_t len, float d) {
    float last = (float)(len - 1);
    d = d > last ? last : d;
    return (float)table[(int32_t)round_even(d)];
}

static void *ptr(PyObject *o) { return PyLong_AsVoidPtr(o); }

#define ARGS(n)                                                                     \
    if (nargs != (n)) {                                                             \
        PyErr_Format(PyExc_TypeError, "expected %d arguments, got %zd", (n), nargs); \
        return NULL;                                                                \
    }

/* quantize_rows(t, q, step, rows, k, double_steps): step is float64 top / 127 or float32 */
static PyObject *py_quantize_rows(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    ARGS(6);
    const float *t = ptr(args[0]);
    int8_t *q = ptr(args[1]);
    void *step = ptr(args[2]);
    Py_ssize_t rows = PyLong_AsSsize_t(args[3]), k = PyLong_AsSsize_t(args[4]);
    int dbl = PyObject_IsTrue(args[5]);
    if (PyErr_Occurred()) return NULL;
    int bad = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t r = 0; r < rows && !bad; r++) {
        float top = 0.0f;
        bad = quantize_row(t + r * k, k, q + r * k, &top);
        if (dbl) ((double *)step)[r] = (double)top / (double)ACT_LIMIT;
        else ((float *)step)[r] = top / (float)ACT_LIMIT;
    }
    Py_END_ALLOW_THREADS
    return PyBool_FromLong(bad);
}

/* norm_quantize(x, weight, q, step, rows, k, eps): int8 of x * weight, float64 step times
   1 / sqrt(tree_sum(x**2) / k + eps) */
static PyObject *py_norm_quantize(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    ARGS(7);
    const float *x = ptr(args[0]), *w = ptr(args[1]);
    int8_t *q = ptr(args[2]);
    double *step = ptr(args[3]);
    Py_ssize_t rows = PyLong_AsSsize_t(args[4]), k = PyLong_AsSsize_t(args[5]);
    double eps = PyFloat_AsDouble(args[6]);
    if (PyErr_Occurred()) return NULL;
    float *t = malloc(sizeof(float) * (k ? k : 1));
    double *sq = malloc(sizeof(double) * pow2_at_least(k ? k : 1));
    if (!t || !sq) {
        free(t);
        free(sq);
        return PyErr_NoMemory();
    }
    int bad = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t r = 0; r < rows && !bad; r++) {
        const float *row = x + r * k;
        for (Py_ssize_t i = 0; i < k; i++) t[i] = row[i] * w[i];
        float top = 0.0f;
        bad = quantize_row(t, k, q + r * k, &top);
        for (Py_ssize_t i = 0; i < k; i++) {
            double d = (double)row[i];
            sq[i] = d * d;
        }
        double mean = tree_sum(sq, k) / (double)k;
        double factor = 1.0 / sqrt(mean + eps);
        step[r] = ((double)top / (double)ACT_LIMIT) * factor;
    }
    Py_END_ALLOW_THREADS
    free(t);
    free(sq);
    return PyBool_FromLong(bad);
}

HOT static void silu_row(const float *g, const float *up, float *h, Py_ssize_t inter, const int32_t *table,
                         Py_ssize_t len, float scale, float inv_one) {
    for (Py_ssize_t i = 0; i < inter; i++) {
        float e = exp_entry(table, len, fabsf(g[i]) * scale) * inv_one;
        float denom = e + 1.0f;
        float numerator = g[i] >= 0.0f ? (e > 1.0f ? e : 1.0f) : e; /* max(e, g >= 0) */
        h[i] = (g[i] * (numerator / denom)) * up[i];
    }
}

/* silu_quantize(gate_up, q, step, rows, inter, table, table_len): h = (g * sigmoid(g)) * up for
   the halves g, up of each row of gate_up (rows, 2 * inter), sigmoid from the exp table as
   silu() takes it, then quantize_rows(h) with float64 steps */
static PyObject *py_silu_quantize(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    ARGS(8);
    const float *gu = ptr(args[0]);
    int8_t *q = ptr(args[1]);
    double *step = ptr(args[2]);
    Py_ssize_t rows = PyLong_AsSsize_t(args[3]), inter = PyLong_AsSsize_t(args[4]);
    const int32_t *table = ptr(args[5]);
    Py_ssize_t len = PyLong_AsSsize_t(args[6]);
    double exp_scale = PyFloat_AsDouble(args[7]);
    if (PyErr_Occurred()) return NULL;
    float *h = malloc(sizeof(float) * (inter ? inter : 1));
    if (!h) return PyErr_NoMemory();
    const float scale = (float)exp_scale, inv_one = 1.0f / 16777216.0f; /* powers of two */
    int bad = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t r = 0; r < rows && !bad; r++) {
        const float *g = gu + r * 2 * inter, *up = g + inter;
        float top = 0.0f;
        if (abs_max(g, inter, &top)) {
            bad = 1;
            break;
        }
        silu_row(g, up, h, inter, table, len, scale, inv_one);
        bad = quantize_row(h, inter, q + r * inter, &top);
        step[r] = (double)top / (double)ACT_LIMIT;
    }
    Py_END_ALLOW_THREADS
    free(h);
    return PyBool_FromLong(bad);
}

/* rope_quantize(x, cos, sin, q, step, rows, positions, roped, heads, d): each row of x
   (rows, heads * d) is a position p = row % positions with tables cos, sin (positions, d); its
   first `roped` heads become x * cos + rotate_half(x) * sin, then every head goes to int8 on
   its own with a float32 step (rows, heads) */
static PyObject *py_rope_quantize(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    ARGS(10);
    const float *x = ptr(args[0]), *cos_t = ptr(args[1]), *sin_t = ptr(args[2]);
    int8_t *q = ptr(args[3]);
    float *step = ptr(args[4]);
    Py_ssize_t rows = PyLong_AsSsize_t(args[5]), positions = PyLong_AsSsize_t(args[6]);
    Py_ssize_t roped = PyLong_AsSsize_t(args[7]), heads = PyLong_AsSsize_t(args[8]), d = PyLong_AsSsize_t(args[9]);
    if (PyErr_Occurred()) return NULL;
    float *t = malloc(sizeof(float) * (d ? d : 1));
    if (!t) return PyErr_NoMemory();
    const Py_ssize_t half = d / 2;
    int bad = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t r = 0; r < rows && !bad; r++) {
        const float *c = cos_t + (r % positions) * d, *s = sin_t + (r % positions) * d;
        for (Py_ssize_t h = 0; h < heads && !bad; h++) {
            const float *v = x + (r * heads + h) * d;
            const float *in = v;
            if (h < roped) {
                for (Py_ssize_t i = 0; i < half; i++) t[i] = v[i] * c[i] + (-v[i + half]) * s[i];
                for (Py_ssize_t i = half; i < d; i++) t[i] = v[i] * c[i] + v[i - half] * s[i];
                in = t;
            }
            float top = 0.0f;
            bad = quantize_row(in, d, q + (r * heads + h) * d, &top);
            step[r * heads + h] = top / (float)ACT_LIMIT;
        }
    }
    Py_END_ALLOW_THREADS
    free(t);
    return PyBool_FromLong(bad);
}

/* the exp weights of one query from its scores s[0..n) (overwritten by U = weight * v step) and
   its top score, as attention_weights makes them: their sum (exactly: integers) and U's top in
   u_top_out; 1 if a value is not finite (or a weight index would be negative) */
static inline int query_weights(float *s, float top, const float *vs, float q_step, const int32_t *table,
                                Py_ssize_t len, Py_ssize_t n, float inv_d, float scale, int64_t *weight_sum_out,
                                float *u_top_out) {
    float coef = (q_step * inv_d) * scale;
    if (!(coef >= 0.0f) || !is_finite(coef)) return 1;
    const float last = (float)(len - 1);
    int64_t weight_sum = 0; /* integers: the float64 sum of the torch code, exactly */
    uint32_t u_top_bits = 0;
    int negative = 0;
    for (Py_ssize_t t = 0; t < n; t++) {
        float d = (top - s[t]) * coef;
        negative |= !(d >= 0.0f); /* NaN too: the torch code fails there, so it must run */
        d = d >= 0.0f ? d : 0.0f;
        d = d > last ? last : d;
        int32_t e = table[(int32_t)round_even(d)];
        weight_sum += e;
        float u = (float)e * vs[t];
        s[t] = u;
        uint32_t b = bits_of(u); /* a negative u (a negative v step) is flagged with inf and NaN */
        u_top_bits = b > u_top_bits ? b : u_top_bits;
    }
    *weight_sum_out = weight_sum;
    *u_top_out = float_of(u_top_bits);
    return negative || u_top_bits > FLOAT_BITS_MAX;
}

/* U's scale: u_top / 2**18 (1 / 2**18 where u_top is 0); 0 where it is subnormal, where U could
   pass 2**22 and round_even would not hold (the caller hands that to torch) */
static inline float u_scale(float u_top, float unit) {
    float div = (u_top > 0.0f ? u_top : 1.0f) * unit;
    return div < FLT_MIN ? 0.0f : div;
}

/* after a query's scores pass (its top as an ordered key, its worst bits): the weights, their sum,
   U's top and scale; 1 where the C code must hand the query to torch */
static inline int weigh(float *s, int32_t top_key, uint32_t worst, const float *vs, float q_step,
                        const int32_t *table, Py_ssize_t len, Py_ssize_t n, float inv_d, float scale, float unit,
                        int64_t *weight_sum, float *u_top, float *div) {
    if (worst > FLOAT_BITS_MAX ||
        query_weights(s, unordered(top_key), vs, q_step, table, len, n, inv_d, scale, weight_sum, u_top))
        return 1;
    *div = u_scale(*u_top, unit);
    return *div == 0.0f;
}

/* one query row j of one kv head: s[t] = score * k step, the exp weights, U and its limbs, and
   the float64 factor; 1 if a value is not finite (or a weight index would be negative) */
HOT static int attention_row(const int32_t *col, Py_ssize_t stride, const float *ks, const float *vs, float q_step,
                             const int32_t *table, Py_ssize_t len, Py_ssize_t tk, float inv_d, float scale,
                             float unit, long attn_bits, int limb_bits, float *s, int8_t *hi, int8_t *mid,
                             int8_t *lo, double *factor) {
    int32_t top_key = INT32_MIN;
    uint32_t worst = 0;
    for (Py_ssize_t t = 0; t < tk; t++) {
        float v = (float)col[t * stride] * ks[t];
        s[t] = v;
        int32_t key = ordered(v);
        top_key = key > top_key ? key : top_key;
        uint32_t b = bits_of(v) & 0x7fffffffu;
        worst = b > worst ? b : worst;
    }
    int64_t weight_sum;
    float u_top, div;
    if (weigh(s, top_key, worst, vs, q_step, table, len, tk, inv_d, scale, unit, &weight_sum, &u_top, &div))
        return 1;
    const int32_t mask = (1 << limb_bits) - 1;
    for (Py_ssize_t t = 0; t < tk; t++) {
        int32_t n = (int32_t)round_even(s[t] / div);
        hi[t] = (int8_t)(n >> 2 * limb_bits);
        mid[t] = (int8_t)((n >> limb_bits) & mask);
        lo[t] = (int8_t)(n & mask);
    }
    *factor = (double)u_top / ((double)weight_sum * (double)(1L << attn_bits));
    return 0;
}

/* one query of a whole-sequence pass that sees keys [0, n) of tk: scores sc (integer-valued
   products) times the k steps, the weights, and U (0 past n) as float32 or float64 integers in
   out; the float64 factor. 1 if a value is not finite. */
HOT static int masked_row(const float *sc, const float *ks, const float *vs, float q_step, const int32_t *table,
                          Py_ssize_t len, Py_ssize_t n, Py_ssize_t tk, float inv_d, float scale, float unit,
                          long attn_bits, float *s, void *out, int as_double, double *factor) {
    int32_t top_key = INT32_MIN;
    uint32_t worst = 0;
    for (Py_ssize_t t = 0; t < n; t++) {
        float v = sc[t] * ks[t];
        s[t] = v;
        int32_t key = ordered(v);
        top_key = key > top_key ? key : top_key;
        uint32_t b = bits_of(v) & 0x7fffffffu;
        worst = b > worst ? b : worst;
    }
    for (Py_ssize_t t = n; t < tk; t++) { /* masked: U is 0 * v step, which torch takes the max of */
        uint32_t b = bits_of(vs[t]);
        worst = b > worst ? b : worst; /* a negative v step is flagged with inf and NaN */
    }
    int64_t weight_sum;
    float u_top, div;
    if (weigh(s, top_key, worst, vs, q_step, table, len, n, inv_d, scale, unit, &weight_sum, &u_top, &div))
        return 1;
    if (as_double) {
        double *o = out;
        for (Py_ssize_t t = 0; t < n; t++) o[t] = (double)round_even(s[t] / div);
        for (Py_ssize_t t = n; t < tk; t++) o[t] = 0.0;
    } else {
        float *o = out;
        for (Py_ssize_t t = 0; t < n; t++) o[t] = round_even(s[t] / div);
        for (Py_ssize_t t = n; t < tk; t++) o[t] = 0.0f;
    }
    *factor = (double)u_top / ((double)weight_sum * (double)(1L << attn_bits));
    return 0;
}

/* masked_weights(scores, k_scale, q_step, v_scale, table, table_len, q_pos, out, factor, heads,
   nr, tk, step_stride, inv_sqrt_d, exp_scale, attn_bits, as_double): attention_weights for
   heads = B * Hkv heads of nr query rows each over tk keys: scores (heads, nr, tk) the integer
   products Q.K, the steps k_scale, v_scale at [head * step_stride + t], q_step (heads, nr); query
   row j sees keys [0, q_pos[j]] (q_pos int64 (nr,), or 0 for all keys); out (heads, nr, tk)
   U as float32 or float64 (as_double), factor (heads, nr) float64 */
static PyObject *py_masked_weights(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    ARGS(17);
    const float *scores = ptr(args[0]), *k_scale = ptr(args[1]), *q_step = ptr(args[2]), *v_scale = ptr(args[3]);
    const int32_t *table = ptr(args[4]);
    Py_ssize_t len = PyLong_AsSsize_t(args[5]);
    const int64_t *q_pos = ptr(args[6]);
    void *out = ptr(args[7]);
    double *factor = ptr(args[8]);
    Py_ssize_t heads = PyLong_AsSsize_t(args[9]), nr = PyLong_AsSsize_t(args[10]), tk = PyLong_AsSsize_t(args[11]);
    Py_ssize_t step_stride = PyLong_AsSsize_t(args[12]);
    double inv_sqrt_d = PyFloat_AsDouble(args[13]), exp_scale = PyFloat_AsDouble(args[14]);
    long attn_bits = PyLong_AsLong(args[15]);
    int as_double = PyObject_IsTrue(args[16]);
    if (PyErr_Occurred()) return NULL;
    float *s = malloc(sizeof(float) * (tk ? tk : 1));
    if (!s) return PyErr_NoMemory();
    const float unit = 1.0f / (float)(1L << attn_bits);
    const size_t item = as_double ? sizeof(double) : sizeof(float);
    int bad = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t h = 0; h < heads && !bad; h++)
        for (Py_ssize_t j = 0; j < nr && !bad; j++) {
            Py_ssize_t n = q_pos ? q_pos[j] + 1 : tk;
            if (n < 1 || n > tk) {
                bad = 1;
                break;
            }
            const Py_ssize_t row = h * nr + j;
            bad = masked_row(scores + row * tk, k_scale + h * step_stride, v_scale + h * step_stride,
                             q_step[row], table, len, n, tk, (float)inv_sqrt_d, (float)exp_scale, unit, attn_bits,
                             s, (char *)out + (size_t)(row * tk) * item, as_double, factor + row);
        }
    Py_END_ALLOW_THREADS
    free(s);
    return PyBool_FromLong(bad);
}

/* attention_limbs(scores, k_scale, q_step, v_scale, table, table_len, limbs, factor, rows, hk,
   r, tk, capacity, inv_sqrt_d, exp_scale, attn_bits, limb_bits): a decoding step's attention
   weights, as attention_weights() makes them with no mask, from key_scores' int32 products
   scores (rows, tk, hk, hk * r) (query head group j of kv head h at [t, h, h * r + j]), the
   steps k_scale, v_scale (rows, hk, capacity) and q_step (rows, hk, r), and the int32 exp table;
   out: U's three limbs int8 (rows, hk, 3 * r, tk) as value_sums lays them out, and the float64
   factor (rows, hk, r) */
static PyObject *py_attention_limbs(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    ARGS(17);
    const int32_t *scores = ptr(args[0]);
    const float *k_scale = ptr(args[1]), *q_step = ptr(args[2]), *v_scale = ptr(args[3]);
    const int32_t *table = ptr(args[4]);
    Py_ssize_t len = PyLong_AsSsize_t(args[5]);
    int8_t *limbs = ptr(args[6]);
    double *factor = ptr(args[7]);
    Py_ssize_t rows = PyLong_AsSsize_t(args[8]), hk = PyLong_AsSsize_t(args[9]), nr = PyLong_AsSsize_t(args[10]);
    Py_ssize_t tk = PyLong_AsSsize_t(args[11]), capacity = PyLong_AsSsize_t(args[12]);
    double inv_sqrt_d = PyFloat_AsDouble(args[13]), exp_scale = PyFloat_AsDouble(args[14]);
    long attn_bits = PyLong_AsLong(args[15]), limb_bits = PyLong_AsLong(args[16]);
    if (PyErr_Occurred()) return NULL;
    float *s = malloc(sizeof(float) * (tk ? tk : 1));
    if (!s) return PyErr_NoMemory();
    const float unit = 1.0f / (float)(1L << attn_bits);
    const Py_ssize_t stride = hk * hk * nr;
    int bad = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t b = 0; b < rows && !bad; b++)
        for (Py_ssize_t h = 0; h < hk && !bad; h++) {
            const Py_ssize_t head = b * hk + h;
            int8_t *out = limbs + head * 3 * nr * tk;
            for (Py_ssize_t j = 0; j < nr && !bad; j++)
                bad = attention_row(scores + b * tk * stride + h * hk * nr + h * nr + j, stride,
                                    k_scale + head * capacity, v_scale + head * capacity, q_step[head * nr + j],
                                    table, len, tk, (float)inv_sqrt_d, (float)exp_scale, unit, attn_bits,
                                    (int)limb_bits, s, out + j * tk, out + (nr + j) * tk, out + (2 * nr + j) * tk,
                                    factor + head * nr + j);
        }
    Py_END_ALLOW_THREADS
    free(s);
    return PyBool_FromLong(bad);
}

/* attention_output(sums, factor, q, step, rows, hk, r, d, limb_bits): value_sums' int32 products
   sums (rows, hk * d, hk * 3 * r) (limb block l of query j of kv head h, output i at
   [h * d + i, h * 3 * r + l * r + j]) joined as (hi * 2**12 + mid * 2**6) + lo in float64, times
   the factor (rows, hk, r), rounded to float32: the attention output (rows, hk * r * d), then
   quantize_rows with float64 steps */
static PyObject *py_attention_output(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    ARGS(9);
    const int32_t *sums = ptr(args[0]);
    const double *factor = ptr(args[1]);
    int8_t *q = ptr(args[2]);
    double *step = ptr(args[3]);
    Py_ssize_t rows = PyLong_AsSsize_t(args[4]), hk = PyLong_AsSsize_t(args[5]), nr = PyLong_AsSsize_t(args[6]);
    Py_ssize_t d = PyLong_AsSsize_t(args[7]);
    long limb_bits = PyLong_AsLong(args[8]);
    if (PyErr_Occurred()) return NULL;
    const Py_ssize_t k = hk * nr * d, cols = hk * 3 * nr;
    float *o = malloc(sizeof(float) * (k ? k : 1));
    if (!o) return PyErr_NoMemory();
    const double base = (double)(1L << limb_bits);
    int bad = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t b = 0; b < rows && !bad; b++) {
        const int32_t *m = sums + b * hk * d * cols;
        for (Py_ssize_t h = 0; h < hk; h++)
            for (Py_ssize_t j = 0; j < nr; j++) {
                double f = factor[(b * hk + h) * nr + j];
                for (Py_ssize_t i = 0; i < d; i++) {
                    const int32_t *e = m + (h * d + i) * cols + h * 3 * nr + j;
                    double v = ((double)e[0] * (base * base) + (double)e[nr] * base) + (double)e[2 * nr];
                    o[(h * nr + j) * d + i] = (float)(v * f);
                }
            }
        float top = 0.0f;
        bad = quantize_row(o, k, q + b * k, &top);
        step[b] = (double)top / (double)ACT_LIMIT;
    }
    Py_END_ALLOW_THREADS
    free(o);
    return PyBool_FromLong(bad);
}

HOT static void scale_block(const void *y, int kind, const double *scale, const double *steps, float *out,
                            Py_ssize_t rows, Py_ssize_t n) {
    for (Py_ssize_t m = 0; m < rows; m++) {
        const double step = steps[m];
        float *o = out + m * n;
        if (kind == 0) {
            const int32_t *row = (const int32_t *)y + m * n;
            for (Py_ssize_t i = 0; i < n; i++) o[i] = (float)(((double)row[i] * scale[i]) * step);
        } else if (kind == 1) {
            const float *row = (const float *)y + m * n;
            for (Py_ssize_t i = 0; i < n; i++) o[i] = (float)(((double)row[i] * scale[i]) * step);
        } else {
            const double *row = (const double *)y + m * n;
            for (Py_ssize_t i = 0; i < n; i++) o[i] = (float)((row[i] * scale[i]) * step);
        }
    }
}

/* scale_rows(y, kind, scale, steps, out, rows, n): a Linear's exact integer sums y (rows, n) as
   int32 (kind 0), float32 (1) or float64 (2), times the float64 weight scales (n,) then the
   float64 row steps (rows,), each product rounded in float64, then to float32: out (rows, n) */
static PyObject *py_scale_rows(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    ARGS(7);
    const void *y = ptr(args[0]);
    long kind = PyLong_AsLong(args[1]);
    const double *scale = ptr(args[2]), *steps = ptr(args[3]);
    float *out = ptr(args[4]);
    Py_ssize_t rows = PyLong_AsSsize_t(args[5]), n = PyLong_AsSsize_t(args[6]);
    if (PyErr_Occurred()) return NULL;
    Py_BEGIN_ALLOW_THREADS
    scale_block(y, (int)kind, scale, steps, out, rows, n);
    Py_END_ALLOW_THREADS
    Py_RETURN_FALSE;
}

/* shift_u8(src, dst, n): int8 src + 128 as uint8 (the same bits with the sign bit flipped), the
   activations oneDNN's u8 x s8 product takes */
static PyObject *py_shift_u8(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    ARGS(3);
    const uint8_t *src = ptr(args[0]);
    uint8_t *dst = ptr(args[1]);
    Py_ssize_t n = PyLong_AsSsize_t(args[2]);
    if (PyErr_Occurred()) return NULL;
    for (Py_ssize_t i = 0; i < n; i++) dst[i] = src[i] ^ 0x80u;
    Py_RETURN_FALSE;
}

/* put_heads(heads, steps, k, v, k_scale, v_scale, rows, positions, start, capacity, first, hk, d):
   the int8 key and value heads of rows x positions tokens (heads (rows, positions, H, d), keys at
   heads first to first + hk, values next; steps (rows, positions, H) float32) into an int8 cache
   at positions start on: k (rows, capacity, hk, d), v transposed (rows, hk, d, capacity), the
   steps (rows, hk, capacity). Copies only, as Cache.put makes them. */
static PyObject *py_put_heads(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    ARGS(13);
    const int8_t *heads = ptr(args[0]);
    const float *steps = ptr(args[1]);
    int8_t *k = ptr(args[2]), *v = ptr(args[3]);
    float *k_scale = ptr(args[4]), *v_scale = ptr(args[5]);
    Py_ssize_t rows = PyLong_AsSsize_t(args[6]), positions = PyLong_AsSsize_t(args[7]);
    Py_ssize_t start = PyLong_AsSsize_t(args[8]), capacity = PyLong_AsSsize_t(args[9]);
    Py_ssize_t first = PyLong_AsSsize_t(args[10]), hk = PyLong_AsSsize_t(args[11]), d = PyLong_AsSsize_t(args[12]);
    if (PyErr_Occurred()) return NULL;
    const Py_ssize_t width = first + 2 * hk; /* heads per token */
    for (Py_ssize_t b = 0; b < rows; b++)
        for (Py_ssize_t t = 0; t < positions; t++) {
            const Py_ssize_t p = start + t, token = b * positions + t;
            const int8_t *kh = heads + (token * width + first) * d, *vh = kh + hk * d;
            const float *ks = steps + token * width + first, *vs = ks + hk;
            memcpy(k + (b * capacity + p) * hk * d, kh, (size_t)(hk * d));
            for (Py_ssize_t h = 0; h < hk; h++) {
                for (Py_ssize_t i = 0; i < d; i++) v[((b * hk + h) * d + i) * capacity + p] = vh[h * d + i];
                k_scale[(b * hk + h) * capacity + p] = ks[h];
                v_scale[(b * hk + h) * capacity + p] = vs[h];
            }
        }
    Py_RETURN_FALSE;
}

static PyMethodDef methods[] = {
    {"quantize_rows", (PyCFunction)(void (*)(void))py_quantize_rows, METH_FASTCALL, NULL},
    {"norm_quantize", (PyCFunction)(void (*)(void))py_norm_quantize, METH_FASTCALL, NULL},
    {"silu_quantize", (PyCFunction)(void (*)(void))py_silu_quantize, METH_FASTCALL, NULL},
    {"rope_quantize", (PyCFunction)(void (*)(void))py_rope_quantize, METH_FASTCALL, NULL},
    {"attention_limbs", (PyCFunction)(void (*)(void))py_attention_limbs, METH_FASTCALL, NULL},
    {"attention_output", (PyCFunction)(void (*)(void))py_attention_output, METH_FASTCALL, NULL},
    {"scale_rows", (PyCFunction)(void (*)(void))py_scale_rows, METH_FASTCALL, NULL},
    {"shift_u8", (PyCFunction)(void (*)(void))py_shift_u8, METH_FASTCALL, NULL},
    {"put_heads", (PyCFunction)(void (*)(void))py_put_heads, METH_FASTCALL, NULL},
    {"masked_weights", (PyCFunction)(void (*)(void))py_masked_weights, METH_FASTCALL, NULL},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "lmzip._fused", NULL, -1, methods};

PyMODINIT_FUNC PyInit__fused(void) { return PyModule_Create(&module); }
