"""The table of modes: what scratch, frozen, finetune, staged and lora mean, in one place.

A row says which weights the backbone starts from, which of its variables train (lora: none of them,
but low-rank factors Keras adds to its Conv2D and Dense layers, `layer.enable_lora`), whether its
BatchNorm layers train, whether the run is staged, and whether the feature cache applies. `--mode`
names scratch, frozen or finetune; staged is `--mode=finetune --head_epochs=K`: K epochs in the frozen
mode (the head alone), then finetune. Config validation, the trainability resolver, the stage
schedule, the feature cache, `--job=compare` and `--job=benchmark` read this table; adding a mode is a
row here and the code that implements what the row says.
"""

import dataclasses

# What trains of the backbone.
ALL = "all"
NONE = "none"
RULE = "rule"  # The variables exactly one of --unfreeze, --unfreeze_from, --trainable_regex selects.
ADAPTERS = "adapters"  # None of its own: LoRA factors of rank --lora_rank beside its Conv2D and Dense kernels.
# Whether the backbone's BatchNorm layers train (in training mode, updating their statistics).
ALWAYS = "always"
NEVER = "never"
BY_FLAG = "--bn"  # --bn=train: those in layers the rule selects; --bn=frozen: none.


@dataclasses.dataclass(frozen=True)
class Mode:
    name: str
    flag: str  # The --mode value of its runs.
    pretrained: bool  # The backbone starts from --weights; otherwise from random weights (--weights unused).
    backbone_trains: str  # ALL, NONE, RULE or ADAPTERS.
    batchnorm_trains: str  # ALWAYS, NEVER or BY_FLAG.
    head_first: bool = False  # Staged: the frozen mode for the first --head_epochs epochs.
    # The layers below the lowest one that trains never change and, without augmentation, neither do
    # their inputs: their output per example can be computed once (engine/core/feature_cache.py).
    feature_cache: bool = False

    def stage(self, epoch, head_epochs):
        """The mode that trains `epoch` (0-based) of a run of this mode."""
        return MODES["frozen"] if self.head_first and epoch < head_epochs else MODES[self.flag]


MODES = {
    mode.name: mode
    for mode in (
        Mode("scratch", "scratch", pretrained=False, backbone_trains=ALL, batchnorm_trains=ALWAYS),
        Mode("frozen", "frozen", pretrained=True, backbone_trains=NONE, batchnorm_trains=NEVER,
             feature_cache=True),
        Mode("finetune", "finetune", pretrained=True, backbone_trains=RULE, batchnorm_trains=BY_FLAG,
             feature_cache=True),
        Mode("staged", "finetune", pretrained=True, backbone_trains=RULE, batchnorm_trains=BY_FLAG,
             head_first=True, feature_cache=True),
        Mode("lora", "lora", pretrained=True, backbone_trains=ADAPTERS, batchnorm_trains=NEVER),
    )
}
FLAG_VALUES = tuple(dict.fromkeys(mode.flag for mode in MODES.values()))  # What --mode accepts.
STAGED_FLAGS = tuple(mode.flag for mode in MODES.values() if mode.head_first)  # What --head_epochs stages.
RULE_FLAGS = tuple(dict.fromkeys(mode.flag for mode in MODES.values() if mode.backbone_trains == RULE))


def of_run(mode_flag, head_epochs):
    """The mode of a run with `--mode=mode_flag --head_epochs=head_epochs` (validated: it exists)."""
    return next(mode for mode in MODES.values() if mode.flag == mode_flag and mode.head_first == bool(head_epochs))
