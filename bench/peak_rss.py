#!/usr/bin/env python3
"""Runs a command and samples its resident memory.

    bench/peak_rss.py OUT COMMAND...

Starts COMMAND, writes its output lines to OUT.log, each prefixed with the
seconds since the start, and its VmRSS and VmHWM (KiB) from /proc every
20 ms to OUT.rss as "seconds rss hwm" lines, so memory can be read beside
what the process was doing. Prints the exit code and the highest sample.
"""
import subprocess
import sys
import threading
import time

SAMPLE_EVERY_S = 0.02


def field(status: str, name: str) -> int:
    return int(status.split(name + ":")[1].split()[0])


def main() -> int:
    if len(sys.argv) < 3:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    out, command = sys.argv[1], sys.argv[2:]
    started = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def copy_output() -> None:
        with open(out + ".log", "w") as log:
            for line in process.stdout:
                log.write(f"{time.monotonic() - started:8.3f} {line}")

    reader = threading.Thread(target=copy_output)
    reader.start()
    samples = []
    while process.poll() is None:
        try:
            with open(f"/proc/{process.pid}/status") as status:
                text = status.read()
            samples.append((time.monotonic() - started, field(text, "VmRSS"), field(text, "VmHWM")))
        except (OSError, IndexError, ValueError):
            pass  # the process is ending
        time.sleep(SAMPLE_EVERY_S)
    reader.join()
    with open(out + ".rss", "w") as rss:
        rss.writelines(f"{t:.3f} {r} {h}\n" for t, r, h in samples)
    if samples:
        at, peak, _ = max(samples, key=lambda s: s[1])
        print(f"exit {process.returncode}; peak RSS {peak / 1024:.0f} MiB at {at:.2f} s "
              f"(high-water mark {samples[-1][2] / 1024:.0f} MiB)")
    else:
        print(f"exit {process.returncode}; no sample")
    return process.returncode


if __name__ == "__main__":
    sys.exit(main())
