"""The job's `TorchTrainer`: Ray Train V2's own, with a prompt end (imported where Ray runs).

At the end of every fit Ray Train V2's controller waits for its placement-group cleaner (a
detached actor that removes the worker group's placement group if the controller dies) to stop:
``ray.get(cleaner.stop.remote(), timeout=2 x 1 s + GET_ACTOR_TIMEOUT_S = 12 s)``. Here the
cleaner's monitor thread sits in a state-API call past that every time ("Monitor thread did not
exit within 12.00 seconds"), so every run ended with a 12 s wait (27 % of the embedded default's
job) and a traceback ("Failed to stop PlacementGroupCleaner gracefully") in the console.
`PromptCleanerStop` sends the stop without waiting: after a normal end the group is already
removed, and the cleaner exits by itself once that call returns (a cleaner that misses the stop
sees the controller gone and finds the group removed: nothing to clean).

Ray builds that callback in the private ``DataParallelTrainer._create_default_callbacks``;
`trainer_class` swaps it there and keeps Ray's behaviour on a Ray without either.
"""

from __future__ import annotations

from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback


class PromptCleanerStop(PlacementGroupCleanerCallback):
    """Ray's cleaner callback, whose stop at the controller's end does not wait (module docstring)."""

    def _stop_cleaner(self):
        if self._cleaner:
            self._cleaner.stop.remote()
            self._cleaner = None


def trainer_class(base):
    """``base`` (`TorchTrainer`) whose default callbacks use `PromptCleanerStop`."""
    if not hasattr(base, "_create_default_callbacks"):
        return base

    class Trainer(base):
        def _create_default_callbacks(self):
            callbacks = super()._create_default_callbacks()
            for cb in callbacks:
                if type(cb) is PlacementGroupCleanerCallback:
                    cb.__class__ = PromptCleanerStop  # the same state, the prompt stop
            return callbacks

    Trainer.__name__ = Trainer.__qualname__ = base.__name__
    return Trainer
