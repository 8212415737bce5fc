"""The training engine shared by every phase: Trainer, schedules, checkpoints and distributed helpers."""

from .bn_recal import recalibrate_bn
from .checkpoint import (atomic_save, atomic_write, atomic_write_bytes, atomic_write_text, capture_rng_state,
                         check_checkpoint_safe, restore_rng_state, safe_load, seed_everything)
from .config import CHECKPOINT_FORMAT, HOOK_METHODS, TrainConfig, TrainingDiverged, TrainingInterrupted
from .dist import (all_gather_object, all_reduce_mean, all_reduce_sum, barrier, broadcast_object, cleanup,
                   get_local_rank, get_rank, get_world_size, init_distributed, is_distributed, is_main, torchrun_env)
from .evaluate import evaluate
from .log import METRICS_FILE, MetricsLogger, read_metrics
from .optim import build_param_groups, resolve_device
from .schedule import LRSchedule, build_lr_scheduler, parse_lr_schedule
from .state import RunState
from .trainer import Trainer

__all__ = [
    "recalibrate_bn",
    "Trainer", "RunState", "TrainConfig", "TrainingInterrupted", "TrainingDiverged", "evaluate", "build_param_groups",
    "seed_everything", "resolve_device", "HOOK_METHODS", "CHECKPOINT_FORMAT",
    "LRSchedule", "parse_lr_schedule", "build_lr_scheduler",
    "atomic_write", "atomic_write_bytes", "atomic_write_text", "atomic_save", "safe_load", "check_checkpoint_safe",
    "capture_rng_state", "restore_rng_state",
    "init_distributed", "torchrun_env", "is_distributed", "get_rank", "get_world_size", "get_local_rank", "is_main",
    "barrier",    "broadcast_object", "all_gather_object", "all_reduce_sum", "all_reduce_mean", "cleanup",
    "MetricsLogger", "read_metrics", "METRICS_FILE",
]
