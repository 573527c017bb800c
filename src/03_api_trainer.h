/* ======================================================================================
   Trainer: the training loop every example shares, composed from the options
   ====================================================================================== */

/* Builds logits (B, classes) from a batch x; the trainer adds the cross-entropy loss. */
typedef mgpu_tensor *(*mgpu_forward_fn)(mgpu_context *ctx, mgpu_tensor *x, void *user);
typedef struct mgpu_trainer mgpu_trainer;
typedef struct mgpu_train_summary {
    double final_train_loss, final_test_loss, final_test_accuracy;
    double samples_per_s;          /* training samples per second over the run (per process) */
    int64_t steps;                 /* optimizer steps taken */
    int stop_signal;               /* SIGINT, SIGTERM or SIGUSR1 when one stopped the run early (checkpoint saved); 0 otherwise */
} mgpu_train_summary;
/* Creates the context from opts (device, seed, threads). opts is kept by pointer. Under a launcher
   each rank's GPU is its entry of --gpu-ids, else its LOCAL_RANK (unless --device cuda:N names one).
   Self-launch: with --multi-gpu auto, a CUDA device, no launcher (no WORLD_SIZE) and several GPUs
   to use (the --gpu-ids entries, else every visible device), this call does not return: the process
   runs opts->argv once per GPU as DDP workers (mgpu_worker_group_run: only rank 0's stdout is
   shown, the failure of one stops all) and exits with the group's code. */
MGPU_API mgpu_trainer *mgpu_trainer_create(const mgpu_train_opts *opts);
MGPU_API mgpu_context *mgpu_trainer_context(const mgpu_trainer *t);
/* This process's rank (0 without a launcher): only rank 0 should print a run's results. */
MGPU_API int mgpu_trainer_rank(const mgpu_trainer *t);
/* Train `model` (built on mgpu_trainer_context) with cross-entropy on train, evaluating on test
   (may be NULL) every --eval-frequency epochs and after the last; optimizer, LR schedule and
   scaling, gradient accumulation, clipping, metrics JSONL, progress and --save-dir/model.safetensors
   all come from the options. SIGINT, SIGTERM and SIGUSR1 (with --save-dir) save a checkpoint after
   the current step and return MGPU_OK; the end of a run saves a last checkpoint too, so
   --resume auto after it trains nothing ("already finished"). --init-from loads weights before
   the first step; --eval-only evaluates test (the resumed or loaded model) and trains nothing. */
MGPU_API mgpu_result mgpu_trainer_fit(mgpu_trainer *t, mgpu_model *model, mgpu_forward_fn forward, void *user,
                                      const mgpu_dataset *train, const mgpu_dataset *test, mgpu_train_summary *summary);
/* Builds the layers of a model into `user` (user_size bytes, zeroed, owned by the trainer) and
   returns 1, or 0 on failure. Called once per replica, so DataParallel can build several. */
typedef int (*mgpu_build_fn)(mgpu_model *model, void *user);
/* Builds the model with `build` and trains it as mgpu_trainer_fit does; with --multi-gpu dp it
   builds one replica per entry of --gpu-ids, each on its own thread and context, kept in sync by
   an in-process gradient all-reduce (DDP over threads), each replica taking --batch-size samples. */
MGPU_API mgpu_result mgpu_trainer_run(mgpu_trainer *t, mgpu_build_fn build, size_t user_size, mgpu_forward_fn forward,
                                      const mgpu_dataset *train, const mgpu_dataset *test, mgpu_train_summary *summary);
/* Mean cross-entropy and accuracy of the model on a dataset (eval mode, no grad). */
MGPU_API mgpu_result mgpu_evaluate(mgpu_context *ctx, mgpu_model *model, mgpu_forward_fn forward, void *user,
                                   const mgpu_dataset *ds, int64_t batch_size, double *loss, double *accuracy);
MGPU_API void mgpu_trainer_destroy(mgpu_trainer *t);

#ifdef __cplusplus
}
#endif
#endif /* MGPU_H */

