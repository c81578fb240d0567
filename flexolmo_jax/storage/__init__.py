"""Storage: model directories (genuine orbax checkpoints), training checkpoints, the streaming
reader/writer the coordinator's tools use, path resolution and atomic writes.

  model_io      DIR/params + model_config.json + meta.json: save, load, read config
  param_store   tensor-slice reader/writer for tools that must never hold a whole model
  checkpoints   training checkpoints (orbax CheckpointManager), preemption flag
  sources       a path (model directory or training workdir) -> the model directory to read
  atomic        the one directory stager (.NAME.partial + lock + rename) and file writer
"""
