/* fashion_cnn.c - a small convolutional network with batch norm on Fashion-MNIST.

   conv1 (1->32, 3x3, pad 1) -> bn1 -> ReLU -> max-pool 2 -> conv2 (32->64, 3x3, pad 1) -> bn2 -> ReLU
   -> max-pool 2 -> fc1 (3136->128) -> ReLU -> dropout 0.25 -> fc2 (128->10), with PyTorch's names.
   The convolutions have no bias (PyTorch's Conv2d(..., bias=False), as torchvision's ResNets): the
   batch norm after each subtracts the per-channel mean, so a bias there would have a gradient of
   zero plus rounding noise, which Adam would turn into full-size random steps.

   Build:  cc -O3 -march=native -I. examples/fashion_cnn.c -o fashion_cnn -lm -lpthread   (or `make`)
   Run:    ./build/fashion_cnn --data data/fashion-mnist --epochs 10 --metrics cnn.jsonl */
#define MGPU_IMPLEMENTATION
#include "mgpu.h"

typedef struct cnn {
    mgpu_conv2d *conv1, *conv2;
    mgpu_batchnorm2d *bn1, *bn2;
    mgpu_linear *fc1, *fc2;
    mgpu_dropout *dropout;
} cnn;

/* conv -> batch norm -> ReLU -> 2x2 max-pool */
static mgpu_tensor *conv_block(mgpu_context *ctx, const mgpu_conv2d *conv, mgpu_batchnorm2d *bn, mgpu_tensor *x) {
    mgpu_tensor *h = mgpu_batchnorm2d_forward(ctx, bn, mgpu_conv2d_forward(ctx, conv, x));
    return mgpu_op_max_pool2d(ctx, mgpu_op_relu(ctx, h), 2, 2, 0);
}

static mgpu_tensor *cnn_forward(mgpu_context *ctx, mgpu_tensor *x, void *user) {
    const cnn *m = (const cnn *)user;
    mgpu_tensor *h = conv_block(ctx, m->conv1, m->bn1, x);          // (B, 32, 14, 14)
    h = conv_block(ctx, m->conv2, m->bn2, h);                       // (B, 64, 7, 7)
    h = mgpu_op_flatten(ctx, h, 1);                                 // (B, 3136)
    h = mgpu_op_relu(ctx, mgpu_linear_forward(ctx, m->fc1, h));     // (B, 128)
    h = mgpu_dropout_forward(ctx, m->dropout, h);
    return mgpu_linear_forward(ctx, m->fc2, h);                     // (B, 10) logits
}

/* Called once per model replica (one, or one per device under --multi-gpu dp). */
static int cnn_build(mgpu_model *model, void *user) {
    cnn *m = (cnn *)user;
    return (m->conv1 = mgpu_conv2d_create(model, "conv1", 1, 32, 3, 1, 1, 0)) &&
           (m->bn1 = mgpu_batchnorm2d_create(model, "bn1", 32)) &&
           (m->conv2 = mgpu_conv2d_create(model, "conv2", 32, 64, 3, 1, 1, 0)) &&
           (m->bn2 = mgpu_batchnorm2d_create(model, "bn2", 64)) &&
           (m->fc1 = mgpu_linear_create(model, "fc1", 3136, 128, 1)) &&
           (m->dropout = mgpu_dropout_create(model, 0.25f)) &&
           (m->fc2 = mgpu_linear_create(model, "fc2", 128, 10, 1));
}

int main(int argc, char **argv) {
    mgpu_train_opts opts;
    mgpu_trainer *trainer;
    mgpu_dataset *train_set = NULL, *test_set = NULL;
    mgpu_train_summary summary;
    mgpu_result r = MGPU_ERR_STATE;

    mgpu_train_opts_default(&opts);
    if (mgpu_train_opts_parse(&opts, argc, argv) != MGPU_OK) return 2;
    if (opts.help) return 0;

    trainer = mgpu_trainer_create(&opts);
    if (trainer) train_set = mgpu_dataset_fashion_mnist(opts.data_dir, 1);
    if (train_set) test_set = mgpu_dataset_fashion_mnist(opts.data_dir, 0);
    if (test_set) r = mgpu_trainer_run(trainer, cnn_build, sizeof(cnn), cnn_forward, train_set, test_set, &summary);
    /* rank 0 speaks for the run; a run stopped by a signal has no final accuracy yet */
    if (r == MGPU_OK && mgpu_trainer_rank(trainer) == 0 && !summary.stop_signal)
        printf("final test accuracy %.4f\n", summary.final_test_accuracy);
    else fprintf(stderr, "fashion_cnn: error: %s\n", mgpu_last_error());
    mgpu_dataset_destroy(test_set);
    mgpu_dataset_destroy(train_set);
    mgpu_trainer_destroy(trainer);
    return r == MGPU_OK ? 0 : 1;
}
