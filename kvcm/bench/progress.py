"""Progress of a `kvcm bench` run on stderr: a tqdm bar on a terminal, plain lines otherwise
(logs, CI, pipes), so stdout carries only the results."""

import sys
import time


class Progress:
    def __init__(self, total_steps, quiet=False, stream=None):
        self.stream = stream or sys.stderr
        self.quiet = quiet
        self.bar = None
        self._last_tick = 0.0
        if not quiet and self.stream.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, file=self.stream, unit="step", dynamic_ncols=True, leave=False)

    def step(self, what):
        """One step of the run starts."""
        if self.bar is not None:
            self.bar.set_description_str(what[:60])
            self.bar.update(1)

    def note(self, line):
        """A result line (printed above the bar, or as a plain line)."""
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            self.stream.write(line + "\n")
            self.stream.flush()

    def tick(self):
        """Called from long waits: refreshes the bar now and then."""
        if self.bar is not None and time.monotonic() - self._last_tick > 0.2:
            self._last_tick = time.monotonic()
            self.bar.refresh()

    def close(self):
        if self.bar is not None:
            self.bar.close()
