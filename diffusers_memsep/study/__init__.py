"""The one pruning-study engine (``memsep prune``, ``memsep demo``, ``memsep study``), split by job as NVlabs/edm
splits its ``training/`` package:

- :mod:`.config`: :class:`PruningStudyConfig` (the runs of one base model), :class:`StudyConfig` (base models,
  replication, early stop, remedies) and the ``memsep study`` profiles;
- :mod:`.settings`: the data sets of a study and each base model's training subset;
- :mod:`.plan`: the runs and where each run's row lives;
- :mod:`.bases`: base models: the trainer's early-stopped run, its continuation, the weight-decay siblings;
- :mod:`.run`: one run (prune / fine-tune / evaluate), variant pipelines and their atomic save;
- :mod:`.workers`: units of work in this process or in worker processes;
- :mod:`.statistics`: intervals, paired differences, Holm-Bonferroni verdicts;
- :mod:`.frontier`: the conditions no other dominates, and the one that copies least per quality budget;
- :mod:`.report`: ``report.md``, ``pareto.png``, model cards of the variants;
- :mod:`.engine`: :func:`prune_pipeline` and :func:`run_study`.
"""

from .config import SAMPLERS, PruningStudyConfig, StudyConfig, full_config, quick_config
from .engine import STUDY_OUTPUTS, StudyResult, check_study_output_dir, prune_pipeline, run_study
from .settings import BUILTIN_SETTINGS, StudySetting, builtin_setting

__all__ = ["BUILTIN_SETTINGS", "PruningStudyConfig", "SAMPLERS", "STUDY_OUTPUTS", "StudyConfig", "StudyResult",
           "StudySetting", "builtin_setting", "check_study_output_dir", "full_config", "prune_pipeline",
           "quick_config", "run_study"]
