"""Neural-network library: models, the training engine, optimisers and schedules, TTA, prediction, DDP.

models (timm and torchvision backbones behind one interface: stages, freezing, preprocessing),
engine (one epoch, checkpoints, precision), checkpoint (best.pt / last.pt hold data, never code),
optim (optimiser and scheduler registries), average (SWA: the last epochs' weights averaged, BatchNorm
statistics re-estimated), tta (views as batched tensor ops), precision and runtime (the numeric form
and the engine inference runs in: torch, torch.compile, OpenVINO on the CPU, openvino imported lazily),
forms (a run's precision, runtime and JPEG decoding chosen and checked per run, and running it: what infer
and oof-tta share),
predict (a run's fold models on images, from a run folder or a `kpipe package`), plan (which runs, views
and weights infer uses), dist (the few places DDP differs).
May import the foundation and kpipe.data.
"""
