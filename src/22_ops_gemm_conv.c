/* ======================================================================================
   Ops: GEMM, matmul, linear, conv2d, pooling
   ====================================================================================== */

/* The CPU GEMM and the ops built on it: matmul, linear, conv2d (im2col + GEMM), max/avg pooling. */

/* --------------------------------------------------------------------------------------
   GEMM: C = alpha * op(A) @ op(B) + beta * C (row-major), Goto/BLIS style.
   Panels of A (MR rows) and B (NR columns) are packed into contiguous buffers so the
   register-blocked micro-kernel always reads one layout, whatever the transposes. Blocking:
   KC along K (a B micro-panel stays in L1), MC rows of A per packed block (L2), NC columns
   of B per packed block (L3). Threads split C into tiles; every element of C is computed by
   exactly one task with a fixed K order, so results do not depend on the thread count.
   -------------------------------------------------------------------------------------- */

#define MGPU__MR 6
#define MGPU__NR 16
/* K block. MGPU_GEMM_KC (a multiple of 8) changes it, and with it the order in which each element
   of C sums its products: tests build such a twin to measure how far training amplifies a change
   of summation order alone (tests/emu_training.sh). */
#ifndef MGPU_GEMM_KC
#define MGPU_GEMM_KC 256
#endif
#if MGPU_GEMM_KC < 8 || MGPU_GEMM_KC % 8 != 0
#error "MGPU_GEMM_KC must be a positive multiple of 8"
#endif
#define MGPU__KC MGPU_GEMM_KC
#define MGPU__MC 144
#define MGPU__NC 2048
/* below this many multiply-adds a GEMM runs on the calling thread: waking workers costs more */
#define MGPU__GEMM_SERIAL_MACS ((int64_t)1 << 20)

#ifdef MGPU_USE_CBLAS
#ifdef __cplusplus
extern "C" {
#endif
/* cblas.h is not included so the header needs no BLAS headers; the enums are passed as ints. */
void cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha, const float *a, int lda,
                 const float *b, int ldb, float beta, float *c, int ldc);
#ifdef __cplusplus
}
#endif
#define MGPU__CBLAS_ROW_MAJOR 101
#define MGPU__CBLAS_NO_TRANS 111
#define MGPU__CBLAS_TRANS 112
#endif

/* One GEMM operand as seen by the packing code: element (r, k), with r the row of op(A) or the
   column of op(B), lives at p + r * rs + k * ks. Batched GEMMs step p by batch_stride. */
typedef struct mgpu__gemm_operand {
    const float *p;
    int64_t rs, ks;
    int64_t batch_stride;
    int trans; int64_t ld;   /* the BLAS view, for the cblas route */
} mgpu__gemm_operand;

/* op(A) (M, K): A is (M, K) with lda, or (K, M) when transposed. */
static mgpu__gemm_operand mgpu__gemm_a(const float *a, int trans, int64_t lda) {
    mgpu__gemm_operand o;
    memset(&o, 0, sizeof o);
    o.p = a; o.trans = trans; o.ld = lda;
    o.rs = trans ? 1 : lda;
    o.ks = trans ? lda : 1;
    return o;
}
/* op(B) (K, N): B is (K, N) with ldb, or (N, K) when transposed. Rows of the packed view are N. */
static mgpu__gemm_operand mgpu__gemm_b(const float *b, int trans, int64_t ldb) {
    mgpu__gemm_operand o;
    memset(&o, 0, sizeof o);
    o.p = b; o.trans = trans; o.ld = ldb;
    o.rs = trans ? ldb : 1;
    o.ks = trans ? 1 : ldb;
    return o;
}

/* Micro-kernel: acc (MR, NR) = ap (kc, MR) . bp (kc, NR); then c = alpha * acc + beta * c for the
   full tile (beta == 0: c is not read, so NaN in c does not propagate). */
#if defined(MGPU__GEMM_AVX2)
static void mgpu__gemm_kernel_full(int64_t kc, const float *ap, const float *bp, float *c, int64_t ldc, float alpha, float beta) {
    __m256 c00 = _mm256_setzero_ps(), c01 = _mm256_setzero_ps(), c10 = _mm256_setzero_ps(), c11 = _mm256_setzero_ps();
    __m256 c20 = _mm256_setzero_ps(), c21 = _mm256_setzero_ps(), c30 = _mm256_setzero_ps(), c31 = _mm256_setzero_ps();
    __m256 c40 = _mm256_setzero_ps(), c41 = _mm256_setzero_ps(), c50 = _mm256_setzero_ps(), c51 = _mm256_setzero_ps();
    __m256 va = _mm256_set1_ps(alpha), vb = _mm256_set1_ps(beta);
    int64_t k;
#define MGPU__FMA_ROW(i)                                                   \
    do { __m256 a_ = _mm256_broadcast_ss(ap + (i));                        \
         c##i##0 = _mm256_fmadd_ps(a_, b0, c##i##0);                       \
         c##i##1 = _mm256_fmadd_ps(a_, b1, c##i##1); } while (0)
    for (k = 0; k < kc; k++) {
        __m256 b0 = _mm256_load_ps(bp), b1 = _mm256_load_ps(bp + 8);
        MGPU__FMA_ROW(0); MGPU__FMA_ROW(1); MGPU__FMA_ROW(2);
        MGPU__FMA_ROW(3); MGPU__FMA_ROW(4); MGPU__FMA_ROW(5);
        ap += MGPU__MR; bp += MGPU__NR;
    }
#undef MGPU__FMA_ROW
#define MGPU__STORE_ROW(i)                                                                                     \
    do { float *r_ = c + (i) * ldc;                                                                            \
         __m256 x0_ = _mm256_mul_ps(va, c##i##0), x1_ = _mm256_mul_ps(va, c##i##1);                            \
         if (beta != 0.0f) { x0_ = _mm256_fmadd_ps(vb, _mm256_loadu_ps(r_), x0_);                             \
                             x1_ = _mm256_fmadd_ps(vb, _mm256_loadu_ps(r_ + 8), x1_); }                        \
         _mm256_storeu_ps(r_, x0_); _mm256_storeu_ps(r_ + 8, x1_); } while (0)
    MGPU__STORE_ROW(0); MGPU__STORE_ROW(1); MGPU__STORE_ROW(2);
    MGPU__STORE_ROW(3); MGPU__STORE_ROW(4); MGPU__STORE_ROW(5);
#undef MGPU__STORE_ROW
}
#elif defined(__GNUC__) && !defined(__CUDACC__)
/* Baseline x86-64 / other targets, GCC vector extensions: the tile is done as two 6 x 8 halves so
   the 12 accumulators (4 floats each) fit in 16 SSE registers. */
typedef float mgpu__v4 __attribute__((vector_size(16)));
static mgpu__v4 mgpu__v4_load(const float *p) { mgpu__v4 v; memcpy(&v, p, sizeof v); return v; }
static void mgpu__gemm_kernel_full(int64_t kc, const float *ap, const float *bp, float *c, int64_t ldc, float alpha, float beta) {
    int h, i;
    for (h = 0; h < MGPU__NR; h += 8) {
        mgpu__v4 acc[MGPU__MR][2];
        const float *a = ap, *b = bp + h;
        int64_t k;
        memset(acc, 0, sizeof acc);
        for (k = 0; k < kc; k++) {
            mgpu__v4 b0 = mgpu__v4_load(b), b1 = mgpu__v4_load(b + 4);
#define MGPU__V4_ROW(r) do { float a_ = a[r]; acc[r][0] += a_ * b0; acc[r][1] += a_ * b1; } while (0)
            MGPU__V4_ROW(0); MGPU__V4_ROW(1); MGPU__V4_ROW(2); MGPU__V4_ROW(3); MGPU__V4_ROW(4); MGPU__V4_ROW(5);
#undef MGPU__V4_ROW
            a += MGPU__MR; b += MGPU__NR;
        }
        for (i = 0; i < MGPU__MR; i++) {
            float *r = c + i * ldc + h;
            mgpu__v4 x0 = alpha * acc[i][0], x1 = alpha * acc[i][1];
            if (beta != 0.0f) { x0 += beta * mgpu__v4_load(r); x1 += beta * mgpu__v4_load(r + 4); }
            memcpy(r, &x0, sizeof x0); memcpy(r + 4, &x1, sizeof x1);
        }
    }
}
#else
/* Plain C for other compilers. */
static void mgpu__gemm_kernel_full(int64_t kc, const float *ap, const float *bp, float *c, int64_t ldc, float alpha, float beta) {
    float acc[MGPU__MR * MGPU__NR];
    int64_t k;
    int i, j;
    memset(acc, 0, sizeof acc);
    for (k = 0; k < kc; k++) {
        for (i = 0; i < MGPU__MR; i++) {
            float a = ap[i];
            for (j = 0; j < MGPU__NR; j++) acc[i * MGPU__NR + j] += a * bp[j];
        }
        ap += MGPU__MR; bp += MGPU__NR;
    }
    for (i = 0; i < MGPU__MR; i++) {
        float *r = c + i * ldc;
        for (j = 0; j < MGPU__NR; j++) {
            float x = alpha * acc[i * MGPU__NR + j];
            r[j] = beta != 0.0f ? beta * r[j] + x : x;
        }
    }
}
#endif

/* Any tile: edge tiles go through a full-size scratch tile so they round exactly like full ones. */
static void mgpu__gemm_kernel(int64_t kc, const float *ap, const float *bp, float *c, int64_t ldc, int mr, int nr, float alpha, float beta) {
    float tile[MGPU__MR * MGPU__NR];
    int i;
    if (mr == MGPU__MR && nr == MGPU__NR) { mgpu__gemm_kernel_full(kc, ap, bp, c, ldc, alpha, beta); return; }
    memset(tile, 0, sizeof tile);
    if (beta != 0.0f)
        for (i = 0; i < mr; i++) memcpy(tile + i * MGPU__NR, c + i * ldc, sizeof(float) * (size_t)nr);
    mgpu__gemm_kernel_full(kc, ap, bp, tile, MGPU__NR, alpha, beta);
    for (i = 0; i < mr; i++) memcpy(c + i * ldc, tile + i * MGPU__NR, sizeof(float) * (size_t)nr);
}

#if defined(MGPU__GEMM_AVX2)
/* In-register transpose of 8 rows of 8 floats: v[i] becomes column i. */
static void mgpu__transpose8(__m256 *v) {
    __m256 t0 = _mm256_unpacklo_ps(v[0], v[1]), t1 = _mm256_unpackhi_ps(v[0], v[1]);
    __m256 t2 = _mm256_unpacklo_ps(v[2], v[3]), t3 = _mm256_unpackhi_ps(v[2], v[3]);
    __m256 t4 = _mm256_unpacklo_ps(v[4], v[5]), t5 = _mm256_unpackhi_ps(v[4], v[5]);
    __m256 t6 = _mm256_unpacklo_ps(v[6], v[7]), t7 = _mm256_unpackhi_ps(v[6], v[7]);
    __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
    __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
    __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
    __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
    v[0] = _mm256_permute2f128_ps(u0, u4, 0x20); v[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
    v[2] = _mm256_permute2f128_ps(u2, u6, 0x20); v[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
    v[4] = _mm256_permute2f128_ps(u0, u4, 0x31); v[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
    v[6] = _mm256_permute2f128_ps(u2, u6, 0x31); v[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}
/* Rows contiguous along K (ks == 1), a full panel of w = 6 or 16 rows: 8 x 8 blocks are
   transposed in registers. Returns how many k were packed (a multiple of 8); the caller
   finishes the tail. */
static int64_t mgpu__pack_rows_avx2(float *dst, int w, int64_t kc, const float *src, int64_t rs) {
    int64_t k, kend = kc & ~(int64_t)7;
    int r0, i;
    __m256 v[8];
    for (r0 = 0; r0 < w; r0 += 8) {
        int nrows = w - r0 < 8 ? w - r0 : 8;
        for (k = 0; k < kend; k += 8) {
            for (i = 0; i < 8; i++) v[i] = _mm256_loadu_ps(src + (r0 + (i < nrows ? i : nrows - 1)) * rs + k);
            mgpu__transpose8(v);
            if (nrows == 8) {
                for (i = 0; i < 8; i++) _mm256_storeu_ps(dst + (k + i) * w + r0, v[i]);
            } else {   /* w == 6: the low 6 lanes */
                for (i = 0; i < 8; i++) {
                    float *d = dst + (k + i) * w + r0;
                    _mm_storeu_ps(d, _mm256_castps256_ps128(v[i]));
                    _mm_storel_pi((__m64 *)(void *)(d + 4), _mm256_extractf128_ps(v[i], 1));
                }
            }
        }
    }
    return kend;
}
#endif

/* Pack rows [0, rows) x k [0, kc) into dst (kc, w), zero-padding rows up to w. */
static void mgpu__pack_run(float *dst, int w, int rows, int64_t kc, const float *src, int64_t rs, int64_t ks) {
    int64_t k, k0 = 0;
    int r;
#if defined(MGPU__GEMM_AVX2)
    if (ks == 1 && rows == w && rs != 1) k0 = mgpu__pack_rows_avx2(dst, w, kc, src, rs);
#endif
    if (rs == 1 && rows == w) {   /* rows contiguous, full panel: one fixed-size copy per k */
        for (k = 0; k < kc; k++) memcpy(dst + k * w, src + k * ks, sizeof(float) * (size_t)w);
        return;
    }
    if (rs == 1) {
        for (k = 0; k < kc; k++) {
            const float *s = src + k * ks;
            float *d = dst + k * w;
            for (r = 0; r < rows; r++) d[r] = s[r];
            for (; r < w; r++) d[r] = 0.0f;
        }
        return;
    }
    for (r = 0; r < rows; r++) {   /* k contiguous (ks == 1) or general: walk each row */
        const float *s = src + r * rs;
        for (k = k0; k < kc; k++) dst[k * w + r] = s[k * ks];
    }
    for (; r < w; r++)
        for (k = k0; k < kc; k++) dst[k * w + r] = 0.0f;
}

/* Pack rows [r0, r0 + rows) x k [k0, k0 + kc) of op into panels of w rows: panel q at dst + q * kc * w. */
static void mgpu__pack(float *dst, int w, const mgpu__gemm_operand *op, const float *base, int64_t r0, int64_t rows, int64_t k0, int64_t kc) {
    int64_t q;
    for (q = 0; q * w < rows; q++)
        mgpu__pack_run(dst + q * kc * w, w, (int)MGPU__MIN((int64_t)w, rows - q * w), kc,
                       base + (r0 + q * w) * op->rs + k0 * op->ks, op->rs, op->ks);
}

/* Per-thread scratch buffers (GEMM packing, conv2d columns), grown on demand and kept, so a
   steady-state training step allocates nothing here. A pthread key frees a thread's buffers when
   it exits (pool workers die with their context). */
enum { MGPU__SCRATCH_PACK = 0, MGPU__SCRATCH_COLS = 1, MGPU__SCRATCH_DCOLS = 2, MGPU__SCRATCH_SLOTS = 3 };
typedef struct mgpu__scratch_set { float *buf[MGPU__SCRATCH_SLOTS]; size_t cap[MGPU__SCRATCH_SLOTS]; } mgpu__scratch_set;
static pthread_key_t mgpu__scratch_key;
static pthread_once_t mgpu__scratch_key_once = PTHREAD_ONCE_INIT;
static int mgpu__scratch_key_ok = 0;
static void mgpu__scratch_set_free(void *p) {
    mgpu__scratch_set *set = (mgpu__scratch_set *)p;
    int i;
    for (i = 0; i < MGPU__SCRATCH_SLOTS; i++) mgpu_free(set->buf[i]);
    mgpu_free(set);
}
static void mgpu__scratch_key_init(void) { mgpu__scratch_key_ok = pthread_key_create(&mgpu__scratch_key, mgpu__scratch_set_free) == 0; }

/* This thread's buffer for `slot` with room for `floats` (64-byte aligned), or NULL when out of memory. */
static float *mgpu__scratch(int slot, size_t floats) {
    mgpu__scratch_set *set;
    pthread_once(&mgpu__scratch_key_once, mgpu__scratch_key_init);
    if (!mgpu__scratch_key_ok) return NULL;
    set = (mgpu__scratch_set *)pthread_getspecific(mgpu__scratch_key);
    if (!set) {
        set = (mgpu__scratch_set *)mgpu_malloc(sizeof *set);
        if (!set) return NULL;
        memset(set, 0, sizeof *set);
        if (pthread_setspecific(mgpu__scratch_key, set) != 0) { mgpu_free(set); return NULL; }
    }
    if (set->cap[slot] < floats) {
        size_t want = floats + floats / 4;   /* headroom: slowly growing shapes do not reallocate every call */
        mgpu_free(set->buf[slot]);
        set->cap[slot] = 0;
        set->buf[slot] = (float *)mgpu_malloc(want * sizeof(float));
        if (!set->buf[slot]) return NULL;
        set->cap[slot] = want;
    }
    return set->buf[slot];
}

typedef struct mgpu__gemm_job {
    mgpu__gemm_operand a, b;
    float *c; int64_t ldc, c_batch_stride;
    int64_t m, n, k;
    float alpha, beta;
    int64_t gm, gn, mt, nt;   /* C is cut into gm x gn tiles of mt rows and nt columns per batch item */
    int64_t kc;               /* K block (mgpu__gemm_kc) */
} mgpu__gemm_job;

/* Where a tile packs its panels: this thread's scratch, with room for all nb columns of B and MC
   rows of A per K block, or (out of memory) two micro-panels on the stack. The micro-kernel sees
   the same packed values either way, so the fallback only costs speed, never bits. */
typedef struct mgpu__gemm_panels { float *bp, *ap; int64_t nb, mb; } mgpu__gemm_panels;

/* One tile of C: the full K loop, packing B once per KC x nb block and A once per mb x KC block. */
static void mgpu__gemm_tile_in(const mgpu__gemm_job *j, int64_t task, const mgpu__gemm_panels *pn) {
    int64_t per_batch = j->gm * j->gn, bi = task / per_batch, t = task % per_batch;
    int64_t m0 = (t / j->gn) * j->mt, n0 = (t % j->gn) * j->nt;
    int64_t m1 = MGPU__MIN(j->m, m0 + j->mt), n1 = MGPU__MIN(j->n, n0 + j->nt);
    int64_t pc, jc, ic, jp, ip;
    const float *abase = j->a.p + bi * j->a.batch_stride, *bbase = j->b.p + bi * j->b.batch_stride;
    float *cbase = j->c + bi * j->c_batch_stride;
    for (pc = 0; pc < j->k; pc += j->kc) {
        int64_t kc = MGPU__MIN(j->kc, j->k - pc);
        float beta = pc == 0 ? j->beta : 1.0f;   /* later K blocks accumulate */
        for (jc = n0; jc < n1; jc += pn->nb) {
            int64_t nw = MGPU__MIN(pn->nb, n1 - jc);
            mgpu__pack(pn->bp, MGPU__NR, &j->b, bbase, jc, nw, pc, kc);
            for (ic = m0; ic < m1; ic += pn->mb) {
                int64_t mc = MGPU__MIN(pn->mb, m1 - ic);
                mgpu__pack(pn->ap, MGPU__MR, &j->a, abase, ic, mc, pc, kc);
                for (jp = 0; jp * MGPU__NR < nw; jp++) {
                    int nr = (int)MGPU__MIN((int64_t)MGPU__NR, nw - jp * MGPU__NR);
                    for (ip = 0; ip * MGPU__MR < mc; ip++) {
                        int mr = (int)MGPU__MIN((int64_t)MGPU__MR, mc - ip * MGPU__MR);
                        mgpu__gemm_kernel(kc, pn->ap + ip * kc * MGPU__MR, pn->bp + jp * kc * MGPU__NR,
                                          cbase + (ic + ip * MGPU__MR) * j->ldc + jc + jp * MGPU__NR, j->ldc, mr, nr, j->alpha, beta);
                    }
                }
            }
        }
    }
}

/* Out of memory for the scratch: micro-panels on the stack, in a frame of their own so the usual
   path stays small; 64-byte aligned by hand, as the micro-kernel's aligned loads need. */
static void mgpu__gemm_tile_on_stack(const mgpu__gemm_job *j, int64_t task) {
    float buf[(MGPU__NR + MGPU__MR) * MGPU__KC + 16];
    mgpu__gemm_panels pn;
    pn.bp = (float *)(((uintptr_t)buf + 63) & ~(uintptr_t)63);
    pn.ap = pn.bp + MGPU__NR * MGPU__KC;   /* NR * KC floats: a multiple of 64 bytes */
    pn.nb = MGPU__NR; pn.mb = MGPU__MR;
    mgpu__gemm_tile_in(j, task, &pn);
}

static void mgpu__gemm_tile(const mgpu__gemm_job *j, int64_t task) {
    size_t bfloats = (size_t)(j->nt * MGPU__KC);   /* nt is a multiple of NR */
    mgpu__gemm_panels pn;
    pn.bp = mgpu__scratch(MGPU__SCRATCH_PACK, bfloats + (size_t)MGPU__MC * MGPU__KC);
    if (!pn.bp) { mgpu__gemm_tile_on_stack(j, task); return; }
    pn.ap = pn.bp + bfloats; pn.nb = j->nt; pn.mb = MGPU__MC;
    mgpu__gemm_tile_in(j, task, &pn);
}

static void mgpu__gemm_tiles(void *arg, int64_t begin, int64_t end) {
    int64_t t;
    for (t = begin; t < end; t++) mgpu__gemm_tile((const mgpu__gemm_job *)arg, t);
}

static int64_t mgpu__round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

/* K block: K split into equal blocks of at most KC (rounded up to 8), so no block is thin. */
static int64_t mgpu__gemm_kc(int64_t k) {
    int64_t blocks = (k + MGPU__KC - 1) / MGPU__KC;
    return MGPU__MIN((int64_t)MGPU__KC, mgpu__round_up((k + blocks - 1) / blocks, 8));
}

/* Choose the tile grid: estimated time = waves of tasks x (multiply-adds of a tile + packing of
   its A and B panels, weighted as ~8 multiply-adds per packed float), per unit of K. */
static void mgpu__gemm_plan(mgpu__gemm_job *j, int64_t batch, int threads) {
    int64_t gm, gn, best = -1;
    int64_t gn_min = (j->n + MGPU__NC - 1) / MGPU__NC;
    int64_t gm_max = MGPU__MIN((j->m + MGPU__MR - 1) / MGPU__MR, (int64_t)4 * threads);
    int64_t gn_max = MGPU__MIN((j->n + MGPU__NR - 1) / MGPU__NR, gn_min + (int64_t)4 * threads);
    if (batch * j->m * j->n * j->k < MGPU__GEMM_SERIAL_MACS) threads = 1;
    if (threads == 1) gm_max = 1;
    j->gm = 1; j->gn = gn_min; j->mt = j->m; j->nt = mgpu__round_up((j->n + gn_min - 1) / gn_min, MGPU__NR);
    for (gm = 1; gm <= gm_max; gm++) {
        int64_t mt = mgpu__round_up((j->m + gm - 1) / gm, MGPU__MR), rgm = (j->m + mt - 1) / mt;
        for (gn = gn_min; gn <= gn_max; gn++) {
            int64_t nt = mgpu__round_up((j->n + gn - 1) / gn, MGPU__NR), rgn = (j->n + nt - 1) / nt;
            int64_t waves = (batch * rgm * rgn + threads - 1) / threads;
            int64_t cost = waves * (mt * nt + 8 * (mt + nt));
            if (best < 0 || cost < best) { best = cost; j->gm = rgm; j->gn = rgn; j->mt = mt; j->nt = nt; }
        }
    }
}

/* C := beta * C for the degenerate cases (K == 0 or alpha == 0); beta 0 clears NaN too. */
static void mgpu__gemm_scale_c(int64_t batch, int64_t m, int64_t n, float beta, float *c, int64_t ldc, int64_t c_batch_stride) {
    int64_t b, i, jj;
    for (b = 0; b < batch; b++)
        for (i = 0; i < m; i++) {
            float *r = c + b * c_batch_stride + i * ldc;
            if (beta == 0.0f) memset(r, 0, sizeof(float) * (size_t)n);
            else for (jj = 0; jj < n; jj++) r[jj] *= beta;
        }
}

#ifdef MGPU_USE_CBLAS
/* The same product through cblas_sgemm, one call per batch item; 0 if the sizes do not fit an int. */
static int mgpu__gemm_cblas(int64_t batch, int64_t m, int64_t n, int64_t k, float alpha, const mgpu__gemm_operand *a,
                            const mgpu__gemm_operand *b, float beta, float *c, int64_t ldc, int64_t c_batch_stride) {
    int64_t bi;
    if (m > INT_MAX || n > INT_MAX || k > INT_MAX || a->ld > INT_MAX || b->ld > INT_MAX || ldc > INT_MAX) return 0;
    for (bi = 0; bi < batch; bi++)
        cblas_sgemm(MGPU__CBLAS_ROW_MAJOR, a->trans ? MGPU__CBLAS_TRANS : MGPU__CBLAS_NO_TRANS,
                    b->trans ? MGPU__CBLAS_TRANS : MGPU__CBLAS_NO_TRANS, (int)m, (int)n, (int)k, alpha,
                    a->p + bi * a->batch_stride, (int)a->ld, b->p + bi * b->batch_stride, (int)b->ld, beta,
                    c + bi * c_batch_stride, (int)ldc);
    return 1;
}
#endif

/* Strided-batched GEMM behind every CPU product: for each batch item,
   C (M, N) = alpha * op(A) (M, K) @ op(B) (K, N) + beta * C. ctx NULL runs on the calling thread. */
static void mgpu__gemm_run(mgpu_context *ctx, int64_t batch, int64_t m, int64_t n, int64_t k, float alpha,
                           const mgpu__gemm_operand *a, const mgpu__gemm_operand *b, float beta,
                           float *c, int64_t ldc, int64_t c_batch_stride) {
    mgpu__gemm_job j;
    if (batch <= 0 || m <= 0 || n <= 0) return;
    if (k <= 0 || alpha == 0.0f) { mgpu__gemm_scale_c(batch, m, n, beta, c, ldc, c_batch_stride); return; }
#ifdef MGPU_USE_CBLAS
    if (mgpu__gemm_cblas(batch, m, n, k, alpha, a, b, beta, c, ldc, c_batch_stride)) return;
#endif
    memset(&j, 0, sizeof j);
    j.a = *a; j.b = *b; j.c = c; j.ldc = ldc; j.c_batch_stride = c_batch_stride;
    j.m = m; j.n = n; j.k = k; j.alpha = alpha; j.beta = beta;
    j.kc = mgpu__gemm_kc(k);
    mgpu__gemm_plan(&j, batch, ctx ? mgpu_context_num_threads(ctx) : 1);
    mgpu_parallel_for(ctx, batch * j.gm * j.gn, 1, mgpu__gemm_tiles, &j);
}

/* Bias epilogue, before the product: every row of C := beta * row + bias, so the product then
   accumulates onto it (beta 0 copies the bias, exactly as the product would add it). */
static void mgpu__gemm_add_bias(const mgpu__gemm_args *a, int64_t batch) {
    int64_t bi, i, jj;
    for (bi = 0; bi < batch; bi++)
        for (i = 0; i < a->m; i++) {
            float *r = a->c + bi * a->stride_c + i * a->ldc;
            if (a->beta == 0.0f) memcpy(r, a->bias, sizeof(float) * (size_t)a->n);
            else for (jj = 0; jj < a->n; jj++) r[jj] = a->beta * r[jj] + a->bias[jj];
        }
}

/* Activation epilogue, after the product: ReLU or GELU (tanh) on every row of C, as the unary ops. */
static void mgpu__gemm_activate(const mgpu__gemm_args *a, int64_t batch) {
    mgpu__unary_args u;
    int64_t bi, i;
    memset(&u, 0, sizeof u);
    u.kind = a->epilogue == MGPU__EPI_BIAS_RELU ? MGPU__UN_RELU : MGPU__UN_GELU_TANH;
    u.n = a->n;
    for (bi = 0; bi < batch; bi++)
        for (i = 0; i < a->m; i++) {
            u.out = a->c + bi * a->stride_c + i * a->ldc;
            u.x = u.out;
            mgpu__cpu_unary_forward(&u);
        }
}

/* The gemm twin on the CPU: f32 operands only (AMP on the CPU rounds its inputs, then runs in f32). */
static void mgpu__cpu_gemm(const mgpu__gemm_args *a) {
    int64_t batch = a->batch > 0 ? a->batch : 1;
    mgpu__gemm_operand oa = mgpu__gemm_a((const float *)a->a, a->trans_a != 0, a->lda);
    mgpu__gemm_operand ob = mgpu__gemm_b((const float *)a->b, a->trans_b != 0, a->ldb);
    float beta = a->beta;
    MGPU_ASSERT(a->ab_dtype == MGPU_F32);
    oa.batch_stride = a->stride_a; ob.batch_stride = a->stride_b;
    if (a->epilogue != MGPU__EPI_NONE) { mgpu__gemm_add_bias(a, batch); beta = 1.0f; }
    mgpu__gemm_run(a->ctx, batch, a->m, a->n, a->k, a->alpha, &oa, &ob, beta, a->c, a->ldc, a->stride_c);
    if (a->epilogue == MGPU__EPI_BIAS_RELU || a->epilogue == MGPU__EPI_BIAS_GELU) mgpu__gemm_activate(a, batch);
}

/* The gemm twin's arguments for one f32 product C = alpha * op(A) @ op(B) + beta * C on ctx's
   device (batch, strides and epilogue left at none). */
static mgpu__gemm_args mgpu__gemm_args_f32(mgpu_context *ctx, int trans_a, int trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                                           const float *a, int64_t lda, const float *b, int64_t ldb, float beta, float *c, int64_t ldc) {
    mgpu__gemm_args g;
    memset(&g, 0, sizeof g);
    g.ctx = ctx; g.blas = ctx ? ctx->cuda_blas : NULL;
    g.trans_a = trans_a; g.trans_b = trans_b; g.m = m; g.n = n; g.k = k;
    g.alpha = alpha; g.a = a; g.lda = lda; g.b = b; g.ldb = ldb; g.beta = beta; g.c = c; g.ldc = ldc;
    g.ab_dtype = MGPU_F32;
    return g;
}

/* The public GEMM takes host pointers by contract, so it calls the CPU twin directly. */
MGPU_API void mgpu_gemm_f32(mgpu_context *ctx, int trans_a, int trans_b, int64_t m, int64_t n, int64_t k,
                            float alpha, const float *a, int64_t lda, const float *b, int64_t ldb,
                            float beta, float *c, int64_t ldc) {
    int64_t a_cols = trans_a ? m : k, b_cols = trans_b ? k : n;
    mgpu__gemm_args g;
    if (m < 0 || n < 0 || k < 0) {
        mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_gemm_f32: m, n, k must be >= 0 (got %lld, %lld, %lld)", (long long)m, (long long)n, (long long)k);
        return;
    }
    if (m == 0 || n == 0) return;
    if (!c || (k > 0 && alpha != 0.0f && (!a || !b))) {
        mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_gemm_f32: %s is NULL", !c ? "c" : !a ? "a" : "b");
        return;
    }
    if (ldc < n || (k > 0 && (lda < MGPU__MAX(a_cols, 1) || ldb < MGPU__MAX(b_cols, 1)))) {
        mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_gemm_f32: leading dimensions too small: lda %lld (needs >= %lld), ldb %lld (needs >= %lld), ldc %lld (needs >= %lld)",
                   (long long)lda, (long long)a_cols, (long long)ldb, (long long)b_cols, (long long)ldc, (long long)n);
        return;
    }
    g = mgpu__gemm_args_f32(ctx, trans_a != 0, trans_b != 0, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    mgpu__cpu_gemm(&g);
}

/* Makes g a strided batch of `batch` products whose items lie sa, sb, sc elements apart. */
static void mgpu__gemm_set_batch(mgpu__gemm_args *g, int64_t batch, int64_t sa, int64_t sb, int64_t sc) {
    g->batch = batch; g->stride_a = sa; g->stride_b = sb; g->stride_c = sc;
}

/* Autocast (see "Mixed precision"): matmul, linear and conv2d round their inputs and output to the half
   format when ctx->autocast is set, running the f32 op in between. */

/* --------------------------------------------------------------------------------------
   matmul
   -------------------------------------------------------------------------------------- */

/* saved: iarg = {batch, M, K, N, half_compute} */
static mgpu_result mgpu__matmul_backward(mgpu_context *ctx, mgpu__node *node) {
    mgpu_tensor *a = node->in[0], *b = node->in[1];
    int64_t batch = node->iarg[0], m = node->iarg[1], k = node->iarg[2], n = node->iarg[3];
    const float *dc = (const float *)node->out->grad->data;   // (B, M, N)
    mgpu__gemm_args g;
    mgpu_result r = MGPU_OK;
    if (mgpu__needs_grad(node, 0)) {   // dA (B, M, K) += dC @ B^T
        float *da;
        MGPU__GRAD_OR_FAIL(da, ctx, a);
        g = mgpu__gemm_args_f32(ctx, 0, 1, m, k, n, 1.0f, dc, n, (const float *)b->data, n, 1.0f, da, k);
        g.half_compute = (mgpu_dtype)node->iarg[4];
        mgpu__gemm_set_batch(&g, batch, m * n, k * n, m * k);
        if ((r = MGPU__TWIN(ctx, gemm, &g)) != MGPU_OK) return r;
    }
    if (mgpu__needs_grad(node, 1)) {   // dB (B, K, N) += A^T @ dC
        float *db;
        MGPU__GRAD_OR_FAIL(db, ctx, b);
        g = mgpu__gemm_args_f32(ctx, 1, 0, k, n, m, 1.0f, (const float *)a->data, k, dc, n, 1.0f, db, n);
        g.half_compute = (mgpu_dtype)node->iarg[4];
        mgpu__gemm_set_batch(&g, batch, m * k, m * n, k * n);
        r = MGPU__TWIN(ctx, gemm, &g);
    }
    return r;
}

MGPU_API mgpu_tensor *mgpu_op_matmul(mgpu_context *ctx, mgpu_tensor *a, mgpu_tensor *b) {
    int64_t shape[3], batch, m, k, n;
    mgpu_tensor *out, *ins[2];
    mgpu__node *node = NULL;
    mgpu__gemm_args g;
    int nd;
    if (mgpu__autocast_active(ctx)) {
        int mode;
        ins[0] = a; ins[1] = b;
        if ((mode = mgpu__autocast_begin(ctx, ins, 2)) < 0) return NULL;
        return mgpu__autocast_end(ctx, mode, mgpu_op_matmul(ctx, ins[0], ins[1]));
    }
    if (!mgpu__check_input(ctx, "mgpu_op_matmul", "a", a, 1) || !mgpu__check_input(ctx, "mgpu_op_matmul", "b", b, 1)) return NULL;
    nd = a->ndim;
    if ((nd != 2 && nd != 3) || b->ndim != nd || a->shape[nd - 1] != b->shape[nd - 2] || (nd == 3 && a->shape[0] != b->shape[0]))
        MGPU__FAIL_NULL(MGPU_ERR_SHAPE, "mgpu_op_matmul: cannot multiply a %s by b %s (need (M, K) @ (K, N) or (B, M, K) @ (B, K, N))",
                        mgpu__shape_str(a), mgpu__shape_str(b));
    batch = nd == 3 ? a->shape[0] : 1;
    m = a->shape[nd - 2]; k = a->shape[nd - 1]; n = b->shape[nd - 1];
    shape[0] = batch; shape[nd - 2] = m; shape[nd - 1] = n;
    out = mgpu__new_activation(ctx, MGPU_F32, nd, shape);   // (B, M, N)
    if (!out) return NULL;
    g = mgpu__gemm_args_f32(ctx, 0, 0, m, n, k, 1.0f, (const float *)a->data, k, (const float *)b->data, n, 0.0f, (float *)out->data, n);
    g.half_compute = mgpu__autocast_gemm_dtype(ctx);
    mgpu__gemm_set_batch(&g, batch, m * k, k * n, m * n);
    if (MGPU__TWIN(ctx, gemm, &g) != MGPU_OK) return NULL;
    ins[0] = a; ins[1] = b;
    MGPU__RECORD(ctx, "matmul", mgpu__matmul_backward, out, 2, ins, node);
    if (node) { node->iarg[0] = batch; node->iarg[1] = m; node->iarg[2] = k; node->iarg[3] = n; node->iarg[4] = g.half_compute; }
    return out;
}

/* --------------------------------------------------------------------------------------
   linear: y = x @ w^T + b
   -------------------------------------------------------------------------------------- */

/* The bias gradient twin: db (cols) += column sums of dy (rows, cols), each column summing its
   rows in order (deterministic, whatever the threads). */
static void mgpu__linear_bias_grad_range(void *arg, int64_t j0, int64_t j1) {
    const mgpu__linear_bias_grad_args *a = (const mgpu__linear_bias_grad_args *)arg;
    float acc[256];
    int64_t r, jb, j;
    for (jb = j0; jb < j1; jb += 256) {   /* a strip of columns at a time keeps the loop vectorised */
        int64_t w = MGPU__MIN((int64_t)256, j1 - jb);
        for (j = 0; j < w; j++) acc[j] = 0.0f;
        for (r = 0; r < a->rows; r++) {
            const float *row = a->dy + r * a->cols + jb;
            for (j = 0; j < w; j++) acc[j] += row[j];
        }
        for (j = 0; j < w; j++) a->db[jb + j] += acc[j];
    }
}
static void mgpu__cpu_linear_bias_grad(const mgpu__linear_bias_grad_args *a) {
    mgpu_parallel_for(a->ctx, a->cols, MGPU__MAX((int64_t)16, (int64_t)32768 / MGPU__MAX(a->rows, (int64_t)1)),
                      mgpu__linear_bias_grad_range, (void *)a);
}

/* iarg = {rows, in, out, half_compute} */
static mgpu_result mgpu__linear_backward(mgpu_context *ctx, mgpu__node *node) {
    mgpu_tensor *x = node->in[0], *w = node->in[1], *b = node->n_in > 2 ? node->in[2] : NULL;
    int64_t rows = node->iarg[0], in = node->iarg[1], outf = node->iarg[2];
    const float *dy = (const float *)node->out->grad->data;   // (rows, out)
    mgpu__gemm_args g;
    mgpu_result r;
    if (mgpu__needs_grad(node, 1)) {   // dW (out, in) += dY^T @ X
        float *dw;
        MGPU__GRAD_OR_FAIL(dw, ctx, w);
        g = mgpu__gemm_args_f32(ctx, 1, 0, outf, in, rows, 1.0f, dy, outf, (const float *)x->data, in, 1.0f, dw, in);
        g.half_compute = (mgpu_dtype)node->iarg[3];
        if ((r = MGPU__TWIN(ctx, gemm, &g)) != MGPU_OK) return r;
    }
    if (b && mgpu__needs_grad(node, 2)) {   // db (out) += column sums of dY
        mgpu__linear_bias_grad_args s;
        float *db;
        MGPU__GRAD_OR_FAIL(db, ctx, b);
        s.ctx = ctx; s.dy = dy; s.db = db; s.rows = rows; s.cols = outf;
        if ((r = MGPU__TWIN(ctx, linear_bias_grad, &s)) != MGPU_OK) return r;
    }
    if (mgpu__needs_grad(node, 0)) {   // dX (rows, in) += dY @ W; skipped for a first layer
        float *dx;
        MGPU__GRAD_OR_FAIL(dx, ctx, x);
        g = mgpu__gemm_args_f32(ctx, 0, 0, rows, in, outf, 1.0f, dy, outf, (const float *)w->data, in, 1.0f, dx, in);
        g.half_compute = (mgpu_dtype)node->iarg[3];
        if ((r = MGPU__TWIN(ctx, gemm, &g)) != MGPU_OK) return r;
    }
    return MGPU_OK;
}

MGPU_API mgpu_tensor *mgpu_op_linear(mgpu_context *ctx, mgpu_tensor *x, mgpu_tensor *w, mgpu_tensor *b) {
    const char *op = "mgpu_op_linear";
    int64_t shape[MGPU_MAX_DIMS], rows, in, outf;
    int i;
    mgpu_tensor *y, *ins[3];
    mgpu__node *node = NULL;
    mgpu__gemm_args g;
    if (mgpu__autocast_active(ctx)) {   /* the bias is cast too, as under torch.autocast */
        int mode;
        ins[0] = x; ins[1] = w; ins[2] = b;
        if ((mode = mgpu__autocast_begin(ctx, ins, 3)) < 0) return NULL;
        return mgpu__autocast_end(ctx, mode, mgpu_op_linear(ctx, ins[0], ins[1], ins[2]));
    }
    if (!mgpu__check_input(ctx, op, "x", x, 1) || !mgpu__check_input(ctx, op, "w", w, 1)) return NULL;
    if (b && !mgpu__check_input(ctx, op, "b", b, 1)) return NULL;
    if (x->ndim < 1 || w->ndim != 2 || w->shape[1] != x->shape[x->ndim - 1])
        MGPU__FAIL_NULL(MGPU_ERR_SHAPE, "mgpu_op_linear: x %s does not fit w %s (need x (..., in) and w (out, in))", mgpu__shape_str(x), mgpu__shape_str(w));
    in = w->shape[1]; outf = w->shape[0];
    if (b && (b->ndim != 1 || b->shape[0] != outf))
        MGPU__FAIL_NULL(MGPU_ERR_SHAPE, "mgpu_op_linear: b %s does not fit w %s (need b (out))", mgpu__shape_str(b), mgpu__shape_str(w));
    rows = 1;
    for (i = 0; i < x->ndim - 1; i++) rows *= x->shape[i];
    memcpy(shape, x->shape, sizeof(int64_t) * (size_t)x->ndim);
    shape[x->ndim - 1] = outf;
    y = mgpu__new_activation(ctx, MGPU_F32, x->ndim, shape);   // (..., out)
    if (!y) return NULL;
    g = mgpu__gemm_args_f32(ctx, 0, 1, rows, outf, in, 1.0f, (const float *)x->data, in, (const float *)w->data, in, 0.0f,
                            (float *)y->data, outf);
    if (b) { g.epilogue = MGPU__EPI_BIAS; g.bias = (const float *)b->data; }
    g.half_compute = mgpu__autocast_gemm_dtype(ctx);
    if (MGPU__TWIN(ctx, gemm, &g) != MGPU_OK) return NULL;
    ins[0] = x; ins[1] = w; ins[2] = b;
    MGPU__RECORD(ctx, "linear", mgpu__linear_backward, y, b ? 3 : 2, ins, node);
    if (node) { node->iarg[0] = rows; node->iarg[1] = in; node->iarg[2] = outf; node->iarg[3] = g.half_compute; }
    return y;
}

/* --------------------------------------------------------------------------------------
   conv2d: im2col + GEMM, one image at a time so its column matrix is still in cache when the
   GEMM reads it (materialising a whole batch's columns makes the op memory-bound).
   From MGPU__CONV_PAR_BATCH images on, threads take whole images (im2col + a single-threaded
   GEMM each); the weight gradient is summed over fixed chunks of MGPU__CONV_CHUNK images into
   partial buffers, which are then added in chunk order, so results do not depend on the thread
   count. Smaller batches go image by image with threaded GEMMs.
   -------------------------------------------------------------------------------------- */

#define MGPU__CONV_PAR_BATCH 8
#define MGPU__CONV_CHUNK 4

/* One f32 product on the CPU, for the CPU twins built from GEMMs (conv2d, attention). */
static void mgpu__cpu_gemm_f32(mgpu_context *ctx, int trans_a, int trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                               const float *a, int64_t lda, const float *b, int64_t ldb, float beta, float *c, int64_t ldc) {
    mgpu__gemm_args g = mgpu__gemm_args_f32(ctx, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    mgpu__cpu_gemm(&g);
}

/* 1x1, stride 1, no padding: an image's column matrix is the image itself */
static int mgpu__conv_is_pointwise(const mgpu__conv_geom *g) { return g->ks == 1 && g->stride == 1 && g->pad == 0; }

/* Output positions [lo, hi) whose input index ox * stride - pad + kx lies inside [0, size). */
static void mgpu__conv_valid_range(int64_t out, int64_t size, int64_t stride, int64_t pad, int64_t kx, int64_t *lo, int64_t *hi) {
    int64_t a = pad - kx, b = size + pad - kx;   /* need a <= ox * stride < b */
    *lo = a <= 0 ? 0 : (a + stride - 1) / stride;
    *hi = b <= 0 ? 0 : MGPU__MIN(out, (b + stride - 1) / stride);
    if (*hi < *lo) *hi = *lo;
}

/* Gather (add == 0) one image (C, H, W) into its columns (C*KS*KS, OH*OW), or scatter-add
   (add == 1) columns back into the image (col2im): the same index walk both ways. */
static void mgpu__im2col_image(const mgpu__conv_geom *g, float *img, float *cols, int add) {
    int64_t c, ky, kx, oy, ox;
    for (c = 0; c < g->c; c++)
        for (ky = 0; ky < g->ks; ky++)
            for (kx = 0; kx < g->ks; kx++) {
                float *row = cols + ((c * g->ks + ky) * g->ks + kx) * g->p;
                int64_t x_lo, x_hi;
                mgpu__conv_valid_range(g->ow, g->w, g->stride, g->pad, kx, &x_lo, &x_hi);
                for (oy = 0; oy < g->oh; oy++) {
                    int64_t iy = oy * g->stride - g->pad + ky, at;
                    float *r = row + oy * g->ow;
                    if (iy < 0 || iy >= g->h) { if (!add) memset(r, 0, sizeof(float) * (size_t)g->ow); continue; }
                    at = (c * g->h + iy) * g->w - g->pad + kx;   /* input index of ox = 0, valid from x_lo on */
                    if (add && g->stride == 1) { for (ox = x_lo; ox < x_hi; ox++) img[at + ox] += r[ox]; continue; }
                    if (add) { for (ox = x_lo; ox < x_hi; ox++) img[at + ox * g->stride] += r[ox]; continue; }
                    for (ox = 0; ox < x_lo; ox++) r[ox] = 0.0f;
                    if (g->stride == 1) memcpy(r + x_lo, img + at + x_lo, sizeof(float) * (size_t)(x_hi - x_lo));
                    else for (ox = x_lo; ox < x_hi; ox++) r[ox] = img[at + ox * g->stride];
                    for (ox = x_hi; ox < g->ow; ox++) r[ox] = 0.0f;
                }
            }
}

/* One run of a conv2d CPU twin; the per-image steps below read what they need. */
typedef struct mgpu__conv_job {
    const mgpu__conv2d_args *a;
    mgpu_context *gemm_ctx;   /* threads for the GEMMs: the context, or NULL inside a per-image task */
    float *dw;                /* dw target (O, CKK): a chunk's partial sum or the grad itself, or NULL */
    int failed;               /* a thread found no memory for its column buffers */
} mgpu__conv_job;

/* Image i's column matrix: the image itself when pointwise, else im2col into this thread's scratch
   (NULL when out of memory). */
static const float *mgpu__conv_columns(const mgpu__conv_job *j, int64_t i) {
    const mgpu__conv_geom *g = j->a->g;
    float *img = (float *)(j->a->x + i * g->c * g->h * g->w), *cols;   /* the gather only reads the image */
    if (mgpu__conv_is_pointwise(g)) return img;
    cols = mgpu__scratch(MGPU__SCRATCH_COLS, (size_t)(g->ckk * g->p));
    if (cols) mgpu__im2col_image(g, img, cols, 0);
    return cols;
}

/* y_i (O, P) = W (O, CKK) @ cols_i (CKK, P) + b; 0 when out of memory */
static int mgpu__conv_forward_image(const mgpu__conv_job *j, int64_t i) {
    const mgpu__conv2d_args *a = j->a;
    const mgpu__conv_geom *g = a->g;
    float *y = a->y + i * g->o * g->p;
    const float *cols = mgpu__conv_columns(j, i);
    int64_t o, q;
    if (!cols) return 0;
    if (a->b)
        for (o = 0; o < g->o; o++)
            for (q = 0; q < g->p; q++) y[o * g->p + q] = a->b[o];
    mgpu__cpu_gemm_f32(j->gemm_ctx, 0, 0, g->o, g->p, g->ckk, 1.0f, a->w, g->ckk, cols, g->p, a->b ? 1.0f : 0.0f, y, g->p);
    return 1;
}

/* dW (O, CKK) = dw_beta * dW + dY_i (O, P) @ cols_i^T, then dX_i += col2im(W^T @ dY_i); 0 when out of memory */
static int mgpu__conv_backward_image(const mgpu__conv_job *j, int64_t i, float dw_beta) {
    const mgpu__conv2d_args *a = j->a;
    const mgpu__conv_geom *g = a->g;
    const float *dy = a->dy + i * g->o * g->p;
    if (j->dw) {
        const float *cols = mgpu__conv_columns(j, i);
        if (!cols) return 0;
        mgpu__cpu_gemm_f32(j->gemm_ctx, 0, 1, g->o, g->ckk, g->p, 1.0f, dy, g->p, cols, g->p, dw_beta, j->dw, g->ckk);
    }
    if (a->dx) {
        float *dxi = a->dx + i * g->c * g->h * g->w, *dcols = dxi;
        int pointwise = mgpu__conv_is_pointwise(g);
        if (!pointwise && !(dcols = mgpu__scratch(MGPU__SCRATCH_DCOLS, (size_t)(g->ckk * g->p)))) return 0;
        /* pointwise: dX_i is dcols, so accumulate straight into it */
        mgpu__cpu_gemm_f32(j->gemm_ctx, 1, 0, g->ckk, g->p, g->o, 1.0f, a->w, g->ckk, dy, g->p, pointwise ? 1.0f : 0.0f, dcols, g->p);
        if (!pointwise) mgpu__im2col_image(g, dxi, dcols, 1);
    }
    return 1;
}

static void mgpu__conv_forward_range(void *arg, int64_t i0, int64_t i1) {
    mgpu__conv_job *j = (mgpu__conv_job *)arg;
    int64_t i;
    for (i = i0; i < i1; i++)
        if (!mgpu__conv_forward_image(j, i)) __atomic_store_n(&j->failed, 1, __ATOMIC_RELAXED);
}

/* Chunk c: images [c * CHUNK, ...) into the chunk's own dW partial (j->dw + c * O * CKK). */
static void mgpu__conv_backward_range(void *arg, int64_t c0, int64_t c1) {
    mgpu__conv_job *j = (mgpu__conv_job *)arg;
    mgpu__conv_job jc = *j;
    const mgpu__conv_geom *g = j->a->g;
    int64_t c, i;
    for (c = c0; c < c1; c++) {
        jc.dw = j->dw ? j->dw + c * g->o * g->ckk : NULL;
        for (i = c * MGPU__CONV_CHUNK; i < MGPU__MIN(g->n, (c + 1) * MGPU__CONV_CHUNK); i++)
            if (!mgpu__conv_backward_image(&jc, i, i == c * MGPU__CONV_CHUNK ? 0.0f : 1.0f)) __atomic_store_n(&j->failed, 1, __ATOMIC_RELAXED);
    }
}

/* dw[e] += sum over chunks of part[c][e], chunks in order */
typedef struct { const float *part; float *dw; int64_t chunks, size; } mgpu__partsum_arg;
static void mgpu__partsum_range(void *arg, int64_t e0, int64_t e1) {
    mgpu__partsum_arg *s = (mgpu__partsum_arg *)arg;
    int64_t c, e;
    for (c = 0; c < s->chunks; c++)
        for (e = e0; e < e1; e++) s->dw[e] += s->part[c * s->size + e];
}

/* db[o] += sum of dY (N, O, P) over images and positions: strips of positions are summed across
   images as vectors, then the strip totals in order (deterministic, and it vectorises). */
static void mgpu__chansum_range(void *arg, int64_t o0, int64_t o1) {
    const mgpu__conv2d_args *a = (const mgpu__conv2d_args *)arg;
    const mgpu__conv_geom *g = a->g;
    float strip[256];
    int64_t o, i, q0, q;
    for (o = o0; o < o1; o++) {
        float total = 0.0f;
        for (q0 = 0; q0 < g->p; q0 += 256) {
            int64_t w = MGPU__MIN((int64_t)256, g->p - q0);
            for (q = 0; q < w; q++) strip[q] = 0.0f;
            for (i = 0; i < g->n; i++) {
                const float *r = a->dy + (i * g->o + o) * g->p + q0;
                for (q = 0; q < w; q++) strip[q] += r[q];
            }
            for (q = 0; q < w; q++) total += strip[q];
        }
        a->db[o] += total;
    }
}

static mgpu_result mgpu__conv_oom(const mgpu__conv_geom *g) {
    return mgpu__fail(MGPU_ERR_OOM_HOST, "mgpu_op_conv2d: out of host memory for the im2col buffers (%lld x %lld floats per image)",
                      (long long)g->ckk, (long long)g->p);
}

/* The conv2d twins on the CPU. Small batches go image by image with threaded GEMMs; larger ones
   give whole images to threads (see above). */
static void mgpu__cpu_conv2d_forward(const mgpu__conv2d_args *a) {
    mgpu__conv_job j;
    int64_t i;
    memset(&j, 0, sizeof j);
    j.a = a;
    if (a->g->n >= MGPU__CONV_PAR_BATCH) {
        mgpu_parallel_for(a->ctx, a->g->n, 1, mgpu__conv_forward_range, &j);
    } else {
        j.gemm_ctx = a->ctx;
        for (i = 0; i < a->g->n && !j.failed; i++) j.failed = !mgpu__conv_forward_image(&j, i);
    }
    if (j.failed) *a->status = mgpu__conv_oom(a->g);
}

/* dW through per-chunk partials added in chunk order; 0 when out of memory */
static mgpu_result mgpu__conv_backward_batch(mgpu__conv_job *j) {
    const mgpu__conv2d_args *a = j->a;
    const mgpu__conv_geom *g = a->g;
    int64_t chunks = (g->n + MGPU__CONV_CHUNK - 1) / MGPU__CONV_CHUNK;
    mgpu__partsum_arg ps;
    if (a->dw && !(j->dw = (float *)mgpu__arena_alloc(a->ctx, sizeof(float) * (size_t)(chunks * g->o * g->ckk)))) return MGPU_ERR_OOM_HOST;
    mgpu_parallel_for(a->ctx, chunks, 1, mgpu__conv_backward_range, j);
    if (j->failed) return mgpu__conv_oom(g);
    ps.part = j->dw; ps.dw = a->dw; ps.chunks = chunks; ps.size = g->o * g->ckk;
    if (a->dw) mgpu_parallel_for(a->ctx, ps.size, 4096, mgpu__partsum_range, &ps);
    return MGPU_OK;
}

static void mgpu__cpu_conv2d_backward(const mgpu__conv2d_args *a) {
    const mgpu__conv_geom *g = a->g;
    mgpu__conv_job j;
    int64_t i;
    memset(&j, 0, sizeof j);
    j.a = a;
    if (g->n >= MGPU__CONV_PAR_BATCH) {
        if ((*a->status = mgpu__conv_backward_batch(&j)) != MGPU_OK) return;
    } else {
        j.gemm_ctx = a->ctx; j.dw = a->dw;
        for (i = 0; i < g->n; i++)
            if (!mgpu__conv_backward_image(&j, i, 1.0f)) { *a->status = mgpu__conv_oom(g); return; }
    }
    if (a->db)   /* db (O) += sum over images and positions of dY */
        mgpu_parallel_for(a->ctx, g->o, MGPU__MAX((int64_t)1, (int64_t)32768 / MGPU__MAX(g->n * g->p, (int64_t)1)), mgpu__chansum_range,
                          (void *)a);
}

/* node: in = {x, w, b}, extra = geometry */
static mgpu_result mgpu__conv2d_backward(mgpu_context *ctx, mgpu__node *node) {
    mgpu_tensor *x = node->in[0], *w = node->in[1], *b = node->in[2];
    mgpu__conv2d_args a;
    mgpu_result r, status = MGPU_OK;
    memset(&a, 0, sizeof a);
    a.ctx = ctx; a.status = &status; a.blas = ctx->cuda_blas;
    a.g = (const mgpu__conv_geom *)node->extra;
    a.half_compute = (mgpu_dtype)node->iarg[0];
    a.x = (const float *)x->data; a.w = (const float *)w->data; a.dy = (const float *)node->out->grad->data;
    if (mgpu__needs_grad(node, 0)) MGPU__GRAD_OR_FAIL(a.dx, ctx, x);
    if (mgpu__needs_grad(node, 1)) MGPU__GRAD_OR_FAIL(a.dw, ctx, w);
    if (b && mgpu__needs_grad(node, 2)) MGPU__GRAD_OR_FAIL(a.db, ctx, b);
    r = MGPU__TWIN(ctx, conv2d_backward, &a);
    return r != MGPU_OK ? r : status;
}

/* Validates conv2d's arguments and fills the geometry; 1 if fine. */
static int mgpu__conv_setup(mgpu_context *ctx, mgpu_tensor *x, mgpu_tensor *w, mgpu_tensor *b, int stride, int padding, mgpu__conv_geom *g) {
    const char *op = "mgpu_op_conv2d";
    if (!mgpu__check_input(ctx, op, "x", x, 1) || !mgpu__check_input(ctx, op, "w", w, 1)) return 0;
    if (b && !mgpu__check_input(ctx, op, "b", b, 1)) return 0;
    if (x->ndim != 4 || w->ndim != 4 || w->shape[1] != x->shape[1]) {
        mgpu__fail(MGPU_ERR_SHAPE, "mgpu_op_conv2d: x %s and w %s do not fit (need x (N, C, H, W) and w (O, C, KH, KW) with the same C)",
                   mgpu__shape_str(x), mgpu__shape_str(w));
        return 0;
    }
    if (w->shape[2] != w->shape[3] || w->shape[2] < 1) {
        mgpu__fail(MGPU_ERR_UNSUPPORTED, "mgpu_op_conv2d: w %s: only square kernels (KH == KW >= 1) are supported", mgpu__shape_str(w));
        return 0;
    }
    if (b && (b->ndim != 1 || b->shape[0] != w->shape[0])) {
        mgpu__fail(MGPU_ERR_SHAPE, "mgpu_op_conv2d: b %s does not fit w %s (need b (O))", mgpu__shape_str(b), mgpu__shape_str(w));
        return 0;
    }
    if (stride < 1 || padding < 0) {
        mgpu__fail(MGPU_ERR_INVALID_ARG, "mgpu_op_conv2d: stride %d must be >= 1 and padding %d >= 0", stride, padding);
        return 0;
    }
    memset(g, 0, sizeof *g);
    g->n = x->shape[0]; g->c = x->shape[1]; g->h = x->shape[2]; g->w = x->shape[3];
    g->o = w->shape[0]; g->ks = w->shape[2]; g->stride = stride; g->pad = padding;
    if (g->h + 2 * g->pad < g->ks || g->w + 2 * g->pad < g->ks) {
        mgpu__fail(MGPU_ERR_SHAPE, "mgpu_op_conv2d: x %s with padding %d is smaller than the kernel of w %s", mgpu__shape_str(x), padding, mgpu__shape_str(w));
        return 0;
    }
    g->oh = (g->h + 2 * g->pad - g->ks) / g->stride + 1;
    g->ow = (g->w + 2 * g->pad - g->ks) / g->stride + 1;
    g->p = g->oh * g->ow; g->ckk = g->c * g->ks * g->ks;
    return 1;
}

MGPU_API mgpu_tensor *mgpu_op_conv2d(mgpu_context *ctx, mgpu_tensor *x, mgpu_tensor *w, mgpu_tensor *b, int stride, int padding) {
    mgpu__conv_geom g, *gsaved;
    mgpu__conv2d_args a;
    mgpu_result status = MGPU_OK;
    int64_t shape[4];
    mgpu_tensor *y, *ins[3];
    mgpu__node *node = NULL;
    if (mgpu__autocast_active(ctx)) {
        int mode;
        ins[0] = x; ins[1] = w; ins[2] = b;
        if ((mode = mgpu__autocast_begin(ctx, ins, 3)) < 0) return NULL;
        return mgpu__autocast_end(ctx, mode, mgpu_op_conv2d(ctx, ins[0], ins[1], ins[2], stride, padding));
    }
    if (!mgpu__conv_setup(ctx, x, w, b, stride, padding, &g)) return NULL;
    shape[0] = g.n; shape[1] = g.o; shape[2] = g.oh; shape[3] = g.ow;
    y = mgpu__new_activation(ctx, MGPU_F32, 4, shape);   // (N, O, OH, OW)
    if (!y) return NULL;
    memset(&a, 0, sizeof a);
    a.ctx = ctx; a.status = &status; a.blas = ctx->cuda_blas; a.g = &g;
    a.x = (const float *)x->data; a.w = (const float *)w->data; a.b = b ? (const float *)b->data : NULL; a.y = (float *)y->data;
    a.half_compute = mgpu__autocast_gemm_dtype(ctx);
    if (MGPU__TWIN(ctx, conv2d_forward, &a) != MGPU_OK || status != MGPU_OK) return NULL;
    ins[0] = x; ins[1] = w; ins[2] = b;
    MGPU__RECORD(ctx, "conv2d", mgpu__conv2d_backward, y, 3, ins, node);
    if (node) {
        if (!(gsaved = (mgpu__conv_geom *)mgpu__arena_alloc(ctx, sizeof *gsaved))) return NULL;
        *gsaved = g;
        node->extra = gsaved;
        node->iarg[0] = a.half_compute;
    }
    return y;
}

/* --------------------------------------------------------------------------------------
   Pooling over (N, C, H, W) planes, PyTorch's output size floor((H + 2p - k) / s) + 1
   -------------------------------------------------------------------------------------- */

/* Validates kernel/stride/padding for a pooling op and fills the geometry (stride 0 -> kernel;
   o, p and ckk stay 0: they are conv2d's). */
static int mgpu__pool_setup(mgpu_context *ctx, const char *op, mgpu_tensor *x, int kernel, int stride, int padding, mgpu__conv_geom *g) {
    if (!mgpu__check_input(ctx, op, "x", x, 1)) return 0;
    if (x->ndim != 4) { mgpu__fail(MGPU_ERR_SHAPE, "%s: x must be (N, C, H, W), got %s", op, mgpu__shape_str(x)); return 0; }
    if (kernel < 1 || stride < 0 || padding < 0) {
        mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: kernel %d must be >= 1, stride %d and padding %d >= 0", op, kernel, stride, padding);
        return 0;
    }
    if (padding > kernel / 2) {
        mgpu__fail(MGPU_ERR_INVALID_ARG, "%s: padding %d must be at most half the kernel size %d", op, padding, kernel);
        return 0;
    }
    memset(g, 0, sizeof *g);
    g->n = x->shape[0]; g->c = x->shape[1]; g->h = x->shape[2]; g->w = x->shape[3];
    g->ks = kernel; g->stride = stride ? stride : kernel; g->pad = padding;
    if (g->h + 2 * g->pad < g->ks || g->w + 2 * g->pad < g->ks) {
        mgpu__fail(MGPU_ERR_SHAPE, "%s: x %s with padding %d is smaller than the kernel %d", op, mgpu__shape_str(x), padding, kernel);
        return 0;
    }
    g->oh = (g->h + 2 * g->pad - g->ks) / g->stride + 1;
    g->ow = (g->w + 2 * g->pad - g->ks) / g->stride + 1;
    return 1;
}

/* Window of output (oy, ox) clipped to the image: rows [y0, y1), columns [x0, x1). */
static void mgpu__pool_window(const mgpu__conv_geom *g, int64_t oy, int64_t ox, int64_t *y0, int64_t *y1, int64_t *x0, int64_t *x1) {
    int64_t ys = oy * g->stride - g->pad, xs = ox * g->stride - g->pad;
    *y0 = MGPU__MAX(ys, (int64_t)0); *y1 = MGPU__MIN(ys + g->ks, g->h);
    *x0 = MGPU__MAX(xs, (int64_t)0); *x1 = MGPU__MIN(xs + g->ks, g->w);
}

static void mgpu__pool_forward_range(void *arg, int64_t p0, int64_t p1) {
    const mgpu__pool2d_args *s = (const mgpu__pool2d_args *)arg;
    const mgpu__conv_geom *g = s->g;
    float inv = 1.0f / (float)(g->ks * g->ks);   /* count_include_pad: the window is always k * k */
    int64_t pl, oy, ox, yy, xx, y0, y1, x0, x1;
    for (pl = p0; pl < p1; pl++) {
        const float *xp = s->x + pl * g->h * g->w;
        float *yp = s->y + pl * g->oh * g->ow;
        int32_t *ip = s->argmax ? s->argmax + pl * g->oh * g->ow : NULL;
        for (oy = 0; oy < g->oh; oy++)
            for (ox = 0; ox < g->ow; ox++) {
                float acc = s->is_max ? -INFINITY : 0.0f;
                int64_t best;
                mgpu__pool_window(g, oy, ox, &y0, &y1, &x0, &x1);
                /* a window wholly in the padding (only possible with padding >= kernel, which the op
                   refuses) has no input: -inf, argmax -1 and no gradient */
                best = y0 < y1 && x0 < x1 ? y0 * g->w + x0 : -1;
                for (yy = y0; yy < y1; yy++)
                    for (xx = x0; xx < x1; xx++) {
                        float v = xp[yy * g->w + xx];
                        if (!s->is_max) acc += v;
                        else if (v > acc || v != v) { acc = v; best = yy * g->w + xx; }   /* the last NaN wins, as in PyTorch */
                    }
                yp[oy * g->ow + ox] = s->is_max ? acc : acc * inv;
                if (ip) ip[oy * g->ow + ox] = (int32_t)best;
            }
    }
}

static void mgpu__pool_backward_range(void *arg, int64_t p0, int64_t p1) {
    const mgpu__pool2d_args *s = (const mgpu__pool2d_args *)arg;
    const mgpu__conv_geom *g = s->g;
    float inv = 1.0f / (float)(g->ks * g->ks);
    int64_t pl, q, oy, ox, yy, xx, y0, y1, x0, x1;
    for (pl = p0; pl < p1; pl++) {
        const float *dyp = s->dy + pl * g->oh * g->ow;
        float *dxp = s->dx + pl * g->h * g->w;
        if (s->is_max) {
            const int32_t *ip = s->argmax + pl * g->oh * g->ow;
            for (q = 0; q < g->oh * g->ow; q++) if (ip[q] >= 0) dxp[ip[q]] += dyp[q];
            continue;
        }
        for (oy = 0; oy < g->oh; oy++)
            for (ox = 0; ox < g->ow; ox++) {
                float d = dyp[oy * g->ow + ox] * inv;
                mgpu__pool_window(g, oy, ox, &y0, &y1, &x0, &x1);
                for (yy = y0; yy < y1; yy++)
                    for (xx = x0; xx < x1; xx++) dxp[yy * g->w + xx] += d;
            }
    }
}

/* The pooling twins on the CPU: planes (one (H, W) image of one channel) split across threads. */
static int64_t mgpu__pool_min_chunk(const mgpu__conv_geom *g) {
    return MGPU__MAX((int64_t)1, (int64_t)32768 / MGPU__MAX(g->h * g->w, (int64_t)1));
}
static void mgpu__cpu_pool2d_forward(const mgpu__pool2d_args *a) {
    mgpu_parallel_for(a->ctx, a->g->n * a->g->c, mgpu__pool_min_chunk(a->g), mgpu__pool_forward_range, (void *)a);
}
static void mgpu__cpu_pool2d_backward(const mgpu__pool2d_args *a) {
    mgpu_parallel_for(a->ctx, a->g->n * a->g->c, mgpu__pool_min_chunk(a->g), mgpu__pool_backward_range, (void *)a);
}

/* node: extra = geometry; saved[0] = argmax per output (I32 index into the plane), max pooling only */
static mgpu_result mgpu__pool_backward(mgpu_context *ctx, mgpu__node *node) {
    mgpu__pool2d_args a;
    memset(&a, 0, sizeof a);
    MGPU__GRAD_OR_FAIL(a.dx, ctx, node->in[0]);
    a.ctx = ctx;
    a.g = (const mgpu__conv_geom *)node->extra;
    a.dy = (const float *)node->out->grad->data;
    a.is_max = node->saved[0] != NULL;
    a.argmax = a.is_max ? (int32_t *)node->saved[0]->data : NULL;
    return MGPU__TWIN(ctx, pool2d_backward, &a);
}

static mgpu_tensor *mgpu__pool2d(mgpu_context *ctx, const char *op, mgpu_tensor *x, int kernel, int stride, int padding, int is_max) {
    mgpu__conv_geom g, *gs;
    mgpu__pool2d_args a;
    mgpu_tensor *y, *idx = NULL;
    mgpu__node *node = NULL;
    int64_t shape[4];
    if (!mgpu__pool_setup(ctx, op, x, kernel, stride, padding, &g)) return NULL;
    shape[0] = x->shape[0]; shape[1] = x->shape[1]; shape[2] = g.oh; shape[3] = g.ow;
    y = mgpu__new_activation(ctx, MGPU_F32, 4, shape);   // (N, C, OH, OW)
    if (!y) return NULL;
    MGPU__RECORD(ctx, is_max ? "max_pool2d" : "avg_pool2d", mgpu__pool_backward, y, 1, &x, node);
    if (node && is_max && !(idx = mgpu__new_activation(ctx, MGPU_I32, 4, shape))) return NULL;
    memset(&a, 0, sizeof a);
    a.ctx = ctx; a.g = &g; a.is_max = is_max;
    a.x = (const float *)x->data; a.y = (float *)y->data; a.argmax = idx ? (int32_t *)idx->data : NULL;
    if (MGPU__TWIN(ctx, pool2d_forward, &a) != MGPU_OK) return NULL;
    if (node) {
        if (!(gs = (mgpu__conv_geom *)mgpu__arena_alloc(ctx, sizeof *gs))) return NULL;
        *gs = g;
        node->extra = gs;
        node->saved[0] = idx;
    }
    return y;
}

MGPU_API mgpu_tensor *mgpu_op_max_pool2d(mgpu_context *ctx, mgpu_tensor *x, int kernel, int stride, int padding) {
    return mgpu__pool2d(ctx, "mgpu_op_max_pool2d", x, kernel, stride, padding, 1);
}
MGPU_API mgpu_tensor *mgpu_op_avg_pool2d(mgpu_context *ctx, mgpu_tensor *x, int kernel, int stride, int padding) {
    return mgpu__pool2d(ctx, "mgpu_op_avg_pool2d", x, kernel, stride, padding, 0);
}
