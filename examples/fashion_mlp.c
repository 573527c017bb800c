/* fashion_mlp.c - a 784-256-128-10 MLP on Fashion-MNIST.

   Build:  cc -O3 -march=native -I. examples/fashion_mlp.c -o fashion_mlp -lm -lpthread   (or `make`)
   Run:    ./build/fashion_mlp --data data/fashion-mnist --epochs 10 --metrics mlp.jsonl --save-dir runs/mlp
   Every trainer accepts the same flags: ./build/fashion_mlp --help

   Defaults (the PyTorch recipe this mirrors): AdamW lr 1e-3, weight decay 1e-4, batch 128, 10 epochs,
   pixels scaled to [0, 1]. Parameter names fc1.*, fc2.*, fc3.* match the equivalent torch.nn module,
   so --save-dir/model.safetensors loads into it with load_state_dict. */
#define MGPU_IMPLEMENTATION
#include "mgpu.h"

typedef struct mlp { mgpu_linear *fc1, *fc2, *fc3; } mlp;

static mgpu_tensor *mlp_forward(mgpu_context *ctx, mgpu_tensor *x, void *user) {
    const mlp *m = (const mlp *)user;
    mgpu_tensor *h = mgpu_op_flatten(ctx, x, 1);                   // (B, 1, 28, 28) -> (B, 784)
    h = mgpu_op_relu(ctx, mgpu_linear_forward(ctx, m->fc1, h));    // (B, 256)
    h = mgpu_op_relu(ctx, mgpu_linear_forward(ctx, m->fc2, h));    // (B, 128)
    return mgpu_linear_forward(ctx, m->fc3, h);                    // (B, 10) logits
}

/* Called once per model replica (one, or one per device under --multi-gpu dp). */
static int mlp_build(mgpu_model *model, void *user) {
    mlp *m = (mlp *)user;
    return (m->fc1 = mgpu_linear_create(model, "fc1", 784, 256, 1)) &&
           (m->fc2 = mgpu_linear_create(model, "fc2", 256, 128, 1)) &&
           (m->fc3 = mgpu_linear_create(model, "fc3", 128, 10, 1));
}

int main(int argc, char **argv) {
    mgpu_train_opts opts;
    mgpu_trainer *trainer = NULL;
    mgpu_dataset *train = NULL, *test = NULL;
    mgpu_train_summary summary;
    mgpu_result r = MGPU_ERR_STATE;

    mgpu_train_opts_default(&opts);
    if (mgpu_train_opts_parse(&opts, argc, argv) != MGPU_OK) return 2;
    if (opts.help) return 0;

    if ((trainer = mgpu_trainer_create(&opts)) &&
        (train = mgpu_dataset_fashion_mnist(opts.data_dir, 1)) &&
        (test = mgpu_dataset_fashion_mnist(opts.data_dir, 0))) {
        r = mgpu_trainer_run(trainer, mlp_build, sizeof(mlp), mlp_forward, train, test, &summary);
        /* rank 0 speaks for the run; a run stopped by a signal has no final accuracy yet */
        if (r == MGPU_OK && mgpu_trainer_rank(trainer) == 0 && !summary.stop_signal)
            printf("final test accuracy %.4f\n", summary.final_test_accuracy);
    }
    if (r != MGPU_OK) fprintf(stderr, "fashion_mlp: error: %s\n", mgpu_last_error());
    mgpu_dataset_destroy(test);
    mgpu_dataset_destroy(train);
    mgpu_trainer_destroy(trainer);
    return r == MGPU_OK ? 0 : 1;
}
