/* label_noise.c - robustness to scarce and noisy labels on Fashion-MNIST, in miniature.

   Keeps a fraction of the training labels (--label-fraction F: a random subset of the 60000
   training images, drawn from --seed; the other images are not used) and corrupts a fraction of
   those (--noise P: that share of the kept labels replaced by a uniformly random *wrong* class,
   also drawn from --seed), trains a 784-128-10 MLP with the shared trainer and reports accuracy on
   the clean test set. Every trainer flag works as well (--epochs, --lr, --seed, --metrics, ...).

   Build:  make build/label_noise      (or cc -O3 -march=native -I. examples/label_noise.c -o label_noise -lm -lpthread)
   Run:    build/label_noise --label-fraction 0.1 --noise 0.2 --seed 1 --epochs 1

   It is meant to be run many times over a grid by mgpu-sweep, one run per slot:
       build/mgpu-sweep --grid label_frac=0.1,1 --grid noise=0,0.4 --grid seed=0..2 --cpu-slots 2 \
           --results runs/ln.jsonl -- build/label_noise --label-fraction {label_frac} --noise {noise} \
           --seed {seed} --epochs 1
       build/mgpu-sweep summary runs/ln.jsonl --by label_frac,noise --metric final_test_accuracy
   (the trainer writes its metrics to $MGPU_METRICS, which mgpu-sweep sets for every run). */
#define MGPU_IMPLEMENTATION
#include "mgpu.h"

#include <errno.h>
#include <stdlib.h>
#include <string.h>

typedef struct mlp { mgpu_linear *fc1, *fc2; } mlp;

static mgpu_tensor *mlp_forward(mgpu_context *ctx, mgpu_tensor *x, void *user) {
    const mlp *m = (const mlp *)user;
    mgpu_tensor *h = mgpu_op_flatten(ctx, x, 1);                   // (B, 1, 28, 28) -> (B, 784)
    h = mgpu_op_relu(ctx, mgpu_linear_forward(ctx, m->fc1, h));    // (B, 128)
    return mgpu_linear_forward(ctx, m->fc2, h);                    // (B, 10) logits
}

static int mlp_build(mgpu_model *model, void *user) {
    mlp *m = (mlp *)user;
    return (m->fc1 = mgpu_linear_create(model, "fc1", 784, 128, 1)) && (m->fc2 = mgpu_linear_create(model, "fc2", 128, 10, 1));
}

/* ---- the training set as the study sees it: a subset of images with their (noisy) labels ---- */

typedef struct noisy_subset {
    const mgpu_dataset *base;
    int64_t *index;     /* base index of each kept sample */
    int64_t *label;     /* its label after corruption */
} noisy_subset;

static mgpu_result noisy_get(const mgpu_dataset *ds, int64_t i, void *x_out, void *y_out) {
    const noisy_subset *s = (const noisy_subset *)ds->impl;
    int64_t unused;
    mgpu_result r = s->base->get(s->base, s->index[i], x_out, &unused);
    if (r == MGPU_OK) *(int64_t *)y_out = s->label[i];
    return r;
}

static void noisy_destroy(mgpu_dataset *ds) {
    noisy_subset *s = (noisy_subset *)ds->impl;
    free(s->index);
    free(s->label);
    free(s);
    free(ds);
}

/* round(fraction * n) samples of base drawn from seed, of which round(noise * kept) get a wrong
   label (y + 1 + u mod 9, u uniform: every wrong class equally likely). */
static mgpu_dataset *noisy_subset_create(const mgpu_dataset *base, double fraction, double noise, uint64_t seed, int64_t *n_noisy) {
    int64_t n = base->length, kept = (int64_t)(fraction * (double)n + 0.5), corrupt, i;
    int64_t *perm = (int64_t *)malloc((size_t)n * sizeof *perm);
    float *x = (float *)malloc((size_t)(base->x_shape[0] * base->x_shape[1] * base->x_shape[2]) * sizeof *x);
    mgpu_dataset *ds = (mgpu_dataset *)calloc(1, sizeof *ds);
    noisy_subset *s = (noisy_subset *)calloc(1, sizeof *s);
    if (kept < 1) kept = 1;
    corrupt = (int64_t)(noise * (double)kept + 0.5);
    if (s) {
        s->index = (int64_t *)malloc((size_t)kept * sizeof(int64_t));
        s->label = (int64_t *)malloc((size_t)kept * sizeof(int64_t));
    }
    if (!perm || !x || !ds || !s || !s->index || !s->label || base->x_ndim != 3 || base->y_dtype != MGPU_I64) {
        fprintf(stderr, "label_noise: out of memory or not an image dataset with int64 labels\n");
        free(perm); free(x); free(ds);
        if (s) { free(s->index); free(s->label); free(s); }
        return NULL;
    }
    mgpu_sampler_indices(n, 0, 1, 1, seed, 0, 0, perm); /* a permutation of [0, n) drawn from seed */
    for (i = 0; i < kept; i++) {
        s->index[i] = perm[i];
        if (base->get(base, perm[i], x, &s->label[i]) != MGPU_OK) { fprintf(stderr, "label_noise: %s\n", mgpu_last_error()); break; }
    }
    /* which kept samples are corrupted: the first `corrupt` of another permutation */
    mgpu_sampler_indices(kept, 0, 1, 1, seed ^ 0x6e6f697365ULL, 0, 0, perm);
    for (i = 0; i < corrupt; i++) {
        int64_t k = perm[i];
        s->label[k] = (s->label[k] + 1 + (int64_t)(mgpu_random_u32(seed, (uint64_t)k) % 9)) % 10;
    }
    free(perm);
    free(x);
    *ds = *base; /* shapes and dtypes */
    ds->length = kept;
    ds->get = noisy_get;
    ds->destroy = noisy_destroy;
    ds->impl = s;
    ds->static_samples = 1; /* noisy_get is deterministic (the wrong labels were drawn above): it may live on a GPU */
    s->base = base;
    *n_noisy = corrupt;
    return ds;
}

/* ---- the two flags of this study; everything else goes to the shared option parser ---- */

/* Takes --label-fraction/--noise (also with _ and =) out of argv; 0, or -1 after a message. */
static int take_study_flags(int *argc, char **argv, double *fraction, double *noise) {
    int i, out = 1;
    for (i = 1; i < *argc; i++) {
        char name[32];
        const char *arg = argv[i], *value = NULL;
        size_t len = strcspn(arg, "="), k;
        double *dst = NULL, lo = 0, hi = 1, v;
        char *end = NULL;
        for (k = 0; k < len && k < sizeof name - 1; k++) name[k] = (k >= 2 && arg[k] == '_') ? '-' : arg[k];
        name[k] = 0;
        if (strcmp(name, "--label-fraction") == 0) dst = fraction;
        else if (strcmp(name, "--noise") == 0) dst = noise;
        if (!dst) { argv[out++] = argv[i]; continue; }
        if (arg[len] == '=') value = arg + len + 1;
        else if (i + 1 < *argc) value = argv[++i];
        else { fprintf(stderr, "label_noise: %s needs a value\n", name); return -1; }
        errno = 0;
        v = strtod(value, &end);
        if (!value[0] || *end || errno || (dst == fraction ? !(v > lo && v <= hi) : !(v >= lo && v < hi))) {
            fprintf(stderr, "label_noise: invalid value '%s' for %s (expected a number in %s)\n", value, name,
                    dst == fraction ? "(0, 1]" : "[0, 1)");
            return -1;
        }
        *dst = v;
    }
    *argc = out;
    argv[out] = NULL;
    return 0;
}

int main(int argc, char **argv) {
    mgpu_train_opts opts;
    mgpu_trainer *trainer = NULL;
    mgpu_dataset *full = NULL, *train = NULL, *test = NULL;
    mgpu_train_summary summary;
    mgpu_result r = MGPU_ERR_STATE;
    double fraction = 1.0, noise = 0.0;
    int64_t n_noisy = 0, i;

    for (i = 1; i < argc; i++)
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0)
            printf("label_noise: --label-fraction F   share of the training labels kept, in (0, 1] (default 1)\n"
                   "             --noise P            share of the kept labels made wrong, in [0, 1) (default 0)\n"
                   "and every common trainer option:\n\n");
    if (take_study_flags(&argc, argv, &fraction, &noise) != 0) return 2;
    mgpu_train_opts_default(&opts);
    if (mgpu_train_opts_parse(&opts, argc, argv) != MGPU_OK) return 2;
    if (opts.help) return 0;

    if ((trainer = mgpu_trainer_create(&opts)) && (full = mgpu_dataset_fashion_mnist(opts.data_dir, 1)) &&
        (test = mgpu_dataset_fashion_mnist(opts.data_dir, 0)) &&
        (train = noisy_subset_create(full, fraction, noise, opts.seed, &n_noisy))) {
        printf("label_noise: %lld of %lld training labels kept (fraction %g), %lld of them wrong (noise %g)\n", (long long)train->length,
               (long long)full->length, fraction, (long long)n_noisy, noise);
        r = mgpu_trainer_run(trainer, mlp_build, sizeof(mlp), mlp_forward, train, test, &summary);
        /* rank 0 speaks for the run; a run stopped by a signal has no final accuracy yet */
        if (r == MGPU_OK && mgpu_trainer_rank(trainer) == 0 && !summary.stop_signal)
            printf("final test accuracy %.4f\n", summary.final_test_accuracy);
    }
    if (r != MGPU_OK && mgpu_last_error()[0]) fprintf(stderr, "label_noise: error: %s\n", mgpu_last_error());
    mgpu_dataset_destroy(train);
    mgpu_dataset_destroy(test);
    mgpu_dataset_destroy(full);
    mgpu_trainer_destroy(trainer);
    return r == MGPU_OK ? 0 : 1;
}
