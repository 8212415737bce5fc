"""Pruning from scratch (SPM), now in `regprune.jobs.scratch`; the names other code imports from here stay
available."""

from __future__ import annotations

from .jobs.scratch import (SnapResult, cut_shares, describe_scale, scratch_dry_run, scratch_job, scratch_plan_text,
                           snap_to_budget, spm_settings)

__all__ = ["scratch_job", "scratch_dry_run", "scratch_plan_text", "spm_settings", "snap_to_budget", "SnapResult",
           "cut_shares", "describe_scale"]
