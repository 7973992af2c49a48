"""Training hooks that crash the loop at a given step, for the resume tests (a crash between
checkpoints, in this process, without Ray)."""

from app.hooks import LocalHooks


class Crash(Exception):
    pass


class CrashAtStep(LocalHooks):
    """`LocalHooks` that raise `Crash` once the engine reports step ``step``."""

    def __init__(self, run_dir, cfg, step):
        super().__init__(run_dir, cfg)
        self.crash_step = step

    def on_step(self, metrics):
        super().on_step(metrics)
        if metrics["step"] == self.crash_step:
            raise Crash(metrics["step"])
