"""Old name of the shared helpers, kept for scripts that import it (benchmarks/zoo.py): they live in harness.py."""

from harness import REPO_ROOT, hardware_info, log, run_script, write_json  # noqa: F401
