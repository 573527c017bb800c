/* ======================================================================================
   Checkpoints: DIR/step-00001234/{model,optimizer}.safetensors + trainer_state.json, DIR/latest
   ====================================================================================== */

typedef struct mgpu_checkpoint_desc {
    const char *dir;          /* the --save-dir */
    int keep_last;            /* prune older step-* directories; 0 keeps all */
    int background;           /* write on a background thread after a host snapshot (training goes on);
                                 the snapshot buffer, as large as a checkpoint, is kept for the next save */
} mgpu_checkpoint_desc;
typedef struct mgpu_checkpointer mgpu_checkpointer;
MGPU_API mgpu_checkpointer *mgpu_checkpointer_create(const mgpu_checkpoint_desc *desc);
/* Snapshot model, optimizer state and trainer_state (a JSON object text) for step `step`, then
   write step-%08lld.tmp/, fsync, rename to step-%08lld/, replace `latest` atomically, prune.
   A crash at any moment leaves the previous checkpoint intact. trainer_state must hold
   "format_version": 1 and "step" equal to `step` (NULL: just those two). o may be NULL. Saving a
   step that already exists replaces it. In background mode a failed write is reported by the
   next save, by wait, or (as a warning) by destroy. */
MGPU_API mgpu_result mgpu_checkpointer_save(mgpu_checkpointer *c, int64_t step, const mgpu_model *m,
                                            const mgpu_optimizer *o, const char *trainer_state_json);
/* Wait for a background write to finish; returns its result. */
MGPU_API mgpu_result mgpu_checkpointer_wait(mgpu_checkpointer *c);
MGPU_API void mgpu_checkpointer_destroy(mgpu_checkpointer *c);  /* waits */
/* Path of the checkpoint to resume from: `latest`, else (with a warning) the newest step-* that
   validates. MGPU_ERR_IO when there is none. */
MGPU_API mgpu_result mgpu_checkpoint_find(const char *dir, char *path, size_t size);
/* Fully validates, then loads model (and optimizer, if not NULL) state; *trainer_state receives the
   parsed trainer_state.json (free with mgpu_json_free) when not NULL. Nothing is modified unless
   every file validates. */
MGPU_API mgpu_result mgpu_checkpoint_load(const char *path, mgpu_model *m, mgpu_optimizer *o, mgpu_json **trainer_state);
/* Validate a checkpoint directory without loading it (mgpu-ckpt verify). */
MGPU_API mgpu_result mgpu_checkpoint_verify(const char *path);
/* The files of one checkpoint already in memory: safetensors images and trainer_state.json text. */
typedef struct mgpu_checkpoint_bytes {
    const void *model; size_t model_len;
    const void *optimizer; size_t optimizer_len;
    const char *trainer_state; size_t trainer_state_len;
} mgpu_checkpoint_bytes;
/* mgpu_checkpoint_load's validation and loading on images in memory (tools, fuzzing); label names
   the checkpoint in errors. m NULL (and o NULL): validate only. */
MGPU_API mgpu_result mgpu_checkpoint_load_bytes(const mgpu_checkpoint_bytes *files, const char *label, mgpu_model *m,
                                                mgpu_optimizer *o, mgpu_json **trainer_state);
