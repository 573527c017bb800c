/* mgpu.h - v0.1.0 - train neural networks on one or many GPUs (or CPUs) from C. MIT license, see end of file.

   Do this:
       #define MGPU_IMPLEMENTATION
   before you include this file in *one* C or C++ file to create the implementation.

       // in every other file, include it plainly:
       #include "mgpu.h"

   CPU only (default):   cc -O3 -march=native -DMGPU_IMPLEMENTATION impl.c ... -lm -lpthread
   CUDA:                 add -DMGPU_CUDA, compile mgpu_kernels.cu with nvcc and link
                         -lcudart -lcublas -lcublasLt -lnccl

   Options (define before including, in the implementation file):

   | macro                 | effect                                                               |
   |-----------------------|----------------------------------------------------------------------|
   | MGPU_IMPLEMENTATION   | emit the definitions (exactly one translation unit)                  |
   | MGPU_STATIC           | make every public function static (private copy per translation unit)|
   | MGPU_CUDA             | enable the CUDA backend (needs mgpu_kernels.cu and the CUDA libs)    |
   | MGPU_USE_CBLAS        | CPU GEMM through cblas_sgemm (link OpenBLAS or another cblas)        |
   | MGPU_GEMM_KC          | K block of the built-in CPU GEMM (default 256, a multiple of 8)      |
   | MGPU_STB_IMAGE        | image-folder datasets through stb_image (Debian: libstb-dev)         |
   | MGPU_ASSERT(c)        | internal invariant check; defaults to assert()                       |

   Step by step (a complete program; error checks shortened to keep it readable):

       #define MGPU_IMPLEMENTATION
       #include "mgpu.h"
       int main(int argc, char **argv) {
           mgpu_train_opts opts; mgpu_train_opts_default(&opts);
           if (mgpu_train_opts_parse(&opts, argc, argv) != MGPU_OK) return 2;
           // 1. context: device, threads, RNG, autograd tape
           mgpu_context_desc cd = {0}; cd.seed = opts.seed;
           mgpu_context *ctx = mgpu_context_create(&cd);
           // 2. data: (N, 1, 28, 28) images scaled to [0,1], int64 labels
           mgpu_dataset *train = mgpu_dataset_fashion_mnist(opts.data_dir, 1);
           mgpu_loader_desc ld = {0}; ld.batch_size = opts.batch_size; ld.shuffle = 1; ld.seed = opts.seed;
           mgpu_loader *loader = mgpu_loader_create(train, &ld);
           // 3. model: named parameters with PyTorch's names, shapes and init
           mgpu_model *model = mgpu_model_create(ctx);
           mgpu_linear *fc1 = mgpu_linear_create(model, "fc1", 784, 256, 1);
           mgpu_linear *fc2 = mgpu_linear_create(model, "fc2", 256, 10, 1);
           // 4. optimizer
           mgpu_optimizer_desc od = mgpu_optimizer_desc_default(MGPU_OPTIM_ADAMW);
           mgpu_optimizer *opt = mgpu_optimizer_create(model, &od);
           // 5. train: forward, backward (accumulates into .grad), step, reset the step's memory
           for (int epoch = 0; epoch < opts.epochs; epoch++) {
               mgpu_loader_set_epoch(loader, epoch, 0);
               mgpu_batch b;
               while (mgpu_loader_next(loader, &b) == MGPU_OK && b.size > 0) {
                   mgpu_tensor *x = mgpu_op_flatten(ctx, b.x, 1);                          // (B, 784)
                   mgpu_tensor *h = mgpu_op_relu(ctx, mgpu_linear_forward(ctx, fc1, x));   // (B, 256)
                   mgpu_tensor *loss = mgpu_op_cross_entropy(ctx, mgpu_linear_forward(ctx, fc2, h), b.y);
                   mgpu_optimizer_zero_grad(opt);
                   mgpu_backward(ctx, loss);
                   mgpu_optimizer_step(opt);
                   mgpu_context_end_step(ctx);
               }
           }
           // 6. checkpoint: weights under their state_dict names, loadable by PyTorch
           mgpu_model_save(model, "model.safetensors");
           mgpu_optimizer_destroy(opt); mgpu_model_destroy(model);
           mgpu_loader_destroy(loader); mgpu_dataset_destroy(train); mgpu_context_destroy(ctx);
           return 0;
       }

   Memory rules: tensors returned by mgpu_op_* (and by layer forwards) live in the context's
   activation arena until mgpu_context_end_step(); tensors from mgpu_tensor_create() and model
   parameters live until freed. Every public function validates its arguments: functions return
   mgpu_result, constructors return NULL, and mgpu_last_error() explains the failure. Ops given a
   NULL input return NULL without overwriting the first error, so chains can be checked once.
*/
