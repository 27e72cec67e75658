"""The names notebooks 09 and 10 use, from the modules that now hold them (import from those):

``detr_lite.coco_download`` (COCO layout, download, your own data in COCO layout),
``detr_lite.imagenet`` (the ImageNet backbone weights), ``detr_lite.jobs`` (the training command,
detached runs), ``detr_lite.monitor`` (the run's log, plots, status) and ``detr_lite.official``
(published numbers, recipes, run configs of the official architectures).
"""

from detr_lite.coco_download import (  # noqa: F401
    COCO_ARCHIVES,
    REQUIRED_PATHS,
    CocoArchive,
    arrange_coco_layout,
    check_coco_layout,
    download_coco,
    download_file,
    download_instructions,
    require_coco_layout,
    verify_file,
)
from detr_lite.imagenet import ensure_pretrained_backbone, pretrained_backbone_cache  # noqa: F401
from detr_lite.jobs import (  # noqa: F401
    PID_FILE,
    STDOUT_FILE,
    launch_detached,
    read_pid_file,
    running_pid,
    shell_line,
    stop,
    torchrun_command,
    train_args,
    wait,
    with_resume,
)
from detr_lite.monitor import follow, plot_progress, read_jsonl, read_log, status_line, tail  # noqa: F401
from detr_lite.official import (  # noqa: F401
    OFFICIAL_CHECKPOINTS,
    PAPER_AP,
    RECIPES,
    RUN_PRESETS,
    Recipe,
    family,
    run_config,
    scaled_lrs,
    write_run_config,
)
