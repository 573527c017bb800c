/* mgpu.h part: ops_nn (inlined into mgpu.h before release)
   The CPU GEMM and the ops built on it: matmul, linear, conv2d (im2col + GEMM), max/avg pooling. */

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
#define MGPU__KC 256
#define MGPU__MC 144
#define MGPU__NC 2048
/* below this many multiply-adds a GEMM runs on the calling thread: waking workers costs more */
#define MGPU__GEMM_SERIAL_MACS ((int64_t)1 << 20)

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define MGPU__GEMM_AVX2 1
#endif

#ifdef MGPU_USE_CBLAS
#include <limits.h>
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
   column of op(B), lives at p + r * rs + k * ks. K may be split into segments of kseg elements
   lying kseg_stride apart (conv2d's weight gradient sums over images this way); kseg 0 means
   one segment. Batched GEMMs step p by batch_stride. */
typedef struct mgpu__gemm_operand {
    const float *p;
    int64_t rs, ks;
    int64_t kseg, kseg_stride;
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
#else
/* Portable version: the j loop vectorises; fmaf keeps the rounding of the AVX2 path. */
static void mgpu__gemm_kernel_full(int64_t kc, const float *ap, const float *bp, float *c, int64_t ldc, float alpha, float beta) {
    float acc[MGPU__MR * MGPU__NR];
    int64_t k;
    int i, j;
    memset(acc, 0, sizeof acc);
    for (k = 0; k < kc; k++) {
        for (i = 0; i < MGPU__MR; i++) {
            float a = ap[i];
            for (j = 0; j < MGPU__NR; j++) acc[i * MGPU__NR + j] = fmaf(a, bp[j], acc[i * MGPU__NR + j]);
        }
        ap += MGPU__MR; bp += MGPU__NR;
    }
    for (i = 0; i < MGPU__MR; i++) {
        float *r = c + i * ldc;
        for (j = 0; j < MGPU__NR; j++) {
            float x = alpha * acc[i * MGPU__NR + j];
            r[j] = beta != 0.0f ? fmaf(beta, r[j], x) : x;
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

/* Pack rows [0, rows) x k [0, kc) of a run that lies inside one K segment into dst (kc, w),
   zero-padding rows up to w. */
static void mgpu__pack_run(float *dst, int w, int rows, int64_t kc, const float *src, int64_t rs, int64_t ks) {
    int64_t k, k0 = 0;
    int r;
#if defined(MGPU__GEMM_AVX2)
    if (ks == 1 && rows == w && rs != 1) k0 = mgpu__pack_rows_avx2(dst, w, kc, src, rs);
#endif
    if (rs == 1) {   /* rows contiguous: one copy per k */
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
    int64_t q, done;
    for (q = 0; q * w < rows; q++) {
        int pr = (int)MGPU__MIN((int64_t)w, rows - q * w);
        float *d = dst + q * kc * w;
        const float *rowp = base + (r0 + q * w) * op->rs;
        for (done = 0; done < kc;) {   /* split the K range at segment boundaries */
            int64_t k = k0 + done, run = kc - done;
            const float *s = rowp + k * op->ks;
            if (op->kseg > 0) {
                int64_t seg = k / op->kseg, off = k - seg * op->kseg;
                run = MGPU__MIN(run, op->kseg - off);
                s = rowp + seg * op->kseg_stride + off * op->ks;
            }
            mgpu__pack_run(d + done * w, w, pr, run, s, op->rs, op->ks);
            done += run;
        }
    }
}

/* Packing buffers: one per thread, grown on demand and kept, so steady-state GEMMs allocate
   nothing. A pthread key frees a worker's buffer when the thread exits. The buffer starts with
   a 64-byte header holding its capacity in floats. */
static pthread_key_t mgpu__gemm_key;
static pthread_once_t mgpu__gemm_key_once = PTHREAD_ONCE_INIT;
static int mgpu__gemm_key_ok = 0;
static void mgpu__gemm_buffer_free(void *p) { mgpu_free(p); }
static void mgpu__gemm_key_init(void) { mgpu__gemm_key_ok = pthread_key_create(&mgpu__gemm_key, mgpu__gemm_buffer_free) == 0; }

static float *mgpu__gemm_buffer(size_t floats) {
    size_t *hdr;
    pthread_once(&mgpu__gemm_key_once, mgpu__gemm_key_init);
    if (!mgpu__gemm_key_ok) return NULL;
    hdr = (size_t *)pthread_getspecific(mgpu__gemm_key);
    if (!hdr || hdr[0] < floats) {
        size_t want = floats + floats / 4;   /* headroom so slowly growing shapes do not reallocate each call */
        mgpu_free(hdr);
        pthread_setspecific(mgpu__gemm_key, NULL);
        hdr = (size_t *)mgpu_malloc(64 + want * sizeof(float));
        if (!hdr) return NULL;
        hdr[0] = want;
        pthread_setspecific(mgpu__gemm_key, hdr);
    }
    return (float *)((char *)hdr + 64);
}

typedef struct mgpu__gemm_job {
    mgpu__gemm_operand a, b;
    float *c; int64_t ldc, c_batch_stride;
    int64_t m, n, k;
    float alpha, beta;
    int64_t gm, gn, mt, nt;   /* C is cut into gm x gn tiles of mt rows and nt columns per batch item */
    int64_t kc;               /* K block: K split evenly into blocks of at most KC (no thin last block) */
    int failed;
} mgpu__gemm_job;

/* One tile of C: the full K loop, packing B once per KC block and A once per MC x KC block. */
static void mgpu__gemm_tile(mgpu__gemm_job *j, int64_t task) {
    int64_t per_batch = j->gm * j->gn, bi = task / per_batch, t = task % per_batch;
    int64_t m0 = (t / j->gn) * j->mt, n0 = (t % j->gn) * j->nt;
    int64_t m1 = MGPU__MIN(j->m, m0 + j->mt), n1 = MGPU__MIN(j->n, n0 + j->nt);
    int64_t nw = n1 - n0, pc, ic, jp, ip;
    size_t bfloats = (size_t)(((nw + MGPU__NR - 1) / MGPU__NR) * MGPU__NR * MGPU__KC);
    float *bp = mgpu__gemm_buffer(bfloats + (size_t)MGPU__MC * MGPU__KC), *ap;
    const float *abase = j->a.p + bi * j->a.batch_stride, *bbase = j->b.p + bi * j->b.batch_stride;
    float *cbase = j->c + bi * j->c_batch_stride;
    if (!bp) { __atomic_store_n(&j->failed, 1, __ATOMIC_RELAXED); return; }
    ap = bp + bfloats;
    for (pc = 0; pc < j->k; pc += j->kc) {
        int64_t kc = MGPU__MIN(j->kc, j->k - pc);
        float beta = pc == 0 ? j->beta : 1.0f;   /* later K blocks accumulate */
        mgpu__pack(bp, MGPU__NR, &j->b, bbase, n0, nw, pc, kc);
        for (ic = m0; ic < m1; ic += MGPU__MC) {
            int64_t mc = MGPU__MIN((int64_t)MGPU__MC, m1 - ic);
            mgpu__pack(ap, MGPU__MR, &j->a, abase, ic, mc, pc, kc);
            for (jp = 0; jp * MGPU__NR < nw; jp++) {
                int nr = (int)MGPU__MIN((int64_t)MGPU__NR, nw - jp * MGPU__NR);
                for (ip = 0; ip * MGPU__MR < mc; ip++) {
                    int mr = (int)MGPU__MIN((int64_t)MGPU__MR, mc - ip * MGPU__MR);
                    mgpu__gemm_kernel(kc, ap + ip * kc * MGPU__MR, bp + jp * kc * MGPU__NR,
                                      cbase + (ic + ip * MGPU__MR) * j->ldc + n0 + jp * MGPU__NR, j->ldc, mr, nr, j->alpha, beta);
                }
            }
        }
    }
}

static void mgpu__gemm_tiles(void *arg, int64_t begin, int64_t end) {
    int64_t t;
    for (t = begin; t < end; t++) mgpu__gemm_tile((mgpu__gemm_job *)arg, t);
}

static int64_t mgpu__round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

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
        for (gn = gn_min; gn <= MGPU__MAX(gn_min, gn_max); gn++) {
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
/* The same product through cblas_sgemm, one call per batch item and K segment. */
static int mgpu__gemm_cblas(int64_t batch, int64_t m, int64_t n, int64_t k, float alpha, const mgpu__gemm_operand *a,
                            const mgpu__gemm_operand *b, float beta, float *c, int64_t ldc, int64_t c_batch_stride) {
    int64_t bi, s, seg = k;
    if (a->kseg != b->kseg) return 0;
    if (a->kseg > 0) seg = a->kseg;
    if (m > INT_MAX || n > INT_MAX || seg > INT_MAX || a->ld > INT_MAX || b->ld > INT_MAX || ldc > INT_MAX) return 0;
    for (bi = 0; bi < batch; bi++)
        for (s = 0; s * seg < k; s++) {
            int64_t ks = MGPU__MIN(seg, k - s * seg);
            const float *ap = a->p + bi * a->batch_stride + s * a->kseg_stride;
            const float *bp = b->p + bi * b->batch_stride + s * b->kseg_stride;
            cblas_sgemm(MGPU__CBLAS_ROW_MAJOR, a->trans ? MGPU__CBLAS_TRANS : MGPU__CBLAS_NO_TRANS,
                        b->trans ? MGPU__CBLAS_TRANS : MGPU__CBLAS_NO_TRANS, (int)m, (int)n, (int)ks, alpha,
                        ap, (int)(a->ld > 0 ? a->ld : 1), bp, (int)(b->ld > 0 ? b->ld : 1), s == 0 ? beta : 1.0f,
                        c + bi * c_batch_stride, (int)ldc);
        }
    return 1;
}
#endif

/* Strided-batched GEMM behind every product in the library: for each batch item,
   C (M, N) = alpha * op(A) (M, K) @ op(B) (K, N) + beta * C. ctx NULL runs on the calling thread. */
static mgpu_result mgpu__gemm(mgpu_context *ctx, int64_t batch, int64_t m, int64_t n, int64_t k, float alpha,
                              const mgpu__gemm_operand *a, const mgpu__gemm_operand *b, float beta,
                              float *c, int64_t ldc, int64_t c_batch_stride) {
    mgpu__gemm_job j;
    if (batch <= 0 || m <= 0 || n <= 0) return MGPU_OK;
    if (k <= 0 || alpha == 0.0f) { mgpu__gemm_scale_c(batch, m, n, beta, c, ldc, c_batch_stride); return MGPU_OK; }
#ifdef MGPU_USE_CBLAS
    if (mgpu__gemm_cblas(batch, m, n, k, alpha, a, b, beta, c, ldc, c_batch_stride)) return MGPU_OK;
#endif
    memset(&j, 0, sizeof j);
    j.a = *a; j.b = *b; j.c = c; j.ldc = ldc; j.c_batch_stride = c_batch_stride;
    j.m = m; j.n = n; j.k = k; j.alpha = alpha; j.beta = beta;
    j.kc = mgpu__round_up((k + (k + MGPU__KC - 1) / MGPU__KC - 1) / ((k + MGPU__KC - 1) / MGPU__KC), 8);
    if (j.kc > MGPU__KC) j.kc = MGPU__KC;
    mgpu__gemm_plan(&j, batch, ctx ? mgpu_context_num_threads(ctx) : 1);
    mgpu_parallel_for(ctx, batch * j.gm * j.gn, 1, mgpu__gemm_tiles, &j);
    if (j.failed) return mgpu__fail(MGPU_ERR_OOM_HOST, "mgpu_gemm_f32: out of host memory for the packing buffers (%lld x %lld x %lld)",
                                    (long long)m, (long long)n, (long long)k);
    return MGPU_OK;
}

MGPU_API void mgpu_gemm_f32(mgpu_context *ctx, int trans_a, int trans_b, int64_t m, int64_t n, int64_t k,
                            float alpha, const float *a, int64_t lda, const float *b, int64_t ldb,
                            float beta, float *c, int64_t ldc) {
    int64_t a_cols = trans_a ? m : k, b_cols = trans_b ? k : n;
    mgpu__gemm_operand oa, ob;
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
    oa = mgpu__gemm_a(a, trans_a != 0, lda);
    ob = mgpu__gemm_b(b, trans_b != 0, ldb);
    mgpu__gemm(ctx, 1, m, n, k, alpha, &oa, &ob, beta, c, ldc, 0);
}

/* --------------------------------------------------------------------------------------
   Shared helpers for the ops below
   -------------------------------------------------------------------------------------- */

/* Column sums of g (rows, cols) added into out (cols); each column sums rows in order. */
typedef struct { const float *g; float *out; int64_t rows, cols; } mgpu__colsum_arg;
static void mgpu__colsum_range(void *arg, int64_t j0, int64_t j1) {
    mgpu__colsum_arg *s = (mgpu__colsum_arg *)arg;
    float acc[256];
    int64_t r, jb, j;
    for (jb = j0; jb < j1; jb += 256) {   /* a strip of columns at a time keeps the loop vectorised */
        int64_t w = MGPU__MIN((int64_t)256, j1 - jb);
        for (j = 0; j < w; j++) acc[j] = 0.0f;
        for (r = 0; r < s->rows; r++) {
            const float *row = s->g + r * s->cols + jb;
            for (j = 0; j < w; j++) acc[j] += row[j];
        }
        for (j = 0; j < w; j++) s->out[jb + j] += acc[j];
    }
}
static void mgpu__add_column_sums(mgpu_context *ctx, const float *g, int64_t rows, int64_t cols, float *out) {
    mgpu__colsum_arg s;
    s.g = g; s.out = out; s.rows = rows; s.cols = cols;
    mgpu_parallel_for(ctx, cols, MGPU__MAX((int64_t)16, (int64_t)32768 / MGPU__MAX(rows, (int64_t)1)), mgpu__colsum_range, &s);
}

/* Each row of y (rows, cols) := v (cols): the bias, before a GEMM accumulates with beta = 1. */
static void mgpu__fill_rows(float *y, int64_t rows, int64_t cols, const float *v) {
    int64_t r;
    for (r = 0; r < rows; r++) memcpy(y + r * cols, v, sizeof(float) * (size_t)cols);
}

/* --------------------------------------------------------------------------------------
   matmul
   -------------------------------------------------------------------------------------- */

/* saved: iarg = {batch, M, K, N} */
static mgpu_result mgpu__matmul_backward(mgpu_context *ctx, mgpu__node *node) {
    mgpu_tensor *a = node->in[0], *b = node->in[1];
    int64_t batch = node->iarg[0], m = node->iarg[1], k = node->iarg[2], n = node->iarg[3];
    const float *dc = (const float *)node->out->grad->data;   // (B, M, N)
    mgpu_result r = MGPU_OK;
    if (mgpu__needs_grad(node, 0)) {   // dA (B, M, K) += dC @ B^T
        float *da;
        mgpu__gemm_operand oa = mgpu__gemm_a(dc, 0, n), ob = mgpu__gemm_b((const float *)b->data, 1, n);
        MGPU__GRAD_OR_FAIL(da, ctx, a);
        oa.batch_stride = m * n; ob.batch_stride = k * n;
        r = mgpu__gemm(ctx, batch, m, k, n, 1.0f, &oa, &ob, 1.0f, da, k, m * k);
        if (r != MGPU_OK) return r;
    }
    if (mgpu__needs_grad(node, 1)) {   // dB (B, K, N) += A^T @ dC
        float *db;
        mgpu__gemm_operand oa = mgpu__gemm_a((const float *)a->data, 1, k), ob = mgpu__gemm_b(dc, 0, n);
        MGPU__GRAD_OR_FAIL(db, ctx, b);
        oa.batch_stride = m * k; ob.batch_stride = m * n;
        r = mgpu__gemm(ctx, batch, k, n, m, 1.0f, &oa, &ob, 1.0f, db, n, k * n);
    }
    return r;
}

MGPU_API mgpu_tensor *mgpu_op_matmul(mgpu_context *ctx, mgpu_tensor *a, mgpu_tensor *b) {
    int64_t shape[3], batch, m, k, n;
    mgpu_tensor *out, *ins[2];
    mgpu__node *node = NULL;
    mgpu__gemm_operand oa, ob;
    int nd;
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
    oa = mgpu__gemm_a((const float *)a->data, 0, k); oa.batch_stride = m * k;
    ob = mgpu__gemm_b((const float *)b->data, 0, n); ob.batch_stride = k * n;
    if (mgpu__gemm(ctx, batch, m, n, k, 1.0f, &oa, &ob, 0.0f, (float *)out->data, n, m * n) != MGPU_OK) return NULL;
    ins[0] = a; ins[1] = b;
    MGPU__RECORD(ctx, "matmul", mgpu__matmul_backward, out, 2, ins, node);
    if (node) { node->iarg[0] = batch; node->iarg[1] = m; node->iarg[2] = k; node->iarg[3] = n; }
    return out;
}

/* --------------------------------------------------------------------------------------
   linear: y = x @ w^T + b
   -------------------------------------------------------------------------------------- */

/* iarg = {rows, in, out} */
static mgpu_result mgpu__linear_backward(mgpu_context *ctx, mgpu__node *node) {
    mgpu_tensor *x = node->in[0], *w = node->in[1], *b = node->n_in > 2 ? node->in[2] : NULL;
    int64_t rows = node->iarg[0], in = node->iarg[1], outf = node->iarg[2];
    const float *dy = (const float *)node->out->grad->data;   // (rows, out)
    mgpu_result r;
    if (mgpu__needs_grad(node, 1)) {   // dW (out, in) += dY^T @ X
        float *dw;
        mgpu__gemm_operand oa = mgpu__gemm_a(dy, 1, outf), ob = mgpu__gemm_b((const float *)x->data, 0, in);
        MGPU__GRAD_OR_FAIL(dw, ctx, w);
        r = mgpu__gemm(ctx, 1, outf, in, rows, 1.0f, &oa, &ob, 1.0f, dw, in, 0);
        if (r != MGPU_OK) return r;
    }
    if (b && mgpu__needs_grad(node, 2)) {   // db (out) += column sums of dY
        float *db;
        MGPU__GRAD_OR_FAIL(db, ctx, b);
        mgpu__add_column_sums(ctx, dy, rows, outf, db);
    }
    if (mgpu__needs_grad(node, 0)) {   // dX (rows, in) += dY @ W; skipped for a first layer
        float *dx;
        mgpu__gemm_operand oa = mgpu__gemm_a(dy, 0, outf), ob = mgpu__gemm_b((const float *)w->data, 0, in);
        MGPU__GRAD_OR_FAIL(dx, ctx, x);
        r = mgpu__gemm(ctx, 1, rows, in, outf, 1.0f, &oa, &ob, 1.0f, dx, in, 0);
        if (r != MGPU_OK) return r;
    }
    return MGPU_OK;
}

MGPU_API mgpu_tensor *mgpu_op_linear(mgpu_context *ctx, mgpu_tensor *x, mgpu_tensor *w, mgpu_tensor *b) {
    const char *op = "mgpu_op_linear";
    int64_t shape[MGPU_MAX_DIMS], rows, in, outf;
    int i;
    mgpu_tensor *y, *ins[3];
    mgpu__node *node = NULL;
    mgpu__gemm_operand ox, ow;
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
    if (b) mgpu__fill_rows((float *)y->data, rows, outf, (const float *)b->data);
    ox = mgpu__gemm_a((const float *)x->data, 0, in);
    ow = mgpu__gemm_b((const float *)w->data, 1, in);
    if (mgpu__gemm(ctx, 1, rows, outf, in, 1.0f, &ox, &ow, b ? 1.0f : 0.0f, (float *)y->data, outf, 0) != MGPU_OK) return NULL;
    ins[0] = x; ins[1] = w; ins[2] = b;
    MGPU__RECORD(ctx, "linear", mgpu__linear_backward, y, b ? 3 : 2, ins, node);
    if (node) { node->iarg[0] = rows; node->iarg[1] = in; node->iarg[2] = outf; }
    return y;
}

/* --------------------------------------------------------------------------------------
   conv2d: im2col + GEMM. Images are processed in groups whose column buffers fit a budget;
   the forward is one batched GEMM per group (W shared), the weight gradient one GEMM per group
   with K running over (image, position) so images are summed in a fixed order.
   -------------------------------------------------------------------------------------- */

/* floats of im2col buffer per group (64 MiB) */
#define MGPU__CONV_COLS_BUDGET ((int64_t)16 << 20)

typedef struct mgpu__conv_geom {
    int64_t n, c, h, w, o, oh, ow, ks, stride, pad;
    int64_t p, ckk;     /* output positions per image, rows of an image's column matrix */
} mgpu__conv_geom;

/* 1x1, stride 1, no padding: an image's column matrix is the image itself */
static int mgpu__conv_is_pointwise(const mgpu__conv_geom *g) { return g->ks == 1 && g->stride == 1 && g->pad == 0; }

/* Output positions [lo, hi) whose input index ox * stride - pad + kx lies inside [0, size). */
static void mgpu__conv_valid_range(int64_t out, int64_t size, int64_t stride, int64_t pad, int64_t kx, int64_t *lo, int64_t *hi) {
    int64_t a = pad - kx, b = size + pad - kx;   /* need a <= ox * stride < b */
    *lo = a <= 0 ? 0 : (a + stride - 1) / stride;
    *hi = b <= 0 ? 0 : MGPU__MIN(out, (b + stride - 1) / stride);
    if (*hi < *lo) *hi = *lo;
}

/* Gather (add == 0) one image's patches into cols (C*KS*KS, OH*OW), or scatter-add (add == 1)
   cols back into the image (col2im): the same index walk both ways. */
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
                    if (add) { for (ox = x_lo; ox < x_hi; ox++) img[at + ox * g->stride] += r[ox]; continue; }
                    for (ox = 0; ox < x_lo; ox++) r[ox] = 0.0f;
                    for (; ox < x_hi; ox++) r[ox] = img[at + ox * g->stride];
                    for (; ox < g->ow; ox++) r[ox] = 0.0f;
                }
            }
}

typedef struct { const mgpu__conv_geom *g; float *x; float *cols; int add; } mgpu__im2col_arg;
static void mgpu__im2col_range(void *arg, int64_t i0, int64_t i1) {
    mgpu__im2col_arg *s = (mgpu__im2col_arg *)arg;
    int64_t i;
    for (i = i0; i < i1; i++)
        mgpu__im2col_image(s->g, s->x + i * s->g->c * s->g->h * s->g->w, s->cols + i * s->g->ckk * s->g->p, s->add);
}
/* im2col (add 0) or col2im-accumulate (add 1) for `count` images starting at x, one task per image. */
static void mgpu__im2col(mgpu_context *ctx, const mgpu__conv_geom *g, float *x, float *cols, int64_t count, int add) {
    mgpu__im2col_arg s;
    s.g = g; s.x = x; s.cols = cols; s.add = add;
    mgpu_parallel_for(ctx, count, MGPU__MAX((int64_t)1, (int64_t)32768 / MGPU__MAX(g->ckk * g->p, (int64_t)1)), mgpu__im2col_range, &s);
}

static int64_t mgpu__conv_group(const mgpu__conv_geom *g) {
    return MGPU__MAX((int64_t)1, MGPU__MIN(g->n, MGPU__CONV_COLS_BUDGET / MGPU__MAX(g->ckk * g->p, (int64_t)1)));
}

/* Column matrices of images [n0, n0 + count): x itself for pointwise convs, else im2col into scratch. */
static float *mgpu__conv_columns(mgpu_context *ctx, const mgpu__conv_geom *g, float *x, int64_t n0, int64_t count, float *scratch) {
    float *xi = x + n0 * g->c * g->h * g->w;
    if (mgpu__conv_is_pointwise(g)) return xi;
    mgpu__im2col(ctx, g, xi, scratch, count, 0);
    return scratch;
}

/* node: in = {x, w, b}, extra = geometry; saved[0] = all columns when the forward had one group. */
static mgpu_result mgpu__conv2d_backward_group(mgpu_context *ctx, mgpu__node *node, const mgpu__conv_geom *g, int64_t n0, int64_t count,
                                               float *cols, float *dcols) {
    mgpu_tensor *x = node->in[0], *w = node->in[1];
    const float *dy = (const float *)node->out->grad->data + n0 * g->o * g->p;   // (count, O, P)
    mgpu_result r;
    if (mgpu__needs_grad(node, 1)) {   // dW (O, CKK) += sum over images of dY_n (O, P) @ cols_n^T: K = (image, position)
        float *dw;
        mgpu__gemm_operand oa = mgpu__gemm_a(dy, 0, g->p), ob = mgpu__gemm_b(cols, 1, g->p);
        MGPU__GRAD_OR_FAIL(dw, ctx, w);
        oa.kseg = g->p; oa.kseg_stride = g->o * g->p;
        ob.kseg = g->p; ob.kseg_stride = g->ckk * g->p;
        r = mgpu__gemm(ctx, 1, g->o, g->ckk, count * g->p, 1.0f, &oa, &ob, 1.0f, dw, g->ckk, 0);
        if (r != MGPU_OK) return r;
    }
    if (mgpu__needs_grad(node, 0)) {   // dcols_n (CKK, P) = W^T @ dY_n, then col2im into dX
        float *dx, *dxi;
        int pointwise = mgpu__conv_is_pointwise(g);
        mgpu__gemm_operand oa = mgpu__gemm_a((const float *)w->data, 1, g->ckk), ob = mgpu__gemm_b(dy, 0, g->p);
        MGPU__GRAD_OR_FAIL(dx, ctx, x);
        dxi = dx + n0 * g->c * g->h * g->w;
        ob.batch_stride = g->o * g->p;
        /* pointwise: dX is dcols, accumulate straight into it */
        r = mgpu__gemm(ctx, count, g->ckk, g->p, g->o, 1.0f, &oa, &ob, pointwise ? 1.0f : 0.0f,
                       pointwise ? dxi : dcols, g->p, g->ckk * g->p);
        if (r != MGPU_OK) return r;
        if (!pointwise) mgpu__im2col(ctx, g, dxi, dcols, count, 1);
    }
    return MGPU_OK;
}

/* db[o] += sum of dY (N, O, P) over images and positions: strips of positions are summed across
   images as vectors, then the strip totals in order (deterministic, and it vectorises). */
typedef struct { const float *dy; float *db; const mgpu__conv_geom *g; } mgpu__chansum_arg;
static void mgpu__chansum_range(void *arg, int64_t o0, int64_t o1) {
    mgpu__chansum_arg *s = (mgpu__chansum_arg *)arg;
    const mgpu__conv_geom *g = s->g;
    float strip[256];
    int64_t o, i, q0, q;
    for (o = o0; o < o1; o++) {
        float total = 0.0f;
        for (q0 = 0; q0 < g->p; q0 += 256) {
            int64_t w = MGPU__MIN((int64_t)256, g->p - q0);
            for (q = 0; q < w; q++) strip[q] = 0.0f;
            for (i = 0; i < g->n; i++) {
                const float *r = s->dy + (i * g->o + o) * g->p + q0;
                for (q = 0; q < w; q++) strip[q] += r[q];
            }
            for (q = 0; q < w; q++) total += strip[q];
        }
        s->db[o] += total;
    }
}

static mgpu_result mgpu__conv2d_backward(mgpu_context *ctx, mgpu__node *node) {
    const mgpu__conv_geom *g = (const mgpu__conv_geom *)node->extra;
    mgpu_tensor *b = node->in[2];
    int64_t group = mgpu__conv_group(g), n0, count;
    float *scratch = NULL, *dcols = NULL;
    mgpu_result r;
    if (!mgpu__conv_is_pointwise(g)) {
        size_t bytes = sizeof(float) * (size_t)(group * g->ckk * g->p);
        if (!node->saved[0] && mgpu__needs_grad(node, 1) && !(scratch = (float *)mgpu__arena_alloc(ctx, bytes))) return mgpu_last_result();
        if (mgpu__needs_grad(node, 0) && !(dcols = (float *)mgpu__arena_alloc(ctx, bytes))) return mgpu_last_result();
    }
    for (n0 = 0; n0 < g->n; n0 += group) {
        float *cols = NULL;
        count = MGPU__MIN(group, g->n - n0);
        if (mgpu__needs_grad(node, 1))
            cols = node->saved[0] ? (float *)node->saved[0]->data : mgpu__conv_columns(ctx, g, (float *)node->in[0]->data, n0, count, scratch);
        r = mgpu__conv2d_backward_group(ctx, node, g, n0, count, cols, dcols);
        if (r != MGPU_OK) return r;
    }
    if (b && mgpu__needs_grad(node, 2)) {   // db (O) += sum over images and positions of dY
        mgpu__chansum_arg s;
        float *db;
        MGPU__GRAD_OR_FAIL(db, ctx, b);
        s.dy = (const float *)node->out->grad->data; s.db = db; s.g = g;
        mgpu_parallel_for(ctx, g->o, MGPU__MAX((int64_t)1, (int64_t)32768 / MGPU__MAX(g->n * g->p, (int64_t)1)), mgpu__chansum_range, &s);
    }
    return MGPU_OK;
}

MGPU_API mgpu_tensor *mgpu_op_conv2d(mgpu_context *ctx, mgpu_tensor *x, mgpu_tensor *w, mgpu_tensor *b, int stride, int padding) {
    const char *op = "mgpu_op_conv2d";
    mgpu__conv_geom g, *gsaved;
    int64_t shape[4], group, n0, i, o;
    mgpu_tensor *y, *ins[3], *cols_t = NULL;
    mgpu__node *node = NULL;
    float *scratch = NULL;
    if (!mgpu__check_input(ctx, op, "x", x, 1) || !mgpu__check_input(ctx, op, "w", w, 1)) return NULL;
    if (b && !mgpu__check_input(ctx, op, "b", b, 1)) return NULL;
    if (x->ndim != 4 || w->ndim != 4 || w->shape[1] != x->shape[1])
        MGPU__FAIL_NULL(MGPU_ERR_SHAPE, "mgpu_op_conv2d: x %s and w %s do not fit (need x (N, C, H, W) and w (O, C, KH, KW) with the same C)",
                        mgpu__shape_str(x), mgpu__shape_str(w));
    if (w->shape[2] != w->shape[3] || w->shape[2] < 1)
        MGPU__FAIL_NULL(MGPU_ERR_UNSUPPORTED, "mgpu_op_conv2d: w %s: only square kernels (KH == KW >= 1) are supported", mgpu__shape_str(w));
    if (b && (b->ndim != 1 || b->shape[0] != w->shape[0]))
        MGPU__FAIL_NULL(MGPU_ERR_SHAPE, "mgpu_op_conv2d: b %s does not fit w %s (need b (O))", mgpu__shape_str(b), mgpu__shape_str(w));
    if (stride < 1 || padding < 0)
        MGPU__FAIL_NULL(MGPU_ERR_INVALID_ARG, "mgpu_op_conv2d: stride %d must be >= 1 and padding %d >= 0", stride, padding);
    memset(&g, 0, sizeof g);
    g.n = x->shape[0]; g.c = x->shape[1]; g.h = x->shape[2]; g.w = x->shape[3];
    g.o = w->shape[0]; g.ks = w->shape[2]; g.stride = stride; g.pad = padding;
    if (g.h + 2 * g.pad < g.ks || g.w + 2 * g.pad < g.ks)
        MGPU__FAIL_NULL(MGPU_ERR_SHAPE, "mgpu_op_conv2d: x %s with padding %d is smaller than the kernel of w %s", mgpu__shape_str(x), padding, mgpu__shape_str(w));
    g.oh = (g.h + 2 * g.pad - g.ks) / g.stride + 1;
    g.ow = (g.w + 2 * g.pad - g.ks) / g.stride + 1;
    g.p = g.oh * g.ow; g.ckk = g.c * g.ks * g.ks;
    shape[0] = g.n; shape[1] = g.o; shape[2] = g.oh; shape[3] = g.ow;
    y = mgpu__new_activation(ctx, MGPU_F32, 4, shape);   // (N, O, OH, OW)
    if (!y) return NULL;
    ins[0] = x; ins[1] = w; ins[2] = b;
    MGPU__RECORD(ctx, "conv2d", mgpu__conv2d_backward, y, 3, ins, node);
    group = mgpu__conv_group(&g);
    if (!mgpu__conv_is_pointwise(&g)) {
        int64_t shp[1];
        shp[0] = group * g.ckk * g.p;
        /* a single group's columns are kept for the weight gradient instead of recomputed */
        if (node && group == g.n && w->requires_grad) { cols_t = mgpu__new_activation(ctx, MGPU_F32, 1, shp); if (!cols_t) return NULL; scratch = (float *)cols_t->data; }
        else if (!(scratch = (float *)mgpu__arena_alloc(ctx, sizeof(float) * (size_t)shp[0]))) return NULL;
    }
    for (n0 = 0; n0 < g.n; n0 += group) {
        int64_t count = MGPU__MIN(group, g.n - n0);
        float *yg = (float *)y->data + n0 * g.o * g.p;
        const float *cols = mgpu__conv_columns(ctx, &g, (float *)x->data, n0, count, scratch);
        mgpu__gemm_operand ow = mgpu__gemm_a((const float *)w->data, 0, g.ckk), oc = mgpu__gemm_b(cols, 0, g.p);
        oc.batch_stride = g.ckk * g.p;
        if (b)
            for (i = 0; i < count; i++)
                for (o = 0; o < g.o; o++) {
                    float *r = yg + (i * g.o + o) * g.p, bv = ((const float *)b->data)[o];
                    int64_t q;
                    for (q = 0; q < g.p; q++) r[q] = bv;
                }
        // Y_n (O, P) = W (O, CKK) @ cols_n (CKK, P) [+ bias already in Y]
        if (mgpu__gemm(ctx, count, g.o, g.p, g.ckk, 1.0f, &ow, &oc, b ? 1.0f : 0.0f, yg, g.p, g.o * g.p) != MGPU_OK) return NULL;
    }
    if (node) {
        gsaved = (mgpu__conv_geom *)mgpu__arena_alloc(ctx, sizeof *gsaved);
        if (!gsaved) return NULL;
        *gsaved = g;
        node->extra = gsaved;
        node->saved[0] = cols_t;
    }
    return y;
}

/* --------------------------------------------------------------------------------------
   Pooling over (N, C, H, W) planes, PyTorch's output size floor((H + 2p - k) / s) + 1
   -------------------------------------------------------------------------------------- */

typedef struct mgpu__pool_geom {
    int64_t planes, h, w, oh, ow, k, stride, pad;
} mgpu__pool_geom;

/* Validates kernel/stride/padding for a pooling op and fills the geometry (stride 0 -> kernel). */
static int mgpu__pool_setup(mgpu_context *ctx, const char *op, mgpu_tensor *x, int kernel, int stride, int padding, mgpu__pool_geom *g) {
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
    g->planes = x->shape[0] * x->shape[1]; g->h = x->shape[2]; g->w = x->shape[3];
    g->k = kernel; g->stride = stride ? stride : kernel; g->pad = padding;
    if (g->h + 2 * g->pad < g->k || g->w + 2 * g->pad < g->k) {
        mgpu__fail(MGPU_ERR_SHAPE, "%s: x %s with padding %d is smaller than the kernel %d", op, mgpu__shape_str(x), padding, kernel);
        return 0;
    }
    g->oh = (g->h + 2 * g->pad - g->k) / g->stride + 1;
    g->ow = (g->w + 2 * g->pad - g->k) / g->stride + 1;
    return 1;
}

/* Window of output (oy, ox) clipped to the image: rows [y0, y1), columns [x0, x1). */
static void mgpu__pool_window(const mgpu__pool_geom *g, int64_t oy, int64_t ox, int64_t *y0, int64_t *y1, int64_t *x0, int64_t *x1) {
    int64_t ys = oy * g->stride - g->pad, xs = ox * g->stride - g->pad;
    *y0 = MGPU__MAX(ys, (int64_t)0); *y1 = MGPU__MIN(ys + g->k, g->h);
    *x0 = MGPU__MAX(xs, (int64_t)0); *x1 = MGPU__MIN(xs + g->k, g->w);
}

typedef struct mgpu__pool_arg {
    const mgpu__pool_geom *g;
    const float *x; float *y; int32_t *idx;   /* forward: x -> y (+ argmax) */
    const float *dy; float *dx;               /* backward: dy -> dx */
    int is_max;
} mgpu__pool_arg;

static void mgpu__pool_forward_range(void *arg, int64_t p0, int64_t p1) {
    mgpu__pool_arg *s = (mgpu__pool_arg *)arg;
    const mgpu__pool_geom *g = s->g;
    float inv = 1.0f / (float)(g->k * g->k);   /* count_include_pad: the window is always k * k */
    int64_t pl, oy, ox, yy, xx, y0, y1, x0, x1;
    for (pl = p0; pl < p1; pl++) {
        const float *xp = s->x + pl * g->h * g->w;
        float *yp = s->y + pl * g->oh * g->ow;
        int32_t *ip = s->idx ? s->idx + pl * g->oh * g->ow : NULL;
        for (oy = 0; oy < g->oh; oy++)
            for (ox = 0; ox < g->ow; ox++) {
                float acc = s->is_max ? -INFINITY : 0.0f;
                int64_t best;
                mgpu__pool_window(g, oy, ox, &y0, &y1, &x0, &x1);
                best = y0 * g->w + x0;
                for (yy = y0; yy < y1; yy++)
                    for (xx = x0; xx < x1; xx++) {
                        float v = xp[yy * g->w + xx];
                        if (!s->is_max) acc += v;
                        else if (v > acc || v != v) { acc = v; best = yy * g->w + xx; }   /* NaN wins, as in PyTorch */
                    }
                yp[oy * g->ow + ox] = s->is_max ? acc : acc * inv;
                if (ip) ip[oy * g->ow + ox] = (int32_t)best;
            }
    }
}

static void mgpu__pool_backward_range(void *arg, int64_t p0, int64_t p1) {
    mgpu__pool_arg *s = (mgpu__pool_arg *)arg;
    const mgpu__pool_geom *g = s->g;
    float inv = 1.0f / (float)(g->k * g->k);
    int64_t pl, q, oy, ox, yy, xx, y0, y1, x0, x1;
    for (pl = p0; pl < p1; pl++) {
        const float *dyp = s->dy + pl * g->oh * g->ow;
        float *dxp = s->dx + pl * g->h * g->w;
        if (s->is_max) {
            const int32_t *ip = s->idx + pl * g->oh * g->ow;
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

static int64_t mgpu__pool_min_chunk(const mgpu__pool_geom *g) {
    return MGPU__MAX((int64_t)1, (int64_t)32768 / MGPU__MAX(g->h * g->w, (int64_t)1));
}

/* node: extra = geometry; saved[0] = argmax per output (I32 index into the plane), max pooling only */
static mgpu_result mgpu__pool_backward(mgpu_context *ctx, mgpu__node *node) {
    mgpu__pool_arg s;
    float *dx;
    memset(&s, 0, sizeof s);
    MGPU__GRAD_OR_FAIL(dx, ctx, node->in[0]);
    s.g = (const mgpu__pool_geom *)node->extra;
    s.dy = (const float *)node->out->grad->data; s.dx = dx;
    s.is_max = node->saved[0] != NULL;
    s.idx = s.is_max ? (int32_t *)node->saved[0]->data : NULL;
    mgpu_parallel_for(ctx, s.g->planes, mgpu__pool_min_chunk(s.g), mgpu__pool_backward_range, &s);
    return MGPU_OK;
}

static mgpu_tensor *mgpu__pool2d(mgpu_context *ctx, const char *op, mgpu_tensor *x, int kernel, int stride, int padding, int is_max) {
    mgpu__pool_geom g, *gs;
    mgpu__pool_arg s;
    mgpu_tensor *y, *idx = NULL;
    mgpu__node *node = NULL;
    int64_t shape[4];
    if (!mgpu__pool_setup(ctx, op, x, kernel, stride, padding, &g)) return NULL;
    shape[0] = x->shape[0]; shape[1] = x->shape[1]; shape[2] = g.oh; shape[3] = g.ow;
    y = mgpu__new_activation(ctx, MGPU_F32, 4, shape);   // (N, C, OH, OW)
    if (!y) return NULL;
    MGPU__RECORD(ctx, is_max ? "max_pool2d" : "avg_pool2d", mgpu__pool_backward, y, 1, &x, node);
    if (node && is_max && !(idx = mgpu__new_activation(ctx, MGPU_I32, 4, shape))) return NULL;
    memset(&s, 0, sizeof s);
    s.g = &g; s.x = (const float *)x->data; s.y = (float *)y->data; s.is_max = is_max;
    s.idx = idx ? (int32_t *)idx->data : NULL;
    mgpu_parallel_for(ctx, g.planes, mgpu__pool_min_chunk(&g), mgpu__pool_forward_range, &s);
    if (node) {
        if (!(gs = (mgpu__pool_geom *)mgpu__arena_alloc(ctx, sizeof *gs))) return NULL;
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
